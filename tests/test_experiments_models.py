"""The reference models of :mod:`experiments.models` under the ZIG analysis and the surgery."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oto_jax
from experiments.models import ViT

# A tiny ViT: 16x16 images in 4x4 patches give 16 patches + the class token.
HIDDEN, LAYERS, HEADS, MLP, CLASSES = 32, 2, 4, 64, 10
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope='module')
def vit():
  """The tiny model, its variables, an input batch of 2 and the partition traced from it."""
  model = ViT(
    image_size=16,
    patch_size=4,
    hidden_size=HIDDEN,
    num_layers=LAYERS,
    num_heads=HEADS,
    mlp_dim=MLP,
    num_classes=CLASSES,
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  # Random values from numpy in init's shapes: compiling init's PRNG code would take seconds on
  # a CPU, and random LayerNorm scales and biases exercise the surgery more than ones and zeros.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.3, size=s.shape), s.dtype), shapes)
  return model, variables, x, oto_jax.zig_partition(model.apply, variables, x)


def _group_with_member(part: oto_jax.ZIGPartition, path: tuple[str, ...], axis: int) -> oto_jax.NodeGroup:
  """The node group with ``axis`` of the variable at ``path`` as a member, the prunable one if any."""
  hits = [g for g in part.node_groups if any(e.path == path and e.axis == axis for e in g.members)]
  assert hits, f'no node group has {path} axis {axis} as a member:\n{part.summary()}'
  # Inner factors of a reshaped axis (head_dim) may list the same member; the ZIGs are on one.
  prunable = [g for g in hits if g.prunable]
  return prunable[0] if prunable else hits[0]


def test_vit_heads_and_mlp_units_are_zigs(vit):
  """Per layer, whole heads and MLP hidden units are ZIGs; the LayerNorm-ed stream is not."""
  _, _, _, part = vit
  # Per layer: HEADS ZIGs (each a head_dim run of q/k/v columns) and MLP units; nothing else.
  assert part.num_zigs == LAYERS * (HEADS + MLP), part.summary()
  assert sorted(g.size for g in part.prunable_groups) == sorted([HEADS, MLP] * LAYERS), part.summary()

  for i in range(LAYERS):
    layer = ('params', f'layer_{i}')
    heads = _group_with_member(part, (*layer, 'attention', 'query', 'kernel'), 1)
    assert heads.prunable and heads.size == HEADS, heads
    for proj in ('query', 'key', 'value'):
      entry = next(e for e in heads.members if e.path == (*layer, 'attention', proj, 'kernel'))
      np.testing.assert_array_equal(entry.index, np.repeat(np.arange(HEADS), HEAD_DIM))
    out_rows = next(e for e in heads.dependents if e.path == (*layer, 'attention', 'output', 'kernel'))
    assert out_rows.axis == 0

    mlp = _group_with_member(part, (*layer, 'mlp_in', 'kernel'), 1)
    assert mlp.prunable and mlp.size == MLP, mlp
    assert any(e.path == (*layer, 'mlp_out', 'kernel') and e.axis == 0 for e in mlp.dependents), mlp

  # The residual stream: the patch conv, the class token, the position embeddings, every
  # residual-branch output and every LayerNorm share one axis, which LayerNorm reduces over.
  stream = _group_with_member(part, ('params', 'patch_embed', 'kernel'), 3)
  assert not stream.prunable and stream.size == HIDDEN, stream
  stream_paths = {e.path for e in stream.members}
  assert ('params', 'cls_token') in stream_paths
  assert ('params', 'position_embeddings') in stream_paths
  for i in range(LAYERS):
    assert ('params', f'layer_{i}', 'attention', 'output', 'kernel') in stream_paths
    assert ('params', f'layer_{i}', 'mlp_out', 'kernel') in stream_paths
  classes = _group_with_member(part, ('params', 'head', 'kernel'), 1)
  assert not classes.prunable and classes.size == CLASSES, classes


def test_vit_subnet_matches_zeroed_model(vit):
  """The slim ViT computes what the full one computes with the removed ZIGs zeroed."""
  model, variables, x, part = vit
  heads0, mlp0, heads1, mlp1 = (
    _group_with_member(part, ('params', f'layer_{i}', *name, 'kernel'), 1)
    for i in range(LAYERS)
    for name in (('attention', 'query'), ('mlp_in',))
  )
  ids = [
    heads0.zig_offset + 1,
    heads1.zig_offset,
    heads1.zig_offset + 3,
    *(mlp0.zig_offset + np.array([0, 7, 63])),
    *(mlp1.zig_offset + np.array([5, 6])),
  ]
  zeroed = part.zero(variables, ids)
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)

  slim = sub.variables['params']
  assert slim['layer_0']['attention']['query']['kernel'].shape == (HIDDEN, (HEADS - 1) * HEAD_DIM)
  assert slim['layer_1']['attention']['output']['kernel'].shape == ((HEADS - 2) * HEAD_DIM, HIDDEN)
  assert slim['layer_0']['mlp_in']['kernel'].shape == (HIDDEN, MLP - 3)
  assert slim['layer_1']['mlp_out']['kernel'].shape == (MLP - 2, HIDDEN)

  full = jax.jit(model.apply)
  for batch in (x, jnp.asarray(np.random.default_rng(1).normal(size=(5, 16, 16, 3)), jnp.float32)):
    chex.assert_trees_all_close(sub.apply(sub.variables, batch), full(zeroed, batch), rtol=1e-5)
