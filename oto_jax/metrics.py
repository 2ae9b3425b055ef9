"""Metrics a training loop logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.analysis import zig_partition
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


def count_params(tree: Any) -> int:
  """The number of array elements in ``tree`` (any pytree: params, all variables, a slim model).

  Example::

    oto_jax.count_params(variables['params'])
  """
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def count_flops(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call ``apply_fn(variables, *args, **kwargs)``, counted from its jaxpr.

  .. math::
    \\mathrm{FLOPs} = 2 \\cdot \\mathrm{MACs}(\\texttt{dot\\_general}, \\texttt{conv}) +
    \\#\\text{outputs of other arithmetic} + \\#\\text{inputs of reductions}

  Data movement (reshape, transpose, slicing, gathers) counts nothing; a scan body counts
  ``length`` times, a while body once, a ``cond`` its most expensive branch. Convolutions
  count every kernel tap, including those on padding (XLA's cost analysis skips those).

  Args:
    apply_fn: the function, as for :func:`oto_jax.zig_partition`.
    variables: its variables (arrays or ``ShapeDtypeStruct``).
    *args: its inputs (arrays or ``ShapeDtypeStruct``).
    **kwargs: its keyword arguments.

  Returns:
    The FLOP count as a float.

  Example::

    oto_jax.count_flops(model.apply, variables, x)
  """
  return zig_partition(apply_fn, variables, *args, **kwargs).flops.total
