"""Subnet construction: the slim model computes what the zeroed full model computes.

Every zoo model (linen and NNX) has ZIGs zeroed and removed; the slim model's outputs, its
variables (every collection) and its parameter count are checked against references built
here from the partition's :class:`~oto_jax.GroupEntry` index maps, not from the library's
slicing or cost models. Further tests cover jit/grad, other batch sizes, training the slim
model with optax, export to StableHLO run in a process without oto_jax, input validation
and the reports.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
import textwrap
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oto_jax
import oto_jax.tracing
from oto_jax.partition import path_of
from tests import arch
from tests.zoo import common, models

CASES = models.CASES
NAMES = sorted(CASES)
# The checks compare values, not speed: LLVM's -O0 halves XLA's compile time on CPU, which is
# most of this file's runtime (one compile per zoo model and ZIG subset).
FAST = (
  {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  if jax.default_backend() == 'cpu'
  else {}
)
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# Shared, cached per zoo model: the case, its partition, compiled forward and zeroing.


@functools.cache
def _case(name: str) -> common.ZooCase:
  return CASES[name]()


@functools.cache
def _partition(name: str) -> oto_jax.ZIGPartition:
  case = _case(name)
  return oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)


@functools.cache
def _forward(name: str):
  """The full model at the zoo inputs, compiled once per model (variables are the argument)."""
  case = _case(name)
  return jax.jit(lambda v: case.apply_fn(v, *case.args, **case.kwargs), compiler_options=FAST)


@functools.cache
def _zeroer(name: str):
  """``part.zero`` compiled once per model: the ids go in as a boolean mask of fixed shape."""
  part = _partition(name)
  fn = jax.jit(part.zero, compiler_options=FAST)
  return lambda variables, ids: fn(variables, part.zig_mask(np.asarray(ids, np.int64)))


def _slim_forward(sub: oto_jax.Subnet, case: common.ZooCase):
  return jax.jit(lambda v: sub.apply(v, *case.args, **case.kwargs), compiler_options=FAST)


# ---------------------------------------------------------------------------------------------
# Independent references, from the node groups' entries only.


def _expected_keep(part: oto_jax.ZIGPartition, removed) -> np.ndarray:
  """The documented keep mask: removed ZIGs go, but a group never loses all its ZIGs."""
  keep = np.ones((part.num_zigs,), bool)
  keep[np.asarray(removed, np.int64)] = False
  for g in part.prunable_groups:
    if not keep[g.zig_ids].any():
      keep[g.zig_offset] = True
  return keep


def _kept_masks(part: oto_jax.ZIGPartition, keep: np.ndarray) -> dict:
  """Per variable path, per axis: a bool mask of the surviving slices (None: axis untouched).

  A slice survives when every prunable group's entry on that axis keeps it; ``-1`` in an
  entry's index (a concatenation's other parts) leaves the decision to the other groups.
  """
  masks: dict = {}
  for g in part.prunable_groups:
    g_keep = keep[g.zig_offset : g.zig_offset + g.size]
    for e in g.members + g.dependents:
      per_axis = masks.setdefault(e.path, [None] * len(e.shape))
      here = (e.index < 0) | g_keep[np.maximum(e.index, 0)]
      per_axis[e.axis] = here if per_axis[e.axis] is None else per_axis[e.axis] & here
  return masks


def _slice_ref(part: oto_jax.ZIGPartition, keep: np.ndarray, tree, prefix: tuple = ()):
  """``tree`` (paths like the variables, after ``prefix``) with the removed slices dropped."""
  masks = _kept_masks(part, keep)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for p, leaf in flat:
    x = np.asarray(leaf)
    for ax, m in enumerate(masks.get(prefix + path_of(p), ())):
      if m is not None:
        x = np.compress(m, x, axis=ax)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _removed_entries(part: oto_jax.ZIGPartition, keep: np.ndarray) -> int:
  """How many entries of the full variables the slim model drops (product of kept lengths)."""
  masks = _kept_masks(part, keep)
  removed = 0
  for path, shape in zip(part.variable_paths, part.variable_shapes):
    kept = [n if m is None else int(m.sum()) for n, m in zip(shape, masks.get(path, [None] * len(shape)))]
    removed += math.prod(shape) - math.prod(kept)
  return removed


def _max_abs(x) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64)))) if np.size(x) else 0.0


def _assert_close(ref, got, what: str, rtol: float = RTOL, per_leaf: bool = True):
  """Max abs error <= rtol * max abs reference, per leaf (or over the whole tree), in float32."""
  chex.assert_trees_all_equal_shapes_and_dtypes(ref, got)
  refs, gots = jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)
  tree_scale = max(map(_max_abs, refs), default=0.0)
  for r, g in zip(refs, gots):
    scale = _max_abs(r) if per_leaf else tree_scale
    err = _max_abs(np.asarray(r, np.float64) - np.asarray(g, np.float64))
    assert err <= rtol * scale + 1e-30, f'{what}: max abs error {err:.3g} > {rtol} * {scale:.3g}'


def _is_stat(path: tuple) -> bool:
  """BatchNorm running statistics: linen's batch_stats collection, NNX's BatchStat leaves."""
  return path[0] == 'batch_stats' or path[-1] in ('mean', 'var')


# ---------------------------------------------------------------------------------------------
# Which group each zoo model loses entirely.


def _kinds(g: oto_jax.NodeGroup) -> set[str]:
  """The constructs a node group runs through, read off its entries' index maps and shapes."""
  kinds = set()
  for e in g.members + g.dependents:
    idx, n = e.index, len(e.index)
    if (idx < 0).any():
      kinds.add('concat')
      continue
    if n > g.size and n % g.size == 0:
      r = n // g.size
      if np.array_equal(idx, np.tile(np.arange(g.size), r)):
        kinds.add('flatten')  # channels are the fastest factor of a flattened axis
      runs = np.diff(np.flatnonzero(np.diff(idx, prepend=-1, append=-1)))
      if runs.size and (runs == runs[0]).all() and runs[0] > 1:
        kinds.add('heads')  # head_dim-long runs of one head: q/k/v columns, fused or not
    if e in g.members and len(e.shape) == 3 and e.axis == 1:
      kinds.add('heads')  # DenseGeneral kernel (features, heads, head_dim)
    if (
      e in g.members and len(e.shape) == 4 and e.axis == 3 and e.shape[2] == 1 and e.shape[0] * e.shape[1] > 1
    ):
      kinds.add('depthwise')  # an HWIO kernel with one input channel per group
  return kinds


