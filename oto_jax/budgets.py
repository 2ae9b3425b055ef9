"""Pruning targets (a ZIG count, a FLOPs or a parameter budget) and the choice of ZIGs to meet them.

The choice is jit-able and exact: the ZIGs are ordered by a score (saliency, or saliency per
unit of cost for a FLOPs or parameter budget), and the shortest prefix of that order whose
removal meets the target is taken. For a ZIG count that is exactly ``⌊sparsity · N⌋``; for a
budget the slim model's cost (:mod:`oto_jax.costs`, evaluated exactly for the chosen set) is
at most the budget, and removing one ZIG fewer would exceed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import checks
from oto_jax.partition import ZIGPartition

KINDS = ('zigs', 'flops', 'params')


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the pruned model must meet.

  Attributes:
    kind: ``'zigs'`` (``fraction`` is the target group sparsity: ``⌊fraction · N⌋`` ZIGs are
      removed), ``'flops'`` or ``'params'`` (``fraction`` is the share of the full model's
      FLOPs or trainable parameters to keep).
    fraction: see ``kind``.
  """

  kind: str
  fraction: Any

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Budget kind must be one of {KINDS}, got {self.kind!r}.')
    if self.kind == 'zigs':
      checks.number('target_group_sparsity', self.fraction, low=0.0, high=1.0, high_open=True)
    else:
      checks.number(
        f'A {self.kind} budget (the fraction kept)', self.fraction, low=0.0, high=1.0, low_open=True
      )

  def cost_per_zig(self, partition: ZIGPartition) -> np.ndarray:
    """What removing each ZIG saves, normalised to mean 1 (ones for a ZIG count)."""
    if self.kind == 'zigs':
      return np.ones((partition.num_zigs,), np.float32)
    model = partition.flops if self.kind == 'flops' else partition.params
    per = np.asarray(model.per_zig, np.float64)
    return (per / max(float(per.mean()), 1e-30)).astype(np.float32)


def flops_budget(keep: float) -> Budget:
  """Keep ``keep`` (a fraction in (0, 1]) of the full model's FLOPs.

  Example::

    tx = oto_jax.hesso(part, 1e-3, target=oto_jax.flops_budget(0.3), start_pruning_step=500,
                       pruning_steps=2000, pruning_periods=10, variant='adamw')
  """
  return Budget('flops', keep)


def params_budget(keep: float) -> Budget:
  """Keep ``keep`` (a fraction in (0, 1]) of the full model's trainable parameters."""
  return Budget('params', keep)


def as_budget(target_group_sparsity: Any, target: Budget | None) -> Budget:
  """The one target given, as a :class:`Budget`."""
  if (target_group_sparsity is None) == (target is None):
    raise ValueError('Give exactly one of target_group_sparsity (a float in [0, 1)) and target (a Budget).')
  if target is not None:
    if not isinstance(target, Budget):
      raise TypeError(f'target must be a Budget (oto_jax.flops_budget(...)), got {type(target).__name__}.')
    return target
  return Budget('zigs', target_group_sparsity)


