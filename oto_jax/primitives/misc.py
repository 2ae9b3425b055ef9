"""Primitives that create values (random bits, dimension sizes), and explicit blocks.

Random generators couple nothing: their results are fresh axes. Where a result's axis is
pruned, the slim program draws the full-width bits and keeps the surviving positions (the
evaluator's ``take``), so a train-mode dropout mask on a pruned layer is exactly the full
model's mask, sliced.

The explicit blocks name primitives that mix the positions of the axes they touch (linear
algebra, FFTs) or run outside the program (host callbacks): every axis they touch is blocked
with that reason, instead of the generic "unsupported primitive".
"""

from __future__ import annotations

import numpy as np

from oto_jax.ir import is_symbolic
from oto_jax.primitives.entry import NONE, PrimitiveEntry, blocked, elementwise, free


def _nothing(ctx, eqn):
  """A scalar made from a dimension: no axes to couple."""


def _dim_as_value_bind(ctx, eqn, ins, params):
  # At concrete shapes the dimension is a number; only under jax.export is it a program value.
  d = params['dim']
  if not is_symbolic(d):
    return [np.asarray(d, ctx.dtype(eqn.outs[0]))]
  return [eqn.primitive.bind(**params)]


# Results that are fresh axes: nothing coupled, nothing zero, no FLOPs.
_FRESH = PrimitiveEntry(_nothing, NONE, cost=free)
_LINALG = (
  'cholesky cholesky_update eig eigh lu lu_pivots_to_permutation qr svd schur hessenberg '
  'householder_product geqrf geqp3 ormqr triangular_solve tridiagonal tridiagonal_solve '
  'symmetric_product'
).split()
_CALLBACKS = 'pure_callback io_callback debug_callback debug_print ffi_call'.split()

ENTRIES: dict[str, PrimitiveEntry] = {
  **{
    name: elementwise(NONE, cost=free) for name in 'random_bits random_wrap random_unwrap random_seed'.split()
  },
  # Random generators; tokens (they order effects and carry no data); dce_sink (it only keeps
  # its operands alive); empty2 (an uninitialised array); the *_to comparisons of dimension
  # sizes.
  **{
    name: _FRESH
    for name in (
      'random_fold_in random_split random_clone random_gamma threefry2x32 rng_bit_generator rng_uniform '
      'create_token after_all dce_sink empty2 eq_to le_to lt_to'
    ).split()
  },
  'dim_as_value': _FRESH.replace(bind=_dim_as_value_bind),
  'custom_lin': blocked('an internal of differentiation (linearize), not of a forward pass'),
  'custom_linear_solve': blocked('a custom linear solve, whose sub-programs are not analysed'),
  **{name: blocked('a mutable reference (state primitives are not analysed)') for name in ('get', 'swap')},
  **{
    name: blocked('the gradient of a max pool mixes the window positions')
    for name in ('select_and_gather_add', 'select_and_scatter', 'select_and_scatter_add')
  },
  **{name: blocked('linear algebra mixes the positions of its matrix axes') for name in _LINALG},
  'fft': blocked('a Fourier transform mixes the positions of its axes'),
  **{name: blocked('a host callback: its results cannot be sliced') for name in _CALLBACKS},
}
