"""Cost of the OTO optimizers against plain SGD with momentum, in one training run.

A ResNet-18 with the CIFAR stem (:class:`experiments.models.ResNet18`, 11.2M parameters) is
trained on random 32x32x3 images with BatchNorm in train mode. For each optimizer two jitted
functions are timed, with their state donated:

* the full training step: forward, backward, ``tx.update`` and ``optax.apply_updates``;
* the update alone: ``tx.update`` and ``optax.apply_updates`` on precomputed gradients.

Each is compiled and run once first; then the optimizers take turns (round-robin, the order
rotated every repeat so that none always runs right after another) for ``--repeats`` rounds of
``--steps`` steps (``--update-steps`` for the update alone), and the median over the rounds of
the time per step is compared with the baseline ``optax.sgd(0.1, momentum=0.9)``.

Usage::

  python -m experiments.bench_optimizers [--batch 8] [--steps 2] [--update-steps 10]
                                         [--repeats 5] [--json PATH]

Prints a Markdown table with pass/miss against the targets: a full step within 10% of the
baseline's for HSPG and HESSO, and the update alone within 2x of the baseline's update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import oto_jax
from experiments import models

BASELINE = 'sgd'
# A pruning window far longer than the benchmark, so HESSO is inside it at every timed step.
WINDOW = 1_000_000


@dataclasses.dataclass(frozen=True)
class Spec:
  """A benchmarked optimizer and its targets (ratios to the baseline; None: no target)."""

  label: str
  make: Callable[[oto_jax.ZIGPartition], optax.GradientTransformation]
  max_step_ratio: float | None = None
  max_update_ratio: float | None = None


SPECS: dict[str, Spec] = {
  'sgd': Spec('optax.sgd(0.1, momentum=0.9)', lambda part: optax.sgd(0.1, momentum=0.9)),
  'hspg': Spec(
    'hspg (n_p=0: half-space stage)',
    lambda part: oto_jax.hspg(part, 0.1, lmbda=1e-3, n_p=0, momentum=0.9),
    1.10,
    2.0,
  ),
  'hesso': Spec(
    'hesso (inside the window)',
    lambda part: oto_jax.hesso(
      part,
      0.1,
      target_group_sparsity=0.5,
      start_pruning_step=0,
      pruning_steps=WINDOW,
      pruning_periods=10,
      momentum=0.9,
    ),
    1.10,
    2.0,
  ),
  'dhspg': Spec(
    'dhspg (after the redundant set is chosen)',
    lambda part: oto_jax.dhspg(part, 0.1, target_group_sparsity=0.5, start_pruning_step=0, momentum=0.9),
    None,
    2.0,
  ),
  'prox_sg': Spec('prox_sg', lambda part: oto_jax.prox_sg(part, 0.1, 1e-3, momentum=0.9), None, 2.0),
}


def _setup(batch: int) -> dict[str, Any]:
  model = models.ResNet18(cifar_stem=True, num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
  # Jitted, with the 'rbg' generator: eager init compiles every op on its own.
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl='rbg'), x)
  part = oto_jax.zig_partition(model.apply, variables, x, train=False)

  def loss_fn(params, stats, x, y):
    logits, new = model.apply(
      {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

  grads = jax.jit(jax.grad(lambda p, s: loss_fn(p, s, x, y)[0]))(
    variables['params'], variables['batch_stats']
  )
  return dict(
    model=model,
    x=x,
    y=y,
    params=variables['params'],
    stats=variables['batch_stats'],
    part=part,
    loss_fn=loss_fn,
    grads=jax.block_until_ready(grads),
  )


class Runner:
  """One optimizer's compiled step and update, with its own (donated) training state."""

  def __init__(self, name: str, setup: dict[str, Any]):
    self.name = name
    tx = SPECS[name].make(setup['part'])
    loss_fn = setup['loss_fn']

    def step(params, stats, opt_state, x, y):
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    def update(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    self._step = jax.jit(step, donate_argnums=(0, 1, 2))
    self._update = jax.jit(update, donate_argnums=(0, 1))
    # Copies, so that donating one runner's state frees nothing another uses. The optimizer
    # state is copied leaf by leaf too: HESSO's init returns one array for two of its fields,
    # and XLA refuses to donate the same buffer twice.
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    self.x, self.y, self.grads = setup['x'], setup['y'], setup['grads']
    self.state = (copy(setup['params']), copy(setup['stats']), copy(tx.init(setup['params'])))
    self.u_state = (copy(setup['params']), copy(tx.init(setup['params'])))
    self.compile_seconds: dict[str, float] = {}

  def warm_up(self) -> None:
    for kind in ('step', 'update'):
      t0 = time.perf_counter()
      self.run(kind, 1)
      self.compile_seconds[kind] = time.perf_counter() - t0
      self.run(kind, 1)

  def run(self, kind: str, n: int) -> float:
    """Seconds per call over ``n`` back-to-back calls, waiting for the last one."""
    t0 = time.perf_counter()
    if kind == 'step':
      params, stats, opt_state = self.state
      for _ in range(n):
        params, stats, opt_state, loss = self._step(params, stats, opt_state, self.x, self.y)
      jax.block_until_ready((params, opt_state, loss))
      self.state = (params, stats, opt_state)
    else:
      params, opt_state = self.u_state
      for _ in range(n):
        params, opt_state = self._update(params, opt_state, self.grads)
      jax.block_until_ready((params, opt_state))
      self.u_state = (params, opt_state)
    return (time.perf_counter() - t0) / n


def _round_robin(runners: list[Runner], kind: str, n: int, repeats: int) -> dict[str, list[float]]:
  out: dict[str, list[float]] = {r.name: [] for r in runners}
  for rep in range(repeats):
    k = rep % len(runners)
    for r in runners[k:] + runners[:k]:
      out[r.name].append(r.run(kind, n))
    print(f'  {kind} round {rep + 1}/{repeats}', file=sys.stderr, flush=True)
  return out


def _verdict(ratio: float, target: float | None) -> str:
  if target is None:
    return '-'
  return 'pass' if ratio <= target else 'MISS'


def _table(rows: list[dict[str, Any]]) -> str:
  head = (
    'optimizer',
    'step ms',
    'step ÷ sgd',
    'est. from update',
    'target',
    'result',
    'update ms',
    'update ÷ sgd',
    'target',
    'result',
  )
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
  for r in rows:
    spec = SPECS[r['name']]
    cells = (
      spec.label,
      f'{1e3 * r["step_s"]:.1f}',
      f'{r["step_ratio"]:.3f}',
      f'{r["step_ratio_from_update"]:.3f}',
      f'≤{spec.max_step_ratio:g}' if spec.max_step_ratio else '-',
      r['step_result'],
      f'{1e3 * r["update_s"]:.1f}',
      f'{r["update_ratio"]:.2f}',
      f'≤{spec.max_update_ratio:g}' if spec.max_update_ratio else '-',
      r['update_result'],
    )
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _device() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return f'{jax.device_count()} x {d.platform} ({kind}), {os.cpu_count()} host CPUs'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=8, help='images per step (default 8)')
  parser.add_argument('--steps', type=int, default=2, help='full training steps per optimizer per round')
  parser.add_argument(
    '--update-steps', type=int, default=10, help='update-only calls per optimizer per round'
  )
  parser.add_argument('--repeats', type=int, default=5, help='round-robin rounds; times are their median')
  parser.add_argument(
    '--optimizers', default=','.join(SPECS), help='comma-separated, from: ' + ', '.join(SPECS)
  )
  parser.add_argument('--json', type=Path, help='also write the results to this file')
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
  unknown = [n for n in names if n not in SPECS]
  if unknown:
    parser.error(f'unknown optimizers {unknown}; choose from {list(SPECS)}')
  if BASELINE not in names:
    names.insert(0, BASELINE)
  if min(args.batch, args.steps, args.update_steps, args.repeats) < 1:
    parser.error('--batch, --steps, --update-steps and --repeats must be at least 1')

  t_start = time.perf_counter()
  load_start = os.getloadavg() if hasattr(os, 'getloadavg') else None
  print(f'Setting up ResNet-18 (CIFAR stem), batch {args.batch} …', file=sys.stderr, flush=True)
  setup = _setup(args.batch)
  runners = []
  for name in names:
    print(f'Compiling {name} …', file=sys.stderr, flush=True)
    runner = Runner(name, setup)
    runner.warm_up()
    runners.append(runner)
  print('Timing …', file=sys.stderr, flush=True)
  steps = _round_robin(runners, 'step', args.steps, args.repeats)
  updates = _round_robin(runners, 'update', args.update_steps, args.repeats)

  base_step, base_update = statistics.median(steps[BASELINE]), statistics.median(updates[BASELINE])
  rows = []
  for r in runners:
    spec = SPECS[r.name]
    step_s, update_s = statistics.median(steps[r.name]), statistics.median(updates[r.name])
    # The ratio within each round too: a burst of outside load hits both alike.
    paired_step = [a / b for a, b in zip(steps[r.name], steps[BASELINE], strict=True)]
    paired_update = [a / b for a, b in zip(updates[r.name], updates[BASELINE], strict=True)]
    rows.append(
      {
        'name': r.name,
        'label': spec.label,
        'step_s': step_s,
        'update_s': update_s,
        'step_ratio': step_s / base_step,
        'update_ratio': update_s / base_update,
        # The step ratio the update's extra cost alone predicts: steadier than the measured
        # one, whose noise on a loaded CPU can exceed the difference being measured.
        'step_ratio_from_update': (base_step + update_s - base_update) / base_step,
        'step_ratio_paired_median': statistics.median(paired_step),
        'update_ratio_paired_median': statistics.median(paired_update),
        'step_result': _verdict(step_s / base_step, spec.max_step_ratio),
        'update_result': _verdict(update_s / base_update, spec.max_update_ratio),
        'step_samples_s': steps[r.name],
        'update_samples_s': updates[r.name],
        'compile_s': r.compile_seconds,
      }
    )

  n_params = sum(int(p.size) for p in jax.tree.leaves(setup['params']))
  print(_table(rows))
  print()
  print(
    f'Model: ResNet-18 (CIFAR stem), {n_params / 1e6:.1f}M parameters, {setup["part"].num_zigs} ZIGs; '
    f'batch {args.batch}, BatchNorm in train mode. Device: {_device()}.'
  )
  print(
    f'Times: median over {args.repeats} round-robin rounds of {args.steps} steps '
    f'({args.update_steps} update-only calls); ratios are medians over the baseline median. '
    '"est. from update": (sgd step + this update - sgd update) / sgd step. The pass/miss uses '
    'the measured ratio.'
  )
  load_end = os.getloadavg() if hasattr(os, 'getloadavg') else None
  if load_end:
    print(f'1-minute load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end.')
  print(f'Total run time: {time.perf_counter() - t_start:.0f} s.')

  if args.json:
    import platform

    meta = {
      'python': sys.version.split()[0],
      'machine': platform.machine(),
      'device': _device(),
      'cpus': os.cpu_count(),
      'batch': args.batch,
      'steps': args.steps,
      'update_steps': args.update_steps,
      'repeats': args.repeats,
      'num_params': n_params,
      'num_zigs': int(setup['part'].num_zigs),
      'loadavg_start': load_start,
      'loadavg_end': load_end,
    }
    try:
      from importlib.metadata import version

      meta.update(jax=version('jax'), flax=version('flax'), optax=version('optax'))
    except Exception:
      pass
    args.json.write_text(json.dumps({'meta': meta, 'results': rows}, indent=2) + '\n')
  return 0 if all('MISS' not in (r['step_result'], r['update_result']) for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
