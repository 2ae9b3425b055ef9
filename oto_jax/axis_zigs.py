"""Which ZIG each slice of each axis of the program belongs to: the map the costs and the
surgery share.

After the analysis, every axis of every value is a node of the final axis graph; a node's
atoms (the leaves of its layout) that are prunable node groups give its ZIG ids. ``maps(node)``
returns one int array per independent factor of the axis: entry ``i`` is the global ZIG id
slice ``i`` belongs to, or -1. Atoms on disjoint slices (a concatenation) share one array;
atoms that are factors of one product (heads × head_dim) get one each, and slice ``i`` is kept
when it is kept in every array.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from oto_jax.axes import AxisGraph


class AxisZigs:
  """ZIG ids along the axes of an analysed program (computed per axis on first use).

  Args:
    graph: the final axis graph of the analysis.
    base: node of axis 0 of each value (axis ``ax`` of value ``v`` is ``base[v] + ax``).
    offsets: atom (graph root) → global id of its node group's first ZIG, prunable groups only.
  """

  def __init__(self, graph: AxisGraph, base: tuple[int, ...], offsets: Mapping[int, int]):
    self.graph = graph
    self.base = base
    self.offsets = dict(offsets)
    self._memo: dict[int, tuple[np.ndarray, ...]] = {}
    self._atoms: dict[int, tuple] = {}

  def node(self, v: int, ax: int) -> int:
    return self.base[v] + ax

  def root(self, node: int) -> int:
    return self.graph.find(node)

  def size(self, node: int) -> int:
    return self.graph.size[self.graph.find(node)]

  def maps(self, node: int) -> tuple[np.ndarray, ...]:
    graph = self.graph
    r = graph.find(node)
    hit = self._memo.get(r)
    if hit is not None:
      return hit
    merged: list[np.ndarray] = []
    for a in dict.fromkeys(graph.atoms_of(r, self._atoms)):
      off = self.offsets.get(graph.find(a))
      if off is None:
        continue
      try:
        idx, _ = graph.index_map(r, a)
      except ValueError:  # the atom twice in one product (an outer product with itself)
        continue
      m = np.where(idx >= 0, idx + off, -1).astype(np.int32)
      for k, other in enumerate(merged):
        if not np.any((m >= 0) & (other >= 0)):
          merged[k] = np.maximum(other, m)
          break
      else:
        merged.append(m)
    self._memo[r] = out = tuple(merged)
    return out

  def kept(self, node: int, keep: np.ndarray) -> np.ndarray | None:
    """The kept slice positions of an axis, or None when nothing on it is removed."""
    maps = self.maps(node)
    if not maps:
      return None
    ok = np.ones(len(maps[0]), bool)
    for m in maps:
      ok &= (m < 0) | keep[np.maximum(m, 0)]
    return None if ok.all() else np.nonzero(ok)[0]
