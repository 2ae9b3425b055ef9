"""Saving, restoring and exporting slim models.

A saved subnet is a directory with

* ``variables/``: the slim variables, an Orbax checkpoint of their leaves;
* ``subnet.json``: the removed ZIG ids, the leaf count and the XLA options of a tuned subnet;
* ``apply.stablehlo``: ``Subnet.apply`` serialized with ``jax.export``, with a symbolic batch
  dimension (see :func:`export_subnet`).

:func:`load_subnet` gives back either a full :class:`~oto_jax.Subnet` (given the model's
partition, which rebuilds ``apply`` from the program) or, without one, the variables and the
exported StableHLO, which runs in a process that imports nothing but JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from oto_jax.deploy import deploy_subnet
from oto_jax.errors import ShapeSpecificError
from oto_jax.ir import is_symbolic
from oto_jax.partition import ZIGPartition
from oto_jax.paths import is_array
from oto_jax.surgery import Subnet, construct_subnet_from_keep

_FORMAT = 1


def export_subnet(
  subnet: Subnet, *args: Any, polymorphic: bool = True, fold_batchnorm: bool = True, **kwargs: Any
) -> jax.export.Exported:
  """``Subnet.apply`` exported with ``jax.export``: one StableHLO for every batch size.

  With ``polymorphic`` (the default) the inputs keep the slim program's symbolic dimensions
  (the batch), so the exported function accepts any batch size in a process that imports
  nothing but JAX. A program fixed to its analysed shapes, or ``polymorphic=False``, exports at
  fixed shapes: those of the example inputs, or the analysed ones.

  Args:
    subnet: the slim model.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``); optional, checked against the
      analysed signature. Without them the analysed shapes are used.
    polymorphic: keep the batch dimension symbolic.
    fold_batchnorm: export :func:`oto_jax.deploy_subnet` of the subnet (per-channel scales and
      shifts folded into the contraction before them, dead code dropped); it takes the same
      variable leaves.
    **kwargs: keyword arguments; static ones must be those the model was analysed with.

  Returns:
    A ``jax.export.Exported`` taking ``(leaves, args, kwargs)``, with ``leaves`` the slim
    variables' leaves in ``jax.tree_util.tree_leaves`` order, ``args`` the tuple of positional
    inputs and ``kwargs`` the dict of array keyword inputs. ``.serialize()`` gives bytes that
    run in any process.

  Example::

    blob = oto_jax.export_subnet(subnet).serialize()
    leaves = jax.tree_util.tree_leaves(subnet.variables)
    y = jax.export.deserialize(blob).call(leaves, (x,), {})   # x of any batch size
  """
  if fold_batchnorm:
    subnet = deploy_subnet(subnet)
  sig = subnet.program.signature
  if args or kwargs:
    subnet._input_arrays(args, kwargs)  # the checks of a call: structure and static values
  if polymorphic and sig.env:
    specs = [', '.join(str(d) for d in x.sym) for x in sig.arrays]
    abstract = jax.export.symbolic_args_specs(
      [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in sig.arrays], specs
    )
  elif args or kwargs:
    abstract = [_abstract(x) for x in jax.tree_util.tree_leaves((args, kwargs)) if is_array(x)]
  else:
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in sig.arrays]
  it = iter(abstract)
  spec_args, spec_kwargs = jax.tree_util.tree_unflatten(
    sig.treedef, [x.value if x.static else next(it) for x in sig.leaves]
  )
  if not all(is_array(x) for x in jax.tree_util.tree_leaves(spec_args)):
    raise ValueError('export_subnet takes array positional inputs only; pass static values as keywords.')
  static = {k: v for k, v in spec_kwargs.items() if not is_array(v)}
  dynamic = {k: v for k, v in spec_kwargs.items() if is_array(v)}
  leaves, treedef = jax.tree_util.tree_flatten(subnet.variables)

  # The variables go in as their list of leaves: an NNX State's tree cannot be serialized.
  def fn(leaves, args, dynamic):
    return subnet.apply(jax.tree_util.tree_unflatten(treedef, leaves), *args, **dynamic, **static)

  return jax.export.export(jax.jit(fn))([_abstract(x) for x in leaves], tuple(spec_args), dynamic)


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedSubnet:
  """A slim model restored without its program: variables plus exported StableHLO.

  Attributes:
    variables: the slim variables' leaves, in ``jax.tree_util.tree_leaves`` order (the tree
      itself, a linen dict or an NNX State, needs the model's code to rebuild).
    exported: the ``jax.export.Exported`` of ``Subnet.apply`` (see :func:`export_subnet`).
    removed_zig_ids: the ZIGs removed from the full model.
    compiler_options: the XLA options :meth:`apply` compiles with: those the saved subnet was
      tuned with (:attr:`Subnet.compiler_options`), ``{}`` for XLA's defaults.
  """

  variables: Any
  exported: jax.export.Exported
  removed_zig_ids: np.ndarray
  compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  _call: Any = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    # One compiled function per restored subnet, with the saved options.
    call = jax.jit(self.exported.call, compiler_options=dict(self.compiler_options) or None)
    object.__setattr__(self, '_call', call)

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs the exported function on the leaves (or any tree with those leaves) and inputs.

    Array keyword arguments only; static ones were baked in at export.

    Raises:
      ShapeSpecificError: an input's shape or dtype is not one the StableHLO takes; the
        message names the input, both shapes and the fix.
    """
    leaves = jax.tree_util.tree_leaves(variables)
    _check_exported_call(self.exported, leaves, args, kwargs)
    return self._call(leaves, args, kwargs)


