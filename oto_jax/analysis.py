"""The ZIG analysis: trace a function, couple its channel axes, prove zero-invariance.

Three passes over the jaxpr of ``apply_fn(variables, *args, **kwargs)``:

1. **Structure.** Every axis of every value is a node of an :class:`~oto_jax.axes.AxisGraph`.
   Each primitive's rule unites the axes that carry the same channels and blocks those that
   can never be pruned (reduced, pooled, spatial, indexed). Sub-jaxprs (``jit``,
   ``custom_jvp_call``, ``custom_vjp_call``, ``remat``, ``scan``, ``while``, ``cond``) are
   walked in place, once per call site. The leaves of the final layout forest are atoms.
2. **Proof.** For every atom at once, assume the trainable variables that produce it are zero
   on one of its channels (the *members*) and everything else is arbitrary (the
   *dependents*: consumers' input rows, running statistics). Zeros are pushed through the
   program; an atom fails when some contraction sums over its channel with neither side
   zero. Unknown primitives never pass channels through.
3. **Selection.** Atoms whose member entries overlap (heads × head_dim of one kernel) cannot
   both carry ZIGs; the outermost one does. Each selected, proven atom touching a variable is
   a prunable node group.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend  # not loaded by `import jax` alone
import numpy as np

from oto_jax import rules as rules_lib
from oto_jax.axes import PROD, AxisGraph
from oto_jax.partition import GroupEntry, NodeGroup, Path, ZIGPartition, path_of, path_str
from oto_jax.rules import Literal, Zero

Rule = Callable[..., Zero]

# Ops through which a variable reaches its real consumer unchanged.
_PASS_THROUGH = frozenset(
  'reshape transpose convert_element_type broadcast_in_dim squeeze expand_dims copy copy_p '
  'reduce_precision'.split()
)
_EMPTY: frozenset = frozenset()


def where(eqn, sites=()) -> str:
  """A short, human-readable location of an equation: module path and user source line.

  An equation of a library's jitted helper (``jnp.sort``) may carry no user frame of its own;
  then the innermost call site that has one (``sites``) stands for it.
  """
  own = _where_one(eqn)
  if '(' in own:
    return own
  # Keep the equation's own module path; borrow the source line of the nearest call site.
  site = next((t for t in map(_where_one, reversed(sites)) if '(' in t), '')
  return f'{own} {site[site.index("(") :]}' if site and own != '?' else site or own


def _where_one(eqn) -> str:
  try:
    from jax._src import source_info_util as siu

    name = str(eqn.source_info.name_stack)
    frames = list(siu.user_frames(eqn.source_info.traceback))
    pick = next(
      (f for f in frames if f'{os.sep}flax{os.sep}' not in f.file_name),
      frames[0] if frames else None,
    )
    loc = f'{os.path.basename(pick.file_name)}:{pick.start_line}' if pick else ''
  except Exception:  # noqa: BLE001 - private API: a missing location must not fail the analysis
    name, loc = '', ''
  return ' '.join(p for p in (f'`{name}`' if name else '', f'({loc})' if loc else '') if p) or '?'


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
  """Pairs runs of axes of shape ``a`` and ``b`` with equal products (size-1 axes skipped)."""
  ia = [i for i, s in enumerate(a) if s != 1]
  ib = [i for i, s in enumerate(b) if s != 1]
  out, i, j = [], 0, 0
  while i < len(ia) and j < len(ib):
    ga, gb = [ia[i]], [ib[j]]
    pa, pb = a[ia[i]], b[ib[j]]
    i, j = i + 1, j + 1
    while pa != pb:
      if pa < pb:
        ga.append(ia[i])
        pa *= a[ia[i]]
        i += 1
      else:
        gb.append(ib[j])
        pb *= b[ib[j]]
        j += 1
    out.append((ga, gb))
  return out


def _pass_axes(eqn, in_shape, out_shape, ax: int) -> tuple[int, ...]:
  """Where axis ``ax`` of a pass-through op's operand lands in its output."""
  name = eqn.primitive.name
  if name == 'transpose':
    return (list(eqn.params['permutation']).index(ax),)
  if name == 'broadcast_in_dim':
    return (eqn.params['broadcast_dimensions'][ax],)
  if name in ('reshape', 'squeeze', 'expand_dims'):
    for ga, gb in reshape_groups(in_shape, out_shape):
      if ax in ga:
        return tuple(gb)
    return ()
  return (ax,)


