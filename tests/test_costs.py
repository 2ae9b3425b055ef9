"""Tests of the cost models (``partition.flops``, ``partition.params``) and the ZIG segments.

The cost of a set of kept ZIGs is checked against ground truth built independently: the same
model written by hand with the narrower widths, partitioned, and its full cost read off; XLA's
own FLOP count; and the parameter count of the variables. Partitions are built from
``jax.eval_shape`` variables: costs depend on shapes only, and nothing is compiled.
"""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oto_jax
from tests import arch
from tests.zoo import models

BATCH = 2


def _partition(module: nn.Module, x, **kwargs) -> oto_jax.ZIGPartition:
  """The partition of ``module.apply`` built from abstract variables and input."""
  x = jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, 'dtype') else x
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), x)
  return oto_jax.zig_partition(module.apply, shapes, x, **kwargs)


def _group(part: oto_jax.ZIGPartition, path: tuple, axis: int) -> oto_jax.NodeGroup:
  """The prunable node group with ``path`` on ``axis`` among its members."""
  for g in part.prunable_groups:
    if any(e.path == path and e.axis == axis for e in g.members):
      return g
  raise AssertionError(f'no prunable group with member {path}:{axis}\n{part.summary()}')


def _keep(part: oto_jax.ZIGPartition, *dropped: tuple[oto_jax.NodeGroup, list[int]]) -> np.ndarray:
  """A keep mask over all ZIGs with the given group-local channels removed."""
  keep = np.ones(part.num_zigs, bool)
  for g, channels in dropped:
    keep[g.zig_offset + np.asarray(channels, int)] = False
  return keep


def _num_trainable(variables, collection: str = 'params') -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables[collection]))


# ---------------------------------------------------------------------------------------------
# Parameter counts.


@pytest.mark.parametrize(
  'name', ['linen/mlp', 'linen/conv_flatten_dense', 'linen/resnet_basic', 'linen/vit', 'linen/scan_stack']
)
def test_params_total_is_the_trainable_parameter_count(name: str):
  """``params.total`` is the number of entries of the params collection (not batch_stats)."""
  case = models.CASES[name]()
  part = oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)
  assert part.params.total == _num_trainable(case.variables)
  all_entries = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(case.variables))
  if 'batch_stats' in case.variables:
    assert part.params.total < all_entries
  # Nothing kept: only what lies outside every ZIG remains; all kept: the total.
  assert part.params.evaluate(np.ones(part.num_zigs, bool)) == part.params.total
  assert 0 < part.params.evaluate(np.zeros(part.num_zigs, bool)) < part.params.total


def test_params_total_nnx_counts_only_params():
  """For an NNX state, ``params.total`` counts nnx.Param variables, not BatchNorm statistics."""
  case = models.CASES['nnx/resnet_basic']()
  part = oto_jax.zig_partition(case.apply_fn, case.variables, *case.args)
  params = nnx.filter_state(case.variables, nnx.Param)
  stats = nnx.filter_state(case.variables, nnx.BatchStat)
  count = lambda s: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(s))
  assert count(stats) > 0
  assert part.params.total == count(params)


# ---------------------------------------------------------------------------------------------
# Kept ZIGs against a model built narrower by hand.


class ConvNet(nn.Module):
  """conv → BN (eval) → relu → strided conv → relu → flatten (4x4 kept) → dense → relu → dense."""

  c1: int = 8
  c2: int = 16
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.c1, (3, 3))(x)))
    x = nn.relu(nn.Conv(self.c2, (3, 3), strides=2)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


class ResMLP(nn.Module):
  """Input Dense to a residual stream, residual MLP blocks (no norm), Dense head."""

  width: int = 16
  hidden: tuple[int, ...] = (24, 20)

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width)(x)
    for h in self.hidden:
      x = x + nn.Dense(self.width)(nn.relu(nn.Dense(h)(x)))
    return nn.Dense(10)(x)


class Attention(nn.Module):
  """Self-attention with separate q/k/v projections to ``heads`` heads and an output Dense."""

  heads: int = 4
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    shape = (b, t, self.heads, self.head_dim)
    q, k, v = (nn.Dense(self.heads * self.head_dim, name=n)(x).reshape(shape) for n in ('q', 'k', 'v'))
    o = models.attend(q, k, v).reshape((b, t, self.heads * self.head_dim))
    return nn.Dense(12, name='out')(o)


def _images():
  return jnp.zeros((BATCH, 8, 8, 3), jnp.float32)


def _assert_costs_equal(wide: oto_jax.ZIGPartition, keep: np.ndarray, slim: oto_jax.ZIGPartition):
  # Integer counts far below 2**53: exact in float64.
  assert wide.params.evaluate(keep) == slim.params.total
  assert wide.flops.evaluate(keep) == slim.flops.total
  assert slim.flops.total < wide.flops.total and slim.params.total < wide.params.total


