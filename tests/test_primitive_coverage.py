"""Coverage of JAX's primitives: every one has a registry entry (exact or an explicit block) or
is entered by the tracer, and each newly covered primitive is analysed, proven, costed and cut
on a small program with hand-derived ZIG counts.

Each program is ``dense(4 → 6) → op → dense(→ 3)``: the six hidden channels are ZIGs when the
op carries them exactly, and none are when it blocks them.
"""

from __future__ import annotations

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

import oto_jax
from oto_jax.ir import Call, Cond, Eqn, Loop
from tests.zoo.common import randomize_dependents, zero_members

# Primitives whose sub-programs the tracer walks (oto_jax.ir.Builder) instead of an entry.
ENTERED = {
  'call',
  'closed_call',
  'cond',
  'custom_jvp_call',
  'custom_vjp_call',
  'jit',
  'remat2',
  'scan',
  'shard_map',
  'while',
}


def _public_primitives() -> set[str]:
  """The primitives JAX lists publicly: jax.extend.core.primitives and jax.lax's ``*_p``."""
  found = set()
  for module in (jex.core.primitives, jax.lax):
    for name in dir(module):
      p = getattr(module, name, None)
      if isinstance(p, jex.core.Primitive):
        found.add(p.name)
  return found


def test_every_public_primitive_has_an_entry_or_is_entered():
  """A primitive of the installed JAX with neither an entry nor a walk into its sub-program
  would fall back to the generic block; none may."""
  missing = sorted(_public_primitives() - set(oto_jax.registered_primitives()) - ENTERED)
  assert not missing, f'primitives without a registry entry: {missing}'


def _kinds(steps) -> set[str]:
  out = set()
  for s in steps:
    if isinstance(s, Eqn):
      out.add(s.name)
    elif isinstance(s, Call):
      out.add(s.kind)
      out |= _kinds(s.body)
    elif isinstance(s, Loop):
      out.add(s.kind)
      out |= _kinds(s.body) | _kinds(s.cond)
    elif isinstance(s, Cond):
      out.add('cond')
      for b in s.branches:
        out |= _kinds(b.steps)
  return out


def _relu_cond(h):
  return jax.lax.cond(h.shape[-1] > 0, jax.nn.relu, lambda v: v, h)


def _scan_twice(h):
  return jax.lax.scan(lambda c, _: (jnp.tanh(c), None), h, length=2)[0]


def _while_twice(h):
  return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, h))[1]


@jax.custom_vjp
def _custom_tanh(h):
  return jnp.tanh(h)


_custom_tanh.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (g * (1 - jnp.tanh(h) ** 2),))


def _dropout(h):
  # Train-mode dropout with a fixed key: random bits, a bit-cast to float, a comparison.
  keep = jax.random.bernoulli(jax.random.key(1), 0.7, h.shape)
  return jnp.where(keep, h / 0.7, 0.0)


def _stack_then_merge(h):
  # RoFormer-style: the stacked pair merged into the feature axis by a reshape.
  return jnp.stack([h, -h], axis=-1).reshape(h.shape[0], -1)


def _unstack_halves(h):
  a, b = jnp.unstack(h.reshape(h.shape[0], 2, 3), axis=1)
  return a * b


def _sorted_pairs(h):
  return jnp.sort(jnp.stack([h, 2 * h], axis=1), axis=1).sum(axis=1)


def _scatter(kind):
  def f(h):
    at = h.at[0]
    return getattr(at, kind)(h[1])

  return f


def _bitcast_roundtrip(h):
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(h, jnp.int32), jnp.float32)


def _top_k_indices(h):
  # A zero row's top-2 indices are (0, 1): the second is not zero.
  vals, idx = jax.lax.top_k(jnp.stack([h, -h], axis=-1), 2)
  return vals[..., 0] + idx[..., 1].astype(h.dtype)


def _top_k_over_pairs(h):
  return jax.lax.top_k(jnp.stack([h, -h], axis=-1), 1)[0][..., 0]


def _ragged_experts(h):
  # Row 0 goes to expert 0, the others to expert 1 (two fixed experts of 5 outputs).
  experts = jnp.asarray(np.random.default_rng(4).normal(size=(2, h.shape[1], 5)), h.dtype)
  sizes = jnp.stack([jnp.ones((), jnp.int32), jnp.asarray(h.shape[0] - 1, jnp.int32)])
  return jax.lax.ragged_dot(h, experts, sizes)