class Context:
  """What a rule sees: value shapes, their axes, and the operations on the axis graph."""

  def __init__(self, rules: Mapping[str, Rule]):
    self.graph = AxisGraph()
    self.rules = rules
    self.shapes: list[tuple[int, ...]] = []
    self.dims: list[tuple[int, ...]] = []
    self.uses: dict[int, list[tuple[str, Any]]] = defaultdict(list)
    # The call equations (jit, custom_jvp, …) whose sub-program is being walked.
    self.sites: list = []
    # Values that are constants of a (sub-)jaxpr, with their arrays.
    self.consts: dict[int, Any] = {}

  # Values.
  def value(self, shape) -> int:
    self.shapes.append(tuple(int(s) for s in shape))
    self.dims.append(tuple(self.graph.new(s) for s in shape))
    return len(self.shapes) - 1

  def shape(self, v: int) -> tuple[int, ...]:
    return self.shapes[v]

  def fresh(self, size: int) -> int:
    """A new axis node of the given size that belongs to no value (padding, a group axis)."""
    return self.graph.new(size)

  # Structure.
  def unite(self, a, ax: int, b, bx: int) -> None:
    """The channels of axis ``ax`` of ``a`` and axis ``bx`` of ``b`` are kept or cut together."""
    if isinstance(a, Literal) or isinstance(b, Literal):
      return
    if self.shapes[a][ax] != self.shapes[b][bx] or self.shapes[a][ax] <= 1:
      return
    self.graph.union(self.dims[a][ax], self.dims[b][bx])

  def assign(self, v: int, ax: int, kind: str, parts) -> None:
    """Axis ``ax`` of ``v`` is the product or concatenation of ``parts``.

    Each part is a ``(value, axis)`` pair or an axis node from :meth:`fresh`.
    """
    nodes = [p if isinstance(p, int) else self.dims[p[0]][p[1]] for p in parts]
    self.graph.assign(self.dims[v][ax], kind, nodes)

  def reshape(self, x: int, out: int) -> None:
    """Couples the axes of ``x`` and ``out`` across a row-major reshape."""
    for ga, gb in reshape_groups(self.shapes[x], self.shapes[out]):
      if len(ga) == 1 and len(gb) == 1:
        self.unite(x, ga[0], out, gb[0])
      elif len(ga) == 1:
        self.assign(x, ga[0], PROD, [(out, k) for k in gb])
      elif len(gb) == 1:
        self.assign(out, gb[0], PROD, [(x, k) for k in ga])
      else:
        node = self.fresh(math.prod(self.shapes[x][k] for k in ga))
        self.graph.assign(node, PROD, [self.dims[x][k] for k in ga])
        self.graph.assign(node, PROD, [self.dims[out][k] for k in gb])

  def block_axis(self, v, ax: int, reason: str, eqn=None, structural: bool = False) -> None:
    """Axis ``ax`` of ``v`` can never be pruned; ``structural`` axes are not channels at all."""
    if isinstance(v, Literal):
      return
    text = f'{reason} at {where(eqn, self.sites)}' if eqn is not None else reason
    self.graph.block(self.dims[v][ax], text, structural)

  def block_all(self, values, reason: str, eqn=None) -> None:
    for v in values:
      if not isinstance(v, Literal):
        for ax in range(len(self.shapes[v])):
          self.block_axis(v, ax, reason, eqn)


# ---------------------------------------------------------------------------------------------
# Pass 1: structure. Steps record what the proof needs, in program order.


def _sub_jaxpr(eqn):
  """The sub-program of a call-like primitive (jit, custom_jvp/vjp, remat), if it has one."""
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if isinstance(sub, jax.extend.core.ClosedJaxpr):
      inner, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jax.extend.core.Jaxpr):
      inner, consts = sub, []
    else:
      continue
    if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
      return inner, consts
  return None


def _read(env, x):
  if isinstance(x, jax.extend.core.Literal):
    return Literal(x.val)
  return env[x]


