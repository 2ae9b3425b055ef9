"""Pass 1 of the analysis: which axes carry the same channels, and which can never be pruned.

Every axis of every value of the :class:`~oto_jax.ir.Program` is a node of an
:class:`~oto_jax.axes.AxisGraph`. Each equation's registry entry unites, lays out and blocks
axes through a :class:`StructureContext`; calls, loops and branches tie their operands and
results together here. The pass also records how each value is used (moved, contracted, or
otherwise consumed), which tells a variable's producing axes from its consumed ones.

Axes whose length depends on a dimension variable (the batch) are never channels. The context
refuses to couple them with fixed-length axes, and a reshape that merges them with other axes
blocks those axes, so that the partition holds at every batch size, not only the analysed one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import jax.extend as jex
import numpy as np

from oto_jax.axes import PROD, AxisGraph, reshape_groups
from oto_jax.errors import AnalysisError
from oto_jax.ir import Call, Cond, Eqn, Literal, Loop, Values, evaluate_shape

# Stand-ins for dimension variables when grouping a reshape's axes: large primes, so that no
# product of them equals a fixed length and none is mistaken for a size-1 axis.
_GENERIC = (1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117, 1_000_121)


class Reason:
  """A blocking reason, formatted with its location only when someone reads it."""

  __slots__ = ('text', 'step')

  def __init__(self, text: str, step: Any = None):
    self.text, self.step = text, step

  def __str__(self) -> str:
    return self.text if self.step is None else f'{self.text} at {self.step.where}'


class StructureContext:
  """What a structure rule sees: value shapes, their axes, and the operations on the axis graph.

  Values are the ids of the :class:`~oto_jax.ir.Program`; literals are :class:`Literal` and are
  ignored by every operation.

  Args:
    values: the program's value table.
    env: the analysed value of each dimension variable.
    watch: values whose uses are recorded in ``uses`` (the variables); what a pure data move
      (reshape, cast, loop carry) makes of a watched value is watched too.
  """

  def __init__(self, values: Values, env: Mapping[str, int], watch: Iterable[int] = ()):
    self.values = values
    self.watched = set(watch)
    self.graph = AxisGraph()
    sizes = [n for shape in values.shapes for n in shape]
    first = self.graph.extend(sizes)
    self.base = []
    for shape in values.shapes:
      self.base.append(first)
      first += len(shape)
    self.uses: dict[int, list[tuple[str, Any]]] = defaultdict(list)
    # value -> (axis nodes, their total length, the reduction): sums over channels, followed
    # through pure data moves until something divides them by that length.
    self.sums: dict[int, tuple[tuple[int, ...], int, Any]] = {}
    self._shapes, self._syms = values.shapes, values.syms
    self._generic_shapes: dict[tuple, tuple[int, ...]] = {}
    self._generic = {name: _GENERIC[i % len(_GENERIC)] for i, name in enumerate(sorted(env))}

  # Values.
  def shape(self, v: Any) -> tuple[int, ...]:
    """The shape of ``v`` at the analysed inputs."""
    return () if isinstance(v, Literal) else self.values.shapes[v]

  def sym(self, v: Any) -> tuple:
    """The symbolic shape of ``v`` (dimension expressions where the batch enters)."""
    return () if isinstance(v, Literal) else self.values.sym(v)

  def is_symbolic(self, v: Any, ax: int) -> bool:
    """Whether axis ``ax`` of ``v`` has a length that depends on a dimension variable."""
    if isinstance(v, Literal):
      return False
    s = self.values.syms[v]
    return s is not None and not isinstance(s[ax], int)

  def node(self, v: int, ax: int) -> int:
    """The axis-graph node of axis ``ax`` of value ``v``."""
    return self.base[v] + ax

  def fresh(self, size: int) -> int:
    """A new axis node of the given size that belongs to no value (padding, a group axis)."""
    return self.graph.extend([int(size)])

  # Structure.
  def unite(self, a: Any, ax: int, b: Any, bx: int) -> None:
    """The channels of axis ``ax`` of ``a`` and axis ``bx`` of ``b`` are kept or cut together."""
    if type(a) is not int or type(b) is not int:  # a literal
      return
    shapes = self._shapes
    n = shapes[a][ax]
    if n <= 1 or n != shapes[b][bx]:
      return
    sa, sb = self._syms[a], self._syms[b]
    if (sa is not None or sb is not None) and (sa or shapes[a])[ax] != (sb or shapes[b])[bx]:
      return  # equal lengths at the analysed shapes only: not the same axis
    self.graph.union(self.base[a] + ax, self.base[b] + bx)

  def assign(self, v: int, ax: int, kind: str, parts: list, step: Any = None) -> None:
    """Axis ``ax`` of ``v`` is the product or concatenation of ``parts``.

    Each part is a ``(value, axis)`` pair or an axis node from :meth:`fresh`.
    """
    pairs = [p for p in parts if not isinstance(p, int)]
    if self.is_symbolic(v, ax) or any(self.is_symbolic(*p) for p in pairs):
      what = 'a product' if kind == PROD else 'a concatenation'
      why = Reason(f'{what} with an axis whose length depends on the input shapes', step)
      # The batch-like axes are not channels; the fixed-length ones are channels that cannot be cut.
      self.block_axis(v, ax, why, structural=self.is_symbolic(v, ax))
      for p in pairs:
        self.block_axis(*p, why, structural=self.is_symbolic(*p))
      return
    nodes = [p if isinstance(p, int) else self.base[p[0]] + p[1] for p in parts]
    self.graph.assign(self.base[v] + ax, kind, nodes)

  def reshape(self, x: Any, out: int, step: Any = None) -> None:
    """Couples the axes of ``x`` and ``out`` across a row-major reshape."""
    if isinstance(x, Literal):
      return
    sx, so = self.values.syms[x], self.values.syms[out]
    if sx is None and so is None:
      groups = reshape_groups(self.values.shapes[x], self.values.shapes[out])
      symbolic = False
    else:
      gx, go = self._generic_shape(x), self._generic_shape(out)
      if math.prod(gx) != math.prod(go):
        # jax.export lets it through because both sides hold zero elements at batch 0.
        raise AnalysisError(
          f'`{step.name if step else "reshape"}` at {step.where if step else "?"} reshapes '
          f'{self.values.sym(x)} to {self.values.sym(out)}, which hold different numbers of '
          'elements at every batch size but 0; check the sizes given to the reshape.'
        )
      groups = reshape_groups(gx, go)
      symbolic = True
    for ga, gb in groups:
      if symbolic and (any(self.is_symbolic(x, k) for k in ga) or any(self.is_symbolic(out, k) for k in gb)):
        if len(ga) == len(gb) == 1 and self.values.sym(x)[ga[0]] == self.values.sym(out)[gb[0]]:
          self.graph.union(self.base[x] + ga[0], self.base[out] + gb[0])
          continue
        why = Reason('merged by a reshape with an axis whose length depends on the input shapes', step)
        for k in ga:
          self.block_axis(x, k, why, structural=self.is_symbolic(x, k))
        for k in gb:
          self.block_axis(out, k, why, structural=self.is_symbolic(out, k))
      elif len(ga) == 1 and len(gb) == 1:
        self.unite(x, ga[0], out, gb[0])
      elif len(ga) == 1:
        self.assign(x, ga[0], PROD, [(out, k) for k in gb])
      elif len(gb) == 1:
        self.assign(out, gb[0], PROD, [(x, k) for k in ga])
      else:
        node = self.fresh(math.prod(self.values.shapes[x][k] for k in ga))
        self.graph.assign(node, PROD, [self.base[x] + k for k in ga])
        self.graph.assign(node, PROD, [self.base[out] + k for k in gb])

  def _generic_shape(self, v: int) -> tuple[int, ...]:
    sym = self.values.sym(v)
    hit = self._generic_shapes.get(sym)
    if hit is None:
      hit = self._generic_shapes[sym] = evaluate_shape(sym, self._generic)
    return hit

  def summed(self, v: int, axes: list, step: Any) -> None:
    """``v`` is a sum over ``axes`` (``(value, axis)`` pairs) at ``step``.

    A zero channel adds nothing to a sum, so the summed axes stay channels; dividing the sum by
    their total length (a mean, a variance, a normalisation) blocks them (:meth:`scaled`).
    """
    count = math.prod(self._shapes[x][ax] for x, ax in axes)
    self.sums[v] = (tuple(self.base[x] + ax for x, ax in axes), count, step)

  def scaled(self, v: Any, factor: Any, step: Any, divides: bool = False) -> None:
    """``v`` is multiplied (or, if ``divides``, divided) by the constant ``factor`` at ``step``;
    if ``v`` is a sum and that scales it by one over its width, the sum is a mean and its axes
    are blocked.

    The slim program would stay exact (it keeps dividing by the full width), but a mean over
    fewer channels is not what the same layer computes at the slimmer width.
    """
    hit = self.sums.get(v) if type(v) is int else None
    if hit is None:
      return
    nodes, count, red = hit
    factor = np.asarray(factor)
    if factor.size != 1:
      return
    factor = float(factor.reshape(()))
    if np.isclose(factor, count, rtol=1e-5) if divides else np.isclose(factor * count, 1.0, rtol=1e-5):
      why = Reason(
        f'averaged over: a sum divided by its width {count} (a mean, which a slimmer width changes)', red
      )
      for n in nodes:
        self.graph.block(n, why, False)

  def block_axis(self, v: Any, ax: int, reason: Any, step: Any = None, structural: bool = False) -> None:
    """Axis ``ax`` of ``v`` can never be pruned; ``structural`` axes are not channels at all.

    ``reason`` says why (a string, located at ``step`` when one is given).
    """
    if isinstance(v, Literal):
      return
    why = reason if isinstance(reason, Reason) or step is None else Reason(reason, step)
    self.graph.block(self.base[v] + ax, why, structural)

  def block_all(self, values: list, reason: Any, step: Any = None) -> None:
    """Blocks every axis of every value in ``values``."""
    why = reason if isinstance(reason, Reason) or step is None else Reason(reason, step)
    for v in values:
      if not isinstance(v, Literal):
        for ax in range(len(self.values.shapes[v])):
          self.graph.block(self.base[v] + ax, why, False)


# ---------------------------------------------------------------------------------------------
# The pass.


def run(ctx: StructureContext, steps: tuple) -> None:
  """Applies every step's structure, in program order."""
  for step in steps:
    if isinstance(step, Eqn):
      _eqn(ctx, step)
    elif isinstance(step, Call):
      run(ctx, step.body)
    elif isinstance(step, Loop):
      _loop(ctx, step)
    else:
      _cond(ctx, step)