def _check_exported_call(exported: jax.export.Exported, leaves: list, args: tuple, kwargs: dict) -> None:
  """Checks ``exported.call(leaves, args, kwargs)``'s inputs against what it was exported for.

  Raises:
    ShapeSpecificError: naming the first input whose rank, fixed dimension or dtype differs.
  """
  flat = jax.tree_util.tree_flatten_with_path((leaves, args, kwargs))[0]
  if len(flat) != len(exported.in_avals):
    raise ShapeSpecificError(
      f'The exported slim model takes {len(exported.in_avals)} arrays ({exported.in_tree}); got {len(flat)}.'
    )
  for (path, x), aval in zip(flat, exported.in_avals):
    where = ('variable leaf ' if path[0].idx == 0 else 'input ') + jax.tree_util.keystr(path[1:])
    shape, want = tuple(np.shape(x)), tuple(aval.shape)
    fixed_ok = len(shape) == len(want) and all(is_symbolic(w) or w == d for w, d in zip(want, shape))
    if not fixed_ok:
      symbolic = any(is_symbolic(w) for w in want)
      raise ShapeSpecificError(
        f'The exported slim model takes {where} of shape ({", ".join(map(str, want))}); got {shape}. '
        + (
          'Only the named dimensions may vary.'
          if symbolic
          else 'It was exported at fixed shapes: call it with that shape, or export again with a symbolic '
          'batch (oto_jax.export_subnet(subnet) of a model analysed with one; '
          'part.program.signature.fixed_reason says why it was not).'
        )
      )
    if np.dtype(getattr(x, 'dtype', np.asarray(x).dtype)) != np.dtype(aval.dtype):
      raise ShapeSpecificError(
        f'The exported slim model takes {where} as {aval.dtype}; got {x.dtype}. Cast it first.'
      )


