"""Contractions: ``dot_general`` and convolutions."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.axes import PROD
from oto_jax.primitives.entry import NONE, CostTerm, PrimitiveEntry, Zero, all_axes


def _contract(ctx, lhs, rhs, out, numbers, skip=()) -> None:
  """``dot_general``'s layout: contracted axes united pairwise; the result holds the batch
  axes, then the lhs's free axes, then the rhs's (but for the rhs axes in ``skip``)."""
  (lc, rc), (lb, rb) = numbers
  for a, b in zip(lc, rc):
    ctx.unite(lhs, a, rhs, b)
  pos = 0
  for a, b in zip(lb, rb):
    ctx.unite(lhs, a, rhs, b)
    ctx.unite(lhs, a, out, pos)
    pos += 1
  for x, used in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb) | set(skip))):
    for ax in range(len(ctx.shape(x))):
      if ax not in used:
        ctx.unite(x, ax, out, pos)
        pos += 1


def _dot_structure(ctx, eqn):
  _contract(ctx, eqn.ins[0], eqn.ins[1], eqn.outs[0], eqn.params['dimension_numbers'])


def _dot_zero(eqn) -> Zero:
  (lc, rc), _ = eqn.params['dimension_numbers']
  return Zero('any', operands=(0, 1), contract=(tuple(lc), tuple(rc)))


def _dot_cost(ctx, eqn):
  # Two FLOPs per multiply-accumulate: every output element times the contracted lengths (a
  # ragged dot's row meets one expert: the same count).
  p = eqn.params
  numbers = (
    p['dimension_numbers']
    if 'dimension_numbers' in p
    else p['ragged_dot_dimension_numbers'].dot_dimension_numbers
  )
  (lc, _), _ = numbers
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


# XLA:CPU runs a convolution whose output has a few pixels far below its usual speed: a 3×3,
# 512→512 convolution to 64×2×2 took 545 ms, the same products as one dot_general 9 ms;
# 256→256, 51 ms against 2.2 ms; 1×1 outputs 28 ms against 2.4 ms. At 3×3 and 4×4 outputs the
# convolution was faster (4.4 against 5.7 ms, 0.8 against 1.0 ms). A 1×1 kernel is a matrix
# product at any size, and the dot was faster at every width tried (64×32×32 inputs:
# 256→128 124 against 37 ms, 129→66 45 against 10 ms, 34→129 40 against 20 ms); 3×3 kernels
# at 32×32 were not (83 against 168 ms). Measured on this project's 2-core CPU, batch 64
# (experiments/bench_subnet.py prints the per-layer figures). This is the rule without measurement;
# deploy_subnet(tune_inputs=...) times both lowerings of every convolution instead.
SMALL_CONV_OUTPUT = 4


def _channels_last(lhs, rhs, params):
  """The operands as ``(batch, spatial…, feature)`` and ``(spatial…, in, out)``."""
  lspec, rspec, _ = params['dimension_numbers']
  x = jnp.transpose(lhs, (lspec[0], *lspec[2:], lspec[1]))
  w = jnp.transpose(rhs, (*rspec[2:], rspec[1], rspec[0]))
  return x, w


def _as_out_spec(y, params):
  """A ``(batch, spatial…, feature)`` result in the convolution's output layout."""
  ospec = params['dimension_numbers'].out_spec
  nsp = len(ospec) - 2
  where = {ospec[0]: 0, ospec[1]: nsp + 1, **{ospec[2 + d]: 1 + d for d in range(nsp)}}
  return jnp.transpose(y, [where[a] for a in range(nsp + 2)])


def _contract_last(lhs, rhs, params, batch: int = 0):
  """``lhs``'s last axis against ``rhs``'s first after ``batch`` shared leading axes, with the
  convolution's precision and result type."""
  b = tuple(range(batch))
  return jax.lax.dot_general(
    lhs,
    rhs,
    (((lhs.ndim - 1,), (batch,)), (b, b)),
    precision=params.get('precision'),
    preferred_element_type=params.get('preferred_element_type'),
  )


