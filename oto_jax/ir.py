"""The typed program: what the analysis records of a traced function, read by every later stage.

The jaxpr of ``apply_fn(variables, *inputs)`` is turned once into a tree of steps over
numbered values:

* :class:`Eqn`: one primitive application, with its registry entry;
* :class:`Call`: a sub-program run in place (``jit``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``remat``); its operands and results are the caller's values. A
  ``shard_map`` is a call whose body works on per-device shards: it starts with one
  :data:`SHARD_MAP_ENTER` equation per operand (the caller's value → the shard the body reads)
  and ends with one :data:`SHARD_MAP_EXIT` per result;
* :class:`Loop`: ``scan`` or ``while``, with its body (and condition);
* :class:`Cond`: ``cond``, with its branches.

Values are ids into :class:`Values`: each value's shape at the analysed inputs, its symbolic
shape when a dimension variable (the batch size) enters it, and its dtype. Operands are value
ids or :class:`Literal` s; closed-over arrays are the program's ``consts``. The structure pass,
the proof, the cost models and the slim program all read this one representation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import numpy as np


class Literal(NamedTuple):
  """A literal operand (a Python scalar baked into the jaxpr)."""

  val: Any


Ref = int | Literal  # an operand: a value id or a literal


# ---------------------------------------------------------------------------------------------
# Symbolic dimensions.


def is_symbolic(d: Any) -> bool:
  """Whether ``d`` is a ``jax.export`` dimension expression (not an int, nor anything else)."""
  return jax.export.is_symbolic_dim(d)


def evaluate_dim(d: Any, env: Mapping[str, Any]) -> Any:
  """A dimension at a binding of its variables: an int, or an expression of other variables."""
  if not is_symbolic(d):
    return int(d)
  # jax.export's own evaluation of a dimension polynomial, the one Exported.call uses; it has
  # no public name.
  return d._evaluate(dict(env))


def evaluate_shape(shape: tuple, env: Mapping[str, Any]) -> tuple:
  return tuple(evaluate_dim(d, env) for d in shape)


_NAME = re.compile(r'[A-Za-z_]\w*')
_DIM_FUNCTIONS = frozenset({'mod', 'floordiv', 'max', 'min', 'non_negative'})


def solve_dim(d: Any, n: Any) -> tuple[str, Any] | None:
  """The binding ``(variable, value)`` that makes dimension ``d`` equal ``n``.

  ``d`` may be a variable or a multiple of one plus a constant (``b``, ``2*b``, ``8*b + 1``: a
  batch that a mesh splits must be a multiple of its devices); ``n`` an int, or a dimension
  expression under ``jax.export``. None when ``d`` has another form or ``n`` does not fit it.
  """
  names = set(_NAME.findall(str(d))) - _DIM_FUNCTIONS
  if len(names) != 1:
    return None
  (v,) = names
  at1, at2, at3 = (evaluate_dim(d, {v: k}) for k in (1, 2, 3))
  a = at2 - at1
  c = at1 - a
  if a <= 0 or at3 != 3 * a + c:
    return None
  if is_symbolic(n):
    return v, (n - c) // a  # jax.export simplifies (2*b) // 2 to b
  n = int(n)
  return (v, (n - c) // a) if (n - c) % a == 0 and n >= c else None


# ---------------------------------------------------------------------------------------------
# Locations.


def _library_dirs() -> tuple[str, ...]:
  out = []
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'oto_jax'):
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, '__file__', None):
      out.append(os.path.dirname(os.path.abspath(mod.__file__)) + os.sep)
  return tuple(out)


def _where_one(source: Any) -> str:
  try:
    name = str(source.name_stack)
    frames = source.traceback.frames if source.traceback is not None else []
  except AttributeError:  # a source info of another jax version: no location rather than a crash
    name, frames = '', []
  skip = _library_dirs()
  pick = next((f for f in frames if not f.file_name.startswith(skip) and '<frozen' not in f.file_name), None)
  loc = f'{os.path.basename(pick.file_name)}:{pick.line_num}' if pick else ''
  return ' '.join(p for p in (f'`{name}`' if name else '', f'({loc})' if loc else '') if p) or '?'


def user_line(tb: Any) -> str:
  """``file.py:12`` of the innermost frame of a Python traceback outside jax, flax and oto_jax."""
  skip = _library_dirs()
  frames = [f for f in traceback.extract_tb(tb) if not os.path.abspath(f.filename).startswith(skip)]
  return f'{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}' if frames else ''


def location(source: Any, sites: tuple = ()) -> str:
  """A short, readable location: module path and user source line.

  An equation of a library's jitted helper (``jnp.sort``) may carry no user frame of its own;
  then the innermost call site that has one stands for it.
  """
  own = _where_one(source)
  if '(' in own:
    return own
  site = next((t for t in map(_where_one, reversed(sites)) if '(' in t), '')
  return f'{own} {site[site.index("(") :]}' if site and own != '?' else site or own


# ---------------------------------------------------------------------------------------------
# Steps.


class _Located:
  """A step's place in the user's code (``source``, ``sites``), formatted on first use."""

  @property
  def where(self) -> str:
    hit = self.__dict__.get('_where')
    if hit is None:
      hit = self.__dict__['_where'] = location(self.source, self.sites)
    return hit


@dataclasses.dataclass(eq=False)
class Eqn(_Located):
  """One primitive application.

  Attributes:
    primitive: the JAX primitive (bound again by the slim program).
    params: its parameters, as traced (shapes may hold dimension expressions).
    ins: operands (value ids or literals).
    outs: result value ids.
    entry: the primitive's :class:`~oto_jax.primitives.PrimitiveEntry`, or None when it has none.
    zero: the entry's :class:`~oto_jax.primitives.Zero` for this equation (None without entry).
    source: JAX's source info of the equation; ``sites`` that of the calls around it.
    effectful: the equation has side effects (a callback, a print): it runs even when
      nothing reads its results.
  """

  primitive: Any
  params: Mapping[str, Any]
  ins: tuple[Ref, ...]
  outs: tuple[int, ...]
  entry: Any
  zero: Any = None
  source: Any = None
  sites: tuple = ()
  effectful: bool = False

  @property
  def name(self) -> str:
    return self.primitive.name


@dataclasses.dataclass(eq=False)
class Call(_Located):
  """A sub-program run in place; ``ins`` and ``outs`` are the caller's values.

  ``kind`` is the call primitive's name; ``params`` keeps what the slim program needs to call
  it the same way (``remat``'s policy).
  """

  kind: str
  params: Mapping[str, Any]
  body: tuple
  ins: tuple[Ref, ...]
  outs: tuple[Ref, ...]
  source: Any = None
  sites: tuple = ()


class Carry(NamedTuple):
  """A loop carry: its initial value, the body's input and output, and the loop's result."""

  init: Ref
  inner: int
  out: Ref
  final: int


@dataclasses.dataclass(eq=False)
class Loop(_Located):
  """``scan`` (``kind='scan'``, ``length``, ``reverse``) or ``while`` (``cond``, ``pred``).

  The body's constants are the caller's values, used in place. ``xs`` pairs each scanned
  operand with the body's per-iteration value; ``ys`` each body output with the stacked result.
  """

  kind: str
  body: tuple
  carries: tuple[Carry, ...]
  xs: tuple[tuple[Ref, int], ...] = ()
  ys: tuple[tuple[Ref, int], ...] = ()
  length: Any = None
  reverse: bool = False
  cond: tuple = ()
  pred: Ref | None = None
  source: Any = None
  sites: tuple = ()


@dataclasses.dataclass(eq=False)
class Branch:
  steps: tuple
  outs: tuple[Ref, ...]


@dataclasses.dataclass(eq=False)
class Cond(_Located):
  """``cond``: ``index`` picks a branch; branches read the caller's values in place."""

  index: Ref
  branches: tuple[Branch, ...]
  outs: tuple[int, ...]
  source: Any = None
  sites: tuple = ()


Step = Eqn | Call | Loop | Cond


def iter_eqns(steps: tuple) -> Iterator[Eqn]:
  """Every equation under ``steps``, in program order (through calls, loops and branches)."""
  for s in steps:
    if isinstance(s, Eqn):
      yield s
    elif isinstance(s, Call):
      yield from iter_eqns(s.body)
    elif isinstance(s, Loop):
      yield from iter_eqns(s.cond)
      yield from iter_eqns(s.body)
    else:
      for b in s.branches:
        yield from iter_eqns(b.steps)


def map_eqns(steps: tuple, fn: Callable[[Eqn], Eqn]) -> tuple:
  """``steps`` with every equation ``e`` under them replaced by ``fn(e)`` (through calls, loops
  and branches); the other steps are copied, never modified."""

  def walk(steps):
    out = []
    for s in steps:
      if isinstance(s, Eqn):
        out.append(fn(s))
      elif isinstance(s, Call):
        out.append(dataclasses.replace(s, body=walk(s.body)))
      elif isinstance(s, Loop):
        out.append(dataclasses.replace(s, cond=walk(s.cond), body=walk(s.body)))
      else:
        out.append(
          dataclasses.replace(
            s, branches=tuple(dataclasses.replace(b, steps=walk(b.steps)) for b in s.branches)
          )
        )
    return tuple(out)

  return walk(steps)


# ---------------------------------------------------------------------------------------------
# The program.


@dataclasses.dataclass(frozen=True, eq=False)
class Values:
  """Per value id: shape at the analysed inputs, symbolic shape (None: same), dtype."""

  shapes: tuple[tuple[int, ...], ...]
  syms: tuple[tuple | None, ...]
  dtypes: tuple[Any, ...]

  def __len__(self) -> int:
    return len(self.shapes)

  def sym(self, v: int) -> tuple:
    s = self.syms[v]
    return self.shapes[v] if s is None else s


@dataclasses.dataclass(frozen=True, eq=False)
class InputLeaf:
  """One leaf of the analysed ``(args, kwargs)``: an array input, or a static value."""

  path: str
  static: bool
  value: Any = None  # static value
  sym: tuple = ()  # array: symbolic shape (ints where fixed)
  shape: tuple = ()  # array: shape at the analysed inputs
  dtype: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class Signature:
  """What the program accepts: the input tree, each leaf's shape, and its dimension variables.

  Attributes:
    treedef: the structure of ``(args, kwargs)``.
    leaves: one :class:`InputLeaf` per leaf.
    env: the analysed value of each dimension variable (``{'b': 2}``); empty when the
      program is fixed to the analysed shapes.
    fixed_reason: why the program is fixed to those shapes ('' when it is not).
  """

  treedef: Any
  leaves: tuple[InputLeaf, ...]
  env: Mapping[str, int]
  fixed_reason: str = ''

  @property
  def arrays(self) -> tuple[InputLeaf, ...]:
    return tuple(x for x in self.leaves if not x.static)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """The analysed program.

  Attributes:
    steps: the top-level steps.
    values: the value table.
    consts: value id → array, for the closed-over constants of the program and its sub-programs.
    invars: value ids of the variables' leaves, then of the array inputs.
    outs: the outputs' operands, in ``out_tree`` order.
    num_variables: how many of ``invars`` are variables.
    signature: the inputs it accepts.
    var_tree: the variables' structure; ``out_tree`` the outputs'.
    module: the linen module whose ``apply`` was analysed, if it was one (for
      :attr:`Subnet.module`).
    shared_tables: values of fixed shape that do not depend on the model's inputs (computed
      from constants and variables) and that two or more equations read (see
      :mod:`oto_jax.sharing`).
  """

  steps: tuple
  values: Values
  consts: Mapping[int, Any]
  invars: tuple[int, ...]
  outs: tuple[Ref, ...]
  num_variables: int
  signature: Signature
  var_tree: Any
  out_tree: Any
  module: Any = None
  shared_tables: frozenset = frozenset()

  @property
  def variables(self) -> tuple[int, ...]:
    return self.invars[: self.num_variables]

  @property
  def inputs(self) -> tuple[int, ...]:
    return self.invars[self.num_variables :]


# ---------------------------------------------------------------------------------------------
# From a jaxpr.

_CALL_KEYS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')

# The edges of a shard_map body, as equations: the global value and its per-device shard are
# different values (different shapes) that the structure pass ties together by the
# operand's `spec` (a PartitionSpec over `mesh`). The slim program never binds them: it
# rebuilds the shard_map around the body.
SHARD_MAP_ENTER = jex.core.Primitive('shard_map_enter')
SHARD_MAP_EXIT = jex.core.Primitive('shard_map_exit')


def _sub_jaxpr(eqn) -> tuple[Any, list] | None:
  """The sub-program of a call-like primitive (jit, custom_jvp/vjp, remat), if it has one."""
  for key in _CALL_KEYS:
    sub = eqn.params.get(key)
    if isinstance(sub, jex.core.ClosedJaxpr):
      inner, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jex.core.Jaxpr):
      inner, consts = sub, []
    else:
      continue
    if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
      return inner, consts
  return None


