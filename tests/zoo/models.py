"""One zoo of architectures, each built in Flax linen and in Flax NNX, with hand-derived ZIG counts.

Every model is one forward function written against ``tests.arch``'s layer API; :data:`CASES`
builds each in both frameworks ('linen/resnet_basic', 'nnx/resnet_basic') with the same
random variables (:func:`tests.arch.randomize`: nothing keeps an init value, so a wrongly
grouped bias or running mean cannot hide). The ZIG counts are derived from the architecture
alone (see the comment beside each), never from running the analysis, so a disagreement
points at either the analysis or the reasoning, and both deserve a look. One spec gives one
count: the two builds must agree with it, and with each other.

Counting rules, in short: a channel / hidden unit / attention head produced by a layer and
consumed by a contraction is one ZIG; a residual add or a shared consumer ties channels into
one node group; the model's input and output axes, anything normalised by LayerNorm/RMSNorm
and anything reduced over other than by a plain sum (a mean, a max) are never prunable; a
channel shuffle's (groups, channels) view ties channel i of every group into one ZIG; a
depthwise conv's channel is its input's ZIG, and a grouped conv gives one ZIG per group.

Linen builds of models with BatchNorm are applied with ``train=False`` (a static argument the
slim model must honour); NNX builds construct BatchNorm in eval mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests import arch
from tests.arch import Layers

from .common import ZooCase

Array = jax.Array
BATCH = 2
# The seed of every case's variables. Tests that train zoo models depend on these values: with
# seeds 0 and 2, one of DHSPG's redundant ZIGs in conv_flatten_dense needs ~300 steps, not the
# 150 test_optimizers gives it (its λ stays bounded so that each step still descends, as
# documented). A new seed means re-measuring those tests.
SEED = 1

# ---------------------------------------------------------------------------------------------
# Inputs: numpy draws, device_put (jnp.asarray of a host array compiles once per shape).


def features(*shape: int) -> Array:
  return jax.device_put(np.random.default_rng(1).standard_normal((BATCH, *shape)).astype(np.float32))


def images(h: int, w: int, c: int = 3) -> Array:
  return features(h, w, c)


def tokens(length: int, vocab: int) -> Array:
  return jax.device_put(np.random.default_rng(1).integers(0, vocab, (BATCH, length)).astype(np.int32))


# ---------------------------------------------------------------------------------------------
# Shared pieces (plain functions of L and arrays).


def max_pool(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def global_pool(x: Array) -> Array:
  return x.mean(axis=(1, 2))


def conv_bn(L: Layers, x: Array, width: int, kernel: int, *, strides: int = 1, groups: int = 1) -> Array:
  """conv (no bias, as in ResNets) → eval-mode BatchNorm."""
  return L.batch_norm(L.conv(x, width, kernel, strides=strides, groups=groups, use_bias=False))


def channel_shuffle(x: Array, groups: int) -> Array:
  b, h, w, c = x.shape
  return x.reshape(b, h, w, groups, c // groups).swapaxes(3, 4).reshape(b, h, w, c)


def attend(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Softmax attention over (batch, time, heads, head_dim) arrays."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def rope(x: Array) -> Array:
  """Rotary position embedding on (B, T, heads, head_dim), rotating the two halves."""
  t, half = x.shape[1], x.shape[-1] // 2
  freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gelu_mlp(L: Layers, x: Array, hidden: int) -> Array:
  return L.dense(jax.nn.gelu(L.dense(x, hidden)), x.shape[-1])


def res_mlp_block(hidden: int, L: Layers, x: Array) -> Array:
  """x + Dense(relu(Dense(x))): no norm, so the residual stream stays prunable."""
  return x + L.dense(jax.nn.relu(L.dense(x, hidden)), x.shape[-1])


# ---------------------------------------------------------------------------------------------
# MLP and plain CNNs. Each factory returns a forward ``f(L, x)``.


def mlp(widths: Sequence[int] = (32, 24, 16), classes: int = 10):
  """Dense-relu layers and a Dense head."""

  def forward(L: Layers, x: Array) -> Array:
    for w in widths:
      x = jax.nn.relu(L.dense(x, w))
    return L.dense(x, classes)

  return forward


# VGG16's 13 convs with widths divided by 8; 'M' is a 2x2 max pool.
VGG16_CFG = (8, 8, 'M', 16, 16, 'M', 32, 32, 32, 'M', 64, 64, 64, 'M', 64, 64, 64, 'M')


def vgg16_bn(cfg: Sequence[int | str] = VGG16_CFG, hidden: int = 32, classes: int = 10):
  """VGG16 with BN for CIFAR shapes: conv-BN-relu stacks, max pools, two Dense layers."""

  def forward(L: Layers, x: Array) -> Array:
    for c in cfg:
      # torchvision's VGG-BN keeps the conv bias, so the bias is a member next to BN's.
      x = max_pool(x) if c == 'M' else jax.nn.relu(L.batch_norm(L.conv(x, c, 3)))
    x = jax.nn.relu(L.dense(x.reshape(x.shape[0], -1), hidden))
    return L.dense(x, classes)

  return forward


def conv_flatten_dense(L: Layers, x: Array) -> Array:
  """Two convs, then a flatten that keeps a 4x4 spatial extent, then two Dense layers."""
  x = jax.nn.relu(L.conv(x, 8, 3))
  x = jax.nn.relu(L.conv(x, 16, 3, strides=2))
  x = jax.nn.relu(L.dense(x.reshape(x.shape[0], -1), 32))
  return L.dense(x, 10)


# ---------------------------------------------------------------------------------------------
# Residual CNNs


def basic_block(L: Layers, x: Array, width: int, strides: int = 1) -> Array:
  """ResNet basic block; a 1x1 conv + BN projection when stride or width changes."""
  y = jax.nn.relu(conv_bn(L, x, width, 3, strides=strides))
  y = conv_bn(L, y, width, 3)
  if strides != 1 or x.shape[-1] != width:
    x = conv_bn(L, x, width, 1, strides=strides)
  return jax.nn.relu(x + y)


def bottleneck_block(L: Layers, x: Array, mid: int, out: int, strides: int = 1) -> Array:
  """ResNet bottleneck block (stride on the 3x3) with a projection where the shape changes."""
  y = jax.nn.relu(conv_bn(L, x, mid, 1))
  y = jax.nn.relu(conv_bn(L, y, mid, 3, strides=strides))
  y = conv_bn(L, y, out, 1)
  if strides != 1 or x.shape[-1] != out:
    x = conv_bn(L, x, out, 1, strides=strides)
  return jax.nn.relu(x + y)


def resnet(block: Callable[..., Array], specs: Sequence[tuple[int, ...]], stem: int = 8, classes: int = 10):
  """Stem conv-BN-relu, a list of blocks, global average pool and a Dense head."""

  def forward(L: Layers, x: Array) -> Array:
    x = jax.nn.relu(conv_bn(L, x, stem, 3))
    for spec in specs:
      x = block(L, x, *spec)
    return L.dense(global_pool(x), classes)

  return forward


def densenet(L: Layers, x: Array, stem: int = 8, growth: int = 4, bottleneck: int = 8, layers: int = 3):
  """A stem conv, one dense block of DenseNet-B layers (BN-relu-1x1, BN-relu-3x3, appended),
  final BN-relu, pool, Dense."""
  x = L.conv(x, stem, 3)
  for _ in range(layers):
    y = L.conv(jax.nn.relu(L.batch_norm(x)), bottleneck, 1, use_bias=False)
    y = L.conv(jax.nn.relu(L.batch_norm(y)), growth, 3, use_bias=False)
    x = jnp.concatenate([x, y], axis=-1)
  return L.dense(global_pool(jax.nn.relu(L.batch_norm(x))), 10)


def inverted_residual(L: Layers, x: Array, expand: int, out: int, strides: int) -> Array:
  """MobileNetV2 block: expand 1x1, depthwise 3x3, linear project 1x1, residual if shapes match."""
  hidden = x.shape[-1] * expand
  y = x
  if expand != 1:
    y = jax.nn.relu6(conv_bn(L, y, hidden, 1))
  y = jax.nn.relu6(conv_bn(L, y, hidden, 3, strides=strides, groups=hidden))
  y = conv_bn(L, y, out, 1)
  return x + y if strides == 1 and x.shape[-1] == out else y


MOBILENET_BLOCKS = ((1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2))


def mobilenet_v2(L: Layers, x: Array) -> Array:
  """Strided stem, inverted residual blocks (expand, out, stride), 1x1 head conv, pool, Dense."""
  x = jax.nn.relu6(conv_bn(L, x, 8, 3, strides=2))
  for spec in MOBILENET_BLOCKS:
    x = inverted_residual(L, x, *spec)
  return L.dense(global_pool(jax.nn.relu6(conv_bn(L, x, 32, 1))), 10)


def resnext(L: Layers, x: Array, stem: int = 24, blocks: int = 2, width: int = 16, groups: int = 4) -> Array:
  """Stem conv-BN-relu; blocks of 1x1, grouped 3x3, 1x1 back to the stem width with an
  identity residual; pool, Dense."""
  x = jax.nn.relu(conv_bn(L, x, stem, 3))
  for _ in range(blocks):
    y = jax.nn.relu(conv_bn(L, x, width, 1))
    y = jax.nn.relu(conv_bn(L, y, width, 3, groups=groups))
    x = jax.nn.relu(x + conv_bn(L, y, x.shape[-1], 1))
  return L.dense(global_pool(x), 10)


def se_net(L: Layers, x: Array, width: int = 16, reduced: int = 4) -> Array:
  """Stem, one residual block whose second BN output is gated by squeeze-excitation (spatial
  mean, Dense down, relu, Dense up, sigmoid, scale)."""
  x = jax.nn.relu(conv_bn(L, x, width, 3))
  y = jax.nn.relu(conv_bn(L, x, width, 3))
  y = conv_bn(L, y, width, 3)
  s = jax.nn.relu(L.dense(global_pool(y), reduced))
  s = jax.nn.sigmoid(L.dense(s, width))
  x = jax.nn.relu(x + y * s[:, None, None, :])
  return L.dense(global_pool(x), 10)


def shufflenet_v2(L: Layers, x: Array, width: int = 16, units: int = 2) -> Array:
  """Stem conv-BN-relu; stride-1 ShuffleNetV2 units (split, branch on one half, concat,
  shuffle with 2 groups); pool, Dense."""
  x = jax.nn.relu(conv_bn(L, x, width, 3))
  half = width // 2
  for _ in range(units):
    x1, x2 = jnp.split(x, 2, axis=-1)
    y = jax.nn.relu(conv_bn(L, x2, half, 1))
    y = conv_bn(L, y, half, 3, groups=half)
    y = jax.nn.relu(conv_bn(L, y, half, 1))
    x = channel_shuffle(jnp.concatenate([x1, y], axis=-1), 2)
  return L.dense(global_pool(x), 10)


def unet(L: Layers, x: Array, widths: Sequence[int] = (8, 16, 32), classes: int = 3) -> Array:
  """Two encoder levels, a bottleneck, two decoder levels with transposed-conv upsampling."""

  def double_conv(x: Array, c: int) -> Array:
    return jax.nn.relu(L.conv(jax.nn.relu(L.conv(x, c, 3)), c, 3))

  skips = []
  for c in widths[:-1]:
    x = double_conv(x, c)
    skips.append(x)
    x = max_pool(x)
  x = double_conv(x, widths[-1])
  for c, skip in zip(reversed(widths[:-1]), reversed(skips)):
    x = L.conv_transpose(x, c, 2, strides=2)
    x = double_conv(jnp.concatenate([x, skip], axis=-1), c)
  return L.conv(x, classes, 1)


# ---------------------------------------------------------------------------------------------
# Transformers


def vit(patch: int = 4, hidden: int = 32, heads: int = 4, mlp_hidden: int = 64, layers: int = 2):
  """Patch conv, class token, learned positions, pre-norm layers with fused-QKV attention
  (one Dense(3d) reshaped to (B, T, 3, heads, head_dim)), head on the class token."""

  def attention(L: Layers, x: Array) -> Array:
    b, t, d = x.shape
    qkv = L.dense(x, 3 * d).reshape(b, t, 3, heads, d // heads)
    o = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return L.dense(o.reshape(b, t, d), d)

  def forward(L: Layers, x: Array) -> Array:
    x = L.conv(x, hidden, patch, strides=patch, padding='VALID')
    x = x.reshape(x.shape[0], -1, hidden)
    cls = jnp.broadcast_to(L.param('cls', (1, 1, hidden)), (x.shape[0], 1, hidden))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + L.param('pos', (1, x.shape[1], hidden))
    for _ in range(layers):
      x = x + attention(L, L.layer_norm(x))
      x = x + gelu_mlp(L, L.layer_norm(x), mlp_hidden)
    return L.dense(L.layer_norm(x)[:, 0], 10)

  return forward


def bert(L: Layers, ids: Array, vocab: int = 50, max_len: int = 8, hidden: int = 32, heads: int = 4) -> Array:
  """Token + position embeddings, embedding LayerNorm, post-norm layers with split q/k/v
  attention (each Dense reshaped to heads), a Dense vocab head."""
  x = L.embed(ids, vocab, hidden) + L.embed(jnp.arange(ids.shape[1]), max_len, hidden)[None]
  x = L.layer_norm(x)
  for _ in range(2):
    b, t, d = x.shape
    q, k, v = (L.dense(x, d).reshape(b, t, heads, d // heads) for _ in range(3))
    x = L.layer_norm(x + L.dense(attend(q, k, v).reshape(b, t, d), d))
    x = L.layer_norm(x + gelu_mlp(L, x, 64))
  return L.dense(x, vocab)


def mha_encoder(L: Layers, x: Array, hidden: int = 32, heads: int = 4, mlp_hidden: int = 48) -> Array:
  """Input projection, pre-norm layers on the frameworks' own multi-head attention, pool, head."""
  x = L.dense(x, hidden)
  for _ in range(2):
    x = x + L.mha(L.layer_norm(x), heads, qkv_features=hidden)
    x = x + gelu_mlp(L, L.layer_norm(x), mlp_hidden)
  return L.dense(L.layer_norm(x).mean(axis=1), 10)