def conv_as_dot(lhs, rhs, params):
  """``conv_general_dilated`` as one ``dot_general``: the kernel's taps of every output pixel
  (shifted, strided slices of the padded input) against the kernel.

  .. math::
    y_{n,p,o} = \\sum_{t,c} x_{n, s \\cdot p + d \\cdot t - \\text{pad}, c}\\, w_{t,c,o}

  Only for ``feature_group_count = batch_group_count = 1`` and no input dilation.
  """
  x, w = _channels_last(lhs, rhs, params)
  nsp = x.ndim - 2
  strides, dilation = params['window_strides'], params['rhs_dilation']
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in params['padding']), (0, 0, 0)])
  size = w.shape[:nsp]
  out = [(x.shape[1 + d] - (size[d] - 1) * dilation[d] - 1) // strides[d] + 1 for d in range(nsp)]
  taps = []
  for tap in np.ndindex(*size):
    start = [0, *(t * dilation[d] for d, t in enumerate(tap)), 0]
    limit = [x.shape[0], *(start[1 + d] + (out[d] - 1) * strides[d] + 1 for d in range(nsp)), x.shape[-1]]
    taps.append(jax.lax.slice(x, start, limit, [1, *strides, 1]))
  patches = jnp.stack(taps, axis=-2).reshape(-1, len(taps) * x.shape[-1])
  y = _contract_last(patches, w.reshape(-1, w.shape[-1]), params)
  return _as_out_spec(y.reshape(x.shape[0], *out, w.shape[-1]), params)


def _winograd_rows(d, axis: int, at: int):
  """Winograd's F(2, 3) input transform :math:`B^T d` along ``axis``, whose length ``2 (t + 1)``
  holds ``t + 1`` pairs: the four rows of each of ``t`` tiles (four inputs at stride 2) stacked
  as axis ``at``."""
  pairs = d.reshape(*d.shape[:axis], d.shape[axis] // 2, 2, *d.shape[axis + 1 :])
  first = jax.lax.slice_in_dim(pairs, 0, pairs.shape[axis] - 1, axis=axis)
  second = jax.lax.slice_in_dim(pairs, 1, pairs.shape[axis], axis=axis)
  d0, d1, d2, d3 = (jax.lax.index_in_dim(p, k, axis + 1, False) for p in (first, second) for k in (0, 1))
  return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3], axis=at)


def _winograd_cols(m, axis: int):
  """Winograd's F(2, 3) output transform :math:`A^T m` along ``axis`` (length 4), two rows."""
  m0, m1, m2, m3 = (jax.lax.index_in_dim(m, k, axis, False) for k in range(4))
  return jnp.stack([m0 + m1 + m2, m1 - m2 - m3], axis=axis)


def conv_as_winograd(lhs, rhs, params):
  """A 3×3, stride-1 ``conv_general_dilated`` by Winograd's minimal filtering F(2×2, 3×3):
  each 2×2 output tile from its 4×4 input tile with 16 products per channel pair instead of 36,
  as 16 matrix products over all tiles.

  .. math::
    Y = A^T \\big[ (G\\, w\\, G^T) \\odot (B^T d\\, B) \\big] A

  summed over input channels, with :math:`B, G, A` of Lavin & Gray. The transforms add and
  halve only, so the rounding stays close to the direct sum's (float32: about 1e-6 relative).
  Only where :func:`conv_lowerings` lists ``'winograd'``.

  References:
    Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*, CVPR 2016.
  """
  x, w = _channels_last(lhs, rhs, params)
  n, c, o = x.shape[0], x.shape[-1], w.shape[-1]
  (plo, phi), (qlo, qhi) = params['padding']
  out = (x.shape[1] + plo + phi - 2, x.shape[2] + qlo + qhi - 2)
  tiles = ((out[0] + 1) // 2, (out[1] + 1) // 2)
  # Pad to whole tiles: 2t + 2 rows for t tiles; the extra output row or column is cut below.
  pads = [
    (0, 0, 0),
    (plo, 2 * tiles[0] + 2 - x.shape[1] - plo, 0),
    (qlo, 2 * tiles[1] + 2 - x.shape[2] - qlo, 0),
  ]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [*pads, (0, 0, 0)])
  v = _winograd_rows(_winograd_rows(x, 1, at=0), 3, at=1)  # 4, 4, n, th, tw, c
  half = jnp.asarray(0.5, w.dtype)
  g = jnp.stack([w[0], (w[0] + w[1] + w[2]) * half, (w[0] - w[1] + w[2]) * half, w[2]])
  u = jnp.stack(
    [g[:, 0], (g[:, 0] + g[:, 1] + g[:, 2]) * half, (g[:, 0] - g[:, 1] + g[:, 2]) * half, g[:, 2]], 1
  )
  m = _contract_last(v.reshape(16, -1, c), u.reshape(16, c, o), params, batch=1)
  y = _winograd_cols(_winograd_cols(m.reshape(4, 4, n, *tiles, o), 0), 1)  # 2, 2, n, th, tw, o
  y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(n, 2 * tiles[0], 2 * tiles[1], o)
  return _as_out_spec(y[:, : out[0], : out[1]], params)


# The lowerings other than the primitive itself ('conv'), by name.
_LOWERED = {'dot': conv_as_dot, 'winograd': conv_as_winograd}
CONV_LOWERINGS = ('conv', *_LOWERED)


def _ungrouped(params: dict) -> bool:
  """No feature or batch groups and no input dilation: a sum of kernel taps × shifted inputs."""
  plain = params['feature_group_count'] == 1 and params['batch_group_count'] == 1
  return plain and all(d == 1 for d in params.get('lhs_dilation') or ())


