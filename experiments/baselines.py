"""The Torch-Pruning-style baseline: one-shot L1-magnitude channel pruning to a FLOPs budget.

The baseline trains densely, then removes, in one shot, the channels with the smallest L1
norm (Li et al., 2017), the same fraction in every node group of the partition (Torch-Pruning's
default uniform ratio), and fine-tunes the remaining network. Pruning is built on the
partition: a "channel" is a ZIG, its importance is the L1 norm of the ZIG's member entries
(a conv filter with its BN scale and shift), and the FLOPs are the partition's exact cost model.

References:
  Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017.
  Fang, Ma, Song, Mi, Wang. DepGraph: Towards Any Structural Pruning. CVPR 2023.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import oto_jax


def l1_importance(partition: oto_jax.ZIGPartition, params: Any) -> np.ndarray:
  """The L1 norm of every ZIG's member entries in ``params``.

  .. math::
    s_g = \\sum_{i \\in g} |x_i|

  Args:
    partition: the model's partition.
    params: the params collection (or all variables), on host or device.

  Returns:
    float32 ``[num_zigs]``.
  """
  host = jax.tree.map(np.asarray, jax.device_get(params))
  magnitude = jax.tree.map(np.abs, host)
  ones = jax.tree.map(np.ones_like, host)
  return np.asarray(partition.segments(host).sums((magnitude, ones))[0])


def uniform_keep(partition: oto_jax.ZIGPartition, importance: np.ndarray, ratio: float) -> np.ndarray:
  """Removes the ``⌊ratio · n⌋`` least important ZIGs of every prunable node group (keeping one).

  Args:
    partition: the model's partition.
    importance: ``[num_zigs]``; lower is removed first.
    ratio: the fraction removed from each node group, in [0, 1].

  Returns:
    bool ``[num_zigs]``: the ZIGs kept (every unprunable ZIG is kept).
  """
  keep = np.ones((partition.num_zigs,), bool)
  for g in partition.prunable_groups:
    ids = g.zig_offset + np.arange(g.size)
    n_removed = min(int(np.floor(ratio * g.size + 1e-9)), g.size - 1)
    keep[ids[np.argsort(importance[ids], kind='stable')[:n_removed]]] = False
  return keep


def l1_prune(partition: oto_jax.ZIGPartition, params: Any, flops_keep: float) -> np.ndarray:
  """One-shot L1 pruning with a uniform per-group ratio, the smallest that meets a FLOPs budget.

  The ratio is found by bisection on the partition's exact FLOPs model; the result keeps at
  most ``flops_keep`` of the full model's FLOPs (or as little as one ZIG per group allows).

  Args:
    partition: the model's partition.
    params: the trained params.
    flops_keep: the fraction of FLOPs to keep, in (0, 1].

  Returns:
    bool ``[num_zigs]``: the ZIGs kept.

  Example::

    keep = l1_prune(part, params, 0.3)
    pruned = part.zero(params, np.flatnonzero(~keep))
  """
  if not 0.0 < flops_keep <= 1.0:
    raise ValueError(f'flops_keep must lie in (0, 1]; got {flops_keep}.')
  importance = l1_importance(partition, params)
  model = partition.flops
  target = flops_keep * model.total
  lo, hi = 0.0, 1.0
  # Group widths are integers, so 50 halvings pin the ratio far below one ZIG of any group.
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    if model.evaluate(uniform_keep(partition, importance, mid)) <= target:
      hi = mid
    else:
      lo = mid
  return uniform_keep(partition, importance, hi)
