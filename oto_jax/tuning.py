"""Measured lowering choices for a deployed program.

XLA compiles the same convolution very differently from one shape to the next, and the fastest
way to run one depends on the backend, its libraries and the shape; no fixed rule is right on
every machine. :func:`oto_jax.deploy_subnet` with ``tune_inputs`` therefore measures, on the
default device and at the shapes of the given inputs:

* each convolution alone, bound as every lowering that computes it
  (:func:`~oto_jax.primitives.contractions.conv_lowerings`): the primitive, one ``dot_general``
  over its patches (:func:`~oto_jax.primitives.contractions.conv_as_dot`), and for a 3×3,
  stride-1 one Winograd's F(2×2, 3×3) (:func:`~oto_jax.primitives.contractions.conv_as_winograd`:
  16 matrix products per 2×2 output tile instead of 36), keeping the fastest;
* the whole program under each of a few XLA option sets (:func:`option_sets`; on CPU, with and
  without the YNNPACK library for convolutions), keeping the fastest;
* under the fastest set, the program that binds a convolution as another lowering only where
  that was ``CLEAR_WIN`` times faster alone, kept if it runs faster whole (alone, a convolution runs
  without its neighbours, and small wins there can be losses in the program).

Every candidate computes the same sums; only the rounding differs (Winograd's transforms add,
subtract and halve: about 1e-6 relative in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oto_jax import ir, slim
from oto_jax.ir import Eqn, Program
from oto_jax.primitives.contractions import CONV_LOWERINGS, bind_conv, conv_lowering_rule, conv_lowerings

try:
  import resource
except ImportError:  # Windows: page faults are not counted
  resource = None

_YNN = 'xla_cpu_experimental_ynn_fusion_type'
_XNN = 'xla_cpu_experimental_xnn_fusion_type'


def option_sets(backend: str) -> tuple[tuple[str, dict[str, Any]], ...]:
  """The XLA option sets the tuner tries on ``backend``: ``(label, compiler_options)``.

  On CPU: XLA's defaults; convolutions compiled by XLA's own emitter instead of YNNPACK (only
  dots go to YNNPACK); and the same with XNNPACK's dot fusions. Measured on a 2-core AMD EPYC
  with jax 0.10: a 3×3, 64→64 convolution at 64×32×32 took 52 ms through YNNPACK and 29 ms
  without; ResNet-50's ``model.apply`` 1.75 s and 1.11 s; a slim ResNet-50 373 ms and, with
  XNNPACK's dot fusions, 350 ms. An XLA that does not know an option refuses it, and the tuner
  skips that set. Elsewhere: the defaults only.
  """
  sets = [('XLA defaults', {})]
  if backend == 'cpu':
    own = {_YNN: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
    sets.append(('convolutions without YNNPACK', own))
    sets.append(
      ('convolutions without YNNPACK, XNNPACK dot fusions', {**own, _XNN: 'LIBRARY_FUSION_TYPE_DOT'})
    )
  return tuple(sets)


@dataclasses.dataclass(frozen=True)
class ConvTiming:
  """One convolution's measured lowerings.

  Attributes:
    where: the convolution's source location in the model.
    shapes: its operands' shapes at the tuning inputs (input, kernel).
    ms: median milliseconds of each lowering that applies (``'conv'``, ``'dot'``, ``'winograd'``).
    chosen: the lowering kept.
  """

  where: str
  shapes: tuple[tuple[int, ...], ...]
  ms: Mapping[str, float]
  chosen: str


@dataclasses.dataclass(frozen=True)
class Tuning:
  """What :func:`oto_jax.deploy_subnet` measured and chose at ``tune_inputs``.

  Attributes:
    compiler_options: the XLA options the deployed subnet compiles with (``{}``: XLA's
      defaults); pass them to your own ``jax.jit(..., compiler_options=...)``.
    label: the chosen option set's name.
    program_ms: median milliseconds of the whole deployed program under each option set tried
      (each with its own convolution choices); None where XLA refused the options.
    convs: every convolution's timings under the chosen option set.
    shapes: the tuning inputs' shapes.
    folded: whether the chosen program folds per-channel affine maps (BatchNorm).
    page_faults: median minor page faults of one call of the chosen program while it was timed
      (None where not counted). XLA:CPU allocates a program's temporaries at every call and
      glibc hands large freed blocks back to the OS, so each call faults them in again; see
      README, "Serving on a Linux CPU".
  """

  compiler_options: Mapping[str, Any]
  label: str
  program_ms: Mapping[str, float | None]
  convs: tuple[ConvTiming, ...]
  shapes: tuple[tuple[int, ...], ...]
  folded: bool = False
  page_faults: float | None = None

  def markdown(self) -> str:
    lines = [
      f'Tuned at input shapes {", ".join(map(str, self.shapes))} on {jax.devices()[0].device_kind}.',
      '',
      '| XLA options, folding | program ms |',
      '|---|---|',
    ]
    for label, ms in self.program_ms.items():
      mark = ' (chosen)' if label == self.label else ''
      lines.append(f'| {label}{mark} | {"refused" if ms is None else f"{ms:.2f}"} |')
    ms_heads = ' | '.join(f'{k} ms' for k in CONV_LOWERINGS)
    lines += [
      '',
      f'| convolution | input, kernel | {ms_heads} | chosen |',
      '|---|---|' + '---|' * len(CONV_LOWERINGS) + '---|',
    ]
    for c in self.convs:
      cells = [f'{c.ms[k]:.2f}' if k in c.ms else '' for k in CONV_LOWERINGS]
      lines.append(f'| {c.where} | {c.shapes[0]}, {c.shapes[1]} | {" | ".join(cells)} | {c.chosen} |')
    if self.page_faults:
      lines += [
        '',
        f'A call of the chosen program faulted {self.page_faults:,.0f} pages in (its temporaries, '
        'allocated afresh at every call). On Linux, starting the process with MALLOC_ARENA_MAX=1 '
        'MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 keeps freed memory for the next call.',
      ]
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.markdown()


def minor_faults() -> int | None:
  """This process's minor page faults so far (first touches of fresh memory), or None where
  the platform does not count them."""
  return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_ms(
  fn: Callable, args: Sequence, repeats: int, give_up_ms: float = float('inf'), faults: list | None = None
) -> float:
  """Median wall milliseconds of ``repeats`` calls of ``fn(*args)`` after one warm-up call, or
  the warm-up call's time when that exceeds ``give_up_ms`` (a candidate already lost). With
  ``faults``, each timed call's minor page faults are appended to it where they are counted."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = 1e3 * (time.perf_counter() - t)
  if first > give_up_ms:
    return first
  times = []
  for _ in range(repeats):
    before = minor_faults()
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
    if faults is not None and before is not None:
      faults.append(minor_faults() - before)
  return 1e3 * statistics.median(times)


