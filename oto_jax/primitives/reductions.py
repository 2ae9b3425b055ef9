"""Reductions, cumulative scans and windowed reductions (pooling)."""

from __future__ import annotations

from oto_jax.primitives.entry import KEEP, NONE, PrimitiveEntry, Zero, per_input

_OPERAND = Zero('keep', operands=(0,))


def _reduce_structure(ctx, eqn):
  # The variadic `reduce` takes its operands, then as many initial values, and names its axes
  # `dimensions`.
  variadic = eqn.name == 'reduce'
  axes = set(eqn.params['dimensions' if variadic else 'axes'])
  operands = eqn.ins[: len(eqn.ins) // 2] if variadic else eqn.ins[:1]
  for x in operands:
    kept = 0
    for ax in range(len(ctx.shape(x))):
      if ax in axes:
        ctx.block_axis(x, ax, f'reduced over by `{eqn.name}`', eqn)
      else:
        for out in eqn.outs:
          ctx.unite(x, ax, out, kept)
        kept += 1


def _sum_structure(ctx, eqn):
  # A zero channel adds nothing to a sum: the summed axes stay channels (the proof checks
  # that the pruned ones are zero there), unless the sum becomes a mean (`StructureContext.summed`).
  x, out = eqn.ins[0], eqn.outs[0]
  axes = eqn.params['axes']
  fixed = [ax for ax in axes if not ctx.is_symbolic(x, ax)]
  for ax in axes:
    if ctx.is_symbolic(x, ax):
      ctx.block_axis(x, ax, f'reduced over by `{eqn.name}`', eqn)
  kept = 0
  for ax in range(len(ctx.shape(x))):
    if ax not in axes:
      ctx.unite(x, ax, out, kept)
      kept += 1
  if fixed and type(x) is int:
    ctx.summed(out, [(x, ax) for ax in fixed], eqn)


def _along_one_axis(axis_of):
  """Structure of a primitive that reorders or selects along one axis (sort, top-k): that axis
  is blocked, the others pass from every operand to every result."""

  def structure(ctx, eqn):
    axis = axis_of(eqn)
    rank = len(ctx.shape(eqn.ins[0]))
    axis = axis % rank
    why = f'ordered along by `{eqn.name}`'
    for v in (*eqn.ins, *eqn.outs):
      ctx.block_axis(v, axis, why, eqn)
    for x in eqn.ins:
      for out in eqn.outs:
        for ax in range(rank):
          if ax != axis:
            ctx.unite(x, ax, out, ax)

  return structure


def _cumulative_structure(ctx, eqn):
  axis = eqn.params['axis']
  for ax in range(len(ctx.shape(eqn.ins[0]))):
    if ax == axis:
      ctx.block_axis(eqn.ins[0], ax, f'accumulated over by `{eqn.name}`', eqn)
      ctx.block_axis(eqn.outs[0], ax, f'accumulated over by `{eqn.name}`', eqn)
    else:
      ctx.unite(eqn.ins[0], ax, eqn.outs[0], ax)


def _window_operands(eqn) -> int:
  # The generic reduce_window takes operands then as many init values.
  return len(eqn.ins) // 2 if eqn.name == 'reduce_window' else len(eqn.ins)


def _window_structure(ctx, eqn):
  p = eqn.params
  n_ops = _window_operands(eqn)
  dims, strides, padding = p['window_dimensions'], p['window_strides'], p['padding']
  base = p.get('base_dilation') or (1,) * len(dims)
  wdil = p.get('window_dilation') or (1,) * len(dims)
  for ax in range(len(dims)):
    plain = dims[ax] == 1 and strides[ax] == 1 and tuple(padding[ax]) == (0, 0)
    plain = plain and base[ax] == 1 and wdil[ax] == 1
    for x, out in zip(eqn.ins[:n_ops], eqn.outs):
      if plain:
        ctx.unite(x, ax, out, ax)
      else:
        # A window wider than one mixes neighbouring positions: a spatial axis, not a channel.
        ctx.block_axis(x, ax, f'pooled over by `{eqn.name}`', eqn, structural=True)
        ctx.block_axis(out, ax, f'pooled over by `{eqn.name}`', eqn, structural=True)


def _window_zero(eqn) -> Zero:
  if eqn.name == 'reduce_window':
    return NONE
  return Zero('keep', operands=tuple(range(_window_operands(eqn))))


_REDUCE = PrimitiveEntry(_reduce_structure, _OPERAND, cost=per_input)


def _sum_zero(eqn) -> Zero:
  return Zero('keep', operands=(0,), contract=(tuple(eqn.params['axes']),))


_CUMULATIVE = PrimitiveEntry(_cumulative_structure, KEEP, cost=per_input)
_WINDOW = PrimitiveEntry(_window_structure, _window_zero, cost=per_input)

ENTRIES: dict[str, PrimitiveEntry] = {
  **{name: _REDUCE for name in 'reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor'.split()},
  # A plain sum over channels: exact when the pruned ones are zero; a mean still blocks.
  'reduce_sum': PrimitiveEntry(_sum_structure, _sum_zero, cost=per_input),
  # Its computation is arbitrary: nothing is known to stay zero.
  'reduce': _REDUCE.replace(zero=NONE),
  # A channel's sorted slice is a permutation of its own slice, which is zero when every
  # operand is zero on it.
  'sort': PrimitiveEntry(_along_one_axis(lambda eqn: eqn.params['dimension']), KEEP, cost=per_input),
  # The largest values of a zero row are zeros; their indices are not.
  'top_k': PrimitiveEntry(
    _along_one_axis(lambda eqn: eqn.params.get('axis', -1)), Zero('keep', results=(0,)), cost=per_input
  ),
  'approx_top_k': PrimitiveEntry(
    _along_one_axis(lambda eqn: eqn.params['reduction_dimension']), Zero('keep', results=(0,)), cost=per_input
  ),
  'argmax': _REDUCE.replace(zero=NONE),
  'argmin': _REDUCE.replace(zero=NONE),
  **{name: _CUMULATIVE for name in 'cumsum cumprod cummax cummin cumlogsumexp'.split()},
  **{name: _WINDOW for name in 'reduce_window_sum reduce_window_max reduce_window_min reduce_window'.split()},
}
