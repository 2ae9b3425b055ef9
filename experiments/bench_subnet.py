"""Does the slim model run as much faster as its FLOPs say? And how fast is construct_subnet?

1. VGG16-BN and ResNet-50 on CIFAR shapes (batch 64, inference, compiled, this CPU). ZIGs are
   zeroed so that the FLOPs fall to about 27% of the full model (OTO's VGG16-BN result), in a
   random order until the budget is met (``oto_jax.budgets.select``, the choice HESSO makes),
   so every layer narrows by about the same fraction. Timed interleaved in one process: the
   full model (``model.apply``, with XLA's default options and with those the tuner chose for
   the full program; the analysed program cut with nothing removed, which lowers small-output
   convolutions as the slim program does; that program deployed, ``oto_jax.deploy_subnet``:
   BatchNorm folded; and deployed with ``tune_inputs``: each convolution's lowering, the XLA
   options and whether folding pays measured), the slim model as cut, deployed, deployed and
   tuned, with widths rounded up to multiples of 4 (``construct_subnet(group_divisible=4)``),
   and the slim model HESSO's ``group_divisible=8`` would pick; and, when ``torch`` is
   installed, the PyTorch twins of the full and the slim model
   (``experiments/torch_reference.py``, same weights, outputs checked). Speedups are over the
   fastest full model of the same framework, printed with the FLOPs ratio of the pruning and
   speedup ÷ FLOPs ratio (target ≥ 0.85), and each model's compile time
   (``jit(...).lower().compile()``; PyTorch: its first call).
2. ``construct_subnet`` on ResNet-50 and BERT-base with half of their ZIGs removed: the time
   of a first call (target ≤ 0.5 s each; the partition is built before the clock starts),
   which includes one trace of the slim program that checks every equation's shape.
   For the unrounded cut, every convolution and dot of the tuned full and slim programs is also
   timed alone, as tuned (lowering and XLA options), and the layers that lose most against
   their FLOPs ratio are listed.
3. ``Subnet.apply`` called eagerly against ``jax.jit(subnet.apply)`` on small models (target:
   eager within 3× of jitted; the slim program is compiled either way).

Each latency comes with the minor page faults of a call: XLA:CPU allocates a program's
temporaries afresh at every call, and glibc hands buffers above its mmap threshold back to the
OS when they are freed, so every call faults its whole temporary buffer in again (PyTorch's
activations likewise). Glibc's settings decide that, and are printed; to run both frameworks
with freed memory kept::

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
    python -m experiments.bench_subnet

Usage::

  python -m experiments.bench_subnet [--batch 64] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import oto_jax
from experiments import models
from oto_jax import budgets, ir


def _time(fn, *args, repeats: int, faults: list | None = None) -> list[float]:
  """Seconds of each of ``repeats`` calls; with ``faults``, each call's minor page faults are
  appended to it (0 where the platform does not count them)."""
  out = []
  for _ in range(repeats):
    before = oto_jax.tuning.minor_faults()
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
    if faults is not None:
      faults.append(0 if before is None else oto_jax.tuning.minor_faults() - before)
  return out


# The glibc settings that decide whether a freed large buffer goes back to the OS (and so is
# page-faulted in again on the next call); printed with the results.
ALLOCATOR_ENV = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')


SPEEDUP_MODELS = {
  'vgg16_bn': ('VGG16-BN', lambda: models.VGG()),
  'resnet50': ('ResNet-50', lambda: models.ResNet50(num_classes=10, cifar_stem=True)),
}


def trained_stats(stats):
  """Running statistics as after training (init's are mean 0, var 1, which fold to nothing):
  means ~ N(0, 0.1²), variances ~ U(0.5, 1.5)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(stats)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  out = [
    a * jax.random.uniform(k, a.shape, minval=0.5, maxval=1.5)
    if jax.tree_util.keystr(p).endswith("['var']")
    else a + 0.1 * jax.random.normal(k, a.shape)
    for (p, a), k in zip(leaves, keys)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


def _compile(fn, *args, options=None) -> tuple[Callable, float]:
  """``fn`` compiled for ``args`` with XLA ``options``, and the seconds that took (tracing,
  lowering, XLA)."""
  t = time.perf_counter()
  compiled = jax.jit(fn, compiler_options=options or None).lower(*args).compile()
  return compiled, time.perf_counter() - t


def _rel_err(ref, got) -> float:
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  return float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))


