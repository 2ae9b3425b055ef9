"""The zoo's case type and the removability check every zoo model goes through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import oto_jax
from oto_jax.partition import path_of


@dataclasses.dataclass
class ZooCase:
  """One model of the zoo.

  Attributes:
    name: short id, e.g. 'linen/vgg16_bn'.
    apply_fn: ``apply_fn(variables, *args, **kwargs)`` returns the model output (a pytree).
    variables: concrete variables, initialised from a fixed key.
    args: positional inputs (small batch, float32).
    num_zigs: the number of prunable ZIGs, derived by hand from the architecture.
    group_sizes: optional sorted list of the sizes of the prunable node groups.
    kwargs: static keyword arguments (``train=False`` …).
  """

  name: str
  apply_fn: Callable[..., Any]
  variables: Any
  args: tuple
  num_zigs: int
  group_sizes: list[int] | None = None
  kwargs: dict = dataclasses.field(default_factory=dict)


def _set_entries(part: oto_jax.ZIGPartition, variables: Any, zig_ids, which: str, make) -> Any:
  """``variables`` with the slices of the given ZIGs' ``which`` entries replaced by ``make(shape)``."""
  ids = np.asarray(zig_ids, np.int64)
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  index = {path_of(p): i for i, (p, _) in enumerate(flat)}
  leaves = [leaf for _, leaf in flat]
  for g in part.prunable_groups:
    for e in getattr(g, which):
      hit = np.isin(np.where(e.index >= 0, e.index + g.zig_offset, -1), ids)
      if not hit.any():
        continue
      i = index[e.path]
      shape = [1] * leaves[i].ndim
      shape[e.axis] = -1
      new = np.where(hit.reshape(shape), make(leaves[i].shape), np.asarray(leaves[i], np.float64))
      # device_put of a host array of the right dtype: jnp.asarray would compile per shape.
      leaves[i] = jax.device_put(new.astype(leaves[i].dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def zero_members(part: oto_jax.ZIGPartition, variables: Any, zig_ids) -> Any:
  """What ``part.zero`` does, from the GroupEntry index maps, in numpy.

  Eager ``part.zero`` compiles its ops once per leaf shape, which a stream of generated models
  pays on every example; this costs no compile, and does not take the library's word for it.
  """
  return _set_entries(part, variables, zig_ids, 'members', np.zeros)


def randomize_dependents(part: oto_jax.ZIGPartition, variables: Any, zig_ids, seed: int = 0) -> Any:
  """Sets every dependent entry of the given ZIGs to fresh random values (numpy draws, seeded).

  numpy, not ``jax.random``: an eager draw compiles once per leaf shape, and every model
  brings new shapes.
  """
  rng = np.random.default_rng(seed)
  # Positive, so that running variances stay valid; anything finite would do elsewhere.
  return _set_entries(part, variables, zig_ids, 'dependents', lambda shape: rng.uniform(0.5, 3.0, shape))


def random_zig_subsets(part: oto_jax.ZIGPartition, seed: int, count: int = 3) -> list[np.ndarray]:
  """A few random ZIG subsets: sparse, dense, and one whole node group but one channel."""
  rng = np.random.default_rng(seed)
  n = part.num_zigs
  out = [
    rng.choice(n, size=max(1, n // 10), replace=False),
    rng.choice(n, size=max(1, n // 2), replace=False),
  ]
  groups = part.prunable_groups
  g = groups[rng.integers(len(groups))]
  out.append(g.zig_ids[1:] if g.size > 1 else g.zig_ids)
  return out[:count]


# The checks compare values, not speed: LLVM's -O0 halves XLA's compile time on CPU.
FAST = (
  {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  if jax.default_backend() == 'cpu'
  else {}
)


def forward(case: ZooCase) -> Callable[[Any], Any]:
  """``variables -> outputs`` at the case's inputs, compiled once per case and kept on it."""
  fn = case.__dict__.get('_forward')
  if fn is None:
    fn = case.__dict__['_forward'] = jax.jit(
      lambda v: case.apply_fn(v, *case.args, **case.kwargs), compiler_options=FAST
    )
  return fn


def assert_removable(case: ZooCase, part: oto_jax.ZIGPartition, zig_ids, seed: int = 0, rtol: float = 1e-5):
  """Zeroes ``zig_ids``, randomises their dependents, and checks the outputs do not move."""
  fn = forward(case)
  zeroed = part.zero(case.variables, zig_ids)
  shaken = randomize_dependents(part, zeroed, zig_ids, seed)
  ref, got = fn(zeroed), fn(shaken)
  for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    scale = float(jnp.max(jnp.abs(r))) + 1e-12
    err = float(jnp.max(jnp.abs(r - g)))
    assert err <= rtol * scale, (
      f'{case.name}: output moved by {err:.3g} (scale {scale:.3g}) for ZIGs {list(zig_ids)[:8]}…'
    )
