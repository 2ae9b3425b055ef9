"""Shared tables do not couple their readers: an ALiBi bias added in every layer, T5's bias
gathered once from a trainable table. Counts are derived by hand: each layer's 4 heads are one
node group."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

import oto_jax
from oto_jax import sharing
from oto_jax.ir import Eqn
from tests.zoo.common import randomize_dependents, zero_members

HEADS, WIDTH, LENGTH, LAYERS = 4, 16, 6, 2


def alibi_bias(heads: int, length: int) -> jax.Array:
  """ALiBi (Press et al., 2022): head ``h`` adds ``-m_h · |i - j|``, with slopes ``m_h = 2^(-8h/H)``."""
  slopes = 2.0 ** (-8.0 * jnp.arange(1, heads + 1) / heads)
  pos = jnp.arange(length)
  return slopes[:, None, None] * -jnp.abs(pos[None, :, None] - pos[None, None, :])


def _layers(params, x, bias):
  """LAYERS residual attention layers that all add the same ``bias`` (heads × length × length)."""
  b, s, d = x.shape
  hd = d // HEADS
  for layer in range(LAYERS):
    q, k, v = ((x @ params[f'{n}{layer}']).reshape(b, s, HEADS, hd) for n in 'qkv')
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd) + bias
    out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
    x = x + out @ params[f'o{layer}']
  return x


def alibi_attention(params, x):
  return _layers(params, x, alibi_bias(HEADS, x.shape[1]))  # computed once, added in every layer


def _params(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
    f'{n}{layer}': jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / 4, jnp.float32)
    for n in 'qkvo'
    for layer in range(LAYERS)
  }


def _x(batch: int, seed: int = 1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, LENGTH, WIDTH)), jnp.float32)


def test_alibi_heads_are_one_group_per_layer():
  """Without the copies, the shared bias unites head h of both layers: 4 ZIGs. With them, each
  layer's heads are a node group of their own: 8."""
  params, x = _params(), _x(2)
  part = oto_jax.zig_partition(alibi_attention, params, x)
  assert part.num_zigs == HEADS * LAYERS, part.summary()
  assert sorted(g.size for g in part.prunable_groups) == [HEADS] * LAYERS
  for g, layer in zip(part.prunable_groups, range(LAYERS)):
    assert {e.path for e in g.members} >= {(f'q{layer}',), (f'k{layer}',), (f'v{layer}',)}, g
  copies = [s for s in part.program.steps if isinstance(s, Eqn) and s.entry is sharing.FORK]
  shapes = [part.program.values.shapes[c.ins[0]] for c in copies]
  assert shapes.count((HEADS, LENGTH, LENGTH)) == LAYERS, shapes  # one copy of the bias per layer


def test_pruning_one_layers_head_alone_is_exact():
  """Head 1 of layer 0 goes, layer 1 keeps all four: the slim program slices the shared bias
  for layer 0 only, and equals the zeroed model at two batch sizes."""
  params, x = _params(), _x(2)
  part = oto_jax.zig_partition(alibi_attention, params, x)
  zeroed = randomize_dependents(part, zero_members(part, params, [1]), [1], seed=2)
  subnet = oto_jax.construct_subnet(part, zeroed)
  assert subnet.variables['q0'].shape == (WIDTH, WIDTH - WIDTH // HEADS)
  assert subnet.variables['q1'].shape == (WIDTH, WIDTH)
  for batch in (2, 3):
    xb = _x(batch, seed=batch)
    chex.assert_trees_all_close(subnet.apply(subnet.variables, xb), alibi_attention(zeroed, xb), atol=1e-5)


def t5_attention(params, x):
  """T5-style: one trainable bias table (buckets × heads), gathered once by relative position
  and added in every layer."""
  s = x.shape[1]
  rel = jnp.clip(jnp.arange(s)[None, :] - jnp.arange(s)[:, None], -3, 3) + 3  # 7 buckets
  return _layers(params, x, jnp.transpose(params['table'][rel], (2, 0, 1)))


def test_trainable_shared_bias_is_kept_whole_and_heads_stay_per_layer():
  """T5: the bias gathered from a trainable table is shared by both layers. Each layer's heads
  are their own 4 ZIGs; the table is kept whole (a dependent of no ZIG, blocked with the
  reason), and pruning one layer's heads alone is exact."""
  params = {**_params(), 'table': jnp.asarray(np.random.default_rng(5).normal(size=(7, HEADS)), jnp.float32)}
  part = oto_jax.zig_partition(t5_attention, params, _x(2))
  assert part.num_zigs == HEADS * LAYERS, part.summary()
  table = [g for g in part.node_groups if any(e.path == ('table',) for e in (*g.members, *g.dependents))]
  assert table and not any(g.prunable for g in table)
  assert any('kept whole' in g.reason for g in table), [g.reason for g in table]
  zeroed = randomize_dependents(part, zero_members(part, params, [0, 1]), [0, 1], seed=4)
  subnet = oto_jax.construct_subnet(part, zeroed)
  assert subnet.variables['table'].shape == (7, HEADS)
  assert subnet.variables['q0'].shape == (WIDTH, WIDTH // 2)
  assert subnet.variables['q1'].shape == (WIDTH, WIDTH)
  for batch in (2, 3):
    xb = _x(batch, seed=batch)
    chex.assert_trees_all_close(subnet.apply(subnet.variables, xb), t5_attention(zeroed, xb), atol=1e-5)


def test_input_dependent_values_and_variables_are_not_copied():
  """Per-example values (they follow the input) and variables read twice (shared weights) are
  left alone: only tables computed once are copied per reader."""

  def f(params, x):
    table = x[0] * 2.0  # from the input
    return (x + table) @ params['w'] + (x * table) @ params['w']

  params = {'w': jnp.ones((5, 2))}
  part = oto_jax.zig_partition(f, params, jnp.ones((3, 5)))
  assert not any(isinstance(s, Eqn) and s.entry is sharing.FORK for s in part.program.steps)
