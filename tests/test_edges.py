"""The library's edges answer loudly: ZIG ids, non-finite variables, inputs that cannot be analysed."""

from __future__ import annotations

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oto_jax

X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
    x = jax.nn.relu(nn.Conv(5, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


@functools.cache
def _case():
  model = _CNN()
  v = model.init(jax.random.key(0), X)
  rng = np.random.default_rng(1)
  v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) + 1.0, a.dtype), v)
  part = oto_jax.zig_partition(model.apply, v, X)
  assert part.num_zigs == 11, part.summary()
  return model, v, part


# ---------------------------------------------------------------------------------------------
# ZIG ids: one validator for zero, construct_subnet and group_of_zig.


def test_boolean_mask_means_the_marked_zigs():
  """A boolean mask of length num_zigs names the ZIGs where it is True (not ids 0 and 1)."""
  _, v, part = _case()
  mask = np.zeros(part.num_zigs, bool)
  mask[[2, 7]] = True
  chex.assert_trees_all_equal(part.zero(v, mask), part.zero(v, [2, 7]))
  chex.assert_trees_all_equal(part.zero(v, jnp.asarray(mask)), part.zero(v, [2, 7]))
  sub_mask = oto_jax.construct_subnet(part, part.zero(v, [2, 7]), zig_ids=mask)
  sub_ids = oto_jax.construct_subnet(part, part.zero(v, [2, 7]), zig_ids=[2, 7])
  np.testing.assert_array_equal(sub_mask.keep, sub_ids.keep)
  assert sorted(np.flatnonzero(~sub_mask.keep)) == [2, 7]


@pytest.mark.parametrize(
  'ids, match',
  [
    ([99], r'ZIG ids must lie in \[0, 11\).*\[99\]'),
    ([-2], r'ZIG ids must lie in \[0, 11\).*\[-2\]'),
    ([2.9], 'must be integers in .*float64'),
    (np.zeros(5, bool), r'boolean ZIG mask must have shape \(11,\)'),
    ([[1, 2]], 'must be integers in .*shape'),
    (['a'], 'must be integers in'),
  ],
)
def test_bad_ids_are_refused_everywhere_alike(ids, match):
  """zero and construct_subnet refuse the same bad ids with the same message."""
  _, v, part = _case()
  with pytest.raises(ValueError, match=match):
    part.zero(v, ids)
  with pytest.raises(ValueError, match=match):
    oto_jax.construct_subnet(part, v, zig_ids=ids)


def test_group_of_zig_takes_one_integer_id():
  _, _, part = _case()
  assert part.group_of_zig(np.int64(7)).zig_offset <= 7
  for bad in (2.0, True, '3', [1]):
    with pytest.raises(ValueError, match='one integer ZIG id'):
      part.group_of_zig(bad)
  with pytest.raises(IndexError, match='out of range'):
    part.group_of_zig(11)


def test_traced_ids_must_be_a_mask():
  _, v, part = _case()
  mask = jnp.zeros(part.num_zigs, bool).at[3].set(True)
  chex.assert_trees_all_equal(jax.jit(part.zero)(v, mask), part.zero(v, [3]))
  with pytest.raises(ValueError, match='boolean mask'):
    jax.jit(part.zero)(v, jnp.asarray([3]))


# ---------------------------------------------------------------------------------------------
# Non-finite variables in construct_subnet.


def _with(v, path, index, value):
  """A copy of ``v`` with one entry set."""
  out = jax.tree.map(np.array, v)
  leaf = out
  for k in path:
    leaf = leaf[k]
  leaf[index] = value
  return out


def test_nan_variable_is_an_error_naming_the_leaf():
  _, v, part = _case()
  bad = _with(part.zero(v, [1]), ('params', 'Conv_1', 'kernel'), (0, 0, 0, 0), np.nan)
  with pytest.raises(oto_jax.SurgeryError, match=r'params/Conv_1/kernel.*allow_nonfinite=True'):
    oto_jax.construct_subnet(part, bad)
  all_nan = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), v)
  with pytest.raises(oto_jax.SurgeryError, match='NaN or inf'):
    oto_jax.construct_subnet(part, all_nan)


