"""The zoo, linen and NNX builds of each model: outputs, hand-derived ZIG counts, removability."""

from __future__ import annotations

import functools
import zlib

import jax
import numpy as np
import pytest

import oto_jax
from oto_jax.partition import path_of
from tests.zoo import common, models

NAMES = sorted(models.CASES)
MODELS = sorted(models.SPECS)


@functools.cache
def _partition(name: str) -> oto_jax.ZIGPartition:
  case = models.CASES[name]()
  return oto_jax.zig_partition(case.apply_fn, case.variables, *case.args, **case.kwargs)


@pytest.mark.parametrize('model', MODELS)
def test_builds_agree_and_are_finite(model: str):
  """Both builds of one spec have the same variables and compute the same finite outputs."""
  lin, nnx_case = models.CASES[f'linen/{model}'](), models.CASES[f'nnx/{model}']()
  key = lambda fw, case: {
    path_of(p)[fw == 'linen' :]: leaf.shape
    for p, leaf in jax.tree_util.tree_flatten_with_path(case.variables)[0]
  }
  assert key('linen', lin) == key('nnx', nnx_case), model
  outs = [np.asarray(common.forward(case)(case.variables)) for case in (lin, nnx_case)]
  assert np.all(np.isfinite(outs[0])), f'{model}: non-finite output'
  scale = float(np.max(np.abs(outs[0])))
  np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5 * scale, err_msg=model)


@pytest.mark.parametrize('name', NAMES)
def test_zig_counts(name: str):
  """The exact, hand-derived ZIG count and node-group sizes."""
  case, part = models.CASES[name](), _partition(name)
  assert part.num_zigs == case.num_zigs, part.summary()
  assert sorted(g.size for g in part.prunable_groups) == case.group_sizes, part.summary()


@pytest.mark.parametrize('name', NAMES)
def test_zigs_removable(name: str):
  """Random subsets (sparse, dense, a whole group but one ZIG): zeroed, dependents shaken, outputs unmoved."""
  case, part = models.CASES[name](), _partition(name)
  # Seeded by model name (not position, nor framework): a case's subsets stay put as the zoo grows.
  seed = zlib.crc32(name.split('/')[1].encode())
  for ids in common.random_zig_subsets(part, seed):
    common.assert_removable(case, part, ids, seed=seed)
