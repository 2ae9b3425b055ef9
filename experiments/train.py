"""One-shot train-and-prune: train a dense baseline and an OTO model, slice it, compare.

Usage::

  python -m experiments.train --config digits_vgg [--set key=value …] [--seed 0]
                              [--out runs/NAME] [--resume] [--fsdp]

For each run the script trains (1) a dense baseline with the configured SGD schedule (unless
``dense_baseline=False``) and (2) the OTO model with the configured optimizer (HESSO, HSPG,
DHSPG or Prox-SG); builds the subnet with :func:`oto_jax.construct_subnet`; evaluates the
dense, the full OTO and the slim model; times CPU/GPU inference of full vs slim; and writes
``results.json``, ``results.md``, ``curves.png`` (accuracy, loss, group sparsity per epoch),
``widths.png`` (per-layer widths before and after) and the slim model (``slim/``, see
:func:`oto_jax.save_subnet`) under ``--out``.

Training is data-parallel over all devices (a mesh over the batch axis; parameters
replicated, or sharded along their largest divisible axis with ``--fsdp``). On several hosts,
start one process per host with ``--coordinator HOST:PORT --num-processes N --process-id I``
(or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``): every process reads the same data and batches, each feeds its own
devices, and only process 0 writes the reports. An Orbax checkpoint is written after every
epoch; ``--resume`` continues from the last one and ends with exactly the result of an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import oto_jax
from experiments import baselines, models, squad
from experiments import data as data_lib
from experiments.configs import CONFIGS, Config

# ---------------------------------------------------------------------------------------------
# Models.


class DigitsVGG(nn.Module):
  """A small VGG-style CNN for 8x8 digits: conv 32-32, pool, conv 64-64, pool, dense 128."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for widths in ((32, 32), (64, 64)):
      for w in widths:
        x = nn.Conv(w, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


class Conv1DNet(nn.Module):
  """A 1-D CNN for mnist1d (40 samples): three strided convs of 64 channels and a dense head."""

  num_classes: int = 10
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for stride in (1, 2, 2):
      x = nn.Conv(self.width, (5,), strides=(stride,), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


# Each builds a model for a number of classes; keyword arguments (``model_kwargs`` of the config)
# override the defaults.
MODELS: dict[str, Callable[..., nn.Module]] = {
  'digits_vgg': lambda c, **kw: DigitsVGG(**{'num_classes': c, **kw}),
  'digits_resnet': lambda c, **kw: models.ResNet(
    **{'stage_sizes': (1, 1, 1), 'block': 'basic', 'width': 16, 'num_classes': c, 'cifar_stem': True, **kw}
  ),
  'mnist1d_cnn': lambda c, **kw: Conv1DNet(**{'num_classes': c, **kw}),
  'vgg16': lambda c, **kw: models.VGG(**{'batch_norm': False, 'num_classes': c, **kw}),
  'vgg16_bn': lambda c, **kw: models.VGG(**{'batch_norm': True, 'num_classes': c, **kw}),
  'resnet50_cifar': lambda c, **kw: models.ResNet50(**{'num_classes': c, 'cifar_stem': True, **kw}),
  'resnet50': lambda c, **kw: models.ResNet50(**{'num_classes': c, **kw}),
  'bert_squad': lambda c, **kw: models.BertForSpans(**kw),  # always two outputs: start and end
}


def build_model(cfg: Config, num_classes: int) -> nn.Module:
  """The config's model, with its ``model_kwargs``."""
  return MODELS[cfg.model](num_classes, **cfg.model_kwargs)


def load_data(cfg: Config, seed: int) -> data_lib.Dataset:
  if cfg.dataset == 'digits':
    return data_lib.digits(seed=seed)
  if cfg.dataset == 'mnist1d':
    return data_lib.mnist1d()  # the published dataset (the generator's own seed)
  if cfg.dataset == 'cifar10':
    ds = data_lib.cifar10(cfg.data_dir)
    norm = lambda x: (x - data_lib.CIFAR10_MEAN) / data_lib.CIFAR10_STD  # noqa: E731
    return ds._replace(x_train=norm(ds.x_train), x_test=norm(ds.x_test))
  if cfg.dataset == 'imagenet':
    return data_lib.imagenet_images(data_lib.imagenet(cfg.data_dir))
  if cfg.dataset == 'squad':
    return data_lib.squad_features(data_lib.squad(cfg.data_dir))
  raise ValueError(f'Unknown dataset {cfg.dataset!r}.')


# ---------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Run:
  """What a trained model leaves behind."""

  variables: Any
  history: list
  partition: Any = None
  pruned_ids: np.ndarray | None = None  # the ZIGs the L1 baseline removed


def to_host(tree: Any) -> Any:
  """NumPy copies of a tree's arrays, gathered from every process where a leaf is sharded across hosts."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run (one process per host, or several on one host for testing).

  On CPU the collectives go through Gloo; the setting is ignored by GPU and TPU backends.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


def _param_sharding(mesh: Mesh, tree: Any, fsdp: bool) -> Any:
  n = mesh.devices.size

  def one(x):
    if not fsdp:
      return NamedSharding(mesh, P())
    shape = np.shape(x)
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0 and shape[a] >= n]
    if not axes:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[int(axes[0])] = 'data'
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, tree)


def make_optimizer(cfg: Config, kind: str, part, steps_per_epoch: int) -> optax.GradientTransformation:
  """The dense baseline's SGD, or the configured OTO optimizer, with the lr schedule."""
  boundaries = {e * steps_per_epoch: cfg.lr_decay for e in cfg.lr_decay_epochs}
  lr = optax.piecewise_constant_schedule(cfg.lr, boundaries)
  if kind == 'dense':
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, cfg.momentum))
  s = steps_per_epoch
  if kind in ('hspg', 'prox_sg'):
    lam = optax.piecewise_constant_schedule(cfg.lmbda, boundaries)
    if kind == 'prox_sg':
      return oto_jax.prox_sg(part, lr, lam, momentum=cfg.momentum)
    eps = oto_jax.epsilon_by_layer(part, cfg.epsilon_conv, cfg.epsilon_dense)
    return oto_jax.hspg(
      part,
      lr,
      lmbda=lam,
      n_p=cfg.n_p_epoch * s,
      epsilon=eps,
      momentum=cfg.momentum,
      weight_decay=cfg.weight_decay,
    )
  target = dict(target_group_sparsity=cfg.target_sparsity)
  if cfg.flops_keep is not None:
    target = dict(target=oto_jax.flops_budget(cfg.flops_keep))
  common = dict(
    start_pruning_step=cfg.start_pruning_epoch * s,
    variant=cfg.variant,
    momentum=cfg.momentum,
    weight_decay=cfg.weight_decay,
    **target,
  )
  if kind == 'dhspg':
    return oto_jax.dhspg(part, lr, lmbda=cfg.lmbda, **common)
  if kind == 'hesso':
    return oto_jax.hesso(
      part,
      lr,
      pruning_steps=cfg.pruning_epochs * s,
      pruning_periods=cfg.pruning_periods,
      group_divisible=cfg.group_divisible,
      **common,
    )
  raise ValueError(f'Unknown optimizer {kind!r}; use hspg, dhspg, hesso, prox_sg or dense.')


