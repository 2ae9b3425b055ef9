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
epoch, the last two kept, each with a SHA-256 manifest of its files (``sha256.json``);
``--resume`` continues from the newest one that matches its manifest and holds finite values
(reporting and skipping a corrupt one) and ends with exactly the result of an uninterrupted run.

The config (``--set``) is checked before any work (:meth:`experiments.configs.Config.check`),
and so is the output directory; such problems, and unusable checkpoints, end the CLI with one
``error: …`` line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
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
from experiments.configs import CONFIGS, Config, ConfigError

# ---------------------------------------------------------------------------------------------
# Models.


# Each builds a model for a number of classes; keyword arguments (``model_kwargs`` of the config)
# override the defaults.
MODELS: dict[str, Callable[..., nn.Module]] = {
  'digits_vgg': lambda c, **kw: models.DigitsCNN(**{'num_classes': c, **kw}),
  'digits_resnet': lambda c, **kw: models.ResNet(
    **{'stage_sizes': (1, 1, 1), 'block': 'basic', 'width': 16, 'num_classes': c, 'cifar_stem': True, **kw}
  ),
  'mnist1d_cnn': lambda c, **kw: models.Conv1DNet(**{'num_classes': c, **kw}),
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


def _one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__


def _finite(tree: Any) -> bool:
  return all(
    bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  )


def _save(ckpt, step: int, args) -> None:
  """Writes checkpoint ``step`` and its manifest.

  Raises:
    RunError: the step could not be written (a full disk, a lost mount, a step already there).
  """
  try:
    ckpt.save(step, args=args)
    if jax.process_index() == 0:
      write_manifest(os.path.join(ckpt.directory, str(step)))
  except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for one failed write
    raise RunError(f'could not write checkpoint step {step} in {ckpt.directory}: {_one_line(e)}') from e


def _restore_newest_good(ckpt, args) -> tuple[int, Any]:
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
      if _finite(restored.state):
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
  if cfg.batch_size > len(ds.x_train):
    raise ConfigError(
      f'batch_size={cfg.batch_size} exceeds the {len(ds.x_train)} training examples of {cfg.dataset}: an '
      'epoch would have no batch; lower it.'
    )
  steps_per_epoch = len(ds.x_train) // cfg.batch_size
  tx = make_optimizer(cfg, 'dense' if kind == 'l1' else kind, part, steps_per_epoch)
  if kind == 'l1' and flops_keep is None:
    raise ValueError("kind='l1' needs flops_keep, the fraction of FLOPs the pruned model keeps.")
  if kind == 'l1' and not 0 <= cfg.l1_prune_at < cfg.epochs:
    raise ConfigError(
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
    raise ConfigError(f'batch_size={cfg.batch_size} must divide over the {mesh.devices.size} devices.')
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
    # `where`, not a product: a pruned entry stays zero even when its update is NaN.
    updates = jax.tree.map(lambda u, m: jnp.where(m > 0, u, jnp.zeros((), u.dtype)), updates, mask)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=(*state_sharding, None))
  evaluate = jax.jit(model.apply)

  history: list = []
  start = 0
  ckpt = None
  if ckpt_dir:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2,  # the newest step, and the one to fall back on when it is corrupt
      enable_async_checkpointing=False,  # the manifest hashes finished files
      cleanup_tmp_directories=True,  # what a killed run was writing
    )
    ckpt = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)
    earlier = list(ckpt.all_steps())
    if earlier and not resume:
      ckpt.close()
      raise RunError(
        f'{ckpt_dir} holds the checkpoints of an earlier run (steps {earlier}): pass --resume to continue '
        'it, or choose another --out.'
      )
  try:
    if ckpt is not None and resume:
      target = {'params': params, 'stats': stats, 'opt_state': opt_state, 'mask': mask}
      start, restored = _restore_newest_good(
        ckpt, ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
      )
      if start > cfg.epochs:
        raise RunError(
          f'checkpoint step {start} in {ckpt_dir} is past this run of {cfg.epochs} epochs: resume with '
          f'epochs={start} or more, or choose another --out.'
        )
      if restored is not None:
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
        _save(
          ckpt,
          epoch + 1,
          ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
  except BaseException:
    if ckpt_dir:
      remove_partial_saves(ckpt_dir)
    raise
  finally:
    if ckpt is not None:
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
  """Dense baseline + OTO training + subnet + evaluation; writes the artefacts under ``out``.

  Raises:
    RunError: ``out`` is not writable (found before any work), or a checkpoint cannot be written
      or resumed from.
  """
  if out:
    check_writable(out)
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
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(out, 'results.md'), 'w') as f:
      f.write(markdown(results) + '\n\n' + rep.markdown() + '\n')
    plot(results, out)
  if out:
    slim = os.path.join(out, 'slim')
    if jax.process_index() == 0 and os.path.exists(slim):
      shutil.rmtree(slim)  # an earlier run's, which Orbax would refuse to overwrite (a resumed run)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('experiments.train: earlier slim model removed')
    try:
      oto_jax.save_subnet(slim, sub, xb)  # every process takes part
    except BaseException:
      remove_partial_saves(slim)
      raise
  return results


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


