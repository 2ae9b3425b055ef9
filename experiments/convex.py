"""The OTO paper's convex comparison on real data: HSPG against Prox-SG and RDA.

Group-sparse multinomial logistic regression, with weights ``W [d, C]`` and an unregularised
bias ``b [C]``:

.. math::
  \\min_{W, b}\\ F(W, b) = f(W, b) + \\lambda \\sum_g \\lVert W_g \\rVert_2, \\qquad
  f = \\frac{1}{N} \\sum_i \\mathrm{CE}(\\mathrm{softmax}(x_i W + b), y_i)

where ``W_g`` are the rows of ``W`` of the features in group ``g``:

* ``digits`` (8x8 images, 64 features): 16 groups, the 2x2 pixel blocks;
* ``breast_cancer`` (30 features): 10 groups, the mean, standard error and worst value of
  each of the 10 measurements;
* ``mnist1d`` (40 positions): 10 groups of 4 consecutive positions.

The groups are a :meth:`oto_jax.ZIGPartition.from_groups` partition, so the library's
:func:`oto_jax.hspg` and :func:`oto_jax.prox_sg` run on it unchanged; RDA (regularised dual
averaging, Xiao 2010) is implemented here as a baseline (:func:`rda`). All three take the
same minibatches (batch 64, a fresh shuffle per epoch and seed) for the same number of
epochs, from the same initial point for each seed; the datasets' splits are fixed, so the
seeds vary the initial point and the minibatch order. A deterministic full-batch reference
(FISTA with the group-lasso prox, :func:`reference_solution`) gives the problem's optimum
``F*`` and the sparsity of its solution, to judge the stochastic methods against.

For each dataset, optimizer and seed the run reports the final objective ``F`` on the full
train set, the group sparsity (the fraction of groups whose rows are exactly zero,
:func:`oto_jax.group_sparsity`), how many groups are zero exactly where the reference
optimum's are, and the test accuracy.

The settings of :data:`PROBLEMS` come from :func:`tune` (``--tune`` reruns it), on seeds that
are not reported, by the objective alone: the learning rate shared by HSPG and Prox-SG is
Prox-SG's best, RDA's γ is RDA's best, and HSPG's ε is the largest that costs at most 1e-3 of
objective over Prox-SG. Both SGD methods divide the learning rate by 10 after 2/3 of the
epochs; HSPG's half-space stage starts after 1/3.

Usage::

  python -m experiments.convex [--seeds 3] [--datasets digits,breast_cancer,mnist1d]
                               [--epochs N] [--json PATH] [--markdown PATH] [--tune]

Prints a Markdown table of the mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import oto_jax
from experiments import data

OPTIMIZERS = ('hspg', 'prox_sg', 'rda')
LABELS = {'hspg': 'HSPG', 'prox_sg': 'Prox-SG', 'rda': 'RDA', 'reference': 'full-batch FISTA (reference)'}

# -----------------------------------------------------------------------------------------------
# The problems.


def digit_blocks(shape: tuple[int, ...] = (8, 8, 1), block: int = 2) -> np.ndarray:
  """Group of each flattened pixel of an ``[H, W, 1]`` image: its ``block x block`` tile."""
  h, w = shape[:2]
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return ((r // block) * (w // block) + c // block).reshape(-1).astype(np.int32)


def measurement_groups(num_features: int = 30, num_measurements: int = 10) -> np.ndarray:
  """Group of each breast-cancer feature: its measurement (features j, j+10, j+20 share one)."""
  return (np.arange(num_features) % num_measurements).astype(np.int32)


def position_groups(length: int = 40, size: int = 4) -> np.ndarray:
  """Group of each position of a 1-D signal: ``size`` consecutive positions per group."""
  return (np.arange(length) // size).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Problem:
  """A dataset, its feature groups and the optimizers' settings on it.

  Attributes:
    name: the dataset's name (a loader of :mod:`experiments.data`).
    load: returns the :class:`~experiments.data.Dataset`.
    groups: the group index of every (flattened) feature.
    lmbda: λ, the group-lasso weight.
    epochs: passes over the train set, the same for every optimizer.
    lr: the learning rate of HSPG and Prox-SG (constant).
    n_p_fraction: the fraction of the epochs after which HSPG starts its half-space stage.
    epsilon: HSPG's ε.
    rda_gamma: RDA's γ (its iterate is ``-(√t/γ)`` times the shrunk average gradient).
    batch_size: samples per minibatch.
    lr_drops: fractions of the epochs after which the learning rate is divided by 10.
    init_scale: standard deviation of the initial weights (the bias starts at zero).
  """

  name: str
  load: Callable[[], data.Dataset]
  groups: np.ndarray
  lmbda: float
  epochs: int
  lr: float
  epsilon: float
  rda_gamma: float
  n_p_fraction: float = 1 / 3
  batch_size: int = 64
  lr_drops: tuple[float, ...] = (2 / 3,)
  init_scale: float = 0.01

  @property
  def n_p_epochs(self) -> int:
    return round(self.n_p_fraction * self.epochs)

  def learning_rate(self, steps_per_epoch: int) -> optax.Schedule | float:
    """The learning rate of HSPG and Prox-SG: ``lr``, divided by 10 at each of ``lr_drops``."""
    if not self.lr_drops:
      return self.lr
    bounds = {round(f * self.epochs) * steps_per_epoch: 0.1 for f in self.lr_drops}
    return optax.piecewise_constant_schedule(self.lr, bounds)

  def settings(self) -> str:
    return (
      f'λ={self.lmbda:g}, {self.epochs} epochs of batch {self.batch_size}, lr={self.lr:g} '
      f'(HSPG, Prox-SG), HSPG n_p={self.n_p_epochs} epochs and ε={self.epsilon:g}, RDA γ={self.rda_gamma:g}'
    )


# λ gives each problem's optimum a sizeable fraction of zero groups (see the reference rows);
# the epochs give every problem about 1250 steps of batch 64. lr, rda_gamma and epsilon are
# the choices of :func:`tune` (``python -m experiments.convex --tune``).
PROBLEMS: dict[str, Problem] = {
  'digits': Problem(
    'digits',
    lambda: data.digits(seed=0),
    digit_blocks(),
    lmbda=1e-2,
    epochs=60,
    lr=2.0,
    epsilon=0.9,
    rda_gamma=0.01,
  ),
  'breast_cancer': Problem(
    'breast_cancer',
    lambda: data.breast_cancer(seed=0),
    measurement_groups(),
    lmbda=2e-2,
    epochs=200,
    lr=1.0,
    epsilon=0.5,
    rda_gamma=0.03,
  ),
  'mnist1d': Problem(
    'mnist1d',
    lambda: data.mnist1d(),
    position_groups(),
    lmbda=5e-2,
    epochs=20,
    lr=0.1,
    epsilon=0.9,
    rda_gamma=0.1,
  ),
}

# -----------------------------------------------------------------------------------------------
# The model and the objective.


def init_params(key: jax.Array, num_features: int, num_classes: int, scale: float) -> dict[str, jax.Array]:
  """``{'w': [d, C] ~ N(0, scale²), 'b': zeros [C]}``."""
  w = scale * jax.random.normal(key, (num_features, num_classes), jnp.float32)
  return {'w': w, 'b': jnp.zeros((num_classes,), jnp.float32)}


def loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """f: the mean softmax cross-entropy of ``x @ w + b`` (x flattened to ``[N, d]``)."""
  logits = x.reshape(x.shape[0], -1) @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def objective(
  part: oto_jax.ZIGPartition, params: dict[str, jax.Array], x: jax.Array, y: jax.Array, lmbda: float
) -> jax.Array:
  """F = f + λ Σ_g ‖W_g‖₂."""
  return loss(params, x, y) + lmbda * jnp.sum(part.zig_norms(params))


def accuracy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """The fraction of samples whose largest logit is their label's."""
  logits = x.reshape(x.shape[0], -1) @ params['w'] + params['b']
  return jnp.mean(jnp.argmax(logits, -1) == y)