class Builder:
  """Turns a closed jaxpr into steps and a value table.

  Args:
    lookup: ``lookup(primitive_name) -> entry or None`` (the registry, with per-call rules).
    env: the analysed value of each dimension variable.
  """

  def __init__(self, lookup: Callable[[str], Any], env: Mapping[str, int]):
    self.lookup = lookup
    self.env = env
    self.shapes: list[tuple[int, ...]] = []
    self.syms: list[tuple | None] = []
    self.dtypes: list[Any] = []
    self.consts: dict[int, Any] = {}
    self._concrete: dict[tuple, tuple[int, ...]] = {}
    # Values that may depend on what the caller seeds it with (the model's inputs), and how
    # many equations read each of the others: such a table read twice is shared.
    self.from_inputs: set[int] = set()
    self.table_reads: Counter = Counter()

  def value(self, aval: Any) -> int:
    shape = getattr(aval, 'shape', ())
    if type(shape) is not tuple:
      shape = tuple(shape)
    hit = self._concrete.get(shape)
    if hit is None:
      if all(isinstance(d, int) for d in shape):
        hit = shape
      else:
        hit = evaluate_shape(shape, self.env)
        if any(is_symbolic(d) for d in hit):
          raise AssertionError(f'internal: dimension variables of {shape} are not all bound by {self.env}')
      self._concrete[shape] = hit
    self.shapes.append(hit)
    self.syms.append(None if hit is shape else shape)
    self.dtypes.append(getattr(aval, 'dtype', None))
    return len(self.shapes) - 1

  def values(self) -> Values:
    return Values(tuple(self.shapes), tuple(self.syms), tuple(self.dtypes))

  def walk(self, jaxpr: Any, consts: list, ins: list, sites: tuple = ()) -> tuple[tuple, list]:
    """Steps of ``jaxpr`` applied to operands ``ins``; returns them and its result operands."""
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.value(v.aval)
      self.consts[env[v]] = c
    for v, x in zip(jaxpr.invars, ins):
      env[v] = x
    steps: list = []
    jax_literal, lookup, value = jex.core.Literal, self.lookup, self.value
    from_inputs, table_reads = self.from_inputs, self.table_reads

    def read(x):
      return Literal(x.val) if isinstance(x, jax_literal) else env[x]

    for eqn in jaxpr.eqns:
      args = [read(x) for x in eqn.invars]
      name = eqn.primitive.name
      entry = lookup(name)
      if name == 'scan':
        outs = self._scan(eqn, args, steps, sites)
      elif name == 'while':
        outs = self._while(eqn, args, steps, sites)
      elif name == 'cond':
        outs = self._cond(eqn, args, steps, sites)
      elif name == 'shard_map':
        outs = self._shard_map(eqn, args, steps, sites)
      elif entry is None and (sub := _sub_jaxpr(eqn)) is not None:
        body, outs = self.walk(sub[0], sub[1], args, (*sites, eqn.source_info))
        params = {k: v for k, v in eqn.params.items() if k in ('policy', 'prevent_cse')}
        steps.append(Call(name, params, body, tuple(args), tuple(outs), eqn.source_info, sites))
      elif (
        entry is not None
        and entry.moves is not None
        and isinstance(args[0], Literal)
        and not eqn.outvars[0].aval.shape
      ):
        # A cast of a literal (jnp.clip's bounds inside its jit) is still that literal, in the
        # new dtype.
        outs = [Literal(np.asarray(args[0].val, dtype=eqn.outvars[0].aval.dtype))]
      else:
        outs = [value(v.aval) for v in eqn.outvars]
        tainted = False
        for a in args:
          if type(a) is int:
            if a in from_inputs:
              tainted = True
            else:
              table_reads[a] += 1
        if tainted:
          from_inputs.update(outs)
        step = Eqn(
          eqn.primitive,
          eqn.params,
          tuple(args),
          tuple(outs),
          entry,
          None,
          eqn.source_info,
          sites,
          bool(eqn.effects),
        )
        if entry is not None:
          zero = entry.zero
          step.zero = zero(step) if callable(zero) else zero
        steps.append(step)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return tuple(steps), [read(v) for v in jaxpr.outvars]

  def _scan(self, eqn, args, steps, sites) -> list:
    p = eqn.params
    closed, n_consts, n_carry = p['jaxpr'], p['num_consts'], p['num_carry']
    body = closed.jaxpr
    consts, init, xs = args[:n_consts], args[n_consts : n_consts + n_carry], args[n_consts + n_carry :]
    c_in = [self.value(v.aval) for v in body.invars[n_consts : n_consts + n_carry]]
    x_in = [self.value(v.aval) for v in body.invars[n_consts + n_carry :]]
    self._taint(args, c_in + x_in)
    here = (*sites, eqn.source_info)
    body_steps, outs = self.walk(body, list(closed.consts), consts + c_in + x_in, here)
    final = [self.value(v.aval) for v in eqn.outvars[:n_carry]]
    ys = [self.value(v.aval) for v in eqn.outvars[n_carry:]]
    self._taint(args, final + ys)
    carries = tuple(Carry(*c) for c in zip(init, c_in, outs[:n_carry], final))
    steps.append(
      Loop(
        'scan',
        body_steps,
        carries,
        xs=tuple(zip(xs, x_in)),
        ys=tuple(zip(outs[n_carry:], ys)),
        length=p['length'],
        reverse=bool(p['reverse']),
        source=eqn.source_info,
        sites=sites,
      )
    )
    return final + ys

  def _while(self, eqn, args, steps, sites) -> list:
    p = eqn.params
    nc, nb = p['cond_nconsts'], p['body_nconsts']
    cconsts, bconsts, init = args[:nc], args[nc : nc + nb], args[nc + nb :]
    body, cond = p['body_jaxpr'], p['cond_jaxpr']
    c_in = [self.value(v.aval) for v in body.jaxpr.invars[nb:]]
    self._taint(args, c_in)
    here = (*sites, eqn.source_info)
    cond_steps, (pred,) = self.walk(cond.jaxpr, list(cond.consts), cconsts + c_in, here)
    body_steps, outs = self.walk(body.jaxpr, list(body.consts), bconsts + c_in, here)
    final = [self.value(v.aval) for v in eqn.outvars]
    self._taint(args, final)
    carries = tuple(Carry(*c) for c in zip(init, c_in, outs, final))
    steps.append(
      Loop('while', body_steps, carries, cond=cond_steps, pred=pred, source=eqn.source_info, sites=sites)
    )
    return final

  def _cond(self, eqn, args, steps, sites) -> list:
    here = (*sites, eqn.source_info)
    branches = []
    for br in eqn.params['branches']:
      br_steps, br_outs = self.walk(br.jaxpr, list(br.consts), args[1:], here)
      branches.append(Branch(br_steps, tuple(br_outs)))
    outs = [self.value(v.aval) for v in eqn.outvars]
    self._taint(args, outs)
    steps.append(Cond(args[0], tuple(branches), tuple(outs), eqn.source_info, sites))
    return outs

  def _shard_map(self, eqn, args, steps, sites) -> list:
    p = eqn.params
    jaxpr = p['jaxpr']
    jaxpr, consts = (
      (jaxpr.jaxpr, list(jaxpr.consts)) if isinstance(jaxpr, jex.core.ClosedJaxpr) else (jaxpr, [])
    )
    here = (*sites, eqn.source_info)

    def edge(prim, x, out, spec):
      entry = self.lookup(prim.name)
      params = {'spec': spec, 'mesh': p['mesh']}
      return Eqn(prim, params, (x,), (out,), entry, entry.zero, eqn.source_info, here)

    shards = [self.value(v.aval) for v in jaxpr.invars]
    self._taint(args, shards)
    enter = [edge(SHARD_MAP_ENTER, x, s, spec) for x, s, spec in zip(args, shards, p['in_specs'])]
    body, results = self.walk(jaxpr, consts, shards, here)
    outs = [self.value(v.aval) for v in eqn.outvars]
    self._taint(args, outs)
    exit_ = [edge(SHARD_MAP_EXIT, r, o, spec) for r, o, spec in zip(results, outs, p['out_specs'])]
    # A shard is its global value read in pieces: its reads count as the global value's (so
    # that a variable's shard is never taken for a shared table).
    for x, shard in zip(args, shards):
      if type(x) is int:
        self.table_reads[x] += self.table_reads.pop(shard, 0)
    params = {
      'mesh': p['mesh'],
      'check_vma': p.get('check_vma', p.get('check_rep', True)),
      'axis_names': frozenset(p.get('newly_manual_axes', p.get('manual_axes', ()))),
    }
    steps.append(
      Call('shard_map', params, (*enter, *body, *exit_), tuple(args), tuple(outs), eqn.source_info, sites)
    )
    return outs

  def _taint(self, args: list, defined: list) -> None:
    # A loop or branch that reads nothing from the inputs computes nothing from them; one that
    # does may make anything it defines depend on them.
    if any(type(a) is int and a in self.from_inputs for a in args):
      self.from_inputs.update(defined)


def shape_of(values: Values, x: Ref) -> tuple[int, ...]:
  return () if isinstance(x, Literal) else values.shapes[x]


def dtype_of(values: Values, x: Ref) -> Any:
  return np.asarray(x.val).dtype if isinstance(x, Literal) else values.dtypes[x]


def abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
