"""Fake on-disk datasets in the real layouts, for tests that must not download anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_fake_cifar(
  root: Path, rng: np.random.Generator, train_per_batch: int = 3, num_test: int = 4
) -> dict[str, tuple[np.ndarray, list[int]]]:
  """Writes data_batch_1..5 and test_batch as CIFAR-10's python version does; returns the raw rows."""
  root.mkdir(parents=True, exist_ok=True)
  raw = {}
  for name, n in [(f'data_batch_{i}', train_per_batch) for i in range(1, 6)] + [('test_batch', num_test)]:
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {b'batch_label': name.encode(), b'labels': labels, b'data': rows, b'filenames': [b'x.png'] * n}
    with open(root / name, 'wb') as f:
      pickle.dump(batch, f)
    raw[name] = (rows, labels)
  return raw
