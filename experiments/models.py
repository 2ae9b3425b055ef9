"""Reference models in Flax linen, for benchmarks and experiments.

The small models of the embedded-data runs, one definition each (``experiments.train``,
``demo`` and ``frontier`` share them):

* :class:`DigitsCNN` (8x8 digits), :class:`Conv1DNet` (MNIST-1D), :class:`SequenceEncoder`
  (MNIST-1D read as a sequence by a small transformer encoder).

Five large families, each with configurable sizes and defaults that match the published model:

* :class:`VGG` (defaults: VGG16-BN for CIFAR-10).
* :class:`ResNet` (defaults: ResNet-50 for 224x224 ImageNet), with bottleneck or basic
  blocks and an optional CIFAR stem; :class:`ResNet50` and :class:`ResNet18` fix the depth.
* :class:`BertEncoder` (defaults: BERT-base).
* :class:`LlamaDecoder` (defaults: Llama-7B), optionally with grouped-query attention and with
  its layers stacked by ``nn.scan``.
* :class:`ViT` (defaults: ViT-B/16 for 224x224 ImageNet).

Every module takes ``dtype`` (the computation dtype) and ``param_dtype`` (the stored
parameters' dtype), both float32 by default. The models are written plainly, one Flax layer
per weight, so that the ZIG analysis sees the same structure a reader does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.configs import Config

Dtype = Any
Array = jax.Array

# ---------------------------------------------------------------------------------------------
# The small models.


class DigitsCNN(nn.Module):
  """A VGG-style CNN for 8x8 digits: per stage, 3x3 convs (BN, ReLU) then a 2x2 max pool; a
  hidden dense layer. The defaults (conv 32-32, pool, conv 64-64, pool, dense 128) are the
  ``digits_vgg`` configuration's."""

  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((32, 32), (64, 64))
  hidden: int = 128

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for widths in self.stages:
      for w in widths:
        x = nn.Conv(w, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class Conv1DNet(nn.Module):
  """A 1-D CNN for MNIST-1D (40 samples): three strided convs (BN, ReLU) and a dense head."""

  num_classes: int = 10
  width: int = 64

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for stride in (1, 2, 2):
      x = nn.Conv(self.width, (5,), strides=(stride,), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


class SequenceEncoder(nn.Module):
  """A small pre-norm transformer encoder over a ``[batch, length, features]`` sequence
  (MNIST-1D: 40 tokens of one value): a dense embedding plus learned positions, ``layers``
  blocks of multi-head self-attention and a GELU MLP, mean pooling, a dense head."""

  num_classes: int = 10
  dim: int = 64
  heads: int = 4
  mlp_dim: int = 128
  layers: int = 2

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.Dense(self.dim, name='embed')(x)
    x = x + self.param('position', nn.initializers.normal(0.02), (x.shape[1], self.dim))
    for i in range(self.layers):
      h = nn.LayerNorm(name=f'block{i}_attention_norm')(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, name=f'block{i}_attention')(h, h)
      h = nn.LayerNorm(name=f'block{i}_mlp_norm')(x)
      h = nn.gelu(nn.Dense(self.mlp_dim, name=f'block{i}_mlp_in')(h))
      x = x + nn.Dense(self.dim, name=f'block{i}_mlp_out')(h)
    x = nn.LayerNorm(name='final_norm')(x).mean(axis=1)
    return nn.Dense(self.num_classes, name='head')(x)


# ---------------------------------------------------------------------------------------------
# ResNet


class ResNetBlock(nn.Module):
  """A residual block: ``basic`` (two 3x3 convs) or ``bottleneck`` (1x1, 3x3, 1x1).

  The bottleneck puts the stride on its 3x3 conv (ResNet v1.5, as torchvision does). A
  projection shortcut (1x1 conv + BN) is used whenever the block changes the shape of its
  input, i.e. on the first block of a stage that strides or widens.

  Attributes:
    width: channels of the block's inner convs; the output has ``width * expansion``.
    kind: ``'bottleneck'`` or ``'basic'``.
    strides: spatial stride of the block.
    zero_init_residual: start the last BN's scale at zero, so each block starts as identity.
  """

  width: int
  kind: str = 'bottleneck'
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def expansion(self) -> int:
    return 4 if self.kind == 'bottleneck' else 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    s = (self.strides, self.strides)
    pad1 = ((1, 1), (1, 1))
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out_ch = self.width * self.expansion

    if self.kind == 'bottleneck':
      y = nn.relu(norm(name='bn1')(conv(self.width, (1, 1), name='conv1')(x)))
      y = nn.relu(norm(name='bn2')(conv(self.width, (3, 3), s, padding=pad1, name='conv2')(y)))
      y = norm(name='bn3', scale_init=last_scale)(conv(out_ch, (1, 1), name='conv3')(y))
    elif self.kind == 'basic':
      y = nn.relu(norm(name='bn1')(conv(self.width, (3, 3), s, padding=pad1, name='conv1')(x)))
      y = norm(name='bn2', scale_init=last_scale)(conv(out_ch, (3, 3), padding=pad1, name='conv2')(y))
    else:
      raise ValueError(f"Unknown block kind {self.kind!r}; use 'bottleneck' or 'basic'.")

    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_ch:
      shortcut = norm(name='proj_bn')(conv(out_ch, (1, 1), s, name='proj_conv')(x))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """A ResNet for NHWC images. The defaults build ResNet-50 for 224x224 ImageNet.

  Stage ``i`` has ``stage_sizes[i]`` blocks of inner width ``width * 2**i``; every stage but
  the first halves the resolution on its first block.

  Attributes:
    stage_sizes: number of blocks per stage, e.g. ``(3, 4, 6, 3)`` (ResNet-50) or
      ``(2, 2, 2, 2)`` (ResNet-18).
    block: ``'bottleneck'`` (expansion 4) or ``'basic'`` (expansion 1).
    width: channels of the stem and of the first stage's inner convs.
    num_classes: outputs of the final Dense layer.
    cifar_stem: a 3x3 stride-1 stem conv and no max-pool (for 32x32 inputs) instead of the
      ImageNet 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool.
    zero_init_residual: start each block's last BN scale at zero.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = 'bottleneck'
  width: int = 64
  num_classes: int = 1000
  cifar_stem: bool = False
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Logits of shape ``[batch, num_classes]`` for images ``x`` of shape ``[batch, H, W, C]``."""
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = nn.Conv(
        self.width,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='stem_conv',
      )(x)
    else:
      x = nn.Conv(
        self.width,
        (7, 7),
        (2, 2),
        padding=((3, 3), (3, 3)),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='stem_conv',
      )(x)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='stem_bn',
    )(x)
    x = nn.relu(x)
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        x = ResNetBlock(
          width=self.width * 2**i,
          kind=self.block,
          strides=2 if (i > 0 and j == 0) else 1,
          zero_init_residual=self.zero_init_residual,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'stage{i + 1}_block{j}',
        )(x, train=train)

    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)


