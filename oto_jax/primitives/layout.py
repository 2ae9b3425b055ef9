"""Layout primitives: they move data without arithmetic (reshapes, transposes, slices, pads)."""

from __future__ import annotations

import numpy as np

from oto_jax.axes import CAT, PROD, reshape_groups
from oto_jax.primitives.entry import KEEP, NONE, PrimitiveEntry, Zero, free, same_axes

_OPERAND = Zero('keep', operands=(0,))


# ---------------------------------------------------------------------------------------------
# Broadcasts, reshapes, transposes.


def _broadcast_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  for i, d in enumerate(eqn.params['broadcast_dimensions']):
    if ctx.shape(x)[i] == ctx.shape(out)[d]:
      ctx.unite(x, i, out, d)


def _broadcast_moves(ctx, eqn):
  return tuple((d,) for d in eqn.params['broadcast_dimensions'])


def _broadcast_rewrite(ctx, eqn):
  return {**eqn.params, 'shape': ctx.slim_shape(eqn.outs[0])}


def _reshape_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  if eqn.name == 'reshape' and eqn.params.get('dimensions') not in (None, ()):
    ctx.block_all([x, out], 'reshape with a transposition (`dimensions`)', eqn)
    return
  ctx.reshape(x, out, eqn)


def _reshape_zero(eqn):
  return NONE if eqn.name == 'reshape' and eqn.params.get('dimensions') not in (None, ()) else _OPERAND


def _reshape_moves(ctx, eqn):
  shape_in, shape_out = ctx.shape(eqn.ins[0]), ctx.shape(eqn.outs[0])
  groups = reshape_groups(shape_in, shape_out)
  where = {ax: tuple(gb) for ga, gb in groups for ax in ga}
  return tuple(where.get(ax, ()) for ax in range(len(shape_in)))


def _reshape_rewrite(ctx, eqn):
  return {**eqn.params, 'new_sizes': ctx.slim_shape(eqn.outs[0]), 'dimensions': None}


def _transpose_structure(ctx, eqn):
  for o, i in enumerate(eqn.params['permutation']):
    ctx.unite(eqn.ins[0], i, eqn.outs[0], o)


def _transpose_moves(ctx, eqn):
  perm = list(eqn.params['permutation'])
  return tuple((perm.index(ax),) for ax in range(len(perm)))


# ---------------------------------------------------------------------------------------------
# Concatenations, splits, slices, pads.


def _pieces(ctx, whole, parts, axis: int, eqn) -> None:
  """``whole`` is ``parts`` laid end to end along ``axis``; their other axes are shared."""
  for part in parts:
    for ax in range(len(ctx.shape(whole))):
      if ax != axis:
        ctx.unite(part, ax, whole, ax)
  ctx.assign(whole, axis, CAT, [(part, axis) for part in parts], eqn)


def _concatenate_structure(ctx, eqn):
  _pieces(ctx, eqn.outs[0], eqn.ins, eqn.params['dimension'], eqn)


def _split_structure(ctx, eqn):
  _pieces(ctx, eqn.ins[0], eqn.outs, eqn.params['axis'], eqn)


def _split_rewrite(ctx, eqn):
  axis = eqn.params['axis']
  return {**eqn.params, 'sizes': tuple(ctx.slim_shape(o)[axis] for o in eqn.outs)}


def _slice_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  starts, limits = eqn.params['start_indices'], eqn.params['limit_indices']
  strides = eqn.params['strides'] or (1,) * len(starts)
  for ax, (lo, hi, st) in enumerate(zip(starts, limits, strides)):
    n = ctx.shape(x)[ax]
    if ctx.is_symbolic(x, ax) or ctx.is_symbolic(out, ax):
      if ctx.sym(x)[ax] == ctx.sym(out)[ax]:
        ctx.unite(x, ax, out, ax)
      else:
        why = 'sliced to a length that depends on the input shapes'
        ctx.block_axis(x, ax, why, eqn, structural=ctx.is_symbolic(x, ax))
        ctx.block_axis(out, ax, why, eqn, structural=ctx.is_symbolic(out, ax))
    elif (lo, hi, st) == (0, n, 1):
      ctx.unite(x, ax, out, ax)
    elif st == 1:
      ctx.assign(x, ax, CAT, [ctx.fresh(lo), (out, ax), ctx.fresh(n - hi)], eqn)
    else:
      ctx.block_axis(x, ax, 'sliced with a stride', eqn)
      ctx.block_axis(out, ax, 'sliced with a stride', eqn)


def _slice_rewrite(ctx, eqn):
  # A slice of a pruned axis keeps the input positions its kept outputs came from; they must
  # be an arithmetic run in the slim input.
  p = dict(eqn.params)
  x, out = eqn.ins[0], eqn.outs[0]
  starts, limits = list(p['start_indices']), list(p['limit_indices'])
  strides = list(p['strides'] or (1,) * len(starts))
  for ax in range(len(starts)):
    k_in = ctx.kept(x, ax)
    if k_in is None:
      continue
    k_out = ctx.kept(out, ax)
    n_out = ctx.shape(out)[ax]
    src = starts[ax] + strides[ax] * (np.arange(n_out) if k_out is None else k_out)
    pos = np.searchsorted(k_in, src)
    if len(pos) == 0:
      starts[ax] = limits[ax] = 0
      strides[ax] = 1
      continue
    step = int(pos[1] - pos[0]) if len(pos) > 1 else 1
    ok = np.all(pos < len(k_in)) and np.array_equal(k_in[np.minimum(pos, len(k_in) - 1)], src)
    if not ok or step < 1 or not np.array_equal(pos, pos[0] + step * np.arange(len(pos))):
      ctx.fail(eqn, 'the sliced positions do not form a run of the slim operand')
    starts[ax], limits[ax], strides[ax] = int(pos[0]), int(pos[-1]) + 1, step
  p.update(start_indices=tuple(starts), limit_indices=tuple(limits), strides=tuple(strides))
  return p


