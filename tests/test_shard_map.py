"""Models written with ``jax.shard_map`` are analysed inside the body and cut exactly on a mesh.

The checks need 8 devices, so they run in a worker process (``python -m tests.test_shard_map``,
:mod:`tests.multidevice`) on a ``('data': 2, 'model': 4)`` mesh of host CPU devices. Each
case is a tensor-parallel (or fully-sharded) block written against shards; the worker checks
the hand-derived ZIG count, that zeroing ZIGs and randomising their dependents leaves the
output unchanged, and that the slim model (itself a ``shard_map`` on the same mesh) equals
the zeroed model at two batch sizes.

An axis split over ``n`` devices is pruned the same way on every shard (ZIG ``j`` is position
``j`` of every device's shard), so the slim model stays evenly sharded: 16 hidden units split
over 4 devices are 4 ZIGs of 4 units each.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest

from tests.multidevice import NUM_DEVICES, run_workers

MARKER = 'SHARD_MAP_CASE '
# name → (ZIGs expected, node group sizes).
EXPECTED = {
  # 16 relu units split over 'model' (4 devices): unit j of every shard is one ZIG.
  'tp_mlp': (4, [4]),
  # 8 heads of 4 split over 'model': 2 local heads; 32 MLP units: 8 local units. The residual
  # stream carries the model input.
  'tp_attention_mlp': (10, [2, 8]),
  # The kernels are stored split (w_in by rows, w_out by columns) and gathered whole before
  # use: the 16 units are never split, so each is a ZIG.
  'fsdp_all_gather': (16, [16]),
  # A ring shift of the shards between the layers (ppermute) and a sum scattered over the
  # rows (reduce_scatter): position j of every shard still meets row j of every w_out shard.
  'ring_reduce_scatter': (4, [4]),
}


# -----------------------------------------------------------------------------------------------
# Worker (runs in the subprocess, after XLA_FLAGS is set).


def _cases():
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

  def smap(body, in_specs, out_specs, check_vma=True):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)

  def tp_mlp(p, x):
    def body(w1, b1, w2, x):
      return jax.lax.psum(jax.nn.relu(x @ w1 + b1) @ w2, 'model')

    specs = (P(None, 'model'), P('model'), P('model', None), P('data', None))
    return smap(body, specs, P('data', None))(p['w1'], p['b1'], p['w2'], x)

  def tp_attention_mlp(p, x):
    hd = 4

    def body(wq, wk, wv, wo, w1, w2, x):
      b, t, _ = x.shape
      q, k, v = ((x @ w).reshape(b, t, -1, hd) for w in (wq, wk, wv))
      probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd), axis=-1)
      a = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, -1)
      x = x + jax.lax.psum(a @ wo, 'model')
      return x + jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, 'model')

    col, row = P(None, 'model'), P('model', None)
    specs = (col, col, col, row, col, row, P('data', None, None))
    return smap(body, specs, P('data', None, None))(p['wq'], p['wk'], p['wv'], p['wo'], p['w1'], p['w2'], x)

  def fsdp_all_gather(p, x):
    def body(w1, b1, w2, x):
      w1 = jax.lax.all_gather(w1, 'model', axis=0, tiled=True)
      w2 = jax.lax.all_gather(w2, 'model', axis=1, tiled=True)
      return jnp.tanh(x @ w1 + b1) @ w2

    # Unchecked: the varying-axes check cannot tell that a gathered kernel is the same on
    # every device.
    specs = (P('model', None), P(), P(None, 'model'), P('data', None))
    return smap(body, specs, P('data', None), check_vma=False)(p['w1'], p['b1'], p['w2'], x)

  def ring_reduce_scatter(p, x):
    ring = [(i, (i + 1) % 4) for i in range(4)]

    def body(w1, b1, w2, x):
      h = jax.lax.ppermute(jax.nn.relu(x @ w1 + b1), 'model', ring)
      return jax.lax.psum_scatter(
        h @ jax.lax.ppermute(w2, 'model', ring), 'model', scatter_dimension=0, tiled=True
      )

    specs = (P(None, 'model'), P('model'), P('model', None), P('data', None))
    return smap(body, specs, P(('data', 'model'), None))(p['w1'], p['b1'], p['w2'], x)

  mlp = {'w1': arr(8, 16), 'b1': arr(16), 'w2': arr(16, 8)}
  attn = {n: arr(16, 32) for n in ('wq', 'wk', 'wv')} | {
    'wo': arr(32, 16),
    'w1': arr(16, 32),
    'w2': arr(32, 16),
  }
  # The batch must split evenly over the devices that share it: a symbolic batch that is a
  # multiple of their number.
  return {
    'tp_mlp': (tp_mlp, mlp, (8, 8), '(2*b, 8)'),
    'tp_attention_mlp': (tp_attention_mlp, attn, (4, 3, 16), '(2*b, 3, 16)'),
    'fsdp_all_gather': (fsdp_all_gather, mlp, (8, 8), '(2*b, 8)'),
    'ring_reduce_scatter': (ring_reduce_scatter, mlp, (8, 8), '(8*b, 8)'),
  }


def _run_case(name: str, fn, params, shape, poly: str) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  import oto_jax
  from tests.zoo.common import randomize_dependents, zero_members

  def inputs(batch: int, seed: int):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape[1:])), jnp.float32)

  x = inputs(shape[0], 1)
  part = oto_jax.zig_partition(fn, params, x, polymorphic_shapes=(poly,))
  out: dict[str, Any] = {
    'name': name,
    'num_zigs': int(part.num_zigs),
    'sizes': sorted(g.size for g in part.prunable_groups),
    'summary': part.summary(),
  }
  if not part.num_zigs:
    return out
  rng = np.random.default_rng(5)
  subsets = [rng.choice(part.num_zigs, size=k, replace=False) for k in (1, part.num_zigs // 2)]
  errors = []
  for ids in [*subsets, np.arange(part.num_zigs)]:
    zeroed = zero_members(part, params, ids)
    shaken = randomize_dependents(part, zeroed, ids, seed=3)
    ref = fn(zeroed, x)
    errors.append(float(jnp.max(jnp.abs(fn(shaken, x) - ref))))
    subnet = oto_jax.construct_subnet(part, shaken, zig_ids=ids)
    for batch in (shape[0], 2 * shape[0]):
      xb = inputs(batch, batch)
      errors.append(float(jnp.max(jnp.abs(subnet.apply(subnet.variables, xb) - fn(zeroed, xb)))))
  keep = np.ones(part.num_zigs, bool)
  keep[subsets[1]] = False
  out.update(
    max_error=max(errors),
    slim_has_shard_map='shard_map' in str(subnet.jaxpr),
    slim_shapes={
      jax.tree_util.keystr(k): list(np.shape(v))
      for k, v in jax.tree_util.tree_leaves_with_path(subnet.variables)
    },
    flops_ratio=float(part.flops.evaluate(keep) / part.flops.total),
  )
  return out


def _worker() -> int:
  import jax

  if jax.device_count() < NUM_DEVICES:
    print(f'need {NUM_DEVICES} devices, have {jax.devices()}; set XLA_FLAGS', file=sys.stderr)
    return 2
  for name, (fn, params, shape, poly) in _cases().items():
    try:
      case = _run_case(name, fn, params, shape, poly)
    except Exception as e:  # Reported per case; the other cases still run.
      import traceback

      traceback.print_exc()
      case = {'name': name, 'error': f'{type(e).__name__}: {e}'[:3000]}
    print(MARKER + json.dumps(case), flush=True)
  return 0


# -----------------------------------------------------------------------------------------------
# Tests (run in the pytest process; they only read the worker's report).


@pytest.fixture(scope='module')
def report() -> dict[str, Any]:
  run = run_workers('tests.test_shard_map', [[]], MARKER)
  run['cases'] = {c['name']: c for c in run['cases']}
  return run


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_shard_map_block_is_analysed_and_cut(report, name: str):
  case = report['cases'].get(name)
  assert case is not None, f'no report for {name}; stderr tail:\n{report["stderr"]}'
  assert 'error' not in case, case['error']
  num, sizes = EXPECTED[name]
  assert (case['num_zigs'], case['sizes']) == (num, sizes), case['summary']
  # Removable: zeroed ZIGs with random dependents change nothing; the slim shard_map equals
  # the zeroed model at the analysed batch and at twice it.
  assert case['max_error'] < 1e-5, case
  assert case['slim_has_shard_map'], case
  assert 0 < case['flops_ratio'] < 1, case


if __name__ == '__main__':
  sys.exit(_worker())