class ResNet50(ResNet):
  """ResNet-50: bottleneck stages (3, 4, 6, 3), 25.6M parameters at 1000 classes."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = 'bottleneck'


class ResNet18(ResNet):
  """ResNet-18: basic-block stages (2, 2, 2, 2); pass ``cifar_stem=True`` for CIFAR."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'


# ---------------------------------------------------------------------------------------------
# VGG

VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG(nn.Module):
  """VGG for 32x32 CIFAR images, as in OTO's CIFAR experiments (one 512-wide classifier).

  ``cfg`` lists conv widths and ``'M'`` for 2x2 max pooling; each conv is 3x3, followed by
  BatchNorm when ``batch_norm`` is set, and ReLU. The default is VGG16(-BN).
  """

  cfg: Sequence[int | str] = VGG16
  batch_norm: bool = True
  num_classes: int = 10
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = x.astype(self.dtype)
    for width in self.cfg:
      if width == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(
        int(width), (3, 3), use_bias=not self.batch_norm, dtype=self.dtype, param_dtype=self.param_dtype
      )(x)
      if self.batch_norm:
        x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)


# ---------------------------------------------------------------------------------------------
# BERT

# BERT, Llama and ViT (in its Hugging Face port) all initialise their weights from N(0, 0.02).
_normal02 = nn.initializers.normal(stddev=0.02)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  hidden_size: int
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, train: bool = False) -> Array:
    """``x``: ``[batch, length, hidden]``; ``mask``: bool ``[batch, length]``, True = attend.

    ``mask=None`` attends to every position (no padding, as for image patches).
    """
    b, seq_len, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    dense = functools.partial(
      nn.Dense, self.hidden_size, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype
    )
    q = dense(name='query')(x).reshape(b, seq_len, self.num_heads, head_dim)
    k = dense(name='key')(x).reshape(b, seq_len, self.num_heads, head_dim)
    v = dense(name='value')(x).reshape(b, seq_len, self.num_heads, head_dim)

    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
    # Padded keys get the most negative finite value rather than -inf, so a fully padded row
    # still gives a (uniform) softmax instead of NaNs.
    if mask is not None:
      # expand_dims, not mask[:, None, None, :]: see apply_rope.
      scores = jnp.where(jnp.expand_dims(mask, (1, 2)), scores, jnp.finfo(scores.dtype).min)
    # Softmax in float32: its exponentials overflow quickly in half precision.
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, seq_len, self.hidden_size)
    return dense(name='output')(ctx)


