"""One architecture, two frameworks: a forward function written against a small layer API.

A model is a plain function ``forward(L, *inputs)`` that calls ``L.dense``, ``L.conv``,
``L.batch_norm`` … for everything with variables and plain ``jnp`` / ``jax.nn`` for the rest.
:func:`linen` runs it inside one ``nn.compact`` method; :func:`nnx_model` runs it once at
construction (creating each layer with the input width it sees) and again on every call
(using the layers in order). Both backends name layer ``k`` of a kind ``Kind_k`` (``Dense_0``,
``Conv_3``…) unless the forward names it, so a variable has the same path in both builds
(linen's adds the collection in front) and :func:`randomize` gives it the same values: the
two builds of one forward compute the same function on the same numbers.

Example::

  def forward(L, x):
    x = jax.nn.relu(L.batch_norm(L.conv(x, 8, 3)))
    return L.dense(x.mean(axis=(1, 2)), 10)

  built = build('linen', forward, x)   # or 'nnx'
  y = built.apply_fn(built.variables, x)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oto_jax.partition import path_of

Array = jax.Array
Forward = Callable[..., Any]
FRAMEWORKS = ('linen', 'nnx')

# ---------------------------------------------------------------------------------------------
# The layer API both backends implement.


class Layers:
  """What a forward function may call on ``L``; a backend supplies ``_layer``, ``param``,
  ``scan`` and ``remat``.

  ``_layer(kind, name, make_linen, make_nnx)`` returns the layer for this call: linen builds it
  in the enclosing compact method, NNX builds it at construction and looks it up afterwards.
  """

  def __init__(self, train: bool = False):
    self._counts: collections.Counter = collections.Counter()
    self._train = train

  def _name(self, kind: str, name: str | None) -> str:
    if name is None:
      name = f'{kind}_{self._counts[kind]}'
      self._counts[kind] += 1
    return name

  def _layer(self, kind: str, name: str | None, make_linen: Callable, make_nnx: Callable):
    raise NotImplementedError

  def param(self, name: str, shape: Sequence[int]) -> Array:
    """A free trainable array (class token, learned positions)."""
    raise NotImplementedError

  def dense(self, x: Array, features: int, *, use_bias: bool = True, name: str | None = None) -> Array:
    return self._layer(
      'Dense',
      name,
      lambda n: nn.Dense(features, use_bias=use_bias, name=n),
      lambda r: nnx.Linear(x.shape[-1], features, use_bias=use_bias, rngs=r),
    )(x)

  def conv(
    self,
    x: Array,
    features: int,
    kernel: int,
    *,
    strides: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    padding: str = 'SAME',
    name: str | None = None,
  ) -> Array:
    k, s = (kernel, kernel), (strides, strides)
    return self._layer(
      'Conv',
      name,
      lambda n: nn.Conv(
        features, k, strides=s, padding=padding, feature_group_count=groups, use_bias=use_bias, name=n
      ),
      lambda r: nnx.Conv(
        x.shape[-1],
        features,
        k,
        strides=s,
        padding=padding,
        feature_group_count=groups,
        use_bias=use_bias,
        rngs=r,
      ),
    )(x)

  def conv_transpose(self, x: Array, features: int, kernel: int, *, strides: int, name: str | None = None):
    k, s = (kernel, kernel), (strides, strides)
    return self._layer(
      'ConvTranspose',
      name,
      lambda n: nn.ConvTranspose(features, k, strides=s, name=n),
      lambda r: nnx.ConvTranspose(x.shape[-1], features, k, strides=s, rngs=r),
    )(x)

  def batch_norm(self, x: Array, *, name: str | None = None) -> Array:
    """BatchNorm in eval mode (running statistics) unless a linen build is applied with train=True."""
    return self._layer(
      'BatchNorm',
      name,
      lambda n: nn.BatchNorm(use_running_average=not self._train, name=n),
      lambda r: nnx.BatchNorm(x.shape[-1], use_running_average=True, rngs=r),
    )(x)

  def layer_norm(self, x: Array, *, name: str | None = None) -> Array:
    return self._layer(
      'LayerNorm', name, lambda n: nn.LayerNorm(name=n), lambda r: nnx.LayerNorm(x.shape[-1], rngs=r)
    )(x)

  def rms_norm(self, x: Array, *, name: str | None = None) -> Array:
    return self._layer(
      'RMSNorm', name, lambda n: nn.RMSNorm(name=n), lambda r: nnx.RMSNorm(x.shape[-1], rngs=r)
    )(x)

  def embed(self, ids: Array, num: int, features: int, *, name: str | None = None) -> Array:
    return self._layer(
      'Embed', name, lambda n: nn.Embed(num, features, name=n), lambda r: nnx.Embed(num, features, rngs=r)
    )(ids)

  def mha(self, x: Array, heads: int, *, qkv_features: int | None = None, name: str | None = None) -> Array:
    """Flax's own multi-head self-attention (no dropout, no decoding cache)."""
    qkv = qkv_features or x.shape[-1]
    return self._layer(
      'MHA',
      name,
      lambda n: nn.MultiHeadDotProductAttention(
        num_heads=heads, qkv_features=qkv, deterministic=True, name=n
      ),
      # keep_rngs=False: without dropout there is no RNG state to carry in the variables.
      lambda r: nnx.MultiHeadAttention(
        heads, x.shape[-1], qkv, decode=False, deterministic=True, keep_rngs=False, rngs=r
      ),
    )(x)

  def scan(self, body: Forward, x: Array, length: int, *, name: str | None = None) -> Array:
    """``length`` copies of ``body(L, x) -> x`` with stacked parameters, run by the framework's scan.

    linen: ``nn.scan`` over the params collection; NNX: the copies made by ``nnx.vmap``, run by
    ``nnx.scan``. The body's only variables are parameters (no BatchNorm).
    """
    raise NotImplementedError

  def remat(self, body: Forward, x: Array, *, name: str | None = None) -> Array:
    """``body(L, x)`` as a rematerialised sub-module of its own."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# linen: everything is created in the compact method that runs the forward.


class _LinenLayers(Layers):
  def __init__(self, module: nn.Module, train: bool):
    super().__init__(train)
    self._module = module

  def _layer(self, kind, name, make_linen, make_nnx):
    return make_linen(self._name(kind, name))

  def param(self, name, shape):
    return self._module.param(name, nn.initializers.normal(1.0), tuple(shape))

  def scan(self, body, x, length, *, name=None):
    stack = nn.scan(_LinenScanBody, variable_axes={'params': 0}, split_rngs={'params': True}, length=length)
    y, _ = stack(body, name=self._name('Scan', name))(x, None)
    return y

  def remat(self, body, x, *, name=None):
    return nn.remat(_LinenBody)(body, self._train, name=self._name('Remat', name))(x)


class LinenArch(nn.Module):
  """``forward`` as a linen module; ``train`` only switches BatchNorm to batch statistics."""

  forward: Forward

  @nn.compact
  def __call__(self, *inputs: Any, train: bool = False) -> Any:
    return self.forward(_LinenLayers(self, train), *inputs)


class _LinenBody(nn.Module):
  forward: Forward
  train: bool = False

  @nn.compact
  def __call__(self, *inputs: Any) -> Any:
    return self.forward(_LinenLayers(self, self.train), *inputs)


class _LinenScanBody(nn.Module):
  forward: Forward

  @nn.compact
  def __call__(self, x: Array, _: Any) -> tuple[Array, None]:
    return self.forward(_LinenLayers(self, False), x), None


def linen(forward: Forward) -> LinenArch:
  return LinenArch(forward)


# ---------------------------------------------------------------------------------------------
# NNX: the constructor runs the forward once to create the layers; calls look them up by name.


class _NNXLayers(Layers):
  def __init__(self, model: nnx.Module, rngs: nnx.Rngs | None):
    super().__init__()
    self._model, self._rngs = model, rngs  # rngs is None once the layers exist

  def _layer(self, kind, name, make_linen, make_nnx):
    name = self._name(kind, name)
    if self._rngs is not None:
      setattr(self._model, name, make_nnx(self._rngs))
    return getattr(self._model, name)

  def param(self, name, shape):
    if self._rngs is not None:
      setattr(self._model, name, nnx.Param(jnp.zeros(tuple(shape), jnp.float32)))
    return getattr(self._model, name)[...]

  def scan(self, body, x, length, *, name=None):
    name = self._name('Scan', name)
    if self._rngs is not None:
      spec = jax.ShapeDtypeStruct(x.shape, x.dtype)

      @nnx.split_rngs(splits=length)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r: nnx.Rngs) -> NNXArch:
        return NNXArch(body, spec, rngs=r)

      setattr(self._model, name, make(self._rngs))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h: Array, block: NNXArch) -> Array:
      return block(h)

    return step(x, getattr(self._model, name))

  def remat(self, body, x, *, name=None):
    name = self._name('Remat', name)
    if self._rngs is not None:
      setattr(self._model, name, NNXArch(body, jax.ShapeDtypeStruct(x.shape, x.dtype), rngs=self._rngs))
    return nnx.remat(lambda block, h: block(h))(getattr(self._model, name), x)


class NNXArch(nnx.Module):
  """``forward`` as an NNX module, its layers created for inputs shaped like ``specs``.

  Build it under ``nnx.eval_shape``: the construction runs the forward on zeros, which is
  then only traced.
  """

  def __init__(self, forward: Forward, *specs: Any, rngs: nnx.Rngs):
    self.forward = forward
    forward(_NNXLayers(self, rngs), *(jnp.zeros(s.shape, s.dtype) for s in specs))

  def __call__(self, *inputs: Any) -> Any:
    return self.forward(_NNXLayers(self, None), *inputs)


def nnx_model(forward: Forward, *inputs: Any) -> NNXArch:
  """The NNX module, abstract (``nnx.eval_shape``): give it values with :func:`randomize`."""
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
  return nnx.eval_shape(lambda: NNXArch(forward, *specs, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------
# Variables: random everywhere, the same in both builds.


def variable_key(framework: str, path: tuple) -> tuple:
  """The path of a variable without linen's collection name: the same in both builds."""
  return path[1:] if framework == 'linen' else path