def partition(num_features: int, num_classes: int, groups: np.ndarray) -> oto_jax.ZIGPartition:
  """The feature groups as a partition: group ``g`` holds the rows of ``w`` with ``groups == g``."""
  shapes = {
    'w': jax.ShapeDtypeStruct((num_features, num_classes), jnp.float32),
    'b': jax.ShapeDtypeStruct((num_classes,), jnp.float32),
  }
  return oto_jax.ZIGPartition.from_groups(shapes, {'w': (0, groups)})


# -----------------------------------------------------------------------------------------------
# RDA, the dual-averaging baseline.


class RDAState(NamedTuple):
  """State of :func:`rda`: the step count and the running average of the gradients."""

  count: chex.Array
  grad_avg: Any


def group_shrink(part: oto_jax.ZIGPartition, tree: Any, threshold: jax.Array) -> Any:
  """``max(0, 1 - threshold / ‖v_g‖) v_g`` on every group; entries outside the groups pass."""
  seg = part.segments(tree)
  sq = seg.sums((tree, tree))[0]
  inv = jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  scale = jnp.maximum(0.0, 1.0 - threshold * inv)
  return seg.map(lambda v, s: (s * v).astype(v.dtype), tree, values=[scale], fills=[1.0])


def rda(part: oto_jax.ZIGPartition, lmbda: float, gamma: float) -> optax.GradientTransformation:
  """Regularised dual averaging for the group lasso, with ``β_t = γ√t`` (a baseline, not exported).

  With ``ḡ_t`` the average of the gradients so far:

  .. math::
    x_{t+1,g} = -\\frac{\\sqrt t}{\\gamma}\\,
      \\max\\Big(0,\\ 1 - \\frac{\\lambda}{\\lVert \\bar g_{t,g}\\rVert_2}\\Big)\\, \\bar g_{t,g}

  and ``x_{t+1} = -(√t/γ) ḡ_t`` for the entries outside every group. The iterates are those
  of the prox-function ``½‖x‖²`` (centred at 0); the initial ``params`` do not enter them.

  Args:
    part: the feature groups.
    lmbda: λ.
    gamma: γ > 0.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params`` (it returns the step from
    them to the new iterate).

  References:
    Xiao, *Dual averaging methods for regularized stochastic learning and online
    optimization*, JMLR 2010 (the RDA method with ``β_t = γ√t``, applied to the group lasso).
  """

  def init_fn(params):
    return RDAState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    t = state.count + 1
    tf = t.astype(jnp.float32)
    avg = jax.tree.map(lambda a, g: a + (g - a) / tf, state.grad_avg, updates)
    eta = jnp.sqrt(tf) / gamma
    new = jax.tree.map(lambda v: -eta * v, group_shrink(part, avg, lmbda))
    step = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params)
    return step, RDAState(t, avg)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
  name: str, part: oto_jax.ZIGPartition, prob: Problem, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer ``name`` (one of :data:`OPTIMIZERS`) with ``prob``'s settings."""
  if name == 'hspg':
    n_p = prob.n_p_epochs * steps_per_epoch
    return oto_jax.hspg(
      part, prob.learning_rate(steps_per_epoch), lmbda=prob.lmbda, n_p=n_p, epsilon=prob.epsilon
    )
  if name == 'prox_sg':
    return oto_jax.prox_sg(part, prob.learning_rate(steps_per_epoch), prob.lmbda)
  if name == 'rda':
    return rda(part, prob.lmbda, prob.rda_gamma)
  raise ValueError(f'Unknown optimizer {name!r}; the choices are {OPTIMIZERS}.')


