"""Focused tests of ``oto_jax.zig_partition`` and the :class:`ZIGPartition` methods.

The models are tiny on purpose: each test builds its own, so that a failure points at one
construct (a primitive, a wrapper, a kind of sharing) rather than at a whole architecture.
Every "unprunable" verdict is paired with a check that the refusal is warranted: removing
the would-be channel really does change the output.
"""

from __future__ import annotations

import copy
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.interpreters import mlir

import oto_jax
from oto_jax.partition import path_of
from tests.zoo import common

THIS_FILE = 'test_analysis.py'


# ---------------------------------------------------------------------------------------------
# Helpers


def _random_like(shapes, seed: int = 0):
  """Random values for every leaf of ``shapes`` (arrays or ShapeDtypeStructs).

  Biases, norm scales and running statistics must not keep their init values: a zero bias
  or unit scale could hide a wrong grouping. numpy draws avoid a compile per shape.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path_of(path)[-1]
    noise = rng.standard_normal(leaf.shape)
    if name == 'var':
      noise = np.abs(noise) + 0.5
    elif name in ('kernel', 'embedding') and len(leaf.shape) >= 2:
      noise = noise / math.sqrt(math.prod(leaf.shape[:-1]))
    return jnp.asarray(noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _init(module: nn.Module, *inputs, **kwargs):
  """Random linen variables for ``module`` (shapes from ``init``, values from numpy)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *inputs)
  return _random_like(shapes)


