"""Subnet construction: slice the removed ZIGs out of every variable and of the program itself.

The slim model is not rebuilt from module attributes: the analysed program is re-run with
every value's pruned axes sliced, rewriting the shape parameters of the equations that carry
them (reshape, broadcast, split, slice, pad, gather, grouped convolutions). Widths that the
model's code hard-codes (``reshape(..., num_heads, head_dim)``) follow automatically, and
every equation's output shape is checked against the shape the analysis predicts, so a
primitive this module cannot rewrite fails loudly instead of computing something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import costs, native
from oto_jax.analysis import input_signature, where, zig_partition
from oto_jax.partition import Path, ZIGPartition, path_of, path_str
from oto_jax.rules import Literal


class SurgeryError(RuntimeError):
  """An equation of the program could not be run on sliced inputs."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Which slices of every value of one analysed program survive."""

  partition: ZIGPartition
  keep: np.ndarray

  def kept(self, v: int, ax: int) -> np.ndarray | None:
    return costs.axis_maps(self.partition).kept(self.partition.program.ctx.dims[v][ax], self.keep)

  def slim_shape(self, v: int) -> tuple[int, ...]:
    shape = self.partition.program.ctx.shapes[v]
    out = []
    for ax, n in enumerate(shape):
      k = self.kept(v, ax)
      out.append(n if k is None else len(k))
    return tuple(out)

  def pruned(self, v: Any) -> bool:
    if isinstance(v, Literal):
      return False
    return any(self.kept(v, ax) is not None for ax in range(len(self.partition.program.ctx.shapes[v])))

  def slice(self, v: int, x: Any) -> Any:
    for ax in range(np.ndim(x)):
      k = self.kept(v, ax)
      if k is not None:
        x = jnp.take(x, jnp.asarray(k), axis=ax) if not isinstance(x, np.ndarray) else np.take(x, k, axis=ax)
    return x


