"""Session set-up: a compilation cache, and the hypothesis profiles.

The tests train, cut and evaluate the same small models many times over (a run and its resume,
each optimizer on digits, the CLI in child processes): a persistent compilation cache in a
temporary directory, shared with the child processes through the environment and removed at
the end of the session, compiles each program once. It changes no result: XLA returns the
same executable.

Hypothesis profiles: ``ci`` (the default) and ``nightly`` (``HYPOTHESIS_PROFILE=nightly``).

``max_examples`` is a scale, not a per-test count: each property test in
tests/test_properties.py asks for a share of it (``examples(n)`` there gives ``n`` examples
under ``ci`` and ten times as many under ``nightly``). ``ci`` is derandomised, so a failure
reproduces on every run and every machine; no example database, so nothing is written into
the checkout.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
from hypothesis import HealthCheck, Phase, settings

_CACHE = os.environ.get('JAX_COMPILATION_CACHE_DIR') or tempfile.mkdtemp(prefix='oto_jax_tests_xla_')
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
# Small programs compile faster than the cache reads them back.
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)


CI_MAX_EXAMPLES = 100

settings.register_profile(
  'ci',
  max_examples=CI_MAX_EXAMPLES,
  derandomize=True,
  deadline=None,
  database=None,
  # A generated model is analysed, cut and compiled: seconds, not milliseconds.
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  print_blob=True,
)
# Nightly explores new examples on every run; print_blob gives the seed to replay a failure.
settings.register_profile(
  'nightly', parent=settings.get_profile('ci'), max_examples=10 * CI_MAX_EXAMPLES, derandomize=False
)
# A quick look while editing: a fifth of the examples, failures reported unshrunk.
settings.register_profile(
  'dev', parent=settings.get_profile('ci'), max_examples=CI_MAX_EXAMPLES // 5, phases=[Phase.generate]
)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
