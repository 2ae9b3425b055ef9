"""One analysis for every batch size: symbolic shapes, their limits, and the errors at the edges.

The function is traced once with a symbolic batch dimension; the slim program keeps it, so
``Subnet.apply`` and the exported StableHLO run at any batch size. Functions that cannot be
traced that way are analysed at their given shapes and refuse other ones with a reason that
names the user's line; other dimensions (a sequence length) can be made symbolic too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oto_jax


def _normal(*shape: int, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomised(variables, seed: int = 1):
  """Every leaf random (variances positive), so no wrongly grouped entry can hide at its init value."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.abs(rng.standard_normal(x.shape)) + 0.5, x.dtype), variables)


class ConvNet(nn.Module):
  """Conv-BN-relu, a residual pair, global mean, Dense head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    y = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x + nn.Conv(8, (1, 1))(y)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _conv_case(batch: int = 2):
  model = ConvNet()
  x = _normal(batch, 6, 6, 3)
  v = _randomised(jax.eval_shape(model.init, jax.random.key(0), x))
  return model, v, x


@pytest.mark.parametrize('analysed', [1, 2])
def test_one_analysis_serves_every_batch_size(analysed: int):
  """Analysed at batch 1 (size-1 axes carry no identity) or 2; exact at 1, 2, 3 and 7."""
  model, v, x = _conv_case(analysed)
  part = oto_jax.zig_partition(model.apply, v, x)
  assert part.program.signature.env == {'b': analysed} and not part.program.signature.fixed_reason
  assert part.num_zigs == 16, part.summary()  # the first conv's 8 channels; the inner conv's 8
  zeroed = part.zero(v, [0, 3, 9, 12])
  sub = oto_jax.construct_subnet(part, zeroed)
  for b in (1, 2, 3, 7):
    xb = _normal(b, 6, 6, 3, seed=b)
    chex.assert_trees_all_close(sub.apply(sub.variables, xb), model.apply(zeroed, xb), rtol=1e-5, atol=1e-6)
  assert 'b' in str(sub.jaxpr.in_avals[-1])  # the slim program itself has a symbolic batch


class PosEmbedEncoder(nn.Module):
  """Token + position embedding (sliced to the sequence length), one attention head pair, a head."""

  heads: int = 2
  dim: int = 8

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[1]
    h = nn.Embed(11, 16)(tokens) + self.param('pos', nn.initializers.normal(1.0), (12, 16))[:t]
    q, k, val = (nn.DenseGeneral((self.heads, self.dim), name=n)(h) for n in ('q', 'k', 'v'))
    att = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(self.dim), axis=-1)
    o = nn.DenseGeneral(16, axis=(-2, -1), name='o')(jnp.einsum('bhqk,bkhd->bqhd', att, val))
    return nn.Dense(5)(nn.relu(nn.Dense(12)(h + o)))


def test_sequence_length_can_be_symbolic_too():
  model = PosEmbedEncoder()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
  v = _randomised(jax.eval_shape(model.init, jax.random.key(0), tokens))
  part = oto_jax.zig_partition(
    model.apply, v, tokens, polymorphic_shapes=('b, t',), polymorphic_constraints=('t <= 12',)
  )
  assert part.program.signature.env == {'b': 2, 't': 6}
  # Heads, MLP units, and the residual stream (no norm normalises it).
  assert sorted(g.size for g in part.prunable_groups) == [2, 12, 16], part.summary()
  head = next(g for g in part.prunable_groups if g.size == 2)
  mlp = next(g for g in part.prunable_groups if g.size == 12)
  stream = next(g for g in part.prunable_groups if g.size == 16)
  ids = [head.zig_offset + 1, mlp.zig_offset, mlp.zig_offset + 5, stream.zig_offset + 3]
  zeroed = part.zero(v, ids)
  sub = oto_jax.construct_subnet(part, zeroed)
  for b, t in ((2, 6), (1, 3), (3, 12)):
    tb = jnp.asarray(np.random.default_rng(b * t).integers(0, 11, (b, t)), jnp.int32)
    chex.assert_trees_all_close(sub.apply(sub.variables, tb), model.apply(zeroed, tb), rtol=1e-5, atol=1e-6)
  # Without the spec, only the batch is symbolic: another length is refused, with both shapes.
  fixed_len = oto_jax.construct_subnet(oto_jax.zig_partition(model.apply, v, tokens), zeroed, zig_ids=[])
  with pytest.raises(oto_jax.ShapeSpecificError, match=r'\(2, 7\).*\(b, 6\)'):
    fixed_len.apply(fixed_len.variables, jnp.zeros((2, 7), jnp.int32))


def test_batch_can_be_a_multiple_of_a_variable():
  """A batch that a mesh splits is a multiple of its devices: ``2*b`` binds b from the shape,
  and the slim model takes every even batch and refuses an odd one, naming both shapes."""
  model, v, x = _conv_case(batch=4)
  part = oto_jax.zig_partition(model.apply, v, x, polymorphic_shapes=('2*b, 6, 6, 3',))
  assert part.program.signature.env == {'b': 2}
  zeroed = part.zero(v, [0, 3])
  sub = oto_jax.construct_subnet(part, zeroed)
  for batch in (2, 6):
    xb = _normal(batch, 6, 6, 3, seed=batch)
    chex.assert_trees_all_close(sub.apply(sub.variables, xb), model.apply(zeroed, xb), rtol=1e-5, atol=1e-6)
  with pytest.raises(oto_jax.ShapeSpecificError, match=r'\(3, 6, 6, 3\).*\(2\*b, 6, 6, 3\)'):
    sub.apply(sub.variables, _normal(3, 6, 6, 3))
  with pytest.raises(oto_jax.AnalysisError, match='cannot be 5'):
    oto_jax.zig_partition(model.apply, v, _normal(5, 6, 6, 3), polymorphic_shapes=('2*b, 6, 6, 3',))


class BatchBranching(nn.Module):
  """Code that compares the batch size with a number: it cannot be traced symbolically."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))
    if h.shape[0] > 1:  # the line a user would need to see
      h = h - h.mean(axis=0, keepdims=True)
    return nn.Dense(2)(h)


