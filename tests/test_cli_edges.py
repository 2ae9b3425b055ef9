"""The training CLI at its edges: bad --set values, an unwritable --out, failed checkpoint writes,
and corrupt checkpoints on --resume; each ends in one line, never a traceback or a silent run."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoints, data, train
from experiments.configs import CONFIGS

# A two-epoch HESSO run of the OTO model alone: the smallest run that keeps two checkpoints.
SETS = [
  'epochs=2',
  'start_pruning_epoch=0',
  'pruning_epochs=2',
  'pruning_periods=2',
  'lr_decay_epochs=()',
  'dense_baseline=False',
  'l1_baseline=False',
]


def _fail(argv: list[str]) -> str:
  """The one-line message with which ``train.main(argv)`` stops."""
  with pytest.raises(SystemExit) as err:
    train.main(argv)
  msg = str(err.value.code)
  assert msg.startswith('error: ') and '\n' not in msg, msg
  return msg


def _leftovers(root) -> list[str]:
  return glob.glob(os.path.join(root, '**', '*.orbax-checkpoint-tmp*'), recursive=True)


@pytest.fixture
def no_work(monkeypatch):
  """Fails the test if the run gets as far as loading data."""

  def load(*args, **kwargs):
    raise AssertionError('the run started before its inputs were checked')

  monkeypatch.setattr(data, 'load', load)


@pytest.mark.parametrize(
  'item, want',
  [
    ('epochs=abc', "epochs='abc' is invalid: expected an integer >= 1"),
    ('batch_size=0', 'batch_size=0 is invalid: expected an integer >= 1'),
    ('epochs=0', 'epochs=0 is invalid: expected an integer >= 1'),
    ('lr=-0.1', 'lr=-0.1 is invalid: expected a finite number > 0'),
    ('lr=1e999', 'lr=inf is invalid: expected a finite number > 0'),
    ('flops_keep=1.5', 'flops_keep=1.5 is invalid: expected a finite number in (0, 1], or None'),
    ('lr_decay_epochs=(1,1)', 'lr_decay_epochs=(1, 1) is invalid: expected a tuple of integers'),
    ('augment=1', 'augment=1 is invalid: expected True or False'),
    ('no_such_key=1', "--set 'no_such_key=1': expected key=value with key one of"),
  ],
)
def test_bad_set_value_is_one_line_before_any_work(item, want, tmp_path, no_work):
  """A value of the wrong type or out of its field's range, or an unknown key, stops the CLI in one
  line that names the key, the value and what it should be, before anything is created."""
  msg = _fail(['--out', str(tmp_path / 'out'), '--set', *SETS, item])
  assert want in msg
  assert '--set' in msg
  assert not (tmp_path / 'out').exists()


def test_bad_combination_is_one_line_before_any_work(tmp_path, no_work):
  """Values valid one by one but not together (HESSO's pruning window past the last epoch) stop
  the CLI in one line."""
  msg = _fail(['--out', str(tmp_path / 'out'), '--set', *SETS, 'pruning_epochs=3'])
  assert 'start_pruning_epoch + pruning_epochs = 3 exceeds epochs=2' in msg


def test_every_shipped_config_passes_its_checks():
  for cfg in CONFIGS.values():
    cfg.check()


def test_unwritable_out_is_one_line_before_any_work(tmp_path, no_work):
  """An --out that cannot be created (here under a regular file, which fails for root too) stops
  the CLI in one line before any work."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  msg = _fail(['--out', str(blocker / 'sub'), '--set', *SETS])
  assert f'the output directory {blocker / "sub"} is not writable (Not a directory)' in msg


def test_failed_checkpoint_write_is_one_line_and_leaves_no_partial_step(tmp_path, monkeypatch):
  """A checkpoint write that fails (a full disk) stops the run in one line naming the step, and no
  half-written ``*.orbax-checkpoint-tmp`` directory is left."""

  def full_disk(self, directory, *args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, 'save', full_disk)
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, 'async_save', full_disk)
  out = tmp_path / 'out'
  msg = _fail(['--out', str(out), '--set', *SETS])
  assert f'could not write checkpoint step 1 in {out / "ckpt_oto"}' in msg and 'No space left' in msg
  assert _leftovers(out) == []


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """An uninterrupted run: its output directory, with checkpoints of epochs 1 and 2."""
  out = tmp_path_factory.mktemp('finished') / 'out'
  assert train.main(['--out', str(out), '--set', *SETS]) == 0
  return out