def randomize(tree: Any, framework: str, seed: int = 0, dtype: Any = None) -> Any:
  """Every float leaf redrawn from a normal, seeded by its path (see :func:`variable_key`).

  Init values would hide wrong groupings: a zero bias or running mean, a unit scale cannot
  change the output when a wrongly grouped channel is removed, so the removability checks
  would pass by accident. Kernels are scaled by their fan-in only to keep the deeper models'
  activations in a sane range; variances are kept positive and away from zero (BN divides by
  them). numpy draws: eager ``jax.random`` would compile once per shape. ``dtype`` overrides
  the float leaves' dtype (the draws are the same, then rounded).
  """

  def draw(p: tuple, leaf: Any) -> Any:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    path = path_of(p)
    key = '/'.join(map(str, variable_key(framework, path)))
    noise = np.random.default_rng([seed, zlib.crc32(key.encode())]).standard_normal(leaf.shape)
    if path[-1] == 'var':
      noise = np.abs(noise) + 0.5
    elif path[-1] == 'kernel' and len(leaf.shape) >= 2:
      noise = noise / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
    # device_put, not jnp.asarray: on jax 0.10 the latter stages the array through a jit that
    # compiles once per shape.
    return jax.device_put(noise.astype(dtype or leaf.dtype))

  return jax.tree_util.tree_map_with_path(draw, tree)