@pytest.mark.parametrize('seed', [0, 1])
def test_conv_net_costs_equal_the_narrower_model(seed: int):
  """Conv-BN-conv-flatten-dense: cost of the kept ZIGs = cost of the same net built narrower."""
  wide = _partition(ConvNet(), _images())
  g1 = _group(wide, ('params', 'Conv_0', 'kernel'), 3)
  g2 = _group(wide, ('params', 'Conv_1', 'kernel'), 3)
  g3 = _group(wide, ('params', 'Dense_0', 'kernel'), 1)
  assert (g1.size, g2.size, g3.size) == (8, 16, 32) and wide.num_zigs == 56, wide.summary()
  rng = np.random.default_rng(seed)
  drop = [rng.choice(g.size, n, replace=False) for g, n in ((g1, 3), (g2, 5), (g3, 12))]
  keep = _keep(wide, *zip((g1, g2, g3), drop))
  _assert_costs_equal(wide, keep, _partition(ConvNet(c1=5, c2=11, hidden=20), _images()))


def test_residual_stream_costs_equal_the_narrower_model():
  """A residual add ties the stream into one node group: dropping its ZIGs narrows every block."""
  x = jnp.zeros((BATCH, 6), jnp.float32)
  wide = _partition(ResMLP(), x)
  stream = _group(wide, ('params', 'Dense_0', 'kernel'), 1)
  # The stream's members: the input Dense and each block's output Dense (built before the
  # hidden Dense it wraps, so Dense_1 and Dense_3; Dense_2 and Dense_4 are the hidden layers).
  assert {e.path[1] for e in stream.members} == {'Dense_0', 'Dense_1', 'Dense_3'}, wide.summary()
  h1 = _group(wide, ('params', 'Dense_2', 'kernel'), 1)
  h2 = _group(wide, ('params', 'Dense_4', 'kernel'), 1)
  assert sorted(g.size for g in wide.prunable_groups) == [16, 20, 24]
  keep = _keep(wide, (stream, [0, 5, 9]), (h1, [1, 2, 3, 4]), (h2, [19]))
  _assert_costs_equal(wide, keep, _partition(ResMLP(width=13, hidden=(20, 19)), x))


@pytest.mark.parametrize('dropped', [[2], [0, 3]])
def test_attention_head_costs_equal_the_narrower_model(dropped: list[int]):
  """Removing whole attention heads costs what a model with fewer heads costs."""
  x = jnp.zeros((BATCH, 5, 12), jnp.float32)
  wide = _partition(Attention(), x)
  heads = _group(wide, ('params', 'q', 'kernel'), 1)
  assert heads.size == 4 and wide.num_zigs == 4, wide.summary()
  # One ZIG is a whole head: head_dim columns of q, k and v, and head_dim rows of out.
  q_entry = next(e for e in heads.members if e.path == ('params', 'q', 'kernel'))
  np.testing.assert_array_equal(q_entry.index, np.repeat(np.arange(4), 8))
  keep = _keep(wide, (heads, dropped))
  _assert_costs_equal(wide, keep, _partition(Attention(heads=4 - len(dropped)), x))


# ---------------------------------------------------------------------------------------------
# The jit-able cost, per-ZIG savings, and XLA's count.


def test_jitted_cost_matches_evaluate():
  """``cost(keep)`` under jit equals ``evaluate(keep)`` (float32) for bool and float masks."""
  part = _partition(ConvNet(), _images())
  rng = np.random.default_rng(0)
  masks = [rng.random(part.num_zigs) < p for p in (0.0, 0.3, 0.7, 1.0)]
  for model in (part.flops, part.params):
    fn = jax.jit(model.__call__)
    for keep in masks:
      got = fn(jnp.asarray(keep))
      assert got.dtype == jnp.float32 and got.shape == ()
      np.testing.assert_allclose(float(got), model.evaluate(keep), rtol=1e-6)
    # A float mask weighs each ZIG: all halves lie strictly between none and all.
    half = float(fn(jnp.full(part.num_zigs, 0.5)))
    assert model.evaluate(masks[0]) < half < model.total


def test_per_zig_is_the_saving_of_removing_one_zig():
  """``per_zig`` > 0 for every ZIG of a conv net and equals the saving of removing it alone."""
  part = _partition(ConvNet(), _images())
  for model in (part.flops, part.params):
    per = np.asarray(model.per_zig)
    assert per.shape == (part.num_zigs,) and np.all(per > 0)
    for j in (0, 9, 30, part.num_zigs - 1):  # a ZIG of each group
      keep = np.ones(part.num_zigs, bool)
      keep[j] = False
      assert model.total - model.evaluate(keep) == pytest.approx(per[j], rel=1e-12)
    # Channels of one node group cost the same.
    for g in part.prunable_groups:
      assert np.all(per[g.zig_ids] == per[g.zig_offset])


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list per device on older jax
  return float(cost['flops'])


