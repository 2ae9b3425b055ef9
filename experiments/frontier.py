"""The accuracy–FLOPs frontier: training once (the OTO family) against prune-then-fine-tune.

Three tasks that install from the package index: scikit-learn's 8x8 digits with a small VGG,
MNIST-1D with a 1-D CNN, and MNIST-1D read as a sequence of 40 tokens by a small transformer
encoder (its attention heads and MLP units are the ZIGs). For every FLOPs budget (50, 30,
15, 8 and 4% of the full model's FLOPs kept) and seed, every method trains for the same
number of epochs on the same batches:

* ``hesso`` and ``hesso_cric``: HESSO (and its corrective cycles) under the FLOPs budget,
  pruning from 10% to 40% of training;
* ``dhspg``: DHSPG under the FLOPs budget (it lands where its half-space steps leave it);
* ``hspg``: HSPG at a grid of group-lasso weights λ; it has no budget, so each λ lands where
  it lands and the table compares the landing nearest each budget;
* ``l1_uniform`` / ``l1_global``: dense training, one-shot L1 pruning at half-way (the same
  share of every node group / globally, by L1 over the group's mean), fine-tuning;
* ``depgraph``: DepGraph's recipe — group-norm sparse training (group lasso) for half of
  the epochs, global pruning by group norm, fine-tuning;
* ``random``: dense training, random pruning at half-way, fine-tuning;
* ``dense``: no pruning.

Every run ends with ``construct_subnet``; the slim model's test accuracy is checked against
the zeroed full model's. Hyperparameters are chosen on a validation split carved from the
training data (15%, stratified, fixed seed), never on the test set: the learning rate by the
dense model's validation accuracy, λ of DepGraph's sparse training at the 15% budget, both
with seed 0; the final runs train on the rest of the training data and report test accuracy.

Usage::

  python -m experiments.frontier [--size full|tiny] [--out experiments/frontier_results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import oto_jax
from experiments import baselines, models
from experiments import data as data_lib
from oto_jax import budgets

BUDGETS = (0.5, 0.3, 0.15, 0.08, 0.04)
OTO_FAMILY = ('hesso', 'hesso_cric', 'dhspg', 'hspg')
PRUNE_THEN_TUNE = ('l1_uniform', 'l1_global', 'depgraph', 'random')
METHODS = ('dense', *OTO_FAMILY, *PRUNE_THEN_TUNE)


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset, a model and the training schedule every method shares."""

  name: str
  load: Callable[[], data_lib.Dataset]
  model: Callable[[int], nn.Module]
  epochs: int
  batch_size: int
  lrs: tuple[float, ...]  # the learning rates tried on the validation split
  hspg_lambdas: tuple[float, ...]
  depgraph_lambdas: tuple[float, ...]


_GRIDS = dict(lrs=(0.05, 0.1), hspg_lambdas=(1e-2, 3e-2, 1e-1), depgraph_lambdas=(1e-4, 1e-3))
TASKS = {
  'digits': Task('digits', lambda: data_lib.digits(seed=0), lambda c: models.DigitsCNN(c), 20, 64, **_GRIDS),
  'mnist1d': Task('mnist1d', data_lib.mnist1d, lambda c: models.Conv1DNet(c), 16, 100, **_GRIDS),
  'mnist1d_transformer': Task(
    'mnist1d_transformer',
    data_lib.mnist1d,
    lambda c: models.SequenceEncoder(num_classes=c, dim=32, mlp_dim=64),
    12,
    100,
    **_GRIDS,
  ),
}


def split_validation(
  ds: data_lib.Dataset, fraction: float = 0.15
) -> tuple[data_lib.Dataset, data_lib.Dataset]:
  """(the training data less a stratified validation split, the same with that split as its test set)."""
  rng = np.random.default_rng(12345)
  val = np.concatenate(
    [
      rng.permutation(np.flatnonzero(ds.y_train == c))[: int(round(fraction * np.sum(ds.y_train == c)))]
      for c in range(ds.num_classes)
    ]
  )
  keep = np.setdiff1d(np.arange(len(ds.y_train)), val)
  fit = ds._replace(x_train=ds.x_train[keep], y_train=ds.y_train[keep])
  return fit, fit._replace(x_test=ds.x_train[val], y_test=ds.y_train[val])


