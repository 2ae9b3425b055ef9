"""The optax contract, for every optimizer and every composable block (a conformance matrix).

Each transform runs on one small MLP, written three ways (Flax linen params, an NNX
``nnx.Param`` state, a plain dict of arrays), and must: compile once across its stages,
equal itself under ``optax.inject_hyperparams`` with every float hyperparameter edited in
the state, take extra arguments (``value=loss``) and compose with optax's extra-args
transforms, run with donated buffers, keep float32 / bfloat16 / float16 params in their
dtype, leave its inputs untouched, and hold zero ZIGs at exactly zero once pruning is on —
also when the gradient there is NaN or inf.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import oto_jax

FAST = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else {}
STEPS = 8  # pruning is on from step 2 and HESSO's two periods end by step 6
IN, HIDDEN, OUT = 5, 6, 3


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(jax.nn.relu(nn.Dense(HIDDEN)(x)))


class _NNX(nnx.Module):
  def __init__(self, rngs):
    self.a, self.b = nnx.Linear(IN, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)))


def _plain(p, x):
  return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2']


X = jnp.asarray(np.random.default_rng(0).standard_normal((16, IN)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((16, OUT)), jnp.float32)


@functools.cache
def problem(tree: str):
  """(partition, params, loss(params)) for one way of writing the MLP."""
  if tree == 'linen':
    model = _Linen()
    v = model.init(jax.random.key(0), X)
    part = oto_jax.zig_partition(model.apply, v, X)
    return part, v['params'], lambda p: jnp.mean((model.apply({'params': p}, X) - Y) ** 2)
  if tree == 'nnx':
    graphdef, state = nnx.split(_NNX(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    part = oto_jax.zig_partition(fn, state, X)
    return part, state, lambda s: jnp.mean((fn(s, X) - Y) ** 2)
  rng = np.random.default_rng(2)
  p = {
    'w1': jnp.asarray(rng.standard_normal((IN, HIDDEN)), jnp.float32),
    'b1': jnp.asarray(rng.standard_normal(HIDDEN), jnp.float32),
    'w2': jnp.asarray(rng.standard_normal((HIDDEN, OUT)), jnp.float32),
  }
  return oto_jax.zig_partition(_plain, p, X), p, lambda p: jnp.mean((_plain(p, X) - Y) ** 2)


# name: (factory(partition, **hyper), its hyperparameters, whether it holds zero ZIGs at zero).
# Prox-SG and the group-lasso blocks let a zero group grow back by design (the proximal
# step has no memory of zero), so for them a zero ZIG is not held.
MATRIX = {
  'hspg': (oto_jax.hspg, dict(learning_rate=0.1, lmbda=1.0, n_p=2, epsilon=0.8, momentum=0.5), True),
  'hspg_prox': (
    functools.partial(oto_jax.hspg, stage1='prox'),
    dict(learning_rate=0.1, lmbda=2.0, n_p=2, epsilon=0.8, weight_decay=1e-3),
    True,
  ),
  'prox_sg': (oto_jax.prox_sg, dict(learning_rate=0.1, lmbda=0.05, momentum=0.5), False),
  'dhspg': (
    oto_jax.dhspg,
    dict(learning_rate=0.1, target_group_sparsity=0.5, start_pruning_step=2, lmbda=5.0, epsilon=0.9),
    True,
  ),
  'hesso_sgd': (
    oto_jax.hesso,
    dict(
      learning_rate=0.1,
      target_group_sparsity=0.5,
      start_pruning_step=2,
      pruning_steps=4,
      pruning_periods=2,
      momentum=0.5,
      weight_decay=1e-3,
    ),
    True,
  ),
  'hesso_adamw': (
    functools.partial(oto_jax.hesso, variant='adamw'),
    dict(
      learning_rate=0.05,
      target_group_sparsity=0.5,
      start_pruning_step=2,
      pruning_steps=4,
      pruning_periods=2,
      b1=0.8,
      b2=0.99,
      eps=1e-6,
      weight_decay=1e-3,
    ),
    True,
  ),
  'add_group_lasso': (oto_jax.add_group_lasso, dict(lmbda=0.05, start_step=1), False),
  'group_lasso_prox': (oto_jax.group_lasso_prox, dict(lmbda=0.05, learning_rate=0.1), False),
  'half_space_projection': (oto_jax.half_space_projection, dict(epsilon=0.95, start_step=2), True),
}
# A block alone is not an optimizer: it runs before or after a plain SGD step (the
# projection after a group-lasso SGD step, which drives ZIGs toward zero).
BLOCKS = {
  'add_group_lasso': lambda part, block: (block, optax.sgd(0.1)),
  'group_lasso_prox': lambda part, block: (optax.sgd(0.1), block),
  'half_space_projection': lambda part, block: (oto_jax.add_group_lasso(part, 0.5), optax.sgd(0.1), block),
}
# Where the block's own state sits in the chain's.
BLOCK_INDEX = {'add_group_lasso': 0, 'group_lasso_prox': 1, 'half_space_projection': 2}
NAMES = sorted(MATRIX)
TREES = ('linen', 'nnx', 'dict')


def build(name: str, part, factory=None, **changes) -> optax.GradientTransformation:
  make, hyper, _ = MATRIX[name]
  tx = (factory or make)(part, **{**hyper, **changes})
  return optax.chain(*BLOCKS[name](part, tx)) if name in BLOCKS else tx


def run(tx, params, loss, *, edit=None, **options):
  """``STEPS`` jitted steps; ``edit(state)`` before the first: (params, state, params per step)."""
  return run_edits(tx, params, loss, (edit,), **options)[0]


def run_edits(tx, params, loss, edits, *, poison=None, dtype=None, donate=False, **extra):
  """One compiled step, one run per edit; ``poison(i, grads)`` changes the gradient of step i."""
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else (), compiler_options=FAST)
  @chex.assert_max_traces(n=1)
  def step(params, state, i):
    as_f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
    value, grads = jax.value_and_grad(lambda p: loss(as_f32(p)))(params)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if poison is not None:
      grads = poison(i, grads)
    updates, state = tx.update(grads, state, params, **{k: value for k in extra})
    return optax.apply_updates(params, updates), state

  chex.clear_trace_counter()
  out = []
  for edit in edits:
    p, state = params, tx.init(params)
    if edit is not None:
      state = edit(state)
    if donate:
      p = jax.tree.map(jnp.copy, p)
    history = []
    for i in range(STEPS):
      p, state = step(p, state, jnp.int32(i))
      history.append(p)
    out.append((p, state, history))
  return out


@functools.cache
def reference(name: str, tree: str):
  part, params, loss = problem(tree)
  return run(build(name, part), params, loss)


@pytest.mark.parametrize('tree', TREES)
@pytest.mark.parametrize('name', NAMES)
def test_compiles_once_and_prunes(name, tree):
  """One trace across every stage; the holding transforms end with zero ZIGs."""
  part = problem(tree)[0]
  params, _, _ = reference(name, tree)
  zero = int((np.asarray(part.zig_norms(params)) == 0).sum())
  if MATRIX[name][2]:
    assert zero > 0, (name, tree)


def _float_hypers(name: str) -> list[str]:
  return [k for k, v in MATRIX[name][1].items() if isinstance(v, float)]


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_every_float(name):
  """inject_hyperparams equals the plain transform; each float edited in the state equals a
  plain transform built with the edited value."""
  part, params, loss = problem('dict')
  factory = optax.inject_hyperparams(MATRIX[name][0])
  hypers = _float_hypers(name)
  halved = {h: 0.5 * MATRIX[name][1][h] for h in hypers}

  def edit(h):
    def fn(state):
      inner = state[BLOCK_INDEX[name]] if name in BLOCKS else state
      inner.hyperparams[h] = jnp.asarray(halved[h], inner.hyperparams[h].dtype)
      return state

    return fn

  runs = run_edits(build(name, part, factory=factory), params, loss, [None, *map(edit, hypers)])
  chex.assert_trees_all_close(runs[0][0], reference(name, 'dict')[0], rtol=1e-5, atol=1e-6)
  for h, (edited, _, _) in zip(hypers, runs[1:]):
    want, _, _ = run(build(name, part, **{h: halved[h]}), params, loss)
    chex.assert_trees_all_close(edited, want, rtol=1e-5, atol=1e-6, custom_message=f'{name}: {h}')


@pytest.mark.parametrize('name', NAMES)
def test_extra_args_and_reduce_on_plateau(name):
  """``update(..., value=loss)`` is accepted, and the transform composes with reduce_on_plateau."""
  part, params, loss = problem('dict')
  got, _, _ = run(build(name, part), params, loss, value=True)
  chex.assert_trees_all_close(got, reference(name, 'dict')[0], rtol=1e-6, atol=1e-7)
  tx = optax.chain(build(name, part), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
  got, state, _ = run(tx, params, loss, value=True)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(got))


@pytest.mark.parametrize('name', NAMES)
def test_donated_buffers(name):
  """Donating params and state changes nothing but buffer reuse."""
  part, params, loss = problem('dict')
  got, _, _ = run(build(name, part), params, loss, donate=True)
  chex.assert_trees_all_close(got, reference(name, 'dict')[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
@pytest.mark.parametrize('name', NAMES)
def test_low_precision_params_keep_their_dtype(name, dtype):
  """bfloat16 and float16 params stay in their dtype, finite, and zero ZIGs stay zero."""
  part, params, loss = problem('dict')
  got, _, history = run(build(name, part), params, loss, dtype=dtype)
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(dtype)}
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(got))
  if MATRIX[name][2]:
    _assert_zero_held(part, history, name)


def _assert_zero_held(part, history, what):
  """Once a ZIG is zero after a step at or past step 3, it stays exactly zero."""
  seen = np.zeros(part.num_zigs, bool)
  for i, params in enumerate(history):
    norms = np.asarray(part.zig_norms(params))
    assert not np.any(seen & ~(norms == 0)), (what, i, norms)
    if i >= 3:
      seen |= norms == 0


@pytest.mark.parametrize('name', [n for n in NAMES if MATRIX[n][2]])
def test_zero_zigs_stay_zero_under_nan_and_inf_gradients(name):
  """NaN into every zero ZIG's gradient and inf into a live one's: the zero ZIGs stay exactly 0."""
  part, params, loss = problem('dict')
  segments = part.segments(params)

  # The ZIGs zero in the clean run after step 4 get NaN gradients from step 5 on; ZIG ids are
  # fixed in advance so that the jitted step does not depend on the run.
  _, _, clean = reference(name, 'dict')
  zero_at_4 = np.asarray(part.zig_norms(clean[4])) == 0
  assert zero_at_4.any(), name
  live = int(np.flatnonzero(~zero_at_4)[0])
  nan_mask = jnp.asarray(zero_at_4)
  inf_mask = jnp.zeros(part.num_zigs, bool).at[live].set(True)

  def poison(i, grads):
    on = i >= 5
    grads = segments.map(lambda g, m: jnp.where(on & m, jnp.nan, g), grads, values=[nan_mask], fills=[False])
    return segments.map(lambda g, m: jnp.where(on & m, jnp.inf, g), grads, values=[inf_mask], fills=[False])

  _, _, history = run(build(name, part), params, loss, poison=poison)
  for params_i in history[5:]:
    norms = np.asarray(part.zig_norms(params_i))
    assert np.all(norms[zero_at_4] == 0), (name, norms)


@pytest.mark.parametrize('name', NAMES)
def test_inputs_are_not_modified(name):
  """NumPy params, grads and state go in; they are unchanged after init and update."""
  part, params, loss = problem('dict')
  tx = build(name, part)
  host = jax.tree.map(np.array, params)
  grads = jax.tree.map(np.ones_like, host)
  state = jax.tree.map(np.array, tx.init(host))
  copies = jax.tree.map(np.copy, (host, grads, state))
  tx.update(grads, state, host)
  chex.assert_trees_all_equal((host, grads, state), copies)


@pytest.mark.parametrize('name', ['hspg', 'dhspg', 'hesso_sgd', 'half_space_projection'])
def test_non_trainable_collections_are_refused(name):
  """The whole linen variables (with batch_stats) given to an optimizer: a clear error."""

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(OUT)(jax.nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(HIDDEN)(x))))

  model = BN()
  v = model.init(jax.random.key(0), X)
  part = oto_jax.zig_partition(model.apply, v, X)
  tx = MATRIX[name][0](part, **MATRIX[name][1])
  with pytest.raises(ValueError, match='non-trainable.*batch_stats'):
    tx.init(v)
  tx.init(v['params'])