def _inputs(*shape: int, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _group(part: oto_jax.ZIGPartition, path: tuple, axis: int, member: bool = True) -> oto_jax.NodeGroup:
  """The node group that has ``path`` on ``axis`` among its members (or dependents)."""
  for g in part.node_groups:
    for e in g.members if member else g.dependents:
      if e.path == path and e.axis == axis:
        return g
  raise AssertionError(f'no group with {path}:{axis}\n{part.summary()}')


def _set_slices(variables, entries, j: int, make):
  """Replaces slice ``j`` (group-local index) of each entry's leaf by ``make(leaf)``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  index = {path_of(p): i for i, (p, _) in enumerate(flat)}
  leaves = [leaf for _, leaf in flat]
  for e in entries:
    i = index[e.path]
    shape = [1] * leaves[i].ndim
    shape[e.axis] = -1
    hit = jnp.asarray(e.index == j).reshape(shape)
    leaves[i] = jnp.where(hit, make(leaves[i]), leaves[i])
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _zero_and_shake(variables, groups, j: int, seed: int = 0):
  """Channel ``j`` of ``groups`` with members zeroed, before and after randomising dependents.

  ``randomize_dependents`` only knows prunable groups; this works for any group, so it can
  show that an unprunable verdict is needed.
  """
  members = [e for g in groups for e in g.members]
  deps = [e for g in groups for e in g.dependents]
  zeroed = _set_slices(variables, members, j, jnp.zeros_like)
  rng = np.random.default_rng(seed)
  shaken = _set_slices(zeroed, deps, j, lambda x: jnp.asarray(rng.uniform(0.5, 3.0, x.shape), x.dtype))
  return zeroed, shaken


def _assert_moves(fn, a, b):
  """``fn(a)`` and ``fn(b)`` differ clearly: the dependents matter, so the block is needed."""
  ra, rb = jax.tree_util.tree_leaves(fn(a)), jax.tree_util.tree_leaves(fn(b))
  err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(ra, rb))
  scale = max(float(jnp.max(jnp.abs(x))) for x in ra) + 1e-12
  assert err > 1e-3 * scale, f'output moved by only {err:.3g} (scale {scale:.3g})'


def _check_removable(name, apply_fn, variables, args, part, kwargs=None, seed=0):
  """``common.assert_removable`` on a few ZIG subsets, plus all ZIGs at once."""
  case = common.ZooCase(name, apply_fn, variables, tuple(args), part.num_zigs, kwargs=kwargs or {})
  subsets = common.random_zig_subsets(part, seed) + [np.arange(part.num_zigs)]
  for ids in subsets:
    common.assert_removable(case, part, ids, seed=seed)


def _signature(part: oto_jax.ZIGPartition):
  """Everything about a partition that does not depend on variable values."""

  def entries(es):
    return tuple((e.path, e.axis, tuple(e.index.tolist()), e.shape) for e in es)

  return (
    part.num_zigs,
    part.variable_paths,
    part.variable_shapes,
    tuple(
      (g.size, g.prunable, g.reason, g.zig_offset, entries(g.members), entries(g.dependents))
      for g in part.node_groups
    ),
  )


def _sizes(part: oto_jax.ZIGPartition) -> list[int]:
  return sorted(g.size for g in part.prunable_groups)


# ---------------------------------------------------------------------------------------------
# 1. Purpose-built bad cases: the reason names the cause, and the block is needed.


class ConvSigmoidConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = jax.nn.sigmoid(x)  # sigmoid(0) = 0.5: a zero channel does not stay zero
    return nn.Conv(2, (3, 3))(x)


def test_sigmoid_without_gate_is_unprunable():
  model, x = ConvSigmoidConv(), _inputs(2, 5, 5, 3)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  g = _group(part, ('params', 'Conv_0', 'kernel'), 3)
  assert not g.prunable and 'logistic' in g.reason, part.summary()
  assert part.num_zigs == 0, part.summary()
  # The consumer's input rows still see sigmoid(0) = 0.5, so they cannot be dropped.
  fn = jax.jit(model.apply)
  zeroed, shaken = _zero_and_shake(v, [g], 1)
  _assert_moves(lambda w: fn(w, x), zeroed, shaken)


class DenseNormDense(nn.Module):
  hidden: int = 6
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden)(x)
    x = nn.LayerNorm()(x) if self.norm else nn.relu(x)
    return nn.Dense(3)(x)


def _slice_out(variables, group: oto_jax.NodeGroup, j: int):
  """Variables with channel ``j`` of ``group`` cut out of every member and dependent."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  leaves = [leaf for _, leaf in flat]
  index = {path_of(p): i for i, (p, _) in enumerate(flat)}
  for e in group.members + group.dependents:
    i = index[e.path]
    leaves[i] = jnp.asarray(np.delete(np.asarray(leaves[i]), np.nonzero(e.index == j)[0], axis=e.axis))
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize('norm', [True, False])
def test_layernorm_hidden_is_unprunable(norm: bool):
  model, x = DenseNormDense(norm=norm), _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  g = _group(part, ('params', 'Dense_0', 'kernel'), 1)
  # Zero hidden channel 2's would-be members and compare with a 5-wide net that lacks it.
  # (Shaking the dependents would prove nothing with a norm: LN's zeroed scale and offset
  # already zero the channel; it is the other channels that change.)
  zeroed = _zero_and_shake(v, [g], 2)[0]
  small = DenseNormDense(hidden=5, norm=norm).apply(_slice_out(zeroed, g, 2), x)
  err = float(jnp.max(jnp.abs(small - model.apply(zeroed, x))))
  if norm:
    assert not g.prunable and 'averaged over' in g.reason, part.summary()
    # LayerNorm's mean and variance count the zero channel: the 5-wide net differs.
    assert err > 1e-3
  else:
    # The control: without the norm the channel is a ZIG and the slimmer net is exact.
    assert g.prunable and part.num_zigs == 6, part.summary()
    chex.assert_trees_all_close(zeroed, part.zero(v, g.zig_ids[2:3]))
    assert err < 1e-5


class DenseSumDense(nn.Module):
  """A hidden layer followed by one use of a sum over its channels."""

  use: str
  hidden: int = 16

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden)(x)
    if self.use == 'gate':  # a plain sum: the zero channels add nothing
      h = nn.relu(h) * jnp.tanh(jnp.sum(h, -1, keepdims=True))
    elif self.use == 'l2':  # an L2 normalisation never divides by the width
      h = h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-3)
    elif self.use == 'mean':
      h = h - jnp.mean(h, -1, keepdims=True)
    elif self.use == 'scaled':  # a mean written as a product with 1 / width
      h = h * (jnp.sum(h, -1, keepdims=True) * (1.0 / self.hidden))
    elif self.use == 'rms':
      h = nn.RMSNorm()(h)
    elif self.use == 'softmax':  # the sum of exp(h): a zero channel adds exp(0) = 1
      h = h / jnp.sum(jnp.exp(h), -1, keepdims=True)
    return nn.Dense(3)(h)