# Model name fragment -> the construct its whole-group removal must go through.
WHOLE_GROUP_KIND = {
  'bert': 'heads',
  'vit': 'heads',
  'mha_encoder': 'heads',
  'llama': 'heads',
  'mobilenet': 'depthwise',
  'densenet': 'concat',
  'conv_flatten': 'flatten',
}


def _whole_group(name: str, part: oto_jax.ZIGPartition, rng: np.random.Generator) -> oto_jax.NodeGroup:
  want = next((k for frag, k in WHOLE_GROUP_KIND.items() if frag in name), None)
  if want is None:
    return part.prunable_groups[rng.integers(len(part.prunable_groups))]
  hits = [g for g in part.prunable_groups if want in _kinds(g)]
  assert hits, f'{name}: no node group runs through {want}; the zoo changed?\n{part.summary()}'
  return hits[rng.integers(len(hits))]


def _subsets(name: str) -> tuple[list[np.ndarray], oto_jax.NodeGroup]:
  """common.random_zig_subsets (sparse, dense, a group but one ZIG) plus one whole group.

  The whole group joins the third subset (one compile fewer per model); a group removed whole
  must keep exactly its first ZIG.
  """
  part = _partition(name)
  seed = zlib.crc32(name.encode())
  subsets = common.random_zig_subsets(part, seed)
  whole = _whole_group(name, part, np.random.default_rng(seed + 1))
  subsets[-1] = np.union1d(subsets[-1], whole.zig_ids)
  return subsets, whole


# ---------------------------------------------------------------------------------------------
# 1. Every zoo model: outputs, slim variables, parameter count, FLOPs.


@pytest.mark.parametrize('name', NAMES)
def test_zoo_subnet_matches_zeroed_model(name: str):
  """Slim outputs equal the zeroed full model's; slim variables and counts match the GroupEntry reference."""
  case, part = _case(name), _partition(name)
  full_count = oto_jax.count_params(case.variables)
  subsets, whole = _subsets(name)
  shrank_stats = False
  for k, ids in enumerate(subsets):
    zeroed = _zeroer(name)(case.variables, ids)
    sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
    what = f'{name} subset {k} ({len(ids)} ZIGs)'

    keep = _expected_keep(part, ids)
    np.testing.assert_array_equal(sub.keep, keep, err_msg=what)
    np.testing.assert_array_equal(sub.removed_zig_ids, np.flatnonzero(~keep), err_msg=what)
    if k == len(subsets) - 1:
      # The group asked to go entirely keeps exactly one ZIG: its first.
      assert sub.keep[whole.zig_ids].tolist() == [True] + [False] * (whole.size - 1), what

    # The slim variables are the zeroed ones with exactly the reference's slices dropped,
    # in every collection (batch statistics too).
    ref_slim = _slice_ref(part, keep, zeroed)
    chex.assert_trees_all_close(sub.variables, ref_slim, rtol=0, atol=0)
    assert oto_jax.count_params(sub.variables) == full_count - _removed_entries(part, keep), what
    for (p, full), slim in zip(
      jax.tree_util.tree_flatten_with_path(case.variables)[0], jax.tree_util.tree_leaves(sub.variables)
    ):
      shrank_stats |= _is_stat(path_of(p)) and np.size(slim) < np.size(full)

    # Outputs: the slim model computes the zeroed full model.
    _assert_close(_forward(name)(zeroed), _slim_forward(sub, case)(sub.variables), what)

    report = sub.report()
    if (~sub.keep).any():
      assert report.flops[1] < report.flops[0], (what, report.flops)
      assert report.params[1] < report.params[0], (what, report.params)
  if any(_is_stat(e.path) for g in part.prunable_groups for e in g.dependents):
    assert shrank_stats, f'{name}: no running statistic was sliced'


