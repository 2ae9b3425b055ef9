"""The training CLI on tiny runs: configs, reproducibility, resume, and its data errors."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oto_jax
from experiments import baselines, data, models, reports, train
from experiments.configs import CONFIGS
from tests.fakes import write_fake_cifar, write_fake_imagenet, write_fake_squad

TINY = dict(epochs=2, start_pruning_epoch=0, pruning_epochs=2, pruning_periods=2, lr_decay_epochs=())


def _tiny(name: str, **more):
  return CONFIGS[name].replace(**{**TINY, **more})


def test_every_config_is_known_to_the_cli():
  """Every config names a model and dataset the CLI knows."""
  for cfg in CONFIGS.values():
    assert cfg.model in models.MODELS, cfg.name
    assert cfg.dataset in ('digits', 'mnist1d', 'cifar10', 'imagenet', 'squad'), cfg.name


@pytest.mark.parametrize('name', ['digits_vgg', 'digits_resnet', 'mnist1d_cnn'])
def test_small_run_writes_results(name, tmp_path):
  """A tiny run trains, prunes to the FLOPs budget, the slim model matches the full one, and the
  L1 baseline is pruned to no more than the OTO model's FLOPs."""
  cfg = _tiny(name, dense_baseline=False, l1_prune_epoch=1)
  r = train.run_experiment(cfg, seed=0, out=str(tmp_path), progress=False)
  assert r['flops_remaining'] <= cfg.flops_keep + 1e-6
  assert abs(r['slim_acc'] - r['oto_acc']) <= 1e-3
  assert r['l1_flops_remaining'] <= r['flops_remaining'] + 1e-9
  assert len(r['l1_history']) == cfg.epochs
  for f in ('results.json', 'results.md', 'curves.png', 'widths.png', 'slim/subnet.json'):
    assert (tmp_path / f).exists(), f
  assert json.loads((tmp_path / 'results.json').read_text())['slim_acc'] == r['slim_acc']


@pytest.mark.parametrize('kind', ['hspg', 'dhspg', 'prox_sg'])
def test_other_optimizers_run(kind):
  """Each optimizer trains a couple of epochs on digits and its subnet evaluates."""
  cfg = _tiny(
    'digits_vgg',
    dense_baseline=False,
    l1_baseline=False,
    optimizer=kind,
    n_p_epoch=1,
    target_sparsity=0.3,
    flops_keep=None,
  )
  r = train.run_experiment(cfg, seed=0, out=None, progress=False)
  assert 0.0 <= r['slim_acc'] <= 1.0 and abs(r['slim_acc'] - r['oto_acc']) <= 1e-3


def test_seed_reproduces_and_resume_equals_uninterrupted(tmp_path):
  """A fixed seed reproduces a run; stopping after one epoch and resuming gives the same result."""
  cfg = _tiny('digits_vgg')
  ds = data.load(cfg, 0)
  a = train.train(cfg, 'hesso', ds, seed=0, progress=False)
  b = train.train(cfg, 'hesso', ds, seed=0, progress=False)
  chex.assert_trees_all_equal(a.variables, b.variables)
  ckpt = str(tmp_path / 'ckpt')
  train.train(cfg.replace(epochs=1), 'hesso', ds, seed=0, ckpt_dir=ckpt, progress=False)
  c = train.train(cfg, 'hesso', ds, seed=0, ckpt_dir=ckpt, resume=True, progress=False)
  chex.assert_trees_all_close(a.variables, c.variables, rtol=1e-6, atol=1e-7)
  assert [h['test_acc'] for h in a.history] == [h['test_acc'] for h in c.history]


# ---------------------------------------------------------------------------------------------
# The L1-magnitude pruning baseline.


def _digits_partition(seed=0):
  model = models.MODELS['digits_vgg'](10)
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.key(seed), x)
  return oto_jax.zig_partition(model.apply, variables, x), variables


def test_l1_importance_is_the_l1_norm_of_each_zigs_members():
  """Each ZIG's importance is the sum of |x| over its member entries, computed by hand here."""
  part, variables = _digits_partition()
  got = baselines.l1_importance(part, variables['params'])
  flat = {
    oto_jax.partition.path_of(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]
  }
  want = np.zeros(part.num_zigs)
  for g in part.prunable_groups:
    for e in g.members:
      moved = np.abs(np.moveaxis(flat[e.path], e.axis, 0))
      for k in range(g.size):
        want[g.zig_offset + k] += moved[e.index == k].sum()
  np.testing.assert_allclose(got[: len(want)], want, rtol=1e-5)