# name → (op on the hidden activations, ZIGs expected, primitives that must appear).
CASES = {
  'jit': (jax.jit(jax.nn.relu), 6, {'jit'}),
  'custom_jvp': (jax.nn.relu, 6, {'custom_jvp_call'}),
  'custom_vjp': (_custom_tanh, 6, {'custom_vjp_call'}),
  'remat': (jax.checkpoint(jnp.tanh), 6, {'remat2'}),
  'cond': (_relu_cond, 6, {'cond'}),
  'scan': (_scan_twice, 6, {'scan'}),
  'while': (_while_twice, 6, {'while'}),
  'checkpoint_name': (lambda h: checkpoint_name(h, 'hidden'), 6, {'name'}),
  'dropout_train_mode': (_dropout, 6, {'random_bits', 'bitcast_convert_type'}),
  'bitcast_roundtrip': (_bitcast_roundtrip, 6, {'bitcast_convert_type'}),
  'stack_reshape': (_stack_then_merge, 6, {'stack'}),
  'unstack': (_unstack_halves, 3, {'unstack'}),
  'tile': (lambda h: jnp.tile(h, (1, 2)), 6, {'tile'}),
  'sort': (_sorted_pairs, 6, {'sort'}),
  'scatter_set': (_scatter('set'), 6, {'scatter'}),
  'scatter_add': (_scatter('add'), 6, {'scatter-add'}),
  'scatter_mul': (_scatter('multiply'), 6, {'scatter-mul'}),
  'scatter_max': (_scatter('max'), 6, {'scatter-max'}),
  # The values of a zero row are zeros (the indices are not, and feed nothing here).
  'top_k': (_top_k_over_pairs, 6, {'top_k'}),
  # ... and a channel that adds its indices is no longer zero.
  'top_k_indices': (_top_k_indices, 0, {'top_k'}),
  'fft': (lambda h: jnp.fft.fft(h).real, 0, {'fft'}),
  # A plain sum over the channels: a zero channel adds nothing.
  'reduce_sum': (lambda h: h * jnp.tanh(h.sum(-1, keepdims=True)), 6, {'reduce_sum'}),
  # A mean over them divides by the width, which a slimmer layer changes.
  'reduce_sum_mean': (lambda h: h - h.mean(-1, keepdims=True), 0, {'reduce_sum'}),
  # The hidden units are contracted by every expert; the constant experts are kept whole.
  'ragged_dot_general': (_ragged_experts, 6, {'ragged_dot_general'}),
}


def _model(op):
  def f(params, x):
    h = x @ params['w1'] + params['b1']
    return op(h) @ params['w2']

  return f


def _params(op, seed=0):
  rng = np.random.default_rng(seed)
  width = jax.eval_shape(op, jax.ShapeDtypeStruct((2, 6), jnp.float32)).shape[-1]
  return {
    'w1': jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
    'b1': jnp.asarray(rng.normal(size=(6,)), jnp.float32),
    'w2': jnp.asarray(rng.normal(size=(width, 3)), jnp.float32),
  }


@pytest.mark.parametrize('name', sorted(CASES))
def test_primitive_is_analysed_proven_costed_and_cut(name):
  """The op's primitive is in the program; the hand-derived ZIGs are found; zeroing some and
  randomising their dependents leaves the output unchanged; the FLOPs model charges less
  without them; the slim program equals the zeroed model at two batch sizes."""
  op, expected, prims = CASES[name]
  f, params = _model(op), _params(op)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)), jnp.float32)
  part = oto_jax.zig_partition(f, params, x)
  kinds = _kinds(part.program.steps)
  assert prims <= kinds, f'{prims - kinds} not in the program: {sorted(kinds)}'
  assert part.num_zigs == expected, part.summary()
  if not expected:
    return
  ids = [0, expected - 1]
  zeroed = zero_members(part, params, ids)
  shuffled = randomize_dependents(part, zeroed, ids, seed=3)
  chex.assert_trees_all_close(f(shuffled, x), f(zeroed, x), rtol=1e-5, atol=1e-6)
  keep = np.ones(part.num_zigs, bool)
  keep[ids] = False
  assert part.flops.evaluate(keep) <= part.flops.total
  subnet = oto_jax.construct_subnet(part, shuffled)
  assert set(subnet.removed_zig_ids) == set(ids)
  if 'remat2' in prims:  # the slim program rematerialises what the model did
    assert 'remat2' in str(subnet.jaxpr)
  for batch in (2, 5):
    xb = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 4)), jnp.float32)
    chex.assert_trees_all_close(subnet.apply(subnet.variables, xb), f(shuffled, xb), rtol=1e-5, atol=1e-5)


