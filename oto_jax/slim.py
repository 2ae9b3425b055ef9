"""The slim program: the analysed program with the removed ZIGs sliced out, and its evaluator.

:func:`build` walks the analysed :class:`~oto_jax.ir.Program` once and returns another
``Program`` of the same steps: every value's pruned axes are shorter, every equation that
mentions a width has its parameters rewritten by its registry entry (``rewrite``), and an
equation whose operands are all full-width but whose results are pruned (an ``iota``) is run at
full width and keeps the surviving positions (``Eqn.take``). Shapes stay symbolic where the
analysis made them so: one slim program serves every batch size.

:func:`evaluate` runs a program: it binds the primitives again with the dimension variables
set from the inputs' shapes (numbers under ``jax.jit``, symbols under ``jax.export``), and
rebuilds loops, branches and ``remat`` with ``jax.lax``. Run under :func:`jax.make_jaxpr` at the
symbolic input shapes it also checks every result's shape against the prediction, so an
equation the surgery cannot cut is reported when the subnet is built, not when it is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax.axis_zigs import AxisZigs
from oto_jax.errors import ShapeSpecificError, SurgeryError
from oto_jax.ir import (
  SHARD_MAP_ENTER,
  SHARD_MAP_EXIT,
  Call,
  Cond,
  Eqn,
  InputLeaf,
  Literal,
  Loop,
  Program,
  Values,
  evaluate_dim,
  is_symbolic,
  solve_dim,
)
from oto_jax.paths import input_name


@dataclasses.dataclass(eq=False)
class SlimEqn(Eqn):
  """An equation of a slim program.

  Attributes:
    take: per result, ``((axis, kept positions), …)`` to apply after binding (results that
      are computed at full width); empty for most equations.
  """

  take: tuple = ()


class SlimContext:
  """What a ``rewrite`` rule sees: full and slim shapes, and the kept positions of each axis."""

  def __init__(self, program: Program, axes: AxisZigs, keep: np.ndarray):
    self.program = program
    self.values = program.values
    self.axes = axes
    self.keep = keep
    self._kept: dict[tuple[int, int], np.ndarray | None] = {}

  def shape(self, v: Any) -> tuple[int, ...]:
    """The full shape of ``v`` at the analysed inputs."""
    return () if isinstance(v, Literal) else self.values.shapes[v]

  def full_shape(self, v: Any) -> tuple:
    """The full symbolic shape of ``v``."""
    return () if isinstance(v, Literal) else self.values.sym(v)

  def dtype(self, v: int) -> Any:
    return self.values.dtypes[v]

  def kept(self, v: Any, ax: int) -> np.ndarray | None:
    """The positions of axis ``ax`` of ``v`` that survive, or None when it keeps all."""
    if isinstance(v, Literal):
      return None
    key = (v, ax)
    if key not in self._kept:
      self._kept[key] = self.axes.kept(self.axes.node(v, ax), self.keep)
    return self._kept[key]

  def kept_axes(self, v: int) -> list:
    """:meth:`kept` for every axis of ``v``."""
    return [self.kept(v, ax) for ax in range(len(self.shape(v)))]

  def pruned(self, v: Any) -> bool:
    return not isinstance(v, Literal) and any(
      self.kept(v, ax) is not None for ax in range(len(self.shape(v)))
    )

  def slim_shape(self, v: Any) -> tuple:
    """The slim symbolic shape of ``v``."""
    out = []
    for ax, d in enumerate(self.full_shape(v)):
      k = self.kept(v, ax)
      if k is not None and is_symbolic(d):
        raise SurgeryError(f'internal: a pruned axis of length {d} depends on the input shapes')
      out.append(d if k is None else len(k))
    return tuple(out)

  def slice(self, v: int, x: np.ndarray) -> np.ndarray:
    """A host array of value ``v`` (a variable, a constant) with the removed slices dropped."""
    for ax in range(np.ndim(x)):
      k = self.kept(v, ax)
      if k is not None:
        x = np.take(x, k, axis=ax)
    return x

  def fail(self, eqn: Eqn, why: str) -> None:
    """Raises :class:`SurgeryError` for ``eqn``."""
    raise SurgeryError(
      f'`{eqn.name}` at {eqn.where} cannot be cut for the slim model: {why}. Please report it; its '
      'node groups can be kept out of the subnet with construct_subnet(zig_ids=…).'
    )


def build(program: Program, axes: AxisZigs, keep: np.ndarray) -> tuple[Program, SlimContext]:
  """The slim program for the ZIGs in ``keep`` (a bool mask), and the context that cut it."""
  ctx = SlimContext(program, axes, keep)
  steps = _steps(ctx, program.steps)
  n = len(program.values)
  syms = [ctx.slim_shape(v) for v in range(n)]
  shapes = []
  for v, s in enumerate(syms):
    full = program.values.shapes[v]
    shapes.append(tuple(f if is_symbolic(d) else d for d, f in zip(s, full)))
  values = Values(
    tuple(shapes),
    tuple(None if program.values.syms[v] is None else syms[v] for v in range(n)),
    program.values.dtypes,
  )
  consts = {v: ctx.slice(v, np.asarray(c)) for v, c in program.consts.items()}
  return dataclasses.replace(program, steps=steps, values=values, consts=consts), ctx


def _steps(ctx: SlimContext, steps: tuple) -> tuple:
  out = []
  for s in steps:
    if isinstance(s, Eqn):
      out.append(_eqn(ctx, s))
    elif isinstance(s, Call):
      out.append(dataclasses.replace(s, body=_steps(ctx, s.body)))
    elif isinstance(s, Loop):
      out.append(dataclasses.replace(s, body=_steps(ctx, s.body), cond=_steps(ctx, s.cond)))
    else:
      branches = tuple(dataclasses.replace(b, steps=_steps(ctx, b.steps)) for b in s.branches)
      out.append(dataclasses.replace(s, branches=branches))
  return tuple(out)


def _eqn(ctx: SlimContext, eqn: Eqn) -> SlimEqn:
  base = dict(
    primitive=eqn.primitive,
    ins=eqn.ins,
    outs=eqn.outs,
    entry=eqn.entry,
    zero=eqn.zero,
    source=eqn.source,
    sites=eqn.sites,
    effectful=eqn.effectful,
  )
  if not any(ctx.pruned(a) for a in eqn.ins):
    # Nothing sliced comes in: run as analysed, then keep what survives of the results.
    take = tuple(
      tuple((ax, k) for ax in range(len(ctx.shape(o))) if (k := ctx.kept(o, ax)) is not None)
      for o in eqn.outs
    )
    return SlimEqn(params=eqn.params, take=take if any(take) else (), **base)
  rewrite = eqn.entry.rewrite if eqn.entry is not None else None
  params = eqn.params if rewrite is None else rewrite(ctx, eqn)
  return SlimEqn(params=params, **base)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def bind_inputs(leaves: tuple[InputLeaf, ...], arrays: list, fixed_reason: str) -> dict[str, Any] | None:
  """The dimension variables' values for these input arrays (None: the analysed ones).

  Raises:
    ShapeSpecificError: an input's shape does not fit the program's signature.
  """
  env: dict[str, Any] = {}
  for spec, x in zip(leaves, arrays):
    shape = tuple(np.shape(x))
    ok = len(shape) == len(spec.sym)
    if ok:
      for d, n in zip(spec.sym, shape):
        if is_symbolic(d):
          hit = solve_dim(d, n)
          ok = hit is not None and (env.setdefault(hit[0], hit[1]) is hit[1] or env[hit[0]] == hit[1])
        else:
          ok = (not is_symbolic(n)) and int(n) == int(d)
        if not ok:
          break
    if not ok:
      want = '(' + ', '.join(str(d) for d in spec.sym) + ')'
      why = f' The program is fixed to the analysed shapes because {fixed_reason}.' if fixed_reason else ''
      raise ShapeSpecificError(
        f'Input {input_name(spec.path)} has shape {shape}, but the slim program takes {want}.{why} '
        'Analyse the model at the shapes you need, or give zig_partition polymorphic_shapes to make '
        'that dimension symbolic.'
      )
  return env


def _subst(x: Any, env: Mapping[str, Any]) -> Any:
  if isinstance(x, tuple | list):
    items = [_subst(y, env) for y in x]
    if all(a is b for a, b in zip(items, x)):
      return x
    return type(x)(*items) if hasattr(x, '_fields') else type(x)(items)
  return evaluate_dim(x, env) if is_symbolic(x) else x


class _Run:
  """Evaluates a program's steps; ``check`` compares every result's shape with the program's."""

  def __init__(self, program: Program, env: Mapping[str, Any] | None, check: bool):
    self.program = program
    self.values = program.values
    self.env = env
    self.check = check

  def dtype(self, v: int) -> Any:
    return self.values.dtypes[v]

  def read(self, scope: dict, x: Any) -> Any:
    if isinstance(x, Literal):
      return x.val
    hit = scope.get(x)
    if hit is None:
      hit = scope[x] = self.program.consts[x]
    return hit

  def dims(self, x: Any) -> Any:
    return x if not self.env else _subst(x, self.env)

  def steps(self, steps: tuple, scope: dict) -> None:
    for s in steps:
      if isinstance(s, Eqn):
        self.eqn(s, scope)
      elif isinstance(s, Call):
        self.call(s, scope)
      elif isinstance(s, Loop):
        self.loop(s, scope)
      else:
        self.cond(s, scope)

  def eqn(self, eqn: Eqn, scope: dict) -> None:
    ins = [self.read(scope, a) for a in eqn.ins]
    params = {k: self.dims(v) for k, v in eqn.params.items()} if self.env else eqn.params
    try:
      if eqn.entry is not None and eqn.entry.bind is not None:
        res = eqn.entry.bind(self, eqn, ins, params)
      else:
        res = eqn.primitive.bind(*ins, **params)
        res = list(res) if eqn.primitive.multiple_results else [res]
    except Exception as e:
      if not self.check:
        raise
      raise SurgeryError(
        f'`{eqn.name}` at {eqn.where} does not accept its sliced operands ({type(e).__name__}: {e}); '
        'its registry entry needs a `rewrite` for its parameters. Please report it.'
      ) from e
    for o, r, take in zip(eqn.outs, res, getattr(eqn, 'take', ()) or ((),) * len(eqn.outs)):
      for ax, k in take:
        r = jnp.take(r, jnp.asarray(k), axis=ax)
      if self.check and tuple(np.shape(r)) != self.values.sym(o):
        raise SurgeryError(
          f'`{eqn.name}` at {eqn.where} gave shape {tuple(np.shape(r))} on the slim model where '
          f'{self.values.sym(o)} was expected; oto_jax cannot slice this primitive yet. Please report it.'
        )
      scope[o] = r

  def call(self, call: Call, scope: dict) -> None:
    if call.kind == 'shard_map':
      self.shard_map(call, scope)
      return
    if call.kind not in ('remat', 'remat2', 'checkpoint'):
      self.steps(call.body, scope)
      return
    live = [i for i, x in enumerate(call.ins) if not isinstance(x, Literal)]

    def body(*vals):
      inner = dict(scope)
      inner.update((call.ins[i], v) for i, v in zip(live, vals))
      self.steps(call.body, inner)
      return [self.read(inner, o) for o in call.outs]

    fn = jax.checkpoint(
      body, prevent_cse=call.params.get('prevent_cse', True), policy=call.params.get('policy')
    )
    res = fn(*(self.read(scope, call.ins[i]) for i in live))
    for o, r in zip(call.outs, res):
      if isinstance(o, int):
        scope[o] = r

  def shard_map(self, call: Call, scope: dict) -> None:
    # The body between the edge equations runs on each device's shards, under the same mesh
    # and specs: the slim shards are the full ones with the same positions dropped on every
    # device. Unchecked: the program folded `pvary` of literals into plain literals, which a
    # varying-axes check would refuse (the full model passed it).
    enter, exit_, body_steps = [], [], []
    for s in call.body:
      prim = s.primitive if isinstance(s, Eqn) else None
      (enter if prim is SHARD_MAP_ENTER else exit_ if prim is SHARD_MAP_EXIT else body_steps).append(s)

    def body(*shards):
      inner = dict(scope)
      inner.update((e.outs[0], x) for e, x in zip(enter, shards))
      self.steps(tuple(body_steps), inner)
      return tuple(self.read(inner, e.ins[0]) for e in exit_)

    p = call.params
    mesh = p['mesh']
    manual = p['axis_names']
    fn = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=tuple(e.params['spec'] for e in enter),
      out_specs=tuple(e.params['spec'] for e in exit_),
      axis_names=manual if manual and manual != set(mesh.axis_names) else frozenset(),
      check_vma=False,
    )
    res = fn(*(jnp.asarray(self.read(scope, e.ins[0])) for e in enter))
    for e, r in zip(exit_, res):
      scope[e.outs[0]] = r

  def _cast(self, xs, ids) -> list:
    return [jnp.asarray(x, self.dtype(i)) for x, i in zip(xs, ids)]

  def loop(self, loop: Loop, scope: dict) -> None:
    carries = loop.carries
    inner_ids = [c.inner for c in carries]
    init = self._cast([self.read(scope, c.init) for c in carries], inner_ids)

    def local(carry, x=()):
      inner = dict(scope)
      inner.update(zip(inner_ids, carry))
      inner.update(zip((i for _, i in loop.xs), x))
      return inner

    def carry_out(inner):
      return self._cast([self.read(inner, c.out) for c in carries], inner_ids)

    if loop.kind == 'scan':

      def body_fn(carry, x):
        inner = local(carry, x)
        self.steps(loop.body, inner)
        ys = self._cast([self.read(inner, y) for y, _ in loop.ys], [o for _, o in loop.ys])
        return carry_out(inner), ys

      xs = [self.read(scope, outer) for outer, _ in loop.xs]
      length = self.dims(loop.length)
      final, ys = jax.lax.scan(body_fn, init, xs, length=length, reverse=loop.reverse)
      for (_, outer), y in zip(loop.ys, ys):
        scope[outer] = y
    else:

      def cond_fn(carry):
        inner = local(carry)
        self.steps(loop.cond, inner)
        return self.read(inner, loop.pred)

      def body_fn(carry):
        inner = local(carry)
        self.steps(loop.body, inner)
        return carry_out(inner)

      final = jax.lax.while_loop(cond_fn, body_fn, init)
    for c, f in zip(carries, final):
      scope[c.final] = f

  def cond(self, cond: Cond, scope: dict) -> None:
    def branch(br):
      def fn():
        inner = dict(scope)
        self.steps(br.steps, inner)
        return self._cast([self.read(inner, o) for o in br.outs], cond.outs)

      return fn

    res = jax.lax.switch(jnp.asarray(self.read(scope, cond.index)), [branch(b) for b in cond.branches])
    for o, r in zip(cond.outs, res):
      scope[o] = r


def evaluate(
  program: Program, variables: list, inputs: list, env: Mapping[str, Any] | None, *, check: bool = False
) -> list:
  """Runs ``program`` on variable leaves and input arrays; returns its outputs' leaves.

  Args:
    program: a (slim) program.
    variables: its variables' leaves, in order.
    inputs: its array inputs, in order.
    env: the dimension variables' values (from :func:`bind_inputs`); None or empty: the
      program's own symbols (tracing at its symbolic shapes).
    check: compare every result's shape with the program's value table.
  """
  runner = _Run(program, env, check)
  scope = dict(zip(program.invars, [*variables, *inputs]))
  runner.steps(program.steps, scope)
  return [runner.read(scope, o) for o in program.outs]
