"""Data-parallel and multi-process training: the device mesh, parameter shardings, start-up."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def to_host(tree: Any) -> Any:
  """NumPy copies of a tree's arrays, gathered from every process where a leaf is sharded across hosts."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run (one process per host, or several on one host for testing).

  On CPU the collectives go through Gloo; the setting is ignored by GPU and TPU backends.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def data_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


def param_sharding(mesh: Mesh, tree: Any, fsdp: bool) -> Any:
  n = mesh.devices.size

  def one(x):
    if not fsdp:
      return NamedSharding(mesh, P())
    shape = np.shape(x)
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0 and shape[a] >= n]
    if not axes:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[int(axes[0])] = 'data'
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, tree)