def _rotate_every_two(x):
  # GPT-J / RoFormer: pairs (x[2i], x[2i+1]) rotate together, reassembled with jnp.stack.
  return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def _rotary_attention(params, x, heads=4):
  b, s, d = x.shape
  hd = d // heads
  angles = jnp.arange(s)[:, None] * (1.0 / 10000 ** (jnp.arange(0, hd, 2) / hd))
  sin = jnp.repeat(jnp.sin(angles), 2, axis=-1)[:, None, :]
  cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)[:, None, :]
  q, k, v = ((x @ params[n]).reshape(b, s, heads, hd) for n in ('q', 'k', 'v'))
  q, k = (t * cos + _rotate_every_two(t) * sin for t in (q, k))
  probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd), axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, s, d)
  return out @ params['o']


def test_rotary_attention_built_with_stack_keeps_its_heads():
  """Rotary embeddings assembled with jnp.stack (GPT-J, RoFormer): the strided halves block the
  head dimension, but each of the 4 heads (its q, k, v columns and o rows) is a ZIG, and the
  slim model without two heads is exact."""
  rng = np.random.default_rng(0)
  params = {n: jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32) for n in 'qkvo'}
  x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  part = oto_jax.zig_partition(_rotary_attention, params, x)
  assert 'stack' in _kinds(part.program.steps)
  assert part.num_zigs == 4 and [g.size for g in part.prunable_groups] == [4], part.summary()
  zeroed = randomize_dependents(part, zero_members(part, params, [1, 3]), [1, 3], seed=1)
  subnet = oto_jax.construct_subnet(part, zeroed)
  assert subnet.variables['q'].shape == (16, 8)
  for batch in (2, 3):
    xb = jnp.asarray(rng.normal(size=(batch, 6, 16)), jnp.float32)
    chex.assert_trees_all_close(
      subnet.apply(subnet.variables, xb), _rotary_attention(zeroed, xb), rtol=1e-5, atol=1e-5
    )


def _block_gather(params, x, heads=4, keep=2):
  # BigBird-style: each head reads its own feature positions, a gather vmapped over the heads
  # (operand_batching_dims).
  h = x @ params['w1']
  b, d = h.shape
  h = h.reshape(b, heads, d // heads)
  idx = jnp.asarray(np.arange(heads * keep).reshape(heads, keep) % (d // heads))
  picked = jax.vmap(lambda hh, i: hh[:, i], in_axes=(1, 0), out_axes=1)(h, idx)
  return picked.reshape(b, heads * keep) @ params['w2']


def _block_scatter(params, x, heads=4):
  # Each head adds its own update into its own feature positions: a scatter-add vmapped over
  # the heads (operand_batching_dims).
  h = (x @ params['w1']).reshape(x.shape[0], heads, -1)
  idx = jnp.asarray(np.arange(heads * 2).reshape(heads, 2) % h.shape[-1])
  upd = h[..., :2] * 2.0
  out = jax.vmap(lambda hh, i, u: hh.at[:, i].add(u), in_axes=(1, 0, 1), out_axes=1)(h, idx, upd)
  return out.reshape(x.shape[0], -1) @ params['w2']


@pytest.mark.parametrize(
  'model, primitive, width',
  [(_block_gather, 'gather', 8), (_block_scatter, 'scatter-add', 16)],
  ids=['gather', 'scatter'],
)
def test_vmapped_indexing_keeps_its_batched_heads(model, primitive, width):
  """A gather or scatter-add batched over the heads (operand_batching_dims) touches head h only
  from head h: the 4 heads are ZIGs (the indexed feature axis is blocked), and the slim model
  without two heads is exact at two batch sizes."""
  rng = np.random.default_rng(0)
  params = {
    'w1': jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
    'w2': jnp.asarray(rng.normal(size=(width, 3)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  part = oto_jax.zig_partition(model, params, x)
  assert primitive in _kinds(part.program.steps)
  assert part.num_zigs == 4 and [g.size for g in part.prunable_groups] == [4], part.summary()
  zeroed = randomize_dependents(part, zero_members(part, params, [1, 2]), [1, 2], seed=1)
  subnet = oto_jax.construct_subnet(part, zeroed)
  assert subnet.variables['w1'].shape == (8, 8) and subnet.variables['w2'].shape == (width // 2, 3)
  for batch in (2, 5):
    xb = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)
    chex.assert_trees_all_close(subnet.apply(subnet.variables, xb), model(zeroed, xb), rtol=1e-5, atol=1e-5)
