"""DHSPG (OTOv2): dual half-space projected gradient with a target group sparsity."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from oto_jax import budgets, checks
from oto_jax.partition import ZIGPartition
from oto_jax.transforms import (
  NO_PARAMS,
  ScalarOrSchedule,
  base_direction,
  fraction,
  normalized,
  per_group_epsilon,
  safe_norm_inv,
  value_at,
)

# (λ, amplify, hat) of the reference, by base optimizer.
DEFAULTS = {'sgd': (1e-3, 2.0, 10.0), 'adam': (1e-2, 20.0, 1e3), 'adamw': (1e-2, 20.0, 1e3)}


class DHSPGState(NamedTuple):
  """State of :func:`dhspg`.

  Attributes:
    count: steps taken.
    inner: the base optimizer's state.
    redundant: bool ``[num_zigs]``: the redundant set, chosen at ``start_pruning_step``.
    group_sparsity: fraction of ZIGs that are zero after the last step.
    important_norm: L2 norm over the important (not redundant) ZIGs after the last step.
    redundant_norm: L2 norm over the redundant ZIGs after the last step.
  """

  count: chex.Array
  inner: optax.OptState
  redundant: chex.Array
  group_sparsity: chex.Array
  important_norm: chex.Array
  redundant_norm: chex.Array


def dhspg(
  partition: ZIGPartition,
  learning_rate: ScalarOrSchedule,
  *,
  target_group_sparsity: Any = None,
  target: budgets.Budget | None = None,
  start_pruning_step: Any = 0,
  variant: str | optax.GradientTransformation = 'sgd',
  lmbda: Any = None,
  lmbda_amplify: Any = None,
  lmbda_hat: Any = None,
  epsilon: Any = 0.0,
  tolerance: float = 0.0,
  momentum: Any = None,
  nesterov: bool = False,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """DHSPG: the base optimizer on important ZIGs, an adaptive half-space step on redundant ones.

  At ``start_pruning_step`` the ``K = ⌊min(target + tolerance, 0.999) · N⌋`` ZIGs with the
  highest redundancy score

  .. math::
    r_g = \\tfrac12\\, \\widehat{\\cos}(-x_g, -\\nabla f_g) + \\tfrac12\\,
    \\widehat{\\big(\\lVert x_g\\rVert / |g| + 10^{-6}\\big)^{-1}}
    \\qquad(\\widehat{\\cdot}: \\text{divided by its L2 norm over all ZIGs})

  form the redundant set (or, with ``target=flops_budget(f)``, the highest scores per unit of
  FLOPs until the rest keeps a fraction ``f``). From then on, with ``d`` the base direction,
  important ZIGs take the base step and every non-zero redundant ZIG takes

  .. math::
    \\tilde x_g = x_g - \\alpha\\Big(d_g + \\lambda_g \\frac{x_g}{\\lVert x_g\\rVert}\\Big),\\quad
    \\tilde x_g \\leftarrow 0 \\text{ if } \\tilde x_g^\\top x_g < \\varepsilon \\lVert x_g\\rVert^2,

  with :math:`\\lambda_g = \\lambda` when :math:`\\langle x_g, d_g\\rangle \\ge 0`, else
  :math:`\\lambda_g = \\mathrm{clip}(a L, \\lambda, \\lambda h)` (or :math:`(L+U)/2` when that
  is at least ``U``), :math:`L = -\\langle x, d\\rangle/\\lVert x\\rVert`,
  :math:`U = -\\lVert d\\rVert^2 \\lVert x\\rVert/\\langle x, d\\rangle`. Zero ZIGs stay zero.
  Unlike the reference, the redundant ZIGs keep being driven after the sparsity first reaches
  the target. As in the reference, λ_g is bounded so that the step still descends ``f``,
  so a redundant ZIG whose gradient pushes back can settle near zero without reaching it and
  the final sparsity can fall short of the target (reference issues #28, #43);
  :func:`oto_jax.hesso` meets its target exactly by construction.

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    learning_rate: α, a float or an optax schedule.
    target_group_sparsity: the fraction of ZIGs to remove, in [0, 1).
    target: instead, a :class:`~oto_jax.Budget`.
    start_pruning_step: the step at which the redundant set is chosen (after a warm-up with
      the base optimizer).
    variant: ``'sgd'``, ``'adam'``, ``'adamw'`` or a direction-producing transformation.
    lmbda: the base λ (default: 1e-3 for sgd, 1e-2 for adam/adamw), a float or a schedule.
    lmbda_amplify: the amplification ``a`` (default 2 for sgd, 20 for adam/adamw).
    lmbda_hat: the cap factor ``h`` (default 10 for sgd, 1e3 for adam/adamw).
    epsilon: ε ∈ [0, 1), a float or ``epsilon(node_group) -> float``.
    tolerance: added to the target when choosing ``K`` (as in the reference).
    momentum: heavy-ball momentum for ``'sgd'`` (None: none).
    nesterov: Nesterov momentum for ``'sgd'``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: L2 (sgd, adam) or decoupled (adamw) weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`DHSPGState`;
    ``update`` needs ``params``.

  Example::

    tx = oto_jax.dhspg(part, 0.1, target_group_sparsity=0.7, start_pruning_step=2000, momentum=0.9)

  References:
    Chen et al., *OTOv2: Automatic, Generic, User-Friendly*, ICLR 2023 (arXiv 2303.06862),
    Algorithm 2.
  """
  checks.hyperparameters(
    learning_rate=learning_rate,
    start_pruning_step=start_pruning_step,
    lmbda=lmbda,
    lmbda_amplify=lmbda_amplify,
    lmbda_hat=lmbda_hat,
    epsilon=epsilon,
    tolerance=tolerance,
    momentum=momentum,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
  )
  if target is None and target_group_sparsity is not None:
    budgets.Budget('zigs', target_group_sparsity)  # validates
    if not isinstance(target_group_sparsity, jax.core.Tracer):
      target_group_sparsity = min(float(target_group_sparsity) + tolerance, 0.999)
  budget = budgets.as_budget(target_group_sparsity, target)
  lam0, amp0, hat0 = DEFAULTS.get(variant if isinstance(variant, str) else 'sgd', DEFAULTS['sgd'])
  lmbda = lam0 if lmbda is None else lmbda
  amplify = amp0 if lmbda_amplify is None else lmbda_amplify
  hat = hat0 if lmbda_hat is None else lmbda_hat
  base = base_direction(
    variant, momentum=momentum, nesterov=nesterov, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
  )
  cost = budget.cost_per_zig(partition)
  n = partition.num_zigs

  def init_fn(params):
    checks.trainable_tree(partition, params, 'dhspg')

    def f0():  # a fresh buffer per field, so that the state can be donated
      return jnp.zeros([], jnp.float32)

    return DHSPGState(jnp.zeros([], jnp.int32), base.init(params), jnp.zeros((n,), bool), f0(), f0(), f0())

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS)
    d, inner = base.update(updates, state.inner, params, **extra_args)
    lr = value_at(learning_rate, state.count)
    lam = value_at(lmbda, state.count)
    seg = partition.segments(params)
    xx, xd, dd, xg, gg = seg.sums(
      (params, params), (params, d), (d, d), (params, updates), (updates, updates)
    )
    norm = jnp.sqrt(xx)
    zero = xx == 0

    def choose():
      xg, gg = seg.sums((params, updates), (updates, updates))
      denom = norm * jnp.sqrt(gg)
      cos = jnp.where(denom > 0, xg / jnp.where(denom > 0, denom, 1.0), 0.0)  # cos(-x, -∇f)
      small = 1.0 / (norm / jnp.maximum(jnp.asarray(seg.sizes, jnp.float32), 1.0) + 1e-6)
      everyone = jnp.ones((n,), bool)
      score = 0.5 * normalized(cos, everyone) + 0.5 * normalized(small, everyone)
      return budgets.select(budget, partition, -score / jnp.asarray(cost), zero, ~zero, jnp.float32(1.0))

    start = state.count == start_pruning_step
    redundant = jax.lax.cond(start, choose, lambda: state.redundant) if n else state.redundant
    on = state.count >= start_pruning_step
    act = on & redundant & ~zero
    # λ_g: large enough to turn a growing group back toward zero, bounded by U.
    inv = safe_norm_inv(xx)
    lower = -xd * inv
    upper = jnp.where(xd < 0, -dd * norm / jnp.where(xd < 0, xd, -1.0), jnp.inf)
    clipped = jnp.clip(amplify * lower, lam, lam * hat)
    lam_g = jnp.where(xd < 0, jnp.where(clipped >= upper, 0.5 * (lower + upper), clipped), lam)
    lam_g = jnp.where(act, lam_g, 0.0)
    trial_dot = xx - lr * (xd + lam_g * norm)
    project = act & (trial_dot < per_group_epsilon(partition, epsilon) * xx)
    drop = project | (on & zero)
    coef = -lr * lam_g * inv
    step = jax.tree.map(lambda u: -lr * u, d)
    new = seg.map(
      lambda u, x, c, z: jnp.where(z, -x, u + (c * x).astype(u.dtype)),
      step,
      params,
      values=[coef, drop],
      fills=[0.0, False],
    )
    # ‖x - α(d + λ_g x/‖x‖)‖² from the sums.
    after = xx - 2 * lr * (xd + lam_g * norm) + lr * lr * (dd + 2 * lam_g * xd * inv + lam_g * lam_g)
    after = jnp.where(drop, 0.0, jnp.maximum(after, 0.0))
    return new, DHSPGState(
      count=optax.safe_increment(state.count),
      inner=inner,
      redundant=redundant,
      group_sparsity=fraction(drop | (zero & (dd == 0))),
      important_norm=jnp.sqrt(jnp.sum(jnp.where(redundant, 0.0, after))),
      redundant_norm=jnp.sqrt(jnp.sum(jnp.where(redundant, after, 0.0))),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
