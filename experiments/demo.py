"""The main demo: partition a few models into ZIGs and print what the analysis found.

Runs on CPU in under a minute. Every large model is analysed abstractly
(``jax.eval_shape``): no weight is allocated, so Llama-7B costs nothing to set up.

Usage::

  python -m experiments.demo [--full]

``--full`` prints every node group of the small CNN instead of the summary line only.
"""

from __future__ import annotations

import argparse
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import oto_jax
from experiments import models


def _gist(reason: str) -> str:
  """A reason without its location or group number, to list each kind of reason once."""
  return reason.split(' at ')[0].split(' with node group')[0]


def _abstract(model: nn.Module, x: jax.ShapeDtypeStruct):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--full', action='store_true', help='print every node group of the CNN')
  args = parser.parse_args()

  cases = [
    (
      'DigitsCNN (8x8x1)',
      models.DigitsCNN(stages=((16,), (32,)), hidden=64),
      jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32),
    ),
    ('ResNet-50 (224x224)', models.ResNet50(), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)),
    ('BERT-base (seq 128)', models.BertEncoder(), jax.ShapeDtypeStruct((1, 128), jnp.int32)),
    ('Llama-7B shape (seq 128)', models.LlamaDecoder(), jax.ShapeDtypeStruct((1, 128), jnp.int32)),
  ]
  rows = []
  for name, model, x in cases:
    variables = _abstract(model, x)
    start = time.perf_counter()
    part = oto_jax.zig_partition(model.apply, variables, x)
    seconds = time.perf_counter() - start
    n_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables['params']))
    prunable = part.prunable_groups
    rows.append(
      (name, n_params, part.num_zigs, len(prunable), len(part.node_groups) - len(prunable), seconds)
    )
    print(f'\n## {name}')
    if args.full or name.startswith('DigitsCNN'):
      print(part.summary())
    else:
      reasons = sorted({_gist(g.reason) for g in part.node_groups if not g.prunable})
      print(f'{part.num_zigs} ZIGs in {len(prunable)} prunable node groups; unprunable because: {reasons}')

  print('\n| model | parameters | ZIGs | prunable groups | unprunable groups | partition s |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, n, z, p, u, s in rows:
    print(f'| {name} | {n / 1e6:.1f}M | {z} | {p} | {u} | {s:.2f} |')


if __name__ == '__main__':
  main()
