"""The registry entry type: everything oto_jax knows about one primitive, in one place.

An entry has four parts, each read by one stage:

* ``structure(ctx, eqn)``: the structure pass. It unites the axes that carry the same channels
  (``ctx.unite``), declares layouts (``ctx.assign``, ``ctx.reshape``) and blocks axes that can
  never be pruned (``ctx.block_axis``). See :class:`oto_jax.structure.StructureContext`.
* ``zero``: the proof. A :class:`Zero` (or ``zero(eqn) -> Zero``) saying how a zero channel
  slice travels from the operands to the results.
* ``cost(ctx, eqn)``: the cost models. The equation's FLOPs as :class:`CostTerm` s, each a
  coefficient times a product of axis lengths, so that the count follows the kept widths.
* ``rewrite(ctx, eqn)``: the slim program. The equation's parameters for the sliced operands
  (``None``: the parameters do not mention widths). See :class:`oto_jax.slim.SlimContext`.

Two optional parts: ``moves(ctx, eqn)`` for primitives that only move operand 0's data
(where each of its axes lands in the result: reshapes, transposes, casts), which lets the
analysis see through them to a variable's real consumer; and ``bind(ctx, eqn, ins, params)`` for a
primitive the slim program cannot simply bind again (``ctx`` is the slim program's
:class:`~oto_jax.slim.SlimContext`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from oto_jax.ir import Eqn, Literal


class Zero(NamedTuple):
  """How a channel slice that is zero in operands becomes zero in the outputs.

  Attributes:
    kind: ``'keep'``: an output slice is zero when every listed operand that carries the
      channel is zero on it (layout ops, zero-preserving unary ops: ``f(0) = 0``).
      ``'all'``: zero when every listed operand is zero on it (``add``, ``max``); a literal
      counts as zero when ``literal_ok(value)``. ``'any'``: zero when some listed operand is
      (``mul``, a contraction's free and batch axes). ``'none'``: never zero (``exp``,
      ``logistic``, ``iota``).
    operands: positions of the operands that matter (default: all).
    literal_ok: for ``'all'``: which literal values keep a zero (default ``x == 0``).
    contract: for contractions and sums, the contracted axes of each operand from operand 0 on
      (``(lhs_axes, rhs_axes)`` for ``dot_general``, ``(axes,)`` for ``reduce_sum``): the
      proof requires some operand to be zero on each contracted channel.
    results: positions of the results the rule speaks for (default: all); the others are
      never zero (``top_k``: its values keep a zero row's zeros, its indices do not).
  """

  kind: str
  operands: Sequence[int] | None = None
  literal_ok: Callable[[Any], bool] | None = None
  contract: tuple[Sequence[int], ...] | None = None
  results: Sequence[int] | None = None


KEEP, NONE = Zero('keep'), Zero('none')


class CostTerm(NamedTuple):
  """``coef × Π len(axis)`` over ``axes``, each a ``(value id, axis)`` of the equation."""

  coef: float
  axes: tuple[tuple[int, int], ...]


def all_axes(ctx: Any, v: Any) -> tuple[tuple[int, int], ...]:
  """Every ``(value, axis)`` of ``v`` (none for a literal)."""
  if isinstance(v, Literal):
    return ()
  return tuple((v, ax) for ax in range(len(ctx.shape(v))))


def per_output(ctx: Any, eqn: Eqn) -> Iterable[CostTerm]:
  """One FLOP per output element (element-wise arithmetic)."""
  return [CostTerm(1.0, all_axes(ctx, o)) for o in eqn.outs]


def per_input(ctx: Any, eqn: Eqn) -> Iterable[CostTerm]:
  """One FLOP per element of operand 0 (reductions, scans, windows)."""
  return [CostTerm(1.0, all_axes(ctx, eqn.ins[0]))] if not isinstance(eqn.ins[0], Literal) else []


def free(ctx: Any, eqn: Eqn) -> Iterable[CostTerm]:
  """No arithmetic: the primitive only moves, relabels or generates data."""
  return ()


def same_axes(ctx: Any, eqn: Eqn) -> tuple[tuple[int, ...], ...]:
  """``moves`` of a primitive whose result has operand 0's axes (a cast)."""
  return tuple((ax,) for ax in range(len(ctx.shape(eqn.ins[0]))))


Structure = Callable[[Any, Eqn], None]
Rewrite = Callable[[Any, Eqn], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class PrimitiveEntry:
  """What oto_jax knows about one primitive: structure, zeros, cost and slim rewrite.

  Attributes:
    structure: ``structure(ctx, eqn)``: unites, lays out and blocks axes.
    zero: a :class:`Zero`, or ``zero(eqn) -> Zero`` when it depends on the parameters.
    cost: ``cost(ctx, eqn) -> [CostTerm]``: FLOPs as functions of axis lengths; default
      :func:`per_output`.
    rewrite: ``rewrite(ctx, eqn) -> params`` for the slim program; None keeps the parameters.
    moves: for pure data movement of operand 0, ``moves(ctx, eqn)`` gives, per operand axis,
      the result axes it lands on.
    bind: ``bind(ctx, eqn, ins, params) -> [results]`` when binding the primitive again is not
      how the slim program computes it.

  Example::

    scale_p = jax.extend.core.Primitive('scale')  # x * 2, shape-preserving
    entry = oto_jax.elementwise(oto_jax.Zero('keep'))
    oto_jax.zig_partition(fn, variables, x, rules={'scale': entry})  # this call only
    oto_jax.register_primitive('scale', entry)                     # the whole session
  """

  structure: Structure
  zero: Zero | Callable[[Eqn], Zero]
  cost: Callable[[Any, Eqn], Iterable[CostTerm]] = per_output
  rewrite: Rewrite | None = None
  moves: Callable[[Any, Eqn], tuple[tuple[int, ...], ...]] | None = None
  bind: Callable[[Any, Eqn, list, dict], list] | None = None

  def replace(self, **changes: Any) -> PrimitiveEntry:
    """A copy with some parts changed (``entry.replace(cost=oto_jax.primitives.free)``)."""
    return dataclasses.replace(self, **changes)


def elementwise(zero: Zero, *, cost: Callable[[Any, Eqn], Iterable[CostTerm]] = per_output) -> PrimitiveEntry:
  """The entry of an n-ary element-wise primitive with the given zero behaviour.

  Operands of the output's rank are aligned axis by axis; size-1 axes broadcast and carry no
  channel identity. The parameters never mention a width, so the slim program binds it as is.

  Args:
    zero: how a zero channel propagates (``Zero('keep')`` when ``f(0) = 0``).
    cost: its FLOPs (default: one per output element).

  Returns:
    A :class:`PrimitiveEntry`.
  """
  return PrimitiveEntry(structure=align_elementwise, zero=zero, cost=cost)


def align_elementwise(ctx: Any, eqn: Eqn) -> None:
  """Unites every operand axis with the output axis at the same position (same length > 1)."""
  shape, unite = ctx.shape, ctx.unite
  for out in eqn.outs:
    oshape = shape(out)
    for x in eqn.ins:
      if type(x) is not int:  # a literal
        continue
      xshape = shape(x)
      if len(xshape) != len(oshape):
        continue
      for ax, a in enumerate(xshape):
        if a > 1 and a == oshape[ax]:
          unite(x, ax, out, ax)


def blocked(reason: str, *, cost: Callable[[Any, Eqn], Iterable[CostTerm]] = per_output) -> PrimitiveEntry:
  """An entry that blocks every axis it touches, with ``reason`` (a primitive known to mix channels)."""

  def structure(ctx, eqn):
    ctx.block_all(list(eqn.ins) + list(eqn.outs), reason, eqn)

  return PrimitiveEntry(structure=structure, zero=NONE, cost=cost)
