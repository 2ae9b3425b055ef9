"""A zoo of small Flax NNX models, each with its ZIG count derived by hand.

Every builder constructs its module from ``nnx.Rngs(0)``, puts it in eval mode (BatchNorm uses
its running averages), splits it into ``graphdef, state`` and hands the analysis the raw
``nnx.State``. All arrays of the state are then replaced by random values: a wrong grouping
must not be able to hide behind zero biases, unit scales or zero running means.

Counting rules: one ZIG per channel / hidden unit / attention (KV) head that a contraction
consumes; channels coupled by a residual add are one node group; LayerNorm- and
RMSNorm-normalised axes, the model's input and output axes, and streams that pass a channel
shuffle are not prunable; a depthwise conv's channel is its input's ZIG, and a grouped conv
(G > 1 groups) gives one ZIG per group, spanning that group's inputs and outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oto_jax.partition import path_of

from .common import ZooCase

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Helpers


def _randomize(state: nnx.State, seed: int = 1) -> nnx.State:
  """Every float leaf of ``state`` redrawn from a normal; BatchNorm variances kept positive.

  Kernels are scaled by ``1/sqrt(fan_in)`` so that the deep models (VGG's 13 convs, the
  transformers' softmaxes) stay in a numerically useful range instead of saturating. The
  draws use numpy: eager ``jax.random`` would compile once per distinct shape.
  """
  rng = np.random.default_rng(seed)

  def draw(path: tuple, leaf: Any) -> Any:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    name = path_of(path)[-1]
    noise = rng.standard_normal(leaf.shape)
    if name == 'var':
      noise = np.abs(noise) + 0.5
    elif name == 'kernel' and len(leaf.shape) >= 2:
      noise = noise / math.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, state)


def _case(
  name: str, make: Callable[[nnx.Rngs], nnx.Module], args: tuple, num_zigs: int, group_sizes: list[int]
) -> ZooCase:
  """Builds ``make(nnx.Rngs(0))``, splits it and wraps it with its raw ``nnx.State`` as variables.

  The module is built under ``nnx.eval_shape``: its initial values are overwritten by
  :func:`_randomize` anyway, and eager initialisers would compile once per parameter shape.
  """
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  model.eval()  # BatchNorm reads its running averages
  graphdef, state = nnx.split(model)
  state = _randomize(state)

  def apply_fn(state: nnx.State, *xs: Any) -> Any:
    return nnx.merge(graphdef, state)(*xs)

  assert sum(group_sizes) == num_zigs, name
  return ZooCase(name, apply_fn, state, args, num_zigs, sorted(group_sizes))


def _normal(*shape: int) -> Array:
  return jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)


def _images(h: int, w: int, c: int) -> Array:
  return _normal(2, h, w, c)


def _tokens(seq: int, vocab: int) -> Array:
  return jnp.asarray(np.random.default_rng(3).integers(0, vocab, (2, seq)), jnp.int32)


def _max_pool(x: Array) -> Array:
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _avg_pool(x: Array) -> Array:
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


def _global_pool(x: Array) -> Array:
  return jnp.mean(x, axis=(1, 2))


class ConvBN(nnx.Module):
  """conv → BN (eval) → optional activation; the conv has no bias, as in ResNets."""

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[Array], Array] | None = nnx.relu,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      cin, cout, (kernel, kernel), strides=stride, feature_group_count=groups, use_bias=False, rngs=rngs
    )
    self.bn = nnx.BatchNorm(cout, rngs=rngs)
    self.act = act

  def __call__(self, x: Array) -> Array:
    y = self.bn(self.conv(x))
    return y if self.act is None else self.act(y)


# ---------------------------------------------------------------------------------------------
# MLP


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in ((16, 32), (32, 24), (24, 16))])
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


def mlp() -> ZooCase:
  # hidden widths 32 + 24 + 16 = 72; input (16) and classes (10) are not prunable.
  return _case('nnx/mlp', MLP, (_normal(2, 16),), 72, [16, 24, 32])


# ---------------------------------------------------------------------------------------------
# VGG16-BN (CIFAR), widths / 8

_VGG16 = (8, 8, 'M', 16, 16, 'M', 32, 32, 32, 'M', 64, 64, 64, 'M', 64, 64, 64, 'M')


class VGG16BN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    convs, bns, cin = [], [], 3
    for v in _VGG16:
      if v == 'M':
        continue
      # VGG's convs keep their bias even before BN (torchvision does the same).
      convs.append(nnx.Conv(cin, v, (3, 3), rngs=rngs))
      bns.append(nnx.BatchNorm(v, rngs=rngs))
      cin = v
    self.convs, self.bns = nnx.List(convs), nnx.List(bns)
    self.fc1 = nnx.Linear(64, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    i = 0
    for v in _VGG16:
      if v == 'M':
        x = _max_pool(x)
      else:
        x = nnx.relu(self.bns[i](self.convs[i](x)))
        i += 1
    x = x.reshape(x.shape[0], -1)  # 32 / 2**5 = 1: flatten of (1, 1, 64)
    return self.fc2(nnx.relu(self.fc1(x)))


def vgg16_bn() -> ZooCase:
  # 13 convs: 8+8 + 16+16 + 3*32 + 3*64 + 3*64 = 528, plus the 64 hidden units of fc1 = 592.
  sizes = [8, 8, 16, 16, 32, 32, 32] + [64] * 6 + [64]
  return _case('nnx/vgg16_bn', VGG16BN, (_images(32, 32, 3),), 592, sizes)


# ---------------------------------------------------------------------------------------------
# ResNet: basic and bottleneck blocks, projection shortcuts


class BasicBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.c1 = ConvBN(cin, cout, 3, stride=stride, rngs=rngs)
    self.c2 = ConvBN(cout, cout, 3, act=None, rngs=rngs)
    reshape = stride != 1 or cin != cout
    self.proj = ConvBN(cin, cout, 1, stride=stride, act=None, rngs=rngs) if reshape else None

  def __call__(self, x: Array) -> Array:
    short = x if self.proj is None else self.proj(x)
    return nnx.relu(self.c2(self.c1(x)) + short)


class Bottleneck(nnx.Module):
  def __init__(self, cin: int, mid: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.c1 = ConvBN(cin, mid, 1, rngs=rngs)
    self.c2 = ConvBN(mid, mid, 3, stride=stride, rngs=rngs)
    self.c3 = ConvBN(mid, cout, 1, act=None, rngs=rngs)
    reshape = stride != 1 or cin != cout
    self.proj = ConvBN(cin, cout, 1, stride=stride, act=None, rngs=rngs) if reshape else None

  def __call__(self, x: Array) -> Array:
    short = x if self.proj is None else self.proj(x)
    return nnx.relu(self.c3(self.c2(self.c1(x))) + short)


class ResNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = ConvBN(3, 8, 3, rngs=rngs)
    self.blocks = nnx.List(
      [
        BasicBlock(8, 8, 1, rngs),  # identity shortcut
        BasicBlock(8, 16, 2, rngs),  # projection
        Bottleneck(16, 8, 32, 2, rngs),  # projection
        Bottleneck(32, 8, 32, 1, rngs),  # identity shortcut
      ]
    )
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.stem(x)
    for b in self.blocks:
      x = b(x)
    return self.head(_global_pool(x))


def resnet() -> ZooCase:
  # streams: A = stem + block0.c2 (8); B = block1.c2 + block1.proj (16);
  #   C = block2.c3 + block2.proj + block3.c3 (32).
  # block-internal: block0.c1 8, block1.c1 16, block2.c1 8 + c2 8, block3.c1 8 + c2 8.
  # 8 + 16 + 32 + 8 + 16 + 16 + 16 = 112.
  sizes = [8, 16, 32, 8, 16, 8, 8, 8, 8]
  return _case('nnx/resnet', ResNet, (_images(16, 16, 3),), 112, sizes)


# ---------------------------------------------------------------------------------------------
# DenseNet-style block


class DenseNet(nnx.Module):
  """A stem, a 3-layer dense block (growth 4), a transition and a linear head.

  The dense layers are conv-BN-relu (post-activation) so that each concatenated feature map
  is owned by exactly one producer; a BN over the concatenation would make every consumer's
  BN a co-producer of the stem's channels.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.stem = ConvBN(3, 8, 3, rngs=rngs)
    self.layers = nnx.List([ConvBN(8 + 4 * i, 4, 3, rngs=rngs) for i in range(3)])
    self.trans = ConvBN(20, 8, 1, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.stem(x)
    for layer in self.layers:
      x = jnp.concatenate([x, layer(x)], axis=-1)
    x = _avg_pool(self.trans(x))
    return self.head(_global_pool(x))


def densenet() -> ZooCase:
  # stem 8, three growth maps 4 + 4 + 4 (each its own group), transition 8 = 28.
  return _case('nnx/densenet', DenseNet, (_images(16, 16, 3),), 28, [8, 4, 4, 4, 8])


# ---------------------------------------------------------------------------------------------
# MobileNetV2


class InvertedResidual(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, expand: int, rngs: nnx.Rngs):
    hidden = cin * expand
    self.expand = ConvBN(cin, hidden, 1, act=nnx.relu6, rngs=rngs)
    self.dw = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden, act=nnx.relu6, rngs=rngs)
    self.project = ConvBN(hidden, cout, 1, act=None, rngs=rngs)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x: Array) -> Array:
    y = self.project(self.dw(self.expand(x)))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = ConvBN(3, 8, 3, act=nnx.relu6, rngs=rngs)
    self.blocks = nnx.List(
      [
        InvertedResidual(8, 8, 1, 4, rngs),  # residual
        InvertedResidual(8, 16, 2, 4, rngs),  # no residual
        InvertedResidual(16, 16, 1, 4, rngs),  # residual
      ]
    )
    self.last = ConvBN(16, 32, 1, act=nnx.relu6, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.stem(x)
    for b in self.blocks:
      x = b(x)
    return self.head(_global_pool(self.last(x)))


def mobilenet_v2() -> ZooCase:
  # stream stem + block0.project (8); block1.project + block2.project (16);
  # expanded (expand 1x1 + depthwise carry the same channels): 32, 32, 64; last 1x1 32.
  # 8 + 16 + 32 + 32 + 64 + 32 = 184.
  return _case('nnx/mobilenet_v2', MobileNetV2, (_images(16, 16, 3),), 184, [8, 16, 32, 32, 64, 32])


# ---------------------------------------------------------------------------------------------
# ResNeXt block


class ResNeXt(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.stem = ConvBN(3, 16, 3, rngs=rngs)
    self.reduce = ConvBN(16, 16, 1, rngs=rngs)
    self.grouped = ConvBN(16, 16, 3, groups=4, rngs=rngs)
    self.expand = ConvBN(16, 16, 1, act=None, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.stem(x)
    x = nnx.relu(x + self.expand(self.grouped(self.reduce(x))))
    return self.head(_global_pool(x))


def resnext() -> ZooCase:
  # stream stem + expand: 16. feature_group_count=4: reduce's 16 channels go as 4 whole groups,
  # and so do the grouped conv's 16 outputs. Group g's inputs and outputs are one ZIG, not two:
  # the kernel slab [..., 4g:4g+4] is all that consumes input group g and all that produces
  # output group g, so neither side can be removed without the other (the depthwise rule,
  # G = C, generalised). 16 + 4 = 20.
  return _case('nnx/resnext', ResNeXt, (_images(8, 8, 3),), 20, [16, 4])


# ---------------------------------------------------------------------------------------------
# Squeeze-and-excitation


class SENet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.c1 = ConvBN(3, 16, 3, rngs=rngs)
    self.c2 = ConvBN(16, 16, 3, rngs=rngs)
    self.se_reduce = nnx.Linear(16, 4, rngs=rngs)
    self.se_expand = nnx.Linear(4, 16, rngs=rngs)
    self.c3 = ConvBN(16, 32, 1, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    f = self.c2(self.c1(x))
    s = nnx.sigmoid(self.se_expand(nnx.relu(self.se_reduce(_global_pool(f)))))
    x = self.c3(f * s[:, None, None, :])
    return self.head(_global_pool(x))


def se_net() -> ZooCase:
  # c1 16; c2 16 (se_expand's outputs join it); SE hidden 4; c3 32. 16 + 16 + 4 + 32 = 68.
  return _case('nnx/se', SENet, (_images(8, 8, 3),), 68, [16, 16, 4, 32])


# ---------------------------------------------------------------------------------------------
# conv -> flatten -> Linear


class ConvFlatten(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = _max_pool(nnx.relu(self.conv(x)))
    x = x.reshape(x.shape[0], -1)  # channels become the fastest factor of fc1's input
    return self.fc2(nnx.relu(self.fc1(x)))


def conv_flatten() -> ZooCase:
  # conv channels 8 (fc1 rows c, c+8, … are their dependents) + fc1 hidden 16 = 24.
  return _case('nnx/conv_flatten', ConvFlatten, (_images(8, 8, 3),), 24, [8, 16])


# ---------------------------------------------------------------------------------------------
# BERT-style encoder

_D, _HEADS, _SEQ, _VOCAB = 32, 4, 8, 50


def _attend(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Scaled dot-product attention on ``(batch, seq, heads, head_dim)``."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v)


class BertLayer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q = nnx.Linear(_D, _D, rngs=rngs)
    self.k = nnx.Linear(_D, _D, rngs=rngs)
    self.v = nnx.Linear(_D, _D, rngs=rngs)
    self.o = nnx.Linear(_D, _D, rngs=rngs)
    self.ln1 = nnx.LayerNorm(_D, rngs=rngs)
    self.up = nnx.Linear(_D, 64, rngs=rngs)
    self.down = nnx.Linear(64, _D, rngs=rngs)
    self.ln2 = nnx.LayerNorm(_D, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, _HEADS, _D // _HEADS)
    a = _attend(heads(self.q(x)), heads(self.k(x)), heads(self.v(x))).reshape(b, s, _D)
    x = self.ln1(x + self.o(a))  # post-LN, as in BERT
    return self.ln2(x + self.down(nnx.gelu(self.up(x))))


class Bert(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.tok = nnx.Embed(_VOCAB, _D, rngs=rngs)
    self.pos = nnx.Embed(_SEQ, _D, rngs=rngs)
    self.ln = nnx.LayerNorm(_D, rngs=rngs)
    self.layers = nnx.List([BertLayer(rngs) for _ in range(2)])
    self.mlm = nnx.Linear(_D, _VOCAB, rngs=rngs)

  def __call__(self, tokens: Array) -> Array:
    x = self.ln(self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1])))
    for layer in self.layers:
      x = layer(x)
    return self.mlm(x)


def bert() -> ZooCase:
  # per layer: 4 heads (q/k/v columns of a head + o's rows) + 64 MLP units; the hidden size 32
  # is LayerNorm-ed and the vocab is the output. 2 * (4 + 64) = 136.
  return _case('nnx/bert', Bert, (_tokens(_SEQ, _VOCAB),), 136, [4, 4, 64, 64])


# ---------------------------------------------------------------------------------------------
# Encoder built on nnx.MultiHeadAttention (pre-LN)


class MHAEncoderLayer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(_D, rngs=rngs)
    # keep_rngs=False: no dropout, so no RNG state in the analysed variables.
    self.attn = nnx.MultiHeadAttention(
      _HEADS, _D, decode=False, deterministic=True, keep_rngs=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(_D, rngs=rngs)
    self.up = nnx.Linear(_D, 48, rngs=rngs)
    self.down = nnx.Linear(48, _D, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class MHAEncoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(16, _D, rngs=rngs)
    self.layers = nnx.List([MHAEncoderLayer(rngs) for _ in range(2)])
    self.ln = nnx.LayerNorm(_D, rngs=rngs)
    self.head = nnx.Linear(_D, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.embed(x)
    for layer in self.layers:
      x = layer(x)
    return self.head(jnp.mean(self.ln(x), axis=1))


def mha_encoder() -> ZooCase:
  # per layer: 4 heads (query/key/value (…, head, :) slices + out kernel's head rows) + 48
  # MLP units; the residual stream is LayerNorm-ed. 2 * (4 + 48) = 104.
  x = _normal(2, _SEQ, 16)
  return _case('nnx/mha_encoder', MHAEncoder, (x,), 104, [4, 4, 48, 48])


# ---------------------------------------------------------------------------------------------
# Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention

_KV_HEADS, _HEAD_DIM, _FFN = 2, 8, 48


def _rope(x: Array) -> Array:
  """Rotary embedding on ``(batch, seq, heads, head_dim)``, rotating split halves."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half) / half))
  angle = jnp.arange(x.shape[1])[:, None] * freq[None, :]
  cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class LlamaLayer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(_D, rngs=rngs)
    self.q = lin(_D, _HEADS * _HEAD_DIM)
    self.k = lin(_D, _KV_HEADS * _HEAD_DIM)
    self.v = lin(_D, _KV_HEADS * _HEAD_DIM)
    self.o = lin(_HEADS * _HEAD_DIM, _D)
    self.mlp_norm = nnx.RMSNorm(_D, rngs=rngs)
    self.gate = lin(_D, _FFN)
    self.up = lin(_D, _FFN)
    self.down = lin(_FFN, _D)

  def __call__(self, x: Array) -> Array:
    b, s, _ = x.shape
    h = self.attn_norm(x)
    q = _rope(self.q(h).reshape(b, s, _HEADS, _HEAD_DIM))
    k = _rope(self.k(h).reshape(b, s, _KV_HEADS, _HEAD_DIM))
    v = self.v(h).reshape(b, s, _KV_HEADS, _HEAD_DIM)
    rep = _HEADS // _KV_HEADS
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    causal = jnp.tril(jnp.ones((s, s), bool))
    x = x + self.o(_attend(q, k, v, causal).reshape(b, s, _HEADS * _HEAD_DIM))
    h = self.mlp_norm(x)
    return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class Llama(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(_VOCAB, _D, rngs=rngs)
    self.layers = nnx.List([LlamaLayer(rngs) for _ in range(2)])
    self.norm = nnx.RMSNorm(_D, rngs=rngs)
    self.lm_head = nnx.Linear(_D, _VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens: Array) -> Array:
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


def llama() -> ZooCase:
  # per layer: 2 KV heads (k, v of the head + q and o of its 2 query heads) + 48 SwiGLU units
  # (gate/up column pairs); the residual stream is RMSNorm-ed. 2 * (2 + 48) = 100.
  return _case('nnx/llama', Llama, (_tokens(_SEQ, _VOCAB),), 100, [2, 2, 48, 48])


# ---------------------------------------------------------------------------------------------
# UNet with transposed convs and skip concatenation


class UNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    conv = lambda a, b, k=3: nnx.Conv(a, b, (k, k), rngs=rngs)
    up = lambda a, b: nnx.ConvTranspose(a, b, (2, 2), strides=(2, 2), rngs=rngs)
    self.enc1 = nnx.List([conv(3, 8), conv(8, 8)])
    self.enc2 = nnx.List([conv(8, 16), conv(16, 16)])
    self.mid = conv(16, 32)
    self.up2 = up(32, 16)
    self.dec2 = conv(32, 16)
    self.up1 = up(16, 8)
    self.dec1 = conv(16, 8)
    self.out = conv(8, 2, 1)

  def __call__(self, x: Array) -> Array:
    e1 = nnx.relu(self.enc1[1](nnx.relu(self.enc1[0](x))))
    e2 = nnx.relu(self.enc2[1](nnx.relu(self.enc2[0](_max_pool(e1)))))
    m = nnx.relu(self.mid(_max_pool(e2)))
    d2 = nnx.relu(self.dec2(jnp.concatenate([self.up2(m), e2], axis=-1)))
    d1 = nnx.relu(self.dec1(jnp.concatenate([self.up1(d2), e1], axis=-1)))
    return self.out(d1)


def unet() -> ZooCase:
  # enc1 8 + 8, enc2 16 + 16, mid 32, up2 16, dec2 16, up1 8, dec1 8 = 128; out (2) is the output.
  sizes = [8, 8, 16, 16, 32, 16, 16, 8, 8]
  return _case('nnx/unet', UNet, (_images(16, 16, 3),), 128, sizes)


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2 units


def _channel_shuffle(x: Array, groups: int = 2) -> Array:
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, groups, c // groups)
  return x.transpose(0, 1, 2, 4, 3).reshape(b, h, w, c)


class ShuffleUnit(nnx.Module):
  """The stride-1 ShuffleNetV2 unit: half the channels bypass, half go through the branch."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    half = channels // 2
    self.pw1 = ConvBN(half, half, 1, rngs=rngs)
    self.dw = ConvBN(half, half, 3, groups=half, act=None, rngs=rngs)
    self.pw2 = ConvBN(half, half, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    keep, branch = jnp.split(x, 2, axis=-1)
    return _channel_shuffle(jnp.concatenate([keep, self.pw2(self.dw(self.pw1(branch)))], axis=-1))


class ShuffleNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.units = nnx.List([ShuffleUnit(16, rngs) for _ in range(2)])
    self.last = ConvBN(16, 32, 1, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    for u in self.units:
      x = u(x)
    return self.head(_global_pool(self.last(x)))


def shufflenet() -> ZooCase:
  # The input (16 channels, no stem, so no half-prunable stem to argue about) and every
  # shuffled stream are not prunable; per unit pw1 + dw carry 8 ZIGs; the final 1x1 gives 32.
  # 8 + 8 + 32 = 48.
  return _case('nnx/shufflenet_v2', ShuffleNet, (_images(8, 8, 16),), 48, [8, 8, 32])


# ---------------------------------------------------------------------------------------------
# nnx.scan over a stack of residual MLP blocks (parameters stacked on a leading axis)

_LAYERS = 3


class ResMLPBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(32, 48, rngs=rngs)
    self.down = nnx.Linear(48, 32, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return x + self.down(nnx.relu(self.up(x)))


class ScanMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(16, 32, rngs=rngs)

    @nnx.split_rngs(splits=_LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> ResMLPBlock:
      return ResMLPBlock(r)

    self.blocks = make(rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h: Array, block: ResMLPBlock) -> Array:
      return block(h)

    return self.head(step(nnx.relu(self.embed(x)), self.blocks))


def scan_mlp() -> ZooCase:
  # residual stream (embed columns + every layer's down columns) 32; the up units, one ZIG
  # for all 3 stacked layers, 48. 32 + 48 = 80.
  x = _normal(2, 16)
  return _case('nnx/scan_mlp', ScanMLP, (x,), 80, [32, 48])


# ---------------------------------------------------------------------------------------------
# nnx.remat-wrapped block


class RematBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(24, 40, rngs=rngs)
    self.l2 = nnx.Linear(40, 20, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return nnx.relu(self.l2(nnx.relu(self.l1(x))))


class RematMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(16, 24, rngs=rngs)
    self.block = RematBlock(rngs)
    self.head = nnx.Linear(20, 10, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    run = nnx.remat(lambda block, h: block(h))
    return self.head(run(self.block, nnx.relu(self.embed(x))))


def remat_mlp() -> ZooCase:
  # embed 24, block l1 40, block l2 20: remat changes nothing. 24 + 40 + 20 = 84.
  x = _normal(2, 16)
  return _case('nnx/remat_mlp', RematMLP, (x,), 84, [24, 40, 20])


CASES: dict[str, Callable[[], ZooCase]] = {
  'nnx/mlp': mlp,
  'nnx/vgg16_bn': vgg16_bn,
  'nnx/resnet': resnet,
  'nnx/densenet': densenet,
  'nnx/mobilenet_v2': mobilenet_v2,
  'nnx/resnext': resnext,
  'nnx/se': se_net,
  'nnx/conv_flatten': conv_flatten,
  'nnx/bert': bert,
  'nnx/mha_encoder': mha_encoder,
  'nnx/llama': llama,
  'nnx/unet': unet,
  'nnx/shufflenet_v2': shufflenet,
  'nnx/scan_mlp': scan_mlp,
  'nnx/remat_mlp': remat_mlp,
}
