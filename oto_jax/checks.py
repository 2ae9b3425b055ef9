"""Argument checks shared by every optimizer and block: one place, one wording.

Hyperparameters may be traced (``optax.inject_hyperparams`` calls a factory with arrays, and
under ``jax.jit`` with tracers): a traced value cannot be checked and passes; every concrete
one is checked before any work.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from oto_jax.partition import ZIGPartition
from oto_jax.paths import path_str


def _traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _scalar(name: str, value: Any, what: str) -> float:
  """``value`` as a float, or a ValueError naming ``name`` and what it should be."""
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    raise ValueError(f'{name} must be {what}, got {value!r}.')
  try:
    a = np.asarray(value)
  except Exception:  # noqa: BLE001 - anything that is not array-like is the caller's mistake
    raise ValueError(f'{name} must be {what}, got {value!r}.') from None
  if a.shape != () or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    raise ValueError(f'{name} must be {what}, got {value!r}.')
  return float(a)


def number(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  schedule: bool = False,
) -> None:
  """A finite real number in the given range (a schedule's value at step 0 when allowed).

  Raises:
    ValueError: a string, a bool, None, an array, NaN or inf, or a value out of range.
  """
  lo = '' if low is None else f'{"> " if low_open else ">= "}{low:g}'
  hi = '' if high is None else f'{"< " if high_open else "<= "}{high:g}'
  what = (
    'a finite number' + (f' {lo}' if lo else '') + (' and' if lo and hi else '') + (f' {hi}' if hi else '')
  )
  if schedule:
    what += ' (or an optax schedule)'
    if callable(value):
      value = value(0)
      name = f'{name} (its schedule at step 0)'
  if _traced(value):
    return
  x = _scalar(name, value, what)
  bad = (
    not math.isfinite(x)
    or (low is not None and (x <= low if low_open else x < low))
    or (high is not None and (x >= high if high_open else x > high))
  )
  if bad:
    raise ValueError(f'{name} must be {what}, got {value!r}.')


def steps(**values: Any) -> None:
  """Step counts: whole numbers >= 0 (None and traced values pass).

  Raises:
    ValueError: a fraction (``pruning_steps=2.5``), a negative count, a string.
  """
  for name, value in values.items():
    if value is None or _traced(value):
      continue
    x = _scalar(name, value, 'a whole number of steps >= 0')
    if not math.isfinite(x) or x != int(x) or x < 0:
      raise ValueError(f'{name} must be a whole number of steps >= 0, got {value!r}.')


def at_least_one(name: str, value: Any) -> None:
  """A whole number >= 1 (``pruning_periods``, ``group_divisible``)."""
  if _traced(value):
    return
  x = _scalar(name, value, 'a whole number >= 1')
  if not math.isfinite(x) or x != int(x) or x < 1:
    raise ValueError(f'{name} must be a whole number >= 1, got {value!r}.')


def trainable_tree(partition: ZIGPartition, tree: Any, who: str) -> None:
  """The tree an optimizer is given holds trainable variables only.

  Raises:
    ValueError: a leaf of ``tree`` is a non-trainable variable (linen ``batch_stats``, NNX
      ``BatchStat``): the optimizer would decay or project running statistics.
  """
  frozen = [p for p in partition._match(tree) if p not in partition.trainable_paths]
  if frozen:
    raise ValueError(
      f'{who} was given non-trainable variables ({", ".join(path_str(p) for p in frozen[:3])}'
      f'{"…" if len(frozen) > 3 else ""}): it would update running statistics like weights. Pass '
      "the trainable collection only: variables['params'] (linen) or nnx.state(model, nnx.Param)."
    )


# The rule for each hyperparameter name the optimizers and blocks share.
_NUMBERS = {
  'learning_rate': dict(low=0.0, schedule=True),
  'lmbda': dict(low=0.0, schedule=True),
  'lmbda_amplify': dict(low=0.0),
  'lmbda_hat': dict(low=0.0),
  'weight_decay': dict(low=0.0, schedule=True),
  'momentum': dict(low=0.0, high=1.0, high_open=True),
  'b1': dict(low=0.0, high=1.0, high_open=True),
  'b2': dict(low=0.0, high=1.0, high_open=True),
  'eps': dict(low=0.0),
  'epsilon': dict(low=0.0, high=1.0, high_open=True),
  'tolerance': dict(low=0.0, high=1.0, high_open=True),
}
_STEPS = frozenset({'n_p', 'start_pruning_step', 'pruning_steps', 'start_step', 'end_step'})
_COUNTS = frozenset({'pruning_periods', 'group_divisible'})


def hyperparameters(**values: Any) -> None:
  """Checks each named hyperparameter by its rule (None means "the default" and passes).

  ``epsilon`` may also be a function of the node group (:func:`oto_jax.epsilon_by_layer`).

  Raises:
    ValueError: naming the first bad value and what it must be.
  """
  for name, value in values.items():
    if value is None:
      continue
    if name in _STEPS:
      steps(**{name: value})
    elif name in _COUNTS:
      at_least_one(name, value)
    elif not (name == 'epsilon' and callable(value)):
      number(name, value, **_NUMBERS[name])
