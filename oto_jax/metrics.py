"""Metrics a training loop logs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from oto_jax.partition import ZIGPartition
from oto_jax.transforms import fraction


def group_sparsity(partition: ZIGPartition, tree: Any) -> jax.Array:
  """The fraction of prunable ZIGs whose member entries in ``tree`` are all exactly zero.

  .. math::
    \\mathrm{sparsity} = \\frac{1}{N} \\#\\{ g : x_g = 0 \\}

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    tree: the variables, or a collection of them (e.g. params).

  Returns:
    A float32 scalar (jit-able).

  Example::

    oto_jax.group_sparsity(part, state.params)  # 0.0 at init

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), section 4.
  """
  return fraction(partition.segments(tree).sums((tree, tree))[0] == 0)


def zero_zigs(partition: ZIGPartition, tree: Any) -> jax.Array:
  """The ids of the ZIGs whose member entries in ``tree`` are all zero (not jit-able)."""
  return jnp.nonzero(partition.segments(tree).sums((tree, tree))[0] == 0)[0]