def test_zoo_whole_group_kinds_covered():
  """Across the zoo the whole-group removals include heads, depthwise, concat and flatten groups."""
  seen = {}
  for name in NAMES:
    want = next((k for frag, k in WHOLE_GROUP_KIND.items() if frag in name), None)
    if want is not None:
      part = _partition(name)
      whole = _whole_group(name, part, np.random.default_rng(zlib.crc32(name.encode()) + 1))
      assert want in _kinds(whole), (name, want, _kinds(whole))
      seen.setdefault(want, []).append(name)
  assert set(seen) == {'heads', 'depthwise', 'concat', 'flatten'}, seen
  assert len(seen['heads']) >= 6, seen


# ---------------------------------------------------------------------------------------------
# 2. jit and grad through the slim model.


@pytest.mark.parametrize('name', ['linen/mha_encoder', 'nnx/resnet_basic'])
def test_jit_and_grad_through_apply(name: str):
  """jax.jit(sub.apply) matches the zeroed model; grads are slim, finite and equal the full grads sliced."""
  case, part = _case(name), _partition(name)
  assert not case.kwargs  # jax.jit(sub.apply) would trace a static keyword argument
  ids = _subsets(name)[0][1]
  zeroed = _zeroer(name)(case.variables, ids)
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  jitted = jax.jit(sub.apply, compiler_options=FAST)
  _assert_close(_forward(name)(zeroed), jitted(sub.variables, *case.args), name)

  def loss(apply, v):
    return sum(jnp.sum(jnp.square(y)) for y in jax.tree_util.tree_leaves(apply(v, *case.args)))

  g_slim = jax.jit(jax.grad(functools.partial(loss, sub.apply)), compiler_options=FAST)(sub.variables)
  g_full = jax.jit(jax.grad(functools.partial(loss, case.apply_fn)), compiler_options=FAST)(zeroed)
  chex.assert_trees_all_equal_shapes(g_slim, sub.variables)
  chex.assert_tree_all_finite(g_slim)
  # With the removed members at zero, the loss restricted to the kept entries is the slim
  # model's loss, so the slim gradient is the full gradient's kept slices.
  # Some leaves' gradients are ~0 (biases before a norm): compare on the tree's scale.
  _assert_close(_slice_ref(part, sub.keep, g_full), g_slim, f'{name} grads', rtol=1e-5, per_leaf=False)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(g_slim))


# ---------------------------------------------------------------------------------------------
# 3. Another batch size than the analysed one.


@pytest.mark.parametrize('name', ['linen/resnet_basic', 'nnx/llama'])
def test_other_batch_size(name: str, monkeypatch):
  """At a new batch size the slim model still equals the zeroed model, without a new analysis."""
  case, part = _case(name), _partition(name)
  ids = _subsets(name)[0][1]
  zeroed = _zeroer(name)(case.variables, ids)
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  x = case.args[0]
  x3 = jnp.concatenate([x, jnp.flip(x, 1), jnp.roll(x, 1, axis=1)], axis=0)  # valid tokens too
  assert len(case.args) == 1 and x3.shape[0] == 3 * x.shape[0]

  traced = []
  real = oto_jax.tracing.trace
  monkeypatch.setattr(oto_jax.tracing, 'trace', lambda *a, **k: traced.append(1) or real(*a, **k))
  slim = jax.jit(lambda v, x: sub.apply(v, x, **case.kwargs), compiler_options=FAST)
  full = jax.jit(lambda v, x: case.apply_fn(v, x, **case.kwargs), compiler_options=FAST)
  for xb in (x3, x[:1]):
    _assert_close(full(zeroed, xb), slim(sub.variables, xb), f'{name} batch {xb.shape[0]}')
  assert not traced


# ---------------------------------------------------------------------------------------------
# 4. Training continues on the slim model.


