"""Tracing: the user's function becomes one :class:`~oto_jax.ir.Program`, with a symbolic batch.

The function is traced once with ``jax.make_jaxpr``. Array inputs get symbolic dimensions
(``jax.export`` shape polymorphism): by default the leading dimension of every array input
that has the first input's batch size becomes the dimension variable ``b``, so one program
describes every batch size and the analysis never has to run again. A function that cannot
be traced that way (its code branches on or fixes the batch size) is traced at the given
shapes instead, and the program says why it is fixed to them.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from oto_jax.errors import AnalysisError
from oto_jax.ir import Builder, InputLeaf, Program, Signature, is_symbolic, solve_dim, user_line
from oto_jax.paths import Path, is_array, path_of, path_str

# The default dimension variable of the batch.
BATCH = 'b'


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
  """A traced function: its program and what the analysis needs besides (the output paths)."""

  program: Program
  var_paths: tuple[Path, ...]
  var_leaves: tuple[Any, ...]
  input_paths: tuple[str, ...]
  out_leaves: tuple[tuple[Path, tuple[int, ...]], ...]


def _auto_specs(leaves: Sequence[Any]) -> list[str | None]:
  """``'b, ...'`` for every array whose leading dimension is the first array's; else fixed."""
  arrays = [x for x in leaves if is_array(x) and len(x.shape) > 0]
  if not arrays:
    return [None] * len(leaves)
  batch = arrays[0].shape[0]
  return [
    f'{BATCH}, ...' if is_array(x) and len(x.shape) > 0 and x.shape[0] == batch else None for x in leaves
  ]


def _user_specs(args: tuple, kwargs: dict, spec: Any) -> list[str | None]:
  """Per array leaf of ``(args, kwargs)``: the user's spec for positional inputs, auto for keywords."""
  if isinstance(spec, str):
    spec = (spec,) * len(args)
  spec = tuple(spec)
  if len(spec) != len(args):
    raise AnalysisError(
      f'polymorphic_shapes has {len(spec)} entries for {len(args)} positional inputs; give one shape '
      "spec (like 'b, t') or None per positional input."
    )
  out: list[str | None] = []
  for a, s in zip(args, spec):
    leaves = jax.tree_util.tree_leaves(a)
    out += [s if is_array(x) else None for x in leaves]
  kw = jax.tree_util.tree_leaves(kwargs)
  auto = _auto_specs(jax.tree_util.tree_leaves(args) + kw)
  return out + auto[len(out) :]


@functools.lru_cache(maxsize=64)
def _scope(constraints: tuple[str, ...]) -> Any:
  # One scope per set of constraints for the whole session: dimension variables are then the
  # same objects in every analysis, so the trace caches of the jitted helpers inside a model
  # (nn.relu, …) answer as they do for fixed shapes, instead of tracing them all again.
  return jax.export.SymbolicScope(constraints)


def _symbolic(leaves: list, specs: list[str | None], constraints: Sequence[str]) -> list:
  """The array leaves as ``ShapeDtypeStruct`` s with symbolic dimensions, in one scope."""
  arrays = [x for x in leaves if is_array(x)]
  array_specs = [s for x, s in zip(leaves, specs) if is_array(x)]
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
  try:
    scope = _scope(tuple(constraints))
    return list(jax.export.symbolic_args_specs(abstract, array_specs, scope=scope))
  except ValueError as e:
    raise AnalysisError(f'Bad polymorphic_shapes or polymorphic_constraints: {e}') from e


def _binding(leaves: list, symbolic: list) -> dict[str, int]:
  """The analysed value of every dimension variable, read off the inputs."""
  env: dict[str, int] = {}
  for x, s in zip(leaves, symbolic):
    for n, d in zip(x.shape, s.shape):
      if not is_symbolic(d):
        continue
      hit = solve_dim(d, n)
      if hit is None:
        raise AnalysisError(
          f'polymorphic_shapes: dimension `{d}` cannot be {n}; use a variable (`b`) or a multiple of '
          'one plus a constant (`2*b`, for a batch split over 2 devices), with a length that fits it.'
        )
      name, value = hit
      if env.setdefault(name, value) != value:
        raise AnalysisError(
          f'Dimension variable `{name}` is {env[name]} in one input and {value} in another; inputs '
          'that share a variable must agree on it.'
        )
  return env


def _module_of(apply_fn: Any) -> Any:
  """The linen module of a bound ``module.apply`` (flax is not imported for plain JAX users)."""
  linen = sys.modules.get('flax.linen')
  owner = getattr(apply_fn, '__self__', None)
  return owner if linen is not None and isinstance(owner, linen.Module) else None


