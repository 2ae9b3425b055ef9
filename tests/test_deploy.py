"""Deployment transforms: BatchNorm folding, dead-code removal, rounded widths, PyTorch twins.

Every deployed or rounded slim model is checked against the slim model it came from (float32,
1e-5 relative) at the analysed batch and another one, and against the zeroed full model.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oto_jax
from experiments import models
from experiments.bench_subnet import contraction_times, trained_stats
from oto_jax import ir
from oto_jax.primitives.contractions import bind_conv
from oto_jax.surgery import subnet_of
from tests import arch

RTOL = 1e-5


def _names(subnet: oto_jax.Subnet) -> collections.Counter:
  return collections.Counter(e.name for e in ir.iter_eqns(subnet.program.steps))


def _trained_stats(variables):
  """Running statistics away from init's (mean 0, var 1), so that folding has work to do."""
  return {**variables, 'batch_stats': trained_stats(variables['batch_stats'])}


def _close(want, got, what: str):
  want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
  err = float(np.max(np.abs(want - got))) / float(np.max(np.abs(want)))
  assert err <= RTOL, f'{what}: max relative error {err:.2e}'


def _cut(forward, x, *, every: int = 3):
  """(built, partition, variables, zeroed variables, subnet) with every ``every``-th ZIG removed."""
  built = arch.build('linen', forward, x[:2])
  variables = _trained_stats(built.variables)
  part = oto_jax.zig_partition(built.apply_fn, variables, x[:2], polymorphic_shapes=('b, ...',))
  ids = np.arange(0, part.num_zigs, every)
  zeroed = part.zero(variables, ids)
  return built, part, variables, zeroed, oto_jax.construct_subnet(part, zeroed, zig_ids=ids)


def _layer_scale(L, x):
  gamma = L.param('gamma', (x.shape[-1],))
  return x * (1.0 + gamma)


def cnn(L, x):
  """Conv + BN, a depthwise conv + BN, a biased conv + BN, a residual, LayerScale, a dense + BN."""
  x = jax.nn.relu(L.batch_norm(L.conv(x, 12, 3, use_bias=False)))
  x = jax.nn.relu(L.batch_norm(L.conv(x, 12, 3, groups=12, use_bias=False)))
  y = L.batch_norm(L.conv(jax.nn.relu(L.conv(x, 8, 3)), 12, 1))
  x = jax.nn.relu(x + _layer_scale(L, y))
  h = L.batch_norm(L.dense(x.mean(axis=(1, 2)), 16))
  return L.dense(jax.nn.relu(h), 10)


def test_deploy_folds_batchnorm_and_keeps_outputs():
  """Every inference BatchNorm after a contraction folds into it (no `sub` left, one `mul`
  per contraction fewer), at the same outputs for every batch size; the variables are the
  subnet's own."""
  x = jax.random.normal(jax.random.key(0), (7, 8, 8, 3))
  built, part, _, zeroed, sub = _cut(cnn, x)
  dep = oto_jax.deploy_subnet(sub)
  assert dep.variables is sub.variables and dep.partition is part
  before, after = _names(sub), _names(dep)
  assert before['sub'] == 4 and after['sub'] == 0, (before, after)
  # 4 BatchNorms, and LayerScale's per-channel factor, leave the activations.
  assert before['mul'] - after['mul'] == 5, (before, after)
  assert sum(after.values()) < sum(before.values())
  for n in (2, 7):
    _close(sub.apply(sub.variables, x[:n]), dep.apply(dep.variables, x[:n]), f'folded vs cut, batch {n}')
    _close(
      built.apply_fn(zeroed, x[:n]), jax.jit(dep.apply)(dep.variables, x[:n]), f'folded vs full, batch {n}'
    )


