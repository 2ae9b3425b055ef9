"""Pruning at scale: plan a 70B model abstractly, and cut a sharded model without gathering it.

Two measurements, each in a fresh Python process (so that peak memory is the process's own):

* **plan**: ``zig_partition`` and ``plan_subnet(budget=flops_budget(0.5))`` of Llama-shaped
  decoders built abstractly (``jax.eval_shape``: no weights exist), bfloat16 parameters.
  Llama-2-70B: 80 layers, hidden 8192, 64 heads, 8 KV heads, MLP 28672; Llama-7B: 32 layers,
  hidden 4096, 32 heads, MLP 11008. Targets for 70B: partition + plan ≤ 10 s, peak RSS < 4 GB.
* **cut**: ``construct_subnet`` of a ~1 GB model (a stack of 4096×4096 float32 layers, every
  kernel sharded on its output axis over 8 host CPU devices, half of every layer's units
  zero), against the host path it replaced (``jax.device_get`` of every leaf, NumPy slicing,
  ``jax.device_put`` with the slim shardings). Reported: seconds, and peak RSS growth over the
  resident model while the cut runs (VmHWM reset through ``/proc/self/clear_refs``, read from
  ``/proc/self/status``; on host CPU devices the model itself lives in host memory).

Usage::

  python -m experiments.bench_scale [--json PATH]

Prints Markdown tables and exits with 1 if the 70B plan misses its targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MARKER = 'BENCH_SCALE '
_REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMAS = {
  'llama2_70b': (
    'Llama-2-70B',
    dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, mlp_dim=28672),
  ),
  'llama7b': ('Llama-7B', dict(hidden_size=4096, num_layers=32, num_heads=32, mlp_dim=11008)),
}
PLAN_TARGET_S, PLAN_TARGET_GB = 10.0, 4.0
CUT_LAYERS, CUT_WIDTH, NUM_DEVICES = 16, 4096, 8


def rss_gb(field: str = 'VmRSS') -> float:
  """The process's resident set (``VmRSS``) or its high-water mark (``VmHWM``), in GB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024 / 1e9
  raise RuntimeError(f'{field} not in /proc/self/status')


