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
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import oto_jax
from experiments import baselines, checkpoints, distributed, models, reports, squad
from experiments import data as data_lib
from experiments.configs import CONFIGS, Config, ConfigError

# ---------------------------------------------------------------------------------------------
# Models.


# ---------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Run:
  """What a trained model leaves behind."""

  variables: Any
  history: list
  partition: Any = None
  pruned_ids: np.ndarray | None = None  # the ZIGs the L1 baseline removed


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

  model = models.build_model(cfg, ds.num_classes)
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

  mesh = mesh or distributed.data_mesh()
  if cfg.batch_size % mesh.devices.size:
    raise ConfigError(f'batch_size={cfg.batch_size} must divide over the {mesh.devices.size} devices.')
  state_sharding = distributed.param_sharding(mesh, (params, stats, opt_state), fsdp)
  mask_sharding = distributed.param_sharding(mesh, mask, fsdp)
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
      raise checkpoints.RunError(
        f'{ckpt_dir} holds the checkpoints of an earlier run (steps {earlier}): pass --resume to continue '
        'it, or choose another --out.'
      )
  try:
    if ckpt is not None and resume:
      target = {'params': params, 'stats': stats, 'opt_state': opt_state, 'mask': mask}
      start, restored = checkpoints.restore_newest_good(
        ckpt, ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
      )
      if start > cfg.epochs:
        raise checkpoints.RunError(
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
        pruned_ids = np.flatnonzero(~baselines.l1_prune(part, distributed.to_host(params), flops_keep))
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
        checkpoints.save(
          ckpt,
          epoch + 1,
          ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
  except BaseException:
    if ckpt_dir:
      checkpoints.remove_partial_saves(ckpt_dir)
    raise
  finally:
    if ckpt is not None:
      ckpt.close()
  variables = {'params': distributed.to_host(params), 'batch_stats': distributed.to_host(stats)}
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
    checkpoints.RunError: ``out`` is not writable (found before any work), or a checkpoint cannot be written
      or resumed from.
  """
  if out:
    checkpoints.check_writable(out)
  ds = data_lib.load(cfg, seed)
  results: dict[str, Any] = {'config': dataclasses.asdict(cfg), 'seed': seed, 'devices': len(jax.devices())}
  t0 = time.perf_counter()
  model = models.build_model(cfg, ds.num_classes)
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
      f.write(reports.markdown(results) + '\n\n' + rep.markdown() + '\n')
    reports.plot(results, out)
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
      checkpoints.remove_partial_saves(slim)
      raise
  return results


def parse_set(cfg: Config, items: list[str]) -> Config:
  """Applies ``key=value`` overrides (values are Python literals, else strings) and checks the
  result: :meth:`~experiments.configs.Config.check`, and a model of :data:`models.MODELS`.

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
  if cfg.model not in models.MODELS:
    raise SystemExit(
      f'error: model={cfg.model!r} is invalid: expected one of {sorted(models.MODELS)}; '
      'fix it with --set model=...'
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
    distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  out = args.out or os.path.join('runs', f'{cfg.name}-seed{seed}')
  try:
    r = run_experiment(
      cfg, seed=seed, out=out, resume=args.resume, fsdp=args.fsdp, progress=jax.process_index() == 0
    )
  except (ConfigError, checkpoints.RunError, OSError, NotImplementedError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    # No process may leave (and shut the runtime down) while another still writes.
    multihost_utils.sync_global_devices('experiments.train: done')
    if jax.process_index() != 0:
      return 0
  print(reports.markdown(r))
  print(f'\nArtefacts in {out}/: results.json, results.md, curves.png, widths.png, slim/')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
