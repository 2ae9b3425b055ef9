"""The primitive registry: one :class:`PrimitiveEntry` per primitive, for every stage.

Built-in entries live in the modules of this package, one per family (arithmetic, layout,
reductions, contractions, indexing, misc, collectives). User entries come in two ways, through the same
type: per call (``oto_jax.zig_partition(..., rules={name: entry})``) or for the whole session
(:func:`register_primitive`). A per-call entry wins over a session one, which wins over a
built-in. A primitive without an entry blocks every axis it touches, with a reason that names
it and where it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from oto_jax.primitives import arithmetic, collectives, contractions, indexing, layout, misc, reductions
from oto_jax.primitives.entry import (
  KEEP,
  NONE,
  CostTerm,
  PrimitiveEntry,
  Zero,
  align_elementwise,
  all_axes,
  blocked,
  elementwise,
  free,
  per_input,
  per_output,
  same_axes,
)

__all__ = [
  'KEEP',
  'NONE',
  'CostTerm',
  'PrimitiveEntry',
  'Zero',
  'align_elementwise',
  'all_axes',
  'blocked',
  'builtin_primitives',
  'elementwise',
  'free',
  'lookup',
  'per_input',
  'per_output',
  'register_primitive',
  'registered_primitives',
  'same_axes',
  'unregister_primitive',
]

_BUILTIN: Mapping[str, PrimitiveEntry] = {
  **arithmetic.ENTRIES,
  **layout.ENTRIES,
  **reductions.ENTRIES,
  **contractions.ENTRIES,
  **indexing.ENTRIES,
  **misc.ENTRIES,
  **collectives.ENTRIES,
}
# Entries registered by the user for the session (register_primitive).
_SESSION: dict[str, PrimitiveEntry] = {}


def _name(primitive: Any) -> str:
  name = primitive if isinstance(primitive, str) else getattr(primitive, 'name', None)
  if not isinstance(name, str):
    raise TypeError(f'Expected a primitive or its name, got {primitive!r}.')
  return name


def _check(name: str, entry: Any) -> PrimitiveEntry:
  if isinstance(entry, PrimitiveEntry):
    return entry
  if callable(entry):
    raise TypeError(
      f'The rule for `{name}` is a function; rules are oto_jax.PrimitiveEntry values now. Wrap a '
      f'structure function as oto_jax.PrimitiveEntry(structure=fn, zero=oto_jax.Zero(...)), or use '
      'oto_jax.elementwise(zero) for an element-wise primitive.'
    )
  raise TypeError(f'The rule for `{name}` must be an oto_jax.PrimitiveEntry, got {type(entry).__name__}.')


def register_primitive(primitive: Any, entry: PrimitiveEntry, *, override: bool = False) -> None:
  """Registers ``entry`` for ``primitive`` for the rest of the session.

  Args:
    primitive: a JAX primitive or its name.
    entry: what oto_jax knows about it (see :class:`PrimitiveEntry`).
    override: allow replacing an entry (a built-in one or an earlier registration).

  Raises:
    ValueError: the primitive has an entry already and ``override`` is false.

  Example::

    oto_jax.register_primitive(scale_p, oto_jax.elementwise(oto_jax.Zero('keep')))
  """
  name = _name(primitive)
  entry = _check(name, entry)
  if not override and (name in _SESSION or name in _BUILTIN):
    raise ValueError(f'`{name}` already has an entry; pass override=True to replace it.')
  _SESSION[name] = entry


def unregister_primitive(primitive: Any) -> None:
  """Removes a session entry of :func:`register_primitive` (the built-in one, if any, returns)."""
  _SESSION.pop(_name(primitive), None)


def builtin_primitives() -> Mapping[str, PrimitiveEntry]:
  """The built-in entries, by primitive name."""
  return dict(_BUILTIN)


def registered_primitives() -> Mapping[str, PrimitiveEntry]:
  """Every entry in effect for the session (built-in, then registered), by primitive name."""
  return {**_BUILTIN, **_SESSION}


def lookup(rules: Mapping[str, Any] | None = None) -> Callable[[str], PrimitiveEntry | None]:
  """``name -> entry`` for one analysis: per-call ``rules`` first, then the session, then built-ins."""
  local = {name: _check(name, e) for name, e in (rules or {}).items()}
  table = {**_BUILTIN, **_SESSION, **local}
  return table.get
