"""Orbax checkpoints of a training run: per-epoch saves with SHA-256 manifests, the newest good
restore, and the checks that fail before any work (an unwritable output directory)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp


class RunError(RuntimeError):
  """An output directory or checkpoint a run cannot use; the CLI reports it in one line."""


# In each checkpoint step's directory: the size and SHA-256 of its every file, written once Orbax
# has finished the step, so that a resume tells a damaged step from a good one.
MANIFEST = 'sha256.json'


def _file_digests(step_dir: str) -> dict[str, dict]:
  digests = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST:
        with open(path, 'rb') as f:
          digests[rel] = {
            'bytes': os.path.getsize(path),
            'sha256': hashlib.file_digest(f, 'sha256').hexdigest(),
          }
  return digests


def write_manifest(step_dir: str) -> None:
  """Records the files of a finished checkpoint step (a crash mid-write only makes the step
  look corrupt, and a resume falls back to the one before)."""
  digests = _file_digests(step_dir)
  with open(os.path.join(step_dir, MANIFEST), 'w') as f:
    json.dump(digests, f, indent=1)


def checkpoint_problem(step_dir: str) -> str | None:
  """What differs between a checkpoint step's files and its manifest, or None when nothing does."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      want = json.load(f)
  except (OSError, ValueError):
    return f'its manifest {MANIFEST} is missing or unreadable'
  have = _file_digests(step_dir)
  for rel, digest in want.items():
    got = have.get(rel)
    if got is None:
      return f'{rel} is missing'
    if got['bytes'] != digest['bytes']:
      return f'{rel} has {got["bytes"]} bytes instead of {digest["bytes"]} (truncated?)'
    if got != digest:
      return f'{rel} does not match its SHA-256'
  return None


def remove_partial_saves(root: str) -> None:
  """Deletes what failed Orbax saves left under ``root`` (``*.orbax-checkpoint-tmp*``)."""
  for path in glob.glob(os.path.join(glob.escape(root), '**', '*.orbax-checkpoint-tmp*'), recursive=True):
    shutil.rmtree(path, ignore_errors=True)


def one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__


def all_finite(tree: Any) -> bool:
  return all(
    bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  )


def save(ckpt, step: int, args) -> None:
  """Writes checkpoint ``step`` and its manifest.

  Raises:
    RunError: the step could not be written (a full disk, a lost mount, a step already there).
  """
  try:
    ckpt.save(step, args=args)
    if jax.process_index() == 0:
      write_manifest(os.path.join(ckpt.directory, str(step)))
  except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for one failed write
    raise RunError(f'could not write checkpoint step {step} in {ckpt.directory}: {one_line(e)}') from e


def restore_newest_good(ckpt, args) -> tuple[int, Any]:
  """The newest checkpoint step that matches its manifest and holds finite values, restored:
  ``(step, restored)``, or ``(0, None)`` when there is none yet.

  A corrupt step is reported on stderr and, once an earlier good one is found, deleted: the run
  writes it again.

  Raises:
    RunError: no step is good.
  """
  steps = sorted(ckpt.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    problem = checkpoint_problem(os.path.join(ckpt.directory, str(step)))
    if problem is None:
      restored = ckpt.restore(step, args=args)
      if all_finite(restored.state):
        for bad in steps[:i]:
          ckpt.delete(bad)
        return step, restored
      problem = 'it restores NaN or infinite values'
    where = f'checkpoint step {step} in {ckpt.directory} is corrupt: {problem}'
    if i + 1 == len(steps):
      raise RunError(f'{where}; no earlier good step is left: remove {ckpt.directory} to train from scratch.')
    if jax.process_index() == 0:
      print(f'warning: {where}; falling back to step {steps[i + 1]}.', file=sys.stderr, flush=True)
  return 0, None


def check_writable(out: str) -> None:
  """Creates ``out`` and writes and deletes a file in it, so that a bad ``--out`` fails at once.

  Raises:
    RunError: ``out`` cannot be created or written to.
  """
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix='.write-probe-') as f:
      f.write(b'probe')
      f.flush()
  except OSError as e:
    raise RunError(
      f'the output directory {out} is not writable ({e.strerror or e}): choose another --out.'
    ) from None