# -----------------------------------------------------------------------------------------------
# Training.


def _train_fn(tx: optax.GradientTransformation, part: oto_jax.ZIGPartition, lmbda: float):
  """``(params0, idx [E, S, B], x, y) -> (params, F per epoch, sparsity per epoch)``, one seed."""

  def step(carry, ib, x, y):
    params, state = carry
    grads = jax.grad(loss)(params, x[ib], y[ib])
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  def train(params, idx, x, y):
    def epoch(carry, ie):
      carry, _ = jax.lax.scan(functools.partial(step, x=x, y=y), carry, ie)
      p = carry[0]
      return carry, (objective(part, p, x, y, lmbda), oto_jax.group_sparsity(part, p))

    (params, _), (hist_f, hist_s) = jax.lax.scan(epoch, (params, tx.init(params)), idx)
    return params, hist_f, hist_s

  return train


def batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
  """Sample indices [epochs, steps, batch_size] in the order of :func:`~experiments.data.batches`."""
  steps = n // batch_size
  return np.stack(
    [
      data.permutation(n, seed=seed, epoch=e)[: steps * batch_size].reshape(steps, batch_size)
      for e in range(epochs)
    ]
  )


def reference_solution(
  part: oto_jax.ZIGPartition,
  params0: dict[str, jax.Array],
  x: jax.Array,
  y: jax.Array,
  lmbda: float,
  iters: int = 2000,
) -> dict[str, jax.Array]:
  """The group-lasso optimum to high accuracy: full-batch FISTA with adaptive restart.

  The step is ``1/L`` with ``L = ½ σ_max([X, 1])² / N``, a Lipschitz constant of ∇f (the
  softmax cross-entropy's Hessian in the logits is at most ½ I).
  """
  n = x.shape[0]
  xb = jnp.concatenate([x.reshape(n, -1), jnp.ones((n, 1), x.dtype)], axis=1)
  lip = 0.5 * jnp.linalg.norm(xb, ord=2) ** 2 / n
  step = 1.0 / lip
  grad = jax.grad(loss)

  def prox_grad(z):
    trial = jax.tree.map(lambda p, g: p - step * g, z, grad(z, x, y))
    return group_shrink(part, trial, step * lmbda)

  def body(carry, _):
    p, z, t = carry
    p_new = prox_grad(z)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    # Gradient-based restart (O'Donoghue & Candès): drop the momentum when it points uphill.
    uphill = (
      sum(
        jnp.vdot(zi - pn, pn - pi)
        for zi, pn, pi in zip(jax.tree.leaves(z), jax.tree.leaves(p_new), jax.tree.leaves(p))
      )
      > 0
    )
    t_new = jnp.where(uphill, 1.0, t_new)
    beta = jnp.where(uphill, 0.0, (t - 1.0) / t_new)
    z_new = jax.tree.map(lambda a, b: a + beta * (a - b), p_new, p)
    return (p_new, z_new, t_new), None

  (p, _, _), _ = jax.lax.scan(body, (params0, params0, jnp.ones([])), None, length=iters)
  return p


