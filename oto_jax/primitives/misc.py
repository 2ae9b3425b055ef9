"""Primitives that create values: random bits, dimension sizes as values."""

from __future__ import annotations

import numpy as np

from oto_jax.ir import is_symbolic
from oto_jax.primitives.entry import NONE, PrimitiveEntry, elementwise, free


def _nothing(ctx, eqn):
  """A scalar made from a dimension: no axes to couple."""


def _dim_as_value_bind(ctx, eqn, ins, params):
  # At concrete shapes the dimension is a number; only under jax.export is it a program value.
  d = params['dim']
  if not is_symbolic(d):
    return [np.asarray(d, ctx.dtype(eqn.outs[0]))]
  return [eqn.primitive.bind(**params)]


ENTRIES: dict[str, PrimitiveEntry] = {
  **{
    name: elementwise(NONE, cost=free) for name in 'random_bits random_wrap random_unwrap random_seed'.split()
  },
  'dim_as_value': PrimitiveEntry(_nothing, NONE, cost=free, bind=_dim_as_value_bind),
}