def conv_lowerings(lhs, rhs, params: dict) -> tuple[str, ...]:
  """The lowerings that compute this convolution (operands: arrays or ``jax.ShapeDtypeStruct``):
  ``'conv'`` always; ``'dot'`` (:func:`conv_as_dot`) without groups or input dilation;
  ``'winograd'`` (:func:`conv_as_winograd`) for a 3×3, stride-1, undilated 2-D one in float32
  or float64 (in bfloat16 and float16 the transforms' roundings would show) with known spatial
  sizes."""
  if not _ungrouped(params):
    return ('conv',)
  lspec, rspec, _ = params['dimension_numbers']
  wino = [rhs.shape[a] for a in rspec[2:]] == [3, 3]
  # Its tiles need the spatial sizes: a symbolic one (shape polymorphism) keeps the others.
  wino = wino and all(isinstance(lhs.shape[a], (int, np.integer)) for a in lspec[2:])
  wino = wino and all(s == 1 for s in (*params['window_strides'], *params['rhs_dilation']))
  out_type = params.get('preferred_element_type')
  wino = wino and lhs.dtype == rhs.dtype and lhs.dtype in (jnp.float32, jnp.float64)
  wino = wino and (out_type is None or out_type == lhs.dtype)
  return ('conv', 'dot', 'winograd') if wino else ('conv', 'dot')


def conv_lowering_rule(out_shape: tuple, rhs_shape: tuple, params: dict) -> str:
  """The lowering the slim program uses unless a measured one was chosen
  (:func:`oto_jax.deploy_subnet` with ``tune_inputs``): ``'dot'`` for a small output
  (``SMALL_CONV_OUTPUT`` pixels) or a 1×1 kernel, ``'conv'`` otherwise."""
  dn = params['dimension_numbers']
  small = math.prod(out_shape[a] for a in dn.out_spec[2:]) <= SMALL_CONV_OUTPUT
  small = small or math.prod(rhs_shape[a] for a in dn.rhs_spec[2:]) == 1
  return 'dot' if small and _ungrouped(params) else 'conv'


def bind_conv(lowering: str | None, ctx, eqn, ins, params) -> list:
  """A convolution bound as ``lowering`` (``'conv'``: the primitive; ``'dot'``:
  :func:`conv_as_dot`; ``'winograd'``: :func:`conv_as_winograd`; None:
  :func:`conv_lowering_rule`'s choice), or as the primitive where that lowering does not apply."""
  if lowering is None:
    shapes = ctx.values.shapes
    lowering = conv_lowering_rule(shapes[eqn.outs[0]], shapes[eqn.ins[1]], params)
  if lowering not in conv_lowerings(*ins, params):
    lowering = 'conv'
  how = _LOWERED.get(lowering)
  return [eqn.primitive.bind(*ins, **params) if how is None else how(*ins, params)]


def _ragged_numbers(eqn):
  """``(contracting, batch, lhs ragged axes, rhs group axes)`` of a ``ragged_dot_general``, or
  None unless its ragged axes are free rows of the lhs and the rhs has a group (expert) axis:
  the forward of a mixture-of-experts dispatch, whose result has no group axis."""
  rn = eqn.params['ragged_dot_dimension_numbers']
  (lc, rc), (lb, rb) = rn.dot_dimension_numbers
  ragged, group = tuple(rn.lhs_ragged_dimensions), tuple(rn.rhs_group_dimensions)
  if not group or any(a in lc or a in lb for a in ragged):
    return None
  return (lc, rc), (lb, rb), ragged, group


def _ragged_structure(ctx, eqn):
  lhs, rhs, sizes, out = eqn.ins[0], eqn.ins[1], eqn.ins[2], eqn.outs[0]
  numbers = _ragged_numbers(eqn)
  if numbers is None:
    ctx.block_all([lhs, rhs, out], '`ragged_dot_general` with a ragged contracting or batch axis', eqn)
    return
  (lc, rc), (lb, rb), _, group = numbers
  # The group sizes assign runs of lhs rows to the experts in order: removing an expert would
  # hand its rows to the next one.
  why = 'the expert (group) axis of `ragged_dot_general`: its group sizes assign rows to experts'
  for ax in group:
    ctx.block_axis(rhs, ax, why, eqn)
  ctx.block_all([sizes], why, eqn)
  _contract(ctx, lhs, rhs, out, ((lc, rc), (lb, rb)), skip=group)


def _ragged_zero(eqn) -> Zero:
  numbers = _ragged_numbers(eqn)
  if numbers is None:
    return NONE
  (lc, rc), *_ = numbers
  return Zero('any', operands=(0, 1), contract=(tuple(lc), tuple(rc)))


ENTRIES: dict[str, PrimitiveEntry] = {
  'dot_general': PrimitiveEntry(_dot_structure, _dot_zero, cost=_dot_cost),
  'ragged_dot_general': PrimitiveEntry(_ragged_structure, _ragged_zero, cost=_dot_cost),
  'conv_general_dilated': PrimitiveEntry(
    _conv_structure,
    _conv_zero,
    cost=_conv_cost,
    rewrite=_conv_rewrite,
    bind=functools.partial(bind_conv, None),
  ),
}