@pytest.mark.parametrize(
  'use, reason',
  [
    ('gate', None),
    ('l2', None),
    ('mean', 'averaged over: a sum divided by its width 16'),
    ('scaled', 'averaged over: a sum divided by its width 16'),
    ('rms', 'averaged over: a sum divided by its width 16'),
    ('softmax', 'summed over by `reduce_sum`'),
  ],
)
def test_sums_over_channels(use: str, reason: str | None):
  model, x = DenseSumDense(use), _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  g = _group(part, ('params', 'Dense_0', 'kernel'), 1)
  if reason is None:
    assert g.prunable and part.num_zigs == 16, part.summary()
    _check_removable(f'sum_{use}', model.apply, v, (x,), part)
    # The same layer 15 wide computes what the 16-wide one with channel 5 zeroed does.
    zeroed = part.zero(v, g.zig_ids[5:6])
    small = DenseSumDense(use, hidden=15).apply(_slice_out(zeroed, g, 5), x)
    chex.assert_trees_all_close(small, model.apply(zeroed, x), atol=1e-5)
  else:
    assert not g.prunable and reason in g.reason, part.summary()
    assert part.num_zigs == 0


class DenseSortDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    x = jnp.sort(x, axis=-1)
    return nn.Dense(3)(x)


def _make_roll() -> jex.core.Primitive:
  """A primitive of the user's own with no registry entry: rolls the last axis by one."""
  prim = jex.core.Primitive('roll_channels')
  prim.def_impl(lambda x: jnp.roll(x, 1, axis=-1))
  prim.def_abstract_eval(lambda aval: aval)
  mlir.register_lowering(prim, mlir.lower_fun(lambda x: jnp.roll(x, 1, axis=-1), multiple_results=False))
  return prim


ROLL = _make_roll()


class DenseRollDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6)(x)
    return nn.Dense(3)(ROLL.bind(h))


@pytest.mark.parametrize(
  'model, reason',
  [
    (DenseSortDense(), 'ordered along by `sort`'),
    (DenseRollDense(), 'unsupported primitive `roll_channels`'),
  ],
  ids=['sort', 'unknown'],
)
def test_channel_mixing_primitive_names_itself_and_its_location(model, reason):
  """Sorting along the channels, and a primitive with no entry, block the channels they touch,
  with a reason that names the primitive and the line."""
  x = _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  produce = _group(part, ('params', 'Dense_0', 'kernel'), 1)
  consume = _group(part, ('params', 'Dense_1', 'kernel'), 0, member=False)
  assert part.num_zigs == 0, part.summary()
  for g in (produce, consume):
    assert not g.prunable, part.summary()
    assert reason in g.reason, g.reason
  # Both move the zero channel to another position: row 2 of the consumer is not the one
  # that meets it.
  fn = jax.jit(model.apply)
  zeroed, shaken = _zero_and_shake(v, [produce, consume], 2)
  _assert_moves(lambda w: fn(w, x), zeroed, shaken)
  # The user needs to find the op: the reason points into this file.
  for g in (produce, consume):
    assert THIS_FILE in g.reason, f'no source location in {g.reason!r}'


def test_model_output_and_input_are_unprunable():
  model, x = DenseNormDense(norm=False), _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  fn = jax.jit(model.apply)
  out = _group(part, ('params', 'Dense_1', 'kernel'), 1)
  assert not out.prunable and 'feeds the model output' in out.reason, part.summary()
  # The output reads the channel itself: zeroing it shows up in the result, and removing it
  # would change the output's shape.
  y, y0 = fn(v, x), fn(_zero_and_shake(v, [out], 1)[0], x)
  assert y.shape[-1] == out.size and not out.dependents
  assert float(jnp.max(jnp.abs(y0[:, 1]))) == 0.0
  assert float(jnp.max(jnp.abs(y[:, 1]))) > 1e-3
  inp = _group(part, ('params', 'Dense_0', 'kernel'), 0, member=False)
  assert not inp.prunable and 'carries the model input' in inp.reason, part.summary()
  assert inp.size == 5 and not inp.members
  zeroed, shaken = _zero_and_shake(v, [inp], 3)
  _assert_moves(lambda w: fn(w, x), zeroed, shaken)


# The registry (a user's own primitive analysed, costed and cut): tests/test_registry.py.