@dataclasses.dataclass(frozen=True)
class Built:
  """One build: ``apply_fn(variables, *inputs, **kwargs)`` is the model."""

  framework: str
  apply_fn: Callable[..., Any]
  variables: Any
  module: Any  # the linen module, or the NNX graphdef


def build(framework: str, forward: Forward, *inputs: Any, seed: int = 0, dtype: Any = None) -> Built:
  """``forward`` built in ``framework`` ('linen' or 'nnx') for ``inputs``, randomised variables.

  Only shapes come from the frameworks' initialisers (``eval_shape``): their truncated normals
  take a compile per shape on CPU. ``dtype`` casts every float variable (bfloat16 models).
  """
  dtype = None if dtype is None else jnp.dtype(dtype)
  if framework == 'linen':
    module = linen(forward)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    variables, apply_fn, handle = randomize(shapes, 'linen', seed, dtype), module.apply, module
  elif framework == 'nnx':
    graphdef, shapes = nnx.split(nnx_model(forward, *inputs))
    variables, handle = randomize(shapes, 'nnx', seed, dtype), graphdef

    def apply_fn(state: nnx.State, *xs: Any) -> Any:
      return nnx.merge(graphdef, state)(*xs)

  else:
    raise ValueError(f'unknown framework {framework!r}')
  return Built(framework, apply_fn, variables, handle)


def cast(tree: Any, dtype: Any) -> Any:
  """Float leaves of ``tree`` (variables or inputs) cast to ``dtype``; integer token ids kept.

  On the host: an eager ``astype`` compiles a convert per leaf shape.
  """

  def one(a: Any) -> Any:
    a = np.asarray(a)
    return jax.device_put(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a)

  return jax.tree.map(one, tree)
