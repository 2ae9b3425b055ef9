"""Pass 2 of the analysis: the zero-invariance proof, for every atom at once.

Assume the trainable variables that produce a channel (the *members*) are zero on it and
everything else is arbitrary. Each equation's :class:`~oto_jax.primitives.Zero` says which
result slices are then zero; the proof pushes these sets of atoms through the program (to a
fixed point through loop carries). An atom fails when a contraction or a sum adds it up while
no operand is zero on it: its channel then changes the output when its dependents change.
"""

from __future__ import annotations

import numpy as np

from oto_jax.ir import Call, Cond, Eqn, Literal, Loop
from oto_jax.primitives import Zero
from oto_jax.structure import StructureContext

_EMPTY: frozenset = frozenset()


def _is_zero(val) -> bool:
  return bool(np.all(np.asarray(val) == 0))


class Proof:
  """Pushes zero channel slices through the program's steps.

  Attributes:
    zero: value id → the atoms on which the value is provably zero.
    failed: atom → why its zero does not reach the output unchanged.
  """

  def __init__(self, ctx: StructureContext):
    self.ctx = ctx
    self.memo: dict[int, tuple[int, ...]] = {}
    self._atoms: dict[int, frozenset] = {}
    self.zero: dict[int, frozenset] = {}
    self.failed: dict[int, str] = {}
    self.lost: dict[int, Eqn] = {}  # atom -> the equation where its zero was lost

  def atoms(self, v) -> frozenset:
    if isinstance(v, Literal):
      return _EMPTY
    hit = self._atoms.get(v)
    if hit is None:
      g, base = self.ctx.graph, self.ctx.base[v]
      hit = frozenset(
        a for ax in range(len(self.ctx.values.shapes[v])) for a in g.atoms_of(base + ax, self.memo)
      )
      self._atoms[v] = hit
    return hit

  def atoms_of_axes(self, nodes) -> frozenset:
    g = self.ctx.graph
    return frozenset(a for d in nodes for a in g.atoms_of(d, self.memo))

  def z(self, v) -> frozenset:
    return _EMPTY if isinstance(v, Literal) else self.zero.get(v, _EMPTY)

  def run(self, steps: tuple) -> None:
    for step in steps:
      if isinstance(step, Eqn):
        if step.entry is not None:
          self._eqn(step)
      elif isinstance(step, Call):
        self.run(step.body)
      elif isinstance(step, Loop):
        self._loop(step)
      else:
        self._cond(step)

  def _eqn(self, eqn: Eqn) -> None:
    zero: Zero = eqn.zero
    kind = zero.kind
    args = eqn.ins
    ins = args if zero.operands is None else [args[i] for i in zero.operands]
    outs = eqn.outs if zero.results is None else [eqn.outs[i] for i in zero.results]
    zmap = self.zero
    zins, all_literal, literal_zero = [], True, False
    for x in ins:
      if type(x) is int:
        zins.append(zmap.get(x, _EMPTY))
        all_literal = False
      else:
        zins.append(_EMPTY)
        literal_zero = literal_zero or (kind in ('keep', 'any') and _is_zero(x.val))
    had = zins[0] if len(zins) == 1 else frozenset().union(*zins)
    # A literal zero (broadcast into jnp.where's zeros, a product with 0.0) is zero on every
    # channel: it makes a `keep` result of literals only, or any `any` result, zero throughout.
    if literal_zero and (kind == 'any' or all_literal):
      for out in outs:
        at = self.atoms(out)
        if at:
          zmap[out] = at
    elif kind != 'none' and (had or (kind == 'all' and all_literal)):
      for out in outs:
        at = self.atoms(out)
        if not at:
          continue
        if kind == 'keep':
          if len(ins) == 1:
            zs = at & had
          else:
            # Zero where every operand that carries the channel is zero on it.
            zs = at & frozenset().union(*(self.atoms(x) for x in ins))
            for x, zx in zip(ins, zins):
              zs = zs - (self.atoms(x) - zx)
        elif kind == 'all':
          ok = zero.literal_ok or _is_zero
          zs = at
          for x, zx in zip(ins, zins):
            zs = (zs if ok(x.val) else _EMPTY) if type(x) is not int else zs & zx
        else:
          zs = at & had
        if zs:
          zmap[out] = zs
        for a in (had & at) - zs:
          self.lost.setdefault(a, eqn)
    else:
      outs = ()
    if had:  # the results the rule does not speak for lose every zero
      for out in eqn.outs:
        if out not in outs:
          for a in had & self.atoms(out):
            self.lost.setdefault(a, eqn)
    if zero.contract is not None:
      self._contraction(eqn, zero.contract)

  def _contraction(self, eqn: Eqn, contract) -> None:
    # One list of contracted axes per operand (a contraction's two, a sum's one): each summed
    # channel must be zero in some operand on a contracted axis.
    ctx = self.ctx
    node = ctx.node
    sides = [(x, axes) for x, axes in zip(eqn.ins, contract) if not isinstance(x, Literal)]
    summed = self.atoms_of_axes([node(x, ax) for x, axes in sides for ax in axes])
    # A side whose zero slice lies on a free axis (a residual kernel's output column) does
    # not make the summed rows zero.
    zeros = [
      self.z(x) - self.atoms_of_axes([node(x, ax) for ax in range(len(ctx.shape(x))) if ax not in axes])
      for x, axes in sides
    ]
    for a in summed:
      if a not in self.failed and not any(a in z for z in zeros):
        what = 'neither side is' if len(sides) > 1 else 'it is not'
        msg = f'summed over by `{eqn.name}` at {eqn.where} while {what} zero'
        if a in self.lost:
          e = self.lost[a]
          msg += f' (zero-invariance is lost at `{e.name}` {e.where})'
        self.failed[a] = msg

  def _loop(self, loop: Loop) -> None:
    for c in loop.carries:
      self.zero[c.inner] = self.z(c.init) & self.atoms(c.inner)
    for outer, inner in loop.xs:
      self.zero[inner] = self.z(outer) & self.atoms(inner)
    while True:
      self.run(loop.cond)
      self.run(loop.body)
      changed = False
      for c in loop.carries:
        new = self.zero[c.inner] & self.z(c.out)
        if new != self.zero[c.inner]:
          self.zero[c.inner], changed = new, True
      if not changed:
        break
    for c in loop.carries:
      self.zero[c.final] = self.zero[c.inner] & self.z(c.out)
    for inner, outer in loop.ys:
      self.zero[outer] = self.z(inner) & self.atoms(outer)

  def _cond(self, cond: Cond) -> None:
    for br in cond.branches:
      self.run(br.steps)
    for k, out in enumerate(cond.outs):
      zs = self.atoms(out)
      for br in cond.branches:
        zs = zs & self.z(br.outs[k])
      self.zero[out] = zs