def test_shape_specific_function_is_fixed_and_says_where():
  model = BatchBranching()
  x = _normal(4, 5)
  v = _randomised(jax.eval_shape(model.init, jax.random.key(0), x))
  part = oto_jax.zig_partition(model.apply, v, x)
  reason = part.program.signature.fixed_reason
  assert 'test_polymorphic.py' in reason and 'InconclusiveDimensionOperation' in reason, reason
  assert part.num_zigs == 6, part.summary()
  zeroed = part.zero(v, [2])
  sub = oto_jax.construct_subnet(part, zeroed)
  chex.assert_trees_all_close(sub.apply(sub.variables, x), model.apply(zeroed, x), rtol=1e-6)
  with pytest.raises(oto_jax.ShapeSpecificError, match='test_polymorphic.py'):
    sub.apply(sub.variables, x[:3])
  # Asking for symbolic shapes explicitly turns the failure into an error.
  with pytest.raises(oto_jax.AnalysisError, match='polymorphic_shapes'):
    oto_jax.zig_partition(model.apply, v, x, polymorphic_shapes=('b, _',))


def test_static_arguments_are_part_of_the_program():
  model, v, x = _conv_case()
  part = oto_jax.zig_partition(model.apply, v, x, train=False)
  sub = oto_jax.construct_subnet(part, v, zig_ids=[1])
  sub.apply(sub.variables, x, train=False)
  with pytest.raises(oto_jax.ShapeSpecificError, match='train.*analysed with False'):
    sub.apply(sub.variables, x, train=True)
  with pytest.raises(oto_jax.ShapeSpecificError, match='structure'):
    sub.apply(sub.variables, x)


class FlattenAll(nn.Module):
  """``x.reshape(-1)`` merges the batch with the channels: they cannot be cut per batch size."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(4)(x))
    g = nn.relu(nn.Dense(3)(x))
    return nn.Dense(2)(g), jnp.sum(h.reshape(-1) ** 2)


def test_a_reshape_merging_batch_and_channels_blocks_them():
  model = FlattenAll()
  x = _normal(2, 5)
  v = _randomised(jax.eval_shape(model.init, jax.random.key(0), x))
  part = oto_jax.zig_partition(model.apply, v, x)
  blocked = [g for g in part.node_groups if g.size == 4]
  assert blocked and not blocked[0].prunable and 'input shapes' in blocked[0].reason, part.summary()
  assert [g.size for g in part.prunable_groups] == [3]


_RUNNER = textwrap.dedent(
  """
  import sys, numpy as np, jax
  directory = sys.argv[1]
  exported = jax.export.deserialize(bytearray(open(directory + '/apply.stablehlo', 'rb').read()))
  data = np.load(directory + '/data.npz')
  leaves = [data[f'leaf{i}'] for i in range(int(data['n']))]
  for b in (1, 5):
    got = exported.call(leaves, (data[f'x{b}'],), {})
    np.testing.assert_allclose(np.asarray(got), data[f'y{b}'], rtol=1e-5, atol=1e-6)
  assert 'oto_jax' not in sys.modules
  print('ok')
  """
)


def test_saved_stablehlo_runs_every_batch_size_without_oto_jax(tmp_path):
  model, v, x = _conv_case()
  part = oto_jax.zig_partition(model.apply, v, x)
  zeroed = part.zero(v, [1, 2, 10])
  sub = oto_jax.construct_subnet(part, zeroed)
  oto_jax.save_subnet(str(tmp_path), sub, x)
  data = {f'leaf{i}': np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(sub.variables))}
  data['n'] = np.asarray(len(data))
  for b in (1, 5):
    data[f'x{b}'] = np.asarray(_normal(b, 6, 6, 3, seed=b))
    data[f'y{b}'] = np.asarray(model.apply(zeroed, data[f'x{b}']))
  np.savez(tmp_path / 'data.npz', **data)
  env = {k: val for k, val in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run(
    [sys.executable, '-c', _RUNNER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-2000:]
  # load_subnet without a partition: the exported program, at either batch size.
  restored = oto_jax.load_subnet(str(tmp_path))
  got = restored.apply(restored.variables, data['x5'])
  np.testing.assert_allclose(np.asarray(got), data['y5'], rtol=1e-5, atol=1e-6)


def test_reshape_that_only_fits_batch_zero_is_refused():
  """jax.export accepts reshaping (b, 16) to (b, 4, 2), both empty at b = 0; the analysis names
  it instead of failing inside."""
  with pytest.raises(oto_jax.AnalysisError, match=r'reshapes \(b, 16\) to \(b, 4, 2\)'):
    oto_jax.zig_partition(lambda w, x: (x @ w).reshape(x.shape[0], 4, 2), jnp.ones((8, 16)), jnp.ones((2, 8)))
