"""Variable paths: plain tuples of dict keys, attribute names and indices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

Path = tuple[Any, ...]


def path_of(key_path: Sequence[Any]) -> Path:
  """Turns a jax key path into a plain tuple of dict keys, attribute names and indices.

  NNX states wrap each array in a ``Variable`` whose array sits under ``.value``; that last
  attribute is dropped so that a path names the variable (``('bn', 'scale')``).
  """
  out = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(k.key)
    else:
      out.append(str(k))
  if out and out[-1] == 'value' and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
    out.pop()
  return tuple(out)


def path_str(path: Path) -> str:
  """``('params', 'Conv_0', 'kernel')`` → ``'params/Conv_0/kernel'``."""
  return '/'.join(str(p) for p in path)


def is_array(x: Any) -> bool:
  """Arrays and ``jax.ShapeDtypeStruct`` s (anything with a shape and a dtype)."""
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def input_name(keystr: str) -> str:
  """A leaf of the inputs ``(args, kwargs)`` by its keystr: ``'[0][1]'`` → ``'args[1]'``."""
  return f'args{keystr[3:]}' if keystr.startswith('[0]') else f'kwargs{keystr[3:]}'