class _SmallCNN(nn.Module):
  """Two conv-BN-relu layers, global average pool, a Dense head.

  The convs have no bias: before a train-mode BN its gradient is zero up to rounding, and Adam
  turns that noise into full-size steps that differ between two otherwise equal runs.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    for c in (8, 16):
      x = nn.Conv(c, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


def test_training_continues_on_slim_model():
  """Adam states slice like the params; slim training matches projected full training and lowers the loss."""
  model = _SmallCNN()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, (16,)), jnp.int32)
  variables = arch.randomize(jax.eval_shape(model.init, jax.random.key(0), x), 'linen', seed=1)

  def train_apply(v, x):
    return model.apply(v, x, train=True, mutable=['batch_stats'])

  part = oto_jax.zig_partition(train_apply, variables, x)
  assert sorted(g.size for g in part.prunable_groups) == [8, 16], part.summary()
  tx = optax.adam(1e-2)

  def make_step(apply):
    def step(params, stats, opt_state):
      def loss_fn(p):
        logits, new = apply({'params': p, 'batch_stats': stats}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    return jax.jit(step, compiler_options=FAST)

  full_step = make_step(train_apply)
  params, stats, opt_state = variables['params'], variables['batch_stats'], tx.init(variables['params'])
  for _ in range(3):
    params, stats, opt_state, _ = full_step(params, stats, opt_state)

  g8, g16 = sorted(part.prunable_groups, key=lambda g: g.size)
  removed = np.concatenate([g8.zig_offset + np.array([1, 2, 5]), g16.zig_offset + np.array([0, 3, 7, 8, 15])])
  params = part.zero(params, removed)
  sub = oto_jax.construct_subnet(part, {'params': params, 'batch_stats': stats}, zig_ids=removed)
  keep = _expected_keep(part, removed)
  np.testing.assert_array_equal(sub.keep, keep)

  full_shapes = jax.tree.map(jnp.shape, opt_state)
  slim_opt = sub.slice_like(opt_state)
  chex.assert_trees_all_equal_shapes(slim_opt[0].mu, sub.variables['params'])
  chex.assert_trees_all_equal_shapes(slim_opt[0].nu, sub.variables['params'])
  for moment in ('mu', 'nu'):
    want = _slice_ref(part, keep, getattr(opt_state[0], moment), prefix=('params',))
    chex.assert_trees_all_close(getattr(slim_opt[0], moment), want, rtol=0, atol=0)
  assert int(slim_opt[0].count) == int(opt_state[0].count) == 3
  assert jax.tree.map(jnp.shape, opt_state) == full_shapes  # the full state is left alone

  # The same Adam steps on (a) the slim model and (b) the full model whose removed members
  # are re-zeroed after every step: Adam is elementwise and, with those members at zero, the
  # loss depends on the kept entries exactly as the slim loss does, so both runs agree.
  slim_step = make_step(sub.apply)
  s_params, s_stats, s_opt = sub.variables['params'], sub.variables['batch_stats'], slim_opt
  slim_losses, full_losses = [], []
  for _ in range(5):
    s_params, s_stats, s_opt, s_loss = slim_step(s_params, s_stats, s_opt)
    params, stats, opt_state, f_loss = full_step(params, stats, opt_state)
    params = part.zero(params, removed)
    slim_losses.append(float(s_loss))
    full_losses.append(float(f_loss))
  assert all(np.isfinite(slim_losses)), slim_losses
  assert slim_losses[-1] < slim_losses[0], slim_losses
  np.testing.assert_allclose(slim_losses, full_losses, rtol=1e-5)
  _assert_close(_slice_ref(part, keep, params, prefix=('params',)), s_params, 'params after training', 1e-4)
  _assert_close(_slice_ref(part, keep, stats, prefix=('batch_stats',)), s_stats, 'stats after training', 1e-4)


# ---------------------------------------------------------------------------------------------
# 5. Export: save, then run the StableHLO where oto_jax is not importable.

_EXPORT_CHILD = textwrap.dedent(
  """
  import json, os, sys
  import numpy as np
  import jax
  import orbax.checkpoint as ocp

  d = sys.argv[1]
  with open(os.path.join(d, 'apply.stablehlo'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(os.path.join(d, 'subnet.json')) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as ckpt:
    raw = ckpt.restore(os.path.join(d, 'variables'))
  leaves = [raw['leaf_%06d' % i] for i in range(meta['num_leaves'])]
  # The exported function takes (variable leaves, args, array kwargs).
  x, want = np.load(os.path.join(d, 'x.npy')), np.load(os.path.join(d, 'want.npy'))
  got = np.asarray(exported.call(leaves, (x,), {}))
  err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float('inf')
  ok = err <= 1e-5 * float(np.max(np.abs(want)))
  assert 'oto_jax' not in sys.modules, 'the child imported oto_jax'
  print('EXPORT_CHILD', 'OK' if ok else 'MISMATCH', got.shape, err)
  sys.exit(0 if ok else 3)
  """
)


def test_export_roundtrip_in_fresh_process(tmp_path):
  """save_subnet's StableHLO and Orbax variables run without oto_jax; load_subnet gives the same outputs."""
  name = 'linen/resnet_basic'
  case, part = _case(name), _partition(name)
  ids = _subsets(name)[0][1]
  zeroed = _zeroer(name)(case.variables, ids)
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  x = case.args[0]
  want = np.asarray(_forward(name)(zeroed))  # the full zeroed model, not the subnet
  d = tmp_path / 'subnet'
  oto_jax.save_subnet(str(d), sub, x, **case.kwargs)
  np.save(d / 'x.npy', np.asarray(x))
  np.save(d / 'want.npy', want)

  child = subprocess.run(
    [sys.executable, '-c', _EXPORT_CHILD, str(d)], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert child.returncode == 0 and 'EXPORT_CHILD OK' in child.stdout, child.stdout + child.stderr[-3000:]

  exported = oto_jax.load_subnet(str(d))
  assert isinstance(exported, oto_jax.ExportedSubnet)
  np.testing.assert_array_equal(exported.removed_zig_ids, sub.removed_zig_ids)
  # Without the model's code the leaves come back as a list, in tree_leaves order.
  chex.assert_trees_all_close(exported.variables, jax.tree_util.tree_leaves(sub.variables), rtol=0, atol=0)
  _assert_close(want, exported.apply(exported.variables, x), 'load_subnet(dir)')

  restored = oto_jax.load_subnet(str(d), part)
  assert isinstance(restored, oto_jax.Subnet)
  np.testing.assert_array_equal(restored.keep, sub.keep)
  chex.assert_trees_all_close(restored.variables, sub.variables, rtol=0, atol=0)
  _assert_close(want, _slim_forward(restored, case)(restored.variables), 'load_subnet(dir, part)')


def test_load_subnet_rejects_other_partition(tmp_path):
  """load_subnet with another model's partition, or from an empty directory, raises a clear error."""
  name = 'linen/mlp'
  case, part = _case(name), _partition(name)
  sub = oto_jax.construct_subnet(part, case.variables, zig_ids=[0, 1])
  oto_jax.save_subnet(str(tmp_path / 's'), sub, *case.args)
  with pytest.raises(ValueError, match='ZIGs'):
    oto_jax.load_subnet(str(tmp_path / 's'), _partition('linen/se_net'))
  with pytest.raises(FileNotFoundError):
    oto_jax.load_subnet(str(tmp_path / 'nothing'))


# ---------------------------------------------------------------------------------------------
# 6. Defaults and input validation.


def test_default_removes_exactly_the_zero_zigs():
  """zig_ids=None removes exactly the ZIGs whose members are all zero; inputs are not modified or aliased."""
  name = 'linen/se_net'
  case, part = _case(name), _partition(name)
  groups = part.prunable_groups
  ids = np.array(sorted({g.zig_offset + 1 for g in groups} | {groups[0].zig_offset + groups[0].size - 1}))
  host = jax.tree.map(np.array, _zeroer(name)(case.variables, ids))
  # One more ZIG with only some of its member entries zero: it is not a zero ZIG.
  partial = groups[-1].zig_offset
  e = groups[-1].members[0]
  flat, treedef = jax.tree_util.tree_flatten_with_path(host)
  for p, leaf in flat:
    if path_of(p) == e.path:
      np.moveaxis(leaf, e.axis, 0)[e.index == 0] = 0.0
  assert float(part.zig_norms(host)[partial]) > 0
  before = jax.tree.map(np.copy, host)

  sub = oto_jax.construct_subnet(part, host)
  np.testing.assert_array_equal(sub.removed_zig_ids, ids)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(part.zig_norms(host)) == 0), ids)
  chex.assert_trees_all_close(host, before, rtol=0, atol=0)
  want = _slice_ref(part, sub.keep, before)
  chex.assert_trees_all_close(sub.variables, want, rtol=0, atol=0)
  # Scribbling on the inputs afterwards does not reach the slim model.
  for leaf in jax.tree_util.tree_leaves(host):
    leaf[...] = 7.0
  chex.assert_trees_all_close(sub.variables, want, rtol=0, atol=0)

  # Explicit ids: the array passed in is not modified either.
  explicit = np.array([3, 1])
  oto_jax.construct_subnet(part, before, zig_ids=explicit)
  np.testing.assert_array_equal(explicit, [3, 1])


def test_construct_subnet_rejects_bad_inputs():
  """Params-only trees, wrong leaf shapes and out-of-range zig_ids raise ValueError with a clear message."""
  name = 'linen/se_net'
  case, part = _case(name), _partition(name)
  with pytest.raises(ValueError, match='full variables'):
    oto_jax.construct_subnet(part, case.variables['params'])

  flat, treedef = jax.tree_util.tree_flatten_with_path(case.variables)
  leaves = [leaf for _, leaf in flat]
  leaves[0] = jnp.zeros(leaves[0].shape[:-1] + (leaves[0].shape[-1] + 1,))
  bad = jax.tree_util.tree_unflatten(treedef, leaves)
  with pytest.raises(
    ValueError, match=rf'{re.escape(str(leaves[0].shape))}.*expected {re.escape(str(flat[0][1].shape))}'
  ):
    oto_jax.construct_subnet(part, bad)

  for ids in ([part.num_zigs], [-1], [0, part.num_zigs + 5]):
    with pytest.raises(ValueError, match=rf'ZIG ids must lie in \[0, {part.num_zigs}\)'):
      oto_jax.construct_subnet(part, case.variables, zig_ids=ids)


def test_apply_rejects_wrong_variables():
  """sub.apply with full-shaped variables names both shapes; a wrong tree structure is rejected too."""
  name = 'linen/se_net'
  case, part = _case(name), _partition(name)
  ids = _subsets(name)[0][1]
  sub = oto_jax.construct_subnet(part, case.variables, zig_ids=ids)
  full_flat = jax.tree_util.tree_flatten_with_path(case.variables)[0]
  slim_leaves = jax.tree_util.tree_leaves(sub.variables)
  (p, full), slim = next(((p, f), s) for (p, f), s in zip(full_flat, slim_leaves) if f.shape != s.shape)
  with pytest.raises(ValueError) as info:
    sub.apply(case.variables, *case.args, **case.kwargs)
  msg = str(info.value)
  assert str(tuple(full.shape)) in msg and str(tuple(slim.shape)) in msg, msg
  assert '/'.join(map(str, path_of(p))) in msg, msg
  with pytest.raises(ValueError, match='structure'):
    sub.apply(sub.variables['params'], *case.args, **case.kwargs)


# ---------------------------------------------------------------------------------------------
# 7. count_flops and count_params.


def test_count_flops_matches_xla_for_dense_mlp():
  """count_flops of a dense MLP agrees with XLA's cost analysis; count_params sums leaf sizes."""

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for w in (256, 128, 64):
        x = nn.relu(nn.Dense(w)(x))
      return nn.Dense(10)(x)

  model, x = MLP(), jnp.ones((32, 128), jnp.float32)
  variables = arch.randomize(jax.eval_shape(model.init, jax.random.key(0), x), 'linen')
  ours = oto_jax.count_flops(model.apply, variables, x)
  cost = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  # 2 FLOPs per multiply-accumulate; the matmuls are 99.4% of the total. The rest (bias adds,
  # relus: one per output element) is where FLOP conventions could differ, so 2% covers any
  # convention there while a MAC-vs-FLOP slip (a factor of 2) fails. Measured on jax 0.10.2:
  # both give 4,788,544 exactly.
  macs = 32 * (128 * 256 + 256 * 128 + 128 * 64 + 64 * 10)
  assert 2 * macs <= ours <= 2 * macs * 1.01, (ours, 2 * macs)
  assert abs(ours - xla) <= 0.02 * xla, (ours, xla)

  leaves = jax.tree_util.tree_leaves(variables)
  assert oto_jax.count_params(variables) == sum(int(np.size(leaf)) for leaf in leaves) == 74826
  assert oto_jax.count_params(variables['params']['Dense_0']) == 128 * 256 + 256
  assert oto_jax.count_params({}) == 0


# ---------------------------------------------------------------------------------------------
# 8. Reports.


def test_report_fractions_and_widths():
  """report().to_dict() has fractions in (0, 1], widths matching sub.keep, params matching the slim leaves."""
  name = 'linen/resnet_basic'
  case, part = _case(name), _partition(name)
  ids = _subsets(name)[0][1]
  sub = oto_jax.construct_subnet(part, case.variables, zig_ids=ids)
  report = sub.report()
  d = report.to_dict()
  assert 0 < d['flops_remaining'] < 1 and 0 < d['params_remaining'] < 1, d
  assert d['flops_remaining'] == pytest.approx(d['flops_slim'] / d['flops_full'])
  assert d['params_remaining'] == pytest.approx(d['params_slim'] / d['params_full'])
  # Trainable parameters are linen's params collection, counted from the leaves themselves.
  assert d['params_full'] == oto_jax.count_params(case.variables['params'])
  assert d['params_slim'] == oto_jax.count_params(sub.variables['params'])
  # The slim FLOPs from the cost model equal those counted on the slim program itself.
  assert d['flops_full'] == oto_jax.count_flops(case.apply_fn, case.variables, *case.args, **case.kwargs)
  assert d['flops_slim'] == pytest.approx(
    oto_jax.count_flops(sub.apply, sub.variables, *case.args, **case.kwargs), rel=1e-9
  )

  groups = part.prunable_groups
  assert len(d['widths']) == len(groups)
  for w, g in zip(d['widths'], groups):
    assert (w['where'], w['full'], w['slim']) == (part.producer(g), g.size, int(sub.keep[g.zig_ids].sum()))
    assert 0 < w['slim'] <= w['full']
  assert any(w['slim'] < w['full'] for w in d['widths'])
  md = report.markdown()
  assert 'FLOPs' in md and all(f'| {part.producer(g)} | {g.size} |' in md for g in groups), md

  untouched = oto_jax.construct_subnet(part, case.variables, zig_ids=[]).report().to_dict()
  assert untouched['flops_remaining'] == untouched['params_remaining'] == 1.0, untouched


# ---------------------------------------------------------------------------------------------
# Regressions: literal dtypes, a plain-JAX process, NNX persistence.


@pytest.mark.parametrize('op', ['clip', 'pad'])
def test_int_literal_bounds(op: str):
  """jnp.clip(h, 0, 1) / jnp.pad(h, ...) between two layers: the slim model runs and matches."""
  rng = np.random.default_rng(0)
  v = {'w1': rng.standard_normal((6, 8)), 'b1': rng.standard_normal(8), 'w2': rng.standard_normal((8, 3))}
  v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
  if op == 'pad':
    v['w2'] = jnp.ones((10, 3), jnp.float32)
  mid = (lambda h: jnp.clip(h, 0, 1)) if op == 'clip' else (lambda h: jnp.pad(h, ((0, 0), (1, 1))))
  x = jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)

  def f(v, x):
    return mid(x @ v['w1'] + v['b1']) @ v['w2']

  part = oto_jax.zig_partition(f, v, x)
  assert part.num_zigs == 8
  zeroed = part.zero(v, [1, 4])
  sub = oto_jax.construct_subnet(part, zeroed)
  _assert_close(f(zeroed, x), sub.apply(sub.variables, x), op)