def test_l1_prune_meets_the_budget_with_one_ratio_and_the_smallest_norms():
  """The pruned model keeps at most the FLOPs asked for; every node group loses the same fraction
  (to one ZIG), always its lowest-L1 ZIGs; a FLOPs budget of 1 prunes nothing."""
  part, variables = _digits_partition()
  params = variables['params']
  importance = baselines.l1_importance(part, params)
  keep = baselines.l1_prune(part, params, 0.3)
  assert part.flops.evaluate(keep) <= 0.3 * part.flops.total
  lo, hi = 0.0, 1.0
  for g in part.prunable_groups:
    ids = g.zig_offset + np.arange(g.size)
    removed = ~keep[ids]
    n = int(removed.sum())
    assert 0 < n < g.size
    if removed.any():
      assert importance[ids][removed].max() <= importance[ids][~removed].min()
    lo, hi = max(lo, n / g.size), min(hi, (n + 1) / g.size)
  assert lo <= hi  # one ratio r with n = floor(r · size) in every group
  assert baselines.l1_prune(part, params, 1.0).all()
  with pytest.raises(ValueError, match='flops_keep'):
    baselines.l1_prune(part, params, 0.0)


def test_l1_baseline_holds_pruned_zigs_at_zero_and_resumes_exactly(tmp_path):
  """The L1 run prunes once, fine-tunes with the pruned ZIGs exactly zero, and resuming after the
  pruning epoch ends where an uninterrupted run does."""
  cfg = _tiny('digits_vgg', epochs=3, l1_prune_epoch=1)
  ds = data.load(cfg, 0)
  a = train.train(cfg, 'l1', ds, seed=0, progress=False, flops_keep=0.3)
  assert len(a.pruned_ids) > 0
  norms = np.asarray(a.partition.zig_norms(a.variables))
  np.testing.assert_array_equal(norms[a.pruned_ids], 0.0)
  assert (norms[np.setdiff1d(np.arange(a.partition.num_zigs), a.pruned_ids)] > 0).all()
  keep = np.ones(a.partition.num_zigs, bool)
  keep[a.pruned_ids] = False
  assert a.partition.flops.evaluate(keep) <= 0.3 * a.partition.flops.total
  ckpt = str(tmp_path / 'ckpt')
  train.train(cfg.replace(epochs=2), 'l1', ds, seed=0, ckpt_dir=ckpt, progress=False, flops_keep=0.3)
  c = train.train(cfg, 'l1', ds, seed=0, ckpt_dir=ckpt, resume=True, progress=False, flops_keep=0.3)
  np.testing.assert_array_equal(a.pruned_ids, c.pruned_ids)
  chex.assert_trees_all_close(a.variables, c.variables, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='flops_keep'):
    train.train(cfg, 'l1', ds, seed=0, progress=False)
  with pytest.raises(ValueError, match='prunes at epoch 3, outside'):
    train.train(cfg.replace(l1_prune_epoch=3), 'l1', ds, seed=0, progress=False, flops_keep=0.3)


# ---------------------------------------------------------------------------------------------
# The paper's set-ups, a few steps each on fake or synthetic data.


@pytest.mark.parametrize('name', ['cifar10_vgg16', 'cifar10_vgg16bn', 'cifar10_resnet50'])
def test_cifar_configs_run_on_a_fake_dataset(name, tmp_path):
  """Each CIFAR-10 set-up trains a step on a fake pickle dataset; VGG16-BN also runs end to end
  (subnet, evaluation, artefacts)."""
  write_fake_cifar(tmp_path / 'cifar', np.random.default_rng(0), train_per_batch=8)
  cfg = CONFIGS[name].replace(epochs=1, batch_size=8, dense_baseline=False, data_dir=str(tmp_path / 'cifar'))
  if name != 'cifar10_vgg16bn':
    run = train.train(cfg, cfg.optimizer, data.load(cfg, 0), seed=0, progress=False)
    assert np.isfinite(run.history[0]['loss'])
    return
  r = train.run_experiment(cfg, seed=0, out=str(tmp_path / 'out'), progress=False)
  assert len(r['oto_history']) == 1 and np.isfinite(r['oto_history'][0]['loss'])
  assert r['slim_acc'] == r['oto_acc']


def test_imagenet_config_trains_on_a_fake_image_folder(tmp_path):
  """imagenet_resnet50 reads a fake ImageNet folder (decoded lazily, cropped to 224 on device)
  and trains ResNet-50 for an epoch."""
  write_fake_imagenet(tmp_path / 'imagenet', np.random.default_rng(0), per_class=2)
  cfg = CONFIGS['imagenet_resnet50'].replace(epochs=1, batch_size=2, data_dir=str(tmp_path / 'imagenet'))
  ds = data.load(cfg, 0)
  assert ds.x_train.shape[1:] == (256, 256, 3) and ds.x_test.shape[1:] == (224, 224, 3)
  run = train.train(cfg, cfg.optimizer, ds, seed=0, progress=False)
  assert np.isfinite(run.history[0]['loss']) and run.partition.num_zigs > 0


