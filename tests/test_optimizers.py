"""Tests of the OTO optimizers: HSPG, Prox-SG, DHSPG, HESSO and their optax blocks.

Three kinds of checks:

1. A convex group-lasso problem whose solution is known (least squares over the columns of a
   matrix, some of which are zero in the data-generating matrix): every optimizer must find
   exactly the zero columns, and HSPG must be sparser than Prox-SG under stochastic gradients
   at an objective as good (the central claim of the OTO paper).
2. Small zoo networks (a CNN, a ViT, an NNX model) trained for ~100 jitted steps: sparsity
   rises, zero groups stay zero, the loss falls, and HESSO meets its targets exactly.
3. Engineering: the documented chains, ``inject_hyperparams``, schedules, no retracing,
   donation, states, and argument validation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import oto_jax
from tests import arch
from tests.zoo import models


def _fast_jit(fn):
  """``jax.jit`` with XLA's cheap CPU backend passes: these tests check values, not speed.

  The training runs below are each compiled once and run a few hundred tiny steps, so the
  compile is nearly all of their cost; LLVM's expensive passes would double it.
  """
  if jax.default_backend() != 'cpu':
    return jax.jit(fn)
  return jax.jit(
    fn, compiler_options={'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  )


# ---------------------------------------------------------------------------------------------
# 1. A convex group-lasso problem with a known sparse solution.
#
#   min_W  f(W) + λ Σ_j ‖W[:, j]‖,   f(W) = 1/(2n) ‖X W F − Y‖²,   Y = X W* F + σ noise
#
# F is a fixed orthogonal matrix in a non-trainable collection: the model is linear in W, the
# columns of W are the ZIGs (F's rows are their dependents), and with F orthogonal the problem
# is multi-output least squares, strongly convex since X has full column rank. Half of the
# columns of W* are zero. With σ = 1 and n = 512 the least-squares estimate of a zero column
# has norm ≈ σ √(d/n) ≈ 0.14, well below λ = 0.3, and a non-zero column has norm ≈ √d ≈ 3:
# the group-lasso solution's zero columns are exactly the true ones.

D_IN, COLS, ZERO_COLS, N_SAMPLES, SIGMA, LAMBDA = 10, 16, 8, 512, 1.0, 0.3


def _linear_apply(variables, x):
  return x @ variables['params']['w'] @ variables['consts']['f']


@functools.cache
def _linear_partition() -> oto_jax.ZIGPartition:
  shapes = {
    'params': {'w': jax.ShapeDtypeStruct((D_IN, COLS), jnp.float32)},
    'consts': {'f': jax.ShapeDtypeStruct((COLS, COLS), jnp.float32)},
  }
  x = jax.ShapeDtypeStruct((N_SAMPLES, D_IN), jnp.float32)
  return oto_jax.zig_partition(_linear_apply, shapes, x)


SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Convex:
  """Problem data for the seeds in ``SEEDS``, stacked on a leading axis."""

  x: jax.Array
  y: jax.Array
  f: jax.Array
  w0: jax.Array
  zero_cols: np.ndarray  # [seeds, ZERO_COLS]: the zero columns of W* (= their ZIG ids)


@functools.cache
def _convex() -> Convex:
  xs, ys, fs, w0s, zeros = [], [], [], [], []
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    f = np.linalg.qr(rng.standard_normal((COLS, COLS)))[0]
    w_star = rng.standard_normal((D_IN, COLS))
    zero_cols = np.sort(rng.choice(COLS, ZERO_COLS, replace=False))
    w_star[:, zero_cols] = 0.0
    x = rng.standard_normal((N_SAMPLES, D_IN))
    ys.append(x @ w_star @ f + SIGMA * rng.standard_normal((N_SAMPLES, COLS)))
    xs.append(x)
    fs.append(f)
    w0s.append(0.1 * rng.standard_normal((D_IN, COLS)))
    zeros.append(zero_cols)
  as32 = lambda a: jnp.asarray(np.stack(a), jnp.float32)
  return Convex(as32(xs), as32(ys), as32(fs), as32(w0s), np.stack(zeros))


def _f(params, f, x, y):
  r = _linear_apply({'params': params, 'consts': {'f': f}}, x) - y
  return 0.5 * jnp.mean(jnp.sum(r * r, axis=-1))


def _objective(k: int, w) -> float:
  """f + λ Σ_g ‖x_g‖ of seed ``k``'s problem, on all samples, in float64."""
  prob = _convex()
  x, y, f = (np.asarray(a[k], np.float64) for a in (prob.x, prob.y, prob.f))
  w = np.asarray(w, np.float64)
  r = x @ w @ f - y
  return float(0.5 * np.mean(np.sum(r * r, -1)) + LAMBDA * np.sum(np.linalg.norm(w, axis=0)))


def _batches(steps: int, batch: int | None) -> np.ndarray:
  """Sample indices per seed and step: all samples, or fixed-seed minibatches."""
  if batch is None:
    return np.broadcast_to(np.arange(N_SAMPLES), (len(SEEDS), steps, N_SAMPLES))
  out = []
  for seed in SEEDS:
    rng = np.random.default_rng(100 + seed)
    out.append([rng.choice(N_SAMPLES, batch, replace=False) for _ in range(steps)])
  return np.asarray(out)


def _run_convex(tx, steps: int, batch: int | None = None):
  """Trains W from ``w0`` on every seed at once (one compile).

  Returns:
    The final params ``{'w': [seeds, D_IN, COLS]}``, the final states and the ZIG norms after
    every step, ``[seeds, steps, COLS]``.
  """
  part, prob = _linear_partition(), _convex()

  def train(w0, f, x, y, idx):
    def body(carry, i):
      p, s = carry
      g = jax.grad(_f)(p, f, x[i], y[i])
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), part.zig_norms(p)

    params = {'w': w0}
    (p, s), norms = jax.lax.scan(body, (params, tx.init(params)), idx)
    return p, s, norms

  run = _fast_jit(jax.vmap(train))
  return run(prob.w0, prob.f, prob.x, prob.y, jnp.asarray(_batches(steps, batch)))


def _zero_ids(w) -> np.ndarray:
  return np.nonzero(np.all(np.asarray(w) == 0, axis=0))[0]


def _restricted_lstsq(k: int, support: np.ndarray) -> np.ndarray:
  """argmin_W f(W) with the columns outside ``support`` zero (F orthogonal: use F's rows)."""
  prob = _convex()
  x, y, f = (np.asarray(a[k], np.float64) for a in (prob.x, prob.y, prob.f))
  w = np.zeros((D_IN, COLS))
  w[:, support] = np.linalg.lstsq(x, y @ f[support].T, rcond=None)[0]
  return w


@functools.cache
def _group_lasso_solution() -> np.ndarray:
  """The group-lasso minimisers, ``[seeds, D_IN, COLS]``, by full-batch proximal gradient.

  With step 0.5 and XᵀX/n's eigenvalues in ≈ [0.7, 1.4] it converges linearly: 300 steps
  reach float32 precision.
  """
  params, _, _ = _run_convex(oto_jax.prox_sg(_linear_partition(), 0.5, LAMBDA), 300)
  return np.asarray(params['w'])