def test_train_mode_batchnorm_is_not_folded():
  """Batch statistics come from the inputs: nothing to fold. The running-statistics updates
  that this function drops are dead code."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))

  def forward(L, x):
    return L.dense(jax.nn.relu(L.batch_norm(L.conv(x, 8, 3))).mean(axis=(1, 2)), 3)

  built = arch.build('linen', forward, x)
  variables = built.variables

  def train_apply(v, x):
    return built.module.apply(v, x, train=True, mutable=['batch_stats'])[0]

  part = oto_jax.zig_partition(train_apply, variables, x)
  sub = oto_jax.construct_subnet(part, part.zero(variables, [0, 3]), zig_ids=[0, 3])
  assert _names(oto_jax.deploy_subnet(sub, drop_dead_code=False)) == _names(sub)
  dep = oto_jax.deploy_subnet(sub)
  before, after = _names(sub), _names(dep)
  assert after['sub'] == before['sub'] and after['rsqrt'] == before['rsqrt'], (before, after)
  assert after['mul'] == before['mul'] - 4, (before, after)  # momentum updates of mean and var
  chex.assert_trees_all_close(dep.apply(dep.variables, x), sub.apply(sub.variables, x), rtol=RTOL)


@pytest.mark.parametrize(
  'chain',
  [
    lambda y, p: (y - p['m']) / p['s'] * p['g'] + p['b'],
    lambda y, p: p['b'] - 2.0 * y,
    lambda y, p: -(y * p['g'] + p['b']),
    lambda y, p: (y + p['b']) * p['g'],
  ],
  ids=['bn-like', 'rsub', 'neg', 'shift-then-scale'],
)
def test_fold_chains_of_a_dot(chain):
  """Scales, shifts, reversed subtractions and negations after a dot_general fold; values equal."""
  k = jax.random.split(jax.random.key(1), 6)
  p = {
    'w': jax.random.normal(k[0], (6, 5)),
    'm': jax.random.normal(k[1], (5,)),
    's': 1.0 + jax.random.uniform(k[2], (5,)),
    'g': jax.random.normal(k[3], (5,)),
    'b': jax.random.normal(k[4], (5,)),
    'v': jax.random.normal(k[5], (5, 3)),
  }

  def f(p, x):
    return jnp.tanh(chain(x @ p['w'], p)) @ p['v']

  x = jax.random.normal(jax.random.key(2), (4, 6))
  part = oto_jax.zig_partition(f, p, x, polymorphic_shapes=('b, _',))
  sub = oto_jax.construct_subnet(part, part.zero(p, [1]), zig_ids=[1])
  dep = oto_jax.deploy_subnet(sub)
  assert _names(dep)['mul'] + _names(dep)['div'] < _names(sub)['mul'] + _names(sub)['div']
  for n in (4, 9):
    xs = jax.random.normal(jax.random.key(n), (n, 6))
    _close(sub.apply(sub.variables, xs), dep.apply(dep.variables, xs), f'batch {n}')


def test_factors_that_vary_elsewhere_are_not_folded():
  """A weight that varies along a spatial axis, and a factor computed from the inputs, are no
  per-channel affine map: they stay as they are."""

  def f(p, x):
    y = jax.lax.conv_general_dilated(x, p['k'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y * p['mask'] * jnp.mean(x)  # (1, H, W, 1) weight, then an input-dependent scalar
    return y.sum(axis=(1, 2)) @ p['w']

  k = jax.random.split(jax.random.key(3), 3)
  p = {
    'k': jax.random.normal(k[0], (3, 3, 2, 4)),
    'mask': jax.random.normal(k[1], (1, 5, 5, 1)),
    'w': jax.random.normal(k[2], (4, 3)),
  }
  x = jax.random.normal(jax.random.key(4), (2, 5, 5, 2))
  part = oto_jax.zig_partition(f, p, x)
  sub = oto_jax.construct_subnet(part, part.zero(p, [2]), zig_ids=[2])
  dep = oto_jax.deploy_subnet(sub)
  assert _names(dep) == _names(sub)
  _close(sub.apply(sub.variables, x), dep.apply(dep.variables, x), 'unfolded')


def test_dead_code_is_dropped_and_effects_stay():
  """A result nothing reads goes (with what only it needed); a debug callback stays and runs."""
  seen = []

  def f(p, x):
    h = jax.nn.relu(x @ p['w1'])
    _unused = jnp.sin(h) @ p['w2']
    jax.debug.callback(lambda v: seen.append(float(v)), h.sum())
    return h @ p['w3']

  k = jax.random.split(jax.random.key(5), 3)
  p = {
    'w1': jax.random.normal(k[0], (4, 8)),
    'w2': jax.random.normal(k[1], (8, 8)),
    'w3': jax.random.normal(k[2], (8, 2)),
  }
  x = jax.random.normal(jax.random.key(6), (3, 4))
  part = oto_jax.zig_partition(f, p, x)
  sub = oto_jax.construct_subnet(part, p, zig_ids=[])
  dep = oto_jax.deploy_subnet(sub, fold_batchnorm=False)
  before, after = _names(sub), _names(dep)
  assert before['sin'] == 1 and after['sin'] == 0, (before, after)
  assert after['dot_general'] == before['dot_general'] - 1
  assert after['debug_callback'] == 1
  seen.clear()
  _close(sub.apply(sub.variables, x), jax.block_until_ready(dep.apply(dep.variables, x)), 'dead code')
  assert len(seen) == 2, seen  # the callback ran in both programs


def test_group_divisible_rounds_widths_up_with_zeroed_zigs():
  """Kept widths become multiples of 4 (or the full width); the kept-back ZIGs are zero, so the
  rounded slim model computes what the unrounded one does."""
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
  built, part, variables, zeroed, sub = _cut(cnn, x, every=2)
  ids = np.asarray(sub.removed_zig_ids)
  rounded = oto_jax.construct_subnet(part, zeroed, zig_ids=ids, group_divisible=4)
  widths = [w for _, _, w in rounded.report().widths]
  sizes = [g.size for g in part.prunable_groups]
  assert all(w % 4 == 0 or w == s for w, s in zip(widths, sizes)), (widths, sizes)
  assert all(r >= w for r, (_, _, w) in zip(widths, sub.report().widths))
  assert rounded.report().flops[1] > sub.report().flops[1]
  assert (rounded.keep & ~sub.keep).any()
  for n in (2, 5):
    _close(sub.apply(sub.variables, x[:n]), rounded.apply(rounded.variables, x[:n]), f'rounded, batch {n}')
  # From variables that are not zeroed: construct_subnet zeroes the ZIGs it keeps back.
  direct = oto_jax.construct_subnet(part, variables, zig_ids=ids, group_divisible=4)
  _close(built.apply_fn(zeroed, x), direct.apply(direct.variables, x), 'rounded from unzeroed variables')
  with pytest.raises(ValueError, match='group_divisible'):
    oto_jax.construct_subnet(part, zeroed, zig_ids=ids, group_divisible=0)


def test_export_folds_by_default():
  """export_subnet exports the deployed program; it takes the subnet's own variable leaves."""
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  *_, sub = _cut(cnn, x)
  leaves = jax.tree_util.tree_leaves(sub.variables)
  want = sub.apply(sub.variables, x)
  folded = oto_jax.export_subnet(sub)
  plain = oto_jax.export_subnet(sub, fold_batchnorm=False)

  def activation_subtracts(exported):  # with the symbolic batch in their type
    return sum(
      'stablehlo.subtract' in line and 'tensor<?x' in line for line in exported.mlir_module().splitlines()
    )

  assert activation_subtracts(folded) == 0 and activation_subtracts(plain) == 4
  for exported in (folded, plain):
    _close(want, exported.call(leaves, (x,), {}), 'exported')