def train(
  cfg: Config,
  kind: str,
  ds: data_lib.Dataset,
  *,
  seed: int,
  ckpt_dir: str | None = None,
  resume: bool = False,
  fsdp: bool = False,
  progress: bool = True,
  flops_keep: float | None = None,
  mesh: Mesh | None = None,
) -> Run:
  """Trains ``cfg``'s model: the dense baseline, an OTO optimizer, or the L1 pruning baseline.

  ``kind='l1'`` trains like the dense baseline, prunes once by L1 magnitude to ``flops_keep``
  of the FLOPs at epoch ``cfg.l1_prune_at`` (:func:`experiments.baselines.l1_prune`), and
  fine-tunes what is left for the remaining epochs with the pruned ZIGs held at zero.
  Training is data-parallel over ``mesh`` (default: all local devices, one ``'data'`` axis).
  """
  import orbax.checkpoint as ocp
  from tqdm.auto import tqdm

  model = build_model(cfg, ds.num_classes)
  x0 = jnp.asarray(ds.x_test[:1])  # the evaluation shape (training inputs may be cropped on device)
  variables = jax.jit(model.init)(jax.random.key(seed), x0)
  if cfg.init_checkpoint:
    variables = models.load_hf_bert(cfg.init_checkpoint, variables)
  part = oto_jax.zig_partition(model.apply, variables, x0) if kind != 'dense' else None
  steps_per_epoch = max(1, len(ds.x_train) // cfg.batch_size)
  tx = make_optimizer(cfg, 'dense' if kind == 'l1' else kind, part, steps_per_epoch)
  if kind == 'l1' and flops_keep is None:
    raise ValueError("kind='l1' needs flops_keep, the fraction of FLOPs the pruned model keeps.")
  if kind == 'l1' and not 0 <= cfg.l1_prune_at < cfg.epochs:
    raise ValueError(
      f"The L1 baseline prunes at epoch {cfg.l1_prune_at}, outside the run's {cfg.epochs} epochs: set "
      'l1_prune_epoch (or start_pruning_epoch + pruning_epochs) below epochs, or l1_baseline=False.'
    )
  params, stats = variables['params'], variables.get('batch_stats', {})
  opt_state = tx.init(params)
  # The L1 baseline's mask of kept entries (all ones until it prunes).
  mask = jax.tree.map(jnp.ones_like, params)
  pruned_ids = np.zeros((0,), np.int64)

  mesh = mesh or _mesh()
  if cfg.batch_size % mesh.devices.size:
    raise ValueError(f'batch_size {cfg.batch_size} must divide over the {mesh.devices.size} devices.')
  state_sharding = _param_sharding(mesh, (params, stats, opt_state), fsdp)
  mask_sharding = _param_sharding(mesh, mask, fsdp)
  params, stats, opt_state = jax.device_put((params, stats, opt_state), state_sharding)
  mask = jax.device_put(mask, mask_sharding)
  batch_sharding = NamedSharding(mesh, P('data'))

  def loss_fn(params, stats, x, y, key):
    logits, new = model.apply(
      {'params': params, 'batch_stats': stats},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': key},
    )
    return task_loss(logits, y), new.get('batch_stats', stats)

  def step(params, stats, opt_state, mask, x, y, key):
    augment_key, dropout_key = jax.random.split(key)
    if cfg.augment:
      augment = data_lib.augment_imagenet if cfg.dataset == 'imagenet' else data_lib.augment_cifar
      x = augment(x, augment_key)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, stats), grads = grad_fn(params, stats, x, y, dropout_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(jnp.multiply, updates, mask)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=(*state_sharding, None))
  evaluate = jax.jit(model.apply)

  history: list = []
  start = 0
  ckpt = (
    ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    if ckpt_dir
    else None
  )
  if ckpt is not None and resume and ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    target = {'params': params, 'stats': stats, 'opt_state': opt_state, 'mask': mask}
    restored = ckpt.restore(
      start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    params, stats, opt_state, mask = (restored.state[k] for k in ('params', 'stats', 'opt_state', 'mask'))
    history = restored.meta['history']
    pruned_ids = np.asarray(restored.meta.get('pruned_ids', []), np.int64)
  bar = tqdm(range(start, cfg.epochs), desc=f'{cfg.name} {kind}', disable=not progress, leave=False)
  for epoch in bar:
    if kind == 'l1' and epoch == cfg.l1_prune_at:
      pruned_ids = np.flatnonzero(~baselines.l1_prune(part, to_host(params), flops_keep))
      params = jax.device_put(part.zero(params, pruned_ids), state_sharding[0])
      mask = jax.device_put(part.zero(mask, pruned_ids), mask_sharding)
    losses = []
    epoch_batches = data_lib.batches(ds.x_train, ds.y_train, cfg.batch_size, seed=seed, epoch=epoch)
    for i, (xb, yb) in enumerate(data_lib.prefetch(epoch_batches)):
      key = jax.random.fold_in(jax.random.key(seed), epoch * steps_per_epoch + i)
      xb, yb = jax.device_put((xb, yb), batch_sharding)
      params, stats, opt_state, loss = step(params, stats, opt_state, mask, xb, yb, key)
      losses.append(loss)
    rec = {
      'epoch': epoch + 1,
      'loss': float(np.mean(jax.device_get(losses))),
      'test_acc': _accuracy(evaluate, {'params': params, 'batch_stats': stats}, ds.x_test, ds.y_test),
      'group_sparsity': float(oto_jax.group_sparsity(part, params)) if part is not None else 0.0,
    }
    history.append(rec)
    bar.set_postfix(
      loss=f'{rec["loss"]:.3f}', acc=f'{rec["test_acc"]:.3f}', sparsity=f'{rec["group_sparsity"]:.2f}'
    )
    if ckpt is not None:
      state = {'params': params, 'stats': stats, 'opt_state': opt_state, 'mask': mask}
      meta = {'history': history, 'pruned_ids': pruned_ids.tolist()}
      ckpt.save(
        epoch + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
      )
  if ckpt is not None:
    ckpt.wait_until_finished()
    ckpt.close()
  variables = {'params': to_host(params), 'batch_stats': to_host(stats)}
  if not variables['batch_stats']:
    variables.pop('batch_stats')
  return Run(variables, history, part, pruned_ids)


# ---------------------------------------------------------------------------------------------
# Evaluation, speed and reports.


def task_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Mean cross-entropy: classes for logits ``[B, C]``, or a span's start and end positions
  ``y [B, 2]`` for per-token logits ``[B, L, 2]`` (SQuAD)."""
  if logits.ndim == 3:
    logits = jnp.moveaxis(logits, 1, -1)  # [B, 2, L]: a distribution over positions per end
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def predict(logits: jax.Array) -> jax.Array:
  """The class ``[B]``, or the span's most likely start and end ``[B, 2]``."""
  return logits.argmax(1) if logits.ndim == 3 else logits.argmax(-1)


def _accuracy(fn, variables, x, y) -> float:
  """Accuracy, or for spans the exact-match rate of both ends."""
  preds = np.concatenate([np.asarray(predict(fn(variables, x[i : i + 512]))) for i in range(0, len(x), 512)])
  correct = preds == y
  return float(np.mean(correct.all(-1) if correct.ndim > 1 else correct))


def _speedup(full, slim, full_vars, slim_vars, x, repeats: int = 30) -> tuple[float, float, float]:
  for fn, v in ((full, full_vars), (slim, slim_vars)):
    jax.block_until_ready(fn(v, x))
  tf, ts = [], []
  for _ in range(repeats):  # interleaved: this machine's drifts hit both alike
    for fn, v, out in ((full, full_vars, tf), (slim, slim_vars, ts)):
      t = time.perf_counter()
      jax.block_until_ready(fn(v, x))
      out.append(time.perf_counter() - t)
  return (
    statistics.median(tf) / statistics.median(ts),
    1e3 * statistics.median(tf),
    1e3 * statistics.median(ts),
  )


def run_experiment(
  cfg: Config, *, seed: int, out: str | None, resume: bool = False, fsdp: bool = False, progress: bool = True
) -> dict:
  """Dense baseline + OTO training + subnet + evaluation; writes the artefacts under ``out``."""
  ds = load_data(cfg, seed)
  results: dict[str, Any] = {'config': dataclasses.asdict(cfg), 'seed': seed, 'devices': len(jax.devices())}
  t0 = time.perf_counter()
  model = build_model(cfg, ds.num_classes)
  apply = jax.jit(lambda v, x: model.apply(v, x))

  def fit(kind: str, ckpt: str, **kwargs: Any) -> Run:
    ckpt_dir = out and os.path.join(out, ckpt)
    return train(
      cfg, kind, ds, seed=seed, ckpt_dir=ckpt_dir, resume=resume, fsdp=fsdp, progress=progress, **kwargs
    )

  def score(name: str, fn: Callable, variables: Any) -> None:
    results[f'{name}_acc'] = _accuracy(fn, variables, ds.x_test, ds.y_test)
    if ds.eval_data is not None:  # SQuAD: exact match and F1 over the dev questions
      results[f'{name}_squad'] = squad.evaluate(fn, variables, ds.eval_data)

  if cfg.dense_baseline:
    dense = fit('dense', 'ckpt_dense')
    score('dense', apply, dense.variables)
    results['dense_history'] = dense.history
  oto = fit(cfg.optimizer, 'ckpt_oto')
  part = oto.partition
  sub = oto_jax.construct_subnet(part, oto.variables)
  slim_apply = jax.jit(sub.apply)
  score('oto', apply, oto.variables)
  score('slim', slim_apply, sub.variables)
  results['oto_history'] = oto.history
  rep = sub.report()
  results.update(rep.to_dict())
  results['group_sparsity'] = float(oto_jax.group_sparsity(part, oto.variables['params']))
  xb = jnp.asarray(ds.x_test[: min(len(ds.x_test), 256)])
  results['speedup'], results['full_ms'], results['slim_ms'] = _speedup(
    apply, slim_apply, oto.variables, sub.variables, xb
  )
  if cfg.l1_baseline:
    l1 = fit('l1', 'ckpt_l1', flops_keep=results['flops_remaining'])
    l1_sub = oto_jax.construct_subnet(l1.partition, l1.variables, zig_ids=l1.pruned_ids)
    score('l1', jax.jit(l1_sub.apply), l1_sub.variables)
    results['l1_flops_remaining'] = l1_sub.report().to_dict()['flops_remaining']
    results['l1_history'] = l1.history
  results['seconds'] = time.perf_counter() - t0
  if out and jax.process_index() == 0:  # one writer in a multi-process run
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(out, 'results.md'), 'w') as f:
      f.write(markdown(results) + '\n\n' + rep.markdown() + '\n')
    plot(results, out)
  if out:
    oto_jax.save_subnet(os.path.join(out, 'slim'), sub, xb)  # every process takes part
  return results


