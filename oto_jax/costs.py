"""FLOPs and parameter counts as exact functions of which ZIGs are kept.

Removing ZIG ``j`` removes its slice from every value and variable axis that carries its
atom, so the cost of the slim model is a polynomial in the per-axis kept counts:

.. math::
  C(\\text{keep}) = \\sum_t c_t \\prod_{a \\in t} n_a(\\text{keep}), \\qquad
  n_a(\\text{keep}) = \\#\\{i : \\mathrm{zig}_a(i) = -1\\} + \\sum_{i : \\mathrm{zig}_a(i) \\ge 0}
  \\text{keep}[\\mathrm{zig}_a(i)]

with one term per variable (parameters) or per equation of the traced program (FLOPs: two per
multiply-accumulate of ``dot_general`` and convolutions, one per output element of other
arithmetic, one per input element of reductions, none for data movement). Scan bodies count
``length`` times; a while loop's body counts once (its trip count is unknown before it runs);
a ``cond`` counts its most expensive branch.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.rules import Literal

if TYPE_CHECKING:
  from oto_jax.partition import ZIGPartition

# Primitives that only move or relabel data: no arithmetic.
DATA_MOVEMENT = frozenset(
  'reshape transpose broadcast_in_dim convert_element_type squeeze expand_dims copy copy_p '
  'concatenate split slice dynamic_slice dynamic_update_slice gather scatter pad rev iota '
  'select_and_gather_add stop_gradient reduce_precision bitcast_convert_type sharding_constraint '
  'device_put optimization_barrier empty zeros_like broadcast'.split()
)
# Reductions: one operation per input element.
REDUCTIONS = frozenset(
  'reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin '
  'cumsum cumprod cummax cummin cumlogsumexp reduce_window_sum reduce_window_max '
  'reduce_window_min reduce_window sort'.split()
)


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
  """A model cost (FLOPs or parameters) as a function of the kept ZIGs.

  Attributes:
    name: ``'flops'`` or ``'params'``.
    total: the cost of the full model.
    per_zig: float64 ``[num_zigs]``: how much removing each ZIG alone saves, to first order
      (exact unless the ZIG sits on two axes of one term, e.g. rows and columns of a kernel).
  """

  name: str
  total: float
  per_zig: np.ndarray
  constant: float
  coef: np.ndarray  # [T]
  factors: np.ndarray  # [T, F] axis ids; num_axes stands for a factor of 1
  axis_zig: np.ndarray  # [M] ZIG id of each mapped slice
  axis_seg: np.ndarray  # [M] its axis id
  axis_fixed: np.ndarray  # [A] slices of each axis outside every ZIG

  def __call__(self, keep: jax.Array) -> jax.Array:
    """The cost with only the ZIGs where ``keep`` is true (or its weight, for a float mask).

    Args:
      keep: bool or float array ``[num_zigs]``; may be traced.

    Returns:
      A float32 scalar.
    """
    keep = jnp.asarray(keep, jnp.float32)
    num_axes = len(self.axis_fixed)
    counts = jax.ops.segment_sum(keep[self.axis_zig], jnp.asarray(self.axis_seg), num_segments=num_axes)
    counts = jnp.concatenate(
      [counts + jnp.asarray(self.axis_fixed, jnp.float32), jnp.ones((1,), jnp.float32)]
    )
    prods = jnp.prod(counts[self.factors], axis=1)
    return jnp.sum(jnp.asarray(self.coef, jnp.float32) * prods) + jnp.float32(self.constant)

  def evaluate(self, keep: np.ndarray) -> float:
    """:meth:`__call__` in float64 numpy, for reports."""
    keep = np.asarray(keep, np.float64)
    counts = np.bincount(self.axis_seg, weights=keep[self.axis_zig], minlength=len(self.axis_fixed))
    counts = np.concatenate([counts + self.axis_fixed, [1.0]])
    return float(np.sum(self.coef * np.prod(counts[self.factors], axis=1)) + self.constant)


class AxisMaps:
  """The ZIG ids along every axis of a partition's program.

  ``maps(node)`` gives one int array per independent factor of the axis: entry ``i`` is the
  global ZIG id slice ``i`` belongs to, or -1. Atoms on disjoint slices (a concatenation)
  share one array; atoms that are factors of one product (heads × head_dim) get one each, and
  slice ``i`` is kept when it is kept in every array.
  """

  def __init__(self, partition: ZIGPartition):
    prog = partition.program
    if prog is None:
      raise ValueError('This partition carries no program; build it with oto_jax.zig_partition.')
    self.ctx = prog.ctx
    graph = self.ctx.graph
    self.offsets = {
      graph.find(a): g.zig_offset for g, a in zip(partition.node_groups, prog.group_atoms) if g.prunable
    }
    self.memo: dict[int, tuple[np.ndarray, ...]] = {}
    self.atom_memo: dict[int, tuple] = {}

  def __call__(self, node: int) -> tuple[np.ndarray, ...]:
    graph = self.ctx.graph
    r = graph.find(node)
    hit = self.memo.get(r)
    if hit is not None:
      return hit
    merged: list[np.ndarray] = []
    for a in dict.fromkeys(graph.atoms_of(r, self.atom_memo)):
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
    self.memo[r] = out = tuple(merged)
    return out

  def kept(self, node: int, keep: np.ndarray) -> np.ndarray | None:
    """The kept slice positions of an axis, or None when nothing on it is removed."""
    maps = self(node)
    if not maps:
      return None
    ok = np.ones(len(maps[0]), bool)
    for m in maps:
      ok &= (m < 0) | keep[np.maximum(m, 0)]
    return None if ok.all() else np.nonzero(ok)[0]


def axis_maps(partition: ZIGPartition) -> AxisMaps:
  """The partition's :class:`AxisMaps` (cached)."""
  if 'axis_maps' not in partition._cache:
    partition._cache['axis_maps'] = AxisMaps(partition)
  return partition._cache['axis_maps']


