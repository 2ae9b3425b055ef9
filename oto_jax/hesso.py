"""HESSO: hybrid efficient structured sparse optimizer, with exact control of what is pruned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from oto_jax import budgets, checks
from oto_jax.partition import ZIGPartition
from oto_jax.transforms import (
  NO_PARAMS,
  ScalarOrSchedule,
  base_direction,
  fraction,
  normalized,
  value_at,
)

CRITERIA = ('magnitude', 'avg_magnitude', 'cosine_similarity', 'taylor_first_order', 'taylor_second_order')
DEFAULT_IMPORTANCE = dict.fromkeys(CRITERIA, 0.2)


class HESSOState(NamedTuple):
  """State of :func:`hesso`.

  Attributes:
    count: steps taken.
    inner: the base optimizer's state.
    pruned: bool ``[num_zigs]``: ZIGs committed as removed (held at zero).
    active: bool ``[num_zigs]``: ZIGs being decayed to zero in the current period.
    group_sparsity: fraction of ZIGs that the last step set to exactly zero (pruned ones and
      active ones at their period's end).
    important_norm: L2 norm over the ZIGs that are neither pruned nor active, at the params
      the last update was computed from (one reduction a step; no extra pass).
    redundant_norm: L2 norm over the pruned and active ZIGs, likewise.
    probe_score: float ``[num_zigs]``: with corrective cycles (:func:`hesso_cric`), the sum of
      the loss increases measured while each ZIG was zeroed in this period's trials; a scalar 0
      without.
    probe_trials: int ``[num_zigs]``: how many trials zeroed each ZIG in this period (a scalar
      0 without corrective cycles).
  """

  count: chex.Array
  inner: optax.OptState
  pruned: chex.Array
  active: chex.Array
  group_sparsity: chex.Array
  important_norm: chex.Array
  redundant_norm: chex.Array
  probe_score: chex.Array
  probe_trials: chex.Array


def saliency(
  sums: jax.Array, sizes: np.ndarray, allowed: jax.Array, weights: Mapping[str, float]
) -> jax.Array:
  """HESSO's saliency of each ZIG from ``sums = [‖x_g‖², ⟨x_g, d_g⟩, ‖d_g‖²]``; higher is kept.

  .. math::
    s_g = \\sum_c w_c \\frac{c_g}{\\lVert c \\rVert_2}, \\quad c \\in \\Big\\{ \\lVert x_g\\rVert,
    \\frac{\\lVert x_g\\rVert}{|g|}, \\cos(x_g, -d_g) + 1, |\\langle x_g, d_g\\rangle|,
    \\tfrac12 \\langle x_g, d_g\\rangle^2 \\Big\\}

  with ``d`` the base optimizer's direction (the step is ``-α d``), each criterion normalised
  over the ``allowed`` ZIGs.
  """
  xx, xd, dd = sums
  norm = jnp.sqrt(xx)
  denom = norm * jnp.sqrt(dd)
  cos = jnp.where(denom > 0, -xd / jnp.where(denom > 0, denom, 1.0), 0.0)
  crit = {
    'magnitude': norm,
    'avg_magnitude': norm / jnp.maximum(jnp.asarray(sizes, jnp.float32), 1.0),
    'cosine_similarity': cos + 1.0,
    'taylor_first_order': jnp.abs(xd),
    'taylor_second_order': 0.5 * jnp.square(xd),
  }
  return sum(w * normalized(crit[c], allowed) for c, w in weights.items() if w)


def hesso(
  partition: ZIGPartition,
  learning_rate: ScalarOrSchedule,
  *,
  target_group_sparsity: Any = None,
  target: budgets.Budget | None = None,
  start_pruning_step: Any = 0,
  pruning_steps: Any,
  pruning_periods: Any = 1,
  variant: str | optax.GradientTransformation = 'sgd',
  momentum: Any = None,
  nesterov: bool = False,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  importance_weights: Mapping[str, float] | None = None,
  group_divisible: Any = 1,
) -> optax.GradientTransformationExtraArgs:
  """HESSO: prunes exactly the ZIGs a target asks for, by a linear decay to zero.

  ``K = ⌊target_group_sparsity · N⌋`` ZIGs are removed in ``P = pruning_periods`` periods of
  ``D = pruning_steps // P`` steps starting at ``start_pruning_step``; period ``p`` brings
  the total to ``⌊(p+1)/P · K⌋``. At each period start the not-yet-pruned ZIGs with the
  lowest saliency (:func:`saliency`) become *active*; every step all parameters take the
  base step and then active ZIGs are scaled down linearly,

  .. math::
    x_g \\leftarrow \\frac{D - t - 1}{D - t} \\, (x_g - \\alpha d_g), \\qquad t = 0, \\dots, D - 1,

  which reaches exactly zero at the period's end, when they are committed as pruned and held
  at zero for good. With ``target=oto_jax.flops_budget(f)`` (or ``params_budget``) the ZIGs
  are taken by saliency per unit of cost until the slim model keeps at most a fraction ``f``
  of the FLOPs (parameters), computed exactly from the program (:mod:`oto_jax.costs`).

  Every node group keeps at least ``max(1, group_divisible)`` ZIGs, so the slim model never
  loses a whole layer.

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    learning_rate: α, a float or an optax schedule.
    target_group_sparsity: the fraction of ZIGs to remove, in [0, 1).
    target: instead, a :class:`~oto_jax.Budget` (:func:`~oto_jax.flops_budget`,
      :func:`~oto_jax.params_budget`).
    start_pruning_step: the first step of the pruning window (the reference advises ~10% of
      training).
    pruning_steps: the window's length in steps (advised: done by ~20–25% of training).
    pruning_periods: the number of periods the removal is spread over.
    variant: the base optimizer: ``'sgd'``, ``'adam'``, ``'adamw'``, or any
      ``GradientTransformation`` that produces a direction (before the learning rate).
    momentum: heavy-ball momentum for ``'sgd'`` (None: none).
    nesterov: Nesterov momentum for ``'sgd'``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: L2 (sgd, adam) or decoupled (adamw) weight decay.
    importance_weights: weights of the saliency criteria, a mapping over
      ``'magnitude', 'avg_magnitude', 'cosine_similarity', 'taylor_first_order',
      'taylor_second_order'`` (missing ones count 0); default 0.2 each.
    group_divisible: round every node group's kept width to a multiple of this (to the
      nearest multiple, at least one multiple); the number of pruned ZIGs then follows the
      rounding rather than the exact target.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`HESSOState`;
    ``update`` needs ``params``.

  Raises:
    ValueError: a target outside [0, 1), both or neither of ``target_group_sparsity`` and
      ``target``, ``pruning_steps < pruning_periods``, ``pruning_periods < 1``, negative
      steps, an unknown criterion or variant, or a target that would empty a node group.

  Example::

    tx = oto_jax.hesso(part, 1e-3, target_group_sparsity=0.5, start_pruning_step=1000,
                       pruning_steps=3000, pruning_periods=6, variant='adamw', weight_decay=1e-4)

  References:
    Chen et al., *HESSO: Towards Automatic Efficient and User Friendly Any Neural Network
    Training and Pruning*, arXiv 2409.09085.
  """
  return _hesso(Corrective(0), **locals())


class Corrective(NamedTuple):
  """HESSO-CRIC's settings (:func:`hesso_cric`); ``cycles=0`` is plain HESSO."""

  cycles: int
  subsets: int = 4
  oversample: float = 2.0
  seed: int = 0


