"""Union-find over tensor axes, with layouts: an axis may be a product or a concatenation of others.

Every axis of every value in the analysed program is a node. Two nodes are *united* when their
slices must be kept or removed together (an element-wise op, a contraction, a residual add).
An axis that a reshape splits, or that a concatenation or split assembles from parts, gets a
*layout*: ``('prod', factors)`` (row-major) or ``('cat', parts)``. When two laid-out axes are
united their layouts are reconciled into a common refinement; where none exists (a reshape
and a concatenation that cut an axis differently) the axis is blocked, with the reason.

The leaves of the resulting layout forest are the *atoms*: the finest channel axes. Each atom
touching a variable becomes a node group.
"""

from __future__ import annotations

import math

import numpy as np

PROD, CAT = 'prod', 'cat'


class AxisGraph:
  """Union-find with layouts and blocking reasons."""

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.layout: dict[int, tuple[str, tuple[int, ...]]] = {}
    self.blocked: dict[int, str] = {}
    # Roots of axes that are not channels at all (spatial, stacked-layer): never node groups.
    self.structural: set[int] = set()

  def new(self, size: int) -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(size))
    return len(self.parent) - 1

  def extend(self, sizes: list[int]) -> int:
    """Adds one node per size; returns the first new node."""
    first = len(self.parent)
    self.parent.extend(range(first, first + len(sizes)))
    self.size.extend(sizes)
    return first

  def find(self, a: int) -> int:
    parent = self.parent
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  def block(self, a: int, reason: str, structural: bool = False) -> None:
    r = self.find(a)
    self.blocked.setdefault(r, reason)
    if structural:
      self.structural.add(r)

  def union(self, a: int, b: int) -> None:
    parent = self.parent
    # Most unions meet roots or nodes one step below them: skip the call to find then.
    ra = a if parent[a] == a else self.find(a)
    rb = b if parent[b] == b else self.find(b)
    if ra == rb:
      return
    if self.size[ra] != self.size[rb]:
      raise AssertionError(f'internal: uniting axes of sizes {self.size[ra]} and {self.size[rb]}')
    if rb < ra:
      ra, rb = rb, ra
    self.parent[rb] = ra
    if rb in self.blocked:
      self.blocked.setdefault(ra, self.blocked.pop(rb))
    if rb in self.structural:
      self.structural.discard(rb)
      self.structural.add(ra)
    layout = self.layout
    if rb not in layout:
      return
    lb = layout.pop(rb)
    la = layout.get(ra)
    if la is None:
      layout[ra] = lb
    else:
      self._reconcile(ra, la, lb)

  def assign(self, a: int, kind: str, children: list[int]) -> None:
    """Declares axis ``a`` to be the product (or concatenation) of ``children``."""
    keep = 1 if kind == PROD else 0
    children = [c for c in children if self.size[c] != keep]
    total = math.prod(self.size[c] for c in children) if kind == PROD else sum(self.size[c] for c in children)
    if total != self.size[a] and children:
      raise AssertionError(f'internal: layout of size {total} for an axis of size {self.size[a]}')
    if len(children) <= 1:
      if children:
        self.union(a, children[0])
      return
    r = self.find(a)
    new = (kind, tuple(children))
    old = self.layout.get(r)
    if old is None:
      self.layout[r] = new
    else:
      self._reconcile(r, old, new)

  def _reconcile(self, r: int, la, lb) -> None:
    (ka, ca), (kb, cb) = la, lb
    self.layout[r] = la
    sa = [self.size[c] for c in ca]
    sb = [self.size[c] for c in cb]
    if ka != kb:
      prod, cat = (ca, cb) if ka == PROD else (cb, ca)
      if not self._rows(r, prod, cat):
        self._conflict(r, lb, 'both a reshape product and a concatenation of parts that cut it differently')
      return
    if sa == sb:
      for x, y in zip(ca, cb):
        self.union(x, y)
      return
    bounds_a, bounds_b = _bounds(ka, sa), _bounds(kb, sb)
    cuts = sorted(set(bounds_a) | set(bounds_b))
    if ka == PROD and any(cuts[i + 1] % cuts[i] for i in range(len(cuts) - 1)):
      self._conflict(r, lb, f'reshaped as {tuple(sa)} and as {tuple(sb)}, which share no refinement')
      return
    prev, segs = 1 if ka == PROD else 0, []
    for c in cuts:
      segs.append(self.new(c // prev if ka == PROD else c - prev))
      prev = c
    self.layout[r] = (ka, tuple(segs))
    for children, bounds in ((ca, bounds_a), (cb, bounds_b)):
      lo = 0
      for child, end in zip(children, bounds):
        hi = cuts.index(end) + 1
        self.assign(child, ka, list(segs[lo:hi]))
        lo = hi

  def _rows(self, r: int, factors: tuple[int, ...], parts: tuple[int, ...]) -> bool:
    """Reconciles a product with a concatenation whose parts are whole rows of its outermost
    factor (a channel shuffle meeting a split or a concat): that factor becomes the
    concatenation of the parts' row counts, and each part the product of its rows and the
    inner factors. Returns False, changing nothing, when a part cuts a row.
    """
    inner = math.prod(self.size[f] for f in factors[1:])
    sizes = [self.size[p] for p in parts]
    if any(n % inner for n in sizes):
      return False
    rows = [self.new(n // inner) for n in sizes]
    self.layout[r] = (PROD, tuple(factors))
    self.assign(factors[0], CAT, rows)
    for part, row in zip(parts, rows):
      self.assign(part, PROD, [row, *factors[1:]])
    return True

  def _conflict(self, r: int, other, why: str) -> None:
    self.block(r, f'axis is {why}')
    for c in other[1]:
      self.block(c, f'axis is {why}')

  # ----------------------------------------------------------------------------------------
  # Reading the final forest.

  def children(self, a: int) -> tuple[str, tuple[int, ...]] | None:
    lay = self.layout.get(self.find(a))
    if lay is None:
      return None
    return lay[0], tuple(self.find(c) for c in lay[1])

  def atoms_of(self, a: int, memo: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    """The atoms (leaf axes) under axis ``a``, in layout order (with repeats)."""
    r = self.find(a)
    hit = memo.get(r)
    if hit is not None:
      return hit
    lay = self.children(r)
    if lay is None:
      out = (r,) if self.size[r] > 1 else ()
    else:
      out = tuple(x for c in lay[1] for x in self.atoms_of(c, memo))
    memo[r] = out
    return out

  def index_map(self, a: int, atom: int, memo: dict | None = None) -> tuple[np.ndarray, tuple | None]:
    """For each slice of axis ``a``: the index along ``atom`` it belongs to, or -1.

    Also returns where the atom sits in the layout: the positions of the factors that hold it,
    outermost product first (``()`` for the axis itself, None when absent). Tuples compare
    outer-first, which ranks atoms competing for the same entries (heads before head_dim,
    also inside a mesh's (devices, shard) product).

    With ``memo`` (a dict kept by the caller while the graph does not change), every axis
    united with ``a`` shares one read-only array.
    """
    r, atom = self.find(a), self.find(atom)
    key = (r, atom)
    if memo is not None and key in memo:
      return memo[key]
    out = self._index_map(r, atom, memo)
    out[0].flags.writeable = False
    if memo is not None:
      memo[key] = out
    return out

  def _index_map(self, r: int, atom: int, memo: dict | None) -> tuple[np.ndarray, tuple | None]:
    if r == atom:
      return np.arange(self.size[r], dtype=np.int32), ()
    lay = self.children(r)
    if lay is None:
      return np.full((self.size[r],), -1, np.int32), None
    kind, kids = lay
    maps = [self.index_map(c, atom, memo) for c in kids]
    if kind == CAT:
      depth = min((d for _, d in maps if d is not None), default=None)
      return np.concatenate([m for m, _ in maps]), depth
    holders = [pos for pos, (_, d) in enumerate(maps) if d is not None]
    if not holders:
      return np.full((self.size[r],), -1, np.int32), None
    if len(holders) > 1:
      raise ValueError('atom in two factors of one axis')
    pos = holders[0]
    shape = [1] * len(kids)
    shape[pos] = -1
    full = np.broadcast_to(maps[pos][0].reshape(shape), [self.size[c] for c in kids])
    return full.reshape(-1).astype(np.int32), (pos, *maps[pos][1])


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
  """Pairs runs of axes of shape ``a`` and ``b`` with equal products (size-1 axes skipped)."""
  ia = [i for i, s in enumerate(a) if s != 1]
  ib = [i for i, s in enumerate(b) if s != 1]
  out, i, j = [], 0, 0
  while i < len(ia) and j < len(ib):
    ga, gb = [ia[i]], [ib[j]]
    pa, pb = a[ia[i]], b[ib[j]]
    i, j = i + 1, j + 1
    while pa != pb:
      if pa < pb:
        ga.append(ia[i])
        pa *= a[ia[i]]
        i += 1
      else:
        gb.append(ib[j])
        pb *= b[ib[j]]
        j += 1
    out.append((ga, gb))
  return out


def _bounds(kind: str, sizes: list[int]) -> list[int]:
  out, acc = [], 1 if kind == PROD else 0
  for s in sizes:
    acc = acc * s if kind == PROD else acc + s
    out.append(acc)
  return out
