"""Experiment configurations as code: the embedded real-data runs and the paper's set-ups.

``python -m experiments.train --config NAME [--set key=value …]`` runs one of :data:`CONFIGS`.
The paper-scale set-ups (``cifar10_*``, ``imagenet_resnet50``, ``squad_bert``) carry the
reference hyperparameters of ``shared/reference/oto_family.md`` and need ``data_dir``.

Each field's type is its annotation and its range a :class:`Rule` beside it;
:meth:`Config.check` tests both and the combinations a run depends on, so the CLI rejects a
bad value in one line before any work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
  """A config value or combination a run cannot honour; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's values must satisfy beyond their type: in words, and as a test."""

  expect: str
  ok: Callable[[Any], bool]


def one_of(*choices: str) -> Rule:
  return Rule(f'in {{{", ".join(map(repr, choices))}}}', lambda v: v in choices)


AT_LEAST_ONE = Rule('>= 1', lambda v: v >= 1)
NON_NEGATIVE = Rule('>= 0', lambda v: v >= 0)
POSITIVE = Rule('> 0', lambda v: v > 0)
FRACTION = Rule('in (0, 1]', lambda v: 0 < v <= 1)
BELOW_ONE = Rule('in [0, 1)', lambda v: 0 <= v < 1)
INCREASING = Rule(
  '(strictly increasing, each >= 1, e.g. (40, 80))', lambda v: all(a < b for a, b in zip((0, *v), v))
)