def save_subnet(directory: str, subnet: Subnet, *args: Any, **kwargs: Any) -> None:
  """Saves the slim variables (Orbax), the removed ZIGs and the exported ``apply``.

  Sharded variables are written shard by shard: in a multi-process run, call it on every
  process with the same subnet; each process writes the shards it holds (Orbax synchronises
  them, and nothing is gathered onto one host), and process 0 writes the other files.

  Args:
    directory: a new or empty directory.
    subnet: the slim model.
    *args: example inputs for the export (optional; see :func:`export_subnet`).
    **kwargs: keyword arguments of ``apply``.
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  leaves = jax.tree_util.tree_leaves(subnet.variables)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, 'variables'), _as_dict(leaves))
  if jax.process_index() == 0:
    exported = export_subnet(subnet, *args, **kwargs)
    with open(os.path.join(directory, 'apply.stablehlo'), 'wb') as f:
      f.write(exported.serialize())
    meta = {
      'format': _FORMAT,
      'num_zigs': int(subnet.keep.shape[0]),
      'removed_zig_ids': [int(i) for i in subnet.removed_zig_ids],
      'num_leaves': len(leaves),
      'compiler_options': subnet.compiler_options,
    }
    with open(os.path.join(directory, 'subnet.json'), 'w') as f:
      json.dump(meta, f, indent=1)
  if jax.process_count() > 1:
    # Every process returns once the whole subnet is on disk (a restore may follow at once).
    multihost_utils.sync_global_devices('oto_jax.save_subnet')


def load_subnet(
  directory: str, partition: ZIGPartition | None = None, *, shardings: Any = None
) -> Subnet | ExportedSubnet:
  """Restores what :func:`save_subnet` wrote.

  Args:
    directory: the saved subnet.
    partition: the full model's partition (``oto_jax.zig_partition`` of the same model, with
      abstract variables if you like). With it the result is a :class:`~oto_jax.Subnet`
      (``slice_like``, ``report``); without it, an :class:`ExportedSubnet` that runs the
      exported StableHLO (at any batch size when it was exported with a symbolic one).
    shardings: where the variables go: one ``jax.sharding.Sharding`` for every leaf, or one
      per leaf (a list in ``tree_leaves`` order, or a tree shaped like the slim variables,
      e.g. ``plan_subnet(...).variables``' shardings). Each process then reads only the
      shards it holds. Default: the default device.

  Returns:
    A :class:`~oto_jax.Subnet` or an :class:`ExportedSubnet`. The :class:`ExportedSubnet` runs
    the saved program as saved (deployed and tuned, with the saved XLA options); the
    :class:`~oto_jax.Subnet` is rebuilt from the partition, as :func:`~oto_jax.construct_subnet`
    gives it: deploy it again (``deploy_subnet``, ``tune_inputs``) to fold and tune it.

  Raises:
    FileNotFoundError: the directory holds no saved subnet.
    ValueError: the partition does not match the saved subnet.
  """
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, 'subnet.json')
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'No saved subnet at {directory} (missing subnet.json).')
  with open(meta_path) as f:
    meta = json.load(f)
  with open(os.path.join(directory, 'apply.stablehlo'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  path = os.path.join(directory, 'variables')
  with ocp.StandardCheckpointer() as ckpt:
    if shardings is None:
      raw = ckpt.restore(path)
    else:
      stored = ckpt.metadata(path)
      stored = getattr(stored, 'item_metadata', stored)
      targets = _per_leaf(shardings, meta['num_leaves'])
      raw = ckpt.restore(
        path,
        {
          _key(i): jax.ShapeDtypeStruct(stored[_key(i)].shape, stored[_key(i)].dtype, sharding=sh)
          for i, sh in enumerate(targets)
        },
      )
  leaves = [raw[_key(i)] for i in range(meta['num_leaves'])]
  removed = np.asarray(meta['removed_zig_ids'], np.int64)
  if partition is None:
    return ExportedSubnet(leaves, exported, removed, meta.get('compiler_options', {}))
  if partition.num_zigs != meta['num_zigs']:
    raise ValueError(
      f'The partition has {partition.num_zigs} ZIGs but the saved subnet was built from a partition '
      f'with {meta["num_zigs"]}; partition the same model.'
    )
  keep = np.ones((partition.num_zigs,), bool)
  keep[removed] = False
  return construct_subnet_from_keep(partition, keep, leaves)


def _per_leaf(shardings: Any, n: int) -> list:
  """One sharding per leaf from a single sharding, a list, or a tree of shardings or arrays."""
  if isinstance(shardings, jax.sharding.Sharding):
    return [shardings] * n
  leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  leaves = [x if isinstance(x, jax.sharding.Sharding) else x.sharding for x in leaves]
  if len(leaves) != n:
    raise ValueError(f'load_subnet got {len(leaves)} shardings for {n} variable leaves.')
  return leaves


def _key(i: int) -> str:
  return f'leaf_{i:06d}'


def _as_dict(leaves: list) -> dict:
  # Arrays go to Orbax as they are (each process writes its shards), except the host-local
  # arrays of a multi-process run (each process's own copy of a small model), which Orbax
  # takes as NumPy and writes once.
  multi = jax.process_count() > 1

  def leaf(x):
    if isinstance(x, jax.Array) and not (multi and x.is_fully_addressable):
      return x
    return np.asarray(x)

  return {_key(i): leaf(x) for i, x in enumerate(leaves)}


def _abstract(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