@pytest.mark.parametrize('batch', [1, 32])
def test_dense_flops_match_xla(batch: int):
  """For a dense MLP (no convolution padding taps) the FLOPs agree with XLA's cost analysis."""
  model, x = arch.linen(models.mlp(widths=(64, 48))), jnp.zeros((batch, 32), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  part = oto_jax.zig_partition(model.apply, shapes, x)
  # 2 per multiply-accumulate plus one per bias add and relu, as XLA counts them: the two agree
  # exactly on jax 0.10 (batch 1, 8 and 32 measured); 2% leaves room for an XLA version that
  # counts some op differently, far below what a missed or doubled layer would cost (> 10%).
  by_hand = 2 * batch * (32 * 64 + 64 * 48 + 48 * 10) + batch * (2 * 64 + 2 * 48 + 10)
  assert part.flops.total == by_hand
  assert part.flops.total == pytest.approx(_xla_flops(model.apply, shapes, x), rel=0.02)
  # The narrower MLP too, from the kept ZIGs.
  keep = _keep(part, (_group(part, ('params', 'Dense_0', 'kernel'), 1), range(20)))
  slim = arch.linen(models.mlp(widths=(44, 48)))
  slim_shapes = jax.eval_shape(slim.init, jax.random.key(0), x)
  assert part.flops.evaluate(keep) == pytest.approx(_xla_flops(slim.apply, slim_shapes, x), rel=0.02)


# ---------------------------------------------------------------------------------------------
# Scans count their body once per iteration.


class Unrolled(nn.Module):
  """The zoo's scan_stack written as a Python loop: separate parameters per block."""

  width: int = 32
  hidden: int = 24
  depth: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width)(x)
    for i in range(self.depth):
      x = arch.LinenArch(functools.partial(models.res_mlp_block, self.hidden), name=f'ResMLPBlock_{i}')(x)
    return nn.Dense(self.classes)(x)


def test_scan_flops_are_length_times_one_layer():
  """nn.scan over d blocks costs d blocks: equal to the unrolled loop, linear in the length."""
  x = jnp.zeros((BATCH, 16), jnp.float32)
  scans = {d: _partition(arch.linen(models.scan_stack(depth=d)), x) for d in (1, 2, 3)}
  unrolled = _partition(Unrolled(depth=3), x)
  b, w, h = BATCH, 32, 24
  layer = 2 * b * w * h + b * h + b * h + 2 * b * h * w + b * w + b * w  # dense, bias, relu, dense, bias, add
  assert scans[2].flops.total - scans[1].flops.total == layer
  assert scans[3].flops.total - scans[2].flops.total == layer
  assert scans[3].flops.total == unrolled.flops.total
  assert scans[3].params.total == unrolled.params.total
  # The scanned hidden units are one node group for all layers; removing unit j removes it from
  # every layer: the same as removing unit j from each unrolled block.
  scan = scans[3]
  s_stream = _group(scan, ('params', 'Dense_0', 'kernel'), 1)
  (s_hidden,) = [g for g in scan.prunable_groups if g is not s_stream]
  assert (s_stream.size, s_hidden.size) == (32, 24), scan.summary()
  u_stream = _group(unrolled, ('params', 'Dense_0', 'kernel'), 1)
  u_hidden = [_group(unrolled, ('params', f'ResMLPBlock_{i}', 'Dense_0', 'kernel'), 1) for i in range(3)]
  stream_drop, hidden_drop = [1, 4, 30], [0, 7]
  keep_scan = _keep(scan, (s_stream, stream_drop), (s_hidden, hidden_drop))
  keep_unrolled = _keep(unrolled, (u_stream, stream_drop), *[(g, hidden_drop) for g in u_hidden])
  slim = _partition(arch.linen(models.scan_stack(width=29, hidden=22, depth=3)), x)
  for kind in ('flops', 'params'):
    got = getattr(scan, kind).evaluate(keep_scan)
    assert got == getattr(unrolled, kind).evaluate(keep_unrolled) == getattr(slim, kind).total
    assert got < getattr(scan, kind).total


# ---------------------------------------------------------------------------------------------
# Segments: per-ZIG reductions and broadcasts over a pytree.


def _random_tree(shapes, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)


