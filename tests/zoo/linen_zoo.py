"""Flax linen models whose zero-invariant groups are counted by hand.

Each entry of :data:`CASES` builds one small model with concrete, randomised variables and
states how many ZIGs ``oto_jax.zig_partition`` must find in it. The counts are derived from
the architecture alone (see the comment beside each), never from running the analysis, so a
disagreement points at either the analysis or the reasoning, and both deserve a look.

Counting rules, in short: a channel / hidden unit / attention head produced by a layer and
consumed by a contraction is one ZIG; a residual add or a shared consumer ties channels into
one node group; the model's input and output axes, anything normalised by LayerNorm/RMSNorm
and anything reduced over are never prunable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import ZooCase

Array = jax.Array
BATCH = 2

# ---------------------------------------------------------------------------------------------
# Helpers


def _leaf_name(path: Sequence[Any]) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def _random_variables(shapes: Any, key: Array) -> Any:
  """Fills every variable with fresh random values (fan-in scaled for kernels).

  Biases start at zero and norm scales / BN statistics at zero or one; left like that, a
  wrongly grouped bias or running mean could not change the output and the removability
  check would pass by accident. So nothing keeps its init value; kernels are scaled by
  their fan-in only to keep the deeper models' activations in a sane range.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  # One draw for all leaves: a draw per shape costs a compile each, which adds up on CPU.
  pool = np.asarray(jax.random.normal(key, (sum(leaf.size for _, leaf in flat),), jnp.float32))
  out, start = [], 0
  for path, leaf in flat:
    noise = pool[start : start + leaf.size].reshape(leaf.shape)
    start += leaf.size
    name = _leaf_name(path)
    if name == 'kernel':
      noise = noise / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
    # A variance must stay positive, and away from zero so BN does not blow a channel up.
    out.append(jnp.asarray(np.abs(noise) + 0.5 if name == 'var' else noise, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _features(*shape: int) -> Array:
  # numpy, not jax.random: every new input shape would cost another compile.
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.standard_normal((BATCH, *shape)), jnp.float32)


def _images(h: int, w: int, c: int = 3) -> Array:
  return _features(h, w, c)


def _tokens(length: int, vocab: int) -> Array:
  return jnp.asarray(np.random.default_rng(1).integers(0, vocab, (BATCH, length)), jnp.int32)


def _case(
  name: str,
  module: nn.Module,
  inputs: tuple,
  num_zigs: int,
  group_sizes: Sequence[int],
  **kwargs: Any,
) -> ZooCase:
  """Gives ``module`` random variables drawn from ``key(0)`` and wraps it up."""
  # Only the shapes come from ``init``: its truncated-normal initialisers take seconds per
  # distinct shape to compile on CPU.
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *inputs)
  variables = _random_variables(shapes, jax.random.key(0))
  return ZooCase(
    name=name,
    apply_fn=module.apply,
    variables=variables,
    args=tuple(inputs),
    num_zigs=num_zigs,
    group_sizes=sorted(group_sizes),
    kwargs=dict(kwargs),
  )


def _bn(train: bool) -> Callable[..., nn.BatchNorm]:
  return functools.partial(nn.BatchNorm, use_running_average=not train)


# ---------------------------------------------------------------------------------------------
# MLP and plain CNNs


class MLP(nn.Module):
  """Dense-relu layers and a Dense head."""

  widths: Sequence[int] = (32, 24, 16)
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.classes)(x)


# VGG16's 13 convs with widths divided by 8; 'M' is a 2x2 max pool.
VGG16_CFG = (8, 8, 'M', 16, 16, 'M', 32, 32, 32, 'M', 64, 64, 64, 'M', 64, 64, 64, 'M')


