"""Cutting variable leaves to the slim widths, wherever they live.

One rule for every caller (:func:`~oto_jax.construct_subnet`, :meth:`Subnet.slice_like`,
:func:`~oto_jax.plan_subnet`), by the kind of leaf:

* **NumPy arrays and single-device CPU arrays** are cut on the host with NumPy (CPU device
  memory is host memory: nothing to gain from a device program) and placed back where they
  were.
* **Other** ``jax.Array`` **s** (on an accelerator, or sharded over several devices, possibly
  across processes) are cut on their devices, in one ``jax.jit`` program: no host round trip,
  no gather onto one process; each process computes its addressable shards. A leaf whose
  every device keeps the same number of positions of its shard is cut shard by shard, with
  no communication at all.
* ``jax.ShapeDtypeStruct`` **s** are cut abstractly (planning without weights), and tracers
  (inside the caller's ``jax.jit``) with ``jnp.take``.

The slim leaf's sharding follows the full leaf's (:func:`slim_sharding`): a ``NamedSharding``
keeps its ``PartitionSpec`` entry on every axis whose slim length its mesh axes still divide,
and that axis is replicated otherwise (its other axes keep their entries); a single-device
sharding stays on its device; any other sharding is left to the compiler to propagate.
A leaf with nothing removed is returned as is (arrays are immutable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding


def slim_sharding(sharding: Any, shape: Sequence[int]) -> Any:
  """The sharding of a slim leaf of ``shape`` cut from a leaf with ``sharding``.

  .. math::
    \\text{spec}'_a = \\begin{cases} \\text{spec}_a & n_a \\bmod \\prod_{m \\in \\text{spec}_a}
    |m| = 0 \\\\ \\text{None} & \\text{otherwise} \\end{cases}

  Args:
    sharding: the full leaf's sharding (or None).
    shape: the slim leaf's shape.

  Returns:
    A sharding for the slim leaf, or None to let ``jax.jit`` choose.

  Example::

    full = NamedSharding(mesh, P(None, 'model'))      # a (512, 2048) kernel over 8 devices
    slim_sharding(full, (512, 1024))                  # P(None, 'model'): 1024 / 8 divides
    slim_sharding(full, (512, 1001))                  # P(None, None): replicated
  """
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if not isinstance(sharding, NamedSharding):
    return None
  sizes = sharding.mesh.shape
  spec = []
  for ax, n in enumerate(shape):
    entry = sharding.spec[ax] if ax < len(sharding.spec) else None
    spec.append(entry if n % math.prod(sizes[m] for m in mesh_axes(entry)) == 0 else None)
  return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def _take(x: Any, ks: Sequence[np.ndarray | None], xp: Any = jnp) -> Any:
  for ax, k in enumerate(ks):
    if k is not None:
      x = xp.take(x, np.asarray(k, np.int32), axis=ax)
  return x


def mesh_axes(entry: Any) -> tuple:
  """The mesh axes a PartitionSpec entry (None, a name or a tuple of names) splits over."""
  return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def _gather(x: Any, sharding: NamedSharding, ks: Sequence[np.ndarray | None]) -> Any:
  """The compiler's gather, axis by axis; on a mesh of explicit axes each step names its
  result's sharding (the rule's), which such meshes require."""
  if not any(t == jax.sharding.AxisType.Explicit for t in getattr(sharding.mesh, 'axis_types', ())):
    return _take(x, ks)
  shape = list(x.shape)
  for ax, k in enumerate(ks):
    if k is not None:
      shape[ax] = len(k)
      index = (slice(None),) * ax + (np.asarray(k, np.int32),)
      x = x.at[index].get(out_sharding=slim_sharding(sharding, shape))
  return x


def _cut_on_device(x: Any, sharding: Any, ks: Sequence[np.ndarray | None]) -> Any:
  """``x`` (traced inside a jit, with ``sharding``) cut along every axis; a NamedSharding cut
  shard by shard.

  When every device keeps as many positions of its shard along each cut axis (a balanced
  cut), each device cuts its own shard with its own indices (a ``shard_map``): nothing moves
  between devices and the result keeps the PartitionSpec. Otherwise the compiler's gather
  does it, which may copy a sharded axis to every device first (up to devices × the leaf,
  transiently).
  """
  if not isinstance(sharding, NamedSharding):
    return _take(x, ks)
  mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  tables = []
  for ax, k in enumerate(ks):
    names = mesh_axes(spec[ax])
    n = math.prod(mesh.shape[m] for m in names)
    if k is None or n == 1:
      tables.append(None if k is None else (names, np.asarray(k, np.int32)[None]))
      continue
    length = x.shape[ax] // n
    counts = np.bincount(np.asarray(k) // length, minlength=n)
    if counts.min() != counts.max():
      return _gather(x, sharding, ks)
    local = np.asarray(k, np.int32).reshape(n, -1) - (np.arange(n, dtype=np.int32) * length)[:, None]
    tables.append((names, local))

  def body(shard):
    for ax, table in enumerate(tables):
      if table is None:
        continue
      names, local = table
      # This device's position along the mesh axes that split the axis (major first).
      row = 0
      for m in names:
        row = row * mesh.shape[m] + jax.lax.axis_index(m)
      shard = jnp.take(shard, jnp.asarray(local)[row], axis=ax)
    return shard

  pspec = PartitionSpec(*spec)
  return jax.shard_map(body, mesh=mesh, in_specs=(pspec,), out_specs=pspec, check_vma=False)(x)


def on_host(leaf: Any) -> bool:
  """Whether ``leaf`` is cut on the host: a NumPy array or a single-device CPU array."""
  if not isinstance(leaf, jax.Array):
    return True
  devices = leaf.sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == 'cpu'


def cut_leaves(leaves: Sequence[Any], kept: Sequence[Sequence[np.ndarray | None]]) -> list:
  """Each leaf with, along each axis, only the positions in ``kept`` (None: the whole axis).

  Args:
    leaves: NumPy arrays, ``jax.Array`` s or ``jax.ShapeDtypeStruct`` s.
    kept: per leaf, per axis, the positions that survive (None keeps the axis).

  Returns:
    The cut leaves, each of the kind it came as (see the module docstring for where).
  """
  out: list = list(leaves)
  on_device, shardings = [], []
  for i, (leaf, ks) in enumerate(zip(leaves, kept)):
    if all(k is None for k in ks):
      continue
    shape = tuple(len(k) if k is not None else n for k, n in zip(ks, np.shape(leaf)))
    if isinstance(leaf, jax.ShapeDtypeStruct):
      out[i] = jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=slim_sharding(leaf.sharding, shape))
    elif isinstance(leaf, jax.core.Tracer):  # inside the caller's jit: its shardings apply
      out[i] = _take(leaf, ks)
    elif on_host(leaf):
      x = _take(np.asarray(leaf), ks, np)
      if isinstance(leaf, jax.Array):
        # np.take made a fresh array, which device_put may alias on CPU. Committed to its
        # device only if the full leaf was: an uncommitted one may join a computation anywhere.
        x = jax.device_put(x, leaf.sharding if leaf.committed else None)
      out[i] = x
    else:
      on_device.append(i)
      shardings.append(slim_sharding(leaf.sharding, shape))
  if on_device:

    def cut(xs):
      return [_cut_on_device(x, leaves[i].sharding, kept[i]) for x, i in zip(xs, on_device)]

    cuts = jax.jit(cut, out_shardings=shardings)([leaves[i] for i in on_device])
    for i, x in zip(on_device, cuts):
      out[i] = x
  return out
