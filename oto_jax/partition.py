"""The result of the ZIG analysis: node groups, their members and dependents, and ZIG ids.

A :class:`ZIGPartition` is plain, static metadata (numpy index maps and paths). Its methods
that touch arrays (:meth:`ZIGPartition.zero`, :meth:`ZIGPartition.zig_norms`) are pure and
jit-able; they take any pytree whose leaf paths match the analysed variables, either the
whole variables or one collection of them (e.g. only ``params``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import costs
from oto_jax.axis_zigs import AxisZigs
from oto_jax.ir import Program
from oto_jax.paths import Path, path_of, path_str
from oto_jax.segments import ZIGSegments

__all__ = ['GroupEntry', 'NodeGroup', 'Path', 'ZIGPartition', 'path_of', 'path_str']


@dataclasses.dataclass(frozen=True, eq=False)
class GroupEntry:
  """One variable's part in a node group.

  Attributes:
    path: the variable's path in the analysed variables, e.g. ``('params', 'Conv_0', 'kernel')``.
    axis: the axis of that variable that carries the node group's channels.
    index: int array of length ``shape[axis]``; entry ``i`` is the node-group-local ZIG index of
      slice ``i`` along ``axis``, or ``-1`` where slice ``i`` belongs to another group (a
      concatenation of several groups, or an inner factor of a reshaped axis).
    shape: the variable's full shape.
  """

  path: Path
  axis: int
  index: np.ndarray
  shape: tuple[int, ...]

  def __repr__(self) -> str:
    return f'GroupEntry({path_str(self.path)}, axis={self.axis}, shape={self.shape})'


@dataclasses.dataclass(frozen=True, eq=False)
class NodeGroup:
  """A set of coupled channel axes: one node group of width ``size`` holds ``size`` ZIGs.

  Attributes:
    id: position in :attr:`ZIGPartition.node_groups`.
    size: the number of ZIGs (channels, units, heads) in the group.
    prunable: whether zeroing any of its ZIGs provably leaves the model's outputs unchanged
      when the dependents are then removed.
    reason: for an unprunable group, why (e.g. ``'feeds the model output'``); '' otherwise.
    members: entries an optimizer drives to zero (the producing side: kernels' output
      columns, biases, normalisation scales and offsets).
    dependents: entries that are only sliced away with the ZIG (the consumers' input rows,
      running statistics).
    zig_offset: global id of the group's first ZIG (``-1`` for an unprunable group); ZIG
      ``j`` of the group has global id ``zig_offset + j``.
    where: a short description of where the group lives (the first member's layer).
  """

  id: int
  size: int
  prunable: bool
  reason: str
  members: tuple[GroupEntry, ...]
  dependents: tuple[GroupEntry, ...]
  zig_offset: int
  where: str

  @property
  def zig_ids(self) -> np.ndarray:
    if not self.prunable:
      return np.zeros((0,), np.int32)
    return np.arange(self.zig_offset, self.zig_offset + self.size, dtype=np.int32)

  def __repr__(self) -> str:
    state = 'prunable' if self.prunable else f'unprunable: {self.reason}'
    return (
      f'NodeGroup(id={self.id}, size={self.size}, {state}, '
      f'{len(self.members)} members, {len(self.dependents)} dependents, at {self.where})'
    )


def _leaf_index(tree: Any) -> dict[Path, tuple[int, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_of(p): (i, leaf) for i, (p, leaf) in enumerate(leaves)}


@dataclasses.dataclass(frozen=True, eq=False)
class ZIGPartition:
  """Zero-invariant groups of a JAX function's variables, derived from its jaxpr.

  Build one with :func:`oto_jax.zig_partition`. ZIG ids run over the prunable node groups
  only: ``0 … num_zigs - 1``.

  Attributes:
    node_groups: every coupled channel axis that touches a variable, prunable or not.
    num_zigs: the number of prunable ZIGs.
    variable_paths: paths of all leaves of the analysed variables, in flattening order.
    variable_shapes: their shapes.
    trainable_paths: the paths treated as trainable (an optimizer's domain).
    program: the analysed :class:`~oto_jax.ir.Program` (None for :meth:`from_groups`).
  """

  node_groups: tuple[NodeGroup, ...]
  num_zigs: int
  variable_paths: tuple[Path, ...]
  variable_shapes: tuple[tuple[int, ...], ...]
  trainable_paths: frozenset
  # The analysed program and the ZIG ids along its axes, for the costs and the surgery.
  program: Program | None = dataclasses.field(default=None, repr=False)
  axes: AxisZigs | None = dataclasses.field(default=None, repr=False)
  # Layouts derived from the partition (segments per tree structure, cost models).
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @classmethod
  def from_groups(cls, variables: Any, groups: dict[Any, tuple[int, Any]]) -> ZIGPartition:
    """A partition with user-defined groups, for group-sparse problems that are not networks.

    The optimizers (:func:`oto_jax.hspg`, :func:`oto_jax.prox_sg`, …) then drive these groups to
    zero, e.g. feature groups of a group-lasso logistic regression. There is no program, so
    FLOPs budgets and :func:`oto_jax.construct_subnet` are unavailable.

    Args:
      variables: the pytree the optimizer will see (arrays or ``ShapeDtypeStruct``).
      groups: ``{path: (axis, index)}`` with ``path`` a tuple of keys or a ``'a/b'`` string and
        ``index[i]`` the group of slice ``i`` along ``axis`` (-1: in no group). Group ids are
        shared across variables and must be ``0 … G-1``.

    Returns:
      A :class:`ZIGPartition` with one node group of ``G`` ZIGs.

    Example::

      part = oto_jax.ZIGPartition.from_groups({'w': w}, {'w': (0, np.repeat(np.arange(8), 4))})
    """
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    paths = tuple(path_of(p) for p, _ in flat)
    shapes = {p: tuple(np.shape(x)) for p, (_, x) in zip(paths, flat)}
    by_str = {path_str(p): p for p in paths}
    entries = []
    for key, (axis, index) in groups.items():
      path = by_str.get(key) if isinstance(key, str) else tuple(key)
      if path not in shapes:
        raise ValueError(f'No variable at {key!r}; the variables are {sorted(by_str)}.')
      index = np.asarray(index, np.int32).reshape(-1)
      if index.shape[0] != shapes[path][axis]:
        raise ValueError(
          f'The group index of {key!r} has {index.shape[0]} entries but axis {axis} has size '
          f'{shapes[path][axis]}.'
        )
      entries.append(GroupEntry(path, axis, index, shapes[path]))
    ids = np.unique(np.concatenate([e.index[e.index >= 0] for e in entries])) if entries else np.zeros(0)
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
      raise ValueError(f'Group ids must be 0 … G-1 without gaps; got {ids[:10]}….')
    group = NodeGroup(0, len(ids), True, '', tuple(entries), (), 0, 'user-defined groups')
    return cls((group,), len(ids), paths, tuple(shapes[p] for p in paths), frozenset(paths))

  @property
  def prunable_groups(self) -> tuple[NodeGroup, ...]:
    return tuple(g for g in self.node_groups if g.prunable)

  def group_of_zig(self, zig_id: int) -> NodeGroup:
    """The node group that holds global ZIG ``zig_id``."""
    for g in self.prunable_groups:
      if g.zig_offset <= zig_id < g.zig_offset + g.size:
        return g
    raise IndexError(f'ZIG id {zig_id} is out of range: this partition has {self.num_zigs} ZIGs.')

  # ---------------------------------------------------------------------------------------
  # Mapping a pytree onto the analysed variables.

  def _match(self, tree: Any) -> dict[Path, tuple[int, Any]]:
    """Maps each analysed variable path to the leaf of ``tree`` that holds it (if any).

    A leaf of ``tree`` stands for a variable when its path equals the variable's path or a
    suffix of it, so ``variables['params']`` (linen) or ``nnx.state(model, nnx.Param)``
    match as well as the full variables.
    """
    leaves = _leaf_index(tree)
    if not leaves:
      return {}
    out = {}
    for vpath in self.variable_paths:
      for start in range(len(vpath)):
        hit = leaves.get(vpath[start:])
        if hit is not None:
          out[vpath] = hit
          break
    if not out:
      raise ValueError(
        'None of the leaves of the given tree matches a variable of this partition. The tree '
        'must be shaped like the analysed variables or one of their collections; its first '
        f"paths are {[path_str(p) for p in list(leaves)[:3]]}, the partition's "
        f'{[path_str(p) for p in self.variable_paths[:3]]}.'
      )
    for vpath, (_, leaf) in out.items():
      want = self.variable_shapes[self.variable_paths.index(vpath)]
      if tuple(np.shape(leaf)) != want:
        raise ValueError(
          f'Leaf {path_str(vpath)} has shape {tuple(np.shape(leaf))}, but the partition was '
          f'built for shape {want}. Partition the model with the variables you pass here.'
        )
    return out

  def _member_entries(self) -> Iterable[tuple[GroupEntry, np.ndarray]]:
    """(entry, global ZIG id per slice, -1 outside the group) for every member entry."""
    for g in self.prunable_groups:
      for e in g.members:
        yield e, np.where(e.index >= 0, e.index + g.zig_offset, -1).astype(np.int32)

  # ---------------------------------------------------------------------------------------
  # Array-touching methods (pure, jit-able).

  def _program(self) -> Program:
    if self.program is None:
      raise ValueError(
        'This partition carries no program (it was built with ZIGPartition.from_groups); build it '
        'with oto_jax.zig_partition for costs and subnets.'
      )
    return self.program

  def _cost(self, name: str) -> costs.CostModel:
    hit = self._cache.get(name)
    if hit is None:
      prog, n = self._program(), self.num_zigs
      if name == 'params':
        trainable = [p in self.trainable_paths for p in self.variable_paths]
        hit = costs.params_model(prog, self.axes, n, trainable)
      else:
        hit = (costs.flops_model if name == 'flops' else costs.bytes_model)(prog, self.axes, n)
      self._cache[name] = hit
    return hit

  @property
  def flops(self) -> costs.CostModel:
    """FLOPs of one call of the analysed function, as a function of the kept ZIGs.

    ``partition.flops.total`` is the full model's count, ``partition.flops.per_zig`` what
    each ZIG saves, and ``partition.flops(keep)`` the count with only the ZIGs in the
    boolean mask ``keep`` (jit-able). See :mod:`oto_jax.costs`.
    """
    return self._cost('flops')

  @property
  def params(self) -> costs.CostModel:
    """The number of trainable parameters as a function of the kept ZIGs (like :attr:`flops`)."""
    return self._cost('params')

  @property
  def bytes(self) -> costs.CostModel:
    """Bytes the program's equations read and write, as a function of the kept ZIGs (no fusion)."""
    return self._cost('bytes')

  def segments(self, tree: Any) -> ZIGSegments:
    """The member entries laid over ``tree``'s structure (cached per structure and shapes).

    Args:
      tree: the analysed variables or any collection of them, or a tree shaped like one
        (gradients, optimizer moments, ``ShapeDtypeStruct`` s).

    Returns:
      A :class:`~oto_jax.segments.ZIGSegments` with the vectorised per-ZIG operations.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    key = ('segments', treedef, tuple(tuple(np.shape(x)) for x in leaves))
    hit = self._cache.get(key)
    if hit is None:
      hit = self._cache[key] = ZIGSegments.build(
        self.num_zigs, self._member_entries(), self._match(tree), tree
      )
    return hit

  def zero(self, variables: Any, zig_ids: Any) -> Any:
    """A copy of ``variables`` with every member entry of the given ZIGs set to zero.

    Args:
      variables: the analysed variables, or any collection of them (e.g. only params).
      zig_ids: global ZIG ids, a sequence or an int array (may be traced).

    Returns:
      A new pytree of the same structure; nothing passed in is modified.
    """
    ids = jnp.asarray(zig_ids, dtype=jnp.int32).reshape(-1)
    ids = jnp.where(ids < 0, self.num_zigs, ids)  # negative ids name no ZIG; drop them
    drop = jnp.zeros((self.num_zigs,), bool).at[ids].set(True, mode='drop')
    seg = self.segments(variables)
    return seg.map(
      lambda x, d: jnp.where(d, jnp.zeros((), x.dtype), x), variables, values=[drop], fills=[False]
    )

  def zig_norms(self, tree: Any) -> jax.Array:
    """The L2 norm of each ZIG over the member entries present in ``tree``.

    .. math::
      n_g = \\Big(\\sum_{(v, a) \\in \\mathcal{M}(g)} \\lVert v_{[a = g]} \\rVert_2^2\\Big)^{1/2}

    Args:
      tree: the analysed variables, or a collection of them (e.g. params or gradients).

    Returns:
      A float32 array of shape ``[num_zigs]``.
    """
    return self.segments(tree).norms(tree)

  # ---------------------------------------------------------------------------------------
  # Reports.

  def summary(self, *, show_unprunable: bool = True) -> str:
    """A readable table of the node groups."""
    rows = [('group', 'size', 'ZIG ids', 'members', 'deps', 'where', 'status')]
    for g in self.node_groups:
      if not (g.prunable or show_unprunable):
        continue
      ids = f'{g.zig_offset}-{g.zig_offset + g.size - 1}' if g.prunable else '-'
      status = 'prunable' if g.prunable else g.reason
      rows.append((str(g.id), str(g.size), ids, str(len(g.members)), str(len(g.dependents)), g.where, status))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = []
    for k, r in enumerate(rows):
      lines.append('  '.join(c.ljust(w) for c, w in zip(r[:-1], widths)) + '  ' + r[-1])
      if k == 0:
        lines.append('-' * len(lines[0]))
    n_groups = sum(g.prunable for g in self.node_groups)
    lines.append(
      f'{self.num_zigs} prunable ZIGs in {n_groups} node groups; '
      f'{len(self.node_groups) - n_groups} unprunable groups.'
    )
    return '\n'.join(lines)

  def to_dot(self) -> str:
    """Graphviz DOT: one node per node group, one per layer, edges for members/dependents."""

    def layer(path: Path) -> str:
      return path_str(path[:-1]) or path_str(path)

    out = ['digraph zigs {', '  rankdir=LR;', '  node [fontname="Helvetica", fontsize=10];']
    layers: dict[str, None] = {}
    edges = []
    for g in self.node_groups:
      color = 'palegreen' if g.prunable else 'lightgray'
      label = f'group {g.id}\\n{g.size} ZIGs' + ('' if g.prunable else f'\\n{g.reason[:60]}')
      out.append(f'  g{g.id} [shape=box, style=filled, fillcolor={color}, label="{_esc(label)}"];')
      for kind, entries, style in (('m', g.members, 'solid'), ('d', g.dependents, 'dashed')):
        for e in entries:
          name = layer(e.path)
          layers[name] = None
          a, b = (f'g{g.id}', f'"{_esc(name)}"') if kind == 'm' else (f'"{_esc(name)}"', f'g{g.id}')
          edges.append(f'  {a} -> {b} [style={style}, label="{_esc(e.path[-1])}:{e.axis}"];')
    out += [f'  "{_esc(n)}" [shape=ellipse];' for n in layers]
    out += sorted(set(edges), key=edges.index)
    out.append('}')
    return '\n'.join(out)


def _esc(s: Any) -> str:
  return str(s).replace('"', '\\"')
