"""``shard_map`` bodies: the edges between global values and their shards, and the collectives.

A ``shard_map`` body is one program that every device runs on its own shard. An operand whose
axis is split over mesh axes of ``n`` devices in total reaches the body as a shard ``n`` times
shorter: position ``j`` of the shard is position ``d · (len / n) + j`` of the global axis on
device ``d``. The edge equations lay the global axis out as the product ``(n, shard)``: the
device factor is a mesh axis, never a channel; the shard factor carries the channels. A ZIG
of the body is therefore channel ``j`` of every device's shard, so the slim model stays
evenly sharded (every device drops the same positions) and its ``shard_map`` runs with the
same mesh and specs.

The collectives combine the same shard position across devices (``psum``, ``pmax``,
``ppermute``), or stack the shards along an axis (``all_gather``) or split one
(``reduce_scatter``): a channel that is zero on every device stays zero, and gathering or
scattering moves the device factor between the shard and the global axis, as the edges do.
``all_to_all`` moves shards between two axes: both are blocked.

The edges are equations of :mod:`oto_jax.ir`'s own primitives (``shard_map_enter``,
``shard_map_exit``), with entries here like any other.
"""

from __future__ import annotations

import math

import jax

from oto_jax.axes import PROD
from oto_jax.ir import SHARD_MAP_ENTER, SHARD_MAP_EXIT
from oto_jax.primitives.entry import KEEP, NONE, PrimitiveEntry, blocked, free, per_output, same_axes
from oto_jax.primitives.layout import _nothing, _pairwise_structure
from oto_jax.slicing import mesh_axes
from oto_jax.structure import Reason


def _devices(ctx, size: int, eqn) -> int:
  """A fresh axis node of ``size`` mesh devices: structural, so never a channel."""
  node = ctx.fresh(size)
  ctx.graph.block(node, Reason('a mesh axis (one shard per device), not a channel', eqn), True)
  return node


def _edge_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  whole, shard = (x, out) if eqn.primitive is SHARD_MAP_ENTER else (out, x)
  if not isinstance(whole, int) or not isinstance(shard, int):
    return  # a literal
  spec, mesh = eqn.params['spec'], eqn.params['mesh']
  for ax in range(len(ctx.shape(whole))):
    n = math.prod(mesh.shape[m] for m in mesh_axes(spec[ax] if ax < len(spec) else None))
    if n == 1:
      ctx.unite(whole, ax, shard, ax)
    else:
      ctx.assign(whole, ax, PROD, [_devices(ctx, n, eqn), (shard, ax)], eqn)


# The value, split or joined: nothing is computed, and position j of every shard keeps its zero.
SHARD_MAP_EDGE = PrimitiveEntry(_edge_structure, KEEP, cost=free, moves=same_axes)


def _stacked(ctx, eqn, short, long, d: int) -> None:
  """``long`` is every device's ``short`` stacked along axis ``d``: tiled, that axis becomes
  (devices, shard); untiled, a new devices axis stands there."""
  n, tiled = eqn.params['axis_size'], eqn.params['tiled']
  for ax in range(len(ctx.shape(short))):
    if ax == d and tiled:
      ctx.assign(long, d, PROD, [_devices(ctx, n, eqn), (short, d)], eqn)
    else:
      ctx.unite(short, ax, long, ax + (0 if tiled or ax < d else 1))
  if not tiled:
    ctx.block_axis(long, d, Reason(f'the devices axis of an untiled `{eqn.name}`', eqn), structural=True)


def _gather_structure(ctx, eqn):
  _stacked(ctx, eqn, eqn.ins[0], eqn.outs[0], eqn.params['all_gather_dimension'])


def _scatter_structure(ctx, eqn):
  # The sum over devices, split along `scatter_dimension`: the inverse of a gather.
  _stacked(ctx, eqn, eqn.outs[0], eqn.ins[0], eqn.params['scatter_dimension'])


def _all_to_all_structure(ctx, eqn):
  x, out = eqn.ins[0], eqn.outs[0]
  moved = {eqn.params['split_axis'], eqn.params['concat_axis']}
  why = Reason('redistributed between devices by `all_to_all`', eqn)
  for ax in range(len(ctx.shape(x))):
    if ax in moved:
      ctx.block_axis(x, ax, why)
      ctx.block_axis(out, ax, why)
    else:
      ctx.unite(x, ax, out, ax)


# The slim program runs shard_map bodies without the varying-axes check (the analysis folds
# `pvary` of a literal into the literal), where the checked forms of psum and pvary are the
# plain sum and nothing.
def _psum_bind(ctx, eqn, ins, params):
  return list(jax.lax.psum(tuple(ins), params['axes']))


def _unchecked_identity_bind(ctx, eqn, ins, params):
  return list(ins)


# Combinations of one shard position across devices: zero on every device stays zero.
_ACROSS = PrimitiveEntry(_pairwise_structure, KEEP)
# Relabels or sends shards without arithmetic.
_MOVE = PrimitiveEntry(_pairwise_structure, KEEP, cost=free, moves=same_axes)

ENTRIES: dict[str, PrimitiveEntry] = {
  SHARD_MAP_ENTER.name: SHARD_MAP_EDGE,
  SHARD_MAP_EXIT.name: SHARD_MAP_EDGE,
  **{name: _ACROSS for name in 'psum pmax pmin'.split()},
  'psum_invariant': _ACROSS.replace(bind=_psum_bind),
  'pvary': _MOVE.replace(bind=_unchecked_identity_bind),
  'pbroadcast': _MOVE,
  'ppermute': _MOVE.replace(moves=None),
  'all_gather': PrimitiveEntry(_gather_structure, KEEP, cost=free),
  'reduce_scatter': PrimitiveEntry(_scatter_structure, KEEP, cost=per_output),
  'all_to_all': PrimitiveEntry(_all_to_all_structure, KEEP, cost=free),
  'axis_index': PrimitiveEntry(_nothing, NONE, cost=free),
  'ragged_all_to_all': blocked(
    '`ragged_all_to_all` sends data-dependent runs of rows between devices', cost=free
  ),
}
