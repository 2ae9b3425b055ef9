"""Subnet construction: slice the removed ZIGs out of every variable and out of the program.

The slim model is not rebuilt from module attributes. :func:`construct_subnet` cuts the
analysed program itself (:mod:`oto_jax.slim`): every shape parameter that carries a pruned
width is rewritten by its primitive's registry entry, so widths the model's code hard-codes
(``reshape(..., num_heads, head_dim)``) follow, and the batch stays symbolic, so the one slim
program runs at every batch size. The program is traced once at construction and every
equation's result shape is checked, so a primitive the surgery cannot cut is reported then.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import budgets, checks, native, slicing, slim
from oto_jax.budgets import Budget
from oto_jax.errors import ShapeSpecificError, SurgeryError
from oto_jax.ir import Program
from oto_jax.partition import ZIGPartition
from oto_jax.paths import Path, input_name, path_of, path_str
from oto_jax.tuning import Tuning


@dataclasses.dataclass(frozen=True, eq=False)
class SubnetReport:
  """Full vs slim cost of a :class:`Subnet`.

  Attributes:
    flops: (full, slim) FLOPs of one call at the analysed input shapes.
    params: (full, slim) trainable parameters.
    widths: per prunable node group: (where, full width, slim width).
  """

  flops: tuple[float, float]
  params: tuple[float, float]
  widths: tuple[tuple[str, int, int], ...]

  def to_dict(self) -> dict:
    return {
      'flops_full': self.flops[0],
      'flops_slim': self.flops[1],
      'flops_remaining': self.flops[1] / max(self.flops[0], 1.0),
      'params_full': self.params[0],
      'params_slim': self.params[1],
      'params_remaining': self.params[1] / max(self.params[0], 1.0),
      'widths': [{'where': w, 'full': a, 'slim': b} for w, a, b in self.widths],
    }

  def markdown(self) -> str:
    f, p = self.flops, self.params
    lines = [
      '| | full | slim | remaining |',
      '|---|---|---|---|',
      f'| FLOPs | {f[0]:,.0f} | {f[1]:,.0f} | {100 * f[1] / max(f[0], 1):.1f}% |',
      f'| parameters | {p[0]:,.0f} | {p[1]:,.0f} | {100 * p[1] / max(p[0], 1):.1f}% |',
      '',
      '| node group | full width | slim width |',
      '|---|---|---|',
    ]
    lines += [f'| {w} | {a} | {b} |' for w, a, b in self.widths]
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.markdown()


@dataclasses.dataclass(frozen=True, eq=False)
class Subnet:
  """The slim model: the full model with the removed ZIGs sliced out.

  Attributes:
    partition: the full model's partition.
    keep: bool ``[num_zigs]``: the ZIGs that remain.
    variables: the slim variables (every collection sliced).
    program: the slim :class:`~oto_jax.ir.Program` that :meth:`apply` runs.
    jaxpr: the slim program as a closed jaxpr, at the program's (symbolic) input shapes.
    tuning: what :func:`oto_jax.deploy_subnet` measured and chose (``tune_inputs``), or None.
  """

  partition: ZIGPartition
  keep: np.ndarray
  variables: Any
  program: Program = dataclasses.field(repr=False)
  jaxpr: Any = dataclasses.field(repr=False)
  _cut: slim.SlimContext = dataclasses.field(repr=False)
  _call: Callable = dataclasses.field(repr=False)
  tuning: Tuning | None = dataclasses.field(default=None, repr=False)

  @property
  def compiler_options(self) -> dict[str, Any]:
    """The XLA options :meth:`apply` compiles with (``{}``: XLA's defaults): chosen by
    :func:`oto_jax.deploy_subnet` with ``tune_inputs``. Under your own ``jax.jit``, pass them:
    ``jax.jit(subnet.apply, compiler_options=subnet.compiler_options)``."""
    return dict(self.tuning.compiler_options) if self.tuning is not None else {}

  @property
  def removed_zig_ids(self) -> np.ndarray:
    return np.nonzero(~self.keep)[0]

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs the slim model: ``apply_fn(zeroed_full_variables, *args, **kwargs)``, only smaller.

    Pure, jit-able and differentiable, and compiled (``jax.jit``) even when called eagerly, then
    with :attr:`compiler_options`. Any batch size runs the same slim program, without
    analysing the model again.

    Args:
      variables: slim variables shaped like :attr:`variables`.
      *args: the model inputs, as for the original ``apply_fn`` (any batch size).
      **kwargs: its keyword arguments; static ones must be those it was analysed with.

    Returns:
      The outputs of the original ``apply_fn``, with the same structure.

    Raises:
      ShapeSpecificError: the inputs do not fit the analysed signature (another static
        argument, another non-batch dimension, or another batch size for a function that
        could only be analysed at fixed shapes).
    """
    leaves = self._variable_leaves(variables)
    arrays = self._input_arrays(args, kwargs)
    sig = self.program.signature
    slim.bind_inputs(sig.arrays, arrays, sig.fixed_reason)  # report bad shapes here, not inside jit
    outs = self._call(leaves, arrays)
    return jax.tree_util.tree_unflatten(self.program.out_tree, outs)

  def _variable_leaves(self, variables: Any) -> list:
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    want_tree = jax.tree_util.tree_structure(self.variables)
    if treedef != want_tree:
      raise ValueError(f'variables have structure {treedef}; the subnet expects {want_tree}.')
    shapes = self.program.values.shapes
    leaves = []
    for (path, leaf), v in zip(flat, self.program.variables):
      if tuple(np.shape(leaf)) != shapes[v]:
        raise ValueError(
          f'Variable {path_str(path_of(path))} has shape {tuple(np.shape(leaf))}, but the subnet '
          f'expects {shapes[v]}. Pass subnet.variables (or a tree sliced with subnet.slice_like).'
        )
      leaves.append(leaf)
    return leaves

  def _input_arrays(self, args: tuple, kwargs: dict) -> list:
    sig = self.program.signature
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    if treedef != sig.treedef:
      raise ShapeSpecificError(
        f'The inputs have structure {treedef}, but the model was analysed with {sig.treedef}; '
        'call the subnet with inputs like the analysed ones.'
      )
    arrays = []
    for spec, x in zip(sig.leaves, leaves):
      if not spec.static:
        arrays.append(x)
        continue
      try:
        same = bool(x == spec.value)
      except Exception:  # noqa: BLE001 - values that cannot be compared are different
        same = x is spec.value
      if not same:
        raise ShapeSpecificError(
          f'Static argument {input_name(spec.path)} is {x!r}, but the model was analysed with '
          f'{spec.value!r}: the slim program is specific to the static arguments. Analyse the model '
          'with the arguments you need (oto_jax.zig_partition) and cut it with the same ZIGs.'
        )
    return arrays

  @property
  def module(self) -> Any:
    """The linen module, with standard layers at the slim widths: ``module.apply(variables, x)``.

    Raises :class:`~oto_jax.NativeUnavailable` (with the reason) when the partition was not
    built from ``module.apply`` or the module's code fixes a width.
    """
    return native.linen_module(self)

  def nnx_model(self, graphdef: Any) -> Any:
    """A new NNX module graph with the slim variables and widths (see :mod:`oto_jax.native`).

    Args:
      graphdef: the NNX model's graphdef, or the model (not modified).
    """
    return native.nnx_model(self, graphdef)

  def slice_like(self, tree: Any) -> Any:
    """Slices any tree shaped like the full variables or a collection of them.

    Leaves are matched to variables by path suffix and shape (optax moments, EMA weights,
    gradients); other leaves (step counts) pass unchanged. Nothing passed in is modified.

    Args:
      tree: e.g. an optax state built on the full params.

    Returns:
      The same structure, with every matched leaf sliced like its variable.
    """
    return _slice_tree(self._cut, self.partition, tree)

  def report(self) -> SubnetReport:
    """Full vs slim FLOPs, parameters and per-node-group widths."""
    return _report(self.partition, self.keep)


def _report(part: ZIGPartition, keep: np.ndarray) -> SubnetReport:
  widths = tuple(
    (part.producer(g), g.size, int(keep[g.zig_offset : g.zig_offset + g.size].sum()))
    for g in part.prunable_groups
  )
  return SubnetReport(
    flops=(part.flops.total, part.flops.evaluate(keep)),
    params=(part.params.total, part.params.evaluate(keep)),
    widths=widths,
  )


def _slice_tree(cut: slim.SlimContext, part: ZIGPartition, tree: Any) -> Any:
  variables = part.program.variables
  by_suffix: dict[Path, list[int]] = {}
  for k, path in enumerate(part.variable_paths):
    for s in range(len(path)):
      by_suffix.setdefault(path[s:], []).append(k)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves, kept = [], []
  for key, leaf in flat:
    path = path_of(key)
    hit = None
    for s in range(len(path)):  # longest suffix first
      cands = [k for k in by_suffix.get(path[s:], []) if tuple(np.shape(leaf)) == part.variable_shapes[k]]
      if len(cands) == 1:
        hit = cands[0]
        break
    leaves.append(leaf)
    kept.append([None] * np.ndim(leaf) if hit is None else cut.kept_axes(variables[hit]))
  return jax.tree_util.tree_unflatten(treedef, slicing.cut_leaves(leaves, kept))


def construct_subnet(
  partition: ZIGPartition,
  variables: Any,
  *,
  zig_ids: Any = None,
  allow_nonfinite: bool = False,
  group_divisible: int = 1,
) -> Subnet:
  """Removes the zero ZIGs (or the given ones) and returns the slim model.

  .. math::
    \\text{subnet.apply}(\\theta_{\\setminus G}, x) = f(x;\\ \\theta \\odot \\mathbb{1}_{\\bar G})

  Every collection is sliced (params, batch statistics, any other): members and dependents
  along the axes that carry the removed channels, through flattens, concatenations, whole
  attention heads, grouped and depthwise convolutions and tied weights. A node group whose
  ZIGs would all go keeps its first one (a zero channel), so the slim model never has an
  empty layer.

  Args:
    partition: the full model's partition (from :func:`oto_jax.zig_partition`).
    variables: the full variables, as analysed (after group-sparse training).
    zig_ids: ZIGs to remove, integer ids or a boolean mask of shape ``[num_zigs]``
      (:meth:`ZIGPartition.zig_mask`); default: every ZIG whose member entries are all
      exactly zero.
    allow_nonfinite: by default a NaN or inf anywhere in ``variables`` is an error (a
      diverged run); with True, every ZIG with a non-finite member or dependent entry is
      kept (zeroed channels times NaN weights are NaN in the full model too), with a warning
      for those ``zig_ids`` asked to remove.
    group_divisible: keep every node group's width a multiple of this, by keeping back removed
      ZIGs (zeroed, so the slim model computes the same): a convolution at 36 channels can be
      faster than at 33 (``experiments/bench_subnet.py`` measures it). Widths only grow, up to
      the group's full width.

  Returns:
    A :class:`Subnet`. Nothing passed in is modified.

  Raises:
    SurgeryError: an equation of the program cannot be cut (named, with its location), or
      a variable holds NaN or inf (unless ``allow_nonfinite``).
    ValueError: bad ``zig_ids``, or variables that are not the analysed ones.

  Example::

    subnet = oto_jax.construct_subnet(part, trained_variables)
    y = jax.jit(subnet.apply)(subnet.variables, x)
    print(subnet.report())

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), section 3.3.
  """
  partition._program()
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = tuple(path_of(p) for p, _ in flat)
  if paths != partition.variable_paths:
    raise ValueError(
      'construct_subnet needs the full variables the partition was built from (all collections); '
      f'got leaves {[path_str(p) for p in paths[:3]]}…, '
      f'expected {[path_str(p) for p in partition.variable_paths[:3]]}….'
    )
  for (p, leaf), want in zip(flat, partition.variable_shapes):
    if tuple(np.shape(leaf)) != want:
      raise ValueError(f'Variable {path_str(path_of(p))} has shape {tuple(np.shape(leaf))}, expected {want}.')
  leaves = [leaf for _, leaf in flat]
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    raise ValueError('construct_subnet builds a program: call it outside jax.jit, on concrete variables.')
  drop = None if zig_ids is None else partition.zig_mask(zig_ids)
  if isinstance(drop, jax.core.Tracer):
    raise ValueError('construct_subnet cuts outside jit: zig_ids cannot be traced (call it outside jit).')
  tainted = _nonfinite_zigs(partition, flat)
  if tainted is not None and not allow_nonfinite:
    raise SurgeryError(
      f'Variable {tainted[1]} holds NaN or inf: a slim model cut from it need not compute what the full '
      'model computes. Fix the training (or restore a good checkpoint), or pass allow_nonfinite=True to '
      'keep every ZIG whose entries are not finite.'
    )
  if drop is None:
    # `== 0`, not `<= 0`: a NaN norm is not a zero ZIG. The norms are computed where the
    # variables are (NumPy for host-like leaves; one compiled program on devices), and only
    # this vector comes to the host.
    if all(slicing.on_host(x) for x in leaves):
      norms = partition.zig_norms(jax.tree.map(np.asarray, variables))
    else:
      norms = jax.jit(partition.zig_norms)(variables)
    drop = np.asarray(norms) == 0
  if tainted is not None:
    kept_anyway = drop & tainted[0]
    if kept_anyway.any():
      ids = np.flatnonzero(kept_anyway)
      warnings.warn(
        f'construct_subnet keeps {ids.size} ZIG(s) asked to go ({ids[:5].tolist()}…): their entries '
        'are not finite (allow_nonfinite=True).',
        stacklevel=2,
      )
    drop = drop & ~tainted[0]
  keep = _complete(partition, ~np.asarray(drop, bool))
  checks.at_least_one('group_divisible', group_divisible)
  if isinstance(group_divisible, jax.core.Tracer):
    raise ValueError('construct_subnet cuts outside jit: group_divisible cannot be traced.')
  back = _round_up(partition, keep, int(group_divisible))
  if back.any():
    # Kept back, so zeroed: the slim model stays the full model with every `zig_ids` zeroed.
    zeroed = jax.jit(partition.zero)(jax.tree_util.tree_unflatten(treedef, leaves), back)
    leaves, keep = jax.tree_util.tree_leaves(zeroed), keep | back
  return _make(partition, keep, leaves, sliced=False)


def _round_up(partition: ZIGPartition, keep: np.ndarray, multiple: int) -> np.ndarray:
  """The removed ZIGs to keep back so that every node group keeps a multiple of ``multiple``
  (or all of its ZIGs), the first ones of each group."""
  back = np.zeros_like(keep)
  for g in partition.prunable_groups:
    mine = keep[g.zig_offset : g.zig_offset + g.size]
    want = min(g.size, -(-int(mine.sum()) // multiple) * multiple)
    gone = np.flatnonzero(~mine)[: want - int(mine.sum())]
    back[g.zig_offset + gone] = True
  return back


def _finite_along(x: Any, axis: int | None) -> np.ndarray:
  """Whether every entry of ``x`` is finite (per position of ``axis``), computed where ``x``
  lives: only the answer comes to the host."""
  # Host-like leaves (NumPy, one CPU device) with NumPy: eager device ops would compile per shape.
  xp = np if slicing.on_host(x) else jnp
  ok = xp.isfinite(np.asarray(x) if xp is np else x)
  ok = ok.all() if axis is None else ok.all(axis=tuple(a for a in range(x.ndim) if a != axis))
  return np.asarray(ok)


def _nonfinite_zigs(partition: ZIGPartition, flat: list) -> tuple[np.ndarray, str] | None:
  """(the ZIGs with a non-finite member or dependent entry, the first such leaf), or None."""
  inexact = [(p, x) for p, x in flat if np.issubdtype(x.dtype, np.inexact)]
  bad_leaf = next((path_str(path_of(p)) for p, x in inexact if not _finite_along(x, None)), None)
  if bad_leaf is None:
    return None
  by_path = {path_of(p): x for p, x in inexact}
  tainted = np.zeros((partition.num_zigs,), bool)
  for g in partition.prunable_groups:
    for e in g.members + g.dependents:
      x = by_path.get(e.path)
      if x is None:
        continue
      hit = e.index[~_finite_along(x, e.axis) & (e.index >= 0)]
      tainted[hit + g.zig_offset] = True
  return tainted, bad_leaf


def _complete(partition: ZIGPartition, keep: np.ndarray) -> np.ndarray:
  """A node group whose ZIGs would all go keeps its first one (a zero channel)."""
  keep = np.array(keep, bool)
  for g in partition.prunable_groups:
    if not keep[g.zig_offset : g.zig_offset + g.size].any():
      keep[g.zig_offset] = True
  return keep


def _make(partition: ZIGPartition, keep: np.ndarray, leaves: list, *, sliced: bool) -> Subnet:
  keep = _complete(partition, keep)
  prog = partition._program()
  slim_prog, cut = slim.build(prog, partition.axes, keep)
  given = {id(x) for x in leaves}
  if sliced:
    leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for x in leaves]
  else:
    leaves = slicing.cut_leaves(leaves, [cut.kept_axes(v) for v in prog.variables])
  shapes = slim_prog.values.shapes
  for path, v, leaf in zip(partition.variable_paths, prog.variables, leaves):
    if tuple(np.shape(leaf)) != shapes[v]:
      raise ValueError(
        f'Slim variable {path_str(path)} has shape {tuple(np.shape(leaf))}, expected {shapes[v]}.'
      )
  # Host leaves go to the default device; the caller's own NumPy arrays as copies (on CPU,
  # device_put may alias a NumPy buffer). Arrays stay where slicing left them.
  leaves = [
    jax.device_put(np.array(x) if id(x) in given else x) if isinstance(x, np.ndarray) else x for x in leaves
  ]
  variables = jax.tree_util.tree_unflatten(prog.var_tree, leaves)
  return subnet_of(partition, keep, variables, slim_prog, cut)


def subnet_of(
  partition: ZIGPartition,
  keep: np.ndarray,
  variables: Any,
  program: Program,
  cut: slim.SlimContext,
  tuning: Tuning | None = None,
) -> Subnet:
  """The :class:`Subnet` that runs ``program`` (a slim program, or one transformed from it),
  compiled with ``tuning``'s XLA options when given."""
  sig = program.signature

  def run(leaves: list, arrays: list) -> list:
    env = slim.bind_inputs(sig.arrays, arrays, sig.fixed_reason)
    return [jnp.asarray(o) for o in slim.evaluate(program, leaves, arrays, env)]

  # One trace at the program's own (symbolic) input shapes checks every equation's result.
  values = program.values
  var_specs = [jax.ShapeDtypeStruct(values.shapes[v], values.dtypes[v]) for v in program.variables]
  in_specs = [jax.ShapeDtypeStruct(x.sym, x.dtype) for x in sig.arrays]
  jaxpr = jax.make_jaxpr(lambda v, a: slim.evaluate(program, v, a, None, check=True))(var_specs, in_specs)
  call = plain = jax.jit(run)
  if tuning is not None and tuning.compiler_options:
    tuned = jax.jit(run, compiler_options=dict(tuning.compiler_options))

    def call(leaves: list, arrays: list) -> list:
      # XLA options apply to a top-level jit only: inside the caller's jit (or vmap, grad) the
      # program is traced into theirs, whose options govern.
      traced = any(isinstance(x, jax.core.Tracer) for x in (*leaves, *arrays))
      return (plain if traced else tuned)(leaves, arrays)

  return Subnet(partition, keep, variables, program, jaxpr, cut, call, tuning)


@dataclasses.dataclass(frozen=True, eq=False)
class SubnetPlan:
  """A slim model planned without weights (:func:`plan_subnet`).

  Attributes:
    keep: bool ``[num_zigs]``: the ZIGs that remain.
    variables: the slim variables as ``jax.ShapeDtypeStruct`` s, with the slim shardings when
      the full variables had shardings.
    report: full vs slim FLOPs, parameters and widths.
  """

  keep: np.ndarray
  variables: Any
  report: SubnetReport


def plan_subnet(
  partition: ZIGPartition, variables: Any = None, *, zig_ids: Any = None, budget: Budget | None = None
) -> SubnetPlan:
  """The slim model's shapes, shardings, FLOPs and parameters, without its weights.

  .. math::
    \\text{keep} = \\arg\\max_{K} |K| \\ \\text{s.t.}\\ \\text{cost}(K) \\le \\text{fraction}
    \\cdot \\text{cost}(\\text{all}),\\quad \\text{the same share removed from every node group}

  Plans a pruning on a laptop for a model that does not fit it: analyse it with abstract
  variables (``jax.eval_shape`` of its init), then ask what a keep mask or a budget gives.
  A budget removes the same share of every node group (the first ZIGs of each, as no weights
  say which matter) until the FLOPs or parameters fit; each group keeps one ZIG at least.

  Args:
    partition: the full model's partition.
    variables: the full variables (``jax.ShapeDtypeStruct`` s or arrays), for their dtypes
      and shardings; default: the analysed shapes and dtypes, without shardings.
    zig_ids: the ZIGs to remove (ids or a boolean mask, :meth:`ZIGPartition.zig_mask`).
    budget: instead, what the slim model must meet (:func:`oto_jax.flops_budget`,
      :func:`oto_jax.params_budget`, or a ZIG count); one it cannot meet (what no ZIG
      carries stays) gives the smallest slim model, with a warning.

  Returns:
    A :class:`SubnetPlan`; its ``variables`` have the shapes :func:`construct_subnet` gives.

  Example::

    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    part = oto_jax.zig_partition(model.apply, abstract, tokens)
    plan = oto_jax.plan_subnet(part, abstract, budget=oto_jax.flops_budget(0.5))
    print(plan.report)

  References:
    Chen et al., *OTOv3: Automatic Architecture-Agnostic Neural Network Training and
    Compression from Structured Pruning to Erasing Operators* (arXiv 2312.09411), section 4.
  """
  if zig_ids is not None and budget is not None:
    raise ValueError('plan_subnet takes zig_ids or a budget, not both.')
  n = partition.num_zigs
  if budget is not None:
    of_zig, starts, sizes = budgets.group_layout(partition)
    # Position within the group over its size: every group is cut at the same share.
    key = jnp.asarray((np.arange(n) - starts[of_zig] + 0.5) / np.maximum(sizes[of_zig], 1), jnp.float32)
    allowed = budgets.eligible(partition, key, min_keep=1)
    removed = budgets.select(budget, partition, key, jnp.zeros(n, bool), allowed, jnp.float32(1.0))
    drop = np.asarray(removed)
    if budget.kind != 'zigs':
      model = partition.flops if budget.kind == 'flops' else partition.params
      least = model.evaluate(~drop)
      if least > float(budget.fraction) * model.total * (1 + 1e-6):
        warnings.warn(
          f'plan_subnet cannot meet the {budget.kind} budget of {float(budget.fraction):.1%}: with one '
          f'ZIG left in every node group the slim model keeps {least / model.total:.1%}.',
          stacklevel=2,
        )
  else:
    drop = np.zeros(n, bool) if zig_ids is None else partition.zig_mask(zig_ids)
  keep = _complete(partition, ~np.asarray(drop, bool))
  prog = partition._program()
  _, cut = slim.build(prog, partition.axes, keep)
  if variables is None:
    full = [
      jax.ShapeDtypeStruct(s, prog.values.dtypes[v])
      for s, v in zip(partition.variable_shapes, prog.variables)
    ]
  else:
    full = [
      x
      if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))
      for x in jax.tree_util.tree_leaves(variables)
    ]
    if len(full) != len(prog.variables):
      raise ValueError(
        f'plan_subnet got {len(full)} variable leaves; the partition has {len(prog.variables)}.'
      )
  slim_leaves = slicing.cut_leaves(full, [cut.kept_axes(v) for v in prog.variables])
  return SubnetPlan(keep, jax.tree_util.tree_unflatten(prog.var_tree, slim_leaves), _report(partition, keep))


def construct_subnet_from_keep(partition: ZIGPartition, keep: np.ndarray, slim_leaves: list) -> Subnet:
  """A :class:`Subnet` from a keep mask and already-sliced variable leaves (restoring one)."""
  return _make(partition, np.asarray(keep, bool), list(slim_leaves), sliced=True)