class _Builder:
  """Collects cost terms over the axes of a partition's program."""

  def __init__(self, partition: ZIGPartition):
    self.num_zigs = partition.num_zigs
    self.maps = axis_maps(partition)
    self.ctx = self.maps.ctx
    self.memo: dict[int, tuple] = {}
    self.axis_ids: dict[bytes, int] = {}
    self.axis_gids: list[np.ndarray] = []
    self.terms: dict[tuple[int, ...], float] = defaultdict(float)
    self.constant = 0.0

  def axis(self, node: int) -> tuple[tuple[int, ...], float]:
    """(axis-table ids, coefficient multiplier) for one axis node; () when nothing prunes it."""
    r = self.ctx.graph.find(node)
    hit = self.memo.get(r)
    if hit is not None:
      return hit
    size = self.ctx.graph.size[r]
    ids = []
    for m in self.maps(r):
      key = m.tobytes()
      if key not in self.axis_ids:
        self.axis_ids[key] = len(self.axis_gids)
        self.axis_gids.append(m)
      ids.append(self.axis_ids[key])
    # Factors of one product each scale the count: n = size * prod(n_k / size).
    out = (tuple(ids), float(size) ** (1 - len(ids)) if ids else float(size))
    self.memo[r] = out
    return out

  def add(self, coef: float, nodes) -> None:
    ids: list[int] = []
    for node in nodes:
      got, mult = self.axis(node)
      ids += got
      coef *= mult
    if coef == 0:
      return
    if ids:
      self.terms[tuple(sorted(ids))] += coef
    else:
      self.constant += coef

  def build(self, name: str) -> CostModel:
    num_axes = len(self.axis_gids)
    keys = list(self.terms)
    width = max((len(k) for k in keys), default=0)
    factors = np.full((len(keys), max(width, 1)), num_axes, np.int32)
    for t, k in enumerate(keys):
      factors[t, : len(k)] = k
    coef = np.array([self.terms[k] for k in keys], np.float64)
    mapped = [np.nonzero(m >= 0)[0] for m in self.axis_gids]
    axis_zig = np.concatenate([m[r] for m, r in zip(self.axis_gids, mapped)]) if mapped else np.zeros(0, int)
    axis_seg = (
      np.concatenate([np.full(len(r), i) for i, r in enumerate(mapped)]) if mapped else np.zeros(0, int)
    )
    sizes = np.array([len(m) for m in self.axis_gids] + [1], np.float64)
    fixed = sizes[:-1] - np.array([len(r) for r in mapped], np.float64)
    # First-order saving of each ZIG: for every term and factor, the product of the others.
    full = np.prod(sizes[factors], axis=1) if keys else np.zeros(0)
    weight = np.zeros(num_axes + 1)
    for t in range(len(keys)):
      for f in factors[t]:
        if f < num_axes:
          weight[f] += coef[t] * full[t] / sizes[f]
    per_zig = np.zeros(self.num_zigs)
    np.add.at(per_zig, axis_zig.astype(np.int64), weight[axis_seg.astype(np.int64)])
    return CostModel(
      name=name,
      total=float(np.sum(coef * full) + self.constant),
      per_zig=per_zig,
      constant=self.constant,
      coef=coef,
      factors=factors,
      axis_zig=axis_zig.astype(np.int32),
      axis_seg=axis_seg.astype(np.int32),
      axis_fixed=fixed,
    )