def test_allow_nonfinite_keeps_the_tainted_zigs_and_stays_exact():
  """A NaN member or an inf dependent row keeps its ZIG; the slim model equals the full one."""
  model, v, part = _case()
  zeroed = part.zero(v, [0, 1, 2])
  # ZIG 1: a NaN in the first conv's kernel column (a member); ZIG 2: inf in the second
  # conv's input row (a dependent: zero times inf is NaN in the full model too).
  bad = _with(zeroed, ('params', 'Conv_0', 'kernel'), (0, 0, 0, 1), np.nan)
  bad = _with(bad, ('params', 'Conv_1', 'kernel'), (0, 0, 2, 0), np.inf)
  with pytest.warns(UserWarning, match=r'keeps 1 ZIG\(s\) asked to go \(\[2\]'):
    sub = oto_jax.construct_subnet(part, bad, allow_nonfinite=True)  # ZIG 2 is zero: it would go
  assert sorted(np.flatnonzero(~sub.keep)) == [0]
  with pytest.warns(UserWarning, match=r'keeps 2 ZIG\(s\) asked to go \(\[1, 2\]'):
    sub_ids = oto_jax.construct_subnet(part, bad, zig_ids=[0, 1, 2], allow_nonfinite=True)
  np.testing.assert_array_equal(sub_ids.keep, sub.keep)
  full = np.asarray(model.apply(bad, X))
  slim = np.asarray(jax.jit(sub.apply)(sub.variables, X))
  np.testing.assert_allclose(slim, full, rtol=1e-5, atol=1e-6)  # NaN where the full one is NaN


def test_finite_variables_raise_no_warning():
  _, v, part = _case()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    sub = oto_jax.construct_subnet(part, part.zero(v, [4]))
  assert sorted(np.flatnonzero(~sub.keep)) == [4]


# ---------------------------------------------------------------------------------------------
# Functions the analysis cannot serve.


def test_output_that_ignores_the_variables_is_an_error():
  """Every unit would look removable: the analysis refuses, naming the likely mistake."""
  model, v, _ = _case()
  with pytest.raises(oto_jax.AnalysisError, match='does not depend on any trainable variable'):
    oto_jax.zig_partition(lambda variables, x: x.mean(axis=(1, 2)) @ jnp.ones((3, 3)), v, X)
  # Through a scan and a cond the dependence is still seen.

  def looped(variables, x):
    w = variables['params']['Dense_0']['kernel'][:3]
    x = x.mean(axis=(1, 2))
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=2)
    return jax.lax.cond(True, lambda a: a, lambda a: -a, y)

  oto_jax.zig_partition(looped, v, X)


# ---------------------------------------------------------------------------------------------
# A restored, exported slim model says what it takes.


def test_exported_subnet_names_the_shape_it_takes(tmp_path):
  _, v, part = _case()
  sub = oto_jax.construct_subnet(part, part.zero(v, [1, 6]))
  oto_jax.save_subnet(str(tmp_path / 'poly'), sub)
  restored = oto_jax.load_subnet(str(tmp_path / 'poly'))
  want = sub.apply(sub.variables, X[:3])
  np.testing.assert_allclose(restored.apply(restored.variables, X[:3]), want, rtol=1e-5)
  takes = r'input \[0\] of shape \(b, 8, 8, 3\); got \(2, 8, 8, 4\)'
  with pytest.raises(oto_jax.ShapeSpecificError, match=takes):
    restored.apply(restored.variables, jnp.zeros((2, 8, 8, 4)))
  with pytest.raises(oto_jax.ShapeSpecificError, match='as float32; got int32. Cast it first'):
    restored.apply(restored.variables, jnp.zeros((2, 8, 8, 3), jnp.int32))
  # Exported at fixed shapes: the error says so and how to get a symbolic batch.
  blob = oto_jax.export_subnet(sub, polymorphic=False)
  fixed = oto_jax.ExportedSubnet(restored.variables, blob, restored.removed_zig_ids)
  with pytest.raises(oto_jax.ShapeSpecificError, match=r'\(4, 8, 8, 3\); got \(3, 8, 8, 3\).*fixed shapes'):
    fixed.apply(fixed.variables, X[:3])