def _eqn(ctx: StructureContext, eqn: Eqn) -> None:
  entry = eqn.entry
  if entry is None:
    sub = (
      ' (it holds a sub-program this analysis does not know how to enter)'
      if any(True for _ in jex.core.jaxprs_in_params(eqn.params))
      else ''
    )
    ctx.block_all(list(eqn.ins) + list(eqn.outs), f'unsupported primitive `{eqn.name}`{sub}', eqn)
    for a in eqn.ins:
      if type(a) is int and a in ctx.watched:
        ctx.uses[a].append(('other', None))
    return
  entry.structure(ctx, eqn)
  sums = ctx.sums
  if sums and entry.moves is not None and type(eqn.ins[0]) is int and eqn.ins[0] in sums:
    sums[eqn.outs[0]] = sums[eqn.ins[0]]
  watched = ctx.watched
  contract = eqn.zero.contract
  for k, a in enumerate(eqn.ins):
    if type(a) is not int or a not in watched:
      continue
    if k == 0 and entry.moves is not None:
      # Where the axes land is asked only along a variable's uses: computed then, not here.
      ctx.uses[a].append(('moved', eqn))
      watched.add(eqn.outs[0])
    elif contract is not None and k < len(contract):
      ctx.uses[a].append(('contract', frozenset(contract[k])))
    else:
      ctx.uses[a].append(('other', None))


