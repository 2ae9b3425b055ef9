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
  batch_out = [d for d in range(len(ctx.shape(out))) if d not in dn.offset_dims]
  index_batching = getattr(dn, 'start_indices_batching_dims', ()) or ()
  _follow_indices(ctx, eqn, indices, out, batch_out, batching, index_batching, indexed)


def _follow_indices(ctx, eqn, indices, target, target_dims, batching, index_batching, indexed):
  """What a gather's result and a scatter's updates share: their ``target_dims`` follow the
  indices' axes (the index vector is the indices' last), and an operand batching axis (a
  vmapped gather or scatter) is indexed slice by slice — slice b of the operand meets only
  slice b of the target, as in an element-wise op."""
  operand, ishape, tshape = eqn.ins[0], ctx.shape(indices), ctx.shape(target)
  for idim, td in zip(range(len(ishape) - 1), target_dims):
    if ishape[idim] == tshape[td]:
      ctx.unite(indices, idim, target, td)
  for d, idim in zip(batching, index_batching):
    if d in indexed or idim >= len(target_dims):
      ctx.block_axis(operand, d, f'indexed by `{eqn.name}`', eqn)
    else:
      ctx.unite(operand, d, target, target_dims[idim])


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
  # The result has the operand's positions; operand axes that the indices address (inserted or
  # mapped) are blocked, and each whole-width window axis of the updates carries the channels
  # of its operand axis.
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
  scatter_dims = [d for d in range(len(ushape)) if d not in dn.update_window_dims]
  index_batching = getattr(dn, 'scatter_indices_batching_dims', ()) or ()
  _follow_indices(ctx, eqn, eqn.ins[1], updates, scatter_dims, batching, index_batching, indexed)


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