# ---------------------------------------------------------------------------------------------
# Measured lowering (tune_inputs).


def convs(L, x):
  """A 3×3 conv + BN, a grouped conv (no dot lowering), a 1×1 conv, a strided conv to 2×2."""
  x = jax.nn.relu(L.batch_norm(L.conv(x, 12, 3, use_bias=False)))
  x = jax.nn.relu(L.conv(x, 12, 3, groups=4))
  x = jax.nn.relu(L.conv(x, 16, 1))
  x = jax.nn.relu(L.conv(x, 16, 3, strides=4))
  return L.dense(x.reshape(x.shape[0], -1), 10)


@pytest.fixture(scope='module')
def tuned():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  built, part, _, zeroed, sub = _cut(convs, x)
  return x, built, zeroed, sub, oto_jax.deploy_subnet(sub, tune_inputs=(x,), tune_repeats=1, progress=False)


def test_tuning_keeps_outputs_at_every_batch(tuned):
  """The tuned subnet computes the cut one at the tuning batch and at others, eagerly and
  under a jit with its options; the full model agrees."""
  x, built, zeroed, sub, dep = tuned
  for n in (2, 6):
    want = sub.apply(sub.variables, x[:n])
    _close(want, dep.apply(dep.variables, x[:n]), f'tuned vs cut, batch {n}')
    jitted = jax.jit(dep.apply, compiler_options=dep.compiler_options or None)
    _close(want, jitted(dep.variables, x[:n]), f'tuned under jit, batch {n}')
    _close(built.apply_fn(zeroed, x[:n]), dep.apply(dep.variables, x[:n]), f'tuned vs full, batch {n}')