def _numpy_sums(part: oto_jax.ZIGPartition, a, b) -> tuple[np.ndarray, np.ndarray]:
  """Per-ZIG Σ a·b over member entries, and member element counts, by a plain loop."""
  flat_a = {
    oto_jax.partition.path_of(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(a)[0]
  }
  flat_b = {
    oto_jax.partition.path_of(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(b)[0]
  }
  sums, sizes = np.zeros(part.num_zigs), np.zeros(part.num_zigs, int)
  for g in part.prunable_groups:
    for e in g.members:
      # The tree may hold only a collection: match the entry's path by suffix.
      key = next(e.path[i:] for i in range(len(e.path)) if e.path[i:] in flat_a)
      xa, xb = np.moveaxis(flat_a[key], e.axis, 0), np.moveaxis(flat_b[key], e.axis, 0)
      for i, j in enumerate(e.index):
        if j >= 0:
          sums[g.zig_offset + j] += float(np.sum(xa[i].astype(np.float64) * xb[i]))
          sizes[g.zig_offset + j] += xa[i].size
  return sums, sizes


MODELS = {
  'conv_bn': (ConvNet(), _images()),
  'residual': (ResMLP(), jnp.zeros((BATCH, 6), jnp.float32)),
  'attention': (Attention(), jnp.zeros((BATCH, 5, 12), jnp.float32)),
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_segment_sums_match_a_loop_over_member_entries(name: str):
  """``segments(tree).sums((a, b))`` and ``.sizes`` equal a numpy loop over the member entries."""
  module, x = MODELS[name]
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  part = oto_jax.zig_partition(module.apply, shapes, x)
  a, b = _random_tree(shapes, 0), _random_tree(shapes, 1)
  want_ab, sizes = _numpy_sums(part, a, b)
  want_aa, _ = _numpy_sums(part, a, a)
  for tree_a, tree_b in ((a, b), (a['params'], b['params'])):  # whole variables or one collection
    seg = part.segments(tree_a)
    got = jax.jit(lambda u, v, seg=seg: seg.sums((u, v), (u, u)))(tree_a, tree_b)
    assert got.shape == (2, part.num_zigs) and got.dtype == jnp.float32
    np.testing.assert_allclose(got[0], want_ab, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want_aa, rtol=1e-5)
    np.testing.assert_array_equal(seg.sizes, sizes)
    chex.assert_trees_all_close(jax.jit(part.zig_norms)(tree_a), jnp.sqrt(got[1]), rtol=1e-6)
    # Cached per structure.
    assert part.segments(tree_b) is seg


@pytest.mark.parametrize('name', sorted(MODELS))
def test_zero_and_zig_norms_are_consistent(name: str):
  """``zero(tree, ids)`` zeroes exactly those ZIGs' member entries, as ``zig_norms`` sees it."""
  module, x = MODELS[name]
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  part = oto_jax.zig_partition(module.apply, shapes, x)
  tree = _random_tree(shapes, 2)['params']
  ids = np.random.default_rng(3).choice(part.num_zigs, max(1, part.num_zigs // 3), replace=False)

  @jax.jit
  def run(tree, mask):
    zeroed = part.zero(tree, mask)
    return part.zig_norms(tree), zeroed, part.zig_norms(zeroed), oto_jax.group_sparsity(part, zeroed)

  before, zeroed, after, sparsity = run(tree, part.zig_mask(ids))
  before, after = np.asarray(before), np.asarray(after)
  assert np.all(before > 0)
  assert np.all(after[ids] == 0)
  rest = np.setdiff1d(np.arange(part.num_zigs), ids)
  np.testing.assert_array_equal(after[rest], before[rest])
  np.testing.assert_array_equal(np.nonzero(after == 0)[0], np.sort(ids))
  assert float(sparsity) == pytest.approx(len(ids) / part.num_zigs)
  if name == 'attention':  # zero_zigs is eager (not jit-able): one op-by-op run is enough
    np.testing.assert_array_equal(np.asarray(oto_jax.zero_zigs(part, zeroed)), np.sort(ids))
  # Only member entries change: the number of changed entries is the zeroed ZIGs' sizes.
  changed = sum(
    int(np.sum(np.asarray(u) != np.asarray(v)))
    for u, v in zip(jax.tree.leaves(tree), jax.tree.leaves(zeroed))
  )
  assert changed == int(part.segments(tree).sizes[ids].sum())
  # The segment map spreads a per-ZIG value onto the member entries it came from.
  seg = part.segments(tree)
  scale = jnp.arange(1, part.num_zigs + 1, dtype=jnp.float32)
  scaled_norms = jax.jit(
    lambda t: part.zig_norms(seg.map(lambda u, s: u * s, t, values=[scale], fills=[1.0]))
  )
  np.testing.assert_allclose(np.asarray(scaled_norms(tree)), before * np.asarray(scale), rtol=1e-5)