def speedup(name: str, batch: int, repeats: int, keep_flops: float, use_torch: bool) -> dict:
  """Full and slim latency of one model: oto_jax's programs as cut, deployed and rounded, and
  the PyTorch twins of the full and the slim model, all timed interleaved in this process."""
  model = SPEEDUP_MODELS[name][1]()
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  variables = {**variables, 'batch_stats': trained_stats(variables['batch_stats'])}
  part = oto_jax.zig_partition(model.apply, variables, x)
  # Random saliency, removed in its order until the FLOPs budget is met: every layer narrows
  # by about the same fraction, as in OTO's VGG16-BN result.
  key = jax.random.uniform(jax.random.key(2), (part.num_zigs,))
  none = jnp.zeros((part.num_zigs,), bool)
  removed = budgets.select(oto_jax.flops_budget(keep_flops), part, key, none, ~none, jnp.float32(1.0))
  # HESSO's group_divisible=8 picks another set: every kept width a multiple of 8.
  removed8 = budgets.round_to_multiple(part, removed, key, 8)
  ids, ids8 = (np.flatnonzero(np.asarray(r)) for r in (removed, removed8))
  zeroed, zeroed8 = part.zero(variables, ids), part.zero(variables, ids8)
  whole = oto_jax.construct_subnet(part, zeroed, zig_ids=[])
  sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
  sub8 = oto_jax.construct_subnet(part, zeroed8, zig_ids=ids8)
  ref, ref8 = model.apply(zeroed, x), model.apply(zeroed8, x)
  flops = {k: s.report().flops[0] / s.report().flops[1] for k, s in (('cut', sub), ('gd8', sub8))}

  t = time.perf_counter()
  deployed = oto_jax.deploy_subnet(sub)
  deploy_s = time.perf_counter() - t
  t = time.perf_counter()
  tuned = oto_jax.deploy_subnet(sub, tune_inputs=(x,))
  tune_s = time.perf_counter() - t
  whole_tuned = oto_jax.deploy_subnet(whole, tune_inputs=(x,))
  rounded = oto_jax.construct_subnet(part, zeroed, zig_ids=ids, group_divisible=4)
  # (label, subnet or None for model.apply, reference output, FLOPs ratio or None for a full
  # model, XLA options)
  variants = [
    ('full, model.apply', None, ref, None, {}),
    ('full, model.apply, tuned XLA options', None, ref, None, whole_tuned.compiler_options),
    ('full, oto_jax program', whole, ref, None, {}),
    ('full, BN folded', oto_jax.deploy_subnet(whole), ref, None, {}),
    ('full, tuned', whole_tuned, ref, None, whole_tuned.compiler_options),
    ('slim', sub, ref, flops['cut'], {}),
    ('slim, BN folded', deployed, ref, flops['cut'], {}),
    ('slim, tuned', tuned, ref, flops['cut'], tuned.compiler_options),
    ('slim, widths rounded up to ×4, BN folded', oto_jax.deploy_subnet(rounded), ref, flops['cut'], {}),
  ]
  for label, s, want, ratio in (
    ('slim, widths rounded up to ×4, tuned', rounded, ref, flops['cut']),
    ('slim trained with group_divisible=8, tuned', sub8, ref8, flops['gd8']),
  ):
    s = oto_jax.deploy_subnet(s, tune_inputs=(x,))
    variants.append((label, s, want, ratio, s.compiler_options))
  runs = []
  for label, s, want, ratio, options in variants:
    fn, v = (model.apply, zeroed) if s is None else (s.apply, s.variables)
    compiled, compile_s = _compile(fn, v, x, options=options)
    runs.append(
      {'label': label, 'fn': compiled, 'args': (v, x), 'compile_s': compile_s, 'flops_ratio': ratio}
    )
    runs[-1]['max_rel_err'] = _rel_err(want, compiled(v, x))
  torch_info = None
  if use_torch:
    more, torch_info = torch_runs(model, zeroed, sub, x, ref, flops['cut'])
    runs += more
  # Interleaved, so that drifts of this noisy machine hit every variant alike.
  times: dict[str, list[float]] = {r['label']: [] for r in runs}
  faults: dict[str, list[int]] = {r['label']: [] for r in runs}
  for _ in range(repeats):
    for r in runs:
      times[r['label']] += _time(r['fn'], *r['args'], repeats=1, faults=faults[r['label']])
  for r in runs:
    r['ms'] = 1e3 * statistics.median(times[r['label']])
    r['page_faults'] = statistics.median(faults[r['label']])
  by = {r['label']: r for r in runs}
  # Speedups over the fastest full model of the same framework: no slow baseline flatters them.
  fastest = min((r for r in runs if r['label'].startswith('full')), key=lambda r: r['ms'])
  for r in runs:
    base = by['PyTorch full'] if r['label'].startswith('PyTorch') else fastest
    r['speedup'] = base['ms'] / r['ms']
    r['efficiency'] = None if r['flops_ratio'] is None else r['speedup'] / r['flops_ratio']
    del r['fn'], r['args']
  layers = []
  # Where the time goes: each contraction of the tuned full and slim program alone, as tuned.
  full_layers = contraction_times(whole_tuned, 3, whole_tuned.compiler_options)
  for f, sl in zip(full_layers, contraction_times(tuned, 3, tuned.compiler_options)):
    layers.append(
      {
        'op': f['op'] if f['op'] == sl['op'] else f'{f["op"]} (slim: {sl["op"].split(" as ")[-1]})',
        'full_shapes': f['shapes'],
        'slim_shapes': sl['shapes'],
        'full_ms': f['ms'],
        'slim_ms': sl['ms'],
        'full_gflops': f['gflops'],
        'slim_gflops': sl['gflops'],
      }
    )
  rep = sub.report()
  return {
    'runs': runs,
    'flops_remaining': rep.flops[1] / rep.flops[0],
    'params_remaining': rep.params[1] / rep.params[0],
    'deploy_s': deploy_s,
    'tune_s': tune_s,
    'fastest_full': fastest['label'],
    'tuning': {'options': tuned.tuning.label, 'program_ms': dict(tuned.tuning.program_ms)},
    'full_tuning': {'options': whole_tuned.tuning.label, 'program_ms': dict(whole_tuned.tuning.program_ms)},
    'widths': [w[2] for w in rep.widths],
    'layers': layers,
    'torch': torch_info,
  }