class BertLayer(nn.Module):
  """One post-LayerNorm transformer layer: attention and a GELU MLP, each ``LN(x + f(x))``."""

  hidden_size: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool = False) -> Array:
    ln = functools.partial(
      nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
    )
    drop = nn.Dropout(self.dropout_rate)
    h = BertSelfAttention(
      self.hidden_size, self.num_heads, self.dropout_rate, self.dtype, self.param_dtype, name='attention'
    )(x, mask, train)
    x = ln(name='attention_norm')(x + drop(h, deterministic=not train))
    h = nn.Dense(
      self.mlp_dim, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype, name='mlp_in'
    )(x)
    # BERT uses the exact (erf) GELU, not the tanh approximation.
    h = nn.gelu(h, approximate=False)
    h = nn.Dense(
      self.hidden_size, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype, name='mlp_out'
    )(h)
    return ln(name='mlp_norm')(x + drop(h, deterministic=not train))


class BertEncoder(nn.Module):
  """A BERT encoder. The defaults build BERT-base (110M parameters).

  The attention mask is derived from the token ids: positions holding ``pad_token_id`` are
  never attended to.

  Attributes:
    vocab_size: size of the WordPiece vocabulary.
    hidden_size: width of the residual stream.
    num_layers: number of transformer layers.
    num_heads: attention heads per layer (``hidden_size`` must be divisible by it).
    mlp_dim: hidden width of each layer's MLP.
    max_position: number of learned position embeddings (longest sequence).
    type_vocab_size: number of token-type (segment) embeddings.
    pad_token_id: the id that marks padding.
    dropout_rate: dropout on embeddings, attention probabilities and residual branches.
    layer_norm_eps: LayerNorm epsilon.
    num_labels: if set, a Dense head with this many outputs is applied to every token (e.g. 2
      for SQuAD start/end logits); otherwise the final hidden states are returned.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  num_labels: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array | None = None, train: bool = False) -> Array:
    """``input_ids``: int ``[batch, length]``. Returns ``[batch, length, hidden or num_labels]``."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.')
    _, seq_len = input_ids.shape
    if seq_len > self.max_position:
      raise ValueError(f'Sequence length {seq_len} exceeds max_position {self.max_position}.')
    mask = input_ids != self.pad_token_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)

    embed = functools.partial(
      nn.Embed,
      features=self.hidden_size,
      embedding_init=_normal02,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    x = embed(self.vocab_size, name='word_embeddings')(input_ids)
    x = x + embed(self.max_position, name='position_embeddings')(jnp.arange(seq_len)[None, :])
    x = x + embed(self.type_vocab_size, name='token_type_embeddings')(token_type_ids)
    x = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name='embeddings_norm'
    )(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    for i in range(self.num_layers):
      x = BertLayer(
        self.hidden_size,
        self.num_heads,
        self.mlp_dim,
        self.dropout_rate,
        self.layer_norm_eps,
        self.dtype,
        self.param_dtype,
        name=f'layer_{i}',
      )(x, mask, train)

    if self.num_labels is not None:
      x = nn.Dense(
        self.num_labels, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype, name='head'
      )(x)
    return x


class BertForSpans(nn.Module):
  """BERT with a start/end span head (SQuAD), over stacked ids ``x [batch, 2, length]``.

  ``x[:, 0]`` holds the token ids and ``x[:, 1]`` the token-type ids (one input array, so the
  model fits the training loop's ``apply(variables, x)``). Returns ``[batch, length, 2]``.
  The encoder is the submodule ``bert`` (see :func:`load_hf_bert`).
  """

  encoder: dict = dataclasses.field(default_factory=dict)  # BertEncoder fields (default BERT-base)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    return BertEncoder(**{**self.encoder, 'num_labels': 2}, name='bert')(x[:, 0], x[:, 1], train=train)


# Hugging Face BERT names (after the layer prefix) → ours, and whether the array is transposed.
_HF_LAYER = {
  'attention.self.query': ('attention/query', True),
  'attention.self.key': ('attention/key', True),
  'attention.self.value': ('attention/value', True),
  'attention.output.dense': ('attention/output', True),
  'attention.output.LayerNorm': ('attention_norm', False),
  'intermediate.dense': ('mlp_in', True),
  'output.dense': ('mlp_out', True),
  'output.LayerNorm': ('mlp_norm', False),
}
_HF_EMBEDDINGS = {
  'embeddings.word_embeddings': 'word_embeddings',
  'embeddings.position_embeddings': 'position_embeddings',
  'embeddings.token_type_embeddings': 'token_type_embeddings',
  'embeddings.LayerNorm': 'embeddings_norm',
}


def _hf_to_ours(name: str) -> tuple[str, bool] | None:
  """Our ``module/.../param`` path for a Hugging Face BERT tensor name, and whether to transpose."""
  name = name.removeprefix('bert.')
  module, _, leaf = name.rpartition('.')
  if module == 'qa_outputs':
    return ('head/' + ('kernel' if leaf == 'weight' else 'bias'), leaf == 'weight')
  if module in _HF_EMBEDDINGS:
    ours = _HF_EMBEDDINGS[module]
    if module.endswith('LayerNorm'):
      return (f'{ours}/' + {'weight': 'scale', 'gamma': 'scale', 'bias': 'bias', 'beta': 'bias'}[leaf], False)
    return (f'{ours}/embedding', False)
  m = re.fullmatch(r'encoder\.layer\.(\d+)\.(.+)', module)
  if m is None or m.group(2) not in _HF_LAYER:
    return None
  ours, transpose = _HF_LAYER[m.group(2)]
  if ours.endswith('norm'):
    return (
      f'layer_{m.group(1)}/{ours}/' + {'weight': 'scale', 'gamma': 'scale', 'beta': 'bias'}.get(leaf, leaf),
      False,
    )
  return (
    f'layer_{m.group(1)}/{ours}/' + ('kernel' if leaf == 'weight' else 'bias'),
    transpose and leaf == 'weight',
  )


def load_hf_bert(path: str, variables: dict) -> dict:
  """Variables with BERT's pretrained weights from a Hugging Face ``model.safetensors`` file.

  Works for :class:`BertEncoder` and :class:`BertForSpans` (whose encoder is ``bert``).
  Linear weights are transposed to Flax's ``[in, out]``; the pooler and the pre-training heads
  are ignored, and a tensor missing from the file (e.g. a fresh span head) keeps its
  initialisation. Nothing passed in is modified.

  Args:
    path: the ``.safetensors`` file of a BERT checkpoint (``bert-base-uncased`` and the like).
    variables: the model's initialised variables.

  Returns:
    New variables.

  Raises:
    ValueError: a tensor's shape differs from the model's (both shapes are named), or the file
      holds no BERT encoder tensor.
  """
  from safetensors.numpy import load_file

  params = variables['params']
  root = params['bert'] if 'bert' in params else params
  flat = {'/'.join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(root)[0]}
  loaded = 0
  for name, value in load_file(path).items():
    hit = _hf_to_ours(name)
    if hit is None or hit[0] not in flat:
      continue
    ours, transpose = hit
    value = value.T if transpose else value
    if value.shape != flat[ours].shape:
      raise ValueError(
        f"{name} has shape {value.shape} in {path}, but the model's {ours} has {flat[ours].shape}."
      )
    flat[ours] = jnp.asarray(value, flat[ours].dtype)
    loaded += 1
  if not loaded:
    raise ValueError(
      f'{path} holds no BERT encoder tensor (names like bert.encoder.layer.0.attention.self.query.weight).'
    )
  treedef = jax.tree_util.tree_structure(root)
  new_root = jax.tree_util.tree_unflatten(treedef, list(flat.values()))
  new_params = {**params, 'bert': new_root} if 'bert' in params else new_root
  return {**variables, 'params': new_params}


# ---------------------------------------------------------------------------------------------
# Llama


class RMSNorm(nn.Module):
  """Root-mean-square normalisation with a learned per-feature scale and no offset."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    # The mean of squares is taken in float32: in bfloat16 it loses most of its precision.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: Dtype) -> tuple[Array, Array]:
  """Cosine and sine tables ``[batch, length, head_dim]`` for split-halves rotary embeddings.

  Frequency ``i`` (of ``head_dim // 2``) rotates the pair ``(x[i], x[i + head_dim // 2])``,
  so both halves of the table repeat the same angles.
  """
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.expand_dims(positions.astype(jnp.float32), -1) * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates ``x`` (``[batch, length, heads, head_dim]``) by the angles in the tables."""
  # jnp.split and expand_dims rather than x[..., :half] and cos[:, :, None]: with a symbolic
  # batch (jax.export shapes, as oto_jax traces a model) JAX turns NumPy-style indexing into
  # gathers, slower to trace and to run than the split and reshape these emit.
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * jnp.expand_dims(cos, 2) + rotated * jnp.expand_dims(sin, 2)


class LlamaAttention(nn.Module):
  """Causal self-attention with rotary embeddings and optional grouped-query attention.

  Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``: each key/value
  head serves a contiguous block of query heads, as in the reference Llama checkpoints.
  """

  hidden_size: int
  num_heads: int
  num_kv_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
    b, seq_len, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    group = self.num_heads // self.num_kv_heads
    dense = functools.partial(
      nn.Dense, use_bias=False, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype
    )
    q = dense(self.num_heads * head_dim, name='q_proj')(x).reshape(b, seq_len, self.num_heads, head_dim)
    k = dense(self.num_kv_heads * head_dim, name='k_proj')(x).reshape(b, seq_len, self.num_kv_heads, head_dim)
    v = dense(self.num_kv_heads * head_dim, name='v_proj')(x).reshape(b, seq_len, self.num_kv_heads, head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Group the query heads by the key/value head they share instead of repeating k and v,
    # so no copies of the keys and values are made.
    q = q.reshape(b, seq_len, self.num_kv_heads, group, head_dim)
    scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    ctx = jnp.einsum('bkgqs,bskd->bqkgd', probs, v).reshape(b, seq_len, self.num_heads * head_dim)
    return dense(self.hidden_size, name='o_proj')(ctx)


class LlamaMLP(nn.Module):
  """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

  hidden_size: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(
      nn.Dense, use_bias=False, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype
    )
    h = nn.silu(dense(self.mlp_dim, name='gate_proj')(x)) * dense(self.mlp_dim, name='up_proj')(x)
    return dense(self.hidden_size, name='down_proj')(h)


class LlamaBlock(nn.Module):
  """One pre-RMSNorm decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  Attributes:
    scanned: return ``(x, None)`` instead of ``x``, the carry/output pair ``nn.scan`` expects.
  """

  hidden_size: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  rms_eps: float = 1e-6
  scanned: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array) -> Array | tuple[Array, None]:
    norm = functools.partial(RMSNorm, self.rms_eps, self.dtype, self.param_dtype)
    x = x + LlamaAttention(
      self.hidden_size, self.num_heads, self.num_kv_heads, self.dtype, self.param_dtype, name='attention'
    )(norm(name='attention_norm')(x), cos, sin)
    x = x + LlamaMLP(self.hidden_size, self.mlp_dim, self.dtype, self.param_dtype, name='mlp')(
      norm(name='mlp_norm')(x)
    )
    return (x, None) if self.scanned else x


class LlamaDecoder(nn.Module):
  """A Llama decoder-only language model. The defaults build Llama-7B (6.7B parameters).

  Attributes:
    vocab_size: token vocabulary.
    hidden_size: width of the residual stream.
    num_layers: number of decoder layers.
    num_heads: query heads per layer.
    num_kv_heads: key/value heads per layer (grouped-query attention); ``None`` means
      ``num_heads`` (ordinary multi-head attention).
    mlp_dim: hidden width of the SwiGLU MLP.
    rope_theta: base of the rotary embedding frequencies.
    rms_eps: RMSNorm epsilon.
    scan_layers: stack the layers with ``nn.scan`` (parameters get a leading layer axis under
      ``layers``) instead of a Python loop (``layers_0`` … ``layers_{n-1}``).
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int | None = None
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array | None = None) -> Array:
    """Next-token logits ``[batch, length, vocab_size]`` for int ``input_ids`` ``[batch, length]``."""
    kv_heads = self.num_kv_heads or self.num_heads
    if self.hidden_size % self.num_heads or self.num_heads % kv_heads:
      raise ValueError(
        f'hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}), '
        f'and num_heads by num_kv_heads ({kv_heads}).'
      )
    head_dim = self.hidden_size // self.num_heads
    if head_dim % 2:
      raise ValueError(f'Rotary embeddings need an even head dimension, got {head_dim}.')
    b, seq_len = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len), (b, seq_len))
    cos, sin = rope_tables(positions, head_dim, self.rope_theta, self.dtype)

    x = nn.Embed(
      self.vocab_size,
      self.hidden_size,
      embedding_init=_normal02,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='embed_tokens',
    )(input_ids)
    block_kwargs = dict(
      hidden_size=self.hidden_size,
      num_heads=self.num_heads,
      num_kv_heads=kv_heads,
      mlp_dim=self.mlp_dim,
      rms_eps=self.rms_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.scan_layers:
      stack = nn.scan(
        LlamaBlock,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.num_layers,
      )
      x, _ = stack(**block_kwargs, scanned=True, name='layers')(x, cos, sin)
    else:
      for i in range(self.num_layers):
        x = LlamaBlock(**block_kwargs, name=f'layers_{i}')(x, cos, sin)

    x = RMSNorm(self.rms_eps, self.dtype, self.param_dtype, name='norm')(x)
    return nn.Dense(
      self.vocab_size,
      use_bias=False,
      kernel_init=_normal02,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='lm_head',
    )(x)


# ---------------------------------------------------------------------------------------------
# ViT


class ViTBlock(nn.Module):
  """One pre-LayerNorm encoder layer: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``.

  The attention is :class:`BertSelfAttention` without a mask: separate query/key/value
  projections, each reshaped to ``[batch, length, heads, head_dim]``, and an output projection
  that reads the heads back in the same order, so that a head is one unit of all four.
  """

  hidden_size: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ln = functools.partial(
      nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
    )
    dense = functools.partial(nn.Dense, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout_rate)
    h = BertSelfAttention(
      self.hidden_size,
      self.num_heads,
      self.attention_dropout_rate,
      self.dtype,
      self.param_dtype,
      name='attention',
    )(ln(name='attention_norm')(x), None, train)
    x = x + drop(h, deterministic=not train)
    h = dense(self.mlp_dim, name='mlp_in')(ln(name='mlp_norm')(x))
    # The exact (erf) GELU, as the PyTorch ports use; the original JAX code has the tanh one.
    h = drop(nn.gelu(h, approximate=False), deterministic=not train)
    h = dense(self.hidden_size, name='mlp_out')(h)
    return x + drop(h, deterministic=not train)


class ViT(nn.Module):
  """A Vision Transformer for NHWC images. The defaults build ViT-B/16 (86.6M parameters).

  The image is cut into ``patch_size`` x ``patch_size`` patches by a conv whose kernel and
  stride are the patch size; a learned class token is prepended, learned position embeddings
  are added, and the classifier reads the class token after the final LayerNorm.

  Attributes:
    image_size: height and width of the input images (fixes the number of position embeddings).
    patch_size: side of a square patch (``image_size`` must be divisible by it).
    hidden_size: width of the residual stream.
    num_layers: number of encoder layers.
    num_heads: attention heads per layer (``hidden_size`` must be divisible by it).
    mlp_dim: hidden width of each layer's MLP.
    num_classes: outputs of the classifier head.
    dropout_rate: dropout on the embeddings, the MLP hidden units and the residual branches.
    attention_dropout_rate: dropout on the attention probabilities.
    layer_norm_eps: LayerNorm epsilon.
  """

  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Logits of shape ``[batch, num_classes]`` for images ``x`` of shape ``[batch, H, W, C]``."""
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size {self.patch_size}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.')
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
        f'Expected {self.image_size}x{self.image_size} images, got {x.shape[1]}x{x.shape[2]}: the '
        'position embeddings are learned for one grid of patches.'
      )
    p = self.patch_size
    x = nn.Conv(
      self.hidden_size,
      (p, p),
      (p, p),
      padding='VALID',
      kernel_init=_normal02,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='patch_embed',
    )(x.astype(self.dtype))
    b, gh, gw, _ = x.shape
    # The grid sides are static, so the batch (possibly symbolic) is the only unknown size.
    x = x.reshape(b, gh * gw, self.hidden_size)
    cls = self.param('cls_token', _normal02, (1, 1, self.hidden_size), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden_size)), x], axis=1)
    pos = self.param('position_embeddings', _normal02, (1, gh * gw + 1, self.hidden_size), self.param_dtype)
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    for i in range(self.num_layers):
      x = ViTBlock(
        self.hidden_size,
        self.num_heads,
        self.mlp_dim,
        self.dropout_rate,
        self.attention_dropout_rate,
        self.layer_norm_eps,
        self.dtype,
        self.param_dtype,
        name=f'layer_{i}',
      )(x, train)

    x = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name='final_norm'
    )(x)
    return nn.Dense(
      self.num_classes, kernel_init=_normal02, dtype=self.dtype, param_dtype=self.param_dtype, name='head'
    )(x[:, 0])


# ---------------------------------------------------------------------------------------------
# The models the configurations name.


# Each builds a model for a number of classes; keyword arguments (``model_kwargs`` of the config)
# override the defaults.
MODELS: dict[str, Callable[..., nn.Module]] = {
  'digits_vgg': lambda c, **kw: DigitsCNN(**{'num_classes': c, **kw}),
  'digits_resnet': lambda c, **kw: ResNet(
    **{'stage_sizes': (1, 1, 1), 'block': 'basic', 'width': 16, 'num_classes': c, 'cifar_stem': True, **kw}
  ),
  'mnist1d_cnn': lambda c, **kw: Conv1DNet(**{'num_classes': c, **kw}),
  'vgg16': lambda c, **kw: VGG(**{'batch_norm': False, 'num_classes': c, **kw}),
  'vgg16_bn': lambda c, **kw: VGG(**{'batch_norm': True, 'num_classes': c, **kw}),
  'resnet50_cifar': lambda c, **kw: ResNet50(**{'num_classes': c, 'cifar_stem': True, **kw}),
  'resnet50': lambda c, **kw: ResNet50(**{'num_classes': c, **kw}),
  'bert_squad': lambda c, **kw: BertForSpans(**kw),  # always two outputs: start and end
}


def build_model(cfg: Config, num_classes: int) -> nn.Module:
  """The config's model, with its ``model_kwargs``."""
  return MODELS[cfg.model](num_classes, **cfg.model_kwargs)
