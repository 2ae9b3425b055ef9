"""The Flax NNX zoo through ``oto_jax.zig_partition``: hand-derived counts, then removability."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import pytest

import oto_jax
from tests.zoo import common, nnx_zoo

NAMES = sorted(nnx_zoo.CASES)


@functools.cache
def _case(name: str) -> common.ZooCase:
  # One build per model, shared by the tests below.
  return nnx_zoo.CASES[name]()


@functools.cache
def _partition(name: str) -> oto_jax.ZIGPartition:
  case = _case(name)
  return oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)


@pytest.mark.parametrize('name', NAMES)
def test_outputs_finite(name: str):
  case = _case(name)
  out = jax.jit(lambda v: case.apply_fn(v, *case.args, **case.kwargs))(case.variables)
  for leaf in jax.tree_util.tree_leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf))), f'{name}: non-finite output'


@pytest.mark.parametrize('name', NAMES)
def test_zig_counts(name: str):
  case, part = _case(name), _partition(name)
  assert part.num_zigs == case.num_zigs, part.summary()
  if case.group_sizes is not None:
    assert sorted(g.size for g in part.prunable_groups) == case.group_sizes, part.summary()


@pytest.mark.parametrize('name', NAMES)
def test_zigs_removable(name: str):
  case, part = _case(name), _partition(name)
  # Seeded by name so that a case's subsets do not shift when the zoo grows.
  seed = zlib.crc32(name.encode())
  for ids in common.random_zig_subsets(part, seed):
    common.assert_removable(case, part, ids, seed=seed)