def params_model(partition: ZIGPartition) -> CostModel:
  """The number of trainable parameters as a function of the kept ZIGs."""
  b = _Builder(partition)
  prog = partition.program
  for path, v in zip(partition.variable_paths, prog.invars[: prog.num_variables]):
    if path in partition.trainable_paths:
      b.add(1.0, b.ctx.dims[v])
  return b.build('params')


def flops_model(partition: ZIGPartition) -> CostModel:
  """The FLOPs of one call of the analysed function as a function of the kept ZIGs."""
  b = _Builder(partition)
  _flops_terms(b, partition.program.steps, 1.0)
  return b.build('flops')


def _flops_terms(b: _Builder, steps, times: float) -> None:
  dims = b.ctx.dims
  for step in steps:
    kind = step[0]
    if kind == 'loop':
      length = step[5]['length']
      _flops_terms(b, step[1], times * (1 if length is None else length))
      continue
    if kind == 'cond':
      # Each branch on a scratch builder, to keep the most expensive at the full model.
      best, best_cost = None, -1.0
      for br_steps, _ in step[1]:
        trial = _Builder.__new__(_Builder)
        trial.__dict__.update(b.__dict__)
        trial.terms, trial.constant = defaultdict(float), 0.0
        _flops_terms(trial, br_steps, times)
        cost = trial.constant + sum(
          c * np.prod([len(b.axis_gids[i]) for i in k]) for k, c in trial.terms.items()
        )
        if cost > best_cost:
          best, best_cost = trial, cost
      if best is not None:
        for k, c in best.terms.items():
          b.terms[k] += c
        b.constant += best.constant
      continue
    _, eqn, args, outs, _, _ = step
    name = eqn.primitive.name
    if name in DATA_MOVEMENT or not outs:
      continue
    if name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      b.add(2.0 * times, list(dims[outs[0]]) + [dims[args[0]][ax] for ax in lc])
    elif name == 'conv_general_dilated':
      out_feature = eqn.params['dimension_numbers'].rhs_spec[0]
      rhs = args[1]
      b.add(2.0 * times, list(dims[outs[0]]) + [d for ax, d in enumerate(dims[rhs]) if ax != out_feature])
    elif name in REDUCTIONS:
      if not isinstance(args[0], Literal):
        b.add(times, dims[args[0]])
    else:
      for o in outs:
        b.add(times, dims[o])