class Experiment:
  """One problem's data, groups, initial points and reference optimum, to train optimizers on.

  Args:
    prob: the problem (its data is loaded here).
    seeds: the seeds; seed ``s`` draws the initial weights from ``jax.random.key(s)`` and the
      minibatch order from :func:`experiments.data.permutation` with ``seed=s``.
  """

  def __init__(self, prob: Problem, seeds: Sequence[int]):
    ds = prob.load()
    self.prob, self.seeds = prob, [int(s) for s in seeds]
    self.x = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1))
    self.y = jnp.asarray(ds.y_train)
    self.x_test = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1))
    self.y_test = jnp.asarray(ds.y_test)
    d, c = self.x.shape[1], ds.num_classes
    self.part = partition(d, c, prob.groups)
    keys = jnp.stack([jax.random.key(s) for s in self.seeds])
    self.params0 = jax.vmap(lambda k: init_params(k, d, c, prob.init_scale))(keys)
    t0 = time.perf_counter()
    ref = jax.jit(functools.partial(reference_solution, self.part, lmbda=prob.lmbda))
    self.reference = jax.block_until_ready(ref(jax.tree.map(lambda a: a[0], self.params0), self.x, self.y))
    self.reference_seconds = time.perf_counter() - t0
    self._ref_zero = self.part.zig_norms(self.reference) == 0

  def evaluate(self, params: dict[str, jax.Array]) -> dict[str, float]:
    """F, f, group sparsity and accuracies of one parameter set."""
    return {
      'objective': float(objective(self.part, params, self.x, self.y, self.prob.lmbda)),
      'loss': float(loss(params, self.x, self.y)),
      'group_sparsity': float(oto_jax.group_sparsity(self.part, params)),
      'train_accuracy': float(accuracy(params, self.x, self.y)),
      'test_accuracy': float(accuracy(params, self.x_test, self.y_test)),
      # The fraction of groups that are zero exactly where they are zero in the reference optimum.
      'support_match': float(jnp.mean((self.part.zig_norms(params) == 0) == self._ref_zero)),
    }

  def train(self, optimizer: str, prob: Problem | None = None) -> list[dict[str, Any]]:
    """Trains ``optimizer`` for every seed at once (vmapped); one row per seed.

    Args:
      optimizer: one of :data:`OPTIMIZERS`.
      prob: settings to use instead of the experiment's (same dataset, groups and λ).
    """
    prob = self.prob if prob is None else prob
    n = self.x.shape[0]
    steps = n // prob.batch_size
    idx = jnp.asarray(np.stack([batch_indices(n, prob.batch_size, prob.epochs, s) for s in self.seeds]))
    tx = make_optimizer(optimizer, self.part, prob, steps)
    train = jax.jit(jax.vmap(_train_fn(tx, self.part, prob.lmbda), in_axes=(0, 0, None, None)))
    t0 = time.perf_counter()
    params, hist_f, hist_s = jax.block_until_ready(train(self.params0, idx, self.x, self.y))
    seconds = (time.perf_counter() - t0) / len(self.seeds)
    rows = []
    for i, s in enumerate(self.seeds):
      p = jax.tree.map(lambda a, i=i: a[i], params)
      rows.append(
        {
          **self._common(prob),
          'optimizer': optimizer,
          'seed': s,
          **self.evaluate(p),
          'objective_per_epoch': np.asarray(hist_f[i]).tolist(),
          'sparsity_per_epoch': np.asarray(hist_s[i]).tolist(),
          'seconds': seconds,
        }
      )
    return rows

  def reference_row(self) -> dict[str, Any]:
    return {
      **self._common(self.prob),
      'optimizer': 'reference',
      'seed': None,
      **self.evaluate(self.reference),
      'seconds': self.reference_seconds,
    }

  def _common(self, prob: Problem) -> dict[str, Any]:
    return {
      'dataset': prob.name,
      'lmbda': prob.lmbda,
      'epochs': prob.epochs,
      'num_groups': self.part.num_zigs,
      'settings': prob.settings(),
    }


