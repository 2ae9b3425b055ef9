"""The optimizers under data-parallel and fully-sharded meshes give the one-device result.

The checks need several devices, so they run in a fresh worker process (this file run as a
module: ``python -m tests.test_sharding [cnn|attention]``) with 8 host CPU devices
(:mod:`tests.multidevice`). The worker trains two
small models (a conv net with BatchNorm and a residual add, and an attention block with
heads) with HSPG, HESSO and DHSPG for a few jitted steps three ways:

* on one device;
* data-parallel: the batch sharded over a ``('data',)`` mesh of 8 devices, the rest
  replicated, shardings left to ``jax.jit`` to propagate from ``jax.device_put``;
* fully sharded: every parameter, batch statistic and same-shaped optimizer-state leaf
  sharded along its largest axis divisible by 8, with explicit ``in_shardings`` and
  ``out_shardings``;

and reports, per case, whether the final parameters agree with the one-device run, whether
the same ZIGs are exactly zero, and whether the outputs really are sharded.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import pytest

from tests.multidevice import NUM_DEVICES, run_workers

STEPS = 10
RTOL, ATOL = 1e-4, 1e-5
# The marker before each JSON line of the worker's report on its stdout.
MARKER = 'SHARDING_CASE '

MODELS = ('cnn', 'attention')
OPTIMIZERS = ('hspg', 'hesso', 'dhspg')
MODES = ('data_parallel', 'fully_sharded')

# -----------------------------------------------------------------------------------------------
# Worker (runs in the subprocess, after XLA_FLAGS is set).


def _models():
  """The two small models, defined here so that only the worker imports flax."""
  import flax.linen as nn
  import jax.numpy as jnp

  class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a residual pair of convs, a strided conv, global pooling, a Dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
      norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
      x = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))
      y = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))
      y = norm()(nn.Conv(16, (3, 3), use_bias=False)(y))
      x = nn.relu(x + y)
      x = nn.relu(norm()(nn.Conv(32, (3, 3), strides=2)(x)))
      return nn.Dense(10)(x.mean(axis=(1, 2)))

  class SmallAttention(nn.Module):
    """An embedding, multi-head self-attention with q/k/v Dense layers, an MLP, a Dense head."""

    dim: int = 16
    heads: int = 4
    head_dim: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
      del train
      b, length, _ = x.shape
      x = nn.Dense(self.dim)(x)
      q, k, v = (
        nn.Dense(self.heads * self.head_dim, name=n)(x).reshape(b, length, self.heads, self.head_dim)
        for n in ('query', 'key', 'value')
      )
      att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(float(self.head_dim))
      ctx = jnp.einsum('bhqk,bkhd->bqhd', nn.softmax(att, axis=-1), v)
      x = nn.LayerNorm()(x + nn.Dense(self.dim, name='out')(ctx.reshape(b, length, -1)))
      x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(64)(x)))
      return nn.Dense(10)(x.mean(axis=1))

  return {'cnn': (SmallCNN(), (16, 8, 8, 3)), 'attention': (SmallAttention(), (16, 8, 12))}


def _optimizer(name: str, part: Any):
  """HSPG crosses n_p, HESSO runs a whole two-period window, DHSPG picks its set mid-run."""
  import oto_jax

  if name == 'hspg':
    return oto_jax.hspg(part, 0.1, lmbda=0.8, n_p=3, epsilon=0.9, momentum=0.9)
  if name == 'hesso':
    return oto_jax.hesso(
      part,
      0.1,
      target_group_sparsity=0.5,
      start_pruning_step=2,
      pruning_steps=6,
      pruning_periods=2,
      momentum=0.9,
    )
  if name == 'dhspg':
    return oto_jax.dhspg(
      part, 0.1, target_group_sparsity=0.5, start_pruning_step=2, lmbda=1.0, epsilon=0.9, momentum=0.9
    )
  raise ValueError(name)


def _largest_divisible_axis(shape: tuple[int, ...], n: int) -> int | None:
  """The largest axis of ``shape`` whose size is a multiple of ``n`` (the first among ties)."""
  best = None
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n and (best is None or size > shape[best]):
      best = axis
  return best


@functools.cache
def _setup(model_name: str) -> dict[str, Any]:
  """The model, its data, variables and partition, shared by the optimizers."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import oto_jax

  model, x_shape = _models()[model_name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=x_shape[0]), jnp.int32)
  # Jitted, with the 'rbg' generator: eager init compiles every op on its own, and XLA:CPU is
  # slow to compile the threefry hash.
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl='rbg'), x)
  part = oto_jax.zig_partition(model.apply, variables, x, train=False)
  # On host copies: one compiled call, instead of eager ops on arrays spread over 8 devices.
  zero_zigs = jax.jit(lambda p: part.zig_norms(p) == 0)
  return dict(
    model=model,
    x=x,
    y=y,
    params=variables['params'],
    stats=variables.get('batch_stats', {}),
    part=part,
    zero_zigs=zero_zigs,
  )


