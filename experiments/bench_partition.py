"""Cost of the ZIG analysis on large models, against the cost of tracing them.

The headline figure is warm-to-warm: ``oto_jax.zig_partition`` against a ``jax.make_jaxpr`` of
the same function, both after a warm-up in the same process, so that what is compared is the
analysis' own work over the trace, not one-off start-up costs (imports, JAX's and Flax's lazy
initialisation). The target is a ratio of at most 1.2.

For each model, the variables are built abstractly (``jax.eval_shape(model.init, ...)``: no
weights are ever allocated, so Llama-7B costs nothing to set up), and every measurement runs in
a fresh Python process:

* warm: one untimed ``make_jaxpr`` and one untimed ``zig_partition``, then ``--repeat`` rounds,
  each a timed ``make_jaxpr`` and a timed ``zig_partition``, in alternating order. Every call gets a fresh
  function object (``lambda v, x: model.apply(v, x)``), so JAX's trace cache cannot answer
  it, and ``gc.collect()`` runs before it. Reported: the median time of each and the median of
  the per-round ratios (a burst of outside load slows both calls of a round alike, so the
  ratio is steadier than the ratio of the medians);
* first call: the first ``zig_partition`` in a fresh process, with the process's peak RSS (the
  Llama-7B memory target, < 1.5 GB, applies to it) and its growth over the RSS just before the
  call; and, in another fresh process, the first ``make_jaxpr``.

Usage::

  python -m experiments.bench_partition [--models resnet50,bert_base,vit_b16,llama7b]
                                       [--repeat 7] [--fresh 1] [--json PATH]

Prints a Markdown table and exits with 1 if any model misses its target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The marker that precedes a worker's JSON result on its stdout, so that whatever else the
# worker prints (warnings, logging) cannot be mistaken for the result.
_RESULT_MARKER = 'BENCH_RESULT '
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Target:
  """Pass criteria: warm partition time over warm make_jaxpr time, and optionally peak RSS.

  Attributes:
    max_ratio: the largest median ratio ``zig_partition / make_jaxpr`` (both warm).
    max_peak_gb: if set, the first-call partitioning process's peak RSS must stay below it.
  """

  max_ratio: float
  max_peak_gb: float | None = None

  def describe(self) -> str:
    out = f'≤{self.max_ratio:g}×'
    if self.max_peak_gb is not None:
      out += f', <{self.max_peak_gb:g} GB'
    return out


@dataclasses.dataclass(frozen=True)
class Spec:
  """A benchmarked model: a class of :mod:`experiments.models` with its arguments, its input,
  and the target (if any). Named rather than held, so the parent needs no JAX import."""

  label: str
  model_cls: str
  model_kwargs: dict[str, Any]
  input_shape: tuple[int, ...]
  input_dtype: str
  target: Target | None

  def build(self) -> Any:
    from experiments import models

    return getattr(models, self.model_cls)(**self.model_kwargs)


SPECS: dict[str, Spec] = {
  'resnet50': Spec('ResNet-50', 'ResNet50', {}, (1, 224, 224, 3), 'float32', Target(1.2)),
  'bert_base': Spec('BERT-base', 'BertEncoder', {}, (1, 128), 'int32', Target(1.2)),
  'vit_b16': Spec('ViT-B/16', 'ViT', {}, (1, 224, 224, 3), 'float32', Target(1.2)),
  'llama7b': Spec('Llama-7B', 'LlamaDecoder', {}, (1, 128), 'int32', Target(1.2, 1.5)),
  # Not in the default set: other shapes of the same families, without targets.
  'resnet18_cifar': Spec(
    'ResNet-18 (CIFAR)', 'ResNet18', {'cifar_stem': True, 'num_classes': 10}, (1, 32, 32, 3), 'float32', None
  ),
  'llama7b_scan': Spec('Llama-7B (nn.scan)', 'LlamaDecoder', {'scan_layers': True}, (1, 128), 'int32', None),
}

DEFAULT_MODELS = ('resnet50', 'bert_base', 'vit_b16', 'llama7b')

# Published figures for scale (PyTorch, from the OTOv2 paper's comparison).
REFERENCE = (
  'Reference (PyTorch): OTO builds its groups for ResNet-50 in 0.35 s and for BERT-base in '
  '1.64 s; Torch-Pruning takes 0.09 s and 0.21 s, without proving zero-invariance.'
)

# -----------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process.


def _current_rss_kib() -> int:
  """The process's resident set size now, in KiB (ru_maxrss's unit on Linux)."""
  import resource

  try:
    with open('/proc/self/statm') as f:
      pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') // 1024
  except (OSError, ValueError):
    # Without /proc, the peak so far is the best available upper bound.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _partition_counts(part: Any) -> dict[str, int]:
  return {
    'num_zigs': int(part.num_zigs),
    'num_node_groups': len(part.node_groups),
    'num_prunable_groups': len(part.prunable_groups),
  }


def _worker(name: str, measure: str, repeat: int) -> dict[str, Any]:
  """Runs one measurement of model ``name`` in this process and returns it as plain data.

  Args:
    name: a key of :data:`SPECS`.
    measure: ``'jaxpr'`` or ``'partition'`` (the first call in this process) or ``'warm'``
      (warm-up, then ``repeat`` rounds of both).
    repeat: the number of warm rounds.

  Returns:
    The measurement, or ``{'error': message}``.
  """
  import gc
  import resource

  import jax

  spec = SPECS[name]
  model = spec.build()
  x = jax.ShapeDtypeStruct(spec.input_shape, spec.input_dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(variables))

  # A new function object per call: JAX caches traces by function identity, so reusing one
  # would time a cache lookup instead of a trace.
  def trace() -> Any:
    return jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)

  if measure in ('partition', 'warm'):
    import oto_jax

    if not hasattr(oto_jax, 'zig_partition'):
      return {'error': 'oto_jax.zig_partition does not exist yet'}

    def partition() -> Any:
      return oto_jax.zig_partition(lambda v, x: model.apply(v, x), variables, x)

  def timed(call: Any) -> tuple[float, Any]:
    # Collect first so that garbage left by earlier calls is neither counted nor freed mid-call.
    gc.collect()
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result

  try:
    if measure == 'jaxpr':
      seconds, jaxpr = timed(trace)
      return {'seconds': seconds, 'num_params': n_params, 'num_eqns': len(jaxpr.jaxpr.eqns)}

    if measure == 'partition':
      gc.collect()
      rss_before = _current_rss_kib()
      peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      seconds, part = timed(partition)
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      return {
        'seconds': seconds,
        'num_params': n_params,
        'rss_before_kib': rss_before,
        'peak_rss_before_kib': peak_before,
        'peak_rss_kib': peak,
        # ru_maxrss only grows, so if setup peaked higher than the call, this over-states the
        # call's own growth; peak_rss_before_kib lets a reader tell.
        'delta_rss_kib': peak - rss_before,
        **_partition_counts(part),
      }

    if measure != 'warm':
      raise ValueError(f'Unknown measurement {measure!r}.')
    trace()
    part = partition()
    counts = _partition_counts(part)
    del part
    jaxpr_s, partition_s = [], []
    for i in range(repeat):
      # Every other round runs the partition first, so that neither call always follows the
      # other (an order effect would bias every round's ratio the same way).
      for which in ('jaxpr', 'partition') if i % 2 == 0 else ('partition', 'jaxpr'):
        if which == 'jaxpr':
          seconds, jaxpr = timed(trace)
          jaxpr_s.append(seconds)
          num_eqns = len(jaxpr.jaxpr.eqns)
          del jaxpr
        else:
          seconds, part = timed(partition)
          partition_s.append(seconds)
          del part
  except Exception as e:  # Reported in the table rather than aborting the other models.
    return {'error': f'{type(e).__name__}: {e}'[:500]}

  ratios = [p / j for p, j in zip(partition_s, jaxpr_s, strict=True)]
  return {
    'make_jaxpr_s': statistics.median(jaxpr_s),
    'partition_s': statistics.median(partition_s),
    'ratio': statistics.median(ratios),
    'make_jaxpr_runs_s': jaxpr_s,
    'partition_runs_s': partition_s,
    'ratio_runs': ratios,
    'num_params': n_params,
    'num_eqns': num_eqns,
    'peak_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    **counts,
  }


# -----------------------------------------------------------------------------------------------
# Parent: runs each measurement in its own process and reports.


def _run_worker(name: str, measure: str, repeat: int, timeout: float, platform: str) -> dict[str, Any]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get('PYTHONPATH')) if p)
  if platform:
    env['JAX_PLATFORMS'] = platform
  cmd = [
    sys.executable,
    '-m',
    'experiments.bench_partition',
    '--worker',
    name,
    '--measure',
    measure,
    '--repeat',
    str(repeat),
  ]
  try:
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:g} s'}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_MARKER):
      return json.loads(line[len(_RESULT_MARKER) :])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {'error': f'worker exited with {proc.returncode}: ' + ' | '.join(tail)[:500]}


def _summarise_first(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Median first-call time over the fresh processes and the largest peak RSS.

  The median resists a run slowed by other load on the machine; the largest peak is the
  conservative choice for a memory budget. Any failed run makes the whole measurement fail.
  """
  errors = [r['error'] for r in runs if 'error' in r]
  if errors:
    return {'error': errors[0], 'runs': runs}
  out = dict(runs[0])
  out['seconds'] = statistics.median(r['seconds'] for r in runs)
  for k in ('peak_rss_kib', 'delta_rss_kib'):
    if k in out:
      out[k] = max(r[k] for r in runs)
  out['runs'] = runs
  return out