def run(
  datasets: Sequence[str] = tuple(PROBLEMS),
  seeds: Sequence[int] | int = 3,
  optimizers: Sequence[str] = OPTIMIZERS,
  **overrides: Any,
) -> list[dict[str, Any]]:
  """The comparison on each dataset: a row per (dataset, optimizer, seed) and a reference row per dataset.

  Args:
    datasets: names of :data:`PROBLEMS`.
    seeds: the seeds, or their number (``0 … n-1``).
    optimizers: a subset of :data:`OPTIMIZERS`.
    **overrides: fields of :class:`Problem` to replace on every problem (e.g. ``epochs=3``).

  Returns:
    Rows with ``dataset, optimizer, seed, objective, loss, group_sparsity, train_accuracy,
    test_accuracy, seconds`` (and per-epoch histories for the optimizers).
  """
  seeds = range(seeds) if isinstance(seeds, int) else seeds
  rows = []
  for name in datasets:
    if name not in PROBLEMS:
      raise ValueError(f'Unknown dataset {name!r}; the choices are {tuple(PROBLEMS)}.')
    exp = Experiment(dataclasses.replace(PROBLEMS[name], **overrides), seeds)
    rows.append(exp.reference_row())
    for opt in optimizers:
      rows += exp.train(opt)
  return rows


# -----------------------------------------------------------------------------------------------
# Tuning: how the settings of PROBLEMS were chosen.

LR_GRID = (0.1, 0.3, 1.0, 2.0)
GAMMA_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
EPSILON_GRID = (0.0, 0.5, 0.8, 0.9)
# HSPG's ε may cost at most this much objective over Prox-SG's (which it equals at ε = 0 up to
# the half-space stage's effect).
EPSILON_TOLERANCE = 1e-3
TUNING_SEEDS = (100, 101)


