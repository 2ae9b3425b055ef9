"""Does the slim model run as much faster as its FLOPs say? And how fast is construct_subnet?

1. VGG16-BN and ResNet-50 on CIFAR shapes (batch 64, inference, ``jax.jit``, this CPU). ZIGs are zeroed so
   that the FLOPs fall to about 27% of the full model (OTO's VGG16-BN result), in a random
   order until the budget is met (``oto_jax.budgets.select``, the choice HESSO makes), so
   every layer narrows by about the same fraction. The full model (``model.apply`` on the
   zeroed variables, and the analysed program cut with nothing removed, which lowers
   small-output convolutions as the slim program does) and the subnet are timed interleaved;
   the speedup is the full program's time over the slim one's (like with like), printed with
   the FLOPs ratio and speedup ÷ FLOPs ratio (target ≥ 0.85). The same again with every layer's kept
   width rounded to a multiple of 8 and of 32 (``group_divisible``).
2. ``construct_subnet`` on ResNet-50 and BERT-base with half of their ZIGs removed: the time
   of a first call (target ≤ 0.5 s each; the partition is built before the clock starts),
   which includes one trace of the slim program that checks every equation's shape.
   For the unrounded cut, every convolution and dot of the full and the slim program is also
   timed alone, and the layers that lose most against their FLOPs ratio are listed.
3. ``Subnet.apply`` called eagerly against ``jax.jit(subnet.apply)`` on small models (target:
   eager within 3× of jitted; the slim program is compiled either way).

Usage::

  python -m experiments.bench_subnet [--batch 64] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import oto_jax
from experiments import models
from oto_jax import budgets, ir


def _time(fn, *args, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return out


SPEEDUP_MODELS = {
  'vgg16_bn': ('VGG16-BN', lambda: models.VGG()),
  'resnet50': ('ResNet-50', lambda: models.ResNet50(num_classes=10, cifar_stem=True)),
}


def speedup(name: str, batch: int, repeats: int, multiples: tuple[int, ...], keep_flops: float) -> list[dict]:
  model = SPEEDUP_MODELS[name][1]()
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  part = oto_jax.zig_partition(model.apply, variables, x)
  # Random saliency, removed in its order until the FLOPs budget is met: every layer narrows
  # by about the same fraction, as in OTO's VGG16-BN result.
  key = jax.random.uniform(jax.random.key(2), (part.num_zigs,))
  none = jnp.zeros((part.num_zigs,), bool)
  removed = budgets.select(oto_jax.flops_budget(keep_flops), part, key, none, ~none, jnp.float32(1.0))
  full = jax.jit(lambda v, x: model.apply(v, x))
  # The full model as oto_jax runs it: the analysed program cut with nothing removed, with the
  # slim program's lowerings (small-output convolutions as one dot_general), so that the
  # speedup compares like with like.
  whole = oto_jax.construct_subnet(part, variables, zig_ids=[])
  full_program = jax.jit(whole.apply)
  rows = []
  for m in multiples:
    r = removed if m == 1 else budgets.round_to_multiple(part, removed, key, m)
    ids = np.nonzero(np.asarray(r))[0]
    zeroed = part.zero(variables, ids)
    sub = oto_jax.construct_subnet(part, zeroed, zig_ids=ids)
    slim = jax.jit(sub.apply)
    ref, got = full(zeroed, x), slim(sub.variables, x)
    err = float(jnp.max(jnp.abs(ref - got)) / jnp.max(jnp.abs(ref)))
    # Interleave the two so that drifts of this noisy machine hit both alike.
    t_full, t_prog, t_slim = [], [], []
    for _ in range(repeats):
      t_full += _time(full, zeroed, x, repeats=1)
      t_prog += _time(full_program, whole.variables, x, repeats=1)
      t_slim += _time(slim, sub.variables, x, repeats=1)
    rep = sub.report()
    flops_ratio = rep.flops[0] / rep.flops[1]
    speedup = statistics.median(t_prog) / statistics.median(t_slim)
    layers = []
    if m == 1:
      # Where the time goes: each contraction of the full and the slim program alone.
      for f, sl in zip(contraction_times(whole, 3), contraction_times(sub, 3)):
        layers.append(
          {
            'op': f['op'],
            'full_shapes': f['shapes'],
            'slim_shapes': sl['shapes'],
            'full_ms': f['ms'],
            'slim_ms': sl['ms'],
            'full_gflops': f['gflops'],
            'slim_gflops': sl['gflops'],
          }
        )
    rows.append(
      {
        'group_divisible': m,
        'flops_remaining': rep.flops[1] / rep.flops[0],
        'params_remaining': rep.params[1] / rep.params[0],
        'full_ms': 1e3 * statistics.median(t_full),
        'full_program_ms': 1e3 * statistics.median(t_prog),
        'slim_ms': 1e3 * statistics.median(t_slim),
        'speedup': speedup,
        'flops_ratio': flops_ratio,
        'efficiency': speedup / flops_ratio,
        'max_rel_err': err,
        'widths': [w[2] for w in rep.widths],
        'layers': layers,
      }
    )
  return rows


def contraction_times(subnet, repeats: int) -> list[dict]:
  """Each convolution and dot_general of a subnet's program run alone at its shapes, bound as
  the slim program binds it (small-output convolutions as one dot): time and FLOPs."""
  prog = subnet.program
  ctx = types.SimpleNamespace(values=prog.values, shape=lambda v: prog.values.shapes[v])
  out = []
  for k, eqn in enumerate(ir.iter_eqns(prog.steps)):
    if eqn.name not in ('conv_general_dilated', 'dot_general') or not all(type(v) is int for v in eqn.ins):
      continue
    shapes = [tuple(int(d) for d in prog.values.shapes[v]) for v in eqn.ins]
    ins = [jnp.ones(s, prog.values.dtypes[v]) for s, v in zip(shapes, eqn.ins)]
    bind = eqn.entry.bind
    fn = jax.jit(
      lambda *a, e=eqn, b=bind: (b(ctx, e, list(a), e.params) if b else [e.primitive.bind(*a, **e.params)])[0]
    )
    jax.block_until_ready(fn(*ins))
    ms = 1e3 * statistics.median(_time(fn, *ins, repeats=repeats))
    flops = sum(
      t.coef * np.prod([prog.values.shapes[v][ax] for v, ax in t.axes]) for t in eqn.entry.cost(ctx, eqn)
    )
    out.append({'index': k, 'op': eqn.name, 'shapes': shapes, 'ms': ms, 'gflops': flops / 1e9})
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
  args = ap.parse_args(argv)

  results = {}
  for name, (label, _) in SPEEDUP_MODELS.items():
    rows = results[name] = speedup(name, args.batch, args.repeats, (1, 8, 32), args.keep_flops)
    print(f'{label}, CIFAR shapes, batch {args.batch}, inference, device: {jax.devices()[0].device_kind}')
    print()
    print(
      '| group_divisible | FLOPs left | params left | full ms (model.apply) | full ms (oto_jax program) |'
      ' slim ms | speedup | FLOPs ratio | speedup ÷ FLOPs ratio | target ≥ 0.85 | max rel err |'
    )
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
      verdict = 'pass' if r['efficiency'] >= 0.85 else 'miss'
      print(
        f'| {r["group_divisible"]} | {100 * r["flops_remaining"]:.1f}% | '
        f'{100 * r["params_remaining"]:.1f}% | {r["full_ms"]:.1f} | {r["full_program_ms"]:.1f} | '
        f'{r["slim_ms"]:.1f} | {r["speedup"]:.2f}× | {r["flops_ratio"]:.2f}× | '
        f'{r["efficiency"]:.2f} | {verdict} | {r["max_rel_err"]:.1e} |'
      )
    print()
    layers = rows[0]['layers']
    full_sum, slim_sum = sum(r['full_ms'] for r in layers), sum(r['slim_ms'] for r in layers)
    print(
      f'{label}: its {len(layers)} contractions alone take {full_sum:.1f} ms (full) and '
      f'{slim_sum:.1f} ms (slim) of the {rows[0]["full_program_ms"]:.1f} and {rows[0]["slim_ms"]:.1f} ms '
      'end to end. The layers whose slim time is furthest above their full time ÷ FLOPs ratio:'
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
  print('VGG16-BN slim widths (group_divisible=1):', results['vgg16_bn'][0]['widths'])
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
      json.dump({**results, 'construct': cons, 'eager': eager, 'batch': args.batch}, f, indent=1)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
