"""HSPG (OTOv1) and its baseline Prox-SG, as optax chains of the blocks in :mod:`oto_jax.transforms`."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from oto_jax import checks
from oto_jax.partition import ZIGPartition
from oto_jax.transforms import (
  NO_PARAMS,
  ScalarOrSchedule,
  add_group_lasso,
  fraction,
  group_lasso_prox,
  half_space_projection,
  per_group_epsilon,
  safe_norm_inv,
  value_at,
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

  ``hspg(...)`` computes exactly this chain (a test checks it against the chain written by
  hand); with the default ``stage1='subgradient'`` it does so in one fused transform that
  reads the parameters in two reductions and one elementwise pass instead of three and
  several::

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
    after each step is in the state (an :class:`HSPGState`, or the chain's
    :class:`~oto_jax.HalfSpaceState` for ``stage1='prox'``):
    ``optax.tree_utils.tree_get(state, 'group_sparsity')``.

  Example::

    part = oto_jax.zig_partition(model.apply, variables, x)
    tx = oto_jax.hspg(part, 0.1, lmbda=1e-3, n_p=5000)
    opt_state = tx.init(variables['params'])

  References:
    Chen et al., *Only Train Once: A One-Shot Neural Network Training and Pruning
    Framework*, NeurIPS 2021 (arXiv 2107.07467), Algorithms 1–2; Chen et al., *Neural
    Network Compression via Sparse Optimization* (HSPG), arXiv 2011.04868.
  """
  checks.hyperparameters(
    learning_rate=learning_rate,
    lmbda=lmbda,
    n_p=n_p,
    epsilon=epsilon,
    momentum=momentum,
    weight_decay=weight_decay,
  )
  if stage1 not in STAGE1:
    raise ValueError(f'stage1 must be one of {STAGE1}, got {stage1!r}.')
  prox = stage1 == 'prox'
  blocks = []
  if not _is_zero(weight_decay):
    blocks.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None:
    blocks.append(optax.trace(decay=momentum, nesterov=nesterov))
  if not prox:
    base = optax.with_extra_args_support(optax.chain(*blocks) if blocks else optax.identity())
    return _fused(partition, base, learning_rate, lmbda, n_p, epsilon)
  blocks += [
    add_group_lasso(partition, lmbda, start_step=n_p if prox else 0),
    optax.scale_by_learning_rate(learning_rate),
  ]
  if prox:
    blocks.append(group_lasso_prox(partition, lmbda, learning_rate, end_step=n_p))
  blocks.append(half_space_projection(partition, epsilon, start_step=n_p))
  return optax.chain(*blocks)


class HSPGState(NamedTuple):
  """State of :func:`hspg` (subgradient stage 1).

  Attributes:
    count: steps taken.
    inner: the base (weight decay, momentum) state.
    group_sparsity: the fraction of ZIGs that are zero after the last step (before ``n_p``:
      that were zero before it).
    num_projected: how many non-zero ZIGs the last step projected onto zero.
  """

  count: chex.Array
  inner: optax.OptState
  group_sparsity: chex.Array
  num_projected: chex.Array


def _fused(partition, base, learning_rate, lmbda, n_p, epsilon) -> optax.GradientTransformationExtraArgs:
  """``add_group_lasso`` → ``scale_by_learning_rate`` → ``half_space_projection``, fused.

  With ``d`` the base direction and ``c_g = λ/‖x_g‖``, the step is ``u = -α(d + c x)`` and
  ``⟨x + u, x⟩ = ‖x‖² - α(⟨x, d⟩ + c‖x‖²)``: two per-ZIG reductions give everything.
  """

  def init_fn(params):
    checks.trainable_tree(partition, params, 'hspg')
    return HSPGState(
      count=jnp.zeros([], jnp.int32),
      inner=base.init(params),
      group_sparsity=jnp.zeros([], jnp.float32),
      num_projected=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS)
    d, inner = base.update(updates, state.inner, params, **extra_args)
    lr = value_at(learning_rate, state.count)
    seg = partition.segments(params)
    xx, xd = seg.sums((params, params), (params, d))
    nonzero = xx > 0
    coef = value_at(lmbda, state.count) * safe_norm_inv(xx)
    on = state.count >= n_p
    trial_dot = xx - lr * (xd + coef * xx)
    project = on & nonzero & (trial_dot < per_group_epsilon(partition, epsilon) * xx)
    drop = on & (project | ~nonzero)
    step = jax.tree.map(lambda u: -lr * u, d)
    new = seg.map(
      lambda u, x, c, z: jnp.where(z, -x, u - (lr * c * x).astype(u.dtype)),
      step,
      params,
      values=[coef, drop],
      fills=[0.0, False],
    )
    return new, HSPGState(
      count=optax.safe_increment(state.count),
      inner=inner,
      group_sparsity=fraction(drop | ~nonzero),
      num_projected=jnp.sum(project).astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  checks.hyperparameters(learning_rate=learning_rate, lmbda=lmbda, momentum=momentum)
  blocks = [] if momentum is None else [optax.trace(decay=momentum)]
  blocks += [
    optax.scale_by_learning_rate(learning_rate),
    group_lasso_prox(partition, lmbda, learning_rate),
  ]
  return optax.chain(*blocks)


def _is_zero(x: Any) -> bool:
  return isinstance(x, (int, float)) and x == 0