def markdown(r: dict) -> str:
  rows = [
    ('dense accuracy', f'{100 * r["dense_acc"]:.2f}%' if 'dense_acc' in r else '-'),
    (f'OTO ({r["config"]["optimizer"]}) full-model accuracy', f'{100 * r["oto_acc"]:.2f}%'),
    ('slim-model accuracy', f'{100 * r["slim_acc"]:.2f}%'),
    *(
      (f'{label} SQuAD dev EM / F1', f'{r[k]["exact_match"]:.2f} / {r[k]["f1"]:.2f}')
      for label, k in (('dense', 'dense_squad'), ('OTO', 'oto_squad'), ('slim', 'slim_squad'))
      if k in r
    ),
    *(
      [
        (
          'L1-pruned + fine-tuned accuracy (same FLOPs)',
          f'{100 * r["l1_acc"]:.2f}% at {100 * r["l1_flops_remaining"]:.1f}% FLOPs',
        )
      ]
      if 'l1_acc' in r
      else []
    ),
    ('FLOPs remaining', f'{100 * r["flops_remaining"]:.1f}%'),
    ('parameters remaining', f'{100 * r["params_remaining"]:.1f}%'),
    ('group sparsity', f'{100 * r["group_sparsity"]:.1f}%'),
    (
      f'inference speedup ({jax.devices()[0].platform}, batch 256)',
      f'{r["speedup"]:.2f}× ({r["full_ms"]:.2f} → {r["slim_ms"]:.2f} ms)',
    ),
  ]
  head = f'**{r["config"]["name"]}**, seed {r["seed"]}, {r["seconds"]:.0f} s\n\n| | |\n|---|---|\n'
  return head + '\n'.join(f'| {a} | {b} |' for a, b in rows)


