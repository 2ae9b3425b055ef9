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


def write_fake_imagenet(root: Path, rng: np.random.Generator, per_class: int = 3) -> tuple[str, ...]:
  """Writes train/ and val/ with two class folders of small random images (JPEG, PNG, grayscale,
  portrait and landscape); returns the class names."""
  from PIL import Image

  classes = ('n01440764', 'n01443537')
  for split in ('train', 'val'):
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(per_class):
        h, w = (40, 30) if i % 2 else (30, 52)
        if i == 2:
          Image.fromarray(rng.integers(0, 256, (h, w), np.uint8), 'L').save(d / f'img{i}.JPEG')
        else:
          ext = 'png' if (i + c) % 3 == 0 else 'JPEG'
          Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(d / f'img{i}.{ext}')
      (d / 'notes.txt').write_text('not an image')
  return classes


FAKE_SQUAD_CONTEXT = "The Broncos defeated the Panthers in Super Bowl 50, played at Levi's Stadium in 2016."


def write_fake_squad(root: Path) -> None:
  """Writes train-v1.1.json, dev-v1.1.json and a small WordPiece vocab.txt covering them."""
  import json

  qas = [
    {
      'id': 'q1',
      'question': 'Who defeated the Panthers?',
      'answers': [{'text': 'The Broncos', 'answer_start': 0}],
    },
    {
      'id': 'q2',
      'question': 'Where was Super Bowl 50 played?',
      'answers': [
        {'text': "Levi's Stadium", 'answer_start': FAKE_SQUAD_CONTEXT.index('Levi')},
        {'text': "at Levi's Stadium", 'answer_start': FAKE_SQUAD_CONTEXT.index('at Levi')},
      ],
    },
    {
      'id': 'q3',
      'question': 'In which year?',
      'answers': [{'text': '2016', 'answer_start': FAKE_SQUAD_CONTEXT.index('2016')}],
    },
  ]
  doc = {
    'version': '1.1',
    'data': [{'title': 'SB50', 'paragraphs': [{'context': FAKE_SQUAD_CONTEXT, 'qas': qas}]}],
  }
  root.mkdir(parents=True, exist_ok=True)
  for name in ('train-v1.1.json', 'dev-v1.1.json'):
    (root / name).write_text(json.dumps(doc))
  words = (
    "[PAD] [UNK] [CLS] [SEP] the bro ##ncos defeated panthers in super bowl 50 , played at levi ' s stadium"
  )
  words += ' 2016 . who ? where was which year'
  (root / 'vocab.txt').write_text('\n'.join(words.split()) + '\n')