def _run_case(model_name: str, opt_name: str) -> dict[str, Any]:
  import jax
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  s = _setup(model_name)
  model, x, y, part = s['model'], s['x'], s['y'], s['part']
  params0, stats0 = s['params'], s['stats']
  tx = _optimizer(opt_name, part)
  # Sharded copies are made from host arrays: numpy slicing, instead of a compiled slice per shape.
  host = lambda tree: jax.tree.map(np.asarray, tree)

  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      if stats:
        logits, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
        new_stats = new['batch_stats']
      else:
        logits, new_stats = model.apply({'params': p}, x, train=True), stats
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  seconds: dict[str, float] = {}
  compiles: dict[str, int] = {}

  def train(mode, fn, params, stats, opt_state, x, y):
    t0 = time.perf_counter()
    losses = []
    for _ in range(STEPS):
      params, stats, opt_state, loss = fn(params, stats, opt_state, x, y)
      losses.append(loss)
    out = jax.block_until_ready((params, stats, opt_state, losses))
    seconds[mode] = time.perf_counter() - t0
    compiles[mode] = fn._cache_size()
    return out

  runs: dict[str, Any] = {}
  # (a) One device: no mesh, nothing committed; everything lives on the default device.
  runs['single'] = train('single', jax.jit(step), params0, stats0, tx.init(params0), x, y)

  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ('data',))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('data'))

  # (b) Data-parallel: batch sharded, params, statistics and state replicated; jit takes the
  # input shardings from the arguments and propagates them through the step.
  put = lambda tree, sh: jax.device_put(host(tree), jax.tree.map(lambda _: sh, tree))
  runs['data_parallel'] = train(
    'data_parallel',
    jax.jit(step, out_shardings=(replicated, replicated, replicated, replicated)),
    put(params0, replicated),
    put(stats0, replicated),
    put(tx.init(params0), replicated),
    jax.device_put(np.asarray(x), batch),
    jax.device_put(np.asarray(y), batch),
  )

  # (c) Fully sharded: every leaf along its largest axis divisible by the mesh size; optimizer
  # state leaves shaped like a parameter are sharded like it, the rest replicated.
  def fsdp(leaf):
    axis = _largest_divisible_axis(tuple(np.shape(leaf)), NUM_DEVICES)
    if axis is None:
      return replicated
    spec = [None] * np.ndim(leaf)
    spec[axis] = 'data'
    return NamedSharding(mesh, P(*spec))

  param_shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(params0)}
  state0 = tx.init(params0)
  p_sh = jax.tree.map(fsdp, params0)
  s_sh = jax.tree.map(fsdp, stats0)
  o_sh = jax.tree.map(lambda v: fsdp(v) if tuple(np.shape(v)) in param_shapes else replicated, state0)
  fn = jax.jit(
    step,
    in_shardings=(p_sh, s_sh, o_sh, batch, batch),
    out_shardings=(p_sh, s_sh, o_sh, replicated),
  )
  runs['fully_sharded'] = train(
    'fully_sharded',
    fn,
    jax.device_put(host(params0), p_sh),
    jax.device_put(host(stats0), s_sh),
    jax.device_put(host(state0), o_sh),
    jax.device_put(np.asarray(x), batch),
    jax.device_put(np.asarray(y), batch),
  )

  # Compare with the one-device run, on host copies.
  ref_params, ref_stats = host(runs['single'][0]), host(runs['single'][1])
  ref_zero = np.asarray(s['zero_zigs'](ref_params))
  path_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref_params)[0]]
  out: dict[str, Any] = {
    'model': model_name,
    'optimizer': opt_name,
    'num_zigs': int(part.num_zigs),
    'zero_zigs': int(ref_zero.sum()),
    'losses': [float(v) for v in runs['single'][3]],
    'modes': {},
  }
  for mode in MODES:
    params, stats, opt_state, losses = runs[mode]
    shardings = [leaf.sharding for leaf in jax.tree.leaves(params)]
    state_sharded = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(opt_state))
    params, stats = host(params), host(stats)
    worst, worst_path, ok_close = 0.0, '', True
    for name, a, b in zip(path_names, jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
      ok_close &= bool(np.allclose(b, a, rtol=RTOL, atol=ATOL))
      diff = float(np.max(np.abs(a - b), initial=0.0))
      if diff >= worst:
        worst, worst_path = diff, name
    for a, b in zip(jax.tree.leaves(ref_stats), jax.tree.leaves(stats), strict=True):
      ok_close &= bool(np.allclose(b, a, rtol=RTOL, atol=ATOL))
    zero = np.asarray(s['zero_zigs'](params))
    out['modes'][mode] = {
      'params_close': ok_close,
      'max_abs_diff': worst,
      'max_abs_diff_at': worst_path,
      'same_zero_zigs': bool(np.array_equal(zero, ref_zero)),
      'only_here_zero': np.nonzero(zero & ~ref_zero)[0].tolist(),
      'only_single_zero': np.nonzero(ref_zero & ~zero)[0].tolist(),
      'num_sharded_leaves': sum(not sh.is_fully_replicated for sh in shardings),
      'num_leaves': len(shardings),
      'num_sharded_state_leaves': state_sharded,
      'num_devices': len({d for sh in shardings for d in sh.device_set}),
      'final_loss': float(losses[-1]),
      'seconds': seconds[mode],
      'compiles': compiles[mode],
    }
  return out


def _case_ok(case: dict[str, Any]) -> bool:
  if case['zero_zigs'] == 0:
    return False  # the run proves nothing about zero groups
  dp, fs = case['modes']['data_parallel'], case['modes']['fully_sharded']
  ok = all(m['params_close'] and m['same_zero_zigs'] for m in (dp, fs))
  return (
    ok
    and fs['num_sharded_leaves'] > 0
    and fs['num_sharded_state_leaves'] > 0
    and fs['num_devices'] == NUM_DEVICES
    and dp['num_devices'] == NUM_DEVICES
  )


def _worker(models: list[str]) -> int:
  """Runs every optimizer on the given models (all by default); exit code 1 if a case fails."""
  import jax

  if jax.device_count() < NUM_DEVICES:
    print(f'need {NUM_DEVICES} devices, have {jax.devices()}; set XLA_FLAGS', file=sys.stderr)
    return 2
  failed = 0
  for model_name in models or MODELS:
    for opt_name in OPTIMIZERS:
      t0 = time.perf_counter()
      try:
        case = _run_case(model_name, opt_name)
      except Exception as e:  # Reported per case; the other cases still run.
        import traceback

        traceback.print_exc()
        case = {'model': model_name, 'optimizer': opt_name, 'error': f'{type(e).__name__}: {e}'[:2000]}
      case['seconds'] = time.perf_counter() - t0
      case['ok'] = 'error' not in case and _case_ok(case)
      failed += not case['ok']
      print(MARKER + json.dumps(case), flush=True)
  return 1 if failed else 0


# -----------------------------------------------------------------------------------------------
# Tests (run in the pytest process; they only read the worker's report).


@pytest.fixture(scope='module')
def report() -> dict[str, Any]:
  # One worker per model, side by side: compilation dominates and is mostly single-threaded.
  run = run_workers('tests.test_sharding', [[name] for name in MODELS], MARKER)
  run['cases'] = {(c['model'], c['optimizer']): c for c in run['cases']}
  return run


def _describe(case: dict[str, Any]) -> str:
  return json.dumps(case, indent=1)


def test_worker_exit_code(report):
  assert report['returncodes'] == [0] * len(MODELS), (
    f'workers exited with {report["returncodes"]}; stderr tails:\n{report["stderr"]}\n'
    + '\n'.join(_describe(c) for c in report['cases'].values() if not c.get('ok'))
  )


@pytest.mark.parametrize('opt_name', OPTIMIZERS)
@pytest.mark.parametrize('model_name', MODELS)
def test_sharded_equals_single_device(report, model_name: str, opt_name: str):
  case = report['cases'].get((model_name, opt_name))
  assert case is not None, f'no report for {model_name}/{opt_name}; stderr tail:\n{report["stderr"]}'
  assert 'error' not in case, case['error']
  assert case['zero_zigs'] > 0, f'no ZIG reached zero in {len(case["losses"])} steps:\n{_describe(case)}'
  for mode in MODES:
    m = case['modes'][mode]
    assert m['params_close'], f'{mode}: params differ from the one-device run:\n{_describe(case)}'
    assert m['same_zero_zigs'], f'{mode}: different zero ZIGs than the one-device run:\n{_describe(case)}'
    assert m['num_devices'] == NUM_DEVICES, f'{mode}: params live on {m["num_devices"]} devices'
  fs = case['modes']['fully_sharded']
  assert fs['num_sharded_leaves'] > 0, f'fully sharded run left every param replicated:\n{_describe(case)}'
  assert fs['num_sharded_state_leaves'] > 0, (
    f'fully sharded run left the state replicated:\n{_describe(case)}'
  )


if __name__ == '__main__':
  sys.exit(_worker(sys.argv[1:]))
