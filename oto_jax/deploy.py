"""Deployment transforms on the slim program: folding per-channel affine maps, dropping dead code.

Both take a :class:`~oto_jax.ir.Program` and return a new one that computes the same outputs
from the same variables and inputs (the variables' contract does not change, so a deployed
subnet is saved, exported and sliced like any other):

* :func:`fold_affine` folds the per-channel scales and shifts that follow a convolution or a
  dense layer into it: inference BatchNorm ``(y - mean) * scale / sqrt(var + eps) + bias``,
  a bias, LayerScale. The activation-sized chain becomes one contraction with a scaled kernel
  plus one bias add; the scale is applied to the kernel inside the program (a pass over the
  kernel, never more work than ``1 / (2 · output pixels · batch)`` of the contraction).
* :func:`without_dead_code` removes the equations whose results nothing reads (side effects
  stay).

:func:`deploy_subnet` applies both, and with ``tune_inputs`` measures the lowering
(:mod:`oto_jax.tuning`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from oto_jax import tuning as tuning_
from oto_jax.errors import ShapeSpecificError
from oto_jax.ir import Call, Cond, Eqn, Literal, Loop, Program
from oto_jax.surgery import Subnet, subnet_of

_CONTRACTIONS = frozenset({'conv_general_dilated', 'dot_general'})
_AFFINE = frozenset({'mul', 'div', 'add', 'sub', 'neg'})
_SCALES = frozenset({'mul', 'div', 'neg', 'rsub'})


def deploy_subnet(
  subnet: Subnet,
  *,
  fold_batchnorm: bool = True,
  drop_dead_code: bool = True,
  tune_inputs: tuple | None = None,
  tune_kwargs: dict[str, Any] | None = None,
  tune_repeats: int = 3,
  progress: bool = True,
) -> Subnet:
  """The slim model readied for inference: BatchNorm folded, dead code dropped, lowering tuned.

  .. math::
    \\mathrm{BN}(x \\ast W) = (x \\ast W - \\mu)\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta
    = x \\ast \\Big(W \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}\\Big)
    + \\Big(\\beta - \\frac{\\gamma\\,\\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\Big)

  The returned subnet takes the same variables (``subnet.variables``) and computes the same
  outputs, up to float rounding (the scale multiplies the kernel instead of the products). Its
  program folds every per-channel scale and shift after a convolution or dense layer (inference
  BatchNorm, LayerScale, biases; see :func:`fold_affine`), so no activation-sized pass remains
  for them but one bias add, and has no equation whose result nothing reads. Train-mode
  BatchNorm (batch statistics) is left alone: its statistics come from the inputs.

  With ``tune_inputs``, the lowering is measured on the default device at those inputs'
  shapes (:mod:`oto_jax.tuning`): each convolution as the primitive, as one dot over its
  patches, and (3×3, stride 1, float32/64) by Winograd's F(2×2, 3×3), and the whole program
  under each XLA option set of :func:`oto_jax.tuning.option_sets`, folded and (if folding was
  asked for) not folded, since under XLA a fold can cost more than it saves; then, under the
  fastest of those, the program that keeps the primitive unless another lowering was
  ``oto_jax.tuning.CLEAR_WIN`` times faster alone (small wins alone can be losses in the
  program). The fastest is kept and reported in :attr:`Subnet.tuning`. :meth:`Subnet.apply`
  compiles with the chosen options (:attr:`Subnet.compiler_options`; pass them to your own
  ``jax.jit``). Without it, small-output and 1×1 convolutions run as one dot (a rule measured
  on a 2-core CPU), and a tuned subnet keeps its tuning.

  Args:
    subnet: a slim model (:func:`oto_jax.construct_subnet`).
    fold_batchnorm: fold per-channel affine maps into the contraction before them.
    drop_dead_code: drop the equations whose results nothing reads.
    tune_inputs: example positional inputs of ``apply`` (a tuple) to tune the lowering at;
      None: no measurement.
    tune_kwargs: ``apply``'s keyword arguments for the tuning call (static ones as analysed,
      e.g. ``{'train': False}``).
    tune_repeats: timed calls per candidate (the median counts).
    progress: show a progress bar while tuning.

  Returns:
    A new :class:`~oto_jax.Subnet` with the same partition, keep mask and variables; nothing
    passed in is modified.

  Raises:
    TypeError: ``tune_inputs`` is not a tuple of ``apply``'s positional inputs.
    ShapeSpecificError: the tuning inputs do not fit the analysed signature.
    RuntimeError: XLA refused every option set tried.

  Example::

    fast = oto_jax.deploy_subnet(subnet)
    y = jax.jit(fast.apply)(fast.variables, x)   # == subnet.apply(subnet.variables, x)

    tuned = oto_jax.deploy_subnet(subnet, tune_inputs=(x,))
    print(tuned.tuning)                          # every lowering and option set timed
    y = jax.jit(tuned.apply, compiler_options=tuned.compiler_options)(tuned.variables, x)

  References:
    Jacob et al., *Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference*, CVPR 2018 (arXiv 1712.05877), section 3.2 (folding
    batch normalisation into the preceding layer).
  """

  def finish(program: Program, fold: bool = fold_batchnorm) -> Program:
    if fold:
      program = fold_affine(program)
    if drop_dead_code:
      program = without_dead_code(program)
    return program

  def build(program: Program, tuning: tuning_.Tuning | None) -> Subnet:
    return subnet_of(subnet.partition, subnet.keep, subnet.variables, program, subnet._cut, tuning)

  if tune_inputs is None:
    return build(finish(subnet.program), subnet.tuning)
  if not isinstance(tune_inputs, tuple):
    raise TypeError(
      f"tune_inputs takes a tuple of apply's positional inputs, e.g. (x,); got {type(tune_inputs).__name__}."
    )
  leaves = subnet._variable_leaves(subnet.variables)
  try:
    arrays = subnet._input_arrays(tune_inputs, dict(tune_kwargs or {}))
  except ShapeSpecificError as e:
    raise ShapeSpecificError(
      f'{e} For tuning: tune_inputs=(positional inputs,), tune_kwargs={{keywords}}.'
    ) from e
  operands = tuning_.conv_operands(subnet.program, leaves, arrays)
  sets = tuning_.option_sets(jax.default_backend())
  shapes = tuple(tuple(np.shape(a)) for a in arrays)
  program_ms: dict[str, float | None] = {}
  best = None  # (ms, subnet, its option set's convolution timings, page faults of its calls)

  def measure(name: str, options: dict, timings: dict, fold: bool, margin: float = 1.0) -> None:
    nonlocal best
    program, convs = tuning_.lower_convs(subnet.program, timings, margin)
    candidate = build(finish(program, fold), tuning_.Tuning(options, name, {}, convs, shapes, fold))
    faults: list[int] = []
    program_ms[name] = ms = tuning_.median_ms(candidate._call, (leaves, arrays), tune_repeats, faults=faults)
    if best is None or ms < best[0]:
      best = (ms, candidate, timings, faults)

  # Folding is measured too: XLA fuses BatchNorm's passes with the activation after it, so a
  # fold saves little there, and scaling the kernel in the program costs a pass over it per call.
  folds = (True, False) if fold_batchnorm else (False,)
  total = len(sets) * (len(operands) + len(folds)) + 1
  with tqdm(total=total, desc='tuning the lowering', disable=not progress, leave=False) as bar:
    for label, options in sets:
      try:
        timings = tuning_.time_convs(operands, options, tune_repeats, bar.update)
      except jax.errors.JaxRuntimeError:  # an XLA that does not know these options
        program_ms[label] = None
        continue
      for fold in folds:
        measure(label if fold == fold_batchnorm else f'{label}, BatchNorm not folded', options, timings, fold)
        bar.update()
    if best is not None:  # the fastest set again, trusting the timings alone less
      fastest, timings = best[1].tuning, best[2]
      if any(tuning_.choose(t, tuning_.CLEAR_WIN) != tuning_.choose(t) for t in timings.values()):
        name = f'{fastest.label}, {tuning_.CLEAR_WIN_LABEL}'
        measure(name, dict(fastest.compiler_options), timings, fastest.folded, tuning_.CLEAR_WIN)
      bar.update()
  if best is None:
    raise RuntimeError(
      f'XLA refused every option set tried ({", ".join(program_ms)}); deploy without tune_inputs.'
    )
  _, chosen, _, faults = best
  # The record holds every candidate's time, known only now.
  record = dataclasses.replace(
    chosen.tuning, program_ms=program_ms, page_faults=float(np.median(faults)) if faults else None
  )
  return dataclasses.replace(chosen, tuning=record)


# ---------------------------------------------------------------------------------------------
# Dead code.


def without_dead_code(program: Program) -> Program:
  """``program`` without the equations whose results no output depends on.

  Loops and branches are kept whole when any of their results is read; calls are pruned
  inside. Equations with side effects always stay.
  """
  live = {o for o in program.outs if type(o) is int}
  steps = _live_steps(program.steps, live)
  return dataclasses.replace(program, steps=steps)


def _refs(step: Any) -> set[int]:
  """Every value ``step`` reads, also inside its bodies (a safe superset of what it needs)."""
  out: set[int] = set()

  def add(*xs):
    out.update(x for x in xs if type(x) is int)

  if isinstance(step, Eqn):
    add(*step.ins)
  elif isinstance(step, Call):
    add(*step.ins)
    for s in step.body:
      out.update(_refs(s))
  elif isinstance(step, Loop):
    add(*(c.init for c in step.carries), *(c.out for c in step.carries), step.pred)
    add(*(x for x, _ in step.xs), *(y for y, _ in step.ys))
    for s in (*step.body, *step.cond):
      out.update(_refs(s))
  else:
    add(step.index)
    for b in step.branches:
      add(*b.outs)
      for s in b.steps:
        out.update(_refs(s))
  return out


def _effectful(step: Any) -> bool:
  if isinstance(step, Eqn):
    return step.effectful
  if isinstance(step, Call):
    return any(_effectful(s) for s in step.body)
  if isinstance(step, Loop):
    return any(_effectful(s) for s in (*step.body, *step.cond))
  return any(_effectful(s) for b in step.branches for s in b.steps)


def _outs(step: Any) -> tuple:
  if isinstance(step, Eqn | Call | Cond):
    return step.outs
  return (*(c.final for c in step.carries), *(o for _, o in step.ys))


def _live_steps(steps: tuple, live: set[int]) -> tuple:
  """The steps a live value needs, walking backwards; ``live`` grows with what they read."""
  kept = []
  for s in reversed(steps):
    needed = _effectful(s) or any(type(o) is int and o in live for o in _outs(s))
    if not needed:
      continue
    if isinstance(s, Call):
      # The body's results are the call's; every one is read back (remat returns them all).
      live.update(o for o in s.outs if type(o) is int)
      body = _live_steps(s.body, live)
      live.update(x for x in s.ins if type(x) is int)
      kept.append(dataclasses.replace(s, body=body))
    else:
      live.update(_refs(s))
      kept.append(s)
  return tuple(reversed(kept))


# ---------------------------------------------------------------------------------------------
# Affine folding.


def fold_affine(program: Program) -> Program:
  """``program`` with every per-channel affine chain after a contraction folded into it.

  .. math::
    (x \\ast W) \\cdot s + b = x \\ast (W \\cdot s) + b

  A chain is a run of ``mul``, ``div``, ``add``, ``sub`` and ``neg`` that starts at a
  convolution or ``dot_general`` with one operand computed from variables and constants only
  (the kernel), whose other operands are computed from variables and constants only and vary
  along the kernel's output channels only, and whose values are read once. A chain with a
  scale becomes one equation: the contraction with the kernel scaled (in float32), plus one
  shift. Chains of shifts alone stay as they are (there is nothing to save).
  """
  weights = _weight_side(program)
  uses = _uses(program)
  return dataclasses.replace(program, steps=_fold_steps(program, program.steps, weights, uses))


def _weight_side(program: Program) -> set[int]:
  """The values computed from variables, constants and literals only."""
  side = set(program.variables) | set(program.consts)

  def walk(steps):
    for s in steps:
      if isinstance(s, Eqn):
        if not s.effectful and all(type(a) is not int or a in side for a in s.ins):
          side.update(s.outs)
      elif isinstance(s, Call):
        walk(s.body)

  walk(program.steps)
  return side


def _uses(program: Program) -> Counter:
  """How often each value is read; reads across a call, loop or branch boundary count too."""
  uses: Counter = Counter(o for o in program.outs if type(o) is int)

  def walk(steps):
    for s in steps:
      if isinstance(s, Eqn):
        uses.update(a for a in s.ins if type(a) is int)
      else:
        uses.update(_refs(s) if not isinstance(s, Call) else (x for x in (*s.ins, *s.outs) if type(x) is int))
        if isinstance(s, Call):
          walk(s.body)

  walk(program.steps)
  return uses


def _channel_axes(program: Program, eqn: Eqn, kernel: int) -> tuple[tuple[int, int], ...] | None:
  """Pairs (result axis, kernel axis) of the output channels the kernel operand owns."""
  rank = len(program.values.shapes[eqn.ins[kernel]])
  if eqn.name == 'conv_general_dilated':
    dn = eqn.params['dimension_numbers']
    if kernel != 1 or eqn.params['batch_group_count'] != 1:
      return None
    return ((dn.out_spec[1], dn.rhs_spec[0]),)
  (contract, batch) = eqn.params['dimension_numbers']
  free = [a for a in range(rank) if a not in contract[kernel] and a not in batch[kernel]]
  other = len(program.values.shapes[eqn.ins[1 - kernel]])
  first = len(batch[0]) + (0 if kernel == 0 else other - len(contract[0]) - len(batch[0]))
  return tuple((first + k, a) for k, a in enumerate(free))


def _per_channel(program: Program, x: Any, rank: int, result_axes: set[int], weights: set[int]) -> bool:
  if isinstance(x, Literal):
    return np.ndim(x.val) == 0
  if x not in weights:
    return False
  shape = program.values.shapes[x]
  return len(shape) == 0 or (
    len(shape) == rank and all(d == 1 for a, d in enumerate(shape) if a not in result_axes)
  )


def _fold_steps(program: Program, steps: tuple, weights: set[int], uses: Counter) -> tuple:
  steps = [
    dataclasses.replace(s, body=_fold_steps(program, s.body, weights, uses)) if isinstance(s, Call) else s
    for s in steps
  ]
  reader = {}
  for i, s in enumerate(steps):
    if isinstance(s, Eqn):
      for a in s.ins:
        if type(a) is int:
          reader[a] = i
  replaced: dict[int, Eqn | None] = {}
  for i, s in enumerate(steps):
    if (
      not isinstance(s, Eqn)
      or s.name not in _CONTRACTIONS
      or s.entry is None
      or getattr(s, 'take', ())
      or i in replaced
    ):
      continue
    side = [type(a) is not int or a in weights for a in s.ins[:2]]
    if side != [False, True] and side != [True, False]:
      continue
    kernel = side.index(True)
    dtype = program.values.dtypes[s.outs[0]]
    # A float kernel of the result's dtype only: a scale folded into an integer kernel, or into a
    # narrower one than the product is accumulated in, would round where the model did not.
    if type(s.ins[kernel]) is not int or not jnp.issubdtype(dtype, jnp.floating):
      continue
    if program.values.dtypes[s.ins[kernel]] != dtype:
      continue
    pairs = _channel_axes(program, s, kernel)
    if not pairs:
      continue
    rank = len(program.values.shapes[s.outs[0]])
    axes = {a for a, _ in pairs}
    ops, chain, extra, cur = [], [], [], s.outs[0]
    while uses[cur] == 1 and (j := reader.get(cur)) is not None and j > i and j not in replaced:
      e = steps[j]
      if e.name not in _AFFINE or getattr(e, 'take', ()) or e.effectful:
        break
      if e.name == 'neg':
        ops.append(('neg', None))
      else:
        a, b = e.ins
        first = a == cur
        other = b if first else a
        if other == cur or (e.name == 'div' and not first):
          break
        if not _per_channel(program, other, rank, axes, weights):
          break
        kind = 'rsub' if e.name == 'sub' and not first else e.name
        if isinstance(other, Literal):
          ops.append((kind, other))
        else:
          ops.append((kind, len(s.ins) + len(extra)))
          extra.append(other)
      chain.append(j)
      cur = e.outs[0]
    if not any(k in _SCALES for k, _ in ops):
      continue
    recipe = _Recipe(s, kernel, pairs, tuple(ops), s.entry.bind)
    entry = s.entry.replace(bind=functools.partial(_bind_folded, recipe))
    fused = dataclasses.replace(s, ins=(*s.ins, *extra), outs=(cur,), entry=entry)
    replaced[i] = None
    for j in chain[:-1]:
      replaced[j] = None
    replaced[chain[-1]] = fused
  return tuple(replaced.get(i, s) for i, s in enumerate(steps) if replaced.get(i, s) is not None)


@dataclasses.dataclass(frozen=True, eq=False)
class _Recipe:
  """How a folded equation computes: its contraction, and the chain folded into it.

  Attributes:
    contraction: the original equation (its operands are the folded one's first ones).
    kernel: which operand is the kernel.
    pairs: (result axis, kernel axis) of each output channel axis the kernel owns.
    ops: the chain, in order: ``(kind, operand)`` with ``operand`` an index into the folded
      equation's operands, a :class:`~oto_jax.ir.Literal`, or None (``neg``).
    bind: the contraction's own ``bind`` (None: bind the primitive).
  """

  contraction: Eqn
  kernel: int
  pairs: tuple[tuple[int, int], ...]
  ops: tuple[tuple[str, Any], ...]
  bind: Any


def _bind_folded(recipe: _Recipe, run: Any, eqn: Eqn, ins: list, params: dict) -> list:
  # y·s + t through the chain, in float32: mul/div scale both, add/sub shift, c - y and -y flip.
  scale: Any = 1.0
  shift: Any = 0.0
  for kind, arg in recipe.ops:
    v = None if arg is None else jnp.asarray(arg.val if isinstance(arg, Literal) else ins[arg], jnp.float32)
    if kind == 'mul':
      scale, shift = scale * v, shift * v
    elif kind == 'div':
      scale, shift = scale / v, shift / v
    elif kind == 'add':
      shift = shift + v
    elif kind == 'sub':
      shift = shift - v
    elif kind == 'rsub':
      scale, shift = -scale, v - shift
    else:
      scale, shift = -scale, -shift
  c = recipe.contraction
  args = list(ins[: len(c.ins)])
  w = args[recipe.kernel]
  s = jnp.asarray(scale, jnp.float32)
  if s.ndim:
    # The scale varies along the result's channel axes only (the others have length 1), which
    # come in the kernel's order: a reshape puts them on the kernel's axes.
    shape = [1] * w.ndim
    for result_axis, kernel_axis in recipe.pairs:
      shape[kernel_axis] = s.shape[result_axis]
    s = s.reshape(shape)
  args[recipe.kernel] = (jnp.asarray(w, jnp.float32) * s).astype(w.dtype)
  y = recipe.bind(run, c, args, params)[0] if recipe.bind is not None else c.primitive.bind(*args, **params)
  if not any(kind in ('add', 'sub', 'rsub') for kind, _ in recipe.ops):
    return [y]
  return [y + jnp.asarray(shift, jnp.float32).astype(run.dtype(eqn.outs[0]))]