# ---------------------------------------------------------------------------------------------
# 3. Abstract variables and inputs.


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(5, (3, 3), strides=2)(x)))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


def test_abstract_inputs_give_the_same_partition():
  model, x = SmallCNN(), _inputs(2, 6, 6, 3)
  v = _init(model, x)
  concrete = oto_jax.zig_partition(model.apply, v, x, train=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  x_abs = jax.ShapeDtypeStruct(x.shape, x.dtype)
  assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree_util.tree_leaves(shapes))
  abstract = oto_jax.zig_partition(model.apply, shapes, x_abs, train=False)
  assert concrete.num_zigs == 15 and _sizes(concrete) == [4, 5, 6], concrete.summary()
  assert _signature(abstract) == _signature(concrete)
  mixed = oto_jax.zig_partition(model.apply, v, x_abs, train=False)
  assert _signature(mixed) == _signature(concrete)


# ---------------------------------------------------------------------------------------------
# 4. zero and zig_norms.


@functools.cache
def _cnn_case():
  model, x = SmallCNN(), _inputs(2, 6, 6, 3)
  v = _init(model, x)
  return model, x, v, oto_jax.zig_partition(model.apply, v, x, train=False)


def test_zero_and_zig_norms():
  _, _, v, part = _cnn_case()
  ids = np.array([0, 3, 5, 14])
  rest = np.setdiff1d(np.arange(part.num_zigs), ids)
  before = part.zig_norms(v)
  assert before.shape == (part.num_zigs,) and before.dtype == jnp.float32
  assert bool(jnp.all(before > 0))
  for tree in (v, v['params']):
    zeroed = part.zero(tree, ids)
    assert jax.tree_util.tree_structure(zeroed) == jax.tree_util.tree_structure(tree)
    after = part.zig_norms(zeroed)
    assert np.all(np.asarray(after)[ids] == 0.0)
    chex.assert_trees_all_close(after[rest], before[rest])
    # Only member entries change: dependents (running stats, consumer rows) stay put.
  zeroed = part.zero(v, ids)
  chex.assert_trees_all_close(zeroed['batch_stats'], v['batch_stats'])
  # The norm by hand for one ZIG: conv kernel column, bias, BN scale and offset.
  g = _group(part, ('params', 'Conv_0', 'kernel'), 3)
  j = 2
  p = v['params']
  by_hand = math.sqrt(
    sum(
      float(jnp.sum(jnp.square(a)))
      for a in (
        p['Conv_0']['kernel'][..., j],
        p['Conv_0']['bias'][j],
        p['BatchNorm_0']['scale'][j],
        p['BatchNorm_0']['bias'][j],
      )
    )
  )
  np.testing.assert_allclose(float(before[g.zig_offset + j]), by_hand, rtol=1e-5)


def test_zero_and_zig_norms_under_jit():
  _, _, v, part = _cnn_case()
  ids = jnp.array([1, 4, 9], jnp.int32)
  chex.assert_trees_all_close(jax.jit(part.zig_norms)(v), part.zig_norms(v))
  chex.assert_trees_all_close(jax.jit(part.zig_norms)(v['params']), part.zig_norms(v))
  zero = jax.jit(part.zero)
  mask = jnp.asarray(part.zig_mask(ids))
  chex.assert_trees_all_close(zero(v, mask), part.zero(v, np.asarray(ids)))
  # Same compiled function, another mask: the mask really is traced.
  other = jnp.asarray(part.zig_mask([0, 2, 13]))
  chex.assert_trees_all_close(zero(v, other), part.zero(v, [0, 2, 13]))
  chex.assert_trees_all_close(zero(v['params'], mask), part.zero(v, ids)['params'])
  # Traced integer ids cannot be range-checked: an error that names the fix.
  with pytest.raises(ValueError, match='boolean mask'):
    zero(v, ids)


def test_zero_and_zig_norms_do_not_modify_inputs():
  _, _, v, part = _cnn_case()
  # numpy leaves are mutable: an in-place write would show.
  tree = jax.tree_util.tree_map(np.array, v)
  saved = copy.deepcopy(tree)
  part.zero(tree, [0, 1, 2, 3])
  part.zig_norms(tree)
  chex.assert_trees_all_close(tree, saved)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(tree))