def test_tuning_records_and_applies_its_choices(tuned):
  """Every convolution is timed as each lowering that applies (the grouped one has no dot, only
  the 3×3 stride-1 one has Winograd),
  the faster is chosen and is what the program runs; every option set of this backend was
  timed and the fastest's options are the subnet's."""
  x, *_, sub, dep = tuned
  t = dep.tuning
  assert t.shapes == (x.shape,)
  assert len(t.convs) == 4
  assert [set(c.ms) for c in t.convs] == [
    {'conv', 'dot', 'winograd'},
    {'conv'},
    {'conv', 'dot'},
    {'conv', 'dot'},
  ]
  clear = f', {oto_jax.tuning.CLEAR_WIN_LABEL}'
  margin = oto_jax.tuning.CLEAR_WIN if t.label.endswith(clear) else 1.0
  for c in t.convs:
    assert c.chosen == oto_jax.tuning.choose(c, margin)
  labels = [label for label, _ in oto_jax.tuning.option_sets(jax.default_backend())]
  names = [n for label in labels for n in (label, f'{label}, BatchNorm not folded')]
  # The clear-wins plan is timed once, under the fastest of the others, if it differs from it.
  assert list(t.program_ms)[: len(names)] == names
  assert [n.removesuffix(clear) for n in list(t.program_ms)[len(names) :]] in (
    [],
    [min(names, key=t.program_ms.get)],
  )
  base = t.label.removesuffix(clear)
  assert t.folded == (base in labels)
  assert t.program_ms[t.label] == min(ms for ms in t.program_ms.values() if ms is not None)
  chosen_set = base.removesuffix(', BatchNorm not folded')
  assert dep.compiler_options == dict(oto_jax.tuning.option_sets(jax.default_backend()))[chosen_set]
  assert _names(dep)['sub'] == (0 if t.folded else 1)  # the BatchNorm after the first conv
  # The program binds a convolution exactly where 'conv' was chosen.
  kept = sum(c.chosen == 'conv' for c in t.convs)
  assert sum(e.primitive.name == 'conv_general_dilated' for e in dep.jaxpr.jaxpr.eqns) == kept
  assert 'conv ms' in t.markdown() and t.label in str(t)
  # Page faults of the chosen program's calls are counted where the platform counts them.
  assert (t.page_faults is None) == (oto_jax.tuning.minor_faults() is None)
  assert t.page_faults is None or t.page_faults >= 0
  assert '1,234 pages' in dataclasses.replace(t, page_faults=1234.0).markdown()
  assert 'pages' not in dataclasses.replace(t, page_faults=0.0).markdown()
  # Deploying a tuned subnet again keeps its tuning; the untuned subnet has none.
  assert oto_jax.deploy_subnet(dep).tuning is t and sub.tuning is None and sub.compiler_options == {}


@pytest.mark.skipif(
  oto_jax.tuning.minor_faults() is None,
  reason='no resource module on this platform (Windows): page faults are not counted',
)
def test_minor_faults_count_first_touches():
  """Touching 64 MB of fresh memory faults pages in (fewer with transparent huge pages)."""
  before = oto_jax.tuning.minor_faults()
  fresh = np.ones(16 * 2**20, np.float32)
  assert oto_jax.tuning.minor_faults() > before
  del fresh


