"""Runs test workers in fresh processes with several host CPU devices.

``--xla_force_host_platform_device_count`` only takes effect before JAX initialises, so a test
that needs a mesh runs its checks in a worker process (a test module run with ``python -m``)
that prints one JSON line per case after a marker; the pytest process only reads the report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NUM_DEVICES = 8
REPO_ROOT = Path(__file__).resolve().parent.parent


def run_workers(
  module: str, arg_lists: list[list[str]], marker: str, timeout: float = 600, num_devices: int = NUM_DEVICES
) -> dict[str, Any]:
  """Runs ``python -m module *args`` once per entry of ``arg_lists``, side by side, each with
  ``num_devices`` host CPU devices.

  Returns:
    ``returncodes``, ``cases`` (every JSON object printed after ``marker``, in order),
    ``stderr`` (the tails) and ``seconds``.
  """
  env = dict(os.environ)
  # LLVM's optimisation level 0 roughly halves the compile time of small programs; every
  # configuration a worker compares is compiled alike.
  flags = f'--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0'
  env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {flags}'.strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get('PYTHONPATH')) if p)
  t0 = time.perf_counter()
  runs = []
  for args in arg_lists:
    # Output goes to files, so that no worker can block on a full pipe.
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    cmd = [sys.executable, '-m', module, *args]
    runs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, text=True), out, err))
  cases, returncodes, stderr = [], [], []
  for proc, out, err in runs:
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    returncodes.append(proc.returncode)
    out.seek(0)
    err.seek(0)
    stderr.append(err.read()[-3000:])
    lines = out.read().splitlines()
    cases.extend(json.loads(line[len(marker) :]) for line in lines if line.startswith(marker))
    out.close()
    err.close()
  return {
    'returncodes': returncodes,
    'cases': cases,
    'stderr': '\n'.join(stderr),
    'seconds': time.perf_counter() - t0,
  }


def free_port() -> int:
  """A TCP port free on this machine now (for a multi-process coordinator)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]
