"""Static per-ZIG segment operations over a pytree shaped like the analysed variables.

Everything an optimizer does per ZIG reduces to two vectorised operations with static index
maps: a segment sum of per-slice reductions into a ``[num_zigs]`` vector, and a gather that
broadcasts a ``[num_zigs]`` vector back onto each variable's channel axis. Both are built
once per tree structure from the partition's member entries, so a jitted update holds one
reduction and one gather per variable leaf and a single segment sum, whatever the number of
node groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class _Leaf:
  position: int  # in the flattened tree
  axis: int
  gid: np.ndarray  # global ZIG id of each slice along ``axis``, -1 outside every ZIG
  rows: np.ndarray  # positions of the slices with gid >= 0
  ndim: int


@dataclasses.dataclass(frozen=True, eq=False)
class ZIGSegments:
  """The member entries of a partition, laid over one pytree structure.

  Build with :meth:`oto_jax.ZIGPartition.segments`; the result is cached per structure.

  Attributes:
    num_zigs: the partition's number of ZIGs.
    treedef: the structure this layout belongs to.
    sizes: int array ``[num_zigs]``: the number of member elements of each ZIG in the tree.
  """

  num_zigs: int
  treedef: Any
  leaves: tuple[_Leaf, ...]
  sizes: np.ndarray
  seg_ids: np.ndarray  # concatenated gid of every mapped slice, in leaf order

  @classmethod
  def build(
    cls, num_zigs: int, members: Iterable[tuple[Any, np.ndarray]], match: Mapping, tree: Any
  ) -> ZIGSegments:
    """Lays the member entries over ``tree``.

    Args:
      num_zigs: the number of ZIGs.
      members: ``(GroupEntry, global ZIG id per slice)`` for every member entry.
      match: variable path → ``(leaf position, leaf)`` in ``tree``.
      tree: the tree.
    """
    treedef = jax.tree_util.tree_structure(tree)
    gids: dict[int, tuple[int, np.ndarray, tuple[int, ...]]] = {}
    for entry, gid in members:
      hit = match.get(entry.path)
      if hit is None:
        continue
      pos = hit[0]
      if pos in gids:
        axis, old, shape = gids[pos]
        if axis != entry.axis or np.any((old >= 0) & (gid >= 0)):
          # The analysis gives every member element at most one ZIG (rival atoms lose).
          raise AssertionError(f'overlapping member entries on {entry.path}')
        gids[pos] = (axis, np.maximum(old, gid), shape)
      else:
        gids[pos] = (entry.axis, gid, entry.shape)
    leaves, sizes = [], np.zeros((num_zigs,), np.int64)
    for pos in sorted(gids):
      axis, gid, shape = gids[pos]
      rows = np.nonzero(gid >= 0)[0]
      leaves.append(_Leaf(pos, axis, gid, rows, len(shape)))
      per_slice = int(np.prod(shape)) // shape[axis]
      np.add.at(sizes, gid[rows], per_slice)
    seg_ids = np.concatenate([lf.gid[lf.rows] for lf in leaves]) if leaves else np.zeros((0,), np.int32)
    return cls(num_zigs, treedef, tuple(leaves), sizes, seg_ids.astype(np.int32))

  def _flat(self, tree: Any) -> list:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != self.treedef:
      raise ValueError(
        f'The tree has structure {treedef}, but these segments were built for {self.treedef}. '
        'Pass trees shaped like the one the optimizer was initialised with.'
      )
    return leaves

  def sums(self, *pairs: tuple[Any, Any]) -> jax.Array:
    """Per-ZIG inner products of pairs of trees, in float32.

    .. math::
      s_k[g] = \\sum_{i \\in g} a_{k,i} \\, b_{k,i}

    Args:
      *pairs: ``(a, b)`` pairs of trees of this structure (``b`` may be ``a``).

    Returns:
      An array of shape ``[len(pairs), num_zigs]`` (numpy when every leaf is a numpy array).
    """
    flat = [(self._flat(a), self._flat(b)) for a, b in pairs]
    # Host arrays (numpy) stay on the host: no device dispatch, no compilation.
    host = all(isinstance(x, np.ndarray) for a, b in flat for x in (*a, *b))
    xp = np if host else jnp
    if not self.leaves:
      return xp.zeros((len(pairs), self.num_zigs), xp.float32)
    cols = []
    for a, b in flat:
      parts = []
      for lf in self.leaves:
        x = xp.asarray(a[lf.position], xp.float32)
        y = x if b is a else xp.asarray(b[lf.position], xp.float32)
        other = tuple(d for d in range(lf.ndim) if d != lf.axis)
        per_slice = xp.sum(x * y, axis=other)
        parts.append(per_slice if len(lf.rows) == len(lf.gid) else per_slice[lf.rows])
      cols.append(xp.concatenate(parts))
    if host:
      return np.stack([np.bincount(self.seg_ids, c, minlength=self.num_zigs) for c in cols]).astype(
        np.float32
      )
    stacked = jnp.stack(cols, axis=-1)
    out = jax.ops.segment_sum(stacked, jnp.asarray(self.seg_ids), num_segments=self.num_zigs)
    return out.T

  def norms(self, tree: Any) -> jax.Array:
    """The L2 norm of every ZIG in ``tree``, shape ``[num_zigs]``."""
    sq = self.sums((tree, tree))[0]
    return np.sqrt(sq) if isinstance(sq, np.ndarray) else jnp.sqrt(sq)

  def spread(self, values: jax.Array, fill: Any) -> list:
    """Per leaf: ``values[gid]`` shaped to broadcast along the leaf's ZIG axis, else None.

    Slices outside every ZIG get ``fill``. Leaves without member entries get ``None``.
    """
    values = jnp.asarray(values)
    padded = jnp.concatenate([values, jnp.full((1,), fill, values.dtype)])
    out: list = [None] * self.treedef.num_leaves
    for lf in self.leaves:
      idx = np.where(lf.gid >= 0, lf.gid, self.num_zigs)
      shape = [1] * lf.ndim
      shape[lf.axis] = -1
      out[lf.position] = padded[idx].reshape(shape)
    return out

  def map(self, fn, *trees: Any, values: Sequence[jax.Array] = (), fills: Sequence[Any] = ()) -> Any:
    """``fn(*leaves, *spread_values)`` on every leaf with member entries; other leaves pass.

    Leaves without members keep the first tree's leaf unchanged. ``values`` are
    ``[num_zigs]`` vectors spread onto each leaf with :meth:`spread` and the matching fill.
    """
    flats = [self._flat(t) for t in trees]
    spreads = [self.spread(v, f) for v, f in zip(values, fills, strict=True)]
    out = list(flats[0])
    for lf in self.leaves:
      p = lf.position
      out[p] = fn(*(f[p] for f in flats), *(s[p] for s in spreads))
    return jax.tree_util.tree_unflatten(self.treedef, out)
