"""Experiment configurations as code: the embedded real-data runs and the paper's set-ups.

``python -m experiments.train --config NAME [--set key=value …]`` runs one of :data:`CONFIGS`.
The paper-scale set-ups (``cifar10_*``, ``imagenet_resnet50``, ``squad_bert``) carry the
reference hyperparameters of ``shared/reference/oto_family.md`` and need ``data_dir``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment.

  Epoch-valued fields are converted to steps with the run's steps per epoch.
  """

  name: str
  dataset: str  # digits | mnist1d | cifar10 | imagenet | squad
  model: str  # a key of experiments.train.MODELS
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  optimizer: str = 'hesso'  # hspg | dhspg | hesso | prox_sg
  epochs: int = 60
  batch_size: int = 64
  lr: float = 0.05
  momentum: float | None = 0.9
  weight_decay: float = 0.0
  lr_decay_epochs: tuple = ()
  lr_decay: float = 0.1
  augment: bool = False
  # HSPG / Prox-SG / DHSPG.
  lmbda: float = 1e-3
  n_p_epoch: int = 10
  epsilon_conv: float = 0.0
  epsilon_dense: float = 0.0
  # DHSPG / HESSO targets: a group sparsity, or a FLOPs fraction to keep.
  target_sparsity: float | None = None
  flops_keep: float | None = 0.3
  start_pruning_epoch: int = 5
  pruning_epochs: int = 10
  pruning_periods: int = 5
  variant: str = 'sgd'
  group_divisible: int = 1
  # The dense baseline trained with the same schedule and plain SGD.
  dense_baseline: bool = True
  # The Torch-Pruning-style baseline: dense training, one-shot L1 channel pruning to the OTO
  # model's FLOPs at ``l1_prune_epoch`` (default: when HESSO's pruning window ends), fine-tuning.
  l1_baseline: bool = False
  l1_prune_epoch: int | None = None
  data_dir: str | None = None
  # Pretrained weights to start from (BERT: a Hugging Face model.safetensors).
  init_checkpoint: str | None = None
  seed: int = 0

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