def test_linear_partition_has_one_zig_per_column():
  """The columns of W are the ZIGs, F's rows their dependents, X and the output unprunable."""
  part = _linear_partition()
  assert part.num_zigs == COLS, part.summary()
  (group,) = part.prunable_groups
  assert [(e.path, e.axis) for e in group.members] == [(('params', 'w'), 1)]
  assert [(e.path, e.axis) for e in group.dependents] == [(('consts', 'f'), 0)]
  assert part.trainable_paths == frozenset({('params', 'w')})
  # The group-lasso solution really is sparse on exactly the true zero columns (this is what
  # the recovery tests below rely on).
  sol, prob = _group_lasso_solution(), _convex()
  for k in range(len(SEEDS)):
    np.testing.assert_array_equal(_zero_ids(sol[k]), prob.zero_cols[k])


# Full batch, step 0.5; 200 steps. HESSO removes half the columns during steps 50-99.
# momentum=0.0 (plain SGD) because the default momentum=None fails: see
# test_sgd_variant_without_momentum.
FULL_BATCH = {
  'hspg': lambda part: oto_jax.hspg(part, 0.5, lmbda=LAMBDA, n_p=100),
  'hspg_prox': lambda part: oto_jax.hspg(part, 0.5, lmbda=LAMBDA, n_p=100, stage1='prox'),
  'prox_sg': lambda part: oto_jax.prox_sg(part, 0.5, LAMBDA),
  'hesso': lambda part: oto_jax.hesso(
    part,
    0.5,
    target_group_sparsity=ZERO_COLS / COLS,
    start_pruning_step=50,
    pruning_steps=50,
    pruning_periods=2,
    momentum=0.0,
  ),
}


@pytest.mark.parametrize('name', sorted(FULL_BATCH))
def test_convex_full_batch_recovers_the_true_zero_groups(name: str):
  """Full-batch training zeroes exactly the zero columns of W*; HSPG/Prox-SG reach the optimum."""
  prob = _convex()
  params, _, norms = _run_convex(FULL_BATCH[name](_linear_partition()), 200)
  for k in range(len(SEEDS)):
    w = params['w'][k]
    np.testing.assert_array_equal(_zero_ids(w), prob.zero_cols[k])
    if name == 'hesso':
      # Pruned columns are exactly zero; the kept ones, trained by plain GD, reach the least
      # squares solution restricted to the true support.
      support = np.setdiff1d(np.arange(COLS), prob.zero_cols[k])
      np.testing.assert_allclose(w, _restricted_lstsq(k, support), atol=1e-4)
    else:
      np.testing.assert_allclose(w, _group_lasso_solution()[k], atol=1e-4)
  # Zero groups stay zero once they are (guaranteed by all but Prox-SG; here, with exact
  # gradients, Prox-SG keeps them too).
  zero = np.asarray(norms) == 0
  assert np.all(zero[:, 1:] >= zero[:, :-1])


def test_convex_dhspg_recovers_the_true_zero_groups_with_minibatches():
  """DHSPG with the true sparsity as target picks the zero columns as redundant and zeroes them."""
  prob, part = _convex(), _linear_partition()
  # DHSPG is a stochastic method: its λ_g is capped so that d + λ_g x/‖x‖ stays a descent
  # direction, so with exact gradients a redundant group can stall where ∇f_g opposes x_g;
  # minibatch noise moves it on. The redundant set is chosen after 10 warm-up steps, when the
  # true zero columns are both small and shrinking (cos(-x, -∇f) high).
  tx = oto_jax.dhspg(
    part, 0.1, target_group_sparsity=ZERO_COLS / COLS, start_pruning_step=10, momentum=0.0, lmbda=LAMBDA
  )
  params, state, norms = _run_convex(tx, 400, batch=16)
  zero = np.asarray(norms) == 0
  assert not zero[:, :10].any() and np.all(zero[:, 11:] >= zero[:, 10:-1])
  for k in range(len(SEEDS)):
    np.testing.assert_array_equal(np.nonzero(np.asarray(state.redundant[k]))[0], prob.zero_cols[k])
    np.testing.assert_array_equal(_zero_ids(params['w'][k]), prob.zero_cols[k])
    # The important columns take plain SGD steps: step 0.1 and batches of 16 leave them within
    # the SGD noise of the least-squares fit on the true support (6-7% relative error over
    # four seeds; a column left untrained or wrongly decayed would be off by 30% or more).
    fit = _restricted_lstsq(k, np.setdiff1d(np.arange(COLS), prob.zero_cols[k]))
    assert np.linalg.norm(params['w'][k] - fit) <= 0.12 * np.linalg.norm(fit)