def _gb(kib: int | None) -> float | None:
  return None if kib is None else kib * 1024 / 1e9


def _verdict(spec: Spec, warm: dict[str, Any], first: dict[str, Any]) -> str:
  if 'error' in warm or 'error' in first:
    return 'error'
  if spec.target is None:
    return '-'
  ok = warm['ratio'] <= spec.target.max_ratio
  if spec.target.max_peak_gb is not None:
    ok = ok and _gb(first['peak_rss_kib']) < spec.target.max_peak_gb
  return 'pass' if ok else 'FAIL'


def _fmt(v: float | None, digits: int = 3) -> str:
  return 'n/a' if v is None else f'{v:.{digits}f}'


def _table(rows: list[dict[str, Any]], specs: dict[str, Spec]) -> str:
  head = (
    'model',
    'warm make_jaxpr s',
    'warm zig_partition s',
    'ratio',
    'target',
    'result',
    'first-call make_jaxpr s',
    'first-call partition s',
    'peak RSS GB',
    'ZIGs',
    'node groups (prunable/all)',
  )
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
  for r in rows:
    spec, warm, fj, fp = specs[r['model']], r['warm'], r['first_jaxpr'], r['first_partition']
    counts = warm if 'num_zigs' in warm else fp
    groups = (
      f'{counts["num_prunable_groups"]}/{counts["num_node_groups"]}' if 'num_node_groups' in counts else 'n/a'
    )
    cells = (
      spec.label,
      _fmt(warm.get('make_jaxpr_s')),
      _fmt(warm.get('partition_s')),
      _fmt(warm.get('ratio'), 2),
      spec.target.describe() if spec.target else '-',
      r['result'],
      _fmt(fj.get('seconds')),
      _fmt(fp.get('seconds')),
      _fmt(_gb(fp.get('peak_rss_kib')), 2),
      str(counts.get('num_zigs', 'n/a')),
      groups,
    )
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _load() -> float | None:
  return os.getloadavg()[0] if hasattr(os, 'getloadavg') else None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--models', default=','.join(DEFAULT_MODELS), help='comma-separated, from: ' + ', '.join(SPECS)
  )
  parser.add_argument('--json', type=Path, help='also write the results to this file')
  parser.add_argument('--timeout', type=float, default=900.0, help='seconds per measurement process')
  parser.add_argument(
    '--repeat',
    type=int,
    default=15,
    help='warm rounds (make_jaxpr and zig_partition, in alternating order); times are medians',
  )
  parser.add_argument(
    '--fresh',
    type=int,
    default=1,
    help='fresh processes per first-call measurement (median time, largest peak RSS)',
  )
  parser.add_argument(
    '--platform',
    default='cpu',
    help="JAX_PLATFORMS for the workers ('' keeps the environment's); tracing "
    'runs on the host, and an accelerator runtime would only add to the RSS',
  )
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--measure', choices=('jaxpr', 'partition', 'warm'), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print(_RESULT_MARKER + json.dumps(_worker(args.worker, args.measure, args.repeat)), flush=True)
    return 0

  specs = SPECS
  names = [n.strip() for n in args.models.split(',') if n.strip()]
  unknown = [n for n in names if n not in specs]
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {list(specs)}')
  if args.repeat < 1:
    parser.error('--repeat must be at least 1')
  if args.fresh < 1:
    parser.error('--fresh must be at least 1')

  load_start = _load()
  rows = []
  for name in names:
    first: dict[str, list[dict[str, Any]]] = {'jaxpr': [], 'partition': []}
    for i in range(args.fresh):
      # Alternate the two so that a burst of outside load hits both alike.
      for measure in ('partition', 'jaxpr'):
        print(f'[{name}] first-call {measure} {i + 1}/{args.fresh} …', file=sys.stderr, flush=True)
        first[measure].append(_run_worker(name, measure, 1, args.timeout, args.platform))
    print(f'[{name}] warm, {args.repeat} round(s) …', file=sys.stderr, flush=True)
    warm = _run_worker(name, 'warm', args.repeat, args.timeout, args.platform)
    fj, fp = _summarise_first(first['jaxpr']), _summarise_first(first['partition'])
    spec = specs[name]
    rows.append(
      {
        'model': name,
        'config': {
          'class': spec.model_cls,
          'kwargs': spec.model_kwargs,
          'input': [list(spec.input_shape), spec.input_dtype],
        },
        'warm': warm,
        'first_jaxpr': fj,
        'first_partition': fp,
        'loadavg_after': _load(),
        'result': _verdict(spec, warm, fp),
      }
    )
    for what, r in (('warm', warm), ('first-call make_jaxpr', fj), ('first-call partition', fp)):
      if 'error' in r:
        print(f'[{name}] {what}: {r["error"]}', file=sys.stderr)

  print(_table(rows, specs))
  print()
  print(
    f'Warm: medians over {args.repeat} round(s) in one process after a warm-up, each call on a '
    'fresh function object; ratio: median of the per-round zig_partition/make_jaxpr ratios. '
    f'First call: median over {args.fresh} fresh process(es). Peak RSS: ru_maxrss of the '
    'first-call partitioning process, the largest over them (absolute; the Llama-7B memory '
    'target applies to it).'
  )
  load_end = _load()
  if load_end is not None:
    print(
      f'Machine: {os.cpu_count()} CPUs, 1-minute load average {load_start:.2f} at the start of the '
      f'run and {load_end:.2f} at the end.'
    )
  print(REFERENCE)

  if args.json:
    import platform

    meta = {
      'python': sys.version.split()[0],
      'machine': platform.machine(),
      'cpus': os.cpu_count(),
      'repeat': args.repeat,
      'fresh': args.fresh,
      'loadavg_start': load_start,
      'loadavg_end': load_end,
      'jax_platforms': args.platform or os.environ.get('JAX_PLATFORMS', ''),
    }
    try:
      from importlib.metadata import version

      meta.update(jax=version('jax'), flax=version('flax'))
    except Exception:
      pass
    args.json.write_text(json.dumps({'meta': meta, 'results': rows}, indent=2) + '\n')
  return 0 if all(r['result'] in ('pass', '-') for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