def _same(ctx: StructureContext, a: Any, b: Any) -> None:
  """``a`` and ``b`` are the same value in another place (a loop carry, a branch result)."""
  if isinstance(a, Literal) or isinstance(b, Literal):
    return
  for ax in range(len(ctx.shape(a))):
    ctx.unite(a, ax, b, ax)


def _moved(ctx: StructureContext, outer: Any, inner: int, moves: tuple) -> None:
  if type(outer) is int and outer in ctx.watched:
    ctx.uses[outer].append(('pass', (inner, moves)))
    ctx.watched.add(inner)


def _loop(ctx: StructureContext, loop: Loop) -> None:
  for c in loop.carries:
    _same(ctx, c.init, c.inner)
    _moved(ctx, c.init, c.inner, tuple((ax,) for ax in range(len(ctx.shape(c.inner)))))
  if loop.kind == 'scan':
    length = ctx.values.shapes[loop.ys[0][1]][0] if loop.ys else None
    if length is None and loop.xs and not isinstance(loop.xs[0][0], Literal):
      length = ctx.shape(loop.xs[0][0])[0]
    stacked = ctx.fresh(length if length is not None else 1)
    ctx.graph.block(stacked, Reason('stacked (scan) axis', loop), True)
    for outer, inner in loop.xs:
      if isinstance(outer, Literal):
        continue
      if ctx.shape(outer)[0] > 1:
        ctx.graph.union(ctx.node(outer, 0), stacked)
      for ax in range(len(ctx.shape(inner))):
        ctx.unite(outer, ax + 1, inner, ax)
      _moved(ctx, outer, inner, ((),) + tuple((ax,) for ax in range(len(ctx.shape(inner)))))
    run(ctx, loop.body)
    for inner, outer in loop.ys:
      if ctx.shape(outer)[0] > 1:
        ctx.graph.union(ctx.node(outer, 0), stacked)
      if not isinstance(inner, Literal):
        for ax in range(len(ctx.shape(inner))):
          ctx.unite(inner, ax, outer, ax + 1)
  else:
    run(ctx, loop.cond)
    run(ctx, loop.body)
  for c in loop.carries:
    _same(ctx, c.inner, c.out)
    _same(ctx, c.inner, c.final)
    _moved(ctx, c.inner, c.final, tuple((ax,) for ax in range(len(ctx.shape(c.inner)))))


def _cond(ctx: StructureContext, cond: Cond) -> None:
  for br in cond.branches:
    run(ctx, br.steps)
    for o, b in zip(cond.outs, br.outs):
      _same(ctx, o, b)