def conv_operands(program: Program, leaves: list, arrays: list) -> dict[Eqn, tuple[list, dict]]:
  """Every convolution's operands (as ``jax.ShapeDtypeStruct`` s) and parameters when
  ``program`` runs on ``leaves`` and ``arrays``: found by tracing it once, abstractly. A
  convolution whose registry entry binds it its own way (a user's override) is left out."""
  seen: dict[Eqn, tuple[list, dict]] = {}

  def record(original, run, eqn, ins, params):
    seen[original] = ([jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in ins], dict(params))
    return original.entry.bind(run, eqn, ins, params)

  def wrap(eqn: Eqn) -> Eqn:
    bind = eqn.entry.bind if eqn.entry is not None else None
    if eqn.name != 'conv_general_dilated' or getattr(bind, 'func', None) is not bind_conv:
      return eqn
    return dataclasses.replace(eqn, entry=eqn.entry.replace(bind=functools.partial(record, eqn)))

  recording = dataclasses.replace(program, steps=ir.map_eqns(program.steps, wrap))
  sig = program.signature

  def run(leaves, arrays):
    return slim.evaluate(recording, leaves, arrays, slim.bind_inputs(sig.arrays, arrays, sig.fixed_reason))

  jax.eval_shape(run, leaves, arrays)
  return seen


