"""The training CLI on tiny runs: configs, reproducibility, resume, and its data errors."""

from __future__ import annotations

import json

import chex
import pytest

from experiments import train
from experiments.configs import CONFIGS

TINY = dict(epochs=2, start_pruning_epoch=0, pruning_epochs=2, pruning_periods=2, lr_decay_epochs=())


def _tiny(name: str, **more):
  return CONFIGS[name].replace(**TINY, **more)


def test_every_config_is_known_to_the_cli():
  """Every config names a model and dataset the CLI knows."""
  for cfg in CONFIGS.values():
    assert cfg.model in train.MODELS, cfg.name
    assert cfg.dataset in ('digits', 'mnist1d', 'cifar10', 'imagenet', 'squad'), cfg.name


@pytest.mark.parametrize('name', ['digits_vgg', 'digits_resnet'])
def test_digits_run_writes_results(name, tmp_path):
  """A tiny digits run trains, prunes to the FLOPs budget, and the slim model matches the full one."""
  cfg = _tiny(name, dense_baseline=False)
  r = train.run_experiment(cfg, seed=0, out=str(tmp_path), progress=False)
  assert r['flops_remaining'] <= cfg.flops_keep + 1e-6
  assert abs(r['slim_acc'] - r['oto_acc']) <= 1e-3
  for f in ('results.json', 'results.md', 'curves.png', 'widths.png', 'slim/subnet.json'):
    assert (tmp_path / f).exists(), f
  assert json.loads((tmp_path / 'results.json').read_text())['slim_acc'] == r['slim_acc']


@pytest.mark.parametrize('kind', ['hspg', 'dhspg', 'prox_sg'])
def test_other_optimizers_run(kind):
  """Each optimizer trains a couple of epochs on digits and its subnet evaluates."""
  cfg = _tiny(
    'digits_vgg', dense_baseline=False, optimizer=kind, n_p_epoch=1, target_sparsity=0.3, flops_keep=None
  )
  r = train.run_experiment(cfg, seed=0, out=None, progress=False)
  assert 0.0 <= r['slim_acc'] <= 1.0 and abs(r['slim_acc'] - r['oto_acc']) <= 1e-3


def test_seed_reproduces_and_resume_equals_uninterrupted(tmp_path):
  """A fixed seed reproduces a run; stopping after one epoch and resuming gives the same result."""
  cfg = _tiny('digits_vgg')
  ds = train.load_data(cfg, 0)
  a = train.train(cfg, 'hesso', ds, seed=0, progress=False)
  b = train.train(cfg, 'hesso', ds, seed=0, progress=False)
  chex.assert_trees_all_equal(a.variables, b.variables)
  ckpt = str(tmp_path / 'ckpt')
  train.train(cfg.replace(epochs=1), 'hesso', ds, seed=0, ckpt_dir=ckpt, progress=False)
  c = train.train(cfg, 'hesso', ds, seed=0, ckpt_dir=ckpt, resume=True, progress=False)
  chex.assert_trees_all_close(a.variables, c.variables, rtol=1e-6, atol=1e-7)
  assert [h['test_acc'] for h in a.history] == [h['test_acc'] for h in c.history]


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


def test_tutorial_runs():
  """The notebook tutorial (a jupytext percent script) runs top to bottom."""
  import runpy

  runpy.run_module('experiments.tutorial', run_name='__main__')