def llama(
  L: Layers, ids: Array, vocab: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2
) -> Array:
  """Embedding; decoder blocks of RMSNorm, causal grouped-query attention with RoPE (KV heads
  repeated up to the query heads), RMSNorm, SwiGLU; final RMSNorm, Dense vocab head."""
  x = L.embed(ids, vocab, hidden)
  hd = hidden // heads
  for _ in range(2):
    h = L.rms_norm(x)
    b, t, d = h.shape
    q = rope(L.dense(h, heads * hd, use_bias=False).reshape(b, t, heads, hd))
    k = rope(L.dense(h, kv_heads * hd, use_bias=False).reshape(b, t, kv_heads, hd))
    v = L.dense(h, kv_heads * hd, use_bias=False).reshape(b, t, kv_heads, hd)
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    x = x + L.dense(attend(q, k, v, causal).reshape(b, t, d), d, use_bias=False)
    h = L.rms_norm(x)
    gate, up = L.dense(h, 64, use_bias=False), L.dense(h, 64, use_bias=False)
    x = x + L.dense(jax.nn.silu(gate) * up, d, use_bias=False)
  return L.dense(L.rms_norm(x), vocab, use_bias=False)


# ---------------------------------------------------------------------------------------------
# Mixture of experts


def moe_layer(L: Layers, x: Array, name: str, experts: int, hidden: int, k: int, dispatch: str) -> Array:
  """A top-``k`` routed mixture of GELU experts on tokens ``x`` (tokens, width).

  A softmax router picks each token's ``k`` experts and weighs them by their renormalised
  probabilities (Mixtral's routing). ``dispatch`` says how the experts run: ``'dense'`` (stacked
  expert weights, every expert on every token, the gates zero the others: Switch-style einsums),
  ``'ragged'`` (the token copies sorted by expert, one ``jax.lax.ragged_dot`` per expert
  layer: megablox-style) or ``'modules'`` (one pair of Dense layers per expert).
  """
  d = x.shape[-1]
  probs = jax.nn.softmax(L.dense(x, experts, use_bias=False, name=f'{name}_router'), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  top = top / jnp.sum(top, axis=-1, keepdims=True)
  gates = jnp.sum(jax.nn.one_hot(idx, experts) * top[..., None], axis=-2)  # (tokens, experts)
  if dispatch == 'modules':
    y = jnp.zeros_like(x)
    for e in range(experts):
      h = jax.nn.gelu(L.dense(x, hidden, name=f'{name}_expert{e}_in'))
      y = y + gates[:, e : e + 1] * L.dense(h, d, use_bias=False, name=f'{name}_expert{e}_out')
    return y
  w_in = L.param(f'{name}_w_in', (experts, d, hidden))
  b_in = L.param(f'{name}_b_in', (experts, hidden))
  w_out = L.param(f'{name}_w_out', (experts, hidden, d))
  if dispatch == 'dense':
    h = jax.nn.gelu(jnp.einsum('td,edf->tef', x, w_in) + b_in)
    return jnp.einsum('te,tef,efd->td', gates, h, w_out)
  flat = idx.reshape(-1)
  order = jnp.argsort(flat)
  rows = jnp.repeat(x, k, axis=0)[order]
  sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
  h = jax.nn.gelu(jax.lax.ragged_dot(rows, w_in, sizes) + b_in[flat[order]])
  out = jax.lax.ragged_dot(h, w_out, sizes)[jnp.argsort(order)].reshape(-1, k, d)
  return jnp.sum(out * top[..., None], axis=1)


def moe_encoder(L: Layers, x: Array, dispatch: str = 'dense', width: int = 16) -> Array:
  """Input Dense; two post-norm residual mixture-of-experts layers (4 experts of 12 units,
  top-2); Dense head."""
  x = L.dense(x, width)
  for i in range(2):
    x = L.layer_norm(x + moe_layer(L, x, f'moe{i}', experts=4, hidden=12, k=2, dispatch=dispatch))
  return L.dense(x, 10)


# ---------------------------------------------------------------------------------------------
# Lifted transforms


def alibi_bias(heads: int, length: int) -> Array:
  """ALiBi: head ``h`` adds ``-m_h · |i - j|`` to its scores, slopes ``m_h = 2^(-8h/H)``."""
  slopes = 2.0 ** (-8.0 * jnp.arange(1, heads + 1) / heads)
  pos = jnp.arange(length)
  return slopes[:, None, None] * -jnp.abs(pos[None, :, None] - pos[None, None, :])


def rotate_every_two(x: Array) -> Array:
  """GPT-J / RoFormer rotary pairs (x[2i], x[2i+1]), reassembled with jnp.stack."""
  return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def shared_bias_encoder(L: Layers, x: Array, hidden: int = 32, heads: int = 4, rotary: bool = False) -> Array:
  """Input projection; post-norm layers whose attention adds one ALiBi bias computed once for
  all layers (``rotary=False``) or rotates q and k GPT-J style (``rotary=True``); MLP; pool."""
  x = L.dense(x, hidden)
  b, t, _ = x.shape
  hd = hidden // heads
  bias = alibi_bias(heads, t)
  angles = jnp.arange(t)[:, None] * (1.0 / 10000 ** (jnp.arange(0, hd, 2) / hd))
  sin, cos = (jnp.repeat(f(angles), 2, axis=-1)[:, None, :] for f in (jnp.sin, jnp.cos))
  for _ in range(2):
    q, k, v = (L.dense(x, hidden).reshape(b, t, heads, hd) for _ in range(3))
    if rotary:
      q, k = (u * cos + rotate_every_two(u) * sin for u in (q, k))
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hd)
    s = s if rotary else s + bias
    a = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v).reshape(b, t, hidden)
    x = L.layer_norm(x + L.dense(a, hidden))
    x = L.layer_norm(x + gelu_mlp(L, x, 48))
  return L.dense(x.mean(axis=1), 10)