class VGG16BN(nn.Module):
  """VGG16 with BN for CIFAR shapes: conv-BN-relu stacks, max pools, two Dense layers."""

  cfg: Sequence[int | str] = VGG16_CFG
  hidden: int = 32
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for c in self.cfg:
      if c == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        # torchvision's VGG-BN keeps the conv bias, so the bias is a member next to BN's.
        x = nn.relu(_bn(train)()(nn.Conv(c, (3, 3))(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


class ConvFlattenDense(nn.Module):
  """Two convs, then a flatten that keeps a 4x4 spatial extent, then two Dense layers."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


# ---------------------------------------------------------------------------------------------
# Residual CNNs


class BasicBlock(nn.Module):
  """ResNet basic block; a 1x1 conv + BN projection when stride or width changes."""

  width: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    y = nn.Conv(self.width, (3, 3), strides=self.strides, use_bias=False)(x)
    y = nn.relu(bn()(y))
    y = bn()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    if self.strides != 1 or x.shape[-1] != self.width:
      x = bn()(nn.Conv(self.width, (1, 1), strides=self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """ResNet bottleneck block (stride on the 3x3) with a projection where the shape changes."""

  mid: int
  out: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    y = nn.relu(bn()(nn.Conv(self.mid, (1, 1), use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(self.mid, (3, 3), strides=self.strides, use_bias=False)(y)))
    y = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
    if self.strides != 1 or x.shape[-1] != self.out:
      x = bn()(nn.Conv(self.out, (1, 1), strides=self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem conv-BN-relu, a list of blocks, global average pool and a Dense head."""

  block: Callable[..., nn.Module]
  specs: Sequence[tuple[int, ...]]
  stem: int = 8
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.Conv(self.stem, (3, 3), use_bias=False)(x)
    x = nn.relu(_bn(train)()(x))
    for spec in self.specs:
      x = self.block(*spec)(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class DenseLayer(nn.Module):
  """DenseNet-B layer: BN-relu-1x1 conv, BN-relu-3x3 conv, output appended to the input."""

  growth: int
  bottleneck: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    y = nn.Conv(self.bottleneck, (1, 1), use_bias=False)(nn.relu(bn()(x)))
    y = nn.Conv(self.growth, (3, 3), use_bias=False)(nn.relu(bn()(y)))
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
  """A stem conv, one dense block of pre-activation layers, final BN-relu, pool, Dense."""

  stem: int = 8
  growth: int = 4
  bottleneck: int = 8
  layers: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.Conv(self.stem, (3, 3))(x)
    for _ in range(self.layers):
      x = DenseLayer(self.growth, self.bottleneck)(x, train)
    x = nn.relu(_bn(train)()(x))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class InvertedResidual(nn.Module):
  """MobileNetV2 block: expand 1x1, depthwise 3x3, linear project 1x1, residual if shapes match."""

  expand: int
  out: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    hidden = x.shape[-1] * self.expand
    y = x
    if self.expand != 1:
      y = nn.relu6(bn()(nn.Conv(hidden, (1, 1), use_bias=False)(y)))
    y = nn.Conv(hidden, (3, 3), strides=self.strides, feature_group_count=hidden, use_bias=False)(y)
    y = nn.relu6(bn()(y))
    y = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
    if self.strides == 1 and x.shape[-1] == self.out:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """Strided stem, inverted residual blocks (expand, out, stride), 1x1 head conv, pool, Dense."""

  blocks: Sequence[tuple[int, int, int]] = ((1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2))
  stem: int = 8
  head: int = 32
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    x = nn.relu6(bn()(nn.Conv(self.stem, (3, 3), strides=2, use_bias=False)(x)))
    for expand, out, strides in self.blocks:
      x = InvertedResidual(expand, out, strides)(x, train)
    x = nn.relu6(bn()(nn.Conv(self.head, (1, 1), use_bias=False)(x)))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class ResNeXtBlock(nn.Module):
  """1x1 conv, grouped 3x3 conv, 1x1 conv back to the input width, identity residual."""

  width: int = 16
  groups: int = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    y = nn.relu(bn()(nn.Conv(self.width, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.width, (3, 3), feature_group_count=self.groups, use_bias=False)(y)
    y = nn.relu(bn()(y))
    y = bn()(nn.Conv(x.shape[-1], (1, 1), use_bias=False)(y))
    return nn.relu(x + y)


class ResNeXt(nn.Module):
  """Stem conv-BN-relu, two ResNeXt blocks, pool, Dense."""

  stem: int = 24
  blocks: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.relu(_bn(train)()(nn.Conv(self.stem, (3, 3), use_bias=False)(x)))
    for _ in range(self.blocks):
      x = ResNeXtBlock()(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class SqueezeExcite(nn.Module):
  """Channel gating: spatial mean, Dense down, relu, Dense up, sigmoid, scale the input."""

  reduced: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = nn.relu(nn.Dense(self.reduced)(x.mean(axis=(1, 2))))
    s = nn.sigmoid(nn.Dense(x.shape[-1])(s))
    return x * s[:, None, None, :]


class SENet(nn.Module):
  """Stem, one residual block whose second BN output is gated by squeeze-excitation."""

  width: int = 16
  reduced: int = 4
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    x = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = bn()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    x = nn.relu(x + SqueezeExcite(self.reduced)(y))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def channel_shuffle(x: Array, groups: int) -> Array:
  b, h, w, c = x.shape
  x = x.reshape((b, h, w, groups, c // groups))
  return jnp.swapaxes(x, 3, 4).reshape((b, h, w, c))


class ShuffleUnit(nn.Module):
  """ShuffleNetV2 stride-1 unit: split, branch on one half, concat, shuffle (2 groups)."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = _bn(train)
    half = x.shape[-1] // 2
    x1, x2 = jnp.split(x, 2, axis=-1)
    y = nn.relu(bn()(nn.Conv(half, (1, 1), use_bias=False)(x2)))
    y = bn()(nn.Conv(half, (3, 3), feature_group_count=half, use_bias=False)(y))
    y = nn.relu(bn()(nn.Conv(half, (1, 1), use_bias=False)(y)))
    return channel_shuffle(jnp.concatenate([x1, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """Stem conv-BN-relu, two shuffle units, pool, Dense."""

  width: int = 16
  units: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.relu(_bn(train)()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    for _ in range(self.units):
      x = ShuffleUnit()(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class UNet(nn.Module):
  """Two encoder levels, a bottleneck, two decoder levels with transposed-conv upsampling."""

  widths: Sequence[int] = (8, 16, 32)
  classes: int = 3

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def double_conv(x: Array, c: int) -> Array:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      return nn.relu(nn.Conv(c, (3, 3))(x))

    skips = []
    for c in self.widths[:-1]:
      x = double_conv(x, c)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = double_conv(x, self.widths[-1])
    for c, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      x = nn.ConvTranspose(c, (2, 2), strides=(2, 2))(x)
      x = double_conv(jnp.concatenate([x, skip], axis=-1), c)
    return nn.Conv(self.classes, (1, 1))(x)


# ---------------------------------------------------------------------------------------------
# Transformers


def _attend(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Softmax attention over (batch, time, heads, head_dim) arrays."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
  w = jax.nn.softmax(s, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', w, v)


class GeluMLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))


class FusedSelfAttention(nn.Module):
  """ViT attention: one Dense(3*d) reshaped to (B, T, 3, heads, head_dim)."""

  heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    qkv = nn.Dense(3 * d)(x).reshape((b, t, 3, self.heads, d // self.heads))
    o = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(d)(o.reshape((b, t, d)))


class ViTLayer(nn.Module):
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x + FusedSelfAttention(self.heads)(nn.LayerNorm()(x))
    return x + GeluMLP(self.mlp)(nn.LayerNorm()(x))


class ViT(nn.Module):
  """Patch conv, class token, learned positions, pre-norm layers, head on the class token."""

  patch: int = 4
  hidden: int = 32
  heads: int = 4
  mlp: int = 64
  layers: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch
    x = nn.Conv(self.hidden, (p, p), strides=p, padding='VALID')(x)
    x = x.reshape((x.shape[0], -1, self.hidden))
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, self.hidden))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(1.0), (1, x.shape[1], self.hidden))
    for _ in range(self.layers):
      x = ViTLayer(self.heads, self.mlp)(x)
    return nn.Dense(self.classes)(nn.LayerNorm()(x)[:, 0])


class SplitSelfAttention(nn.Module):
  """BERT attention: separate q, k, v Dense layers, each reshaped to heads."""

  heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    shape = (b, t, self.heads, d // self.heads)
    q, k, v = (nn.Dense(d, name=n)(x).reshape(shape) for n in ('query', 'key', 'value'))
    return nn.Dense(d, name='out')(_attend(q, k, v).reshape((b, t, d)))


class BertLayer(nn.Module):
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.LayerNorm()(x + SplitSelfAttention(self.heads)(x))
    return nn.LayerNorm()(x + GeluMLP(self.mlp)(x))


class Bert(nn.Module):
  """Token + position embeddings, embedding LayerNorm, post-norm layers, a Dense vocab head."""

  vocab: int = 50
  max_len: int = 8
  hidden: int = 32
  heads: int = 4
  mlp: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    x = nn.Embed(self.vocab, self.hidden)(tokens)
    x = x + nn.Embed(self.max_len, self.hidden)(jnp.arange(tokens.shape[1]))[None]
    x = nn.LayerNorm()(x)
    for _ in range(self.layers):
      x = BertLayer(self.heads, self.mlp)(x)
    return nn.Dense(self.vocab)(x)


class MHAEncoder(nn.Module):
  """Input projection, pre-norm layers built on ``nn.MultiHeadDotProductAttention``."""

  hidden: int = 32
  heads: int = 4
  mlp: int = 48
  layers: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.hidden)(x)
    for _ in range(self.layers):
      attn = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.hidden, deterministic=True
      )
      x = x + attn(nn.LayerNorm()(x))
      x = x + GeluMLP(self.mlp)(nn.LayerNorm()(x))
    return nn.Dense(self.classes)(nn.LayerNorm()(x).mean(axis=1))


def rope(x: Array) -> Array:
  """Rotary position embedding on (B, T, heads, head_dim), rotating the two halves."""
  t, half = x.shape[1], x.shape[-1] // 2
  freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class GQAttention(nn.Module):
  """Causal grouped-query attention with RoPE; KV heads repeated up to the query heads."""

  heads: int = 4
  kv_heads: int = 2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    hd = d // self.heads
    q = nn.Dense(self.heads * hd, use_bias=False, name='q')(x).reshape((b, t, self.heads, hd))
    k = nn.Dense(self.kv_heads * hd, use_bias=False, name='k')(x).reshape((b, t, self.kv_heads, hd))
    v = nn.Dense(self.kv_heads * hd, use_bias=False, name='v')(x).reshape((b, t, self.kv_heads, hd))
    q, k = rope(q), rope(k)
    rep = self.heads // self.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    o = _attend(q, k, v, causal).reshape((b, t, d))
    return nn.Dense(d, use_bias=False, name='o')(o)


class SwiGLU(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate = nn.Dense(self.hidden, use_bias=False, name='gate')(x)
    up = nn.Dense(self.hidden, use_bias=False, name='up')(x)
    return nn.Dense(x.shape[-1], use_bias=False, name='down')(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  heads: int
  kv_heads: int
  mlp: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x + GQAttention(self.heads, self.kv_heads)(nn.RMSNorm()(x))
    return x + SwiGLU(self.mlp)(nn.RMSNorm()(x))


class Llama(nn.Module):
  """Embedding, Llama decoder blocks, final RMSNorm, Dense vocab head."""

  vocab: int = 64
  hidden: int = 32
  heads: int = 4
  kv_heads: int = 2
  mlp: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    x = nn.Embed(self.vocab, self.hidden)(tokens)
    for _ in range(self.layers):
      x = LlamaBlock(self.heads, self.kv_heads, self.mlp)(x)
    return nn.Dense(self.vocab, use_bias=False)(nn.RMSNorm()(x))


# ---------------------------------------------------------------------------------------------
# Lifted transforms


class ResMLPBlock(nn.Module):
  """x + Dense(relu(Dense(x))): no norm, so the residual stream stays prunable."""

  hidden: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.hidden)(x)))


class _ScanBody(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: Array, _: Any) -> tuple[Array, None]:
    return ResMLPBlock(self.hidden)(x), None


class ScanStack(nn.Module):
  """Input Dense, ``depth`` residual MLP blocks stacked by ``nn.scan``, Dense head."""

  width: int = 32
  hidden: int = 24
  depth: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.width)(x)
    stack = nn.scan(_ScanBody, variable_axes={'params': 0}, split_rngs={'params': True}, length=self.depth)
    x, _ = stack(self.hidden)(x, None)
    return nn.Dense(self.classes)(x)


class RematStack(nn.Module):
  """Input Dense, ``depth`` separately parametrised ``nn.remat`` residual MLP blocks, head."""

  width: int = 32
  hidden: int = 24
  depth: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.width)(x)
    block = nn.remat(ResMLPBlock)
    for _ in range(self.depth):
      x = block(self.hidden)(x)
    return nn.Dense(self.classes)(x)


# ---------------------------------------------------------------------------------------------
# Cases with their hand-derived counts


def mlp() -> ZooCase:
  # hidden 32 + 24 + 16 = 72; input (16) and classes (10) are not prunable.
  return _case('linen/mlp', MLP(), (_features(16),), 72, [16, 24, 32])


def vgg16_bn() -> ZooCase:
  # 13 conv groups: 8+8 + 16+16 + 3*32 + 3*64 + 3*64 = 16+32+96+192+192 = 528; hidden Dense 32.
  # 528 + 32 = 560. Five pools take 32x32 to 1x1, so the flatten keeps the 64 channels.
  sizes = [8, 8, 16, 16, 32, 32, 32] + [64] * 6 + [32]
  return _case('linen/vgg16_bn', VGG16BN(), (_images(32, 32),), 560, sizes, train=False)


def resnet_basic() -> ZooCase:
  # Streams: stem+b1+b2 = 8; b3 (proj)+b4 = 16; b5 (proj) = 32 -> 56.
  # Inner conv of each block: 8+8+16+16+32 = 80. Total 56 + 80 = 136.
  specs = ((8, 1), (8, 1), (16, 2), (16, 1), (32, 2))
  model = ResNet(BasicBlock, specs)
  sizes = [8, 16, 32] + [8, 8, 16, 16, 32]
  return _case('linen/resnet_basic', model, (_images(16, 16),), 136, sizes, train=False)


def resnet_bottleneck() -> ZooCase:
  # Stem 8 (feeds only b1's conv1 and b1's projection); stream 16 = b1 (proj) + b2; stream
  # 32 = b3 (proj) -> 8+16+32 = 56. Inner 1x1/3x3 pairs: (4+4)+(4+4)+(8+8) = 32. Total 88.
  specs = ((4, 16, 1), (4, 16, 1), (8, 32, 2))
  model = ResNet(BottleneckBlock, specs)
  sizes = [8, 16, 32] + [4, 4, 4, 4, 8, 8]
  return _case('linen/resnet_bottleneck', model, (_images(16, 16),), 88, sizes, train=False)


def densenet() -> ZooCase:
  # Stem 8 (its channels pass through every concat, the BNs that normalise them follow it);
  # per layer: 1x1 bottleneck 8 + 3x3 growth 4 = 12, times 3 = 36. Total 8 + 36 = 44.
  sizes = [8] + [8, 4] * 3
  return _case('linen/densenet', DenseNet(), (_images(8, 8),), 44, sizes, train=False)


def mobilenet_v2() -> ZooCase:
  # Stream 8 = stem + b1's depthwise (same channels) + b1's project (residual).
  # b2: expand 32 (with its depthwise); stream 12 = b2 project + b3 project (residual).
  # b3: expand 48; b4: expand 48, project 16; head conv 32.
  # 8 + 32 + 12 + 48 + 48 + 16 + 32 = 196.
  sizes = [8, 32, 12, 48, 48, 16, 32]
  return _case('linen/mobilenet_v2', MobileNetV2(), (_images(32, 32),), 196, sizes, train=False)


def resnext() -> ZooCase:
  # Stream 24 = stem + both blocks' last 1x1. Per block, feature_group_count=4 makes the first
  # 1x1's 16 channels 4 ZIGs (whole groups). Group g of the grouped conv's output is produced
  # only from its input group g, so it is the same ZIG, not 4 more: 24 + 2 * 4 = 32.
  sizes = [4, 4, 24]
  return _case('linen/resnext', ResNeXt(), (_images(8, 8),), 32, sizes, train=False)


def se_net() -> ZooCase:
  # Stream 16 = stem + second conv + SE's up Dense (gating the same channels);
  # first conv 16; SE reduced units 4. 16 + 16 + 4 = 36.
  return _case('linen/se_net', SENet(), (_images(8, 8),), 36, [16, 16, 4], train=False)


def shufflenet_v2() -> ZooCase:
  # Everything that reaches a channel shuffle (the stem's first half, each unit's last 1x1) is
  # unprunable; each unit's first 1x1 (its depthwise follows it channel by channel) counts, and
  # so does the stem's second half, which only unit 0's branch consumes: 8 + 8 + 8 = 24.
  return _case('linen/shufflenet_v2', ShuffleNetV2(), (_images(8, 8),), 24, [8, 8, 8], train=False)


def conv_flatten_dense() -> ZooCase:
  # conv 8 + conv 16 (flattened with a 4x4 extent into Dense rows) + Dense 32 = 56.
  return _case('linen/conv_flatten_dense', ConvFlattenDense(), (_images(8, 8),), 56, [8, 16, 32])


def unet() -> ZooCase:
  # Encoder 8+8, 16+16; bottleneck 32+32; decoder: up 16, convs 16+16; up 8, convs 8+8.
  # 16 + 32 + 64 + 48 + 24 = 184. The 3 output classes are not prunable.
  sizes = [8, 8, 16, 16, 32, 32, 16, 16, 16, 8, 8, 8]
  return _case('linen/unet', UNet(), (_images(16, 16),), 184, sizes)


def vit() -> ZooCase:
  # Hidden 32 is LayerNorm-ed everywhere; per layer 4 heads + 64 MLP units; 2 * 68 = 136.
  # 8x16 image, 4x4 patches: 8 patches + class token.
  return _case('linen/vit', ViT(), (_images(8, 16),), 136, [4, 64, 4, 64])


def bert() -> ZooCase:
  # Post-norm keeps hidden 32 unprunable; per layer 4 heads + 64 MLP units; 2 * 68 = 136.
  return _case('linen/bert', Bert(), (_tokens(8, 50),), 136, [4, 64, 4, 64])


def mha_encoder() -> ZooCase:
  # Per layer 4 heads of nn.MultiHeadDotProductAttention + 48 MLP units; 2 * 52 = 104.
  return _case('linen/mha_encoder', MHAEncoder(), (_features(8, 16),), 104, [4, 48, 4, 48])


def llama() -> ZooCase:
  # Per layer 2 KV heads (each with its 2 query heads) + 64 SwiGLU units; 2 * 66 = 132.
  return _case('linen/llama', Llama(), (_tokens(8, 64),), 132, [2, 64, 2, 64])


def scan_stack() -> ZooCase:
  # Stream 32 = input Dense + every scanned block's second Dense; hidden 24 is one group for
  # all 3 scanned layers. 32 + 24 = 56.
  return _case('linen/scan_stack', ScanStack(), (_features(16),), 56, [32, 24])


def remat_stack() -> ZooCase:
  # Stream 32 = input Dense + each block's second Dense; 3 separate hidden groups of 24.
  # 32 + 3 * 24 = 104.
  return _case('linen/remat_stack', RematStack(), (_features(16),), 104, [32, 24, 24, 24])


CASES: dict[str, Callable[[], ZooCase]] = {
  'linen/mlp': mlp,
  'linen/vgg16_bn': vgg16_bn,
  'linen/resnet_basic': resnet_basic,
  'linen/resnet_bottleneck': resnet_bottleneck,
  'linen/densenet': densenet,
  'linen/mobilenet_v2': mobilenet_v2,
  'linen/resnext': resnext,
  'linen/se_net': se_net,
  'linen/shufflenet_v2': shufflenet_v2,
  'linen/conv_flatten_dense': conv_flatten_dense,
  'linen/unet': unet,
  'linen/vit': vit,
  'linen/bert': bert,
  'linen/mha_encoder': mha_encoder,
  'linen/llama': llama,
  'linen/scan_stack': scan_stack,
  'linen/remat_stack': remat_stack,
}
