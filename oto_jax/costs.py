"""FLOPs, parameter counts and memory traffic as exact functions of which ZIGs are kept.

Removing ZIG ``j`` removes its slice from every value and variable axis that carries its
atom, so the cost of the slim model is a polynomial in the per-axis kept counts:

.. math::
  C(\\text{keep}) = \\sum_t c_t \\prod_{a \\in t} n_a(\\text{keep}), \\qquad
  n_a(\\text{keep}) = \\#\\{i : \\mathrm{zig}_a(i) = -1\\} + \\sum_{i : \\mathrm{zig}_a(i) \\ge 0}
  \\text{keep}[\\mathrm{zig}_a(i)]

with one term per variable (parameters) or per cost term of an equation (FLOPs: each
primitive's registry entry gives its own, e.g. two per multiply-accumulate of ``dot_general``
and convolutions, one per output element of other arithmetic, one per input element of
reductions, none for data movement; bytes: every operand and result read or written once).
Scan bodies count ``length`` times; a while loop's body counts once (its trip count is unknown
before it runs); a ``cond`` counts its most expensive branch. Costs are at the analysed input
shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.axis_zigs import AxisZigs
from oto_jax.ir import Call, Eqn, Literal, Loop, Program, evaluate_dim
from oto_jax.primitives import CostTerm, all_axes, per_output


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
  """A model cost (FLOPs, parameters or bytes) as a function of the kept ZIGs.

  Attributes:
    name: ``'flops'``, ``'params'`` or ``'bytes'``.
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


class _Shapes:
  """The context a cost rule sees: value shapes at the analysed inputs."""

  def __init__(self, program: Program):
    self.values = program.values

  def shape(self, v) -> tuple[int, ...]:
    return () if isinstance(v, Literal) else self.values.shapes[v]


class _Builder:
  """Collects cost terms over the axes of an analysed program."""

  def __init__(self, axes: AxisZigs, num_zigs: int):
    self.num_zigs = num_zigs
    self.maps = axes
    self.memo: dict[int, tuple] = {}
    self.axis_ids: dict[bytes, int] = {}
    self.axis_gids: list[np.ndarray] = []
    self.terms: dict[tuple[int, ...], float] = defaultdict(float)
    self.constant = 0.0

  def axis(self, node: int) -> tuple[tuple[int, ...], float]:
    """(axis-table ids, coefficient multiplier) for one axis node; () when nothing prunes it."""
    r = self.maps.root(node)
    hit = self.memo.get(r)
    if hit is not None:
      return hit
    size = self.maps.size(r)
    ids = []
    for m in self.maps.maps(r):
      key = m.tobytes()
      if key not in self.axis_ids:
        self.axis_ids[key] = len(self.axis_gids)
        self.axis_gids.append(m)
      ids.append(self.axis_ids[key])
    # Factors of one product each scale the count: n = size * prod(n_k / size).
    out = (tuple(ids), float(size) ** (1 - len(ids)) if ids else float(size))
    self.memo[r] = out
    return out

  def add(self, coef: float, axes: Iterable[tuple[int, int]]) -> None:
    ids: list[int] = []
    for v, ax in axes:
      got, mult = self.axis(self.maps.node(v, ax))
      ids += got
      coef *= mult
    if coef == 0:
      return
    if ids:
      self.terms[tuple(sorted(ids))] += coef
    else:
      self.constant += coef

  def full(self) -> float:
    return self.constant + sum(
      c * np.prod([len(self.axis_gids[i]) for i in k]) for k, c in self.terms.items()
    )

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


def params_model(program: Program, axes: AxisZigs, num_zigs: int, trainable: Iterable[bool]) -> CostModel:
  """The number of trainable parameters as a function of the kept ZIGs."""
  b = _Builder(axes, num_zigs)
  values = program.values
  for v, t in zip(program.variables, trainable):
    if t:
      b.add(1.0, [(v, ax) for ax in range(len(values.shapes[v]))])
  return b.build('params')


def flops_model(program: Program, axes: AxisZigs, num_zigs: int) -> CostModel:
  """The FLOPs of one call of the analysed program as a function of the kept ZIGs."""
  b = _Builder(axes, num_zigs)
  _terms(b, program, program.steps, 1.0, _flops)
  return b.build('flops')


def bytes_model(program: Program, axes: AxisZigs, num_zigs: int) -> CostModel:
  """Bytes read and written by the equations, each operand and result once (no fusion)."""
  b = _Builder(axes, num_zigs)
  _terms(b, program, program.steps, 1.0, _bytes)
  return b.build('bytes')


def _flops(cx: _Shapes, eqn: Eqn) -> Iterable[CostTerm]:
  return (eqn.entry.cost if eqn.entry is not None else per_output)(cx, eqn)


def _bytes(cx: _Shapes, eqn: Eqn) -> Iterable[CostTerm]:
  dtypes = cx.values.dtypes
  out = []
  for x in (*eqn.ins, *eqn.outs):
    if isinstance(x, int) and dtypes[x] is not None:
      out.append(CostTerm(float(np.dtype(dtypes[x]).itemsize), all_axes(cx, x)))
  return out


def _terms(b: _Builder, program: Program, steps, times: float, rule) -> None:
  cx = _Shapes(program)
  for step in steps:
    if isinstance(step, Eqn):
      for coef, axes in rule(cx, step):
        b.add(coef * times, axes)
    elif isinstance(step, Call):
      # A shard_map body runs on every device of its manual mesh axes, on shards.
      devices = 1
      if step.kind == 'shard_map':
        shape = step.params['mesh'].shape
        devices = math.prod(shape[a] for a in (step.params['axis_names'] or shape))
      _terms(b, program, step.body, times * devices, rule)
    elif isinstance(step, Loop):
      n = 1 if step.length is None else evaluate_dim(step.length, program.signature.env)
      _terms(b, program, step.cond + step.body, times * n, rule)
    else:
      # Each branch on a scratch builder, to keep the most expensive at the full model.
      best, best_cost = None, -1.0
      for br in step.branches:
        trial = _Builder.__new__(_Builder)
        trial.__dict__.update(b.__dict__)
        trial.terms, trial.constant = defaultdict(float), 0.0
        _terms(trial, program, br.steps, times, rule)
        cost = trial.full()
        if cost > best_cost:
          best, best_cost = trial, cost
      if best is not None:
        for k, c in best.terms.items():
          b.terms[k] += c
        b.constant += best.constant
