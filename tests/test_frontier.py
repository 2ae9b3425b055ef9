"""The accuracy–FLOPs frontier (experiments/frontier.py): its tiny run end to end, its bookkeeping."""

from __future__ import annotations

import json

import numpy as np

from experiments import data as data_lib
from experiments import frontier


def test_tiny_frontier_runs_every_method_and_writes_its_section(tmp_path):
  """Every method runs on digits at one budget; each slim model scores what its zeroed full
  model scores; one-shot methods meet the budget; the section replaces the old one in place."""
  results = tmp_path / 'RESULTS.md'
  results.write_text(
    '# results\n\nbefore\n\n<!-- frontier:begin -->\nstale\n<!-- frontier:end -->\n\nafter\n'
  )
  assert frontier.main(['--size', 'tiny', '--out', str(tmp_path), '--results', str(results)]) == 0
  result = json.loads((tmp_path / 'frontier.json').read_text())
  points = result['points']
  assert {p['method'] for p in points} == set(frontier.METHODS)
  for p in points:
    assert p['acc_slim'] == p['acc_full'], p
    if p['method'] in ('l1_uniform', 'l1_global', 'depgraph', 'random', 'hesso', 'hesso_cric'):
      assert p['flops_remaining'] <= 0.3 + 1e-6, p
  assert any(p['method'] == 'hspg' and p['lmbda'] for p in points)
  info = result['tasks']['digits']
  assert set(info) == {'lr', 'lr_validation', 'depgraph_lambda', 'depgraph_validation'}
  text = results.read_text()
  assert 'stale' not in text and text.index('before') < text.index(
    '## The accuracy–FLOPs frontier'
  ) < text.index('after')
  assert '| 30% |' in text and (tmp_path / 'frontier.png').stat().st_size > 10_000
  assert frontier.section(text).startswith('## The accuracy–FLOPs frontier')


def test_validation_split_is_stratified_and_disjoint():
  ds = data_lib.digits(seed=0)
  fit, val = frontier.split_validation(ds)
  assert len(fit.x_train) + len(val.x_test) == len(ds.x_train)
  np.testing.assert_array_equal(val.x_train, fit.x_train)  # validation runs train on the rest
  counts = np.bincount(val.y_test, minlength=10) / np.bincount(ds.y_train, minlength=10)
  assert np.allclose(counts, 0.15, atol=0.02), counts
  rows = {tuple(np.asarray(r).ravel()) for r in fit.x_train}
  assert not any(tuple(np.asarray(r).ravel()) in rows for r in val.x_test)
  np.testing.assert_array_equal(fit.x_test, ds.x_test)  # the test split is the dataset's own


def _row(method, acc, sd, flops, budget=None, lmbda=None):
  return {
    'task': 't',
    'method': method,
    'budget': budget,
    'lmbda': lmbda,
    'seeds': 3,
    'acc': acc,
    'acc_sd': sd,
    'flops': flops,
    'flops_sd': 0.0,
    'slim_minus_full': 0.0,
  }


def test_winners_compare_points_at_the_budget_only():
  """A point far above the budget cannot win; HSPG competes with the λ that lands nearest; the
  margin is in units of the larger seed standard deviation."""
  summary = [
    _row('hesso', 90.0, 1.0, 8.0, 0.08),
    _row('dhspg', 99.0, 0.5, 30.0, 0.08),  # landed at 30%: out
    _row('l1_uniform', 88.0, 2.0, 7.9, 0.08),
    _row('hspg', 95.0, 1.0, 40.0, lmbda=0.01),
    _row('hspg', 89.5, 0.5, 8.5, lmbda=0.1),  # nearest to 8%
  ]
  (w,) = frontier.winners(summary, 't', (0.08,))
  assert w['winner']['method'] == 'hesso' and w['runner_up']['lmbda'] == 0.1
  assert w['margin_sd'] == (90.0 - 89.5) / 1.0
  assert w['baseline_best']['method'] == 'l1_uniform' and w['oto_vs_baseline_sd'] == (90.0 - 88.0) / 2.0


def test_a_budget_no_method_reaches_reports_the_floor():
  summary = [_row('hesso', 40.0, 1.0, 18.9, 0.04), _row('random', 42.0, 1.0, 18.9, 0.04)]
  assert frontier.winners(summary, 't', (0.04,)) == [{'budget': 0.04, 'floor': 18.9}]