def _ruled(rule: Rule, default: Any = dataclasses.MISSING) -> Any:
  return dataclasses.field(default=default, metadata={'rule': rule})


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment.

  Epoch-valued fields are converted to steps with the run's steps per epoch.
  """

  name: str
  dataset: str = _ruled(one_of('digits', 'mnist1d', 'cifar10', 'imagenet', 'squad'))
  model: str  # a key of experiments.models.MODELS
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  optimizer: str = _ruled(one_of('hesso', 'hspg', 'dhspg', 'prox_sg'), 'hesso')
  epochs: int = _ruled(AT_LEAST_ONE, 60)
  batch_size: int = _ruled(AT_LEAST_ONE, 64)
  lr: float = _ruled(POSITIVE, 0.05)
  momentum: float | None = _ruled(BELOW_ONE, 0.9)
  weight_decay: float = _ruled(NON_NEGATIVE, 0.0)
  lr_decay_epochs: tuple[int, ...] = _ruled(INCREASING, ())
  lr_decay: float = _ruled(FRACTION, 0.1)
  augment: bool = False
  # HSPG / Prox-SG / DHSPG.
  lmbda: float = _ruled(NON_NEGATIVE, 1e-3)
  n_p_epoch: int = _ruled(NON_NEGATIVE, 10)
  epsilon_conv: float = _ruled(BELOW_ONE, 0.0)
  epsilon_dense: float = _ruled(BELOW_ONE, 0.0)
  # DHSPG / HESSO targets: a group sparsity, or a FLOPs fraction to keep.
  target_sparsity: float | None = _ruled(BELOW_ONE, None)
  flops_keep: float | None = _ruled(FRACTION, 0.3)
  start_pruning_epoch: int = _ruled(NON_NEGATIVE, 5)
  pruning_epochs: int = _ruled(AT_LEAST_ONE, 10)
  pruning_periods: int = _ruled(AT_LEAST_ONE, 5)
  variant: str = _ruled(one_of('sgd', 'adam', 'adamw'), 'sgd')
  group_divisible: int = _ruled(AT_LEAST_ONE, 1)
  # The dense baseline trained with the same schedule and plain SGD.
  dense_baseline: bool = True
  # The Torch-Pruning-style baseline: dense training, one-shot L1 channel pruning to the OTO
  # model's FLOPs at ``l1_prune_epoch`` (default: when HESSO's pruning window ends), fine-tuning.
  l1_baseline: bool = False
  l1_prune_epoch: int | None = _ruled(NON_NEGATIVE, None)
  data_dir: str | None = None
  # Pretrained weights to start from (BERT: a Hugging Face model.safetensors).
  init_checkpoint: str | None = None
  seed: int = _ruled(NON_NEGATIVE, 0)

  @property
  def l1_prune_at(self) -> int:
    """The epoch at which the L1 baseline prunes."""
    return (
      self.l1_prune_epoch
      if self.l1_prune_epoch is not None
      else self.start_pruning_epoch + self.pruning_epochs
    )

  def replace(self, **changes: Any) -> Config:
    return dataclasses.replace(self, **changes)

  def check(self) -> None:
    """Tests every field against its type and :class:`Rule`, then the combinations a run needs.

    Raises:
      ConfigError: the first problem, in one line naming the key, the value, what it should be
        and how to fix it.
    """
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(self):
      value, rule = getattr(self, f.name), f.metadata.get('rule')
      if not _matches(value, hints[f.name]) or (value is not None and rule and not rule.ok(value)):
        want = _describe(hints[f.name], rule)
        raise ConfigError(f'{f.name}={value!r} is invalid: expected {want}; fix it with --set {f.name}=...')
    problem = self._combination_problem()
    if problem:
      raise ConfigError(problem)

  def _combination_problem(self) -> str | None:
    """What a run would silently get wrong with these values together (each valid alone)."""
    e = self.epochs
    if any(d >= e for d in self.lr_decay_epochs):
      return (
        f'lr_decay_epochs={self.lr_decay_epochs} has a decay at or after the last epoch (epochs={e}), '
        'where it never applies: drop it (e.g. --set lr_decay_epochs=()) or raise epochs.'
      )
    targets = (self.flops_keep is not None) + (self.target_sparsity is not None)
    if self.optimizer in ('hesso', 'dhspg') and targets != 1:
      return (
        f'{self.optimizer} prunes to one target, but flops_keep={self.flops_keep} and target_sparsity='
        f'{self.target_sparsity}: set exactly one of them, the other to None.'
      )
    end = self.start_pruning_epoch + self.pruning_epochs
    if self.optimizer == 'hesso' and end > e:
      return (
        f'start_pruning_epoch + pruning_epochs = {end} exceeds epochs={e}: HESSO would stop before it '
        'reaches its target; lower them or raise epochs.'
      )
    if self.optimizer == 'dhspg' and self.start_pruning_epoch >= e:
      return (
        f'start_pruning_epoch={self.start_pruning_epoch} is not below epochs={e}: DHSPG would never '
        'prune; lower it or raise epochs.'
      )
    if self.optimizer == 'hspg' and self.n_p_epoch >= e:
      return (
        f'n_p_epoch={self.n_p_epoch} is not below epochs={e}: the half-space stage, which prunes, would '
        'never start; lower it or raise epochs.'
      )
    if self.l1_baseline and self.l1_prune_at >= e:
      return (
        f'The L1 baseline prunes at epoch {self.l1_prune_at}, not before epochs={e}: set l1_prune_epoch '
        '(or start_pruning_epoch + pruning_epochs) below epochs, or l1_baseline=False.'
      )
    return None


_WORDS = {
  int: 'an integer',
  float: 'a finite number',
  bool: 'True or False',
  str: 'a string',
  dict: 'a dict',
  tuple[int, ...]: 'a tuple of integers',
}


def _matches(value: Any, tp: Any) -> bool:
  """Whether ``value`` has the annotated type (an int is a float; a bool is neither)."""
  if typing.get_origin(tp) is types.UnionType:
    return any(_matches(value, t) for t in typing.get_args(tp))
  if tp is bool or isinstance(value, bool):
    return tp is bool and isinstance(value, bool)
  if tp is float:
    return isinstance(value, (int, float)) and math.isfinite(value)
  if typing.get_origin(tp) is tuple:
    return isinstance(value, tuple) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
  return isinstance(value, tp)


def _describe(tp: Any, rule: Rule | None) -> str:
  """The annotated type and the rule in words: ``'a finite number in (0, 1], or None'``."""
  args = typing.get_args(tp) if typing.get_origin(tp) is types.UnionType else (tp,)
  words = ' or '.join(_WORDS[a] for a in args if a is not type(None)) + (f' {rule.expect}' if rule else '')
  return words + (', or None' if type(None) in args else '')


# OTOv1's CIFAR-10 runs: plain SGD, lr 0.1 ÷10 at the listed epochs, batch 64, 300 epochs.
_CIFAR = dict(
  dataset='cifar10', optimizer='hspg', epochs=300, lr=0.1, momentum=None, augment=True, flops_keep=None
)
# The embedded-data runs: SGD with momentum, HESSO pruning over epochs 6-24, the L1 baseline.
_SMALL = dict(
  epochs=60,
  lr=0.05,
  lr_decay_epochs=(40,),
  weight_decay=1e-4,
  start_pruning_epoch=6,
  pruning_epochs=18,
  l1_baseline=True,
)

CONFIGS: dict[str, Config] = {
  c.name: c
  for c in [
    Config('digits_vgg', dataset='digits', model='digits_vgg', batch_size=64, **_SMALL),
    Config('digits_resnet', dataset='digits', model='digits_resnet', batch_size=64, **_SMALL),
    Config('mnist1d_cnn', dataset='mnist1d', model='mnist1d_cnn', batch_size=100, **_SMALL),
    # The paper's set-ups, with the OTOv1 reference hyperparameters.
    Config(
      'cifar10_vgg16',
      model='vgg16',
      lr_decay_epochs=(75, 150, 225),
      lmbda=1e-3,
      n_p_epoch=75,
      epsilon_dense=0.99,
      **_CIFAR,
    ),
    Config(
      'cifar10_vgg16bn',
      model='vgg16_bn',
      lr_decay_epochs=(75, 150, 250),
      lmbda=5e-4,
      n_p_epoch=75,
      epsilon_dense=0.9,
      **_CIFAR,
    ),
    Config(
      'cifar10_resnet50',
      model='resnet50_cifar',
      lr_decay_epochs=(75, 150, 225),
      lmbda=1e-3,
      n_p_epoch=75,
      **_CIFAR,
    ),
    Config(
      'imagenet_resnet50',
      dataset='imagenet',
      model='resnet50',
      augment=True,
      optimizer='hspg',
      epochs=120,
      batch_size=256,
      lr=0.1,
      momentum=None,
      lr_decay_epochs=(30, 60, 90),
      lmbda=1e-3,
      n_p_epoch=30,
      flops_keep=None,
    ),
    Config(
      'squad_bert',
      dataset='squad',
      model='bert_squad',
      optimizer='hspg',
      epochs=9,
      batch_size=32,
      lr=3e-5,
      momentum=None,
      lr_decay_epochs=(4,),
      lmbda=1e-3,
      n_p_epoch=1,
      flops_keep=None,
    ),
  ]
}