def peak_during(fn) -> tuple[Any, float, float]:
  """Runs ``fn()``; returns its result, the RSS before and the peak RSS while it ran (GB)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets VmHWM to the current RSS
  before = rss_gb()
  out = fn()
  return out, before, rss_gb('VmHWM')


def _plan(name: str) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  import oto_jax
  from experiments.models import LlamaDecoder

  label, config = LLAMAS[name]
  model = LlamaDecoder(**config, param_dtype=jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  t0 = time.perf_counter()
  part = oto_jax.zig_partition(model.apply, abstract, tokens)
  t1 = time.perf_counter()
  plan = oto_jax.plan_subnet(part, abstract, budget=oto_jax.flops_budget(0.5))
  t2 = time.perf_counter()
  report = plan.report
  return {
    'model': label,
    'params_full': report.params[0],
    'zigs': part.num_zigs,
    'partition_s': t1 - t0,
    'plan_s': t2 - t1,
    'peak_rss_gb': rss_gb('VmHWM'),
    'flops_remaining': report.flops[1] / report.flops[0],
    'params_remaining': report.params[1] / report.params[0],
  }


def _cut() -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import oto_jax
  from oto_jax.slicing import slim_sharding

  mesh = jax.make_mesh((NUM_DEVICES,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  kernel_sharding = NamedSharding(mesh, P(None, 'fsdp'))

  def forward(params, x):
    for w in params['layers']:
      x = jax.nn.relu(x @ w)
    return x @ params['head']

  def init():
    # Half of every layer's units zero (the even ones): what group-sparse training leaves.
    mask = (jnp.arange(CUT_WIDTH) % 2).astype(jnp.float32)
    keys = jax.random.split(jax.random.key(0), CUT_LAYERS + 1)
    layers = [jax.random.normal(k, (CUT_WIDTH, CUT_WIDTH)) * mask for k in keys[:-1]]
    return {'layers': layers, 'head': jax.random.normal(keys[-1], (CUT_WIDTH, 16))}

  shardings = {'layers': [kernel_sharding] * CUT_LAYERS, 'head': NamedSharding(mesh, P())}
  params = jax.jit(init, out_shardings=shardings)()
  jax.block_until_ready(params)
  model_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
  x = jax.ShapeDtypeStruct((8, CUT_WIDTH), jnp.float32)
  part = oto_jax.zig_partition(forward, params, x)

  def device_path():
    subnet = oto_jax.construct_subnet(part, params)
    jax.block_until_ready(subnet.variables)
    return subnet

  t0 = time.perf_counter()
  subnet, before, peak = peak_during(device_path)
  device_s = time.perf_counter() - t0

  def host_path():
    # What construct_subnet did before: every leaf onto the host, sliced there, put back.
    host = jax.device_get(params)
    leaves = jax.tree.leaves(host)
    slim_leaves = jax.tree.leaves(subnet.variables)
    out = []
    for v, full, slim_leaf in zip(part.program.variables, leaves, slim_leaves):
      cut = np.asarray(full)
      for ax in range(cut.ndim):
        k = subnet._cut.kept(v, ax)
        if k is not None:
          cut = np.take(cut, k, axis=ax)
      out.append(jax.device_put(cut, slim_sharding(slim_leaf.sharding, cut.shape)))
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  host_out, host_before, host_peak = peak_during(host_path)
  host_s = time.perf_counter() - t0
  same = all(
    np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(host_out, jax.tree.leaves(subnet.variables))
  )
  slim_gb = sum(x.nbytes for x in jax.tree.leaves(subnet.variables)) / 1e9
  sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(subnet.variables))
  return {
    'model_gb': model_gb,
    'slim_gb': slim_gb,
    'device_s': device_s,
    'device_growth_gb': peak - before,
    'host_s': host_s,
    'host_growth_gb': host_peak - host_before,
    'same_result': same,
    'sharded_slim_leaves': sharded,
    'slim_leaves': len(jax.tree.leaves(subnet.variables)),
  }


def _run(args: list[str], env: dict | None = None) -> dict[str, Any]:
  cmd = [sys.executable, '-m', 'experiments.bench_scale', *args]
  proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
  for line in proc.stdout.splitlines():
    if line.startswith(_MARKER):
      return json.loads(line[len(_MARKER) :])
  raise RuntimeError(f'{" ".join(args)} failed:\n{proc.stderr[-3000:]}')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--json', help='also write the results here')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    result = _cut() if args.worker == 'cut' else _plan(args.worker)
    print(_MARKER + json.dumps(result), flush=True)
    return 0

  plans = []
  for name in LLAMAS:
    print(f'[plan] {LLAMAS[name][0]} …', file=sys.stderr, flush=True)
    plans.append(_run(['--worker', name]))
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    f'{env.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={NUM_DEVICES}'.strip()
  )
  env['JAX_PLATFORMS'] = 'cpu'
  print('[cut] sharded model …', file=sys.stderr, flush=True)
  cut = _run(['--worker', 'cut'], env)

  print(
    '| model | parameters | ZIGs | partition s | plan (50% FLOPs) s | total s | peak RSS GB '
    '| FLOPs / params kept |'
  )
  print('|---|---|---|---|---|---|---|---|')
  ok = True
  for r in plans:
    total = r['partition_s'] + r['plan_s']
    if r['model'] == 'Llama-2-70B':
      ok = total <= PLAN_TARGET_S and r['peak_rss_gb'] < PLAN_TARGET_GB
    print(
      f'| {r["model"]} | {r["params_full"] / 1e9:.1f} B | {r["zigs"]:,} | {r["partition_s"]:.2f} | '
      f'{r["plan_s"]:.2f} | {total:.2f} | {r["peak_rss_gb"]:.2f} | '
      f'{r["flops_remaining"]:.1%} / {r["params_remaining"]:.1%} |'
    )
  print(
    f'\n70B target: partition + plan ≤ {PLAN_TARGET_S:.0f} s and peak RSS < {PLAN_TARGET_GB:.0f} GB: '
    f'{"pass" if ok else "MISS"}.\n'
  )
  print(
    f'construct_subnet of a {cut["model_gb"]:.2f} GB model sharded over {NUM_DEVICES} host devices '
    f'(slim {cut["slim_gb"]:.2f} GB; {cut["sharded_slim_leaves"]}/{cut["slim_leaves"]} slim leaves '
    'sharded):\n'
  )
  print('| path | seconds | peak RSS growth GB | growth / model size |')
  print('|---|---|---|---|')
  for label, s, g in (
    ('on device (construct_subnet)', cut['device_s'], cut['device_growth_gb']),
    ('host round trip (before)', cut['host_s'], cut['host_growth_gb']),
  ):
    print(f'| {label} | {s:.2f} | {g:.2f} | {g / cut["model_gb"]:.2f} |')
  print(f'\nSame slim variables both ways: {cut["same_result"]}.')
  if args.json:
    Path(args.json).write_text(json.dumps({'plan': plans, 'cut': cut}, indent=1))
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