def walk(ctx: Context, jaxpr, consts: list, ins: list, steps: list) -> list:
  """Builds the structure of ``jaxpr`` applied to values ``ins``; returns its output values."""
  env = {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = ctx.value(np.shape(c))
    ctx.consts[env[v]] = c
  for v, x in zip(jaxpr.invars, ins):
    env[v] = x
  for eqn in jaxpr.eqns:
    args = [_read(env, x) for x in eqn.invars]
    name = eqn.primitive.name
    if name == 'scan':
      outs = _scan(ctx, eqn, args, steps)
    elif name == 'while':
      outs = _while(ctx, eqn, args, steps)
    elif name == 'cond':
      outs = _cond(ctx, eqn, args, steps)
    elif name in _PASS_THROUGH and isinstance(args[0], Literal) and not eqn.outvars[0].aval.shape:
      # A cast of a literal (jnp.clip's bounds inside its jit) is still that literal, in the
      # new dtype.
      outs = [Literal(np.asarray(args[0].val, dtype=eqn.outvars[0].aval.dtype))]
    elif name not in ctx.rules and (sub := _sub_jaxpr(eqn)) is not None:
      ctx.sites.append(eqn)
      outs = walk(ctx, sub[0], sub[1], args, steps)
      ctx.sites.pop()
    else:
      outs = [ctx.value(v.aval.shape) for v in eqn.outvars]
      rule = ctx.rules.get(name)
      if rule is None:
        sub = (
          ' (it holds a sub-program this analysis does not know how to enter)'
          if any(hasattr(p, 'jaxpr') or hasattr(p, 'eqns') for p in eqn.params.values())
          else ''
        )
        ctx.block_all(args + outs, f'unsupported primitive `{name}`{sub}', eqn)
        zero = rules_lib.NONE
      else:
        zero = rule(ctx, eqn, args, outs)
      step = ('eqn', eqn, args, outs, zero, tuple(ctx.sites))
      steps.append(step)
      _record_uses(ctx, step)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [_read(env, v) for v in jaxpr.outvars]


def _record_uses(ctx: Context, step) -> None:
  _, eqn, args, outs, zero, _ = step
  for k, a in enumerate(args):
    if isinstance(a, Literal):
      continue
    if eqn.primitive.name in _PASS_THROUGH and k == 0:
      shape_in, shape_out = ctx.shapes[a], ctx.shapes[outs[0]]
      moves = [_pass_axes(eqn, shape_in, shape_out, ax) for ax in range(len(shape_in))]
      ctx.uses[a].append(('pass', (outs[0], moves)))
    elif zero.contract is not None and k < 2:
      ctx.uses[a].append(('contract', frozenset(zero.contract[k])))
    else:
      ctx.uses[a].append(('other', None))


def _loop_value(ctx: Context, outer, shape) -> int:
  inner = ctx.value(shape)
  if not isinstance(outer, Literal):
    for ax in range(len(shape)):
      ctx.unite(outer, ax, inner, ax)
    ctx.uses[outer].append(('pass', (inner, [(ax,) for ax in range(len(shape))])))
  return inner


def _scan(ctx: Context, eqn, args, steps) -> list:
  p = eqn.params
  closed, n_consts, n_carry = p['jaxpr'], p['num_consts'], p['num_carry']
  body = closed.jaxpr
  consts, init, xs = args[:n_consts], args[n_consts : n_consts + n_carry], args[n_consts + n_carry :]
  carry_in = [
    _loop_value(ctx, x, v.aval.shape) for x, v in zip(init, body.invars[n_consts : n_consts + n_carry])
  ]
  stacked = ctx.fresh(p['length'])
  ctx.graph.block(stacked, f'stacked (scan) axis at {where(eqn, ctx.sites)}', structural=True)
  xs_in = []
  for x, v in zip(xs, body.invars[n_consts + n_carry :]):
    inner = ctx.value(v.aval.shape)
    if not isinstance(x, Literal):
      if ctx.shapes[x][0] > 1:
        ctx.graph.union(ctx.dims[x][0], stacked)
      for ax in range(len(v.aval.shape)):
        ctx.unite(x, ax + 1, inner, ax)
      moves = [()] + [(ax,) for ax in range(len(v.aval.shape))]
      ctx.uses[x].append(('pass', (inner, moves)))
    xs_in.append(inner)
  body_steps: list = []
  outs = walk(ctx, body, list(closed.consts), consts + carry_in + xs_in, body_steps)
  carry_out, ys_in = outs[:n_carry], outs[n_carry:]
  final = []
  for c_in, c_out in zip(carry_in, carry_out):
    for ax in range(len(ctx.shapes[c_in])):
      ctx.unite(c_in, ax, c_out, ax)
    final.append(_loop_value(ctx, c_in, ctx.shapes[c_in]))
  ys = []
  for y, v in zip(ys_in, eqn.outvars[n_carry:]):
    outer = ctx.value(v.aval.shape)
    if ctx.shapes[outer][0] > 1:
      ctx.graph.union(ctx.dims[outer][0], stacked)
    for ax in range(len(v.aval.shape) - 1):
      ctx.unite(y, ax, outer, ax + 1)
    ys.append(outer)
  steps.append(
    (
      'loop',
      body_steps,
      list(zip(init, carry_in, carry_out, final)),
      list(zip(xs, xs_in)),
      list(zip(ys_in, ys)),
      {'kind': 'scan', 'length': p['length'], 'reverse': p['reverse']},
    )
  )
  return final + ys


def _while(ctx: Context, eqn, args, steps) -> list:
  p = eqn.params
  nc, nb = p['cond_nconsts'], p['body_nconsts']
  cconsts, bconsts, init = args[:nc], args[nc : nc + nb], args[nc + nb :]
  body, cond = p['body_jaxpr'], p['cond_jaxpr']
  carry_in = [_loop_value(ctx, x, v.aval.shape) for x, v in zip(init, body.jaxpr.invars[nb:])]
  cond_steps: list = []
  (pred,) = walk(ctx, cond.jaxpr, list(cond.consts), cconsts + carry_in, cond_steps)
  only_body: list = []
  carry_out = walk(ctx, body.jaxpr, list(body.consts), bconsts + carry_in, only_body)
  final = []
  for c_in, c_out in zip(carry_in, carry_out):
    for ax in range(len(ctx.shapes[c_in])):
      ctx.unite(c_in, ax, c_out, ax)
    final.append(_loop_value(ctx, c_in, ctx.shapes[c_in]))
  # A while loop's trip count is unknown before it runs.
  info = {'kind': 'while', 'length': None, 'cond_steps': cond_steps, 'body_steps': only_body, 'pred': pred}
  steps.append(('loop', cond_steps + only_body, list(zip(init, carry_in, carry_out, final)), [], [], info))
  return final


def _cond(ctx: Context, eqn, args, steps) -> list:
  ops = args[1:]
  outs = [ctx.value(v.aval.shape) for v in eqn.outvars]
  branches = []
  for br in eqn.params['branches']:
    br_steps: list = []
    br_outs = walk(ctx, br.jaxpr, list(br.consts), ops, br_steps)
    for o, b in zip(outs, br_outs):
      for ax in range(len(ctx.shapes[o])):
        ctx.unite(o, ax, b, ax)
    branches.append((br_steps, br_outs))
  steps.append(('cond', branches, outs, args[0]))
  return outs


# ---------------------------------------------------------------------------------------------
# Pass 2: the zero-invariance proof, for all atoms at once.


class Proof:
  """Pushes zero channel slices through the recorded steps."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.memo: dict[int, tuple[int, ...]] = {}
    self.atom_cache: dict[int, frozenset] = {}
    self.zero: dict[int, frozenset] = {}
    self.failed: dict[int, str] = {}
    self.lost: dict[int, tuple] = {}  # atom -> (equation, call sites) where its zero was lost

  def atoms(self, v) -> frozenset:
    if isinstance(v, Literal):
      return _EMPTY
    hit = self.atom_cache.get(v)
    if hit is None:
      g = self.ctx.graph
      hit = frozenset(a for d in self.ctx.dims[v] for a in g.atoms_of(d, self.memo))
      self.atom_cache[v] = hit
    return hit

  def atoms_of_axes(self, nodes) -> frozenset:
    g = self.ctx.graph
    return frozenset(a for d in nodes for a in g.atoms_of(d, self.memo))

  def z(self, v) -> frozenset:
    return _EMPTY if isinstance(v, Literal) else self.zero.get(v, _EMPTY)

  def run(self, steps) -> None:
    for step in steps:
      kind = step[0]
      if kind == 'eqn':
        self._eqn(*step[1:])
      elif kind == 'loop':
        self._loop(*step[1:])
      else:
        self._cond(*step[1:])

  def _eqn(self, eqn, args, outs, zero: Zero, sites) -> None:
    ops = range(len(args)) if zero.operands is None else zero.operands
    ins = [args[i] for i in ops]
    had = frozenset().union(*(self.z(x) for x in ins)) if ins else _EMPTY
    for out in outs:
      at = self.atoms(out)
      if not at:
        continue
      if zero.kind == 'keep':
        zs = at & frozenset().union(*(self.atoms(x) for x in ins))
        for x in ins:
          zs = zs - (self.atoms(x) - self.z(x))
      elif zero.kind == 'all':
        ok = zero.literal_ok or (lambda val: np.all(np.asarray(val) == 0))
        zs = at
        for x in ins:
          if isinstance(x, Literal):
            zs = zs if ok(x.val) else _EMPTY
          else:
            zs = zs & self.z(x)
      elif zero.kind == 'any':
        zs = at & had
      else:
        zs = _EMPTY
      self.zero[out] = zs
      for a in (had & at) - zs:
        self.lost.setdefault(a, (eqn, sites))
    if zero.contract is not None:
      lhs, rhs = args[0], args[1]
      if isinstance(lhs, Literal) or isinstance(rhs, Literal):
        return
      dims = self.ctx.dims
      summed = self.atoms_of_axes([dims[lhs][ax] for ax in zero.contract[0]])
      # A side whose zero slice lies on a free axis (a residual kernel's output column) does
      # not make the summed rows zero.
      free_l = self.atoms_of_axes([d for ax, d in enumerate(dims[lhs]) if ax not in zero.contract[0]])
      free_r = self.atoms_of_axes([d for ax, d in enumerate(dims[rhs]) if ax not in zero.contract[1]])
      zl, zr = self.z(lhs) - free_l, self.z(rhs) - free_r
      for a in summed:
        if a not in zl and a not in zr and a not in self.failed:
          msg = f'summed over by `{eqn.primitive.name}` at {where(eqn, sites)} while neither side is zero'
          if a in self.lost:
            e, s = self.lost[a]
            msg += f' (zero-invariance is lost at `{e.primitive.name}` {where(e, s)})'
          self.failed[a] = msg

  def _loop(self, body, carries, xs, ys, info) -> None:
    for init, c_in, _, _ in carries:
      self.zero[c_in] = self.z(init) & self.atoms(c_in)
    for outer, inner in xs:
      self.zero[inner] = self.z(outer) & self.atoms(inner)
    while True:
      self.run(body)
      changed = False
      for _, c_in, c_out, _ in carries:
        new = self.zero[c_in] & self.z(c_out)
        if new != self.zero[c_in]:
          self.zero[c_in], changed = new, True
      if not changed:
        break
    for _, c_in, c_out, final in carries:
      self.zero[final] = self.zero[c_in] & self.z(c_out)
    for inner, outer in ys:
      self.zero[outer] = self.z(inner) & self.atoms(outer)

  def _cond(self, branches, outs, index) -> None:
    for br_steps, _ in branches:
      self.run(br_steps)
    for k, out in enumerate(outs):
      zs = self.atoms(out)
      for _, br_outs in branches:
        zs = zs & self.z(br_outs[k])
      self.zero[out] = zs


# ---------------------------------------------------------------------------------------------
# Tracing and the entry point.


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _default_trainable(variables) -> Callable[[Path, Any], bool]:
  """Linen: the ``params`` collection. NNX: ``nnx.Param`` variables. Else: every leaf."""
  # NNX states can only come from a program that imported flax.nnx; importing it here for
  # linen or plain-JAX users would cost more than the whole analysis.
  nnx = sys.modules.get('flax.nnx')
  kinds = {}
  if nnx is not None:
    leaves = jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    kinds = {path_of(p): isinstance(x, nnx.Param) for p, x in leaves if isinstance(x, nnx.Variable)}
  if kinds:
    return lambda path, _: kinds.get(path, False)
  if isinstance(variables, Mapping) and 'params' in variables:
    return lambda path, _: bool(path) and path[0] == 'params'
  return lambda path, _: True


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """The analysed program: kept for subnet construction and cost accounting.

  ``steps`` are the structure pass's record: ``('eqn', eqn, args, outs, zero, sites)``,
  ``('loop', body_steps, carries, xs, ys, info)`` (``info``: ``kind`` 'scan' with ``length``
  and ``reverse``, or 'while' with ``cond_steps``, ``body_steps``, ``pred`` and ``length``
  None) and ``('cond', [(branch_steps, branch_outs)], outs, index)``; values are ids into
  ``ctx`` (``ctx.consts`` holds the arrays of constant values).
  ``group_atoms[i]`` is the axis-graph atom of node group ``i``.
  """

  closed_jaxpr: Any
  ctx: Context
  steps: list
  invars: list
  outvals: list
  num_variables: int
  group_atoms: tuple[int, ...]
  # What re-analysing the same function at other input shapes needs.
  apply_fn: Callable[..., Any]
  signature: tuple
  var_tree: Any
  out_tree: Any
  trainable: Callable[[Path, Any], bool]
  rules: Mapping[str, Rule]


def zig_partition(
  apply_fn: Callable[..., Any],
  variables: Any,
  *args: Any,
  trainable: Callable[[Path, Any], bool] | None = None,
  rules: Mapping[str, Rule] | None = None,
  **kwargs: Any,
) -> ZIGPartition:
  """Derives the zero-invariant groups (ZIGs) of ``variables`` from the jaxpr of ``apply_fn``.

  A ZIG is a set of variable entries (a conv filter, its bias, the BN scale and offset of that
  channel; all q/k/v columns of a head) such that when all of them are zero the channel they
  produce is exactly zero wherever it is consumed, so the channel can be removed together
  with its *dependents* (the consumers' input rows, running statistics) and

  .. math::
    f(x;\\, \\theta \\odot \\mathbb{1}_{\\bar g}) = f_{\\setminus g}(x;\\, \\theta_{\\setminus g})
    \\quad\\text{for every input } x.

  The analysis is exact: it follows channel identity through every primitive and sub-jaxpr,
  and proves zero-invariance rather than assuming it. Axes it cannot prove (reductions or
  normalisations over channels, model inputs and outputs, unknown primitives) are reported
  as unprunable node groups with a reason.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs)`` returning a pytree of arrays: a linen
      ``module.apply``, a function that merges an NNX graphdef with its state, any JAX function.
    variables: a pytree of arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated).
    *args: the model inputs (arrays or ``jax.ShapeDtypeStruct``).
    trainable: ``trainable(path, leaf) -> bool`` selects the variables an optimizer drives
      (ZIG members); the rest can only be dependents. Default: linen's ``params`` collection,
      NNX ``Param`` variables, or every leaf of a plain pytree.
    rules: extra or overriding primitive rules, ``{primitive_name: rule}`` (see
      :mod:`oto_jax.rules`).
    **kwargs: keyword arguments of ``apply_fn``; non-array values (``train=False``) are static.

  Returns:
    A :class:`ZIGPartition`.

  Example::

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
    part = oto_jax.zig_partition(model.apply, variables, jnp.ones((1, 32)))
    part.num_zigs  # 64

  References:
    Chen et al., *Only Train Once: A One-Shot Neural Network Training and Pruning
    Framework*, NeurIPS 2021 (arXiv 2107.07467), section 3.1.
  """
  all_rules = dict(rules_lib.BUILTIN_RULES)
  all_rules.update(rules or {})
  trainable = trainable or _default_trainable(variables)

  var_flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  var_paths = [path_of(p) for p, _ in var_flat]
  for p, x in zip(var_paths, (x for _, x in var_flat)):
    if not _is_array(x):
      raise TypeError(f'Variable {path_str(p)} is a {type(x).__name__}, not an array or ShapeDtypeStruct.')
  in_flat, _ = jax.tree_util.tree_flatten_with_path((args, kwargs))
  traced_mask = [_is_array(x) for _, x in in_flat]
  in_leaves = [x for _, x in in_flat]

  def fn(v, traced):
    it = iter(traced)
    leaves = [next(it) if m else x for m, x in zip(traced_mask, in_leaves)]
    a, k = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure((args, kwargs)), leaves)
    return apply_fn(v, *a, **k)

  traced = [x for m, x in zip(traced_mask, in_leaves) if m]
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, traced)
  jaxpr = closed.jaxpr

  ctx = Context(all_rules)
  invals = [ctx.value(v.aval.shape) for v in jaxpr.invars]
  n_var = len(var_flat)
  steps: list = []
  outvals = walk(ctx, jaxpr, list(closed.consts), list(invals), steps)

  # Model inputs and outputs are fixed by the caller; state outputs (updated batch statistics)
  # are the next value of a variable and take its layout.
  input_paths = [jax.tree_util.keystr(p) for (p, _), m in zip(in_flat, traced_mask) if m]
  for v, p in zip(invals[n_var:], input_paths):
    ctx.block_all([v], f'carries the model input {_input_name(p)}')
  by_path = dict(zip(var_paths, range(n_var)))
  out_flat = jax.tree_util.tree_flatten_with_path(out_shape)[0]
  for (p, leaf), v in zip(out_flat, outvals):
    if isinstance(v, Literal):
      continue
    path = path_of(p)
    state = next((by_path[path[s:]] for s in range(len(path)) if path[s:] in by_path), None)
    if state is not None and tuple(np.shape(leaf)) == ctx.shapes[invals[state]]:
      for ax in range(len(ctx.shapes[v])):
        ctx.unite(v, ax, invals[state], ax)
    else:
      ctx.block_all([v], 'feeds the model output')

  is_trainable = [bool(trainable(p, x)) for p, (_, x) in zip(var_paths, var_flat)]
  proof = Proof(ctx)
  produced = [_produced_axes(ctx, v) if t else _EMPTY for v, t in zip(invals[:n_var], is_trainable)]
  for v, axes in zip(invals, produced):
    proof.zero[v] = proof.atoms_of_axes([ctx.dims[v][ax] for ax in axes])
  proof.run(steps)

  groups, atoms = _select(ctx, proof, invals[:n_var], var_paths, produced)
  return ZIGPartition(
    node_groups=tuple(groups),
    num_zigs=sum(g.size for g in groups if g.prunable),
    variable_paths=tuple(var_paths),
    variable_shapes=tuple(ctx.shapes[v] for v in invals[:n_var]),
    trainable_paths=frozenset(p for p, t in zip(var_paths, is_trainable) if t),
    program=Program(
      closed,
      ctx,
      steps,
      invals,
      outvals,
      n_var,
      tuple(atoms),
      apply_fn=apply_fn,
      signature=input_signature(args, kwargs),
      var_tree=jax.tree_util.tree_structure(variables),
      out_tree=jax.tree_util.tree_structure(out_shape),
      trainable=trainable,
      rules=rules or {},
    ),
  )


def input_signature(args: tuple, kwargs: dict) -> tuple:
  """A hashable key of a call's inputs: structure, array shapes and dtypes, static values."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  sig = []
  for x in leaves:
    if _is_array(x):
      sig.append(('array', tuple(x.shape), str(x.dtype)))
    else:
      try:
        hash(x)
        sig.append(('static', x))
      except TypeError:
        sig.append(('static', repr(x)))
  return treedef, tuple(sig)