def test_zero_and_zig_norms_reject_bad_trees():
  _, _, v, part = _cnn_case()
  bad = jax.tree_util.tree_map(lambda a: a, v)
  bad['params']['Dense_0']['kernel'] = jnp.zeros((7, 6))
  for fn in (lambda t: part.zero(t, [0]), part.zig_norms):
    with pytest.raises(ValueError) as info:
      fn(bad)
    assert '(7, 6)' in str(info.value) and '(5, 6)' in str(info.value), str(info.value)
    with pytest.raises(ValueError):
      fn({'foo': {'bar': jnp.ones((3,))}})


# ---------------------------------------------------------------------------------------------
# 5. BatchNorm in train mode, with updated statistics among the outputs.


def test_batchnorm_train_mode_matches_eval_mode():
  model, x, v, eval_part = _cnn_case()

  def train_apply(w, x):
    return model.apply(w, x, train=True, mutable=['batch_stats'])

  y, updates = train_apply(v, x)
  assert set(updates) == {'batch_stats'}
  part = oto_jax.zig_partition(train_apply, v, x)
  prunable = lambda p: [(g.size, [e.path for e in g.members]) for g in p.prunable_groups]
  assert part.num_zigs == eval_part.num_zigs == 15, part.summary()
  assert prunable(part) == prunable(eval_part), part.summary()
  # The running statistics are dependents of their channel's group, in both modes.
  for p in (part, eval_part):
    g = _group(p, ('params', 'Conv_0', 'kernel'), 3)
    deps = {e.path for e in g.dependents}
    assert {('batch_stats', 'BatchNorm_0', 'mean'), ('batch_stats', 'BatchNorm_0', 'var')} <= deps
  # Removed channels leave the prediction alone (their updated statistics go with them).
  _check_removable('bn_train', lambda w, x: train_apply(w, x)[0], v, (x,), part)


# ---------------------------------------------------------------------------------------------
# 6. Weight sharing.


class TiedLM(nn.Module):
  """Embedding, one residual MLP, an optional final LayerNorm, head tied to the embedding."""

  final_norm: bool = True

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 8)
    x = embed(tokens)
    x = x + nn.Dense(8)(nn.relu(nn.Dense(16)(x)))
    if self.final_norm:
      x = nn.LayerNorm()(x)
    return embed.attend(x)


_TOKENS = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 5)), jnp.int32)


def test_tied_embedding_lm():
  model = TiedLM()
  v = _init(model, _TOKENS)
  part = oto_jax.zig_partition(model.apply, v, _TOKENS)
  emb = ('params', 'Embed_0', 'embedding')
  vocab, hidden = _group(part, emb, 0), _group(part, emb, 1)
  assert vocab.size == 11 and not vocab.prunable, part.summary()
  assert hidden.size == 8 and not hidden.prunable and 'averaged over' in hidden.reason, part.summary()
  assert part.num_zigs == 16 and _sizes(part) == [16], part.summary()
  _check_removable('tied_lm', model.apply, v, (_TOKENS,), part)


def test_tied_embedding_lm_without_norm():
  # Without a final norm the hidden axis is a real ZIG: the embedding column, the MLP's
  # output column and bias are members, and the tied head's contraction meets zeros on
  # both sides. The vocab axis stays unprunable (gathered by the tokens, read by the output).
  model = TiedLM(final_norm=False)
  v = _init(model, _TOKENS)
  part = oto_jax.zig_partition(model.apply, v, _TOKENS)
  emb = ('params', 'Embed_0', 'embedding')
  assert not _group(part, emb, 0).prunable, part.summary()
  hidden = _group(part, emb, 1)
  assert hidden.prunable and hidden.size == 8, part.summary()
  assert _sizes(part) == [8, 16], part.summary()
  _check_removable('tied_lm_no_norm', model.apply, v, (_TOKENS,), part)