# In a whole program a dot's small win alone can turn into a loss (ResNet-50 at batch 64 on a
# 2-core CPU: every convolution as the primitive 1156 ms, each one's fastest lowering alone 1243
# ms), so the tuner also times the plan that leaves the primitive only for clear wins (the
# few-pixel convolutions XLA:CPU runs 20-80x slower than the dot).
CLEAR_WIN = 1.5
CLEAR_WIN_LABEL = f'other lowerings only where {CLEAR_WIN:g}× faster alone'


def time_convs(
  operands: Mapping[Eqn, tuple[list, dict]],
  options: Mapping[str, Any],
  repeats: int,
  on_each: Callable[[], Any] = lambda: None,
) -> dict[Eqn, ConvTiming]:
  """Each convolution of ``operands`` (:func:`conv_operands`) timed alone under ``options`` on
  random operands of its shapes, as every lowering that applies; ``chosen`` is the fastest.
  ``on_each()`` after each convolution."""
  timings: dict[Eqn, ConvTiming] = {}
  for k, (eqn, (specs, params)) in enumerate(operands.items()):
    args = [
      jax.random.normal(jax.random.key(k), s.shape, s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating)
      else jnp.zeros(s.shape, s.dtype)
      for s in specs
    ]
    out = jax.eval_shape(functools.partial(eqn.primitive.bind, **params), *specs)
    rule = conv_lowering_rule(out.shape, specs[1].shape, params)
    applies = conv_lowerings(*specs, params)
    ms = {}
    for how in [rule, *(h for h in applies if h != rule)]:  # the likely winner first
      fn = functools.partial(bind_conv, how, None, eqn, params=params)
      compiled = jax.jit(lambda *a, fn=fn: fn(list(a))[0], compiler_options=dict(options) or None)
      # A candidate 3× slower than the best so far on its first call has lost (XLA:CPU's
      # convolutions to a few pixels take 80× the dot's time; no need to time them thrice).
      best = min(ms.values(), default=float('inf'))
      ms[how] = median_ms(compiled.lower(*args).compile(), args, repeats, give_up_ms=3 * best)
    timing = ConvTiming(eqn.where, tuple(tuple(s.shape) for s in specs), ms, chosen='conv')
    timings[eqn] = dataclasses.replace(timing, chosen=choose(timing))
    on_each()
  return timings


def choose(timing: ConvTiming, margin: float = 1.0) -> str:
  """The fastest lowering of a convolution alone; with ``margin > 1``, the primitive
  (``'conv'``) unless another lowering is ``margin`` times faster."""
  best = min(timing.ms, key=timing.ms.get)
  return best if timing.ms[best] * margin <= timing.ms['conv'] else 'conv'


def lower_convs(
  program: Program, timings: Mapping[Eqn, ConvTiming], margin: float = 1.0
) -> tuple[Program, tuple[ConvTiming, ...]]:
  """``program`` with each timed convolution bound as :func:`choose` picks, and the timings
  with those choices."""
  chosen = {e: dataclasses.replace(t, chosen=choose(t, margin)) for e, t in timings.items()}

  def lowered(eqn: Eqn) -> Eqn:
    t = chosen.get(eqn)
    if t is None:
      return eqn
    return dataclasses.replace(eqn, entry=eqn.entry.replace(bind=functools.partial(bind_conv, t.chosen)))

  return dataclasses.replace(program, steps=ir.map_eqns(program.steps, lowered)), tuple(chosen.values())