def test_plain_jax_process(tmp_path):
  """zig_partition + construct_subnet work in a process that imports only jax and oto_jax."""
  code = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, oto_jax
    v = {'w1': jnp.ones((6, 8)), 'w2': jnp.ones((8, 3))}
    x = jnp.ones((2, 6))
    f = lambda v, x: jax.nn.relu(x @ v['w1']) @ v['w2']
    sub = oto_jax.construct_subnet(oto_jax.zig_partition(f, v, x), v, zig_ids=[0, 1])
    assert sub.apply(sub.variables, x).shape == (2, 3)
    print('PLAIN_OK')
    """
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child = subprocess.run(
    [sys.executable, '-c', code, root], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  if child.returncode != 0 and "has no attribute 'extend'" not in child.stderr:
    raise RuntimeError(f'the child failed for another reason:\n{child.stderr[-2000:]}')
  assert child.returncode == 0 and 'PLAIN_OK' in child.stdout, child.stderr[-2000:]


def test_save_subnet_nnx(tmp_path):
  """save_subnet/load_subnet round-trip an NNX model's subnet."""
  name = 'nnx/mlp'
  case, part = _case(name), _partition(name)
  zeroed = part.zero(case.variables, [0, 1, 2])
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=[0, 1, 2])
  oto_jax.save_subnet(str(tmp_path / 's'), sub, *case.args)
  exported = oto_jax.load_subnet(str(tmp_path / 's'))
  _assert_close(_forward(name)(zeroed), exported.apply(exported.variables, *case.args), name)
  restored = oto_jax.load_subnet(str(tmp_path / 's'), part)
  _assert_close(_forward(name)(zeroed), restored.apply(restored.variables, *case.args), name)