def _bind(eqn, ins, params):
  out = eqn.primitive.bind(*ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class _Runner:
  """Runs a program's recorded steps on sliced values."""

  def __init__(self, plan: _Plan):
    self.plan = plan
    self.prog = plan.partition.program
    self.ctx = self.prog.ctx

  def read(self, env: dict, x: Any) -> Any:
    if isinstance(x, Literal):
      return x.val
    hit = env.get(x)
    if hit is None and x in self.ctx.consts:
      hit = env[x] = self.plan.slice(x, np.asarray(self.ctx.consts[x]))
    return hit

  def run(self, leaves: list) -> list:
    env = dict(zip(self.prog.invars, leaves))
    self.steps(self.prog.steps, env)
    return [self.read(env, o) for o in self.prog.outvals]

  def steps(self, steps, env: dict) -> None:
    for step in steps:
      if step[0] == 'eqn':
        self.eqn(step, env)
      elif step[0] == 'loop':
        self.loop(step, env)
      else:
        self.cond(step, env)

  def eqn(self, step, env: dict) -> None:
    _, eqn, args, outs, _, sites = step
    plan = self.plan
    ins = [self.read(env, a) for a in args]
    if not any(plan.pruned(a) for a in args):
      # Nothing sliced comes in: run as analysed, then slice what goes out.
      res = [plan.slice(o, r) for o, r in zip(outs, _bind(eqn, ins, eqn.params))]
    else:
      res = _bind(eqn, ins, self.params(eqn, args, outs, ins, sites))
    for o, r in zip(outs, res):
      want = plan.slim_shape(o)
      if tuple(np.shape(r)) != want:
        raise SurgeryError(
          f'`{eqn.primitive.name}` at {where(eqn, sites)} gave shape {tuple(np.shape(r))} on the slim '
          f'model where {want} was expected; oto_jax cannot slice this primitive yet. Please report it.'
        )
      env[o] = r

  def params(self, eqn, args, outs, ins, sites) -> dict:
    """The equation's parameters for sliced inputs."""
    plan, name, p = self.plan, eqn.primitive.name, dict(eqn.params)
    if name == 'reshape':
      p['new_sizes'] = plan.slim_shape(outs[0])
      p['dimensions'] = None
    elif name == 'broadcast_in_dim':
      p['shape'] = plan.slim_shape(outs[0])
    elif name == 'split':
      p['sizes'] = tuple(plan.slim_shape(o)[p['axis']] for o in outs)
    elif name in ('gather', 'dynamic_slice'):
      full, slim = self.ctx.shapes[args[0]], np.shape(ins[0])
      p['slice_sizes'] = tuple(
        s if s != f else n for s, f, n in zip(p['slice_sizes'], full, slim, strict=True)
      )
    elif name == 'conv_general_dilated':
      dn = p['dimension_numbers']
      for key, lhs_ax, rhs_ax in (('feature_group_count', dn.lhs_spec[1], dn.rhs_spec[1]),):
        if p[key] > 1:
          p[key] = int(np.shape(ins[0])[lhs_ax] // np.shape(ins[1])[rhs_ax])
    elif name == 'slice':
      return self.slice_params(eqn, args, outs, ins, sites, p)
    elif name == 'pad':
      cfg = list(p['padding_config'])
      for ax in range(len(cfg)):
        if plan.kept(args[0], ax) is not None and cfg[ax][2] != 0:
          raise SurgeryError(f'interior padding of a pruned axis at {where(eqn, sites)} cannot be sliced.')
    return p

  def slice_params(self, eqn, args, outs, ins, sites, p) -> dict:
    # A slice of a pruned axis keeps the input positions its kept outputs came from; they
    # must be an arithmetic run in the slim input.
    starts, limits = list(p['start_indices']), list(p['limit_indices'])
    strides = list(p['strides'] or (1,) * len(starts))
    for ax in range(len(starts)):
      k_in = self.plan.kept(args[0], ax)
      if k_in is None:
        continue
      k_out = self.plan.kept(outs[0], ax)
      n_out = self.ctx.shapes[outs[0]][ax]
      src = starts[ax] + strides[ax] * (np.arange(n_out) if k_out is None else k_out)
      pos = np.searchsorted(k_in, src)
      if len(pos) == 0:
        starts[ax] = limits[ax] = 0
        strides[ax] = 1
        continue
      step = int(pos[1] - pos[0]) if len(pos) > 1 else 1
      ok = np.all(pos < len(k_in)) and np.array_equal(k_in[np.minimum(pos, len(k_in) - 1)], src)
      if not ok or step < 1 or not np.array_equal(pos, pos[0] + step * np.arange(len(pos))):
        raise SurgeryError(f'slice at {where(eqn, sites)} does not map onto a run of the slim input.')
      starts[ax], limits[ax], strides[ax] = int(pos[0]), int(pos[-1]) + 1, step
    p.update(start_indices=tuple(starts), limit_indices=tuple(limits), strides=tuple(strides))
    return p

  def loop(self, step, env: dict) -> None:
    _, body, carries, xs, ys, info = step
    init = [jnp.asarray(self.read(env, c[0])) for c in carries]

    def local(carry, x=()):
      scope = dict(env)
      scope.update(zip((c[1] for c in carries), carry))
      scope.update(zip((inner for _, inner in xs), x))
      return scope

    def out(scope, ids, like):
      return [jnp.asarray(self.read(scope, i), dtype=jnp.result_type(t)) for i, t in zip(ids, like)]

    if info['kind'] == 'scan':

      def body_fn(carry, x):
        scope = local(carry, x)
        self.steps(body, scope)
        new = out(scope, [c[2] for c in carries], carry)
        ys_out = [jnp.asarray(self.read(scope, y_in)) for y_in, _ in ys]
        return new, ys_out

      xs_vals = [jnp.asarray(self.read(env, outer)) for outer, _ in xs]
      final, ys_vals = jax.lax.scan(body_fn, init, xs_vals, length=info['length'], reverse=info['reverse'])
      for (_, y_outer), y in zip(ys, ys_vals):
        env[y_outer] = y
    else:

      def cond_fn(carry):
        scope = local(carry)
        self.steps(info['cond_steps'], scope)
        return self.read(scope, info['pred'])

      def loop_fn(carry):
        scope = local(carry)
        self.steps(info['body_steps'], scope)
        return out(scope, [c[2] for c in carries], carry)

      final = jax.lax.while_loop(cond_fn, loop_fn, init)
    for c, f in zip(carries, final):
      env[c[3]] = f

  def cond(self, step, env: dict) -> None:
    _, branches, outs, index = step

    def branch(br_steps, br_outs):
      def fn():
        scope = dict(env)
        self.steps(br_steps, scope)
        return [jnp.asarray(self.read(scope, o)) for o in br_outs]

      return fn

    res = jax.lax.switch(jnp.asarray(self.read(env, index)), [branch(*b) for b in branches])
    for o, r in zip(outs, res):
      env[o] = r


def _group_key(group) -> tuple:
  return tuple(sorted((e.path, e.axis) for e in group.members))


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
  """

  partition: ZIGPartition
  keep: np.ndarray
  variables: Any
  _abstract: Any = dataclasses.field(repr=False)
  _plans: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def removed_zig_ids(self) -> np.ndarray:
    return np.nonzero(~self.keep)[0]

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs the slim model: ``apply_fn(zeroed_full_variables, *args, **kwargs)``, only smaller.

    Pure, jit-able and differentiable. Inputs of other shapes than the analysed ones (another
    batch size) re-analyse the function once for that shape (cached).

    Args:
      variables: slim variables shaped like :attr:`variables`.
      *args: the model inputs, as for the original ``apply_fn``.
      **kwargs: its keyword arguments; non-array values are static.

    Returns:
      The outputs of the original ``apply_fn``, with the same structure.
    """
    plan = self._plan(args, kwargs)
    prog = plan.partition.program
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    want_tree = jax.tree_util.tree_structure(self.variables)
    if treedef != want_tree:
      raise ValueError(f'variables have structure {treedef}; the subnet expects {want_tree}.')
    leaves = []
    for (path, leaf), v in zip(flat, prog.invars[: prog.num_variables]):
      want = plan.slim_shape(v)
      if tuple(np.shape(leaf)) != want:
        raise ValueError(
          f'Variable {path_str(path_of(path))} has shape {tuple(np.shape(leaf))}, but the subnet '
          f'expects {want}. Pass subnet.variables (or a tree sliced with subnet.slice_like).'
        )
      leaves.append(leaf)
    leaves += [x for x in jax.tree_util.tree_leaves((args, kwargs)) if _is_array(x)]
    outs = [jnp.asarray(o) for o in _Runner(plan).run(leaves)]
    return jax.tree_util.tree_unflatten(prog.out_tree, outs)

  def _plan(self, args: tuple, kwargs: dict) -> _Plan:
    sig = input_signature(args, kwargs)
    hit = self._plans.get(sig)
    if hit is not None:
      return hit
    prog = self.partition.program
    abstract_in = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if _is_array(x) else x, (args, kwargs)
    )
    part = zig_partition(
      prog.apply_fn,
      self._abstract,
      *abstract_in[0],
      trainable=prog.trainable,
      rules=prog.rules,
      **abstract_in[1],
    )
    keep = np.ones((part.num_zigs,), bool)
    theirs = {_group_key(g): g for g in part.prunable_groups}
    for g in self.partition.prunable_groups:
      mine = self.keep[g.zig_offset : g.zig_offset + g.size]
      if mine.all():
        continue
      other = theirs.get(_group_key(g))
      if other is None or other.size != g.size:
        raise SurgeryError(
          f'At input signature {sig[1]}, node group at {g.where} is not prunable the way it was when '
          'the subnet was built; the slim model cannot run at these shapes.'
        )
      keep[other.zig_offset : other.zig_offset + other.size] = mine
    plan = self._plans[sig] = _Plan(part, keep)
    return plan

  @property
  def module(self) -> Any:
    """The linen module, with standard layers at the slim widths: ``module.apply(variables, x)``.

    Raises :class:`~oto_jax.native.NativeUnavailable` (with the reason) when the partition
    was not built from ``module.apply`` or the module's code fixes a width.
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
    plan = self._plans[self.partition.program.signature]
    return _slice_tree(plan, tree)

  def report(self) -> SubnetReport:
    """Full vs slim FLOPs, parameters and per-node-group widths."""
    part, keep = self.partition, self.keep
    widths = tuple(
      (g.where, g.size, int(keep[g.zig_offset : g.zig_offset + g.size].sum())) for g in part.prunable_groups
    )
    return SubnetReport(
      flops=(part.flops.total, part.flops.evaluate(keep)),
      params=(part.params.total, part.params.evaluate(keep)),
      widths=widths,
    )


def _slice_tree(plan: _Plan, tree: Any) -> Any:
  part = plan.partition
  prog = part.program
  by_suffix: dict[Path, list[int]] = {}
  for k, path in enumerate(part.variable_paths):
    for s in range(len(path)):
      by_suffix.setdefault(path[s:], []).append(k)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for key, leaf in flat:
    path = path_of(key)
    hit = None
    for s in range(len(path)):  # longest suffix first
      cands = [k for k in by_suffix.get(path[s:], []) if tuple(np.shape(leaf)) == part.variable_shapes[k]]
      if len(cands) == 1:
        hit = cands[0]
        break
    out.append(leaf if hit is None else plan.slice(prog.invars[hit], leaf))
  return jax.tree_util.tree_unflatten(treedef, out)


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def construct_subnet(partition: ZIGPartition, variables: Any, *, zig_ids: Any = None) -> Subnet:
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
    zig_ids: ZIGs to remove; default: every ZIG whose member entries are all exactly zero.

  Returns:
    A :class:`Subnet`. Nothing passed in is modified.

  Example::

    subnet = oto_jax.construct_subnet(part, trained_variables)
    y = jax.jit(subnet.apply)(subnet.variables, x)
    print(subnet.report())

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), section 3.3.
  """
  prog = partition.program
  if prog is None:
    raise ValueError('This partition carries no program; build it with oto_jax.zig_partition.')
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
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
  n = partition.num_zigs
  # All of the slicing happens on host copies: no device dispatch, nothing to compile.
  host = jax.tree.map(np.asarray, jax.device_get(variables))
  if zig_ids is None:
    keep = partition.zig_norms(host) > 0
  else:
    ids = np.asarray(zig_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
      raise ValueError(f'zig_ids must lie in [0, {n}); got {ids.min()} … {ids.max()}.')
    keep = np.ones((n,), bool)
    keep[ids] = False
  keep = _complete(partition, keep)
  return _make(partition, keep, _slice_tree(_Plan(partition, keep), host))


def _complete(partition: ZIGPartition, keep: np.ndarray) -> np.ndarray:
  """A node group whose ZIGs would all go keeps its first one (a zero channel)."""
  keep = np.array(keep, bool)
  for g in partition.prunable_groups:
    if not keep[g.zig_offset : g.zig_offset + g.size].any():
      keep[g.zig_offset] = True
  return keep


def _make(partition: ZIGPartition, keep: np.ndarray, slim: Any) -> Subnet:
  keep = _complete(partition, keep)
  prog = partition.program
  plan = _Plan(partition, keep)
  avals = prog.closed_jaxpr.in_avals[: prog.num_variables]
  abstract = jax.tree_util.tree_unflatten(
    prog.var_tree, [jax.ShapeDtypeStruct(s, a.dtype) for s, a in zip(partition.variable_shapes, avals)]
  )
  leaves = jax.tree_util.tree_leaves(slim)
  for path, v, leaf in zip(partition.variable_paths, prog.invars, leaves):
    want = plan.slim_shape(v)
    if tuple(np.shape(leaf)) != want:
      raise ValueError(f'Slim variable {path_str(path)} has shape {tuple(np.shape(leaf))}, expected {want}.')
  # Fresh host copies first: on CPU, device_put may alias a NumPy buffer, and an unsliced leaf would
  # then share memory with the caller's array.
  slim = jax.tree_util.tree_unflatten(prog.var_tree, jax.device_put([np.array(x) for x in leaves]))
  return Subnet(partition, keep, slim, abstract, {prog.signature: plan})


def construct_subnet_from_keep(partition: ZIGPartition, keep: np.ndarray, slim_leaves: list) -> Subnet:
  """A :class:`Subnet` from a keep mask and already-sliced variable leaves (restoring one)."""
  return _make(
    partition, np.asarray(keep, bool), jax.tree_util.tree_unflatten(partition.program.var_tree, slim_leaves)
  )
