"""The pictures and tables people read: widths.png and curves.png of a run, the partition's
summary and its DOT drawing."""

from __future__ import annotations

import re
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import oto_jax
from experiments import reports, train
from experiments.configs import CONFIGS


class ConvBNConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    return nn.Conv(4, (3, 3))(x).mean((1, 2))


@pytest.fixture(scope='module')
def part():
  model, x = ConvBNConv(), jnp.zeros((2, 6, 6, 3))
  return oto_jax.zig_partition(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A two-epoch digits_vgg run (OTO only) and the directory it wrote."""
  cfg = CONFIGS['digits_vgg'].replace(
    epochs=2,
    start_pruning_epoch=0,
    pruning_epochs=2,
    pruning_periods=2,
    lr_decay_epochs=(),
    dense_baseline=False,
    l1_baseline=False,
  )
  out = tmp_path_factory.mktemp('run')
  return train.run_experiment(cfg, seed=0, out=str(out), progress=False), out


def test_widths_name_the_producing_layers(run):
  """Each bar of widths.png is a conv or dense layer by its module path, not a collection or
  the BatchNorm after the conv; the picture has a title and axis labels."""
  r, out = run
  names = [w['where'] for w in r['widths']]
  assert names == ['Conv_0', 'Conv_1', 'Conv_2', 'Conv_3', 'Dense_0'], names
  assert all(0 < w['slim'] <= w['full'] for w in r['widths'])
  assert (out / 'widths.png').stat().st_size > 0
  (ax,) = reports.widths_figure(r).axes
  assert [t.get_text() for t in ax.get_yticklabels()] == names
  assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
  assert len(ax.patches) == 2 * len(names)  # a full and a slim bar per layer


def test_curves_label_every_panel_and_log_the_loss(run):
  r, out = run
  assert (out / 'curves.png').stat().st_size > 0
  axes = reports.curves_figure(r).axes
  assert [ax.get_title() for ax in axes] == ['test accuracy', 'train loss', 'group sparsity']
  assert all(ax.get_ylabel() and ax.get_xlabel() == 'epoch' for ax in axes)
  assert [ax.get_yscale() for ax in axes] == ['linear', 'log', 'linear']


def test_summary_names_the_conv_not_the_batchnorm(part):
  """A Conv → BatchNorm channel is produced by the conv; the BatchNorm only rescales it."""
  (g,) = part.prunable_groups
  assert {e.path[1] for e in g.members} == {'Conv_0', 'BatchNorm_0'}
  row = next(line for line in part.summary().splitlines() if line.startswith(f'{g.id} '))
  assert 'Conv_0' in row and 'BatchNorm' not in row, part.summary()
  assert part.producer(g) == 'Conv_0'


def test_dot_is_one_cluster_per_group_in_data_order(part):
  """Top-down, one cluster per node group; a layer points at the group it produces, a group at
  the layers that consume it (data order), and a BatchNorm's params and statistics are one layer."""
  dot = part.to_dot()
  assert re.search(r'rankdir=(TB|LR)', dot)
  assert part.to_dot(rankdir='LR').count('rankdir=LR') == 1
  clusters = re.findall(r'subgraph cluster_g(\d+) \{', dot)
  assert sorted(map(int, clusters)) == [g.id for g in part.node_groups]
  (g,) = part.prunable_groups
  assert f'"Conv_0" -> g{g.id} ' in dot and f'"BatchNorm_0" -> g{g.id} ' in dot
  assert re.search(rf'g{g.id} -> "Conv_1" \[style=dashed', dot)
  assert 'params/' not in dot and 'batch_stats' not in dot


@pytest.mark.skipif(shutil.which('dot') is None, reason='Graphviz is not installed')
def test_dot_renders(part):
  """Graphviz reads it and draws every cluster."""
  svg = subprocess.run(
    ['dot', '-Tsvg'], input=part.to_dot(), capture_output=True, text=True, check=True
  ).stdout
  assert svg.count('class="cluster"') == len(part.node_groups)