# ---------------------------------------------------------------------------------------------
# Planning without weights.


@pytest.mark.parametrize('name', ['linen/llama', 'nnx/resnet_basic', 'linen/moe_dense'])
def test_plan_matches_the_subnet_it_plans(name: str):
  """plan_subnet on abstract variables gives construct_subnet's shapes, dtypes and report."""
  case, part = _case(name), _partition(name)
  ids = common.random_zig_subsets(part, seed=4)[0]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), case.variables)
  plan = oto_jax.plan_subnet(part, abstract, zig_ids=ids)
  subnet = oto_jax.construct_subnet(part, part.zero(case.variables, ids), zig_ids=ids)
  chex.assert_trees_all_equal_shapes_and_dtypes(plan.variables, subnet.variables)
  np.testing.assert_array_equal(plan.keep, subnet.keep)
  assert plan.report.to_dict() == subnet.report().to_dict()
  # Without variables: the analysed shapes and dtypes.
  chex.assert_trees_all_equal_shapes_and_dtypes(
    oto_jax.plan_subnet(part, zig_ids=ids).variables, plan.variables
  )


@pytest.mark.parametrize('kind, fraction', [('flops', 0.5), ('params', 0.6), ('zigs', 0.4)])
def test_plan_meets_a_budget_by_the_same_share_of_every_group(kind: str, fraction: float):
  part = _partition('linen/llama')
  budget = oto_jax.Budget(kind, fraction)
  plan = oto_jax.plan_subnet(part, budget=budget)
  report = plan.report
  if kind == 'zigs':
    assert (~plan.keep).sum() == int(fraction * part.num_zigs)
  else:
    full, slim = report.flops if kind == 'flops' else report.params
    assert slim <= fraction * full + 1e-6 * full
  # Uniform: any two groups' kept shares differ by at most one ZIG of each.
  for _, a, b in report.widths:
    for _, c, d in report.widths:
      assert abs(b / a - d / c) <= 1 / a + 1 / c + 1e-9, report.widths
  assert all(b >= 1 for _, _, b in report.widths)
  with pytest.raises(ValueError, match='not both'):
    oto_jax.plan_subnet(part, zig_ids=[0], budget=budget)