def tune(name: str, seeds: Sequence[int] = TUNING_SEEDS, log: Callable[[str], None] = print) -> Problem:
  """Chooses a problem's settings on seeds disjoint from the reported ones, by objective only.

  1. ``lr`` (shared by HSPG and Prox-SG): the value of :data:`LR_GRID` with the lowest mean
     final F of Prox-SG (Prox-SG's choice, so the rule cannot favour HSPG).
  2. RDA's ``γ``: the value of :data:`GAMMA_GRID` with RDA's lowest mean final F.
  3. HSPG's ``ε``: the largest value of :data:`EPSILON_GRID` whose mean final F is within
     :data:`EPSILON_TOLERANCE` of Prox-SG's at the chosen ``lr`` (ε trades objective for
     sparsity, so it is capped by the objective, not chosen by sparsity).

  λ, the epochs, the learning-rate drops and ``n_p`` stay as in :data:`PROBLEMS`.

  Returns:
    The problem with the chosen ``lr``, ``rda_gamma`` and ``epsilon``.
  """
  base = PROBLEMS[name]
  exp = Experiment(base, seeds)
  mean = lambda rows, k='objective': statistics.mean(r[k] for r in rows)
  log(f'{name}: F* = {mean([exp.reference_row()]):.5f}')

  def trial(opt: str, **changes: Any) -> float:
    rows = exp.train(opt, dataclasses.replace(base, **changes))
    f, sp = mean(rows), mean(rows, 'group_sparsity')
    log(f'  {opt} {changes}: F = {f:.5f}, group sparsity = {100 * sp:.1f}%')
    return f

  prox = {lr: trial('prox_sg', lr=lr) for lr in LR_GRID}
  lr = min(prox, key=prox.get)
  rda_f = {g: trial('rda', rda_gamma=g) for g in GAMMA_GRID}
  gamma = min(rda_f, key=rda_f.get)
  ok = [e for e in EPSILON_GRID if trial('hspg', lr=lr, epsilon=e) <= prox[lr] + EPSILON_TOLERANCE]
  epsilon = max(ok, default=0.0)
  log(f'  chosen: lr={lr:g}, rda_gamma={gamma:g}, epsilon={epsilon:g}')
  return dataclasses.replace(base, lr=lr, rda_gamma=gamma, epsilon=epsilon)


# -----------------------------------------------------------------------------------------------
# Report.


def mean_std(values: list[float], fmt: str) -> str:
  """``mean ± sample standard deviation`` formatted with ``fmt`` (the value alone for one)."""
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}'


def markdown(rows: list[dict[str, Any]]) -> str:
  """One Markdown table: mean ± standard deviation over the seeds of each (dataset, optimizer)."""
  keys = list(dict.fromkeys((r['dataset'], r['optimizer']) for r in rows))
  lines = [
    '| dataset | optimizer | seeds | objective F | F − F* | group sparsity (%) | zero pattern as F* (%) '
    '| test accuracy (%) |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  ref = {r['dataset']: r['objective'] for r in rows if r['optimizer'] == 'reference'}
  for ds, opt in keys:
    sel = [r for r in rows if r['dataset'] == ds and r['optimizer'] == opt]
    f = [r['objective'] for r in sel]
    gap = mean_std([v - ref[ds] for v in f], '.4f') if ds in ref else '–'
    lines.append(
      f'| {ds} | {LABELS.get(opt, opt)} | {len(sel) if opt != "reference" else "–"} | {mean_std(f, ".4f")} '
      f'| {gap} | {mean_std([100 * r["group_sparsity"] for r in sel], ".1f")} '
      f'| {mean_std([100 * r["support_match"] for r in sel], ".1f")} '
      f'| {mean_std([100 * r["test_accuracy"] for r in sel], ".1f")} |'
    )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seeds', type=int, default=3, help='seeds per dataset and optimizer (default 3)')
  parser.add_argument(
    '--datasets', default=','.join(PROBLEMS), help=f'comma-separated subset of {",".join(PROBLEMS)}'
  )
  parser.add_argument('--epochs', type=int, help="override every problem's number of epochs")
  parser.add_argument(
    '--tune', action='store_true', help='rerun the tuning that chose the settings, print it, and exit'
  )
  parser.add_argument('--json', type=Path, help='also write the rows to this file')
  parser.add_argument('--markdown', type=Path, help='also write the table to this file')
  args = parser.parse_args(argv)
  overrides = {} if args.epochs is None else {'epochs': args.epochs}
  if args.tune:
    for name in args.datasets.split(','):
      tune(name)
    return 0
  t0 = time.perf_counter()
  rows = run(args.datasets.split(','), args.seeds, **overrides)
  seconds = time.perf_counter() - t0
  table = markdown(rows)
  settings = '\n'.join(f'- {n}: {PROBLEMS[n].settings()}' for n in args.datasets.split(','))
  text = f'{table}\n\nSettings:\n{settings}\n\nTotal time {seconds:.1f} s ({jax.default_backend()}).'
  print(text)
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1))
  if args.markdown:
    args.markdown.write_text(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