def test_squad_config_runs_end_to_end_on_a_fake_dataset(tmp_path):
  """squad_bert (with a tiny encoder) reads a fake SQuAD directory, trains with the span loss,
  prunes, and reports exact match and F1 for the full and the slim model, which agree."""
  write_fake_squad(tmp_path / 'squad')
  tiny = dict(encoder=dict(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32))
  cfg = CONFIGS['squad_bert'].replace(
    epochs=1, batch_size=1, n_p_epoch=0, model_kwargs=tiny, data_dir=str(tmp_path / 'squad')
  )
  r = train.run_experiment(cfg.replace(dense_baseline=False), seed=0, out=None, progress=False)
  assert np.isfinite(r['oto_history'][0]['loss'])
  assert r['slim_squad'] == r['oto_squad'] and 0.0 <= r['oto_squad']['f1'] <= 100.0
  assert 'SQuAD dev EM / F1' in reports.markdown(r)


_SHARDED_RUN = """
import json
import jax
import numpy as np
from jax.sharding import Mesh
from experiments import data, train
from tests.test_train import _tiny

assert len(jax.devices()) == 8, jax.devices()
cfg = _tiny('digits_vgg', epochs=1)  # HESSO prunes once within the epoch
ds = data.load(cfg, 0)
one = train.train(cfg, 'hesso', ds, seed=0, progress=False, mesh=Mesh(np.array(jax.devices()[:1]), ('data',)))
zero = lambda v: np.asarray(one.partition.zig_norms(v)) == 0
report = {'pruned': int(zero(one.variables).sum())}
for fsdp in (False, True):
  run = train.train(cfg, 'hesso', ds, seed=0, fsdp=fsdp, progress=False)
  gap = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  diffs = jax.tree.map(gap, run.variables, one.variables)
  report[f'fsdp={fsdp}'] = {
    'max_diff': max(jax.tree_util.tree_leaves(diffs)),
    'same_zero_zigs': bool((zero(run.variables) == zero(one.variables)).all()),
  }
print('REPORT', json.dumps(report))
"""


def test_training_on_8_devices_matches_one_device():
  """The CLI's training, data-parallel and with --fsdp over 8 host devices (a fresh process), ends
  where the same process's one-device run ends, with the same ZIGs pruned."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parent.parent
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'PYTHONPATH': str(root)}
  proc = subprocess.run(
    [sys.executable, '-c', _SHARDED_RUN], env=env, cwd=root, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.split('REPORT ', 1)[1])
  assert report['pruned'] > 0, report
  for mode in ('fsdp=False', 'fsdp=True'):
    assert report[mode]['same_zero_zigs'], report
    assert report[mode]['max_diff'] < 1e-4, report


def test_two_process_cli_run_matches_one_process(tmp_path):
  """The CLI as two processes of 2 host devices each (jax.distributed over Gloo) trains, slices and
  saves the slim model that one process computes."""
  import os
  import socket
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parent.parent
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  sets = ['epochs=1', 'start_pruning_epoch=0', 'pruning_epochs=1', 'pruning_periods=1', 'lr_decay_epochs=()']
  sets += ['dense_baseline=False', 'l1_baseline=False']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'PYTHONPATH': str(root)}
  cmd = [sys.executable, '-m', 'experiments.train', '--config', 'digits_vgg', '--out', str(tmp_path / 'out')]
  cmd += ['--coordinator', f'localhost:{port}', '--num-processes', '2', '--set', *sets]
  procs = [
    subprocess.Popen(
      [*cmd, '--process-id', str(i)], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-3000:]
  saved = oto_jax.load_subnet(str(tmp_path / 'out' / 'slim'))
  cfg = train.parse_set(CONFIGS['digits_vgg'], sets)
  ds = data.load(cfg, 0)
  one = train.train(cfg, 'hesso', ds, seed=0, progress=False)
  sub = oto_jax.construct_subnet(one.partition, one.variables)
  np.testing.assert_array_equal(saved.removed_zig_ids, sub.removed_zig_ids)
  chex.assert_trees_all_close(saved.variables, jax.tree_util.tree_leaves(sub.variables), rtol=1e-4, atol=1e-5)
  r = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert r['devices'] == 4


def test_missing_cifar_data_is_a_clear_error(tmp_path, capsys):
  """The CLI stops with a clear message when the CIFAR-10 path is missing."""
  with pytest.raises(SystemExit) as err:
    train.main(
      ['--config', 'cifar10_vgg16bn', '--set', f'data_dir={str(tmp_path / "nope")!r}', '--out', str(tmp_path)]
    )
  assert 'cifar' in str(err.value).lower()


def test_set_rejects_unknown_keys():
  """--set with an unknown key names the valid ones."""
  with pytest.raises(SystemExit, match='key one of'):
    train.parse_set(CONFIGS['digits_vgg'], ['no_such_key=1'])