def group_layout(partition: ZIGPartition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(node group of each ZIG, first ZIG id of each group, group sizes), over prunable groups."""
  groups = partition.prunable_groups
  sizes = np.array([g.size for g in groups], np.int32)
  starts = np.array([g.zig_offset for g in groups], np.int32)
  of_zig = np.repeat(np.arange(len(groups), dtype=np.int32), sizes)
  return of_zig, starts, sizes


def within_group_rank(partition: ZIGPartition, key: jax.Array, first: jax.Array | None = None) -> jax.Array:
  """The rank of each ZIG's ``key`` among the ZIGs of its node group (0 = lowest).

  ZIGs where ``first`` is true rank before all others of their group, by key among themselves.
  """
  of_zig, starts, _ = group_layout(partition)
  keys = (key,) if first is None else (key, ~first)
  order = jnp.lexsort((*keys, jnp.asarray(of_zig)))
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return rank - jnp.asarray(starts)[of_zig]


def eligible(
  partition: ZIGPartition, key: jax.Array, min_keep: Any, first: jax.Array | None = None
) -> jax.Array:
  """ZIGs that may be removed while every node group keeps its ``min_keep`` highest keys.

  ZIGs in ``first`` (already removed) count as the lowest of their group.
  """
  of_zig, _, sizes = group_layout(partition)
  return within_group_rank(partition, key, first) < jnp.asarray(sizes)[of_zig] - min_keep


def round_to_multiple(
  partition: ZIGPartition, removed: jax.Array, key: jax.Array, multiple: Any
) -> jax.Array:
  """Adjusts ``removed`` so that every node group keeps a multiple of ``multiple`` ZIGs.

  Each group's kept width is rounded to the nearest multiple (at least ``multiple``, at most
  the group's size); the ZIGs removed are the lowest by ``key``, with those already in
  ``removed`` first.
  """
  of_zig, _, sizes = group_layout(partition)
  of_zig_j, sizes_j = jnp.asarray(of_zig), jnp.asarray(sizes)
  n_removed = jax.ops.segment_sum(removed.astype(jnp.int32), of_zig_j, num_segments=len(sizes))
  kept = sizes_j - n_removed
  rounded = jnp.floor_divide(kept + multiple // 2, multiple) * multiple
  rounded = jnp.clip(rounded, jnp.minimum(multiple, sizes_j), sizes_j)
  # Already-removed ZIGs first, then the rest by key.
  return within_group_rank(partition, key, first=removed) < (sizes_j - rounded)[of_zig_j]


def num_removed(budget: Budget, num_zigs: int) -> Any:
  """``⌊sparsity · N⌋`` for a ZIG-count budget (exact in float64 when the sparsity is concrete)."""
  if isinstance(budget.fraction, jax.core.Tracer):
    return jnp.floor(budget.fraction * num_zigs + 1e-4)
  return int(np.floor(float(np.asarray(budget.fraction)) * num_zigs + 1e-9))


def select(
  budget: Budget,
  partition: ZIGPartition,
  key: jax.Array,
  pruned: jax.Array,
  allowed: jax.Array,
  progress: jax.Array,
) -> jax.Array:
  """The ZIGs removed once ``progress`` ∈ (0, 1] of the way to the budget.

  Args:
    budget: the final target.
    partition: the model's partition.
    key: float ``[num_zigs]``: lower is removed first.
    pruned: bool ``[num_zigs]``: already removed; always part of the result.
    allowed: bool ``[num_zigs]``: ZIGs that may be removed.
    progress: the fraction of the way from the full model to the budget to reach now.

  Returns:
    bool ``[num_zigs]``: ``pruned`` plus the lowest-key allowed ZIGs that meet the target.
  """
  n = partition.num_zigs
  order_key = jnp.where(pruned, -jnp.inf, jnp.where(allowed, key, jnp.inf))
  order = jnp.argsort(order_key)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
  lo = jnp.sum(pruned).astype(jnp.int32)
  hi = jnp.sum(pruned | allowed).astype(jnp.int32)
  if budget.kind == 'zigs':
    goal = num_removed(budget, n)
    m = jnp.floor(progress * goal + 1e-4).astype(jnp.int32)
    return rank < jnp.clip(m, lo, hi)
  model = partition.flops if budget.kind == 'flops' else partition.params
  total = jnp.float32(model.total)
  target = total - progress * (total - jnp.asarray(budget.fraction, jnp.float32) * total)

  def meets(m):
    return model(rank >= m) <= target

  # The smallest prefix length in [lo, hi] that meets the target (hi when none does).
  def body(_, bounds):
    a, b = bounds
    mid = (a + b) // 2
    ok = meets(mid)
    return jnp.where(ok, a, mid + 1), jnp.where(ok, mid, b)

  steps = max(1, int(np.ceil(np.log2(n + 1))) + 1)
  m, _ = jax.lax.fori_loop(0, steps, body, (lo, hi))
  return rank < m