def scan_stack(width: int = 32, hidden: int = 24, depth: int = 3, classes: int = 10):
  """Input Dense, ``depth`` residual MLP blocks stacked by the framework's scan, Dense head."""

  def forward(L: Layers, x: Array) -> Array:
    x = L.scan(functools.partial(res_mlp_block, hidden), L.dense(x, width), depth)
    return L.dense(x, classes)

  return forward


def remat_stack(L: Layers, x: Array, width: int = 32, hidden: int = 24, depth: int = 3) -> Array:
  """Input Dense, ``depth`` separately parametrised rematerialised residual MLP blocks, head."""
  x = L.dense(x, width)
  for _ in range(depth):
    x = L.remat(functools.partial(res_mlp_block, hidden), x)
  return L.dense(x, 10)


# ---------------------------------------------------------------------------------------------
# Cases with their hand-derived counts


def case(
  framework: str,
  name: str,
  forward: arch.Forward,
  inputs: tuple,
  num_zigs: int,
  group_sizes: Sequence[int],
  batch_norm: bool = False,
) -> ZooCase:
  """``forward`` built in ``framework`` with random variables, as the case '<framework>/<name>'."""
  assert sum(group_sizes) == num_zigs, name
  built = arch.build(framework, forward, *inputs, seed=SEED)
  kwargs = {'train': False} if batch_norm and framework == 'linen' else {}
  return ZooCase(
    f'{framework}/{name}',
    built.apply_fn,
    built.variables,
    tuple(inputs),
    num_zigs,
    sorted(group_sizes),
    kwargs,
  )