def _input_name(keystr: str) -> str:
  # keystr of (args, kwargs): '[0][1]' is args[1], "[1]['mask']" is kwargs['mask'].
  if keystr.startswith('[0]'):
    return f'args{keystr[3:]}'
  return f'kwargs{keystr[3:]}'


def _produced_axes(ctx: Context, v: int) -> frozenset:
  """Axes of variable ``v`` that it *produces* (member axes), not only feeds into contractions.

  An axis is a dependent axis when every use of the variable (seen through reshapes,
  transposes and casts) sums over it in a contraction; a kernel's input rows are, its output
  columns are not. Tracking positions, not channels, keeps a kernel whose rows and columns
  carry the same channels (a residual layer) a member on one axis and a dependent on the other.
  """
  produced = set()
  stack = [(v, [(ax,) for ax in range(len(ctx.shapes[v]))])]
  while stack:
    x, where_axes = stack.pop()
    for kind, payload in ctx.uses.get(x, ()):
      if kind == 'pass':
        out, moves = payload
        stack.append((out, [tuple(m for p in pos for m in moves[p]) for pos in where_axes]))
      else:
        for ax, pos in enumerate(where_axes):
          if pos and not (kind == 'contract' and set(pos) <= payload):
            produced.add(ax)
  return frozenset(produced)


