"""The reports of a training run: its Markdown table and its figures (curves, widths)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


def markdown(r: dict) -> str:
  rows = [
    ('dense accuracy', f'{100 * r["dense_acc"]:.2f}%' if 'dense_acc' in r else '-'),
    (f'OTO ({r["config"]["optimizer"]}) full-model accuracy', f'{100 * r["oto_acc"]:.2f}%'),
    ('slim-model accuracy', f'{100 * r["slim_acc"]:.2f}%'),
    *(
      (f'{label} SQuAD dev EM / F1', f'{r[k]["exact_match"]:.2f} / {r[k]["f1"]:.2f}')
      for label, k in (('dense', 'dense_squad'), ('OTO', 'oto_squad'), ('slim', 'slim_squad'))
      if k in r
    ),
    *(
      [
        (
          'L1-pruned + fine-tuned accuracy (same FLOPs)',
          f'{100 * r["l1_acc"]:.2f}% at {100 * r["l1_flops_remaining"]:.1f}% FLOPs',
        )
      ]
      if 'l1_acc' in r
      else []
    ),
    ('FLOPs remaining', f'{100 * r["flops_remaining"]:.1f}%'),
    ('parameters remaining', f'{100 * r["params_remaining"]:.1f}%'),
    ('group sparsity', f'{100 * r["group_sparsity"]:.1f}%'),
    (
      f'inference speedup ({jax.devices()[0].platform}, batch 256)',
      f'{r["speedup"]:.2f}× ({r["full_ms"]:.2f} → {r["slim_ms"]:.2f} ms)',
    ),
  ]
  head = f'**{r["config"]["name"]}**, seed {r["seed"]}, {r["seconds"]:.0f} s\n\n| | |\n|---|---|\n'
  return head + '\n'.join(f'| {a} | {b} |' for a, b in rows)


def curves_figure(r: dict) -> Any:
  """Test accuracy, train loss (log scale: it spans decades) and group sparsity per epoch, for
  every model the run trained; HESSO's pruning window is shaded."""
  from matplotlib.figure import Figure

  cfg = r['config']
  fig = Figure(figsize=(13, 3.8), layout='constrained')
  axes = fig.subplots(1, 3)
  panels = (
    ('test_acc', 'test accuracy', 'accuracy'),
    ('loss', 'train loss', 'cross-entropy (log scale)'),
    ('group_sparsity', 'group sparsity', 'fraction of ZIGs at zero'),
  )
  curves = (
    ('dense', r.get('dense_history')),
    ('OTO', r['oto_history']),
    ('L1 + fine-tune', r.get('l1_history')),
  )
  for ax, (key, title, ylabel) in zip(axes, panels):
    for label, hist in curves:
      if hist:
        ax.plot([h['epoch'] for h in hist], [h[key] for h in hist], label=label)
    if cfg['optimizer'] == 'hesso':
      start = cfg['start_pruning_epoch']
      ax.axvspan(start, start + cfg['pruning_epochs'], color='0.9', zorder=0, label='HESSO pruning')
    ax.set(title=title, xlabel='epoch', ylabel=ylabel)
    ax.legend(fontsize=8)
  axes[1].set_yscale('log')
  fig.suptitle(f'{cfg["name"]}, seed {r["seed"]}: training curves')
  return fig


def widths_figure(r: dict) -> Any:
  """Each prunable node group's width in the full and the slim model, one bar per producing
  layer; horizontal bars keep a deep model's layer names readable."""
  from matplotlib.figure import Figure

  widths = r['widths']
  n = len(widths)
  fig = Figure(figsize=(8, 1.6 + 0.24 * n), layout='constrained')
  ax = fig.subplots()
  y = np.arange(n)
  full = [w['full'] for w in widths]
  slim = [w['slim'] for w in widths]
  ax.barh(y, full, 0.8, color='0.82', label='full')
  ax.barh(y, slim, 0.8, color='tab:blue', label='slim (kept)')
  for k, (a, b) in enumerate(zip(full, slim)):
    ax.text(a, k, f' {b}/{a}', va='center', fontsize=7)
  ax.set_yticks(y, [w['where'] for w in widths], fontsize=8)
  ax.invert_yaxis()  # read top to bottom, like the table in results.md
  ax.margins(y=0.5 / max(n, 1))
  ax.set_xlim(0, 1.12 * max(full, default=1))
  ax.set(
    xlabel='width (channels, units or heads)',
    ylabel='producing layer',
    title=(
      f'{r["config"]["name"]}: widths, full vs slim ({100 * r["flops_remaining"]:.1f}% of FLOPs, '
      f'{100 * r["params_remaining"]:.1f}% of parameters kept)'
    ),
  )
  ax.title.set_fontsize(10)
  fig.legend(loc='outside lower center', ncol=2, fontsize=8)  # outside: no bar hides under it
  return fig


def plot(r: dict, out: str) -> None:
  """Writes ``curves.png`` and ``widths.png`` under ``out``."""
  for name, fig in (('curves.png', curves_figure(r)), ('widths.png', widths_figure(r))):
    fig.savefig(os.path.join(out, name), dpi=110)