def _results(out) -> dict:
  return json.loads((out / 'results.json').read_text())


def _biggest_file(step_dir) -> str:
  """The file holding the arrays (the largest of the step)."""
  files = [p for p in glob.glob(os.path.join(step_dir, 'state', '**'), recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def _copy(finished, tmp_path):
  out = tmp_path / 'out'
  shutil.copytree(finished, out)
  return out


def test_flipped_bytes_fall_back_to_the_previous_step(finished, tmp_path, capsys):
  """4 KB of flipped bytes in the newest checkpoint are reported in one line naming the step and
  the file; --resume falls back to the step before and ends where the uninterrupted run did."""
  out = _copy(finished, tmp_path)
  path = _biggest_file(out / 'ckpt_oto' / '2')
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    block = f.read(4096)
    f.seek(-len(block), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in block))
  capsys.readouterr()
  assert train.main(['--out', str(out), '--resume', '--set', *SETS]) == 0
  warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning:' in line]
  rel = os.path.relpath(path, out / 'ckpt_oto' / '2')
  assert len(warnings) == 1, warnings
  assert f'checkpoint step 2 in {out / "ckpt_oto"} is corrupt: {rel} does not match' in warnings[0]
  assert 'falling back to step 1' in warnings[0]
  got, want = _results(out), _results(finished)
  for key in ('oto_acc', 'slim_acc', 'flops_remaining', 'group_sparsity'):
    assert got[key] == want[key], key
  assert [h['test_acc'] for h in got['oto_history']] == [h['test_acc'] for h in want['oto_history']]
  np.testing.assert_allclose(
    [h['loss'] for h in got['oto_history']], [h['loss'] for h in want['oto_history']], rtol=1e-6
  )
  assert _leftovers(out) == []


def test_truncated_checkpoints_are_one_line(finished, tmp_path, capsys):
  """A truncated file in every checkpoint step is named, step by step, and with no good step left
  --resume stops in one line."""
  out = _copy(finished, tmp_path)
  ckpt = out / 'ckpt_oto'
  for step_dir in ckpt.iterdir():
    path = _biggest_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  capsys.readouterr()
  msg = _fail(['--out', str(out), '--resume', '--set', *SETS])
  assert f'checkpoint step 1 in {ckpt} is corrupt: ' in msg and '(truncated?)' in msg
  assert 'no earlier good step is left' in msg
  (warning,) = [line for line in capsys.readouterr().err.splitlines() if 'warning:' in line]
  assert 'checkpoint step 2' in warning and '(truncated?)' in warning and 'falling back to step 1' in warning


def test_non_finite_checkpoint_falls_back(finished, tmp_path, monkeypatch, capsys):
  """A checkpoint that matches its manifest but holds NaN (a diverged epoch) is reported and
  skipped like a corrupt one."""
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(finished / 'ckpt_oto', ckpt)
  shutil.rmtree(ckpt / '2')
  cfg = train.parse_set(CONFIGS['digits_vgg'], SETS)
  ds = data.load(cfg, 0)
  task_loss = train.task_loss
  monkeypatch.setattr(train, 'task_loss', lambda logits, y: jnp.nan * task_loss(logits, y))
  train.train(cfg, 'hesso', ds, seed=0, ckpt_dir=str(ckpt), resume=True, progress=False)
  monkeypatch.undo()
  assert checkpoints.checkpoint_problem(str(ckpt / '2')) is None  # the NaN step is intact, as written
  capsys.readouterr()
  run = train.train(cfg, 'hesso', ds, seed=0, ckpt_dir=str(ckpt), resume=True, progress=False)
  err = capsys.readouterr().err
  assert 'checkpoint step 2' in err and 'NaN or infinite' in err and 'falling back to step 1' in err
  assert [h['test_acc'] for h in run.history] == [h['test_acc'] for h in _results(finished)['oto_history']]


def test_existing_checkpoints_without_resume_are_one_line(finished, tmp_path):
  """A run into a directory that holds an earlier run's checkpoints asks for --resume instead of
  failing at its first save."""
  out = _copy(finished, tmp_path)
  msg = _fail(['--out', str(out), '--set', *SETS])
  assert 'holds the checkpoints of an earlier run (steps [1, 2]): pass --resume' in msg
