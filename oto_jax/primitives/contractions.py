"""Contractions: ``dot_general`` and convolutions."""

from __future__ import annotations

from oto_jax.axes import PROD
from oto_jax.primitives.entry import NONE, CostTerm, PrimitiveEntry, Zero, all_axes


def _dot_structure(ctx, eqn):
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs, out = eqn.ins[0], eqn.ins[1], eqn.outs[0]
  for a, b in zip(lc, rc):
    ctx.unite(lhs, a, rhs, b)
  pos = 0
  for a, b in zip(lb, rb):
    ctx.unite(lhs, a, rhs, b)
    ctx.unite(lhs, a, out, pos)
    pos += 1
  for x, used in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
    for ax in range(len(ctx.shape(x))):
      if ax not in used:
        ctx.unite(x, ax, out, pos)
        pos += 1


def _dot_zero(eqn) -> Zero:
  (lc, rc), _ = eqn.params['dimension_numbers']
  return Zero('any', operands=(0, 1), contract=(tuple(lc), tuple(rc)))


def _dot_cost(ctx, eqn):
  # Two FLOPs per multiply-accumulate: every output element times the contracted lengths.
  (lc, _), _ = eqn.params['dimension_numbers']
  return [CostTerm(2.0, all_axes(ctx, eqn.outs[0]) + tuple((eqn.ins[0], ax) for ax in lc))]


def _conv_structure(ctx, eqn):
  p = eqn.params
  lhs, rhs, out = eqn.ins[0], eqn.ins[1], eqn.outs[0]
  lspec, rspec, ospec = p['dimension_numbers']
  groups = p['feature_group_count']
  if p['batch_group_count'] != 1:
    ctx.block_all([lhs, rhs, out], 'convolution with `batch_group_count` > 1', eqn)
    return
  # Spatial axes mix neighbouring positions: never channels.
  for spec, x in ((lspec, lhs), (rspec, rhs), (ospec, out)):
    for ax in spec[2:]:
      ctx.block_axis(x, ax, 'spatial axis of a convolution', eqn, structural=True)
  ctx.unite(lhs, lspec[0], out, ospec[0])
  ctx.unite(rhs, rspec[0], out, ospec[1])
  c_out = ctx.shape(rhs)[rspec[0]] // groups
  if groups == 1:
    ctx.unite(lhs, lspec[1], rhs, rspec[1])
  else:
    # Grouped: input channels are (group, channel-in-group), outputs (group, out-in-group);
    # the group axis passes through like a batch axis, the in-group axis is contracted.
    g = ctx.fresh(groups)
    ctx.assign(lhs, lspec[1], PROD, [g, (rhs, rspec[1])], eqn)
    ctx.assign(rhs, rspec[0], PROD, [g, ctx.fresh(c_out)], eqn)


def _conv_zero(eqn) -> Zero:
  if eqn.params['batch_group_count'] != 1:
    return NONE
  lspec, rspec, _ = eqn.params['dimension_numbers']
  return Zero('any', operands=(0, 1), contract=((lspec[1],), (rspec[1],)))


def _conv_cost(ctx, eqn):
  out_feature = eqn.params['dimension_numbers'].rhs_spec[0]
  rhs = eqn.ins[1]
  taps = tuple((rhs, ax) for ax in range(len(ctx.shape(rhs))) if ax != out_feature)
  return [CostTerm(2.0, all_axes(ctx, eqn.outs[0]) + taps)]


def _conv_rewrite(ctx, eqn):
  p = dict(eqn.params)
  if p['feature_group_count'] > 1:
    dn = p['dimension_numbers']
    lhs, rhs = ctx.slim_shape(eqn.ins[0]), ctx.slim_shape(eqn.ins[1])
    p['feature_group_count'] = int(lhs[dn.lhs_spec[1]] // rhs[dn.rhs_spec[1]])
  return p


ENTRIES: dict[str, PrimitiveEntry] = {
  'dot_general': PrimitiveEntry(_dot_structure, _dot_zero, cost=_dot_cost),
  'conv_general_dilated': PrimitiveEntry(_conv_structure, _conv_zero, cost=_conv_cost, rewrite=_conv_rewrite),
}