def trace(
  apply_fn: Callable[..., Any],
  variables: Any,
  args: tuple,
  kwargs: dict,
  *,
  lookup: Callable[[str], Any],
  polymorphic_shapes: Any = None,
  polymorphic_constraints: Sequence[str] = (),
) -> Traced:
  """Traces ``apply_fn(variables, *args, **kwargs)`` into a program.

  Args:
    apply_fn: the function.
    variables: its variables (arrays or ``ShapeDtypeStruct``).
    args, kwargs: its inputs; non-array leaves are static.
    lookup: the primitive registry for this analysis.
    polymorphic_shapes: None: the batch dimension of every input is symbolic where the
      function allows it (else the program is fixed to the given shapes); False: fixed shapes;
      a ``jax.export`` shape spec per positional input (``'b, t'``) to make other dimensions
      symbolic too (then a function that cannot be traced that way is an error).
    polymorphic_constraints: ``jax.export`` constraints on the dimension variables
      (``('t <= 512',)`` for a model that slices position embeddings to the length).

  Returns:
    A :class:`Traced`.
  """
  var_flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  var_paths = tuple(path_of(p) for p, _ in var_flat)
  for p, (_, x) in zip(var_paths, var_flat):
    if not is_array(x):
      raise AnalysisError(
        f'Variable {path_str(p)} is a {type(x).__name__}, not an array or ShapeDtypeStruct.'
      )
  in_flat, in_tree = jax.tree_util.tree_flatten_with_path((args, kwargs))
  in_leaves = [x for _, x in in_flat]
  traced_mask = [is_array(x) for x in in_leaves]

  def fn(v, traced):
    it = iter(traced)
    leaves = [next(it) if m else x for m, x in zip(traced_mask, in_leaves)]
    a, k = jax.tree_util.tree_unflatten(in_tree, leaves)
    return apply_fn(v, *a, **k)

  arrays = [x for x in in_leaves if is_array(x)]
  concrete = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
  fixed_reason, env = '', {}
  if polymorphic_shapes is False:
    specs = None
    fixed_reason = 'it was analysed with polymorphic_shapes=False'
  elif polymorphic_shapes is None:
    specs = _auto_specs(in_leaves)
  else:
    specs = _user_specs(args, kwargs, polymorphic_shapes)
  if specs is not None and not any(specs):
    specs, fixed_reason = None, 'it has no input with a batch dimension'
  closed = out_shape = None
  if specs is not None:
    symbolic = _symbolic(in_leaves, specs, polymorphic_constraints)
    try:
      closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, symbolic)
      env = _binding(arrays, symbolic)
    except AnalysisError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure under symbolic shapes means "shape-specific"
      if polymorphic_shapes is not None:
        raise AnalysisError(
          f'The function cannot be traced with polymorphic_shapes={polymorphic_shapes!r}: '
          f'{type(e).__name__}: {e}'
        ) from e
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      line = user_line(e.__traceback__)
      fixed_reason = (
        f'tracing it with a symbolic batch size failed{f" at {line}" if line else ""} '
        f'({type(e).__name__}: {first[:300]})'
      )
  if closed is None:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, concrete)

  builder = Builder(lookup, env)
  jaxpr = closed.jaxpr
  invals = [builder.value(v.aval) for v in jaxpr.invars]
  # Tables are what does not depend on the model's inputs: constants, and values computed from
  # the variables (not the variables themselves).
  builder.from_inputs.update(invals[len(var_paths) :])
  steps, outs = builder.walk(jaxpr, list(closed.consts), list(invals))
  values = builder.values()
  var_ids = set(invals[: len(var_paths)])
  shared = frozenset(
    v
    for v, n in builder.table_reads.items()
    if n > 1
    and v not in var_ids
    and all(isinstance(d, int) for d in values.sym(v))
    and any(d > 1 for d in values.sym(v))
  )

  sym_it = iter(v.aval.shape for v in jaxpr.invars[len(var_paths) :])
  leaves = []
  for (p, x), m in zip(in_flat, traced_mask):
    key = jax.tree_util.keystr(p)
    if m:
      leaves.append(InputLeaf(key, False, sym=tuple(next(sym_it)), shape=tuple(x.shape), dtype=x.dtype))
    else:
      leaves.append(InputLeaf(key, True, value=x))
  out_flat = jax.tree_util.tree_flatten_with_path(out_shape)[0]
  program = Program(
    steps=steps,
    values=values,
    consts=builder.consts,
    invars=tuple(invals),
    outs=tuple(outs),
    num_variables=len(var_paths),
    signature=Signature(in_tree, tuple(leaves), env, fixed_reason),
    var_tree=jax.tree_util.tree_structure(variables),
    out_tree=jax.tree_util.tree_structure(out_shape),
    module=_module_of(apply_fn),
    shared_tables=shared,
  )
  return Traced(
    program=program,
    var_paths=var_paths,
    var_leaves=tuple(x for _, x in var_flat),
    input_paths=tuple(jax.tree_util.keystr(p) for (p, _), m in zip(in_flat, traced_mask) if m),
    out_leaves=tuple(
      (path_of(p), builder.shapes[o] if isinstance(o, int) else ()) for (p, _), o in zip(out_flat, outs)
    ),
  )
