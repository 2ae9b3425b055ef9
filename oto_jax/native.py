"""Flax-native slim models: the user's own linen or NNX module code, at the slim widths.

:meth:`Subnet.apply` runs the analysed program and works for every model. Users who want to
keep calling ``module.apply`` (linen) or a module object (NNX) can get one here: the standard
Flax layers read their widths from attributes (``features``, ``num_heads``,
``feature_group_count``, …), and these are set from the slim variables' shapes. The result is
checked against :meth:`Subnet.apply` on example inputs; when the model's own code hard-codes a
width (``x.reshape(b, s, 12, 64)``) or uses a layer this module does not know, the native path
is unavailable and :class:`NativeUnavailable` says why.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.errors import NativeUnavailable

# Functions here take a ``Subnet`` (oto_jax.surgery builds on this module, not the reverse).
Subnet = Any


def _shape(tree: Any, *keys: str) -> tuple[int, ...] | None:
  for k in keys:
    if not hasattr(tree, '__getitem__') or k not in tree:
      return None
    tree = tree[k]
  return tuple(np.shape(getattr(tree, 'value', tree)))


# ---------------------------------------------------------------------------------------------
# linen


def _linen_widths(module: Any, args: tuple) -> dict[str, Any]:
  """Width attributes of a standard linen layer, from its (slim) variables and inputs."""
  import flax.linen as nn

  params = module.variables.get('params', {})
  if isinstance(module, nn.MultiHeadDotProductAttention):
    q, o = _shape(params, 'query', 'kernel'), _shape(params, 'out', 'kernel')
    if q is None or o is None:
      return {}
    return {'num_heads': q[-2], 'qkv_features': q[-2] * q[-1], 'out_features': o[-1]}
  if isinstance(module, nn.DenseGeneral):
    k = _shape(params, 'kernel')
    n = len(module.features) if isinstance(module.features, tuple | list) else 1
    return {} if k is None else {'features': k[-n:] if n > 1 else k[-1]}
  if isinstance(module, nn.Dense):
    k = _shape(params, 'kernel')
    return {} if k is None else {'features': k[-1]}
  if isinstance(module, nn.Conv | nn.ConvTranspose | nn.ConvLocal):
    k = _shape(params, 'kernel')
    if k is None:
      return {}
    out = {'features': k[-1]}
    if getattr(module, 'feature_group_count', 1) > 1 and args:
      out['feature_group_count'] = int(np.shape(args[0])[-1]) // k[-2]
    return out
  if isinstance(module, nn.Embed):
    e = _shape(params, 'embedding')
    return {} if e is None else {'num_embeddings': e[0], 'features': e[-1]}
  return {}


def _linen_interceptor(next_fun, args, kwargs, context):
  if context.method_name == '__call__' and context.module.scope is not None:
    for attr, value in _linen_widths(context.module, args).items():
      # A bound instance lives for one apply only; the user's module is never touched.
      object.__setattr__(context.module, attr, value)
  return next_fun(*args, **kwargs)


@functools.cache
def _slim_class(cls: type) -> type:
  import flax.linen as nn

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(_linen_interceptor):
      return cls.apply(self, *args, **kwargs)

  return type(f'Slim{cls.__name__}', (cls,), {'apply': apply, '__module__': cls.__module__})


def linen_module(subnet: Subnet) -> Any:
  """The user's linen module, whose standard layers take their widths from the slim variables.

  ``linen_module(subnet).apply(subnet.variables, x, **kwargs)`` equals
  ``subnet.apply(subnet.variables, x, **kwargs)``; this is checked on example inputs.

  Raises:
    NativeUnavailable: the partition was not built from ``module.apply``, or the module's
      code fixes a width that cannot follow the slim variables.
  """
  import flax.linen as nn

  module = subnet.partition.program.module
  if not isinstance(module, nn.Module):
    raise NativeUnavailable(
      'The partition was not built from a linen `module.apply`, so there is no module to slim; '
      'use Subnet.apply.'
    )
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.init and f.name not in ('parent', 'name')
  }
  slim = _slim_class(type(module))(**fields)
  _verify(subnet, lambda variables, *a, **k: slim.apply(variables, *a, **k), 'linen')
  return slim


# ---------------------------------------------------------------------------------------------
# NNX


def _nnx_fix(module: Any) -> None:
  from flax import nnx

  def shp(name):
    v = getattr(module, name, None)
    return None if v is None else tuple(np.shape(v.value if isinstance(v, nnx.Variable) else v))

  if isinstance(module, nnx.MultiHeadAttention):
    q, o = module.query.kernel.value.shape, module.out.kernel.value.shape
    module.num_heads, module.head_dim, module.qkv_features = q[-2], q[-1], q[-2] * q[-1]
    module.out_features = o[-1]
  elif isinstance(module, nnx.LinearGeneral):
    k = shp('kernel')
    n_out, n_in = len(module.out_features), len(module.in_features)
    module.out_features, module.in_features = k[len(k) - n_out :], k[len(k) - n_out - n_in : len(k) - n_out]
  elif isinstance(module, nnx.Linear):
    k = shp('kernel')
    module.in_features, module.out_features = k[0], k[-1]
  elif isinstance(module, nnx.Conv | nnx.ConvTranspose):
    k = shp('kernel')
    old_groups = getattr(module, 'feature_group_count', 1)
    per_group = module.out_features // max(old_groups, 1)
    module.out_features = k[-1]
    if old_groups > 1:
      # Groups are removed whole (or channels within each group evenly): the channels per
      # group stay, the number of groups follows the width.
      module.feature_group_count = k[-1] // per_group
    module.in_features = k[-2] * getattr(module, 'feature_group_count', 1)
  elif isinstance(module, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm | nnx.GroupNorm):
    for name in ('scale', 'bias', 'mean'):
      s = shp(name)
      if s is not None:
        module.num_features = s[-1]
        break
  elif isinstance(module, nnx.Embed):
    e = shp('embedding')
    module.num_embeddings, module.features = e[0], e[-1]


def nnx_model(subnet: Subnet, graphdef: Any) -> Any:
  """A new NNX module graph with the slim ``Param`` s and ``BatchStat`` s and slim widths.

  Args:
    subnet: a subnet of a partition built on an NNX state (``nnx.split(model)``).
    graphdef: the model's graphdef, or the model itself (it is not modified).

  Returns:
    A new NNX module; calling it equals ``subnet.apply`` (checked on example inputs).

  Raises:
    NativeUnavailable: the model's code fixes a width, or the partition's inputs do not map
      onto a call of the module.
  """
  from flax import nnx

  if isinstance(graphdef, nnx.Module):
    graphdef = nnx.graphdef(graphdef)
  try:
    model = nnx.merge(graphdef, subnet.variables)
  except Exception as e:  # noqa: BLE001 - any failure means the state does not fit the graph
    raise NativeUnavailable(f'The slim variables do not merge into this graphdef: {e}') from e
  for _, m in nnx.iter_graph(model):
    if isinstance(m, nnx.Module):
      _nnx_fix(m)

  def call(variables, *args, **kwargs):
    return nnx.merge(nnx.graphdef(model), variables)(*args, **kwargs)

  _verify(subnet, call, 'NNX')
  return model


# ---------------------------------------------------------------------------------------------


def example_inputs(subnet: Subnet) -> tuple[tuple, dict]:
  """Deterministic inputs of the analysed shapes: normal floats, zero integers, static values."""
  sig = subnet.partition.program.signature
  rng = np.random.default_rng(0)
  leaves = []
  for leaf in sig.leaves:
    if leaf.static:
      leaves.append(leaf.value)
    elif jnp.issubdtype(leaf.dtype, jnp.floating):
      leaves.append(jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype))
    else:
      leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
  return jax.tree_util.tree_unflatten(sig.treedef, leaves)


def _verify(subnet: Subnet, fn, kind: str) -> None:
  args, kwargs = example_inputs(subnet)
  try:
    got = fn(subnet.variables, *args, **kwargs)
  except Exception as e:  # noqa: BLE001 - the reason is reported to the user
    raise NativeUnavailable(
      f'The {kind} module does not run at the slim widths ({type(e).__name__}: {e}); its code '
      'probably fixes a width. Use Subnet.apply, which follows every width.'
    ) from e
  want = subnet.apply(subnet.variables, *args, **kwargs)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b), initial=0.0) if a.shape == b.shape else np.inf
    if err > 1e-5 * (np.max(np.abs(a), initial=0.0) + 1e-6):
      raise NativeUnavailable(
        f'The {kind} module at the slim widths computes something else than Subnet.apply (output '
        f'shapes {b.shape} vs {a.shape}, max difference {err:.3g}); its code probably branches on a '
        'width. Use Subnet.apply.'
      )