def _pad_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  for ax, (lo, hi, interior) in enumerate(eqn.params['padding_config']):
    if (lo, hi, interior) == (0, 0, 0):
      ctx.unite(x, ax, out, ax)
    elif interior == 0 and lo >= 0 and hi >= 0:
      ctx.assign(out, ax, CAT, [ctx.fresh(lo), (x, ax), ctx.fresh(hi)], eqn)
    else:
      ctx.block_axis(x, ax, 'padded with interior or negative padding', eqn)
      ctx.block_axis(out, ax, 'padded with interior or negative padding', eqn)


def _pad_rewrite(ctx, eqn):
  for ax, (_, _, interior) in enumerate(eqn.params['padding_config']):
    if ctx.kept(eqn.ins[0], ax) is not None and interior != 0:
      ctx.fail(eqn, 'interior padding of a pruned axis')
  return eqn.params


def _rev_structure(ctx, eqn):
  dims = set(eqn.params['dimensions'])
  for ax in range(len(ctx.shape(eqn.outs[0]))):
    if ax in dims:
      ctx.block_axis(eqn.ins[0], ax, 'reversed by `rev`', eqn)
      ctx.block_axis(eqn.outs[0], ax, 'reversed by `rev`', eqn)
    else:
      ctx.unite(eqn.ins[0], ax, eqn.outs[0], ax)


def _stacked(ctx, eqn, whole, parts, why: str) -> None:
  """``whole`` holds ``parts`` one per position of its axis ``eqn.params['axis']``.

  That axis is no channel of the parts, and pruning it would drop whole parts, so it is
  blocked; every other axis of ``whole`` is the matching axis of each part.
  """
  axis = eqn.params['axis']
  others = [ax for ax in range(len(ctx.shape(whole))) if ax != axis]
  for part in parts:
    for ax, w in enumerate(others):
      ctx.unite(part, ax, whole, w)
  ctx.block_axis(whole, axis, why, eqn)


def _stack_structure(ctx, eqn):
  _stacked(ctx, eqn, eqn.outs[0], eqn.ins, 'stacks the operands of `stack`')


def _unstack_structure(ctx, eqn):
  _stacked(ctx, eqn, eqn.ins[0], eqn.outs, 'split into separate results by `unstack`')


def _tile_structure(ctx, eqn):
  # Tiling repeats the whole axis: position r·n + j holds x[j], a row-major product of a
  # repetition axis and the operand's axis.
  x, out = eqn.ins[0], eqn.outs[0]
  for ax, reps in enumerate(eqn.params['reps']):
    if reps == 1:
      ctx.unite(x, ax, out, ax)
    else:
      ctx.assign(out, ax, PROD, [ctx.fresh(reps), (x, ax)], eqn)


def _pairwise_structure(ctx, eqn):
  """Result ``i`` is operand ``i``, placed or annotated (device_put, sharding constraints)."""
  for x, out in zip(eqn.ins, eqn.outs):
    for ax in range(len(ctx.shape(out))):
      ctx.unite(x, ax, out, ax)


def _nothing(ctx, eqn):
  """A primitive without operands (iota): its results are fresh axes."""


ENTRIES: dict[str, PrimitiveEntry] = {
  'broadcast_in_dim': PrimitiveEntry(
    _broadcast_structure, _OPERAND, cost=free, rewrite=_broadcast_rewrite, moves=_broadcast_moves
  ),
  'reshape': PrimitiveEntry(
    _reshape_structure, _reshape_zero, cost=free, rewrite=_reshape_rewrite, moves=_reshape_moves
  ),
  'squeeze': PrimitiveEntry(_reshape_structure, _OPERAND, cost=free, moves=_reshape_moves),
  'expand_dims': PrimitiveEntry(_reshape_structure, _OPERAND, cost=free, moves=_reshape_moves),
  'transpose': PrimitiveEntry(_transpose_structure, KEEP, cost=free, moves=_transpose_moves),
  'concatenate': PrimitiveEntry(_concatenate_structure, KEEP, cost=free),
  'split': PrimitiveEntry(_split_structure, KEEP, cost=free, rewrite=_split_rewrite),
  'slice': PrimitiveEntry(_slice_structure, KEEP, cost=free, rewrite=_slice_rewrite),
  # The padded positions are not channels of the operand, so zeros pass through.
  'pad': PrimitiveEntry(_pad_structure, _OPERAND, cost=free, rewrite=_pad_rewrite),
  'rev': PrimitiveEntry(_rev_structure, KEEP, cost=free),
  'iota': PrimitiveEntry(_nothing, NONE, cost=free),
  'stack': PrimitiveEntry(_stack_structure, KEEP, cost=free),
  'unstack': PrimitiveEntry(_unstack_structure, KEEP, cost=free),
  'tile': PrimitiveEntry(_tile_structure, KEEP, cost=free),
  # Placement and annotations (`name` is checkpoint_name's, `stage` lifts a value into the
  # trace): the data is unchanged. A sharding of a pruned axis still applies to the shorter
  # axis (XLA pads what does not divide).
  **{
    name: PrimitiveEntry(_pairwise_structure, KEEP, cost=free, moves=same_axes)
    for name in 'sharding_constraint device_put layout_constraint name stage'.split()
  },
}