# ---------------------------------------------------------------------------------------------
# Training: every seed at once (vmap), one compiled epoch per optimizer.


@dataclasses.dataclass
class Setup:
  """What the runs of one task on one split share."""

  task: Task
  ds: data_lib.Dataset
  model: nn.Module
  part: oto_jax.ZIGPartition
  variables: Any  # seed-stacked initial variables
  seeds: tuple[int, ...]
  epochs: int

  @property
  def steps_per_epoch(self) -> int:
    return len(self.ds.x_train) // self.task.batch_size

  @property
  def total(self) -> int:
    return self.epochs * self.steps_per_epoch

  def schedule(self, lr: float) -> optax.Schedule:
    """The learning rate every method follows: ×0.1 at two thirds of the steps."""
    return optax.piecewise_constant_schedule(lr, {int(2 * self.total / 3): 0.1})


def make_setup(task: Task, ds: data_lib.Dataset, seeds: tuple[int, ...], epochs: int) -> Setup:
  model = task.model(ds.num_classes)
  x0 = jnp.asarray(ds.x_train[:1])
  inits = [jax.jit(model.init)(jax.random.key(s), x0) for s in seeds]
  part = oto_jax.zig_partition(model.apply, inits[0], x0)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)
  return Setup(task, ds, model, part, stacked, seeds, epochs)


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _epoch_fn(setup: Setup, tx: optax.GradientTransformation, probe: bool = False) -> Callable:
  """One epoch for every seed: ``(params, rest, opt_state, pruned), indices -> same``.

  ``rest`` holds the other collections (BatchNorm statistics); ``pruned`` ZIGs are held at
  zero after every step (fine-tuning after a one-shot prune; all False otherwise). The steps
  are one compiled program called from Python: XLA:CPU runs convolutions inside a ``scan``
  about 20× slower than the same steps called one by one (measured on the digits CNN).
  """
  model, part = setup.model, setup.part
  x_all, y_all = jnp.asarray(setup.ds.x_train), jnp.asarray(setup.ds.y_train)

  def step(carry, idx):
    params, rest, opt, pruned = carry
    xb, yb = x_all[idx], y_all[idx]

    def loss(p):
      if rest:
        logits, new = model.apply({'params': p, **rest}, xb, train=True, mutable=list(rest))
      else:
        logits, new = model.apply({'params': p}, xb, train=True), {}
      return _cross_entropy(logits, yb), new

    (_, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
    extra = {'value_fn': lambda p: loss(p)[0]} if probe else {}
    updates, opt = tx.update(grads, opt, params, **extra)
    params = part.zero(optax.apply_updates(params, updates), pruned)
    return params, new_rest, opt, pruned

  compiled = jax.jit(jax.vmap(step))

  def epoch(carry, indices):
    for k in range(indices.shape[1]):
      carry = compiled(carry, indices[:, k])
    return carry

  return epoch


def _indices(setup: Setup, epoch: int) -> jax.Array:
  """[seeds, steps, batch] minibatch indices: each seed's own shuffle of each epoch."""
  n, b, steps = len(setup.ds.x_train), setup.task.batch_size, setup.steps_per_epoch
  return jnp.asarray(
    np.stack(
      [np.random.default_rng((s, epoch)).permutation(n)[: steps * b].reshape(steps, b) for s in setup.seeds]
    )
  )


def _start(setup: Setup, tx: optax.GradientTransformation) -> tuple:
  params = setup.variables['params']
  rest = {k: v for k, v in setup.variables.items() if k != 'params'}
  pruned = jnp.zeros((len(setup.seeds), setup.part.num_zigs), bool)
  return params, rest, jax.vmap(tx.init)(params), pruned


def _train(setup: Setup, fn: Callable, carry: tuple, epochs: range) -> tuple:
  for e in epochs:
    carry = fn(carry, _indices(setup, e))
  return carry


def _sgd(setup: Setup, lr: float, lasso: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum 0.9 and weight decay 1e-4 on the shared schedule; with ``lasso``, a
  group-lasso term over the ZIGs for the first half of the steps (DepGraph's sparse training)."""
  blocks = [oto_jax.add_group_lasso(setup.part, lasso, end_step=setup.total // 2)] if lasso else []
  return optax.chain(*blocks, optax.add_decayed_weights(1e-4), optax.sgd(setup.schedule(lr), 0.9))


def _oto(setup: Setup, method: str, lr: float, budget: float, lmbda: float) -> optax.GradientTransformation:
  """The OTO-family optimizer: pruning from 10% to 40% of the steps (the reference's advice)."""
  part, t, sched = setup.part, setup.total, setup.schedule(lr)
  common = dict(momentum=0.9, weight_decay=1e-4)
  if method == 'hspg':
    return oto_jax.hspg(part, sched, lmbda=lmbda, n_p=t // 10, **common)
  target = oto_jax.flops_budget(budget)
  if method == 'dhspg':
    return oto_jax.dhspg(part, sched, target=target, start_pruning_step=t // 10, **common)
  # Five periods of two probing steps and more (fewer in a tiny run's short window).
  steps = 3 * t // 10
  periods = min(5, max(1, steps // 3))
  window = dict(start_pruning_step=t // 10, pruning_steps=steps, pruning_periods=periods, target=target)
  if method == 'hesso_cric':
    cycles = min(2, steps // periods - 1)
    return oto_jax.hesso_cric(part, sched, cycles=cycles, subsets=4, **window, **common)
  return oto_jax.hesso(part, sched, **window, **common)


def _per_group_mean(part: oto_jax.ZIGPartition, v: np.ndarray) -> np.ndarray:
  """``v`` divided by its node group's mean (global rankings compare layers on one scale)."""
  of_zig, _, sizes = budgets.group_layout(part)
  sums = np.bincount(of_zig, weights=v, minlength=len(sizes))
  return v / np.maximum(sums / np.maximum(sizes, 1), 1e-12)[of_zig]


def _global_prune(part: oto_jax.ZIGPartition, importance: np.ndarray, budget: float) -> np.ndarray:
  """The lowest-importance ZIGs over the whole model until the FLOPs budget is met (every node
  group keeps one)."""
  key = jnp.asarray(importance, jnp.float32)
  none = jnp.zeros((part.num_zigs,), bool)
  allowed = budgets.eligible(part, key, 1)
  return np.asarray(budgets.select(oto_jax.flops_budget(budget), part, key, none, allowed, jnp.float32(1.0)))


def _prune_once(setup: Setup, method: str, params: Any, budget: float, seed: int) -> np.ndarray:
  """The ZIGs a one-shot pruning of one seed's ``params`` removes."""
  part = setup.part
  if method == 'l1_uniform':
    return ~baselines.l1_prune(part, params, budget)
  if method == 'l1_global':
    return _global_prune(part, _per_group_mean(part, baselines.l1_importance(part, params)), budget)
  if method == 'depgraph':
    norms = np.asarray(part.zig_norms(params))
    return _global_prune(part, _per_group_mean(part, norms), budget)
  rng = np.random.default_rng((seed, 7))
  return _global_prune(part, rng.random(part.num_zigs), budget)


def _seed(tree: Any, k: int) -> Any:
  return jax.tree.map(lambda a: a[k], tree)


def _score(setup: Setup, carry: tuple, pruned: np.ndarray | None) -> list[dict]:
  """Per seed: the slim model's and the zeroed full model's test accuracy, FLOPs and
  parameters left. ``pruned``: the ZIGs a one-shot pruning removed (None: the zero ZIGs)."""
  params, rest, _, _ = carry
  part, ds = setup.part, setup.ds
  x, y = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
  full = jax.jit(lambda v: setup.model.apply(v, x))
  out = []
  for k in range(len(setup.seeds)):
    variables = {'params': _seed(params, k), **_seed(rest, k)}
    if pruned is None:
      sub = oto_jax.construct_subnet(part, variables)
      zeroed = variables
    else:
      ids = np.flatnonzero(pruned[k])
      zeroed = part.zero(variables, ids)
      sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
    acc_full = float(np.mean(np.argmax(np.asarray(full(zeroed)), -1) == y))
    acc_slim = float(np.mean(np.argmax(np.asarray(jax.jit(sub.apply)(sub.variables, x)), -1) == y))
    rep = sub.report()
    out.append(
      {
        'seed': setup.seeds[k],
        'acc_full': acc_full,
        'acc_slim': acc_slim,
        'flops_remaining': rep.flops[1] / rep.flops[0],
        'params_remaining': rep.params[1] / rep.params[0],
      }
    )
  return out


def run_task(
  task: Task,
  ds: data_lib.Dataset,
  seeds: tuple[int, ...],
  epochs: int,
  *,
  lr: float,
  depgraph_lambda: float,
  budgets_: tuple[float, ...],
  methods: tuple[str, ...],
  progress: Callable[[str], None] = print,
) -> list[dict]:
  """Every method at every budget on ``ds`` (its test split), each seed: a list of points."""
  setup = make_setup(task, ds, seeds, epochs)
  half = range(epochs // 2), range(epochs // 2, epochs)
  points: list[dict] = []

  def add(method: str, budget: float | None, rows: list[dict], **extra: Any) -> None:
    for r in rows:
      points.append({'method': method, 'budget': budget, **extra, **r})
    accs = [100 * r['acc_slim'] for r in rows]
    flops = [100 * r['flops_remaining'] for r in rows]
    progress(
      f'{task.name} {method:10s} budget {budget} {extra or ""}: acc {statistics.mean(accs):.2f}, '
      f'FLOPs {statistics.mean(flops):.1f}%'
    )

  sgd = _sgd(setup, lr)
  dense_fn = _epoch_fn(setup, sgd)
  trunk = _train(setup, dense_fn, _start(setup, sgd), half[0])  # dense, half-way: shared
  if 'dense' in methods:
    add('dense', None, _score(setup, _train(setup, dense_fn, trunk, half[1]), None))
  lasso = None
  for budget in budgets_:
    for method in methods:
      if method in ('l1_uniform', 'l1_global', 'random', 'depgraph'):
        start, fn = trunk, dense_fn
        if method == 'depgraph':
          if lasso is None:
            tx = _sgd(setup, lr, depgraph_lambda)
            lasso = (_epoch_fn(setup, tx), None)
            lasso = (lasso[0], _train(setup, lasso[0], _start(setup, tx), half[0]))
          fn, start = lasso
        params, rest, opt, _ = start
        pruned = np.stack(
          [_prune_once(setup, method, _seed(params, k), budget, s) for k, s in enumerate(seeds)]
        )
        params = jax.vmap(setup.part.zero)(params, jnp.asarray(pruned))
        carry = _train(setup, fn, (params, rest, opt, jnp.asarray(pruned)), half[1])
        add(method, budget, _score(setup, carry, pruned))
      elif method in ('hesso', 'hesso_cric', 'dhspg'):
        tx = _oto(setup, method, lr, budget, 0.0)
        fn = _epoch_fn(setup, tx, probe=method == 'hesso_cric')
        carry = _train(setup, fn, _start(setup, tx), range(epochs))
        add(method, budget, _score(setup, carry, None))
  if 'hspg' in methods:
    for lmbda in task.hspg_lambdas:
      tx = _oto(setup, 'hspg', lr, 1.0, lmbda)
      carry = _train(setup, _epoch_fn(setup, tx), _start(setup, tx), range(epochs))
      add('hspg', None, _score(setup, carry, None), lmbda=lmbda)
  return points


def choose_hyperparameters(task: Task, ds: data_lib.Dataset, epochs: int, progress: Callable) -> dict:
  """The learning rate (dense model) and DepGraph's λ (at the 15% budget), by validation
  accuracy with seed 0; the test split is never read."""
  val = split_validation(ds)[1]

  def accuracy(method: str, **kw: Any) -> float:
    rows = run_task(task, val, (0,), epochs, methods=(method,), progress=progress, **kw)
    return rows[0]['acc_slim']

  scores = {lr: accuracy('dense', lr=lr, depgraph_lambda=0.0, budgets_=()) for lr in task.lrs}
  lr = max(scores, key=scores.get)
  lam_scores = {
    lam: accuracy('depgraph', lr=lr, depgraph_lambda=lam, budgets_=(0.15,)) for lam in task.depgraph_lambdas
  }
  return {
    'lr': lr,
    'lr_validation': scores,
    'depgraph_lambda': max(lam_scores, key=lam_scores.get),
    'depgraph_validation': lam_scores,
  }


# ---------------------------------------------------------------------------------------------
# Summaries, the table, the plot.


def summarize(points: list[dict]) -> list[dict]:
  """Mean and sample standard deviation over seeds per (task, method, budget, λ)."""
  groups: dict[tuple, list[dict]] = {}
  for p in points:
    groups.setdefault((p['task'], p['method'], p['budget'], p.get('lmbda')), []).append(p)
  out = []
  for (task, method, budget, lmbda), rows in groups.items():

    def stat(key, rows=rows):
      v = [100 * r[key] for r in rows]
      return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0

    acc, acc_sd = stat('acc_slim')
    flops, flops_sd = stat('flops_remaining')
    out.append(
      {
        'task': task,
        'method': method,
        'budget': budget,
        'lmbda': lmbda,
        'seeds': len(rows),
        'acc': acc,
        'acc_sd': acc_sd,
        'flops': flops,
        'flops_sd': flops_sd,
        'slim_minus_full': max(abs(r['acc_slim'] - r['acc_full']) for r in rows) * 100,
      }
    )
  return out


# A point competes at a budget when its mean FLOPs are within this factor of it (DHSPG and HSPG
# land near, not at, a budget; a point far above it would win by keeping more).
SLACK = 1.1


def at_budget(summary: list[dict], task: str, budget: float) -> list[dict]:
  """Each method's row at ``budget``: its own for budgeted methods, and for HSPG the λ whose
  mean landing is nearest (its row says where it landed)."""
  rows = [r for r in summary if r['task'] == task and r['budget'] == budget]
  hspg = [r for r in summary if r['task'] == task and r['method'] == 'hspg']
  if hspg:
    rows.append(min(hspg, key=lambda r: abs(np.log(r['flops'] / (100 * budget)))))
  return rows


def _margin(a: dict, b: dict) -> float | None:
  """(a − b) in units of the larger of their seed standard deviations (None with one seed)."""
  sd = max(a['acc_sd'], b['acc_sd'])
  return (a['acc'] - b['acc']) / sd if sd > 0 else None


def _sd(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:+.1f}'


def winners(summary: list[dict], task: str, budgets_: tuple[float, ...]) -> list[dict]:
  out = []
  for b in budgets_:
    every = at_budget(summary, task, b)
    rows = [r for r in every if r['flops'] <= SLACK * 100 * b]
    rows.sort(key=lambda r: -r['acc'])
    if len(rows) < 2:
      # Nothing (or one method) gets there: the smallest model a method reached says how far.
      if every:
        out.append({'budget': b, 'floor': min(r['flops'] for r in every)})
      continue
    oto = [r for r in rows if r['method'] in OTO_FAMILY]
    base = [r for r in rows if r['method'] in PRUNE_THEN_TUNE]
    out.append(
      {
        'budget': b,
        'winner': rows[0],
        'runner_up': rows[1],
        'margin_sd': _margin(rows[0], rows[1]),
        'oto_best': oto[0] if oto else None,
        'baseline_best': base[0] if base else None,
        'oto_vs_baseline_sd': _margin(oto[0], base[0]) if oto and base else None,
      }
    )
  return out


def _label(r: dict) -> str:
  return f'{r["method"]} (λ={r["lmbda"]:g})' if r.get('lmbda') is not None else r['method']


def markdown(result: dict, png: str) -> str:
  """The RESULTS.md section: per task, every method at every budget, and the winners."""
  meta, summary = result['meta'], result['summary']
  lines = [
    '## The accuracy–FLOPs frontier',
    '',
    f'Generated by `python -m experiments.frontier` on {meta["date"]} ({meta["machine"]}) in '
    f'{meta["minutes"]:.1f} min: {len(meta["seeds"])} seeds, FLOPs budgets '
    f'{", ".join(f"{100 * b:g}%" for b in meta["budgets"])}, {meta["epochs"]} epochs for every method. '
    'Test accuracy of the slim model (mean ± sample standard deviation over seeds, in %) and the FLOPs '
    'it keeps. Hyperparameters were chosen on a validation split (15% of the training data, stratified); '
    'the final runs train on the other 85% and are scored on the test split. A method competes at a '
    f'budget when its mean FLOPs are at most {SLACK:g}× the budget; margins are in units of the larger '
    'seed standard deviation of the two. One-shot methods prune at '
    'half-way and fine-tune for the other half; OTO methods prune from 10% to 40% of training and keep '
    'training. HSPG has no budget: each λ of its grid lands where it lands, and the comparison at a '
    'budget uses the λ whose landing is nearest (its FLOPs are shown).',
    '',
    f'![accuracy against FLOPs remaining]({png})',
    '',
  ]
  for task, info in result['tasks'].items():
    rows = [r for r in summary if r['task'] == task]
    lines += [
      f'### {task}',
      '',
      f'Chosen on validation: learning rate {info["lr"]:g} '
      f'(of {", ".join(f"{float(k):g}" for k in info["lr_validation"])}), '
      f'DepGraph λ {info["depgraph_lambda"]:g}. Largest |slim − full| accuracy over all points: '
      f'{max(r["slim_minus_full"] for r in rows):.2f} pt.',
      '',
      '| method | ' + ' | '.join(f'{100 * b:g}% FLOPs' for b in meta['budgets']) + ' |',
      '|---|' + '---|' * len(meta['budgets']),
    ]
    dense = [r for r in rows if r['method'] == 'dense']
    if dense:
      d = dense[0]
      lines.append(
        f'| dense (100%) | {d["acc"]:.2f} ± {d["acc_sd"]:.2f} |' + ' |' * (len(meta['budgets']) - 1)
      )
    for method in METHODS[1:]:
      cells = []
      for b in meta['budgets']:
        hit = [r for r in at_budget(summary, task, b) if r['method'] == method]
        cells.append(
          f'{hit[0]["acc"]:.2f} ± {hit[0]["acc_sd"]:.2f} ({hit[0]["flops"]:.1f}%'
          + (f', λ={hit[0]["lmbda"]:g})' if hit[0].get('lmbda') is not None else ')')
          if hit
          else ''
        )
      if any(cells):
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    lines += [
      '',
      '| budget | winner | runner-up | margin (seed sd) | best OTO family | best prune-then-tune '
      '| OTO − prune-then-tune (seed sd) |',
      '|---|---|---|---:|---|---|---:|',
    ]
    for w in winners(summary, task, meta['budgets']):
      if 'floor' in w:
        lines.append(
          f'| {100 * w["budget"]:g}% | fewer than two methods reach it: the smallest slim model keeps '
          f'{w["floor"]:.1f}% (every node group keeps one ZIG) | | | | | |'
        )
        continue
      o, b = w['oto_best'], w['baseline_best']
      lines.append(
        f'| {100 * w["budget"]:g}% | {_label(w["winner"])} {w["winner"]["acc"]:.2f} | '
        f'{_label(w["runner_up"])} {w["runner_up"]["acc"]:.2f} | {_sd(w["margin_sd"])} | '
        + (f'{_label(o)} {o["acc"]:.2f} | ' if o else '| ')
        + (f'{_label(b)} {b["acc"]:.2f} | ' if b else '| ')
        + f'{_sd(w["oto_vs_baseline_sd"])} |'
      )
    lines.append('')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib
  import matplotlib.ticker

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  tasks = list(result['tasks'])
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in result['summary'] if r['task'] == task]
    for method in METHODS:
      mine = sorted((r for r in rows if r['method'] == method), key=lambda r: r['flops'])
      if not mine:
        continue
      if method == 'dense':
        d = mine[0]
        ax.axhline(d['acc'], color='k', lw=1, ls='--', label='dense')
        ax.axhspan(d['acc'] - d['acc_sd'], d['acc'] + d['acc_sd'], color='k', alpha=0.08)
        continue
      style = '-' if method in OTO_FAMILY else ':'
      ax.errorbar(
        [r['flops'] for r in mine],
        [r['acc'] for r in mine],
        xerr=[r['flops_sd'] for r in mine],
        yerr=[r['acc_sd'] for r in mine],
        ls=style,
        marker='o',
        ms=4,
        capsize=2,
        label=method,
      )
    ax.set_xscale('log')
    ax.set_xticks([4, 8, 15, 30, 50, 100])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('FLOPs remaining (%)')
    ax.set_ylabel('test accuracy of the slim model (%)')
    ax.set_title(task)
    ax.grid(alpha=0.3, which='both')
  axes[0][-1].legend(fontsize=8, loc='lower right')
  fig.suptitle('OTO family (solid) against prune-then-fine-tune (dotted)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_BEGIN, _END = '<!-- frontier:begin -->', '<!-- frontier:end -->'


def replace_section(text: str, body: str) -> str:
  """``text`` (RESULTS.md) with the frontier section replaced by ``body`` (or appended)."""
  block = f'{_BEGIN}\n{body}\n{_END}'
  if _BEGIN in text and _END in text:
    return text[: text.index(_BEGIN)] + block + text[text.index(_END) + len(_END) :]
  return text.rstrip('\n') + '\n\n' + block + '\n'


def section(text: str) -> str | None:
  """The frontier section's body in ``text`` (None when it has none): what
  ``experiments.results`` carries over when it rewrites the file."""
  if _BEGIN in text and _END in text:
    return text[text.index(_BEGIN) + len(_BEGIN) : text.index(_END)].strip('\n')
  return None


SIZES = {
  # (tasks, seeds, budgets, epochs or None for the task's own)
  'full': (tuple(TASKS), (0, 1, 2), BUDGETS, None),
  'tiny': (('digits',), (0,), (0.3,), 2),
}


def main(argv: list[str] | None = None) -> int:
  import platform

  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--size', choices=sorted(SIZES), default='full')
  ap.add_argument('--out', default='experiments', help='directory of frontier.json and frontier.png')
  ap.add_argument('--results', default='experiments/RESULTS.md', help='the Markdown file to update')
  ap.add_argument('--from-json', default=None, help='redraw the plot and the section from this JSON only')
  args = ap.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      return write(json.load(f), args)
  tasks, seeds, budgets_, epochs = SIZES[args.size]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  points, info = [], {}
  for name in tasks:
    task = TASKS[name]
    if args.size == 'tiny':
      task = dataclasses.replace(
        task,
        lrs=task.lrs[1:2],
        hspg_lambdas=task.hspg_lambdas[1:2],
        depgraph_lambdas=task.depgraph_lambdas[1:2],
      )
    n_epochs = epochs or task.epochs
    ds = task.load()
    info[name] = choose_hyperparameters(task, ds, n_epochs, print)
    final = split_validation(ds)[0]
    for p in run_task(
      task,
      final,
      seeds,
      n_epochs,
      lr=info[name]['lr'],
      depgraph_lambda=info[name]['depgraph_lambda'],
      budgets_=budgets_,
      methods=METHODS,
    ):
      points.append({'task': name, **p})
  result = {
    'meta': {
      'date': time.strftime('%Y-%m-%d'),
      'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} '
      f'on {jax.default_backend()}',
      'minutes': (time.perf_counter() - t0) / 60,
      'seeds': list(seeds),
      'budgets': list(budgets_),
      'epochs': epochs or {n: TASKS[n].epochs for n in tasks},
      'size': args.size,
    },
    'tasks': info,
    'points': points,
  }
  result['summary'] = summarize(points)
  if isinstance(result['meta']['epochs'], dict):
    result['meta']['epochs'] = ', '.join(f'{k}: {v}' for k, v in result['meta']['epochs'].items())
  with open(os.path.join(args.out, 'frontier.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return write(result, args)


def write(result: dict, args: argparse.Namespace) -> int:
  """The plot next to the JSON, and the frontier section of the results file."""
  png = os.path.join(args.out, 'frontier.png')
  plot(result, png)
  text = open(args.results).read() if os.path.exists(args.results) else '# oto_jax results\n'
  rel = os.path.relpath(png, os.path.dirname(os.path.abspath(args.results)))
  with open(args.results, 'w') as f:
    f.write(replace_section(text, markdown(result, rel)))
  print(markdown(result, rel))
  print(f'{result["meta"]["minutes"]:.1f} min')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