def test_plan_warns_when_the_budget_is_out_of_reach():
  # The embedding, the norms and the head are in no ZIG: 10% of the parameters is too few.
  part = _partition('linen/llama')
  with pytest.warns(UserWarning, match=r'cannot meet the params budget of 10\.0%.*keeps \d+\.\d%'):
    plan = oto_jax.plan_subnet(part, budget=oto_jax.params_budget(0.1))
  assert all(b == 1 for _, _, b in plan.report.widths)


# ---------------------------------------------------------------------------------------------
# The slim program's lowering of small-output convolutions.


@pytest.mark.parametrize(
  'layout, spatial, kernel, strides, padding, dilation',
  [
    (('NHWC', 'HWIO', 'NHWC'), (2, 2), (3, 3), (1, 1), 'SAME', (1, 1)),
    (('NCHW', 'OIHW', 'NCHW'), (4, 4), (3, 3), (2, 2), 'SAME', (1, 1)),
    (('NHWC', 'HWIO', 'NHWC'), (5, 3), (2, 3), (2, 1), ((1, 0), (-1, 2)), (2, 1)),
    (('NCHW', 'HWIO', 'NHWC'), (1, 1), (3, 3), (1, 1), 'SAME', (1, 1)),
    (('NWC', 'WIO', 'NWC'), (6,), (3,), (3,), 'VALID', (1,)),
    (('NHWC', 'HWIO', 'NHWC'), (7, 6), (1, 1), (2, 2), 'SAME', (1, 1)),
  ],
)
def test_conv_as_dot_equals_the_convolution(layout, spatial, kernel, strides, padding, dilation):
  from oto_jax.primitives.contractions import conv_as_dot

  rng = np.random.default_rng(0)
  lhs_shape = {'N': 3, 'C': 5, **dict(zip('HW' if len(spatial) == 2 else 'W', spatial))}
  rhs_shape = {'O': 4, 'I': 5, **dict(zip('HW' if len(kernel) == 2 else 'W', kernel))}
  lhs = jnp.asarray(rng.normal(size=[lhs_shape[c] for c in layout[0]]), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=[rhs_shape[c] for c in layout[1]]), jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=layout
    )

  params = jax.make_jaxpr(conv)(lhs, rhs).jaxpr.eqns[0].params
  chex.assert_trees_all_close(conv_as_dot(lhs, rhs, params), conv(lhs, rhs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'dtype, out_type, winograd',
  [
    (jnp.float32, None, True),
    (jnp.bfloat16, None, False),
    (jnp.bfloat16, jnp.float32, False),
    (jnp.float16, None, False),
  ],
)
def test_winograd_only_where_its_rounding_stays_small(dtype, out_type, winograd):
  """Winograd's transforms round in the operands' type: offered in float32, not in 16-bit
  types, and only where the spatial sizes are known."""
  from oto_jax.primitives.contractions import conv_lowerings

  x, w = jnp.zeros((2, 6, 6, 4), dtype), jnp.zeros((3, 3, 4, 5), dtype)

  def conv(x, w):
    dn = ('NHWC', 'HWIO', 'NHWC')
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=dn, preferred_element_type=out_type
    )

  params = jax.make_jaxpr(conv)(x, w).jaxpr.eqns[0].params
  assert conv_lowerings(x, w, params) == ('conv', 'dot', 'winograd')[: 3 if winograd else 2]
  # Its tiles need the spatial sizes: a symbolic batch keeps it, a symbolic height does not.
  b, h = jax.export.symbolic_shape('b, h')
  assert conv_lowerings(jax.ShapeDtypeStruct((b, 6, 6, 4), dtype), w, params) == conv_lowerings(x, w, params)
  assert conv_lowerings(jax.ShapeDtypeStruct((b, h, 6, 4), dtype), w, params) == ('conv', 'dot')


class TinyOutputCNN(nn.Module):
  """A 1×1 convolution, then convolutions down to 2×2 and 1×1 outputs (VGG's last block on
  CIFAR), then a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (1, 1))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))  # 4x4 -> 2x2
    x = nn.relu(nn.Conv(16, (3, 3))(x))  # 2x2 -> 2x2
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))  # 2x2 -> 1x1
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_slim_program_lowers_small_output_convolutions_exactly():
  model, x = TinyOutputCNN(), jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
  v = model.init(jax.random.key(0), x)
  part = oto_jax.zig_partition(model.apply, v, x)
  ids = [0, 3, 9, 25, 28, part.num_zigs - 1]
  zeroed = part.zero(v, ids)
  subnet = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  # Every convolution has a 1×1 kernel or an output of at most 4 pixels: none is left.
  assert 'conv_general_dilated' not in str(subnet.jaxpr)
  for batch in (2, 7):
    xb = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 4, 4, 3)), jnp.float32)
    chex.assert_trees_all_close(
      subnet.apply(subnet.variables, xb), model.apply(zeroed, xb), rtol=1e-5, atol=1e-5
    )
