"""Element-wise primitives: unary maps, arithmetic, comparisons, selection, casts."""

from __future__ import annotations

import numpy as np

from oto_jax.ir import Literal
from oto_jax.primitives.entry import (
  KEEP,
  NONE,
  PrimitiveEntry,
  Zero,
  align_elementwise,
  elementwise,
  free,
  same_axes,
)

# f(0) == 0: a zero channel stays zero.
_ZERO_PRESERVING = (
  'neg abs sign floor ceil round sqrt cbrt tanh sin tan asin atan sinh asinh atanh erf '
  'expm1 log1p square real imag conj bessel_i1e'
).split()
# f(0) != 0 (or undefined): a zero channel becomes non-zero.
_ZERO_BREAKING = (
  'exp exp2 log logistic cos acos cosh rsqrt erfc erf_inv lgamma digamma is_finite not '
  'eq ne lt le gt ge nextafter atan2 pow population_count clz shift_left shift_right_logical '
  'shift_right_arithmetic acosh bessel_i0e igamma igammac igamma_grad_a random_gamma_grad polygamma zeta '
  'regularized_incomplete_beta'
).split()
# Casts and copies: operand 0's data, unchanged in layout.
_CASTS = 'convert_element_type copy copy_p reduce_precision'.split()
_IDENTITY = 'stop_gradient optimization_barrier'.split()


def _all_zero(ok=None) -> Zero:
  return Zero('all', literal_ok=ok)


def _integer_pow(eqn) -> Zero:
  return KEEP if eqn.params['y'] > 0 else NONE


def _bitcast_structure(ctx, eqn):
  # Same bit width: element for element. Otherwise a trailing axis of bytes appears or
  # disappears, and the channels' bits are spread over it.
  x, out = eqn.ins[0], eqn.outs[0]
  if ctx.shape(x) == ctx.shape(out):
    align_elementwise(ctx, eqn)
  else:
    ctx.block_all([x, out], 'bit-cast to a type of another width', eqn)


def _scale_structure(ctx, eqn):
  align_elementwise(ctx, eqn)
  # A sum divided (or multiplied) by a constant: a mean when the constant is its width.
  a, b = eqn.ins
  if isinstance(b, Literal):
    ctx.scaled(a, b.val, eqn, divides=eqn.name == 'div')
  elif isinstance(a, Literal) and eqn.name == 'mul':
    ctx.scaled(b, a.val, eqn)


def _clamp(eqn) -> Zero:
  # clamp(lo, 0, hi) is 0 only when lo <= 0 <= hi, which literal bounds can show.
  lo, hi = eqn.ins[0], eqn.ins[2]
  if isinstance(lo, Literal) and isinstance(hi, Literal) and lo.val <= 0 <= hi.val:
    return Zero('keep', operands=(1,))
  return NONE


ENTRIES: dict[str, PrimitiveEntry] = {
  **{name: elementwise(KEEP) for name in _ZERO_PRESERVING},
  **{name: elementwise(NONE) for name in _ZERO_BREAKING},
  **{name: PrimitiveEntry(align_elementwise, KEEP, cost=free, moves=same_axes) for name in _CASTS},
  **{name: elementwise(KEEP, cost=free) for name in _IDENTITY},
  'add': elementwise(_all_zero()),
  'add_any': elementwise(_all_zero()),
  'sub': elementwise(_all_zero()),
  'or': elementwise(_all_zero()),
  'xor': elementwise(_all_zero()),
  'max': elementwise(_all_zero(lambda v: np.all(np.asarray(v) <= 0))),
  'min': elementwise(_all_zero(lambda v: np.all(np.asarray(v) >= 0))),
  'mul': PrimitiveEntry(_scale_structure, Zero('any')),
  'and': elementwise(Zero('any')),
  'div': PrimitiveEntry(_scale_structure, Zero('keep', operands=(0,))),
  'rem': elementwise(Zero('keep', operands=(0,))),
  'integer_pow': PrimitiveEntry(align_elementwise, _integer_pow),
  # select_n(pred, *cases) is zero where every case is.
  'select_n': PrimitiveEntry(
    align_elementwise, lambda eqn: Zero('all', operands=tuple(range(1, len(eqn.ins))))
  ),
  'clamp': PrimitiveEntry(align_elementwise, _clamp),
  # The all-zero bit pattern is zero in every numeric type. No `moves`: a bit-cast literal is
  # not the same number in the new type, so it must not be folded as a cast is.
  'bitcast_convert_type': PrimitiveEntry(_bitcast_structure, KEEP, cost=free),
  # complex(0, 0) = 0; the high half of 0 * y is 0.
  'complex': elementwise(_all_zero()),
  'mulhi': elementwise(Zero('any')),
}