def test_clear_wins_plan(tuned, monkeypatch):
  """With timings where the dot wins one convolution by far and two by a little, the plan with
  a margin keeps only the far win; the tuner times it under the fastest option set, and the
  program binds what the record says."""
  x, *_, sub, _ = tuned
  real = oto_jax.tuning.time_convs

  def fake(operands, options, repeats, on_each=lambda: None):
    gains = iter([1.1, 10.0, 1.1])  # the dot faster by 10%, 10×, 10% (the grouped conv has none)
    out = {}
    for e, t in real(operands, options, 1, on_each).items():
      ms = {'conv': 1.0, 'dot': 1.0 / next(gains)} if 'dot' in t.ms else {'conv': 1.0}
      out[e] = dataclasses.replace(t, ms=ms, chosen=min(ms, key=ms.get))
    return out

  leaves = sub._variable_leaves(sub.variables)
  timings = fake(oto_jax.tuning.conv_operands(sub.program, leaves, [x]), {}, 1)
  want = sub.apply(sub.variables, x)
  for margin, lowerings in ((1.0, 'dcdd'), (oto_jax.tuning.CLEAR_WIN, 'ccdc')):
    program, convs = oto_jax.tuning.lower_convs(sub.program, timings, margin)
    assert ''.join(c.chosen[0] for c in convs) == lowerings
    got = subnet_of(sub.partition, sub.keep, sub.variables, program, sub._cut)
    assert sum(e.primitive.name == 'conv_general_dilated' for e in got.jaxpr.jaxpr.eqns) == lowerings.count(
      'c'
    )
    _close(want, got.apply(sub.variables, x), f'margin {margin}')

  monkeypatch.setattr(oto_jax.tuning, 'time_convs', fake)
  t = oto_jax.deploy_subnet(sub, tune_inputs=(x,), tune_repeats=1, progress=False).tuning
  clear = f', {oto_jax.tuning.CLEAR_WIN_LABEL}'
  names = list(t.program_ms)
  assert len(names) == 2 * len(oto_jax.tuning.option_sets(jax.default_backend())) + 1
  assert names[-1] == min(names[:-1], key=t.program_ms.get) + clear
  assert ''.join(c.chosen[0] for c in t.convs) == ('ccdc' if t.label == names[-1] else 'dcdd')


def test_benchmark_layer_table_names_the_tuned_lowerings(tuned):
  """bench_subnet's per-layer table times every contraction of a tuned program as bound and
  names each convolution's lowering from the tuning record, folded or not."""
  *_, dep = tuned
  # Deployed again, the tuned program is folded whatever the tuner chose, and keeps its record.
  for d in (dep, oto_jax.deploy_subnet(dep)):
    rows = contraction_times(d, 1, d.compiler_options)
    convs = [r['op'] for r in rows if r['op'].startswith('conv_general_dilated')]
    assert convs == [f'conv_general_dilated as {c.chosen}' for c in d.tuning.convs]
    assert [r['op'] for r in rows if not r['op'].startswith('conv')] == ['dot_general']
    assert all(r['ms'] > 0 and r['gflops'] > 0 for r in rows)


def test_forced_lowerings_compute_the_same(tuned):
  """Every convolution forced to each lowering gives the cut subnet's outputs; one a lowering
  does not compute stays a convolution (the grouped one: its patches would mix the groups;
  Winograd: all but the 3×3, stride-1 one), also exported with a symbolic batch."""
  x, *_, sub, _ = tuned
  operands = oto_jax.tuning.conv_operands(sub.program, sub._variable_leaves(sub.variables), [x])
  # At the tuning batch, with the slim kernels.
  kernels = sorted(k.shape for k in jax.tree_util.tree_leaves(sub.variables) if k.ndim == 4)
  assert [specs[0].shape[0] for specs, _ in operands.values()] == [6] * 4
  assert sorted(specs[1].shape for specs, _ in operands.values()) == kernels
  want = sub.apply(sub.variables, x)
  leaves = jax.tree_util.tree_leaves(sub.variables)
  for how, convs_left in (('conv', 4), ('dot', 1), ('winograd', 3)):

    def force(e, how=how):
      if e.name != 'conv_general_dilated':
        return e
      return dataclasses.replace(e, entry=e.entry.replace(bind=functools.partial(bind_conv, how)))

    program = dataclasses.replace(sub.program, steps=ir.map_eqns(sub.program.steps, force))
    got = subnet_of(sub.partition, sub.keep, sub.variables, program, sub._cut)
    assert sum(e.primitive.name == 'conv_general_dilated' for e in got.jaxpr.jaxpr.eqns) == convs_left
    _close(want, got.apply(sub.variables, x), f'every convolution as {how}')
    # Exported with the batch symbolic, the lowering runs at other batch sizes too.
    exported = oto_jax.export_subnet(got, fold_batchnorm=False)
    for n in (1, 5):
      _close(
        sub.apply(sub.variables, x[:n]), exported.call(leaves, (x[:n],), {}), f'{how}, exported, batch {n}'
      )


