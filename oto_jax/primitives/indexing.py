"""Indexing: ``gather``, the ``scatter`` family and dynamic slices."""

from __future__ import annotations

from oto_jax.primitives.entry import CostTerm, PrimitiveEntry, Zero, all_axes, free

_OPERAND = Zero('keep', operands=(0,))


def _gather_structure(ctx, eqn):
  dn = eqn.params['dimension_numbers']
  operand, indices, out = eqn.ins[0], eqn.ins[1], eqn.outs[0]
  sizes = eqn.params['slice_sizes']
  oshape = ctx.shape(operand)
  batching = tuple(getattr(dn, 'operand_batching_dims', ()) or ())
  offset_src = [d for d in range(len(oshape)) if d not in dn.collapsed_slice_dims and d not in batching]
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
  for d, od in zip(offset_src, dn.offset_dims):
    if sizes[d] == oshape[d] and d not in indexed:
      ctx.unite(operand, d, out, od)
    else:
      ctx.block_axis(out, od, 'sliced by `gather`', eqn)
  for d in indexed - set(batching):
    ctx.block_axis(operand, d, 'indexed by `gather`', eqn)
  # The result's batch axes follow the indices' axes (the index vector is their last).
  batch_out = [d for d in range(len(ctx.shape(out))) if d not in dn.offset_dims]
  ishape = ctx.shape(indices)
  for od, idim in zip(batch_out, range(len(ishape) - 1)):
    if ishape[idim] == ctx.shape(out)[od]:
      ctx.unite(indices, idim, out, od)
  # A batching axis (a vmapped gather) is gathered from slice by slice: slice b of the operand
  # feeds only slice b of the result, as in an element-wise op.
  for d, idim in zip(batching, getattr(dn, 'start_indices_batching_dims', ()) or ()):
    if d in indexed or idim >= len(batch_out):
      ctx.block_axis(operand, d, 'indexed by `gather`', eqn)
    else:
      ctx.unite(operand, d, out, batch_out[idim])


def _slice_sizes_rewrite(ctx, eqn):
  # Whole-axis slices follow the slim operand; the others index positions and keep their size.
  full, slim = ctx.full_shape(eqn.ins[0]), ctx.slim_shape(eqn.ins[0])
  sizes = tuple(n if s == f else s for s, f, n in zip(eqn.params['slice_sizes'], full, slim, strict=True))
  return {**eqn.params, 'slice_sizes': sizes}


def _dynamic_slice_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  for ax, (n, m) in enumerate(zip(ctx.sym(x), ctx.sym(out))):
    if n == m:
      ctx.unite(x, ax, out, ax)
    else:
      ctx.block_axis(x, ax, 'sliced by `dynamic_slice`', eqn)
      ctx.block_axis(out, ax, 'sliced by `dynamic_slice`', eqn)


def _dynamic_update_slice_structure(ctx, eqn):
  x, upd, out = eqn.ins[0], eqn.ins[1], eqn.outs[0]
  for ax, (n, m) in enumerate(zip(ctx.sym(x), ctx.sym(upd))):
    ctx.unite(x, ax, out, ax)
    if n == m:
      ctx.unite(x, ax, upd, ax)
    else:
      ctx.block_axis(x, ax, 'updated by `dynamic_update_slice`', eqn)
      ctx.block_axis(upd, ax, 'updated by `dynamic_update_slice`', eqn)


def _scatter_structure(ctx, eqn):
  # The result has the operand's positions; operand axes that the indices address (inserted,
  # mapped or batching) are blocked, and each whole-width window axis of the updates carries
  # the channels of its operand axis.
  dn = eqn.params['dimension_numbers']
  operand, updates, out = eqn.ins[0], eqn.ins[2], eqn.outs[0]
  oshape = ctx.shape(operand)
  batching = tuple(getattr(dn, 'operand_batching_dims', ()) or ())
  indexed = set(dn.inserted_window_dims) | set(dn.scatter_dims_to_operand_dims)
  window_src = [d for d in range(len(oshape)) if d not in dn.inserted_window_dims and d not in batching]
  for d in range(len(oshape)):
    ctx.unite(operand, d, out, d)
  for d in indexed - set(batching):
    ctx.block_axis(operand, d, f'indexed by `{eqn.name}`', eqn)
  ushape = ctx.shape(updates)
  for d, ud in zip(window_src, dn.update_window_dims):
    if d not in indexed and ushape[ud] == oshape[d]:
      ctx.unite(operand, d, updates, ud)
    else:
      ctx.block_axis(operand, d, f'partly updated by `{eqn.name}`', eqn)
      ctx.block_axis(updates, ud, f'partly updated by `{eqn.name}`', eqn)
  # A batching axis (a vmapped scatter) updates slice b of the operand from slice b of the
  # updates only; the updates' scatter axes follow the indices' axes (index vector last).
  scatter_dims = [d for d in range(len(ushape)) if d not in dn.update_window_dims]
  indices, ishape = eqn.ins[1], ctx.shape(eqn.ins[1])
  for idim, ud in zip(range(len(ishape) - 1), scatter_dims):
    if ishape[idim] == ushape[ud]:
      ctx.unite(indices, idim, updates, ud)
  for d, idim in zip(batching, getattr(dn, 'scatter_indices_batching_dims', ()) or ()):
    if d in indexed or idim >= len(scatter_dims):
      ctx.block_axis(operand, d, f'indexed by `{eqn.name}`', eqn)
    else:
      ctx.unite(operand, d, updates, scatter_dims[idim])


def _per_update(ctx, eqn):
  """One FLOP per element of the updates (operand 2)."""
  return [CostTerm(1.0, all_axes(ctx, eqn.ins[2]))]


ENTRIES: dict[str, PrimitiveEntry] = {
  # A channel of the result is zero where the operand and the updates are both zero on it (for
  # a product, where the operand is).
  'scatter': PrimitiveEntry(_scatter_structure, Zero('all', operands=(0, 2)), cost=free),
  **{
    name: PrimitiveEntry(_scatter_structure, Zero('all', operands=(0, 2)), cost=_per_update)
    for name in ('scatter-add', 'scatter-sub', 'scatter-max', 'scatter-min')
  },
  'scatter-mul': PrimitiveEntry(_scatter_structure, _OPERAND, cost=_per_update),
  'gather': PrimitiveEntry(_gather_structure, _OPERAND, cost=free, rewrite=_slice_sizes_rewrite),
  'dynamic_slice': PrimitiveEntry(
    _dynamic_slice_structure, _OPERAND, cost=free, rewrite=_slice_sizes_rewrite
  ),
  'dynamic_update_slice': PrimitiveEntry(
    _dynamic_update_slice_structure, Zero('all', operands=(0, 1)), cost=free
  ),
}