class SharedTwice(nn.Module):
  """ALBERT-style: one Dense applied twice in sequence."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    shared = nn.Dense(8)
    x = nn.relu(shared(nn.relu(shared(x))))
    return nn.Dense(3)(x)


def test_shared_dense_applied_twice():
  model, x = SharedTwice(), _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  # The shared kernel's rows read the first and second hidden layers and its columns write
  # the second and third: all three are one node group of 8.
  assert part.num_zigs == 8 and _sizes(part) == [8], part.summary()
  g = part.prunable_groups[0]
  shared = ('params', 'Dense_1', 'kernel')
  assert (shared, 1) in {(e.path, e.axis) for e in g.members}
  assert (shared, 0) in {(e.path, e.axis) for e in g.dependents}
  _check_removable('shared_twice', model.apply, v, (x,), part)


# ---------------------------------------------------------------------------------------------
# 7. Control flow and wrappers (plain JAX functions of a parameter dict).


def _params(*sizes: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  p = {}
  for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    p[f'w{k}'] = jnp.asarray(rng.standard_normal((a, b)) / math.sqrt(a), jnp.float32)
    p[f'b{k}'] = jnp.asarray(rng.standard_normal((b,)), jnp.float32)
  return p


def _cond_model(p, x):
  h = x @ p['w0'] + p['b0']
  h = jax.lax.cond(jnp.sum(x) > 0, jax.nn.relu, lambda h: 2.0 * jnp.tanh(h), h)
  return h @ p['w1'] + p['b1']


def _cond_model_bad(p, x):
  h = x @ p['w0'] + p['b0']
  h = jax.lax.cond(jnp.sum(x) > 0, jax.nn.relu, lambda h: h + 1.0, h)
  return h @ p['w1'] + p['b1']


def _residual(p, h):
  return h + jax.nn.relu(h @ p['w1'] + p['b1'])


def _fori_model(p, x):
  h = x @ p['w0'] + p['b0']
  h = jax.lax.fori_loop(0, 3, lambda i, h: _residual(p, h), h)
  return h @ p['w2'] + p['b2']


def _while_model(p, x):
  h = x @ p['w0'] + p['b0']
  _, h = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, _residual(p, c[1])), (0, h))
  return h @ p['w2'] + p['b2']


def _checkpoint_model(p, x):
  h = jax.nn.relu(x @ p['w0'] + p['b0'])
  h = jax.checkpoint(lambda w, b, h: jax.nn.gelu(h @ w + b))(p['w1'], p['b1'], h)
  return h @ p['w2'] + p['b2']


@jax.custom_vjp
def _relu6(x):
  # Not jnp.clip: that one has its own test below.
  return jnp.minimum(jnp.maximum(x, 0.0), 6.0)


def _relu6_fwd(x):
  return _relu6(x), x


def _relu6_bwd(x, g):
  return (jnp.where((x > 0) & (x < 6), g, 0.0),)


_relu6.defvjp(_relu6_fwd, _relu6_bwd)


def _custom_vjp_model(p, x):
  h = _relu6(x @ p['w0'] + p['b0'])
  return h @ p['w1'] + p['b1']


@jax.jit
def _dense_relu(w, b, h):
  return jax.nn.relu(h @ w + b)


def _jit_model(p, x):
  h = _dense_relu(p['w0'], p['b0'], x)
  h = _dense_relu(p['w1'], p['b1'], h)
  return h @ p['w2'] + p['b2']


CONTROL_FLOW = {
  # name: (apply_fn, layer sizes, prunable group sizes, the primitive it must exercise)
  'cond': (_cond_model, (5, 8, 3), [8], 'cond'),
  'fori_loop': (_fori_model, (5, 8, 8, 3), [8], 'scan'),
  'while_loop': (_while_model, (5, 8, 8, 3), [8], 'while'),
  'checkpoint': (_checkpoint_model, (5, 8, 6, 3), [6, 8], 'remat2'),
  'custom_vjp': (_custom_vjp_model, (5, 8, 3), [8], 'custom_vjp_call'),
  'jit': (_jit_model, (5, 8, 6, 3), [6, 8], 'jit'),
}


@pytest.mark.parametrize('name', sorted(CONTROL_FLOW))
def test_control_flow_and_wrappers(name: str):
  fn, sizes, groups, prim = CONTROL_FLOW[name]
  p = _params(*sizes)
  if name in ('fori_loop', 'while_loop'):
    p['w1'], p['b1'] = p['w1'] * 0.5, p['b1'] * 0.5  # keep the residual stream tame
  x = _inputs(4, sizes[0])
  # The construct under test really is in the program (not inlined or rewritten away).
  assert prim in {e.primitive.name for e in jax.make_jaxpr(fn)(p, x).jaxpr.eqns}
  part = oto_jax.zig_partition(fn, p, x)
  assert _sizes(part) == groups and part.num_zigs == sum(groups), part.summary()
  _check_removable(name, fn, p, (x,), part)
  if name == 'cond':
    # The other branch too: an input with a negative sum.
    _check_removable(name, fn, p, (-jnp.abs(x),), part)


def _clip_model(p, x):
  h = jnp.clip(x @ p['w0'] + p['b0'], 0.0, 6.0)
  return h @ p['w1'] + p['b1']


def test_clip_with_zero_preserving_bounds():
  # clip(0, 0, 6) == 0. jnp.clip is a jit whose bounds arrive as operands of the inner
  # program, so the analysis must still see them as the literals 0 and 6.
  p, x = _params(5, 8, 3), _inputs(4, 5)
  part = oto_jax.zig_partition(_clip_model, p, x)
  assert _sizes(part) == [8], part.summary()
  _check_removable('clip', _clip_model, p, (x,), part)


def test_cond_with_a_zero_breaking_branch_is_unprunable():
  p, x = _params(5, 8, 3), _inputs(4, 5)
  part = oto_jax.zig_partition(_cond_model_bad, p, x)
  g = _group(part, ('w0',), 1)
  assert not g.prunable and 'add' in g.reason, part.summary()
  # In the `h + 1` branch the consumer's row meets a 1, not a zero.
  fn = jax.jit(_cond_model_bad)
  zeroed, shaken = _zero_and_shake(p, [g], 4)
  _assert_moves(lambda w: fn(w, -jnp.abs(x)), zeroed, shaken)


# ---------------------------------------------------------------------------------------------
# 8. Reports and NNX.


def test_summary_and_dot():
  _, _, _, part = _cnn_case()
  text = part.summary()
  assert 'prunable' in text
  for g in part.node_groups:
    if not g.prunable:
      assert g.reason and g.reason in text
  assert f'{part.num_zigs} prunable ZIGs' in text
  short = part.summary(show_unprunable=False)
  assert all(g.reason not in short for g in part.node_groups if not g.prunable)
  dot = part.to_dot()
  assert dot.startswith('digraph')
  assert dot.rstrip().endswith('}')
  for g in part.node_groups:
    assert f'g{g.id} [' in dot


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(5, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.fc2 = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def test_nnx_state_and_batch_stats():
  model = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
  model.eval()
  graphdef, state = nnx.split(model)
  state = _random_like(state)

  def apply_fn(s, x):
    return nnx.merge(graphdef, s)(x)

  x = _inputs(4, 5)
  part = oto_jax.zig_partition(apply_fn, state, x)
  assert part.num_zigs == 6 and _sizes(part) == [6], part.summary()
  g = part.prunable_groups[0]
  members = {e.path for e in g.members}
  deps = {e.path for e in g.dependents}
  assert members == {('fc1', 'kernel'), ('fc1', 'bias'), ('bn', 'scale'), ('bn', 'bias')}, members
  assert deps == {('fc2', 'kernel'), ('bn', 'mean'), ('bn', 'var')}, deps
  assert ('bn', 'mean') not in part.trainable_paths and ('bn', 'scale') in part.trainable_paths
  # zero / zig_norms on the Param state alone.
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
  chex.assert_trees_all_close(part.zig_norms(params), part.zig_norms(state))
  _check_removable('nnx', apply_fn, state, (x,), part)


# ---------------------------------------------------------------------------------------------
# 9. One tensor concatenated with itself.


class CatTwice(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(jnp.concatenate([h, h], -1))


def test_concatenate_same_tensor_twice():
  model, x = CatTwice(), _inputs(4, 5)
  v = _init(model, x)
  part = oto_jax.zig_partition(model.apply, v, x)
  assert part.num_zigs == 6 and _sizes(part) == [6], part.summary()
  g = part.prunable_groups[0]
  (dep,) = g.dependents
  assert dep.path == ('params', 'Dense_1', 'kernel') and dep.axis == 0
  # Row c and row 6 + c of the consumer both read channel c.
  np.testing.assert_array_equal(dep.index, np.tile(np.arange(6), 2))
  _check_removable('cat_twice', model.apply, v, (x,), part)