def _hesso(
  cric: Corrective,
  partition,
  learning_rate,
  target_group_sparsity,
  target,
  start_pruning_step,
  pruning_steps,
  pruning_periods,
  variant,
  momentum,
  nesterov,
  b1,
  b2,
  eps,
  weight_decay,
  importance_weights,
  group_divisible,
) -> optax.GradientTransformationExtraArgs:
  cric_cycles, cric_subsets, cric_oversample, cric_seed = cric
  checks.hyperparameters(
    learning_rate=learning_rate,
    start_pruning_step=start_pruning_step,
    pruning_steps=pruning_steps,
    pruning_periods=pruning_periods,
    momentum=momentum,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    group_divisible=group_divisible,
  )
  budget = budgets.as_budget(target_group_sparsity, target)
  concrete = not any(isinstance(v, jax.core.Tracer) for v in (pruning_steps, pruning_periods))
  if concrete and int(np.asarray(pruning_steps)) < int(np.asarray(pruning_periods)) * (cric_cycles + 1):
    raise ValueError(
      f'pruning_steps ({pruning_steps}) must be at least pruning_periods ({pruning_periods})'
      + (f' × (cycles + 1) = {int(np.asarray(pruning_periods)) * (cric_cycles + 1)}' if cric_cycles else '')
      + ': every period needs one step or more'
      + (' after its corrective cycles.' if cric_cycles else '.')
    )
  if not (isinstance(cric_cycles, int) and cric_cycles >= 0):
    raise ValueError(f'cric_cycles must be a whole number >= 0, got {cric_cycles!r}.')
  if not (isinstance(cric_subsets, int) and cric_subsets >= 1):
    raise ValueError(f'cric_subsets must be a whole number >= 1, got {cric_subsets!r}.')
  if not cric_oversample >= 1.0:
    raise ValueError(f'cric_oversample must be >= 1 (candidates per ZIG removed), got {cric_oversample!r}.')
  weights = dict(DEFAULT_IMPORTANCE if importance_weights is None else importance_weights)
  unknown = set(weights) - set(CRITERIA)
  if unknown:
    raise ValueError(f'Unknown importance criteria {sorted(unknown)}; known: {CRITERIA}.')
  min_keep = jnp.maximum(1, group_divisible)
  _check_room(partition, budget, group_divisible)
  base = base_direction(
    variant, momentum=momentum, nesterov=nesterov, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
  )
  cost = budget.cost_per_zig(partition)
  n = partition.num_zigs

  def init_fn(params):
    checks.trainable_tree(partition, params, 'hesso')

    # A fresh array per field: a donated state must not hold the same buffer twice.
    def f0():
      return jnp.zeros([], jnp.float32)

    pruned, active = jnp.zeros((n,), bool), jnp.zeros((n,), bool)
    # Without corrective cycles, scalars (checkpointers refuse empty arrays).
    shape = (n,) if cric_cycles else ()
    score, trials = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)
    return HESSOState(
      jnp.zeros([], jnp.int32), base.init(params), pruned, active, f0(), f0(), f0(), score, trials
    )

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS)
    if cric_cycles and value_fn is None:
      raise ValueError(
        'hesso with corrective cycles (hesso_cric) probes the loss: pass value_fn, the loss as a function '
        'of the params on this batch: tx.update(grads, state, params, value_fn=lambda p: loss(p, batch)).'
      )
    d, inner = base.update(updates, state.inner, params, **extra_args)
    lr = value_at(learning_rate, state.count)
    seg = partition.segments(params)
    # The one reduction every step needs (for the norms in the state); the saliency's
    # reductions run only at period starts, inside `choose`.
    xx = seg.sums((params, params))[0]

    periods = jnp.asarray(pruning_periods, jnp.int32)
    length = jnp.asarray(pruning_steps, jnp.int32) // periods
    rel = state.count - start_pruning_step
    in_window = (rel >= 0) & (rel < periods * length)
    rel = jnp.maximum(rel, 0)
    period, t = rel // length, rel % length
    progress = (period + 1).astype(jnp.float32) / periods.astype(jnp.float32)

    def key_and_allowed(probed=None):
      xd, dd = seg.sums((params, d), (d, d))
      sal = saliency(jnp.stack([xx, xd, dd]), seg.sizes, ~state.pruned, weights)
      if probed is not None:
        # Corrective: the mean loss increase a ZIG's trials measured joins its saliency; ZIGs
        # no trial zeroed are not candidates and go last.
        candidates, mean = probed
        sal = jnp.where(candidates, sal + normalized(jnp.maximum(mean, 0.0), candidates), jnp.inf)
      key = sal / jnp.asarray(cost)
      allowed = ~state.pruned & budgets.eligible(partition, key, min_keep, first=state.pruned)
      return key, allowed

    def choose(key, allowed):
      removed = budgets.select(budget, partition, key, state.pruned, allowed, progress)
      if not (isinstance(group_divisible, int) and group_divisible == 1):
        removed = budgets.round_to_multiple(partition, removed, key, group_divisible) | state.pruned
      return removed & ~state.pruned

    score, trials = state.probe_score, state.probe_trials
    if cric_cycles and n:

      def probe():
        # A cycle: the ZIGs HESSO would take now, oversampled, in random subsets; each subset
        # zeroed in a copy of the params, its loss increase credited to its members.
        key, allowed = key_and_allowed()
        need = jnp.sum(choose(key, allowed))
        order = jnp.argsort(jnp.where(allowed, key, jnp.inf))
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        take = jnp.ceil(cric_oversample * need).astype(jnp.int32)
        candidates = allowed & (rank < take)
        shuffle = jax.random.permutation(jax.random.fold_in(jax.random.key(cric_seed), state.count), n)
        subset = shuffle % cric_subsets
        base_loss = value_fn(params)

        def trial(m):
          zero = candidates & (subset == m)
          trial_params = seg.map(
            lambda x, z: jnp.where(z, jnp.zeros((), x.dtype), x), params, values=[zero], fills=[False]
          )
          return value_fn(trial_params) - base_loss

        delta = jax.lax.map(trial, jnp.arange(cric_subsets))
        fresh = t == 0
        s0, n0 = jnp.where(fresh, 0.0, score), jnp.where(fresh, 0, trials)
        gained = jnp.where(candidates, delta[subset].astype(jnp.float32), 0.0)
        return s0 + gained, n0 + candidates.astype(jnp.int32)

      score, trials = jax.lax.cond(in_window & (t < cric_cycles), probe, lambda: (score, trials))

    def start():
      if not cric_cycles:
        return choose(*key_and_allowed())
      mean = score / jnp.maximum(trials, 1).astype(jnp.float32)
      return choose(*key_and_allowed((trials > 0, mean)))

    active = jax.lax.cond(in_window & (t == cric_cycles), start, lambda: state.active) if n else state.active
    # The decay runs over the period's steps after its corrective cycles.
    length, t = length - cric_cycles, t - cric_cycles
    decay = ((length - t - 1) / (length - t)).astype(jnp.float32)
    factor = jnp.where(state.pruned, 0.0, jnp.where(active & in_window, decay, 1.0))
    step = jax.tree.map(lambda u: -lr * u, d)
    # A pruned ZIG's update is -x exactly, whatever the step holds: 0 · (x + NaN) would be NaN.
    new = seg.map(
      lambda u, x, f: jnp.where(f == 1.0, u, jnp.where(f == 0.0, -x, (f * (x + u) - x).astype(u.dtype))),
      step,
      params,
      values=[factor],
      fills=[1.0],
    )
    done = in_window & (t == length - 1)
    pruned = state.pruned | (active & done)
    active = active & ~done
    redundant = pruned | active
    return new, HESSOState(
      count=optax.safe_increment(state.count),
      inner=inner,
      pruned=pruned,
      active=active,
      group_sparsity=fraction(factor == 0),
      important_norm=jnp.sqrt(jnp.sum(jnp.where(redundant, 0.0, xx))),
      redundant_norm=jnp.sqrt(jnp.sum(jnp.where(redundant, xx, 0.0))),
      probe_score=score,
      probe_trials=trials,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hesso_cric(
  partition: ZIGPartition,
  learning_rate: ScalarOrSchedule,
  *,
  cycles: int = 4,
  subsets: int = 4,
  oversample: float = 2.0,
  seed: int = 0,
  target_group_sparsity: Any = None,
  target: budgets.Budget | None = None,
  start_pruning_step: Any = 0,
  pruning_steps: Any,
  pruning_periods: Any = 1,
  variant: str | optax.GradientTransformation = 'sgd',
  momentum: Any = None,
  nesterov: bool = False,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  importance_weights: Mapping[str, float] | None = None,
  group_divisible: Any = 1,
) -> optax.GradientTransformationExtraArgs:
  """HESSO with corrective redundant identification cycles (HESSO-CRIC).

  Before each period commits its ZIGs, ``cycles`` steps probe the loss. At every such step the
  ``oversample × k`` not-yet-pruned ZIGs with the lowest saliency (``k``: the ZIGs the period
  removes) are split at random into ``subsets`` subsets; each subset is zeroed in a copy of
  the params (the params themselves are untouched: the reset is free) and the loss increase
  is credited to its members,

  .. math::
    \\Delta_S = f(x \\odot \\mathbb{1}_{\\bar S}) - f(x), \\qquad
    r_g = \\frac{1}{n_g} \\sum_{\\text{trials } S \\ni g} \\Delta_S .

  After the cycles the period takes the ``k`` candidates with the lowest saliency plus the
  normalised mean increase :math:`\\max(r_g, 0)` (per unit of cost under a FLOPs or parameter
  budget), and decays them to zero over the period's remaining steps, as :func:`hesso` does.
  ZIGs whose removal the saliency misjudged (small, but the loss needs them) are corrected
  before any of them has started to decay. Training steps go on during the cycles.

  ``update`` needs ``value_fn``: the loss as a function of the params, on the current batch::

    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, batch))

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    learning_rate: α, a float or an optax schedule.
    cycles: probing steps at the start of every period (``pruning_steps // pruning_periods``
      must exceed it).
    subsets: trial subsets per cycle (``subsets + 1`` loss evaluations per probing step).
    oversample: candidates per ZIG the period removes (≥ 1).
    seed: seed of the random split into subsets.
    target_group_sparsity, target, start_pruning_step, pruning_steps, pruning_periods, variant,
      momentum, nesterov, b1, b2, eps, weight_decay, importance_weights, group_divisible: as
      for :func:`hesso` (listed, not ``**kwargs``, so that ``optax.inject_hyperparams`` sees them).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`HESSOState`.

  Example::

    tx = oto_jax.hesso_cric(part, 1e-3, target=oto_jax.flops_budget(0.1), start_pruning_step=500,
                            pruning_steps=2000, pruning_periods=4, variant='adamw')

  References:
    Chen et al., *HESSO: Towards Automatic Efficient and User Friendly Any Neural Network
    Training and Pruning*, arXiv 2409.09085 (the corrective redundant identification cycle).
  """
  hesso_args = {k: v for k, v in locals().items() if k not in ('cycles', 'subsets', 'oversample', 'seed')}
  settings = []
  for name, v in (('cycles', cycles), ('subsets', subsets), ('oversample', oversample), ('seed', seed)):
    if isinstance(v, jax.core.Tracer):
      raise ValueError(
        f'hesso_cric: {name} shapes the state, so it cannot be traced; with optax.inject_hyperparams '
        "pass static_args=('cycles', 'subsets', 'oversample', 'seed')."
      )
    settings.append(float(np.asarray(v)) if name == 'oversample' else np.asarray(v).item())
  return _hesso(Corrective(*settings), **hesso_args)


def _check_room(partition: ZIGPartition, budget: budgets.Budget, group_divisible: Any) -> None:
  """A ZIG-count target must leave every node group its minimum width."""
  if budget.kind != 'zigs' or isinstance(group_divisible, jax.core.Tracer):
    return
  if isinstance(budget.fraction, jax.core.Tracer):
    return
  keep = max(1, int(np.asarray(group_divisible)))
  room = sum(max(0, g.size - keep) for g in partition.prunable_groups)
  want = budgets.num_removed(budget, partition.num_zigs)
  if want > room:
    raise ValueError(
      f'target_group_sparsity={budget.fraction} asks for {want} of {partition.num_zigs} ZIGs, but '
      f'only {room} can go while every node group keeps {keep} (group_divisible={group_divisible}). '
      'Lower the target.'
    )