def plot(r: dict, out: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  curves = (
    ('dense', r.get('dense_history')),
    ('OTO', r['oto_history']),
    ('L1 + fine-tune', r.get('l1_history')),
  )
  for label, hist in curves:
    if not hist:
      continue
    ep = [h['epoch'] for h in hist]
    axes[0].plot(ep, [h['test_acc'] for h in hist], label=label)
    axes[1].plot(ep, [h['loss'] for h in hist], label=label)
    axes[2].plot(ep, [h['group_sparsity'] for h in hist], label=label)
  for ax, t in zip(axes, ('test accuracy', 'train loss', 'group sparsity')):
    ax.set_title(t)
    ax.set_xlabel('epoch')
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(r['widths'])), 3.5))
  idx = np.arange(len(r['widths']))
  ax.bar(idx - 0.2, [w['full'] for w in r['widths']], 0.4, label='full')
  ax.bar(idx + 0.2, [w['slim'] for w in r['widths']], 0.4, label='slim')
  ax.set_xticks(
    idx,
    [w['where'].split('/')[-2] if '/' in w['where'] else w['where'] for w in r['widths']],
    rotation=60,
    ha='right',
    fontsize=7,
  )
  ax.set_ylabel('width')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'widths.png'), dpi=110)
  plt.close(fig)