def curves_figure(r: dict) -> Any:
  """Test accuracy, train loss (log scale: it spans decades) and group sparsity per epoch, for
  every model the run trained; HESSO's pruning window is shaded."""
  from matplotlib.figure import Figure

  cfg = r['config']
  fig = Figure(figsize=(13, 3.8), layout='constrained')
  axes = fig.subplots(1, 3)
  panels = (
    ('test_acc', 'test accuracy', 'accuracy'),
    ('loss', 'train loss', 'cross-entropy (log scale)'),
    ('group_sparsity', 'group sparsity', 'fraction of ZIGs at zero'),
  )
  curves = (
    ('dense', r.get('dense_history')),
    ('OTO', r['oto_history']),
    ('L1 + fine-tune', r.get('l1_history')),
  )
  for ax, (key, title, ylabel) in zip(axes, panels):
    for label, hist in curves:
      if hist:
        ax.plot([h['epoch'] for h in hist], [h[key] for h in hist], label=label)
    if cfg['optimizer'] == 'hesso':
      start = cfg['start_pruning_epoch']
      ax.axvspan(start, start + cfg['pruning_epochs'], color='0.9', zorder=0, label='HESSO pruning')
    ax.set(title=title, xlabel='epoch', ylabel=ylabel)
    ax.legend(fontsize=8)
  axes[1].set_yscale('log')
  fig.suptitle(f'{cfg["name"]}, seed {r["seed"]}: training curves')
  return fig


def widths_figure(r: dict) -> Any:
  """Each prunable node group's width in the full and the slim model, one bar per producing
  layer; horizontal bars keep a deep model's layer names readable."""
  from matplotlib.figure import Figure

  widths = r['widths']
  n = len(widths)
  fig = Figure(figsize=(8, 1.6 + 0.24 * n), layout='constrained')
  ax = fig.subplots()
  y = np.arange(n)
  full = [w['full'] for w in widths]
  slim = [w['slim'] for w in widths]
  ax.barh(y, full, 0.8, color='0.82', label='full')
  ax.barh(y, slim, 0.8, color='tab:blue', label='slim (kept)')
  for k, (a, b) in enumerate(zip(full, slim)):
    ax.text(a, k, f' {b}/{a}', va='center', fontsize=7)
  ax.set_yticks(y, [w['where'] for w in widths], fontsize=8)
  ax.invert_yaxis()  # read top to bottom, like the table in results.md
  ax.margins(y=0.5 / max(n, 1))
  ax.set_xlim(0, 1.12 * max(full, default=1))
  ax.set(
    xlabel='width (channels, units or heads)',
    ylabel='producing layer',
    title=(
      f'{r["config"]["name"]}: widths, full vs slim ({100 * r["flops_remaining"]:.1f}% of FLOPs, '
      f'{100 * r["params_remaining"]:.1f}% of parameters kept)'
    ),
  )
  ax.title.set_fontsize(10)
  fig.legend(loc='outside lower center', ncol=2, fontsize=8)  # outside: no bar hides under it
  return fig


def plot(r: dict, out: str) -> None:
  """Writes ``curves.png`` and ``widths.png`` under ``out``."""
  for name, fig in (('curves.png', curves_figure(r)), ('widths.png', widths_figure(r))):
    fig.savefig(os.path.join(out, name), dpi=110)


def parse_set(cfg: Config, items: list[str]) -> Config:
  """Applies ``key=value`` overrides (values are Python literals, else strings) and checks the
  result: :meth:`~experiments.configs.Config.check`, and a model of :data:`MODELS`.

  Raises:
    SystemExit: a malformed item, an unknown key, a bad value or combination, in one line.
  """
  fields = {f.name for f in dataclasses.fields(cfg)}
  changes = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or key not in fields:
      raise SystemExit(f'error: --set {item!r}: expected key=value with key one of {sorted(fields)}.')
    try:
      changes[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[key] = value
  cfg = cfg.replace(**changes)
  try:
    cfg.check()
  except ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  if cfg.model not in MODELS:
    raise SystemExit(
      f'error: model={cfg.model!r} is invalid: expected one of {sorted(MODELS)}; fix it with --set model=...'
    )
  return cfg


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
  cfg = parse_set(CONFIGS[args.config], args.set)
  seed = cfg.seed if args.seed is None else args.seed
  if seed < 0:
    raise SystemExit(f'error: --seed {seed} is invalid: expected an integer >= 0.')
  if args.coordinator:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  out = args.out or os.path.join('runs', f'{cfg.name}-seed{seed}')
  try:
    r = run_experiment(
      cfg, seed=seed, out=out, resume=args.resume, fsdp=args.fsdp, progress=jax.process_index() == 0
    )
  except (ConfigError, RunError, OSError, NotImplementedError) as e:
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