def test_saved_tuned_subnet_keeps_its_options(tuned, tmp_path):
  """save_subnet writes the chosen XLA options; the exported subnet compiles with them."""
  x, *_, dep = tuned
  oto_jax.save_subnet(str(tmp_path / 's'), dep)
  loaded = oto_jax.load_subnet(str(tmp_path / 's'))
  assert dict(loaded.compiler_options) == dep.compiler_options
  _close(dep.apply(dep.variables, x), loaded.apply(loaded.variables, x), 'saved and restored')


def test_option_sets_xla_refuses_are_skipped(tuned, monkeypatch):
  """An XLA that does not know an option (another jax version) refuses it: the set is recorded
  as refused and the others still compete."""
  x, *_, sub, _ = tuned
  sets = (('XLA defaults', {}), ('unknown', {'xla_cpu_no_such_option': True}))
  monkeypatch.setattr(oto_jax.tuning, 'option_sets', lambda backend: sets)
  dep = oto_jax.deploy_subnet(sub, tune_inputs=(x,), tune_repeats=1, progress=False)
  assert dep.tuning.program_ms['unknown'] is None and dep.tuning.label.startswith('XLA defaults')
  assert dep.compiler_options == {}
  _close(sub.apply(sub.variables, x), dep.apply(dep.variables, x), 'tuned with a refused set')


def test_tuning_takes_the_analysed_keywords():
  """A model analysed with a static keyword is tuned with it (``tune_kwargs``); without it the
  signature check names the missing argument."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  built = arch.build('linen', convs, x)

  def apply(v, x, *, double=False):
    y = built.apply_fn(v, x)
    return 2.0 * y if double else y

  part = oto_jax.zig_partition(apply, built.variables, x, double=True)
  sub = oto_jax.construct_subnet(part, part.zero(built.variables, [0, 2]), zig_ids=[0, 2])
  dep = oto_jax.deploy_subnet(
    sub, tune_inputs=(x,), tune_kwargs={'double': True}, tune_repeats=1, progress=False
  )
  _close(sub.apply(sub.variables, x, double=True), dep.apply(dep.variables, x, double=True), 'tuned')
  with pytest.raises(oto_jax.ShapeSpecificError, match=r"'double'.*tune_kwargs"):
    oto_jax.deploy_subnet(sub, tune_inputs=(x,), tune_repeats=1, progress=False)


def test_tune_inputs_must_be_a_tuple(tuned):
  x, *_, sub, _ = tuned
  with pytest.raises(TypeError, match=r'tuple of apply'):
    oto_jax.deploy_subnet(sub, tune_inputs=x)


# ---------------------------------------------------------------------------------------------
# The PyTorch twins that bench_subnet times: the same functions as the JAX models.


@pytest.mark.parametrize(
  'make',
  [
    functools.partial(models.VGG, cfg=(8, 'M', 16, 'M', 16, 'M', 'M', 'M')),
    functools.partial(models.ResNet, stage_sizes=(1, 1), width=4, num_classes=10, cifar_stem=True),
  ],
  ids=['vgg', 'resnet'],
)
def test_torch_twins_compute_the_jax_models(make):
  torch_reference = pytest.importorskip('experiments.torch_reference')  # needs torch
  model = make()
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  variables = _trained_stats(model.init(jax.random.key(1), x))
  part = oto_jax.zig_partition(model.apply, variables, x)
  ids = np.arange(0, part.num_zigs, 3)
  zeroed = part.zero(variables, ids)
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  for v, want in ((zeroed, model.apply(zeroed, x)), (sub.variables, sub.apply(sub.variables, x))):
    net = torch_reference.twin(model, jax.tree.map(np.asarray, v))
    for channels_last in (False, True):
      got = torch_reference.runner(net, channels_last)(torch_reference.to_torch(x, channels_last))
      np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_torch_twin_rejects_other_models():
  torch_reference = pytest.importorskip('experiments.torch_reference')
  with pytest.raises(ValueError, match='No PyTorch twin'):
    torch_reference.twin(models.ResNet18(cifar_stem=True), {'params': {}, 'batch_stats': {}})


def test_deploy_leaves_linen_dense_models_alone():
  """Dense + bias only (no scale): nothing folds, nothing changes."""
  model = nn.Dense(4)
  x = jnp.ones((2, 3))
  v = model.init(jax.random.key(0), x)
  part = oto_jax.zig_partition(model.apply, v, x)
  sub = oto_jax.construct_subnet(part, v, zig_ids=[])
  assert _names(oto_jax.deploy_subnet(sub)) == _names(sub)