def torch_runs(model, zeroed, sub, x, ref, flops_ratio: float) -> tuple[list[dict], dict]:
  """The PyTorch twins of the full (zeroed) and the slim model, each in its faster memory
  format (NCHW or channels-last, measured here), checked against the JAX outputs; and
  PyTorch's version and thread count."""
  import torch

  from experiments import torch_reference as tr

  out = []
  for label, v, ratio in (('PyTorch full', zeroed, None), ('PyTorch slim', sub.variables, flops_ratio)):
    net = tr.twin(model, jax.tree.map(np.asarray, v))
    best = None
    for channels_last in (False, True):
      fn, tx = tr.runner(net, channels_last), tr.to_torch(x, channels_last)
      t = time.perf_counter()
      y = fn(tx)
      first = time.perf_counter() - t
      ms = statistics.median(_time(fn, tx, repeats=3))
      if best is None or ms < best[0]:
        best = (ms, fn, tx, channels_last, first, y.numpy())
    _, fn, tx, channels_last, first, y = best
    out.append(
      {
        'label': label,
        'fn': fn,
        'args': (tx,),
        'compile_s': first,
        'flops_ratio': ratio,
        'max_rel_err': _rel_err(ref, y),
        'layout': 'channels-last' if channels_last else 'NCHW',
      }
    )
  return out, {'version': torch.__version__, 'threads': torch.get_num_threads()}


def contraction_times(subnet, repeats: int, options: dict) -> list[dict]:
  """Each convolution and dot_general of a subnet's program run alone at its shapes, bound as
  the program binds it (a tuned lowering, or the rule's) and compiled with XLA ``options``:
  time, FLOPs, and a tuned convolution's lowering in its ``op``."""
  prog = subnet.program
  ctx = types.SimpleNamespace(
    values=prog.values, shape=lambda v: prog.values.shapes[v], dtype=lambda v: prog.values.dtypes[v]
  )
  out = []
  tuned = iter(subnet.tuning.convs if subnet.tuning else ())
  for k, eqn in enumerate(ir.iter_eqns(prog.steps)):
    if eqn.name not in ('conv_general_dilated', 'dot_general') or not all(type(v) is int for v in eqn.ins):
      continue
    shapes = [tuple(int(d) for d in prog.values.shapes[v]) for v in eqn.ins]
    ins = [jnp.ones(s, prog.values.dtypes[v]) for s, v in zip(shapes, eqn.ins)]
    bind = eqn.entry.bind

    def alone(*a, e=eqn, b=bind):
      return (b(ctx, e, list(a), e.params) if b else [e.primitive.bind(*a, **e.params)])[0]

    fn = jax.jit(alone, compiler_options=options or None)
    jax.block_until_ready(fn(*ins))
    ms = 1e3 * statistics.median(_time(fn, *ins, repeats=repeats))
    flops = sum(
      t.coef * np.prod([prog.values.shapes[v][ax] for v, ax in t.axes]) for t in eqn.entry.cost(ctx, eqn)
    )
    # A tuned program's convolutions, in program order, are its tuning record's.
    timing = next(tuned) if eqn.name == 'conv_general_dilated' and subnet.tuning else None
    assert timing is None or timing.shapes[1] == shapes[1], (timing, shapes)
    op = eqn.name if timing is None else f'{eqn.name} as {timing.chosen}'
    # The operands (a folded contraction also reads its scale and shift).
    out.append({'index': k, 'op': op, 'shapes': shapes[:2], 'ms': ms, 'gflops': flops / 1e9})
  return out


