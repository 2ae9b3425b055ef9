"""HSPG (OTOv1) and its baseline Prox-SG, as optax chains of the blocks in :mod:`oto_jax.transforms`."""

from __future__ import annotations

from typing import Any

import optax

from oto_jax.partition import ZIGPartition
from oto_jax.transforms import (
  ScalarOrSchedule,
  add_group_lasso,
  group_lasso_prox,
  half_space_projection,
)

STAGE1 = ('subgradient', 'prox')


def hspg(
  partition: ZIGPartition,
  learning_rate: ScalarOrSchedule,
  *,
  lmbda: ScalarOrSchedule,
  n_p: Any,
  epsilon: Any = 0.0,
  momentum: float | None = None,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  stage1: str = 'subgradient',
) -> optax.GradientTransformation:
  """Half-Space Stochastic Projected Gradient: drives whole ZIGs to exactly zero.

  Minimises :math:`f(x) + \\lambda \\sum_g \\lVert x_g \\rVert_2` over the ZIGs ``g`` of
  ``partition``. With ``d`` the (momentum) gradient and α the learning rate:

  .. math::
    \\text{stage 1 } (k < N_P):&\\quad
      x \\leftarrow x - \\alpha\\big(d + \\lambda\\, x_g/\\lVert x_g\\rVert\\big)
      \\quad\\text{(or the proximal step, } \\texttt{stage1='prox'})\\\\
    \\text{stage 2 } (k \\ge N_P):&\\quad
      \\tilde x = x - \\alpha\\big(d + \\lambda\\, x_g/\\lVert x_g\\rVert\\big),
      \\quad \\tilde x_g \\leftarrow 0 \\text{ if } \\tilde x_g^\\top x_g < \\varepsilon \\lVert x_g\\rVert^2
      \\text{ or } x_g = 0

  ``hspg(...)`` *is* this chain (and a test checks that it equals it written by hand)::

    optax.chain(
      optax.add_decayed_weights(weight_decay),          # only if weight_decay is given
      optax.trace(decay=momentum, nesterov=nesterov),   # only if momentum is given
      add_group_lasso(partition, lmbda, start_step=0),  # start_step=n_p when stage1='prox'
      optax.scale_by_learning_rate(learning_rate),
      group_lasso_prox(partition, lmbda, learning_rate, end_step=n_p),  # stage1='prox' only
      half_space_projection(partition, epsilon, start_step=n_p),
    )

  so the same algorithm runs on any base optimizer by swapping the first blocks (e.g.
  ``optax.scale_by_adam()``). The default stage 1 is the reference code's subgradient step,
  with which the published OTO results were obtained; the paper describes the proximal step.

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    learning_rate: α, a float or an optax schedule.
    lmbda: λ, the group-lasso weight, a float or a schedule (the reference divides it by 10
      with the learning rate, and sets it to 0 once it is below 1e-6).
    n_p: the step at which the half-space stage starts.
    epsilon: ε ∈ [0, 1), a float or ``epsilon(node_group) -> float`` (see
      :func:`oto_jax.epsilon_by_layer`); larger ε projects more aggressively.
    momentum: heavy-ball momentum of the base SGD (None: plain SGD, as in the reference).
    nesterov: Nesterov momentum.
    weight_decay: L2 weight decay added to the gradient (0: none).
    stage1: ``'subgradient'`` (default) or ``'prox'``.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``. The group sparsity
    after each step is in the state: ``optax.tree_utils.tree_get(state, 'group_sparsity')``.

  Example::

    part = oto_jax.zig_partition(model.apply, variables, x)
    tx = oto_jax.hspg(part, 0.1, lmbda=1e-3, n_p=5000)
    opt_state = tx.init(variables['params'])

  References:
    Chen et al., *Only Train Once: A One-Shot Neural Network Training and Pruning
    Framework*, NeurIPS 2021 (arXiv 2107.07467), Algorithms 1–2; Chen et al., *Neural
    Network Compression via Sparse Optimization* (HSPG), arXiv 2011.04868.
  """
  if stage1 not in STAGE1:
    raise ValueError(f'stage1 must be one of {STAGE1}, got {stage1!r}.')
  prox = stage1 == 'prox'
  blocks = []
  if not _is_zero(weight_decay):
    blocks.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None:
    blocks.append(optax.trace(decay=momentum, nesterov=nesterov))
  blocks += [
    add_group_lasso(partition, lmbda, start_step=n_p if prox else 0),
    optax.scale_by_learning_rate(learning_rate),
  ]
  if prox:
    blocks.append(group_lasso_prox(partition, lmbda, learning_rate, end_step=n_p))
  blocks.append(half_space_projection(partition, epsilon, start_step=n_p))
  return optax.chain(*blocks)


def prox_sg(
  partition: ZIGPartition,
  learning_rate: ScalarOrSchedule,
  lmbda: ScalarOrSchedule,
  *,
  momentum: float | None = None,
) -> optax.GradientTransformation:
  """Proximal SGD for the group lasso: the baseline HSPG improves on.

  .. math::
    z = x - \\alpha d, \\qquad
    x_g \\leftarrow \\max\\Big(0,\\ 1 - \\frac{\\alpha\\lambda}{\\lVert z_g \\rVert_2}\\Big) z_g

  It equals ``optax.chain(optax.trace(momentum) if momentum else identity,
  optax.scale_by_learning_rate(learning_rate), group_lasso_prox(partition, lmbda,
  learning_rate))``.

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    learning_rate: α, a float or a schedule.
    lmbda: λ, a float or a schedule.
    momentum: heavy-ball momentum (None: plain SGD).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example::

    tx = oto_jax.prox_sg(part, 0.1, 1e-3)

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), section 4 (the
    Prox-SG baseline); Duchi & Singer, *Efficient online and batch learning using forward
    backward splitting*, JMLR 2009.
  """
  blocks = [] if momentum is None else [optax.trace(decay=momentum)]
  blocks += [
    optax.scale_by_learning_rate(learning_rate),
    group_lasso_prox(partition, lmbda, learning_rate),
  ]
  return optax.chain(*blocks)


def _is_zero(x: Any) -> bool:
  return isinstance(x, (int, float)) and x == 0
