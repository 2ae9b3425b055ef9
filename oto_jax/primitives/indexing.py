"""Indexing: ``gather`` and dynamic slices."""

from __future__ import annotations

from oto_jax.primitives.entry import PrimitiveEntry, Zero, free

_OPERAND = Zero('keep', operands=(0,))


def _gather_structure(ctx, eqn):
  dn = eqn.params['dimension_numbers']
  operand, indices, out = eqn.ins[0], eqn.ins[1], eqn.outs[0]
  sizes = eqn.params['slice_sizes']
  oshape = ctx.shape(operand)
  batching = set(getattr(dn, 'operand_batching_dims', ()) or ())
  offset_src = [d for d in range(len(oshape)) if d not in dn.collapsed_slice_dims and d not in batching]
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | batching
  for d, od in zip(offset_src, dn.offset_dims):
    if sizes[d] == oshape[d] and d not in indexed:
      ctx.unite(operand, d, out, od)
    else:
      ctx.block_axis(out, od, 'sliced by `gather`', eqn)
  for d in indexed:
    ctx.block_axis(operand, d, 'indexed by `gather`', eqn)
  batch_out = [d for d in range(len(ctx.shape(out))) if d not in dn.offset_dims]
  ishape = ctx.shape(indices)
  for od, idim in zip(batch_out, range(len(ishape) - 1)):
    if ishape[idim] == ctx.shape(out)[od]:
      ctx.unite(indices, idim, out, od)


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


ENTRIES: dict[str, PrimitiveEntry] = {
  'gather': PrimitiveEntry(_gather_structure, _OPERAND, cost=free, rewrite=_slice_sizes_rewrite),
  'dynamic_slice': PrimitiveEntry(
    _dynamic_slice_structure, _OPERAND, cost=free, rewrite=_slice_sizes_rewrite
  ),
  'dynamic_update_slice': PrimitiveEntry(
    _dynamic_update_slice_structure, Zero('all', operands=(0, 1)), cost=free
  ),
}