# name -> (forward, inputs, num_zigs, group sizes, has BatchNorm), each with its derivation.
SPECS: dict[str, Callable[[], tuple]] = {
  # hidden 32 + 24 + 16 = 72; input (16) and classes (10) are not prunable.
  'mlp': lambda: (mlp(), (features(16),), 72, [16, 24, 32], False),
  # 13 conv groups: 8+8 + 16+16 + 3*32 + 3*64 + 3*64 = 16+32+96+192+192 = 528; hidden Dense 32.
  # 528 + 32 = 560. Five pools take 32x32 to 1x1, so the flatten keeps the 64 channels.
  'vgg16_bn': lambda: (
    vgg16_bn(),
    (images(32, 32),),
    560,
    [8, 8, 16, 16, 32, 32, 32] + [64] * 6 + [32],
    True,
  ),
  # Streams: stem+b1+b2 = 8; b3 (proj)+b4 = 16; b5 (proj) = 32 -> 56.
  # Inner conv of each block: 8+8+16+16+32 = 80. Total 56 + 80 = 136.
  'resnet_basic': lambda: (
    resnet(basic_block, ((8, 1), (8, 1), (16, 2), (16, 1), (32, 2))),
    (images(16, 16),),
    136,
    [8, 16, 32] + [8, 8, 16, 16, 32],
    True,
  ),
  # Stem 8 (feeds only b1's conv1 and b1's projection); stream 16 = b1 (proj) + b2; stream
  # 32 = b3 (proj) -> 8+16+32 = 56. Inner 1x1/3x3 pairs: (4+4)+(4+4)+(8+8) = 32. Total 88.
  'resnet_bottleneck': lambda: (
    resnet(bottleneck_block, ((4, 16, 1), (4, 16, 1), (8, 32, 2))),
    (images(16, 16),),
    88,
    [8, 16, 32] + [4, 4, 4, 4, 8, 8],
    True,
  ),
  # Stem 8 (its channels pass through every concat, the BNs that normalise them follow it);
  # per layer: 1x1 bottleneck 8 + 3x3 growth 4 = 12, times 3 = 36. Total 8 + 36 = 44.
  'densenet': lambda: (densenet, (images(8, 8),), 44, [8] + [8, 4] * 3, True),
  # Stream 8 = stem + b1's depthwise (same channels) + b1's project (residual).
  # b2: expand 32 (with its depthwise); stream 12 = b2 project + b3 project (residual).
  # b3: expand 48; b4: expand 48, project 16; head conv 32.
  # 8 + 32 + 12 + 48 + 48 + 16 + 32 = 196.
  'mobilenet_v2': lambda: (mobilenet_v2, (images(32, 32),), 196, [8, 32, 12, 48, 48, 16, 32], True),
  # Stream 24 = stem + both blocks' last 1x1. Per block, groups=4 makes the first 1x1's 16
  # channels 4 ZIGs (whole groups). Group g of the grouped conv's output is produced only from
  # its input group g (the kernel slab [..., 4g:4g+4] is all that consumes the one and
  # produces the other), so it is the same ZIG, not 4 more: 24 + 2 * 4 = 32.
  'resnext': lambda: (resnext, (images(8, 8),), 32, [4, 4, 24], True),
  # Stream 16 = stem + second conv + SE's up Dense (gating the same channels);
  # first conv 16; SE reduced units 4. 16 + 16 + 4 = 36.
  'se_net': lambda: (se_net, (images(8, 8),), 36, [16, 16, 4], True),
  # Each unit's first 1x1 (its depthwise follows it channel by channel) is 8, and so is the
  # stem's second half, which only unit 0's branch consumes. The shuffled stream: unit 0's
  # shuffle views [stem first half | its last 1x1] as (2 groups, 8), so channel i of the two
  # is one ZIG (8); unit 1's split cuts that stream into rows 0-3 and 4-7 of those 8, and its
  # shuffle puts its last 1x1's channels 2i and 2i+1 beside stream channel i of rows 0-3: the
  # 8 become two groups of 4. 8 + 8 + 8 + 4 + 4 = 32.
  'shufflenet_v2': lambda: (shufflenet_v2, (images(8, 8),), 32, [4, 4, 8, 8, 8], True),
  # conv 8 + conv 16 (flattened with a 4x4 extent into Dense rows) + Dense 32 = 56.
  'conv_flatten_dense': lambda: (conv_flatten_dense, (images(8, 8),), 56, [8, 16, 32], False),
  # Encoder 8+8, 16+16; bottleneck 32+32; decoder: up 16, convs 16+16; up 8, convs 8+8.
  # 16 + 32 + 64 + 48 + 24 = 184. The 3 output classes are not prunable.
  'unet': lambda: (unet, (images(16, 16),), 184, [8, 8, 16, 16, 32, 32, 16, 16, 16, 8, 8, 8], False),
  # Hidden 32 is LayerNorm-ed everywhere; per layer 4 heads + 64 MLP units; 2 * 68 = 136.
  # 8x16 image, 4x4 patches: 8 patches + class token.
  'vit': lambda: (vit(), (images(8, 16),), 136, [4, 64, 4, 64], False),
  # Post-norm keeps hidden 32 unprunable; per layer 4 heads (q/k/v columns of a head + the
  # output Dense's rows) + 64 MLP units; 2 * 68 = 136.
  'bert': lambda: (bert, (tokens(8, 50),), 136, [4, 64, 4, 64], False),
  # Per layer 4 heads of the built-in attention (query/key/value (…, head, :) slices + the out
  # kernel's head rows) + 48 MLP units; the residual stream is LayerNorm-ed. 2 * 52 = 104.
  'mha_encoder': lambda: (mha_encoder, (features(8, 16),), 104, [4, 48, 4, 48], False),
  # Per layer 2 KV heads (k, v of the head + q and o of its 2 query heads) + 64 SwiGLU units
  # (gate/up column pairs); the residual stream is RMSNorm-ed. 2 * 66 = 132.
  'llama': lambda: (llama, (tokens(8, 64),), 132, [2, 64, 2, 64], False),
  # Per layer 4 heads (q, k, v columns + o rows) + 48 MLP units; the bias is computed once from
  # constants, so it ties neither layer's heads to the other's. 2 * 52 = 104.
  'alibi_encoder': lambda: (shared_bias_encoder, (features(6, 16),), 104, [4, 48, 4, 48], False),
  # The same with GPT-J rotary q and k: the strided halves block head_dim, never the heads.
  'rotary_stack_encoder': lambda: (
    functools.partial(shared_bias_encoder, rotary=True),
    (features(6, 16),),
    104,
    [4, 48, 4, 48],
    False,
  ),
  # Mixture of experts (2 layers of 4 GELU experts with 12 units, top-2, hidden 16 LayerNorm-ed).
  # The router is kept whole in every build: the softmax normalises over all experts and top-k
  # ranks them, so dropping a router column would re-route tokens.
  # Stacked experts, every expert on every token: expert e (its w_in and b_in slabs; w_out[e]
  # only reads units that are then gelu(0) = 0) is one ZIG. Unit j would be cut from every
  # expert at once and shares those entries, so the outer axis, the experts, carries the
  # ZIGs. 2 * 4 = 8.
  'moe_dense': lambda: (functools.partial(moe_encoder, dispatch='dense'), (features(16),), 8, [4, 4], False),
  # Token copies sorted by expert and multiplied by ragged_dot: the group sizes pin the expert
  # axis, so unit j of all experts together (w_in[..., j], b_in[:, j]; w_out[:, j] reads it) is
  # a ZIG. 2 * 12 = 24.
  'moe_ragged': lambda: (
    functools.partial(moe_encoder, dispatch='ragged'),
    (features(16),),
    24,
    [12, 12],
    False,
  ),
  # One pair of Dense layers per expert: each expert's 12 units are its own ZIGs, and removing
  # all of them removes the expert but for one zero unit. 2 * 4 * 12 = 96.
  'moe_modules': lambda: (
    functools.partial(moe_encoder, dispatch='modules'),
    (features(16),),
    96,
    [12] * 8,
    False,
  ),
  # Stream 32 = input Dense + every scanned block's second Dense; hidden 24 is one group for
  # all 3 scanned layers. 32 + 24 = 56.
  'scan_stack': lambda: (scan_stack(), (features(16),), 56, [32, 24], False),
  # Stream 32 = input Dense + each block's second Dense; 3 separate hidden groups of 24.
  # 32 + 3 * 24 = 104.
  'remat_stack': lambda: (remat_stack, (features(16),), 104, [32, 24, 24, 24], False),
}


@functools.cache
def build_case(name: str) -> ZooCase:
  """The case 'linen/<model>' or 'nnx/<model>', built once per process (tests share it)."""
  framework, model = name.split('/')
  forward, inputs, num_zigs, sizes, batch_norm = SPECS[model]()
  return case(framework, model, forward, inputs, num_zigs, sizes, batch_norm)


CASES: dict[str, Callable[[], ZooCase]] = {
  f'{fw}/{m}': functools.partial(build_case, f'{fw}/{m}') for fw in arch.FRAMEWORKS for m in SPECS
}
