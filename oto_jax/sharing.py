"""Shared constants: one copy per consumer, so a value computed once does not couple its readers.

A value computed only from constants (an ALiBi bias from its slopes and the token distances,
a sinusoidal position table) and read by several layers would unite the channel axes of all
of them: head ``h`` of every layer would be one ZIG, though pruning head ``h`` of one layer
alone is exact. Before the structure pass, each such read gets its own ``copy`` equation whose
entry couples nothing, so every layer's heads are their own node group.

The shared value itself is never pruned (no member produces it): the slim program computes it
once at full width, and each copy keeps the positions its consumer keeps (the evaluator's
``take`` of a result whose operands are whole). Keeping the union instead would leave every
layer with the widest layer's heads; one slice per consumer costs a gather of a constant, which
XLA folds.

Values that depend on a variable or a model input are left alone: a trainable table shared by
the layers (T5's relative-position bias) is a member of their heads' ZIGs and still couples
them.
"""

from __future__ import annotations

import dataclasses

import jax.extend as jex

from oto_jax.ir import Branch, Call, Eqn, Loop, Program, Values
from oto_jax.primitives.entry import NONE, PrimitiveEntry, free


def _no_structure(ctx, eqn) -> None:
  """The copy's axes are its own: the consumer's channels are not the shared value's."""


# A copy that couples nothing, never holds a zero (no member produces the value) and costs no
# FLOPs; the slim program binds `copy` at full width and keeps its consumer's positions.
FORK = PrimitiveEntry(_no_structure, NONE, cost=free)


def fork_shared_constants(program: Program) -> Program:
  """``program`` with a coupling-free ``copy`` before each read of a shared constant value.

  A value is forked when it depends on no variable and no model input, is a table (no axis
  follows a dimension variable such as the batch; one that does is per-example data), has an
  axis longer than one, and is read by two or more equations.

  Args:
    program: the traced program.

  Returns:
    The same program, or a new one with the copies (their values appended to the table).
  """
  shared = program.shared_constants
  if not shared:
    return program
  vals = program.values
  shapes, syms, dtypes = list(vals.shapes), list(vals.syms), list(vals.dtypes)

  def copy_of(v: int) -> int:
    shapes.append(shapes[v])
    syms.append(syms[v])
    dtypes.append(dtypes[v])
    return len(shapes) - 1

  def rewrite(steps: tuple) -> tuple:
    """The steps with the copies in; the same tuple when none of them reads a shared value."""
    out = []
    for s in steps:
      if isinstance(s, Eqn):
        if any(type(x) is int and x in shared for x in s.ins):
          ins = []
          for x in s.ins:
            if type(x) is int and x in shared:
              c = copy_of(x)
              out.append(Eqn(jex.core.primitives.copy_p, {}, (x,), (c,), FORK, NONE, s.source, s.sites))
              x = c
            ins.append(x)
          s = dataclasses.replace(s, ins=tuple(ins))
      elif isinstance(s, Call):
        body = rewrite(s.body)
        s = s if body is s.body else dataclasses.replace(s, body=body)
      elif isinstance(s, Loop):
        body, cond = rewrite(s.body), rewrite(s.cond)
        s = s if body is s.body and cond is s.cond else dataclasses.replace(s, body=body, cond=cond)
      else:
        branches = tuple(Branch(rewrite(b.steps), b.outs) for b in s.branches)
        if any(n.steps is not b.steps for n, b in zip(branches, s.branches)):
          s = dataclasses.replace(s, branches=branches)
      out.append(s)
    return tuple(out) if len(out) != len(steps) or any(a is not b for a, b in zip(out, steps)) else steps

  steps = rewrite(program.steps)
  values = Values(tuple(shapes), tuple(syms), tuple(dtypes))
  # The copies are the program's shared constants' readers now: forking again changes nothing.
  return dataclasses.replace(program, steps=steps, values=values, shared_constants=frozenset())