def test_hspg_is_sparser_than_prox_sg_at_the_same_objective():
  """With minibatch gradients HSPG finds every zero group, Prox-SG none, at an objective as good."""
  prob, part = _convex(), _linear_partition()
  # Batches of 16: a zero column's stochastic gradient has norm ≈ σ √(d/16) ≈ 0.8 > λ, so the
  # prox step x ← max(0, 1 − αλ/‖z‖) z, z = −α g, rarely lands on zero; the half-space step,
  # which only asks the step to cross the hyperplane orthogonal to x_g, does.
  steps, lr = 400, 0.1
  hspg, _, hspg_norms = _run_convex(oto_jax.hspg(part, lr, lmbda=LAMBDA, n_p=steps // 2), steps, batch=16)
  prox, _, _ = _run_convex(oto_jax.prox_sg(part, lr, LAMBDA), steps, batch=16)
  # Stage 1 (no projection) makes no zeros; stage 2 only adds them.
  zero = np.asarray(hspg_norms) == 0
  assert not zero[:, : steps // 2].any()
  assert np.all(zero[:, steps // 2 + 1 :] >= zero[:, steps // 2 : -1])
  for k in range(len(SEEDS)):
    hspg_zero, prox_zero = _zero_ids(hspg['w'][k]), _zero_ids(prox['w'][k])
    np.testing.assert_array_equal(hspg_zero, prob.zero_cols[k])
    assert len(prox_zero) < len(hspg_zero), (prox_zero, hspg_zero)
    # Same objective: HSPG's final F is no worse than Prox-SG's (it is ~1% better: measured
    # 15.73 vs 15.92 on seed 0) and within the SGD noise floor (2%; measured ≈ 1.0-1.4%) of
    # the group-lasso optimum.
    f_hspg, f_prox = _objective(k, hspg['w'][k]), _objective(k, prox['w'][k])
    f_opt = _objective(k, _group_lasso_solution()[k])
    assert f_hspg <= 1.01 * f_prox, (f_hspg, f_prox)
    assert f_opt <= f_hspg <= 1.02 * f_opt, (f_hspg, f_opt)


# ---------------------------------------------------------------------------------------------
# 2. The documented chains, and the blocks on another base optimizer.


def _chain_params(tx, steps: int = 40):
  """Full-batch training on the convex problems: ``(final W [seeds, ...], norms)``."""
  params, _, norms = _run_convex(tx, steps)
  return params['w'], np.asarray(norms)


@pytest.mark.parametrize('stage1', ['subgradient', 'prox'])
def test_hspg_is_the_documented_chain(stage1: str):
  """``hspg(...)`` gives the same iterates as its chain of blocks written by hand."""
  part, lr, n_p = _linear_partition(), 0.05, 20
  # Momentum 0.5, not 0.9: the group-lasso term enters after the momentum trace, so heavy
  # momentum (≈ 10× the gradient) would hold the zero columns at ‖w_ls‖ − λ/10 > 0.
  kw = dict(lmbda=LAMBDA, n_p=n_p, momentum=0.5, nesterov=True, weight_decay=1e-3, stage1=stage1)
  prox = stage1 == 'prox'
  by_hand = optax.chain(
    optax.add_decayed_weights(1e-3),
    optax.trace(decay=0.5, nesterov=True),
    oto_jax.add_group_lasso(part, LAMBDA, start_step=n_p if prox else 0),
    optax.scale_by_learning_rate(lr),
    *([oto_jax.group_lasso_prox(part, LAMBDA, lr, end_step=n_p)] if prox else []),
    oto_jax.half_space_projection(part, 0.0, start_step=n_p),
  )
  got, norms = _chain_params(oto_jax.hspg(part, lr, **kw))
  want, _ = _chain_params(by_hand)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # Not a vacuous comparison: both stages ran, and the second one zeroed groups.
  zero = norms == 0
  assert zero[:, -1].sum() > 0
  if not prox:
    assert not zero[:, :n_p].any()


def test_prox_sg_is_the_documented_chain():
  """``prox_sg(...)`` gives the same iterates as trace + scale_by_learning_rate + group_lasso_prox."""
  part = _linear_partition()
  got, norms = _chain_params(oto_jax.prox_sg(part, 0.05, LAMBDA, momentum=0.5))
  want, _ = _chain_params(
    optax.chain(
      optax.trace(decay=0.5), optax.scale_by_learning_rate(0.05), oto_jax.group_lasso_prox(part, LAMBDA, 0.05)
    )
  )
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert (norms[:, -1] == 0).sum() > 0


def test_blocks_compose_with_adam():
  """Adam + add_group_lasso + half_space_projection zeroes exactly the true zero columns."""
  part, prob = _linear_partition(), _convex()
  n_p = 100
  tx = optax.chain(
    optax.scale_by_adam(),
    oto_jax.add_group_lasso(part, 1.0),  # Adam's direction is ~1 per entry: λ on that scale
    optax.scale_by_learning_rate(0.03),
    oto_jax.half_space_projection(part, 0.0, start_step=n_p),
  )
  params, state, norms = _run_convex(tx, 300, batch=16)
  zero = np.asarray(norms) == 0
  assert not zero[:, :n_p].any() and np.all(zero[:, n_p + 1 :] >= zero[:, n_p:-1])
  for k in range(len(SEEDS)):
    np.testing.assert_array_equal(_zero_ids(params['w'][k]), prob.zero_cols[k])
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, 'group_sparsity'), ZERO_COLS / COLS)


# ---------------------------------------------------------------------------------------------
# 3. Zoo networks: a CNN and a ViT, trained on a fixed random regression target.


def _vit1():
  # The zoo's ViT with one layer instead of two: the same blocks (patch conv, class token,
  # pre-norm attention with 4 heads, GELU MLP of 64), half the compile time.
  return models.case('linen', 'vit1', models.vit(layers=1), (models.images(8, 16),), 68, [4, 64])


@functools.cache
def _zoo(name: str):
  """(case, partition, regression target) for a linen zoo case."""
  case = _vit1() if name == 'linen/vit1' else models.CASES[name]()
  part = oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)
  assert part.num_zigs == case.num_zigs, part.summary()
  out = case.apply_fn(case.variables, *case.args, **case.kwargs)
  target = jnp.asarray(np.random.default_rng(0).standard_normal(out.shape), jnp.float32)
  return case, part, target


def _train_zoo(name: str, tx, steps: int, *, probe: bool = False):
  """Trains the ``params`` collection only (other collections are fixed inputs); ``probe``
  hands the optimizer the loss (``value_fn``, for HESSO-CRIC).

  Returns:
    ``(params, state, losses [steps], norms [steps, N], state sparsity [steps])``, the norms
    and sparsity taken after each step.
  """
  case, part, target = _zoo(name)

  def loss(params, variables):
    out = case.apply_fn({**variables, 'params': params}, *case.args, **case.kwargs)
    return jnp.mean(jnp.square(out - target))

  @_fast_jit
  def train(variables):
    def body(carry, _):
      p, s = carry
      value, g = jax.value_and_grad(loss)(p, variables)
      extra = {'value_fn': lambda q: loss(q, variables)} if probe else {}
      u, s = tx.update(g, s, p, **extra)
      p = optax.apply_updates(p, u)
      return (p, s), (value, part.zig_norms(p), optax.tree_utils.tree_get(s, 'group_sparsity'))

    params = variables['params']
    (p, s), hist = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p, s, *hist

  params, state, losses, norms, sparsity = train(case.variables)
  return params, state, np.asarray(losses), np.asarray(norms), np.asarray(sparsity)


def _kept_per_group(part: oto_jax.ZIGPartition, keep: np.ndarray) -> list[tuple[int, int]]:
  """(kept, size) of every prunable node group."""
  return [(int(keep[g.zig_ids].sum()), g.size) for g in part.prunable_groups]


def _assert_trained(losses, norms, sparsity, start: int):
  """The loss falls, zero ZIGs stay zero from ``start`` on, the state's sparsity is the real one."""
  assert losses[-5:].mean() < 0.5 * losses[:5].mean(), (losses[:5], losses[-5:])
  zero = norms == 0
  assert np.all(zero[start + 1 :] >= zero[start:-1]), 'a zero ZIG came back to life'
  assert zero[-1].sum() > 0
  np.testing.assert_allclose(sparsity, zero.mean(axis=1), atol=1e-6)


ZOO_OPTIMIZERS = {
  # name: (factory, steps, first step from which zero ZIGs must stay zero)
  'hspg': (lambda part: oto_jax.hspg(part, 0.05, lmbda=0.5, n_p=30, momentum=0.9), 150, 30),
  'dhspg': (
    lambda part: oto_jax.dhspg(
      part, 0.1, target_group_sparsity=0.5, start_pruning_step=20, momentum=0.0, lmbda=1.0
    ),
    150,
    20,
  ),
}


# DHSPG's update is the costliest to compile (its redundant-set choice sits in a lax.cond):
# on the ViT it would add the most time of any test, so it runs on the CNN only (and on the
# convex problem above); HESSO and HSPG run on both.
@pytest.mark.parametrize(
  'name,opt',
  [('linen/conv_flatten_dense', 'hspg'), ('linen/conv_flatten_dense', 'dhspg'), ('linen/vit1', 'hspg')],
)
def test_zoo_hspg_and_dhspg_train_sparse(name: str, opt: str):
  """HSPG/DHSPG on a zoo CNN and ViT: the loss falls, sparsity rises, zero ZIGs stay zero."""
  _, part, _ = _zoo(name)
  make, steps, start = ZOO_OPTIMIZERS[opt]
  _, state, losses, norms, sparsity = _train_zoo(name, make(part), steps)
  _assert_trained(losses, norms, sparsity, start)
  zero = norms == 0
  assert not zero[:start].any()
  n = part.num_zigs
  if opt == 'hspg':
    # λ = 0.5 on a two-sample regression: most ZIGs are not needed (measured: 51/56, 64/68).
    assert zero[-1].sum() >= n // 2, zero[-1].sum()
  else:
    # Exactly the ⌊0.5 N⌋ redundant ZIGs are driven to zero (all of them by step ~60 of 150).
    redundant = np.asarray(state.redundant)
    assert redundant.sum() == n // 2
    np.testing.assert_array_equal(zero[-1], redundant)


def _hesso(part, **kw):
  kw = {'start_pruning_step': 20, 'pruning_steps': 40, 'pruning_periods': 4, 'momentum': 0.9, **kw}
  return oto_jax.hesso(part, 0.05, **kw)


# On the ViT (heads and MLP units); the CNN runs HESSO with cost budgets below.
@pytest.mark.parametrize('name', ['linen/vit1'])
def test_zoo_hesso_reaches_the_exact_target(name: str):
  """HESSO zeroes exactly ⌊p/P · K⌋ ZIGs at each period end, K after, and keeps every group alive."""
  _, part, _ = _zoo(name)
  n = part.num_zigs
  k = n // 2
  params, state, losses, norms, sparsity = _train_zoo(name, _hesso(part, target_group_sparsity=0.5), 100)
  _assert_trained(losses, norms, sparsity, 0)
  count = (norms == 0).sum(axis=1)
  assert not count[:29].any()  # the first period (steps 20-29) decays, zeroes at its last step
  # Periods of 10 steps from step 20: period p's last step leaves ⌊(p+1)/4 · K⌋ ZIGs at zero.
  for p in range(4):
    end = 20 + 10 * (p + 1) - 1
    assert count[end] == (p + 1) * k // 4, (p, count[end])
    assert np.all(count[end : end + 10] == count[end])
  assert np.all(count[59:] == k)
  keep = norms[-1] > 0
  assert all(kept >= 1 for kept, _ in _kept_per_group(part, keep)), _kept_per_group(part, keep)
  np.testing.assert_array_equal(np.asarray(state.pruned), ~keep)
  assert not np.asarray(state.active).any()
  np.testing.assert_allclose(oto_jax.group_sparsity(part, params), k / n)


def test_zoo_hesso_cric_reaches_the_exact_target():
  """HESSO-CRIC probes for 3 steps at each period start, then decays over the 7 left: exactly
  ⌊p/P · K⌋ ZIGs zero at each period end, K after; every trial's bookkeeping adds up."""
  name = 'linen/vit1'
  _, part, _ = _zoo(name)
  k = part.num_zigs // 2
  tx = oto_jax.hesso_cric(
    part,
    0.05,
    cycles=3,
    subsets=3,
    target_group_sparsity=0.5,
    start_pruning_step=20,
    pruning_steps=40,
    pruning_periods=4,
    momentum=0.9,
  )
  params, state, losses, norms, sparsity = _train_zoo(name, tx, 80, probe=True)
  _assert_trained(losses, norms, sparsity, 0)
  count = (norms == 0).sum(axis=1)
  for p in range(4):
    end = 20 + 10 * (p + 1) - 1
    assert count[end] == (p + 1) * k // 4, (p, count[end])
  assert np.all(count[59:] == k)
  np.testing.assert_array_equal(np.asarray(state.pruned), norms[-1] == 0)
  # The last period's 3 cycles each zeroed ⌈2 · its k/4⌉ candidates (fewer than n are left).
  trials = np.asarray(state.probe_trials)
  assert trials.max() <= 3 and trials.sum() == 3 * int(np.ceil(2.0 * (k - 3 * k // 4))), trials
  with pytest.raises(ValueError, match='pass value_fn'):
    tx.update(params, tx.init(params), params)


def test_cric_corrects_a_misjudged_saliency():
  """Two columns whose weights are small but whose outputs a fixed ×10 amplifies: HESSO's
  magnitude saliency removes them (the loss rises), HESSO-CRIC's probes keep them and remove
  the two weakly used columns instead."""
  rng = np.random.default_rng(0)
  d, cols = 8, 8
  scale = np.ones(cols, np.float32)
  scale[:2] = 10.0
  w_star = rng.standard_normal((d, cols)).astype(np.float32)
  w_star[:, :2] *= 0.1  # outputs ~1 after the ×10
  w_star[:, 6:] *= 0.3  # outputs ~0.3: the ones to remove
  x = rng.standard_normal((256, d)).astype(np.float32)
  y = x @ w_star * scale

  def apply(v, x):  # a fixed identity read-out, so that the columns are not the model's output
    return (x @ v['params']['w']) * v['consts']['scale'] @ v['consts']['out']

  consts = {'scale': jnp.asarray(scale), 'out': jnp.eye(cols)}
  variables = {'params': {'w': jnp.zeros((d, cols))}, 'consts': consts}
  part = oto_jax.zig_partition(apply, variables, x[:2])
  assert part.num_zigs == cols

  def loss(p):
    return jnp.mean(jnp.square(apply({**variables, 'params': p}, x) - y))

  common = dict(target_group_sparsity=0.25, start_pruning_step=150, pruning_steps=20, momentum=0.0)
  only_magnitude = {'magnitude': 1.0}
  results = {}
  for label, tx in (
    ('hesso', oto_jax.hesso(part, 0.05, importance_weights=only_magnitude, **common)),
    (
      'cric',
      oto_jax.hesso_cric(part, 0.05, cycles=2, subsets=cols, importance_weights=only_magnitude, **common),
    ),
  ):

    @_fast_jit
    def train(p, tx=tx):
      def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p, value_fn=loss)
        return (optax.apply_updates(p, u), s), None

      (p, s), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=300)
      return p, s

    p, s = train(variables['params'])
    results[label] = (np.flatnonzero(np.asarray(s.pruned)).tolist(), float(loss(p)))
  assert results['hesso'][0] == [0, 1], results
  assert results['cric'][0] == [6, 7], results
  assert results['cric'][1] < 0.5 * results['hesso'][1], results


def _restore_gain(model: oto_jax.CostModel, keep: np.ndarray) -> float:
  """The largest cost increase from putting back one removed ZIG."""
  base = model.evaluate(keep)
  return max(model.evaluate(keep | (np.arange(len(keep)) == j)) - base for j in np.nonzero(~keep)[0])


@pytest.mark.parametrize('kind', ['flops', 'params'])
def test_zoo_hesso_meets_a_cost_budget(kind: str):
  """HESSO with a FLOPs/params budget keeps at most 30% of the cost, and no ZIG more than needed."""
  name = 'linen/conv_flatten_dense'
  _, part, _ = _zoo(name)
  budget = oto_jax.flops_budget(0.3) if kind == 'flops' else oto_jax.params_budget(0.3)
  model = part.flops if kind == 'flops' else part.params
  params, _, losses, norms, sparsity = _train_zoo(name, _hesso(part, target=budget), 80)
  _assert_trained(losses, norms, sparsity, 0)
  keep = norms[-1] > 0
  np.testing.assert_array_equal(norms[59:] > 0, np.broadcast_to(keep, norms[59:].shape))
  cost, limit = model.evaluate(keep), 0.3 * model.total
  assert cost <= limit, (cost, limit)
  # Minimal removal: the last period removes the shortest prefix of its order that meets the
  # budget, so putting one of its ZIGs back exceeds it. (Each ZIG is a few percent of the
  # total here, so this is far tighter than a fixed margin.)
  assert cost + _restore_gain(model, keep) > limit, (cost, _restore_gain(model, keep), limit)
  assert limit - cost < np.max(model.per_zig) * 2
  assert all(kept >= 1 for kept, _ in _kept_per_group(part, keep))


def test_zoo_hesso_group_divisible_over_periods():
  """group_divisible=4 over 4 periods: every node group keeps a multiple of 4 ZIGs (at least 4)."""
  name = 'linen/conv_flatten_dense'
  _, part, _ = _zoo(name)
  assert sorted(g.size for g in part.prunable_groups) == [8, 16, 32]
  _, state, losses, norms, sparsity = _train_zoo(
    name, _hesso(part, target_group_sparsity=0.6, group_divisible=4), 80
  )
  _assert_trained(losses, norms, sparsity, 0)
  keep = norms[-1] > 0
  np.testing.assert_array_equal(np.asarray(state.pruned), ~keep)
  kept = _kept_per_group(part, keep)
  assert all(k % 4 == 0 and 4 <= k <= size for k, size in kept), kept
  # Rounded to the nearest multiple per group: within 2 ZIGs per group of ⌊0.6 · 56⌋ = 33.
  assert abs(int((~keep).sum()) - 33) <= 2 * len(kept), kept


def test_hesso_group_divisible_single_period():
  """group_divisible=4 in one period: ⌊0.6 · 16⌋ = 9 asked, rounded to keep 8 of the 16 columns."""
  part = _linear_partition()
  tx = oto_jax.hesso(
    part,
    0.5,
    target_group_sparsity=0.6,
    start_pruning_step=5,
    pruning_steps=10,
    group_divisible=4,
    momentum=0.0,
  )
  params, state, norms = _run_convex(tx, 30)
  zero = np.asarray(norms) == 0
  assert not zero[:, :14].any()
  assert np.all(zero[:, 14:].sum(axis=-1) == 8)
  np.testing.assert_array_equal(np.asarray(state.pruned), zero[:, -1])
  # The 9 lowest-saliency columns are the 8 true zero columns (shrunk by GD to ‖w_ls‖ ≈ 0.14
  # by step 5, against ≈ 3 for the others) and one more; 8 of those 9 go.
  for k in range(len(SEEDS)):
    assert len(np.intersect1d(_zero_ids(params['w'][k]), _convex().zero_cols[k])) >= 7


def test_round_to_multiple_keeps_the_highest_keys():
  """round_to_multiple drops the lowest keys first when rounding a group's kept width up."""
  part = _linear_partition()  # one node group of 16 ZIGs
  key = jnp.arange(16, 0, -1).astype(jnp.float32)  # ZIG j has key 16 - j: ZIG 15 is the lowest
  removed = key <= 9  # the 9 lowest keys: ZIGs 7..15, keeping 7
  out = oto_jax.budgets.round_to_multiple(part, removed, key, 4)
  # Kept 7 rounds to 8: of the 9 removed, the one with the highest key (ZIG 7) is kept.
  np.testing.assert_array_equal(np.nonzero(np.asarray(out))[0], np.arange(8, 16))


# ---------------------------------------------------------------------------------------------
# 4. Flax NNX: the optimizer inside nnx.Optimizer, on nnx.state(model, nnx.Param).


class NNXNet(nnx.Module):
  """conv → BatchNorm (eval) → relu → spatial mean → Linear(16) → relu → Linear(4)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.fc2(nnx.relu(self.fc1(x.mean(axis=(1, 2)))))


def test_nnx_optimizer_with_hesso_reaches_the_exact_target():
  """nnx.Optimizer(model, hesso(...), wrt=nnx.Param): exactly ⌊0.5 · 24⌋ ZIGs zero, BN stats untouched."""
  # Shapes only from the constructor (eager initialisers compile once per shape), values from
  # tests.arch's numpy draws; eval mode: BatchNorm reads its running statistics.
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0))))
  model = nnx.merge(graphdef, arch.randomize(shapes, 'nnx'))
  model.eval()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
  graphdef, state = nnx.split(model)
  part = oto_jax.zig_partition(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert part.num_zigs == 24 and sorted(g.size for g in part.prunable_groups) == [8, 16], part.summary()
  tx = oto_jax.hesso(
    part,
    0.05,
    target_group_sparsity=0.5,
    start_pruning_step=10,
    pruning_steps=20,
    pruning_periods=2,
    momentum=0.9,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  stats = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
    optimizer.update(model, grads)
    return loss, part.zig_norms(nnx.state(model, nnx.Param))

  losses, counts = [], []
  for _ in range(50):
    loss, norms = step(model, optimizer)
    losses.append(float(loss))
    counts.append(int((norms == 0).sum()))
  # Two periods of 10 steps from step 10: 6 ZIGs zero after step 19, 12 after step 29, held.
  assert counts[:19] == [0] * 19 and counts[19:29] == [6] * 10 and counts[29:] == [12] * 21, counts
  assert losses[-1] < 0.5 * losses[0], losses
  keep = np.asarray(part.zig_norms(nnx.state(model, nnx.Param))) > 0
  assert all(k >= 1 for k, _ in _kept_per_group(part, keep))
  np.testing.assert_allclose(optax.tree_utils.tree_get(optimizer.opt_state, 'group_sparsity'), 0.5)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)), stats)


# ---------------------------------------------------------------------------------------------
# 5. Engineering: jit without retracing, inject_hyperparams, donation, states, purity.


def _one_problem():
  """Seed 0's convex problem: (params, grad_fn)."""
  prob = _convex()
  grad_fn = jax.grad(functools.partial(_f, f=prob.f[0], x=prob.x[0], y=prob.y[0]))
  return {'w': prob.w0[0]}, grad_fn


def _stepper(tx, grad_fn):
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  return step


def _hesso_small(part, lr=0.1, **kw):
  kw = {'target_group_sparsity': 0.5, 'start_pruning_step': 3, 'pruning_steps': 6, 'pruning_periods': 3, **kw}
  return oto_jax.hesso(part, lr, momentum=0.9, **kw)


SMALL = {
  'hspg': lambda part: oto_jax.hspg(part, 0.1, lmbda=LAMBDA, n_p=4, momentum=0.5),
  'hspg_prox': lambda part: oto_jax.hspg(part, 0.1, lmbda=LAMBDA, n_p=4, stage1='prox'),
  'prox_sg': lambda part: oto_jax.prox_sg(part, 0.1, LAMBDA),
  'dhspg': lambda part: oto_jax.dhspg(
    part, 0.1, target_group_sparsity=0.5, start_pruning_step=3, lmbda=1.0, momentum=0.0
  ),
  'hesso': _hesso_small,
}
SMALL_STEPS = 16


@functools.cache
def _small(name: str):
  """(tx, jitted step, [(params, state) after each of SMALL_STEPS steps]) on seed 0's problem.

  The step is wrapped in ``chex.assert_max_traces(n=1)``: a retrace anywhere raises.
  """
  tx = SMALL[name](_linear_partition())
  params, grad_fn = _one_problem()
  # chex counts traces per source footprint, which every optimizer's step shares: reset it.
  chex.clear_trace_counter()
  step = _fast_jit(chex.assert_max_traces(_stepper(tx, grad_fn), n=1))
  state = tx.init(params)
  history = []
  for _ in range(SMALL_STEPS):
    params, state = step(params, state)
    history.append((params, state))
  return tx, step, history


@pytest.mark.parametrize('name', sorted(SMALL))
def test_jitted_step_traces_once_across_stages(name: str):
  """One trace serves every step: crossing n_p / the pruning periods does not retrace."""
  part = _linear_partition()
  _, step, history = _small(name)
  assert step._cache_size() == 1
  counts = [int((part.zig_norms(p) == 0).sum()) for p, _ in history]
  # The stages did switch (zeros appear), still with a single trace.
  assert counts[0] == 0 and counts[-1] > 0, counts
  if name == 'hesso':
    # Periods of 2 steps from step 3, K = 8: ⌊8/3⌋, ⌊16/3⌋, 8 zero after steps 4, 6 and 8.
    assert counts == [0] * 4 + [2, 2, 5, 5] + [8] * 8, counts


def _run_steps(tx, steps: int = 10, edits=(None,)):
  """``steps`` jitted steps on seed 0's problem, once per edit; ``edit(state)`` goes before step 3."""
  params0, grad_fn = _one_problem()
  step = _fast_jit(_stepper(tx, grad_fn))
  out = []
  for edit in edits:
    params, state = params0, tx.init(params0)
    for i in range(steps):
      if edit is not None and i == 3:
        state = edit(state)
      params, state = step(params, state)
    out.append((params, state))
  return out


def _set_hyperparam(name, value):
  def edit(state):
    state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
    return state

  return edit


def test_inject_hyperparams_hspg():
  """inject_hyperparams(hspg) equals hspg; editing ``lmbda`` in the state acts from that step."""
  part = _linear_partition()
  kw = dict(lmbda=LAMBDA, n_p=4, momentum=0.5)  # SMALL['hspg']
  injected = optax.inject_hyperparams(oto_jax.hspg)(part, learning_rate=0.1, **kw)
  assert set(injected.init(_one_problem()[0]).hyperparams) >= {'learning_rate', 'lmbda', 'n_p', 'epsilon'}
  plain = _small('hspg')[2][9][0]
  (got, _), (edited, _) = _run_steps(injected, edits=(None, _set_hyperparam('lmbda', 0.0)))
  chex.assert_trees_all_close(got, plain, rtol=1e-6, atol=1e-7)
  # λ → 0 before step 3 is a λ schedule that drops at step 3.
  ((scheduled, _),) = _run_steps(
    oto_jax.hspg(part, 0.1, **{**kw, 'lmbda': lambda c: jnp.where(c < 3, LAMBDA, 0.0)})
  )
  chex.assert_trees_all_close(edited, scheduled, rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(edited['w'] - plain['w']))) > 1e-3


def test_inject_hyperparams_hesso():
  """inject_hyperparams(hesso) equals hesso; editing ``learning_rate`` acts from that step."""
  part = _linear_partition()
  kw = dict(target_group_sparsity=0.5, start_pruning_step=3, pruning_steps=6, pruning_periods=3, momentum=0.9)
  # Every numeric argument is injected, so the update runs with traced targets and step counts.
  injected = optax.inject_hyperparams(oto_jax.hesso)(part, learning_rate=0.1, **kw)
  assert set(injected.init(_one_problem()[0]).hyperparams) >= {'learning_rate', 'target_group_sparsity'}
  plain, plain_state = _small('hesso')[2][9]  # SMALL['hesso'] is this configuration
  (got, got_state), (edited, _) = _run_steps(injected, edits=(None, _set_hyperparam('learning_rate', 0.02)))
  chex.assert_trees_all_close(got, plain, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got_state.inner_state.pruned, plain_state.pruned)
  assert int(plain_state.pruned.sum()) == 8
  ((scheduled, _),) = _run_steps(oto_jax.hesso(part, lambda c: jnp.where(c < 3, 0.1, 0.02), **kw))
  chex.assert_trees_all_close(edited, scheduled, rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(edited['w'] - plain['w']))) > 1e-3


@pytest.mark.parametrize(
  'name',
  [
    'hspg',
    'dhspg',
    'hesso',
  ],
)
def test_donated_step_matches(name: str):
  """jax.jit(step, donate_argnums=(0, 1)) runs and gives the same result as without donation."""
  tx, _, history = _small(name)
  params, grad_fn = _one_problem()
  donated = jax.jit(_stepper(tx, grad_fn), donate_argnums=(0, 1))
  state = tx.init(params)
  params = jax.tree.map(jnp.copy, params)  # donated buffers die: not the shared problem's
  for _ in range(8):
    params, state = donated(params, state)
  # Donation changes buffer reuse, and with it XLA's fusion: allow float32 reassociation.
  chex.assert_trees_all_close((params, state), history[7], rtol=1e-4, atol=1e-6)


def test_states_are_named_tuples_and_report_group_sparsity():
  """States are NamedTuples; tree_get(state, 'group_sparsity') is the params' group sparsity."""
  part = _linear_partition()
  kinds = {
    'hspg': oto_jax.HSPGState,  # the fused subgradient HSPG
    'hspg_prox': oto_jax.HalfSpaceState,  # the chain
    'dhspg': oto_jax.DHSPGState,
    'hesso': oto_jax.HESSOState,
  }
  for name, kind in kinds.items():
    _, _, history = _small(name)
    is_kind = functools.partial(lambda k, x: isinstance(x, k), kind)
    found = [x for x in jax.tree.leaves(history[0][1], is_leaf=is_kind) if is_kind(x)]
    assert len(found) == 1 and isinstance(found[0], tuple) and hasattr(found[0], '_fields'), name
    seen = set()
    for params, state in history:
      sparsity = float(optax.tree_utils.tree_get(state, 'group_sparsity'))
      assert sparsity == float(oto_jax.group_sparsity(part, params)), name
      seen.add(sparsity)
    assert len(seen) > 1, (name, seen)  # the sparsity moved: not a constant that happens to match
  params = _one_problem()[0]
  for block in (oto_jax.add_group_lasso(part, 0.1), oto_jax.group_lasso_prox(part, 0.1, 0.1)):
    assert isinstance(block.init(params), oto_jax.GroupLassoState)
  assert isinstance(oto_jax.half_space_projection(part).init(params), oto_jax.HalfSpaceState)


@pytest.mark.parametrize('name', ['hspg', 'hesso'])  # the blocks; HESSO's own update
def test_update_does_not_mutate_its_inputs(name: str):
  """update() leaves the gradients, state and params passed in as they were (numpy leaves)."""
  tx, _, history = _small(name)
  params, state = history[3]  # in the pruning stage
  _, grad_fn = _one_problem()
  # One eager update on numpy leaves: they are mutable, so an in-place write would show.
  to_np = lambda t: jax.tree.map(np.array, t)
  args = to_np((grad_fn(params), state, params))
  saved = to_np(args)
  updates, _ = tx.update(*args)
  chex.assert_trees_all_equal(args, saved)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  chex.assert_trees_all_close(optax.apply_updates(params, updates), history[4][0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 6. Bad arguments.


def _bad(fn, match: str):
  with pytest.raises(ValueError, match=match) as info:
    fn()
  return str(info.value)


def test_hesso_rejects_bad_arguments():
  """Each bad HESSO argument raises a ValueError that names the problem."""
  part = _linear_partition()
  kw = dict(target_group_sparsity=0.5, pruning_steps=10, momentum=0.9)

  def make(**over):
    return lambda: oto_jax.hesso(part, 0.1, **{**kw, **over})

  _bad(
    make(pruning_steps=3, pruning_periods=4), r'pruning_steps \(3\) must be at least pruning_periods \(4\)'
  )
  SPARSITY = 'target_group_sparsity must be a finite number >= 0 and < 1, got'
  _bad(make(target_group_sparsity=1.0), SPARSITY + ' 1.0')
  _bad(make(target_group_sparsity=-0.1), SPARSITY + ' -0.1')
  _bad(make(target=oto_jax.flops_budget(0.5)), 'Give exactly one of target_group_sparsity')
  _bad(make(target_group_sparsity=None), 'Give exactly one of target_group_sparsity')
  _bad(make(pruning_periods=0), 'pruning_periods must be a whole number >= 1, got 0')
  _bad(make(variant='rmsprop'), "variant must be one of .*got 'rmsprop'")
  _bad(
    make(importance_weights={'magnitude': 1.0, 'gradient': 1.0}),
    r"Unknown importance criteria \['gradient'\]",
  )
  _bad(make(start_pruning_step=-1), 'start_pruning_step must be a whole number of steps >= 0, got -1')
  # One node group of 16: keeping 4 (group_divisible=4) leaves room for 12; 0.85 asks for 13.
  msg = _bad(make(target_group_sparsity=0.85, group_divisible=4), 'Lower the target')
  assert 'asks for 13 of 16' in msg and 'only 12 can go' in msg, msg
  oto_jax.hesso(part, 0.1, **{**kw, 'target_group_sparsity': 0.75, 'group_divisible': 4})  # exactly fits
  budget = r'budget \(the fraction kept\) must be a finite number > 0 and <= 1, got'
  _bad(lambda: oto_jax.flops_budget(0.0), 'A flops ' + budget + ' 0.0')
  _bad(lambda: oto_jax.params_budget(1.5), 'A params ' + budget + ' 1.5')
  with pytest.raises(TypeError, match='target must be a Budget'):
    oto_jax.hesso(part, 0.1, target=0.5, pruning_steps=10, momentum=0.9)
  cric = lambda **over: lambda: oto_jax.hesso_cric(part, 0.1, **{**kw, **over})
  _bad(cric(cycles=4, pruning_steps=8, pruning_periods=2), r'pruning_steps \(8\) must be at least .* = 10')
  _bad(cric(subsets=0), 'subsets must be a whole number >= 1, got 0')
  _bad(cric(oversample=0.5), 'oversample must be >= 1')
  _bad(cric(cycles=-1), 'cycles must be a whole number >= 0, got -1')
  # Structural, so static under inject_hyperparams; the other hyperparameters are injected.
  tx = optax.inject_hyperparams(oto_jax.hesso_cric, static_args=('cycles', 'subsets', 'oversample', 'seed'))(
    part, 0.1, cycles=1, target_group_sparsity=0.5, pruning_steps=10, momentum=0.9
  )
  assert tx.init({'w': jnp.zeros((D_IN, COLS))}).hyperparams['learning_rate'] == 0.1


def test_zoo_target_that_empties_a_node_group_is_rejected():
  """A sparsity that would leave a node group of the ViT without a ZIG raises ValueError."""
  _, part, _ = _zoo('linen/vit1')  # 4 heads + 64 MLP units: at most 3 + 63 = 66 of 68 can go
  oto_jax.hesso(part, 0.1, target_group_sparsity=66.5 / 68, pruning_steps=10, momentum=0.9)
  msg = _bad(
    lambda: oto_jax.hesso(part, 0.1, target_group_sparsity=67.5 / 68, pruning_steps=10, momentum=0.9),
    'Lower the target',
  )
  assert 'asks for 67 of 68' in msg and 'only 66 can go' in msg, msg


def test_dhspg_and_hspg_reject_bad_arguments():
  """DHSPG validates its target and variant, HSPG its stage 1."""
  part = _linear_partition()
  _bad(lambda: oto_jax.dhspg(part, 0.1, target_group_sparsity=1.0, momentum=0.9), 'number >= 0 and < 1')
  _bad(lambda: oto_jax.dhspg(part, 0.1, momentum=0.9), 'Give exactly one')
  _bad(lambda: oto_jax.dhspg(part, 0.1, target_group_sparsity=0.5, variant='lamb'), 'variant must be one of')
  _bad(
    lambda: oto_jax.dhspg(part, 0.1, target_group_sparsity=0.5, start_pruning_step=-3, momentum=0.9),
    'start_pruning_step must be a whole number of steps >= 0',
  )
  _bad(lambda: oto_jax.hspg(part, 0.1, lmbda=0.1, n_p=5, stage1='foo'), r"stage1 must be one of .*got 'foo'")


@pytest.mark.parametrize(
  'factory, bad, match',
  [
    ('hesso', dict(learning_rate=-0.1), 'learning_rate must be a finite number >= 0'),
    ('hesso', dict(learning_rate=float('nan')), 'learning_rate must be a finite number >= 0'),
    ('hesso', dict(learning_rate=lambda c: -0.1 + 0 * c), r'learning_rate \(its schedule at step 0\)'),
    ('hesso', dict(pruning_steps=2.5), 'pruning_steps must be a whole number of steps >= 0, got 2.5'),
    ('hesso', dict(group_divisible=0), 'group_divisible must be a whole number >= 1, got 0'),
    ('hesso', dict(target_group_sparsity='0.5'), "target_group_sparsity must be a finite number .*got '0.5'"),
    ('hesso', dict(momentum=1.0), 'momentum must be a finite number >= 0 and < 1, got 1.0'),
    ('hesso', dict(weight_decay=-1e-4), 'weight_decay must be a finite number >= 0'),
    ('hesso', dict(b2=1.5), 'b2 must be a finite number >= 0 and < 1'),
    ('hspg', dict(lmbda=-1.0), 'lmbda must be a finite number >= 0'),
    ('hspg', dict(n_p=-1), 'n_p must be a whole number of steps >= 0, got -1'),
    ('hspg', dict(epsilon=1.0), 'epsilon must be a finite number >= 0 and < 1, got 1.0'),
    ('hspg', dict(epsilon=-0.1), 'epsilon must be a finite number >= 0 and < 1'),
    ('dhspg', dict(epsilon=2.0), 'epsilon must be a finite number >= 0 and < 1'),
    ('dhspg', dict(lmbda=float('inf')), 'lmbda must be a finite number >= 0 .*got inf'),
    ('dhspg', dict(learning_rate='0.1'), "learning_rate must be a finite number >= 0 .*got '0.1'"),
    ('prox_sg', dict(lmbda=-0.5), 'lmbda must be a finite number >= 0'),
    ('half_space_projection', dict(epsilon=1.5), 'epsilon must be a finite number >= 0 and < 1'),
    ('add_group_lasso', dict(lmbda=-1.0), 'lmbda must be a finite number >= 0'),
    ('group_lasso_prox', dict(learning_rate=-1.0), 'learning_rate must be a finite number >= 0'),
  ],
)
def test_every_optimizer_validates_its_hyperparameters(factory, bad, match):
  """One validator for every optimizer and block: a bad value is a ValueError naming it and its range."""
  part = _linear_partition()
  good = {
    'hesso': dict(learning_rate=0.1, target_group_sparsity=0.5, pruning_steps=10),
    'hspg': dict(learning_rate=0.1, lmbda=0.1, n_p=5),
    'dhspg': dict(learning_rate=0.1, target_group_sparsity=0.5),
    'prox_sg': dict(learning_rate=0.1, lmbda=0.1),
    'half_space_projection': dict(epsilon=0.0),
    'add_group_lasso': dict(lmbda=0.1),
    'group_lasso_prox': dict(lmbda=0.1, learning_rate=0.1),
  }[factory]
  getattr(oto_jax, factory)(part, **good)
  with pytest.raises(ValueError, match=match):
    getattr(oto_jax, factory)(part, **{**good, **bad})


NO_PARAMS_MSG = oto_jax.transforms.NO_PARAMS
BLOCKS = {
  'add_group_lasso': lambda part: oto_jax.add_group_lasso(part, 0.1),
  'group_lasso_prox': lambda part: oto_jax.group_lasso_prox(part, 0.1, 0.1),
  'half_space_projection': lambda part: oto_jax.half_space_projection(part, 0.0),
}


@pytest.mark.parametrize('name', sorted(SMALL) + sorted(BLOCKS))
def test_update_without_params_raises(name: str):
  """update(grads, state) without params raises ValueError saying params are needed."""
  tx = {**SMALL, **BLOCKS}[name](_linear_partition())
  params, grad_fn = _one_problem()  # not jitted: the error is raised while tracing anyway
  with pytest.raises(ValueError, match=re.escape(NO_PARAMS_MSG)):
    tx.update(grad_fn(params), tx.init(params))


# ---------------------------------------------------------------------------------------------
# 7. Schedules.


def _two_phase(first, second, steps_first: int, steps: int):
  """``steps_first`` steps with ``first``, then the rest with ``second`` on the same state."""
  params, grad_fn = _one_problem()

  def phase(tx):
    def body(carry, _):
      return _stepper(tx, grad_fn)(*carry), None

    return body

  @_fast_jit
  def run(params):
    carry = (params, first.init(params))
    carry, _ = jax.lax.scan(phase(first), carry, None, length=steps_first)
    carry, _ = jax.lax.scan(phase(second), carry, None, length=steps - steps_first)
    return carry

  return run(params)


SCHEDULED = {
  # name: factory(learning_rate, lmbda); hspg_prox uses all three blocks.
  'hspg_prox': lambda part, lr, lam: oto_jax.hspg(part, lr, lmbda=lam, n_p=4, stage1='prox'),
  'dhspg': lambda part, lr, lam: oto_jax.dhspg(
    part, lr, target_group_sparsity=0.5, start_pruning_step=3, lmbda=lam, momentum=0.0
  ),
  'hesso': lambda part, lr, lam: _hesso_small(part, lr),
}


@pytest.mark.parametrize('name', sorted(SCHEDULED))
def test_schedules_are_evaluated_at_the_step_count(name: str):
  """lr and λ schedules under jit equal switching the constants at the schedule's boundary."""
  part, make = _linear_partition(), SCHEDULED[name]
  lr = optax.piecewise_constant_schedule(0.1, {5: 0.3})  # 0.1 for steps 0-4, then 0.03
  lam = optax.piecewise_constant_schedule(LAMBDA, {5: 2.0})
  tx = make(part, lr, lam)
  got, _ = _two_phase(tx, tx, 5, 10)
  want, _ = _two_phase(make(part, 0.1, LAMBDA), make(part, 0.03, 2 * LAMBDA), 5, 10)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # The switch happened inside the pruning stage: groups were zeroed.
  assert int((part.zig_norms(got) == 0).sum()) > 0


# ---------------------------------------------------------------------------------------------
# 8. Regressions.


@pytest.mark.parametrize('algo', ['hesso', 'dhspg'])
def test_sgd_variant_without_momentum(algo: str):
  """variant='sgd' with the default momentum=None is plain SGD (the same as momentum=0)."""
  part = _linear_partition()
  kw = dict(target_group_sparsity=0.5, start_pruning_step=3)
  make = {
    'hesso': lambda **more: oto_jax.hesso(part, 0.1, pruning_steps=6, **kw, **more),
    'dhspg': lambda **more: oto_jax.dhspg(part, 0.1, lmbda=1.0, **kw, **more),
  }[algo]
  ((zero_momentum, _),) = _run_steps(make(momentum=0.0))
  ((plain, _),) = _run_steps(make())
  chex.assert_trees_all_close(plain, zero_momentum)


def test_zig_partition_without_flax():
  """zig_partition works on a plain JAX function in a process that never imported flax."""
  # Regression: analysis.py used jax.extend.core while only flax had imported jax.extend.
  code = (
    'import jax, jax.numpy as jnp, oto_jax\n'
    "fn = lambda v, x: jnp.maximum(x @ v['a'], 0.0) @ v['b']\n"
    "v = {'a': jnp.ones((3, 4)), 'b': jnp.ones((4, 2))}\n"
    'print(oto_jax.zig_partition(fn, v, jnp.ones((2, 3))).num_zigs)\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '4'
