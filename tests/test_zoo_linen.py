"""The linen zoo through ``oto_jax.zig_partition``: hand-derived counts, then removability."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import pytest

import oto_jax
from tests.zoo import common, linen_zoo

NAMES = sorted(linen_zoo.CASES)


@functools.cache
def _case(name: str) -> common.ZooCase:
  # Building a case means initialising a model; share it between the tests below.
  return linen_zoo.CASES[name]()


@pytest.mark.parametrize('name', NAMES)
def test_outputs_finite(name: str):
  case = _case(name)
  out = jax.jit(lambda v: case.apply_fn(v, *case.args, **case.kwargs))(case.variables)
  for leaf in jax.tree_util.tree_leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf))), f'{name}: non-finite output'


@pytest.mark.parametrize('name', NAMES)
def test_zig_partition(name: str):
  case = _case(name)
  part = oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)
  assert part.num_zigs == case.num_zigs, part.summary()
  if case.group_sizes is not None:
    assert sorted(g.size for g in part.prunable_groups) == case.group_sizes, part.summary()
  # A seed per name (not per position) keeps a case's subsets stable as the zoo grows.
  for ids in common.random_zig_subsets(part, seed=zlib.crc32(name.encode())):
    common.assert_removable(case, part, ids)
