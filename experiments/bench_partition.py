"""Cost of the ZIG analysis on large models, against the cost of tracing them.

For each model, the variables are built abstractly (``jax.eval_shape(model.init, ...)``: no
weights are ever allocated, so Llama-7B costs nothing to set up), and two measurements are
made, each in a fresh Python process so that neither inherits warm tracing caches or the
other's peak memory:

* the time of a first ``jax.make_jaxpr(model.apply)(variables, x)``;
* the time of a first ``oto_jax.zig_partition(model.apply, variables, x)`` (which traces the
  model itself), with the process's peak RSS and its growth over the RSS just before the call.

Usage::

  python -m experiments.bench_partition [--models resnet50,bert_base,llama7b] [--json PATH]
                                       [--repeat 3]

Each measurement is repeated ``--repeat`` times, every time in a fresh process, and the median
time is reported (the first call is what is timed in each). Prints a Markdown table. The
pass/fail targets are on the partition time, and for Llama-7B also on the absolute peak RSS of
the partitioning process.
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
  """Pass criteria: partition time, and optionally the partitioning process's peak RSS."""

  max_seconds: float
  max_peak_gb: float | None = None

  def describe(self) -> str:
    out = f'≤{self.max_seconds:g} s'
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
  'resnet50': Spec('ResNet-50', 'ResNet50', {}, (1, 224, 224, 3), 'float32', Target(0.3)),
  'bert_base': Spec('BERT-base', 'BertEncoder', {}, (1, 128), 'int32', Target(0.4)),
  'llama7b': Spec('Llama-7B', 'LlamaDecoder', {}, (1, 128), 'int32', Target(2.0, 1.5)),
  # Not in the default set: other shapes of the same families, without targets.
  'resnet18_cifar': Spec(
    'ResNet-18 (CIFAR)', 'ResNet18', {'cifar_stem': True, 'num_classes': 10}, (1, 32, 32, 3), 'float32', None
  ),
  'llama7b_scan': Spec('Llama-7B (nn.scan)', 'LlamaDecoder', {'scan_layers': True}, (1, 128), 'int32', None),
}

DEFAULT_MODELS = ('resnet50', 'bert_base', 'llama7b')

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


def _worker(name: str, measure: str) -> dict[str, Any]:
  import gc
  import resource

  import jax

  spec = SPECS[name]
  model = spec.build()
  x = jax.ShapeDtypeStruct(spec.input_shape, spec.input_dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(variables))

  if measure == 'jaxpr':
    call = lambda: jax.make_jaxpr(model.apply)(variables, x)
  elif measure == 'partition':
    import oto_jax

    if not hasattr(oto_jax, 'zig_partition'):
      return {'error': 'oto_jax.zig_partition does not exist yet'}
    call = lambda: oto_jax.zig_partition(model.apply, variables, x)
  else:
    raise ValueError(f'Unknown measurement {measure!r}.')

  # Collect first so that garbage left by setup is neither counted nor freed mid-call.
  gc.collect()
  rss_before = _current_rss_kib()
  peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  try:
    result = call()
  except Exception as e:  # Reported in the table rather than aborting the other models.
    return {'error': f'{type(e).__name__}: {e}'[:500]}
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

  out: dict[str, Any] = {
    'seconds': seconds,
    'num_params': n_params,
    'rss_before_kib': rss_before,
    'peak_rss_before_kib': peak_before,
    'peak_rss_kib': peak,
    # ru_maxrss only grows, so if setup peaked higher than the call, this over-states the
    # call's own growth; peak_rss_before_kib lets a reader tell.
    'delta_rss_kib': peak - rss_before,
  }
  if measure == 'jaxpr':
    out['num_eqns'] = len(result.jaxpr.eqns)
  else:
    out['num_zigs'] = int(result.num_zigs)
    out['num_node_groups'] = len(result.node_groups)
    out['num_prunable_groups'] = len(result.prunable_groups)
  return out


# -----------------------------------------------------------------------------------------------
# Parent: runs each measurement in its own process and reports.


