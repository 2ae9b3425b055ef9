"""How each primitive moves channel identity (structure) and zeros (the proof).

A rule is a function ``rule(ctx, eqn, ins, outs) -> Zero``. It receives the analysis context
(:class:`oto_jax.analysis.Context`), the equation, the operand handles (value ids, or
:class:`Literal` for literals) and the output value ids, whose axes are fresh. It unites the
axes that carry the same channels (``ctx.unite``), declares layouts (``ctx.assign``), blocks
axes that can never be pruned (``ctx.block``), and returns a :class:`Zero` that tells the
proof how a zero channel slice travels from the operands to the outputs.

Users add rules for primitives of their own with the ``rules=`` argument of
:func:`oto_jax.zig_partition`; any primitive without a rule blocks every axis it touches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np


class Literal(NamedTuple):
  """A literal operand (a Python scalar baked into the jaxpr)."""

  val: Any


class Zero(NamedTuple):
  """How a channel slice that is zero in operands becomes zero in the outputs.

  Attributes:
    kind: ``'keep'``: an output slice is zero when every listed operand that carries the
      channel is zero on it (layout ops, zero-preserving unary ops: ``f(0) = 0``).
      ``'all'``: zero when every listed operand is zero on it (``add``, ``max``); a literal
      counts as zero when ``literal_ok(value)``. ``'any'``: zero when some listed operand is
      (``mul``, a contraction's free and batch axes). ``'none'``: never zero (``exp``,
      ``logistic``, ``iota``).
    operands: positions of the operands that matter (default: all).
    literal_ok: for ``'all'``: which literal values keep a zero (default ``x == 0``).
    contract: for contractions, pairs ``(lhs_axes, rhs_axes)`` of the two operands' contracted
      axes (operands 0 and 1): the proof requires one side to be zero on each contracted channel.
  """

  kind: str
  operands: Sequence[int] | None = None
  literal_ok: Callable[[Any], bool] | None = None
  contract: tuple[Sequence[int], Sequence[int]] | None = None


KEEP, NONE = Zero('keep'), Zero('none')


def _shape(ctx, x) -> tuple[int, ...]:
  return () if isinstance(x, Literal) else ctx.shape(x)


# -------------------------------------------------------------------------------------------
# Element-wise and layout rules.


def elementwise(zero: Zero) -> Callable:
  """A rule for an n-ary element-wise primitive with the given zero behaviour.

  Operands of the output's rank are aligned axis by axis; size-1 axes broadcast and carry no
  channel identity.
  """

  def rule(ctx, eqn, ins, outs):
    for out in outs:
      oshape = ctx.shape(out)
      for x in ins:
        if isinstance(x, Literal) or len(ctx.shape(x)) != len(oshape):
          continue
        for ax, (a, b) in enumerate(zip(ctx.shape(x), oshape)):
          if a == b and a > 1:
            ctx.unite(x, ax, out, ax)
    return zero

  return rule


def _all_zero(ok: Callable[[Any], bool] | None = None) -> Zero:
  return Zero('all', literal_ok=ok)


def _broadcast_in_dim(ctx, eqn, ins, outs):
  x, out = ins[0], outs[0]
  for i, d in enumerate(eqn.params['broadcast_dimensions']):
    if ctx.shape(x)[i] == ctx.shape(out)[d]:
      ctx.unite(x, i, out, d)
  return Zero('keep', operands=(0,))


def _reshape(ctx, eqn, ins, outs):
  x, out = ins[0], outs[0]
  if eqn.primitive.name == 'reshape' and eqn.params.get('dimensions') not in (None, ()):
    ctx.block_all(ins[:1] + outs, 'reshape with a transposition (`dimensions`)', eqn)
    return NONE
  ctx.reshape(x, out)
  return Zero('keep', operands=(0,))


def _transpose(ctx, eqn, ins, outs):
  for o, i in enumerate(eqn.params['permutation']):
    ctx.unite(ins[0], i, outs[0], o)
  return KEEP


def _concatenate(ctx, eqn, ins, outs):
  dim, out = eqn.params['dimension'], outs[0]
  for x in ins:
    for ax in range(len(ctx.shape(out))):
      if ax != dim:
        ctx.unite(x, ax, out, ax)
  ctx.assign(out, dim, 'cat', [(x, dim) for x in ins])
  return KEEP


def _split(ctx, eqn, ins, outs):
  axis, x = eqn.params['axis'], ins[0]
  for out in outs:
    for ax in range(len(ctx.shape(x))):
      if ax != axis:
        ctx.unite(x, ax, out, ax)
  ctx.assign(x, axis, 'cat', [(o, axis) for o in outs])
  return KEEP


def _slice(ctx, eqn, ins, outs):
  x, out = ins[0], outs[0]
  starts, limits = eqn.params['start_indices'], eqn.params['limit_indices']
  strides = eqn.params['strides'] or (1,) * len(starts)
  for ax, (lo, hi, st) in enumerate(zip(starts, limits, strides)):
    n = ctx.shape(x)[ax]
    if (lo, hi, st) == (0, n, 1):
      ctx.unite(x, ax, out, ax)
    elif st == 1:
      ctx.assign(x, ax, 'cat', [ctx.fresh(lo), (out, ax), ctx.fresh(n - hi)])
    else:
      ctx.block_axis(x, ax, 'sliced with a stride', eqn)
      ctx.block_axis(out, ax, 'sliced with a stride', eqn)
  return KEEP


def _pad(ctx, eqn, ins, outs):
  x, out = ins[0], outs[0]
  for ax, (lo, hi, interior) in enumerate(eqn.params['padding_config']):
    if (lo, hi, interior) == (0, 0, 0):
      ctx.unite(x, ax, out, ax)
    elif interior == 0 and lo >= 0 and hi >= 0:
      ctx.assign(out, ax, 'cat', [ctx.fresh(lo), (x, ax), ctx.fresh(hi)])
    else:
      ctx.block_axis(x, ax, 'padded with interior or negative padding', eqn)
      ctx.block_axis(out, ax, 'padded with interior or negative padding', eqn)
  # The padded positions are not channels of the operand, so zeros pass through.
  return Zero('keep', operands=(0,))


def _rev(ctx, eqn, ins, outs):
  dims = set(eqn.params['dimensions'])
  for ax in range(len(ctx.shape(outs[0]))):
    if ax in dims:
      ctx.block_axis(ins[0], ax, 'reversed by `rev`', eqn)
      ctx.block_axis(outs[0], ax, 'reversed by `rev`', eqn)
    else:
      ctx.unite(ins[0], ax, outs[0], ax)
  return KEEP


def _select_n(ctx, eqn, ins, outs):
  elementwise(KEEP)(ctx, eqn, ins, outs)
  return Zero('all', operands=tuple(range(1, len(ins))))


def _clamp(ctx, eqn, ins, outs):
  elementwise(KEEP)(ctx, eqn, ins, outs)
  # clamp(lo, 0, hi) is 0 only when lo <= 0 <= hi, which literal bounds can show.
  lo, hi = ins[0], ins[2]
  if isinstance(lo, Literal) and isinstance(hi, Literal) and lo.val <= 0 <= hi.val:
    return Zero('keep', operands=(1,))
  return NONE


def _iota(ctx, eqn, ins, outs):
  return NONE


# -------------------------------------------------------------------------------------------
# Reductions and windows.


def _reduce(ctx, eqn, ins, outs):
  axes = set(eqn.params['axes'])
  x, kept = ins[0], 0
  for ax in range(len(ctx.shape(x))):
    if ax in axes:
      ctx.block_axis(x, ax, f'reduced over by `{eqn.primitive.name}`', eqn)
    else:
      for out in outs:
        ctx.unite(x, ax, out, kept)
      kept += 1
  if eqn.primitive.name in ('argmax', 'argmin'):
    return NONE
  return Zero('keep', operands=(0,))


def _cumulative(ctx, eqn, ins, outs):
  axis = eqn.params['axis']
  for ax in range(len(ctx.shape(ins[0]))):
    if ax == axis:
      ctx.block_axis(ins[0], ax, f'accumulated over by `{eqn.primitive.name}`', eqn)
      ctx.block_axis(outs[0], ax, f'accumulated over by `{eqn.primitive.name}`', eqn)
    else:
      ctx.unite(ins[0], ax, outs[0], ax)
  return KEEP


def _reduce_window(ctx, eqn, ins, outs):
  p = eqn.params
  n_ops = len(ins) // 2 if eqn.primitive.name == 'reduce_window' else len(ins)
  dims, strides = p['window_dimensions'], p['window_strides']
  padding = p['padding']
  base = p.get('base_dilation') or (1,) * len(dims)
  wdil = p.get('window_dilation') or (1,) * len(dims)
  for ax in range(len(dims)):
    plain = dims[ax] == 1 and strides[ax] == 1 and tuple(padding[ax]) == (0, 0)
    plain = plain and base[ax] == 1 and wdil[ax] == 1
    for x, out in zip(ins[:n_ops], outs):
      if plain:
        ctx.unite(x, ax, out, ax)
      else:
        # A window wider than one mixes neighbouring positions: a spatial axis, not a channel.
        ctx.block_axis(x, ax, f'pooled over by `{eqn.primitive.name}`', eqn, structural=True)
        ctx.block_axis(out, ax, f'pooled over by `{eqn.primitive.name}`', eqn, structural=True)
  if eqn.primitive.name == 'reduce_window':
    return NONE
  return Zero('keep', operands=tuple(range(n_ops)))


# -------------------------------------------------------------------------------------------
# Contractions.


def _dot_general(ctx, eqn, ins, outs):
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs, out = ins[0], ins[1], outs[0]
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
  return Zero('any', operands=(0, 1), contract=(tuple(lc), tuple(rc)))


def _conv(ctx, eqn, ins, outs):
  p = eqn.params
  lhs, rhs, out = ins[0], ins[1], outs[0]
  lspec, rspec, ospec = p['dimension_numbers']
  groups = p['feature_group_count']
  if p['batch_group_count'] != 1:
    ctx.block_all([lhs, rhs, out], 'convolution with `batch_group_count` > 1', eqn)
    return NONE
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
    ctx.assign(lhs, lspec[1], 'prod', [g, (rhs, rspec[1])])
    ctx.assign(rhs, rspec[0], 'prod', [g, ctx.fresh(c_out)])
  return Zero('any', operands=(0, 1), contract=((lspec[1],), (rspec[1],)))


# -------------------------------------------------------------------------------------------
# Indexing.


def _gather(ctx, eqn, ins, outs):
  dn = eqn.params['dimension_numbers']
  operand, indices, out = ins[0], ins[1], outs[0]
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
  ibatch = [d for d in range(len(ishape) - 1)]
  for od, idim in zip(batch_out, ibatch):
    if ishape[idim] == ctx.shape(out)[od]:
      ctx.unite(indices, idim, out, od)
  return Zero('keep', operands=(0,))


def _dynamic_slice(ctx, eqn, ins, outs):
  x, out = ins[0], outs[0]
  for ax, (n, m) in enumerate(zip(ctx.shape(x), ctx.shape(out))):
    if n == m:
      ctx.unite(x, ax, out, ax)
    else:
      ctx.block_axis(x, ax, 'sliced by `dynamic_slice`', eqn)
      ctx.block_axis(out, ax, 'sliced by `dynamic_slice`', eqn)
  return Zero('keep', operands=(0,))


def _dynamic_update_slice(ctx, eqn, ins, outs):
  x, upd, out = ins[0], ins[1], outs[0]
  for ax, (n, m) in enumerate(zip(ctx.shape(x), ctx.shape(upd))):
    ctx.unite(x, ax, out, ax)
    if n == m:
      ctx.unite(x, ax, upd, ax)
    else:
      ctx.block_axis(x, ax, 'updated by `dynamic_update_slice`', eqn)
      ctx.block_axis(upd, ax, 'updated by `dynamic_update_slice`', eqn)
  return Zero('all', operands=(0, 1))


# -------------------------------------------------------------------------------------------
# The table.

# f(0) == 0: a zero channel stays zero.
_ZERO_PRESERVING = (
  'neg abs sign floor ceil round sqrt cbrt tanh sin tan asin atan sinh asinh atanh erf '
  'expm1 log1p square real imag conj copy copy_p reduce_precision convert_element_type stop_gradient '
  'optimization_barrier'
).split()
# f(0) != 0 (or undefined): a zero channel becomes non-zero.
_ZERO_BREAKING = (
  'exp exp2 log logistic cos acos cosh rsqrt erfc erf_inv lgamma digamma is_finite not '
  'eq ne lt le gt ge nextafter atan2 pow population_count clz shift_left shift_right_logical '
  'shift_right_arithmetic random_bits random_wrap random_unwrap random_seed'
).split()


def _integer_pow(ctx, eqn, ins, outs):
  elementwise(KEEP)(ctx, eqn, ins, outs)
  return KEEP if eqn.params['y'] > 0 else NONE


BUILTIN_RULES: dict[str, Callable] = {
  **{name: elementwise(KEEP) for name in _ZERO_PRESERVING},
  **{name: elementwise(NONE) for name in _ZERO_BREAKING},
  'add': elementwise(_all_zero()),
  'add_any': elementwise(_all_zero()),
  'sub': elementwise(_all_zero()),
  'or': elementwise(_all_zero()),
  'xor': elementwise(_all_zero()),
  'max': elementwise(_all_zero(lambda v: np.all(np.asarray(v) <= 0))),
  'min': elementwise(_all_zero(lambda v: np.all(np.asarray(v) >= 0))),
  'mul': elementwise(Zero('any')),
  'and': elementwise(Zero('any')),
  'div': elementwise(Zero('keep', operands=(0,))),
  'rem': elementwise(Zero('keep', operands=(0,))),
  'integer_pow': _integer_pow,
  'select_n': _select_n,
  'clamp': _clamp,
  'broadcast_in_dim': _broadcast_in_dim,
  'reshape': _reshape,
  'transpose': _transpose,
  'squeeze': _reshape,
  'expand_dims': _reshape,
  'concatenate': _concatenate,
  'split': _split,
  'slice': _slice,
  'pad': _pad,
  'rev': _rev,
  'iota': _iota,
  'reduce_sum': _reduce,
  'reduce_max': _reduce,
  'reduce_min': _reduce,
  'reduce_prod': _reduce,
  'reduce_and': _reduce,
  'reduce_or': _reduce,
  'argmax': _reduce,
  'argmin': _reduce,
  'cumsum': _cumulative,
  'cumprod': _cumulative,
  'cummax': _cumulative,
  'cummin': _cumulative,
  'cumlogsumexp': _cumulative,
  'reduce_window_sum': _reduce_window,
  'reduce_window_max': _reduce_window,
  'reduce_window_min': _reduce_window,
  'reduce_window': _reduce_window,
  'dot_general': _dot_general,
  'conv_general_dilated': _conv,
  'gather': _gather,
  'dynamic_slice': _dynamic_slice,
  'dynamic_update_slice': _dynamic_update_slice,
}