def _select(ctx: Context, proof: Proof, var_vals, var_paths, produced) -> tuple[list[NodeGroup], list[int]]:
  g = ctx.graph
  # Reasons inherited down the layout forest: an atom inside a blocked axis is blocked.
  parents: dict[int, list[int]] = defaultdict(list)
  for r, (_, kids) in list(g.layout.items()):
    if g.find(r) == r:
      for c in kids:
        parents[g.find(c)].append(r)

  def blocked(a: int) -> str | None:
    seen, stack = set(), [a]
    while stack:
      x = stack.pop()
      if x in seen:
        continue
      seen.add(x)
      if x in g.blocked:
        return g.blocked[x]
      stack.extend(parents.get(x, ()))
    return None

  entries: dict[int, dict[str, list]] = {}
  rank: dict[int, tuple] = {}
  twice: dict[int, str] = {}
  members_of_var: dict[int, list] = defaultdict(list)
  for k, v in enumerate(var_vals):
    for ax, node in enumerate(ctx.dims[v]):
      for a in set(g.atoms_of(node, proof.memo)):
        try:
          index, depth = g.index_map(node, a)
        except ValueError:
          twice.setdefault(a, f'appears twice in one axis of {path_str(var_paths[k])}')
          continue
        slot = entries.setdefault(a, {'m': [], 'd': []})
        member = ax in produced[k]
        if member and any(e.path == var_paths[k] for e in slot['m']):
          twice.setdefault(a, f'appears on two member axes of {path_str(var_paths[k])}')
        entry = GroupEntry(var_paths[k], ax, index, ctx.shapes[v])
        slot['m' if member else 'd'].append(entry)
        if member:
          members_of_var[k].append((a, ax, index >= 0))
          rank[a] = min(rank.get(a, (ax, depth)), (ax, depth))

  order = [a for a in entries if g.find(a) not in g.structural]  # in variable order
  reason: dict[int, str] = {}
  for a in order:
    why = blocked(a) or twice.get(a) or proof.failed.get(a)
    if why is None and not entries[a]['m']:
      why = 'no trainable variable produces it (it is only consumed)'
    if why:
      reason[a] = why

  # Member entries must belong to one ZIG at most: of atoms sharing a variable's member
  # entries, the outermost (heads before head_dim, groups before channel-in-group) wins.
  rivals: dict[int, set] = defaultdict(set)
  for found in members_of_var.values():
    for i, (a, ax, mask) in enumerate(found):
      for b, bx, other in found[i + 1 :]:
        # Parts of a concatenation are disjoint; factors of one axis, or two axes, overlap.
        if a != b and (ax != bx or np.any(mask & other)):
          rivals[a].add(b)
          rivals[b].add(a)
  chosen: set = set()
  for a in sorted((a for a in order if a not in reason), key=lambda a: (rank[a], order.index(a))):
    clash = rivals[a] & chosen
    if clash:
      b = min(clash, key=order.index)
      reason[a] = f'shares member entries with node group {order.index(b)}, which carries the ZIGs'
    else:
      chosen.add(a)

  groups, offset = [], 0
  for i, a in enumerate(order):
    e = entries[a]
    prunable = a not in reason
    head = (e['m'] or e['d'])[0].path
    groups.append(
      NodeGroup(
        id=i,
        size=g.size[a],
        prunable=prunable,
        reason=reason.get(a, ''),
        members=tuple(e['m']),
        dependents=tuple(e['d']),
        zig_offset=offset if prunable else -1,
        where=path_str(head[:-1]) or path_str(head),
      )
    )
    offset += g.size[a] if prunable else 0
  return groups, order
