"""Shared tables: one copy per reader, so a value computed once does not couple its readers.

A table computed once and read by several layers — an ALiBi bias from its slopes and the
token distances, T5's relative-position bias gathered from its trainable table, a position
table — would unite the channel axes of all its readers: head ``h`` of every layer would be
one ZIG, though pruning head ``h`` of one layer alone is exact. Before the structure pass,
each read of such a table gets its own ``copy`` equation whose entry couples nothing, so every
layer's heads are their own node group.

The table itself is kept whole: its axes are blocked (for T5, the trainable table is then a
dependent of no ZIG and stays at full width), the slim program computes it once, and each copy
keeps the positions its reader keeps (the evaluator's ``take`` of a result whose operands are
whole). Keeping the union of the readers' positions instead would leave every layer with the
widest layer's heads; one slice per reader costs a gather of a small table.

A table is a value of fixed shape (no axis follows a dimension variable such as the batch)
that does not depend on the model's inputs and is not itself a variable: activations and
weights shared between layers are left alone.
"""

from __future__ import annotations

import dataclasses

import jax.extend as jex

from oto_jax.ir import SHARD_MAP_ENTER, Branch, Call, Eqn, Loop, Program, Values
from oto_jax.primitives.entry import NONE, PrimitiveEntry, free


def _keep_whole(ctx, eqn) -> None:
  """The copy's axes are its own (the reader's channels are not the table's); the table's are
  blocked, so that nothing slices it before the copies do."""
  ctx.block_all([eqn.ins[0]], 'a table read by several equations: kept whole, sliced for each', eqn)


# A copy that couples nothing, is never zero (the table is kept whole) and costs no FLOPs; the
# slim program binds `copy` at full width and keeps its reader's positions.
FORK = PrimitiveEntry(_keep_whole, NONE, cost=free)


def fork_shared_tables(program: Program) -> Program:
  """``program`` with a coupling-free ``copy`` before each read of a shared table.

  Args:
    program: the traced program.

  Returns:
    The same program, or a new one with the copies (their values appended to the table).
  """
  shared = program.shared_tables
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
      new = s
      if isinstance(s, Eqn):
        # A shard_map's edge only splits the table into shards: it is not a reader.
        if s.primitive is not SHARD_MAP_ENTER and any(type(x) is int and x in shared for x in s.ins):
          ins = []
          for x in s.ins:
            if type(x) is int and x in shared:
              c = copy_of(x)
              out.append(Eqn(jex.core.primitives.copy_p, {}, (x,), (c,), FORK, NONE, s.source, s.sites))
              x = c
            ins.append(x)
          new = dataclasses.replace(s, ins=tuple(ins))
      elif isinstance(s, Call):
        body = rewrite(s.body)
        if body is not s.body:
          new = dataclasses.replace(s, body=body)
      elif isinstance(s, Loop):
        body, cond = rewrite(s.body), rewrite(s.cond)
        if body is not s.body or cond is not s.cond:
          new = dataclasses.replace(s, body=body, cond=cond)
      else:
        branches = tuple(Branch(rewrite(b.steps), b.outs) for b in s.branches)
        if any(n.steps is not b.steps for n, b in zip(branches, s.branches)):
          new = dataclasses.replace(s, branches=branches)
      out.append(new)
    return tuple(out) if len(out) != len(steps) or any(n is not s for n, s in zip(out, steps)) else steps

  steps = rewrite(program.steps)
  values = Values(tuple(shapes), tuple(syms), tuple(dtypes))
  # The copies are the tables' readers now: forking again changes nothing.
  return dataclasses.replace(program, steps=steps, values=values, shared_tables=frozenset())