def _run_worker(name: str, measure: str, timeout: float, platform: str) -> dict[str, Any]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get('PYTHONPATH')) if p)
  if platform:
    env['JAX_PLATFORMS'] = platform
  cmd = [sys.executable, '-m', 'experiments.bench_partition', '--worker', name, '--measure', measure]
  try:
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:g} s'}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_MARKER):
      return json.loads(line[len(_RESULT_MARKER) :])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {'error': f'worker exited with {proc.returncode}: ' + ' | '.join(tail)[:500]}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Median time over the runs and the largest peak RSS; counts from the first run.

  The median resists a run slowed by other load on the machine; the largest peak is the
  conservative choice for a memory budget. Any failed run makes the whole measurement fail.
  """
  errors = [r['error'] for r in runs if 'error' in r]
  if errors:
    return {'error': errors[0], 'runs': runs}
  out = dict(runs[0])
  out['seconds'] = statistics.median(r['seconds'] for r in runs)
  for k in ('peak_rss_kib', 'delta_rss_kib'):
    out[k] = max(r[k] for r in runs)
  out['runs'] = runs
  return out


def _gb(kib: int | None) -> float | None:
  return None if kib is None else kib * 1024 / 1e9


def _verdict(spec: Spec, part: dict[str, Any]) -> str:
  if 'error' in part:
    return 'error'
  if spec.target is None:
    return '-'
  ok = part['seconds'] <= spec.target.max_seconds
  if spec.target.max_peak_gb is not None:
    ok = ok and _gb(part['peak_rss_kib']) < spec.target.max_peak_gb
  return 'pass' if ok else 'FAIL'


def _fmt(v: float | None, digits: int = 3) -> str:
  return 'n/a' if v is None else f'{v:.{digits}f}'


def _table(rows: list[dict[str, Any]], specs: dict[str, Spec]) -> str:
  head = (
    'model',
    'make_jaxpr s',
    'partition s',
    'partition/make_jaxpr',
    'peak RSS GB',
    'ΔRSS GB',
    'ZIGs',
    'node groups (prunable/all)',
    'target',
    'result',
  )
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
  for r in rows:
    spec, jx, pt = specs[r['model']], r['make_jaxpr'], r['partition']
    js, ps = jx.get('seconds'), pt.get('seconds')
    groups = f'{pt["num_prunable_groups"]}/{pt["num_node_groups"]}' if 'num_node_groups' in pt else 'n/a'
    cells = (
      spec.label,
      _fmt(js),
      _fmt(ps),
      _fmt(ps / js if js and ps is not None else None, 2),
      _fmt(_gb(pt.get('peak_rss_kib')), 2),
      _fmt(_gb(pt.get('delta_rss_kib')), 2),
      str(pt.get('num_zigs', 'n/a')),
      groups,
      spec.target.describe() if spec.target else '-',
      _verdict(spec, pt),
    )
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--models', default=','.join(DEFAULT_MODELS), help='comma-separated, from: ' + ', '.join(SPECS)
  )
  parser.add_argument('--json', type=Path, help='also write the results to this file')
  parser.add_argument('--timeout', type=float, default=900.0, help='seconds per measurement process')
  parser.add_argument(
    '--repeat', type=int, default=3, help='fresh-process runs per measurement; times are their median'
  )
  parser.add_argument(
    '--platform',
    default='cpu',
    help="JAX_PLATFORMS for the workers ('' keeps the environment's); tracing "
    'runs on the host, and an accelerator runtime would only add to the RSS',
  )
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--measure', choices=('jaxpr', 'partition'), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print(_RESULT_MARKER + json.dumps(_worker(args.worker, args.measure)), flush=True)
    return 0

  specs = SPECS
  names = [n.strip() for n in args.models.split(',') if n.strip()]
  unknown = [n for n in names if n not in specs]
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {list(specs)}')
  if args.repeat < 1:
    parser.error('--repeat must be at least 1')

  rows = []
  for name in names:
    runs: dict[str, list[dict[str, Any]]] = {'jaxpr': [], 'partition': []}
    for i in range(args.repeat):
      # Alternate the two measurements so that a burst of outside load hits both alike.
      for measure in ('jaxpr', 'partition'):
        print(f'[{name}] {measure} run {i + 1}/{args.repeat} …', file=sys.stderr, flush=True)
        runs[measure].append(_run_worker(name, measure, args.timeout, args.platform))
    jx, pt = _summarise(runs['jaxpr']), _summarise(runs['partition'])
    spec = specs[name]
    rows.append(
      {
        'model': name,
        'config': {
          'class': spec.model_cls,
          'kwargs': spec.model_kwargs,
          'input': [list(spec.input_shape), spec.input_dtype],
        },
        'make_jaxpr': jx,
        'partition': pt,
        'result': _verdict(spec, pt),
      }
    )
    for what, r in (('make_jaxpr', jx), ('partition', pt)):
      if 'error' in r:
        print(f'[{name}] {what}: {r["error"]}', file=sys.stderr)

  print(_table(rows, specs))
  print()
  print(
    f'Times: median of {args.repeat} fresh-process run(s), first call in each. Peak RSS: '
    'ru_maxrss of the partitioning process, the largest over the runs (absolute; the Llama-7B '
    'memory target applies to it). ΔRSS: that peak minus the RSS just before the call.'
  )
  if hasattr(os, 'getloadavg'):
    load, ncpu = os.getloadavg()[0], os.cpu_count()
    print(f'Machine: {ncpu} CPUs, 1-minute load average {load:.2f} at the end of the run.')
  print(REFERENCE)

  if args.json:
    import platform

    meta = {
      'python': sys.version.split()[0],
      'machine': platform.machine(),
      'cpus': os.cpu_count(),
      'repeat': args.repeat,
      'loadavg': os.getloadavg() if hasattr(os, 'getloadavg') else None,
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