def parse_set(cfg: Config, items: list[str]) -> Config:
  """Applies ``key=value`` overrides; values are Python literals, else strings."""
  fields = {f.name for f in dataclasses.fields(cfg)}
  changes = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or key not in fields:
      raise SystemExit(f'--set {item!r}: expected key=value with key one of {sorted(fields)}.')
    try:
      changes[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[key] = value
  return cfg.replace(**changes)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', default='digits_vgg', choices=sorted(CONFIGS))
  ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE')
  ap.add_argument('--seed', type=int, default=None)
  ap.add_argument('--out', default=None, help='output directory (default runs/CONFIG-seedN)')
  ap.add_argument('--resume', action='store_true')
  ap.add_argument('--fsdp', action='store_true', help='shard parameters over the devices')
  env = os.environ.get
  ap.add_argument('--coordinator', default=env('JAX_COORDINATOR_ADDRESS'), help='multi-process: HOST:PORT')
  ap.add_argument('--num-processes', type=int, default=int(env('JAX_NUM_PROCESSES', '1')))
  ap.add_argument('--process-id', type=int, default=int(env('JAX_PROCESS_ID', '0')))
  args = ap.parse_args(argv)
  if args.coordinator:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  cfg = parse_set(CONFIGS[args.config], args.set)
  seed = cfg.seed if args.seed is None else args.seed
  out = args.out or os.path.join('runs', f'{cfg.name}-seed{seed}')
  try:
    r = run_experiment(
      cfg, seed=seed, out=out, resume=args.resume, fsdp=args.fsdp, progress=jax.process_index() == 0
    )
  except (FileNotFoundError, NotImplementedError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    # No process may leave (and shut the runtime down) while another still writes.
    multihost_utils.sync_global_devices('experiments.train: done')
    if jax.process_index() != 0:
      return 0
  print(markdown(r))
  print(f'\nArtefacts in {out}/: results.json, results.md, curves.png, widths.png, slim/')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
