"""The ZIG analysis: trace a function, couple its channel axes, prove zero-invariance, select.

``zig_partition`` runs the stages in one direction:

1. **Trace** (:mod:`oto_jax.tracing`): one jaxpr, with a symbolic batch dimension, becomes the
   typed :class:`~oto_jax.ir.Program`.
2. **Structure** (:mod:`oto_jax.structure`): each primitive's registry entry unites the axes
   that carry the same channels and blocks those that can never be pruned; the model's inputs
   and outputs are blocked here. The leaves of the final layout forest are atoms.
3. **Proof** (:mod:`oto_jax.proof`): for all atoms at once, the members that produce a
   channel are assumed zero on it; an atom fails when a contraction or a sum adds it up
   while no operand is zero on it.
4. **Selection** (here): atoms whose member entries overlap (heads × head_dim of one kernel)
   cannot both carry ZIGs; the outermost one does. Each selected, proven atom touching a
   variable is a prunable node group.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from oto_jax import primitives, sharing, structure, tracing
from oto_jax.axis_zigs import AxisZigs
from oto_jax.errors import AnalysisError
from oto_jax.ir import Call, Cond, Eqn, Loop
from oto_jax.partition import GroupEntry, NodeGroup, ZIGPartition
from oto_jax.paths import Path, input_name, path_of, path_str
from oto_jax.proof import Proof
from oto_jax.structure import StructureContext

_EMPTY: frozenset = frozenset()


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


def zig_partition(
  apply_fn: Callable[..., Any],
  variables: Any,
  *args: Any,
  trainable: Callable[[Path, Any], bool] | None = None,
  rules: Mapping[str, Any] | None = None,
  polymorphic_shapes: Any = None,
  polymorphic_constraints: tuple[str, ...] = (),
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
  as unprunable node groups with a reason. The function is traced once, with a symbolic batch
  dimension, so the partition and the slim model hold at every batch size.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs)`` returning a pytree of arrays: a linen
      ``module.apply``, a function that merges an NNX graphdef with its state, any JAX function.
    variables: a pytree of arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated).
    *args: the model inputs (arrays or ``jax.ShapeDtypeStruct``).
    trainable: ``trainable(path, leaf) -> bool`` selects the variables an optimizer drives
      (ZIG members); the rest can only be dependents. Default: linen's ``params`` collection,
      NNX ``Param`` variables, or every leaf of a plain pytree.
    rules: per-call registry entries, ``{primitive_name: oto_jax.PrimitiveEntry}``, over the
      built-in and registered ones (see :func:`oto_jax.register_primitive`).
    polymorphic_shapes: None (default): the leading (batch) dimension of the inputs is
      symbolic when the function allows it, else the program is fixed to the given shapes
      (``part.program.signature.fixed_reason`` says why). False: fixed shapes. Or one
      ``jax.export`` shape spec per positional input (``'b, t'``) for more symbolic dimensions.
    polymorphic_constraints: ``jax.export`` constraints on those dimensions, e.g.
      ``('t <= 512',)`` for a model that slices its position embeddings to the length.
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
  trainable = trainable or _default_trainable(variables)
  traced = tracing.trace(
    apply_fn,
    variables,
    args,
    kwargs,
    lookup=primitives.lookup(rules),
    polymorphic_shapes=polymorphic_shapes,
    polymorphic_constraints=polymorphic_constraints,
  )
  prog = sharing.fork_shared_tables(traced.program)
  ctx = StructureContext(prog.values, prog.signature.env, watch=prog.variables)
  structure.run(ctx, prog.steps)

  # Model inputs and outputs are fixed by the caller; state outputs (updated batch statistics)
  # are the next value of a variable and take its layout.
  var_vals = prog.variables
  for v, p in zip(prog.inputs, traced.input_paths):
    ctx.block_all([v], f'carries the model input {input_name(p)}')
  by_path = dict(zip(traced.var_paths, range(len(var_vals))))
  for (path, shape), v in zip(traced.out_leaves, prog.outs):
    if not isinstance(v, int):
      continue
    state = next((by_path[path[s:]] for s in range(len(path)) if path[s:] in by_path), None)
    if state is not None and shape == ctx.shape(var_vals[state]):
      for ax in range(len(shape)):
        ctx.unite(v, ax, var_vals[state], ax)
    else:
      ctx.block_all([v], 'feeds the model output')

  is_trainable = [bool(trainable(p, x)) for p, x in zip(traced.var_paths, traced.var_leaves)]
  sources = {v for v, t in zip(var_vals, is_trainable) if t}
  if sources and not _reaches_output(prog.steps, sources, prog.outs):
    raise AnalysisError(
      'The output of the function does not depend on any trainable variable, so every channel would '
      'look removable. Check that apply_fn uses the variables it is given (a linen model: '
      'model.apply(variables, x); NNX: nnx.merge(graphdef, state)(x)).'
    )
  proof = Proof(ctx)
  produced = [_produced_axes(ctx, v) if t else _EMPTY for v, t in zip(var_vals, is_trainable)]
  for v, axes in zip(var_vals, produced):
    proof.zero[v] = proof.atoms_of_axes([ctx.node(v, ax) for ax in axes])
  proof.run(prog.steps)

  groups, atoms = _select(ctx, proof, var_vals, traced.var_paths, produced)
  offsets = {a: g.zig_offset for g, a in zip(groups, atoms) if g.prunable}
  return ZIGPartition(
    node_groups=tuple(groups),
    num_zigs=sum(g.size for g in groups if g.prunable),
    variable_paths=traced.var_paths,
    variable_shapes=tuple(ctx.shape(v) for v in var_vals),
    trainable_paths=frozenset(p for p, t in zip(traced.var_paths, is_trainable) if t),
    program=prog,
    axes=AxisZigs(ctx.graph, tuple(ctx.base), offsets),
  )


def _reads(step: Any) -> Iterator[Any]:
  """Every value a step reads, at any depth (a loop or branch reads the caller's values in place)."""
  if isinstance(step, Eqn):
    yield from step.ins
  elif isinstance(step, Call):
    yield from step.ins
    for s in step.body:
      yield from _reads(s)
  elif isinstance(step, Loop):
    yield from (c.init for c in step.carries)
    yield from (r for pair in step.xs for r in pair)
    for s in (*step.cond, *step.body):
      yield from _reads(s)
  else:
    yield step.index
    for b in step.branches:
      yield from b.outs
      for s in b.steps:
        yield from _reads(s)


def _writes(step: Any) -> Iterator[Any]:
  """The caller's values a step defines (and, for a loop, every value paired with them)."""
  if isinstance(step, (Eqn, Call, Cond)):
    yield from step.outs
  else:
    yield from (c.final for c in step.carries)
    yield from (r for pair in step.ys for r in pair)


def _reaches_output(steps: tuple, sources: set, outs: tuple) -> bool:
  """Whether any output may depend on ``sources``: a forward pass that over-approximates
  (a call, loop or branch passes dependence from anything it reads to everything it defines)."""
  live = set(sources)
  for step in steps:
    # Equations are nearly every step: read their operands directly, not through _reads.
    reads = step.ins if type(step) is Eqn else _reads(step)
    if any(type(r) is int and r in live for r in reads):
      live.update(w for w in _writes(step) if type(w) is int)
  return any(isinstance(o, int) and o in live for o in outs)


def _produced_axes(ctx: StructureContext, v: int) -> frozenset:
  """Axes of variable ``v`` that it *produces* (member axes), not only feeds into contractions.

  An axis is a dependent axis when every use of the variable (seen through reshapes,
  transposes and casts) sums over it in a contraction; a kernel's input rows are, its output
  columns are not. Tracking positions, not channels, keeps a kernel whose rows and columns
  carry the same channels (a residual layer) a member on one axis and a dependent on the other.
  """
  produced = set()
  stack = [(v, [(ax,) for ax in range(len(ctx.shape(v)))])]
  while stack:
    x, where_axes = stack.pop()
    for kind, payload in ctx.uses.get(x, ()):
      if kind == 'moved':
        kind, payload = 'pass', (payload.outs[0], payload.entry.moves(ctx, payload))
      if kind == 'pass':
        out, moves = payload
        stack.append((out, [tuple(m for p in pos for m in moves[p]) for pos in where_axes]))
      else:
        for ax, pos in enumerate(where_axes):
          if pos and not (kind == 'contract' and set(pos) <= payload):
            produced.add(ax)
  return frozenset(produced)


def _select(
  ctx: StructureContext, proof: Proof, var_vals, var_paths, produced
) -> tuple[list[NodeGroup], list[int]]:
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
        return str(g.blocked[x])
      stack.extend(parents.get(x, ()))
    return None

  entries: dict[int, dict[str, list]] = {}
  rank: dict[int, tuple] = {}
  twice: dict[int, str] = {}
  members_of_var: dict[int, list] = defaultdict(list)
  member_of: set[tuple[int, int]] = set()  # (atom, variable) pairs seen on a member axis
  index_memo: dict = {}
  for k, v in enumerate(var_vals):
    shape = ctx.shape(v)
    for ax in range(len(shape)):
      node = ctx.node(v, ax)
      for a in set(g.atoms_of(node, proof.memo)):
        try:
          index, depth = g.index_map(node, a, index_memo)
        except ValueError:
          twice.setdefault(a, f'appears twice in one axis of {path_str(var_paths[k])}')
          continue
        slot = entries.setdefault(a, {'m': [], 'd': []})
        member = ax in produced[k]
        if member:
          if (a, k) in member_of:
            twice.setdefault(a, f'appears on two member axes of {path_str(var_paths[k])}')
          member_of.add((a, k))
        entry = GroupEntry(var_paths[k], ax, index, shape)
        slot['m' if member else 'd'].append(entry)
        if member:
          members_of_var[k].append((a, ax, index >= 0))
          rank[a] = min(rank.get(a, (ax, depth)), (ax, depth))

  order = [a for a in entries if g.find(a) not in g.structural]  # in variable order
  position = {a: i for i, a in enumerate(order)}
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
  for a in sorted((a for a in order if a not in reason), key=lambda a: (rank[a], position[a])):
    clash = rivals[a] & chosen
    if clash:
      b = min(clash, key=position.__getitem__)
      reason[a] = f'shares member entries with node group {position[b]}, which carries the ZIGs'
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
