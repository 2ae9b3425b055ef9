"""The result of the ZIG analysis: node groups, their members and dependents, and ZIG ids.

A :class:`ZIGPartition` is plain, static metadata (numpy index maps and paths). Its methods
that touch arrays (:meth:`ZIGPartition.zero`, :meth:`ZIGPartition.zig_norms`) are pure and
jit-able; they take any pytree whose leaf paths match the analysed variables, either the
whole variables or one collection of them (e.g. only ``params``).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import costs
from oto_jax.axis_zigs import AxisZigs
from oto_jax.ir import Program, iter_eqns
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
    """The node group that holds global ZIG ``zig_id`` (an integer in ``[0, num_zigs)``)."""
    if isinstance(zig_id, (bool, np.bool_)) or not isinstance(zig_id, (int, np.integer)):
      raise ValueError(f'group_of_zig takes one integer ZIG id, got {zig_id!r}.')
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

  def zig_mask(self, zig_ids: Any) -> np.ndarray | jax.Array:
    """The ZIGs that ``zig_ids`` names, as a boolean mask of shape ``[num_zigs]``.

    Every method that takes ZIGs reads them through this one check.

    Args:
      zig_ids: integer ZIG ids in ``[0, num_zigs)`` (an int, a sequence or an integer array;
        repeats are fine), or a boolean mask of shape ``[num_zigs]`` (which may be traced).

    Returns:
      A NumPy boolean mask, or the traced mask as given.

    Raises:
      ValueError: ids out of range, float or boolean ids that are not a full mask, a mask of
        the wrong length, or traced integer ids (their range cannot be checked: pass a mask).
    """
    n = self.num_zigs
    if isinstance(zig_ids, jax.core.Tracer):
      if zig_ids.dtype == jnp.bool_ and zig_ids.shape == (n,):
        return zig_ids
      raise ValueError(
        f'Traced ZIG ids must be a boolean mask of shape ({n},); got {zig_ids.dtype}{list(zig_ids.shape)}. '
        'Integer ids cannot be range-checked under jit: build the mask with '
        f'jnp.zeros({n}, bool).at[ids].set(True).'
      )
    a = np.asarray(zig_ids)
    if a.dtype == np.bool_:
      if a.shape != (n,):
        raise ValueError(
          f'A boolean ZIG mask must have shape ({n},) (one entry per ZIG); got shape {a.shape}. '
          'Integer ids are given as integers.'
        )
      return a
    if a.size == 0:
      return np.zeros((n,), bool)
    if not np.issubdtype(a.dtype, np.integer) or a.ndim > 1:
      raise ValueError(
        f'ZIG ids must be integers in [0, {n}) or a boolean mask of shape ({n},); got a {a.dtype} '
        f'array of shape {a.shape}: {a.reshape(-1)[:5].tolist()}.'
      )
    a = a.reshape(-1)
    bad = a[(a < 0) | (a >= n)]
    if bad.size:
      raise ValueError(f'ZIG ids must lie in [0, {n}) (this partition has {n} ZIGs); got {bad[:5].tolist()}.')
    mask = np.zeros((n,), bool)
    mask[a] = True
    return mask

  def zero(self, variables: Any, zig_ids: Any) -> Any:
    """A copy of ``variables`` with every member entry of the given ZIGs set to zero.

    Args:
      variables: the analysed variables, or any collection of them (e.g. only params).
      zig_ids: integer ZIG ids or a boolean mask of shape ``[num_zigs]`` (may be traced);
        see :meth:`zig_mask`.

    Returns:
      A new pytree of the same structure; nothing passed in is modified.
    """
    drop = jnp.asarray(self.zig_mask(zig_ids))
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

  def producer(self, group: NodeGroup) -> str:
    """The layer that produces ``group``'s channels, by module path (``'layer1/Conv_0'``).

    Every variable an optimizer zeroes with a channel is a member: the kernel that computes it
    and the bias and normalisation after it. The producer is the member kernel (rank 2 or
    more: a conv or dense kernel, an embedding) that the program reads first, so a
    Conv → BatchNorm channel names the conv and a residual stream its stem. A group without
    one names its first member, or its first dependent where nothing trainable produces it.
    """
    if self.program is None:
      return group.where  # user-defined groups belong to no layer
    first = self._first_use()
    kernels = [e for e in group.members if len(e.shape) >= 2]
    entry = min(kernels or group.members or group.dependents, key=lambda e: first[e.path])
    return self._layer(entry.path)

  def _first_use(self) -> dict[Path, float]:
    """Per variable, the position of the first equation that reads it (inf: none does, or
    there is no program)."""
    hit = self._cache.get('first_use')
    if hit is None:
      hit = dict.fromkeys(self.variable_paths, math.inf)
      if self.program is not None:
        var = dict(zip(self.program.variables, self.variable_paths))
        for i, eqn in enumerate(iter_eqns(self.program.steps)):
          for x in eqn.ins:
            if isinstance(x, int) and x in var and hit[var[x]] == math.inf:
              hit[var[x]] = i
      self._cache['first_use'] = hit
    return hit

  def _layer(self, path: Path) -> str:
    """A variable's layer: its path without the variable's name and without a linen collection,
    so that a BatchNorm's ``params`` and ``batch_stats`` are one layer."""
    # The analysis' own test for linen variables: a dict of collections with 'params'.
    linen = self._cache.get('linen')
    if linen is None:
      linen = self._cache['linen'] = any(p[:1] == ('params',) for p in self.variable_paths)
    inner = path[1:] if linen and len(path) > 1 else path
    return path_str(inner[:-1]) or path_str(inner)

  def summary(self, *, show_unprunable: bool = True) -> str:
    """A readable table of the node groups; ``where`` is the producing layer (:meth:`producer`)."""
    rows = [('group', 'size', 'ZIG ids', 'members', 'deps', 'where', 'status')]
    for g in self.node_groups:
      if not (g.prunable or show_unprunable):
        continue
      ids = f'{g.zig_offset}-{g.zig_offset + g.size - 1}' if g.prunable else '-'
      status = 'prunable' if g.prunable else g.reason
      where = self.producer(g)
      rows.append((str(g.id), str(g.size), ids, str(len(g.members)), str(len(g.dependents)), where, status))
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

  def to_dot(self, rankdir: str = 'TB', row: int = 4) -> str:
    """Graphviz DOT of the node groups, drawn in the direction the data flows.

    One cluster per node group holds the group (green: prunable, grey: not, with the reason)
    and the layers whose variables produce its channels (solid edges, labelled
    ``variable:axis``); dashed edges lead from the group to the layers that consume it.
    Clusters are stacked in program order, so a deep model is drawn tall, not wide; an edge
    back to an earlier cluster (a block's output joining its residual stream) does not reorder
    them. Render with ``dot -Tpng``.

    Args:
      rankdir: Graphviz's direction, ``'TB'`` (top-down) or ``'LR'`` (left to right).
      row: at most this many layers side by side in one cluster; more wrap onto further rows
        (a residual stream's cluster holds every layer that writes to it).
    """
    first = self._first_use()
    used: dict[str, float] = {}  # layer -> the first use of any of its variables
    for path in self.variable_paths:
      layer = self._layer(path)
      used[layer] = min(used.get(layer, math.inf), first[path])
    # A group is drawn where its first producer runs; one nothing produces (a model input)
    # comes just before its first consumer.
    rank = {
      g.id: min(first[e.path] for e in g.members)
      if g.members
      else min(first[e.path] for e in g.dependents) - 0.5
      for g in self.node_groups
    }
    groups = sorted(self.node_groups, key=lambda g: (rank[g.id], g.id))
    order = {g.id: k for k, g in enumerate(groups)}
    home: dict[str, int] = {}  # a layer sits in the cluster of the first group it produces
    for g in groups:
      for e in g.members:
        home.setdefault(self._layer(e.path), g.id)
    edges: dict[tuple[int, str, bool], list[str]] = {}  # (group, layer, produces) -> variable:axis
    for g in groups:
      own = {self._layer(e.path) for e in g.members}
      for e in g.members:
        edges.setdefault((g.id, self._layer(e.path), True), []).append(f'{e.path[-1]}:{e.axis}')
      for e in g.dependents:
        layer = self._layer(e.path)
        if layer not in own:  # running statistics of the group's own normalisation: no edge
          edges.setdefault((g.id, layer, False), []).append(f'{e.path[-1]}:{e.axis}')
    n = sum(g.prunable for g in groups)
    title = (
      f'{self.num_zigs} prunable ZIGs in {n} node groups, {len(groups) - n} unprunable\\n'
      'solid: the layer produces the channels; dashed: it consumes them'
    )
    out = [
      'digraph zigs {',
      f'  rankdir={rankdir}; nodesep=0.15; ranksep=0.3; labelloc=t; label="{title}";',
      '  graph [fontname="Helvetica", fontsize=10];',
      '  node [fontname="Helvetica", fontsize=9, shape=box, style=rounded, height=0.25, margin="0.06,0.02"];',
      '  edge [fontname="Helvetica", fontsize=7, arrowsize=0.5];',
    ]
    above = None  # the previous cluster's group node
    for g in groups:
      fill, line = ('#eef8ee', 'palegreen3') if g.prunable else ('#f2f2f2', 'gray60')
      label = (
        f'group {g.id}\\n{g.size} ZIGs' if g.prunable else f'group {g.id}, width {g.size}\\n{_wrap(g.reason)}'
      )
      layers = [_quote(x) for x in sorted((x for x, h in home.items() if h == g.id), key=used.__getitem__)]
      rows = [layers[i : i + row] for i in range(0, len(layers), row)]
      out += [
        f'  subgraph cluster_g{g.id} {{',
        f'    style="rounded,filled"; fillcolor="{fill}"; color={line}; label="";',
        f'    g{g.id} [shape=box, style=filled, fillcolor={"palegreen" if g.prunable else "lightgray"}, '
        f'label="{_esc(label)}"];',
        # Each row in program order (Graphviz keeps an edge within a rank left to right).
        *(
          f'    {{rank=same; {" -> ".join(r)} [style=invis];}}' if len(r) > 1 else f'    {r[0]};'
          for r in rows
        ),
        '  }',
      ]
      # Invisible edges stack the rows, and the clusters in program order.
      tops = [r[0] for r in rows] or [f'g{g.id}']
      out += [f'  {a} -> {b} [style=invis];' for a, b in zip([above, *tops], tops) if a is not None]
      above = f'g{g.id}'
    consumers = sorted({x for (_, x, produces) in edges if not produces} - home.keys(), key=used.__getitem__)
    out += [f'  {_quote(x)} [style="rounded,dashed"];' for x in consumers]
    for (gid, layer, produces), names in edges.items():
      # An edge into an earlier cluster (a block's output that joins its residual stream,
      # the stream's next reader) must not pull that cluster below this one.
      back = layer in home and (
        order[home[layer]] > order[gid] if produces else order[home[layer]] < order[gid]
      )
      extra = ', constraint=false' if back else ''
      a, b, style = (_quote(layer), f'g{gid}', 'solid') if produces else (f'g{gid}', _quote(layer), 'dashed')
      out.append(f'  {a} -> {b} [style={style}{extra}, label="{_esc(", ".join(names))}"];')
    out.append('}')
    return '\n'.join(out)


def _esc(s: Any) -> str:
  return str(s).replace('"', '\\"')


def _quote(name: str) -> str:
  return f'"{_esc(name)}"'


def _wrap(text: str, width: int = 28) -> str:
  """``text`` in DOT lines of about ``width`` characters, so a long reason keeps its cluster narrow."""
  return '\\n'.join(textwrap.wrap(text, width)) or text