def construct_time(name: str) -> dict:
  cls, shape, dtype = {
    'resnet50': (models.ResNet50, (1, 224, 224, 3), jnp.float32),
    'bert_base': (models.BertEncoder, (1, 128), jnp.int32),
  }[name]
  model = cls()
  x = jnp.zeros(shape, dtype)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  part = oto_jax.zig_partition(model.apply, variables, x)
  ids = np.random.default_rng(0).choice(part.num_zigs, part.num_zigs // 2, replace=False)
  zeroed = jax.block_until_ready(jax.jit(part.zero)(variables, part.zig_mask(ids)))
  t = time.perf_counter()
  sub = oto_jax.construct_subnet(part, zeroed)
  jax.block_until_ready(sub.variables)
  first = time.perf_counter() - t
  return {'model': name, 'construct_s': first, 'num_zigs': part.num_zigs, 'removed': int(len(ids))}


EAGER_MODELS = {
  'resnet18_cifar': (lambda: models.ResNet18(cifar_stem=True, num_classes=10), (8, 32, 32, 3), jnp.float32),
  'vgg16_bn': (models.VGG, (8, 32, 32, 3), jnp.float32),
  'bert_tiny': (
    lambda: models.BertEncoder(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128),
    (8, 32),
    jnp.int32,
  ),
}


def eager_vs_jit(name: str, repeats: int) -> dict:
  build, shape, dtype = EAGER_MODELS[name]
  model = build()
  x = jnp.zeros(shape, dtype)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  part = oto_jax.zig_partition(model.apply, variables, x)
  ids = np.random.default_rng(0).choice(part.num_zigs, part.num_zigs // 3, replace=False)
  sub = oto_jax.construct_subnet(part, part.zero(variables, ids), zig_ids=ids)
  jitted = jax.jit(sub.apply)
  jax.block_until_ready((sub.apply(sub.variables, x), jitted(sub.variables, x)))  # compile both
  t_eager, t_jit = [], []
  for _ in range(repeats):
    t_eager += _time(sub.apply, sub.variables, x, repeats=1)
    t_jit += _time(jitted, sub.variables, x, repeats=1)
  e, j = statistics.median(t_eager), statistics.median(t_jit)
  return {'model': name, 'eager_ms': 1e3 * e, 'jit_ms': 1e3 * j, 'ratio': e / j}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--repeats', type=int, default=15)
  ap.add_argument('--keep-flops', type=float, default=0.27)
  ap.add_argument('--json', default=None, help='write the results here')
  ap.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference even when installed')
  args = ap.parse_args(argv)

  use_torch = importlib.util.find_spec('torch') is not None and not args.no_torch
  allocator = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
  print(f'glibc allocator settings: {allocator or "defaults"}')
  print()
  results = {}
  for name, (label, _) in SPEEDUP_MODELS.items():
    res = results[name] = speedup(name, args.batch, args.repeats, args.keep_flops, use_torch)
    runs = {r['label']: r for r in res['runs']}
    ref = res['torch']
    print(
      f'{label}, CIFAR shapes, batch {args.batch}, inference, {jax.devices()[0].device_kind}; '
      f'{100 * res["flops_remaining"]:.1f}% of the FLOPs and {100 * res["params_remaining"]:.1f}% of the '
      'parameters left; '
      + (f'PyTorch {ref["version"]} on {ref["threads"]} threads' if ref else 'PyTorch not installed')
    )
    print()
    print(
      '| model | latency ms | compile s | speedup | FLOPs ratio | speedup ÷ FLOPs ratio | max rel err | '
      'page faults per call |'
    )
    print('|---|---|---|---|---|---|---|---|')
    for r in res['runs']:
      eff = '' if r['efficiency'] is None else f'{r["efficiency"]:.2f}'
      ratio = '' if r['flops_ratio'] is None else f'{r["flops_ratio"]:.2f}×'
      layout = f' ({r["layout"]})' if 'layout' in r else ''
      print(
        f'| {r["label"]}{layout} | {r["ms"]:.1f} | {r["compile_s"]:.2f} | {r["speedup"]:.2f}× | {ratio} | '
        f'{eff} | {r["max_rel_err"]:.1e} | {r["page_faults"]:,.0f} |'
      )
    print()
    best = max(
      (r for r in res['runs'] if r['efficiency'] and not r['label'].startswith('PyTorch')),
      key=lambda r: r['efficiency'],
    )
    print(
      f'Best oto_jax speedup ÷ FLOPs ratio: {best["efficiency"]:.3f} ({best["label"]}); target ≥ 0.85: '
      f'{"pass" if best["efficiency"] >= 0.85 else "miss"}.',
      end=' ',
    )
    ours = [r for r in res['runs'] if not r['label'].startswith('PyTorch')]
    full = runs[res['fastest_full']]
    slim = min((r for r in ours if r['flops_ratio'] == runs['slim']['flops_ratio']), key=lambda r: r['ms'])
    if ref:
      vs = full['ms'] / runs['PyTorch full']['ms']
      print(
        f'PyTorch twin: {runs["PyTorch slim"]["efficiency"]:.2f}. Fastest oto_jax full ({full["label"]}) ÷ '
        f'PyTorch full: {vs:.3f} (target ≤ 1.2: {"pass" if vs <= 1.2 else "miss"}); fastest oto_jax slim '
        f'of the same widths ({slim["label"]}) ÷ PyTorch slim: {slim["ms"] / runs["PyTorch slim"]["ms"]:.2f}.'
      )
    print(
      f'deploy_subnet took {res["deploy_s"]:.2f} s, with tune_inputs {res["tune_s"]:.1f} s; XLA options '
      f'chosen: {res["tuning"]["options"]} (slim), {res["full_tuning"]["options"]} (full).'
    )
    print()
    layers = res['layers']
    full_sum, slim_sum = sum(r['full_ms'] for r in layers), sum(r['slim_ms'] for r in layers)
    print(
      f'{label}: its {len(layers)} contractions alone, as tuned, take {full_sum:.1f} ms (full) and '
      f'{slim_sum:.1f} ms (slim) of the {runs["full, tuned"]["ms"]:.1f} and '
      f'{runs["slim, tuned"]["ms"]:.1f} ms end to end. The layers whose slim time is furthest above '
      "their full time ÷ FLOPs ratio (GFLOP/s count a convolution's direct FLOPs, whatever its lowering):"
    )
    print()
    print('| op | full shapes | slim shapes | full ms | slim ms | FLOPs ratio | time ratio | slim GFLOP/s |')
    print('|---|---|---|---|---|---|---|---|')
    lost = sorted(
      layers, key=lambda r: r['slim_ms'] - r['full_ms'] * r['slim_gflops'] / max(r['full_gflops'], 1e-12)
    )
    for r in lost[::-1][:8]:
      print(
        f'| {r["op"]} | {r["full_shapes"]} | {r["slim_shapes"]} | {r["full_ms"]:.2f} | {r["slim_ms"]:.2f} | '
        f'{r["full_gflops"] / max(r["slim_gflops"], 1e-12):.2f} | '
        f'{r["full_ms"] / max(r["slim_ms"], 1e-9):.2f} | '
        f'{r["slim_gflops"] / max(r["slim_ms"], 1e-9) * 1e3:.1f} |'
      )
    print()
  print('VGG16-BN slim widths:', results['vgg16_bn']['widths'])
  print()
  cons = [construct_time(n) for n in ('resnet50', 'bert_base')]
  print('| model | construct_subnet first call s | target ≤ 0.5 s |')
  print('|---|---|---|')
  for c in cons:
    print(f'| {c["model"]} | {c["construct_s"]:.3f} | {"pass" if c["construct_s"] <= 0.5 else "miss"} |')
  print()
  eager = [eager_vs_jit(n, args.repeats) for n in EAGER_MODELS]
  print('| model (batch 8) | Subnet.apply eager ms | jax.jit(Subnet.apply) ms | eager ÷ jit | target ≤ 3 |')
  print('|---|---|---|---|---|')
  for r in eager:
    verdict = 'pass' if r['ratio'] <= 3 else 'miss'
    print(f'| {r["model"]} | {r["eager_ms"]:.2f} | {r["jit_ms"]:.2f} | {r["ratio"]:.2f} | {verdict} |')
  if args.json:
    with open(args.json, 'w') as f:
      out = {**results, 'construct': cons, 'eager': eager, 'batch': args.batch, 'allocator': allocator}
      json.dump(out, f, indent=1)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
