"""PyTorch twins of the benchmark CNNs (VGG16-BN, ResNet-50), built from flax variables.

``bench_subnet`` times these beside oto_jax's programs in the same run, so that neither the
full nor the slim latency can hide behind a slow baseline. A twin reads every width from the
variables it is given (full or slim: the slim model's widths are its kernels' shapes), copies
the weights and running statistics, and runs in eval mode under ``torch.inference_mode``;
:func:`check` compares its output with the JAX model's. Needs ``torch`` (optional; see the README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _conv(kernel: Any, stride: int = 1) -> nn.Conv2d:
  k = np.asarray(kernel)  # HWIO
  conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride, padding=k.shape[0] // 2, bias=False)
  conv.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
  return conv


def _bn(params: Mapping, stats: Mapping, eps: float = 1e-5) -> nn.BatchNorm2d:
  bn = nn.BatchNorm2d(np.shape(params['scale'])[0], eps=eps)
  bn.weight.data = torch.from_numpy(np.array(params['scale']))
  bn.bias.data = torch.from_numpy(np.array(params['bias']))
  bn.running_mean.data = torch.from_numpy(np.array(stats['mean']))
  bn.running_var.data = torch.from_numpy(np.array(stats['var']))
  return bn


def _dense(params: Mapping) -> nn.Linear:
  k = np.asarray(params['kernel'])
  lin = nn.Linear(*k.shape)
  lin.weight.data = torch.from_numpy(np.ascontiguousarray(k.T))
  lin.bias.data = torch.from_numpy(np.array(params['bias']))
  return lin


class VGG(nn.Module):
  """``experiments.models.VGG`` with BatchNorm: conv, BN, ReLU per width, 2x2 max pools at 'M'."""

  def __init__(self, variables: Mapping, cfg: Sequence[int | str]):
    super().__init__()
    p, s = variables['params'], variables['batch_stats']
    layers: list[nn.Module] = []
    k = 0
    for width in cfg:
      if width == 'M':
        layers.append(nn.MaxPool2d(2))
        continue
      layers += [_conv(p[f'Conv_{k}']['kernel']), _bn(p[f'BatchNorm_{k}'], s[f'BatchNorm_{k}']), nn.ReLU()]
      k += 1
    self.features = nn.Sequential(*layers)
    self.head = _dense(p['Dense_0'])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # NHWC flatten order: the features end at 1x1, where it is the channel order.
    return self.head(self.features(x).permute(0, 2, 3, 1).flatten(1))


class Bottleneck(nn.Module):
  """``experiments.models.ResNetBlock`` of kind ``bottleneck`` (stride on the 3x3 conv)."""

  def __init__(self, p: Mapping, s: Mapping, stride: int):
    super().__init__()
    self.body = nn.Sequential(
      _conv(p['conv1']['kernel']),
      _bn(p['bn1'], s['bn1']),
      nn.ReLU(),
      _conv(p['conv2']['kernel'], stride),
      _bn(p['bn2'], s['bn2']),
      nn.ReLU(),
      _conv(p['conv3']['kernel']),
      _bn(p['bn3'], s['bn3']),
    )
    self.shortcut = (
      nn.Sequential(_conv(p['proj_conv']['kernel'], stride), _bn(p['proj_bn'], s['proj_bn']))
      if 'proj_conv' in p
      else nn.Identity()
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
  """``experiments.models.ResNet`` with bottleneck blocks and the CIFAR stem."""

  def __init__(self, variables: Mapping, stage_sizes: Sequence[int]):
    super().__init__()
    p, s = variables['params'], variables['batch_stats']
    blocks: list[nn.Module] = [_conv(p['stem_conv']['kernel']), _bn(p['stem_bn'], s['stem_bn']), nn.ReLU()]
    for i, n in enumerate(stage_sizes):
      for j in range(n):
        name = f'stage{i + 1}_block{j}'
        blocks.append(Bottleneck(p[name], s[name], 2 if (i > 0 and j == 0) else 1))
    self.features = nn.Sequential(*blocks)
    self.head = _dense(p['head'])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.features(x).mean(dim=(2, 3)))


def twin(model: Any, variables: Mapping) -> nn.Module:
  """The PyTorch twin of ``model`` (an ``experiments.models`` VGG or CIFAR-stem bottleneck
  ResNet) with ``variables`` (full or slim), in eval mode."""
  variables = {c: dict(v) for c, v in variables.items()}
  if hasattr(model, 'cfg'):
    net = VGG(variables, model.cfg)
  elif getattr(model, 'cifar_stem', False) and model.block == 'bottleneck':
    net = ResNet(variables, model.stage_sizes)
  else:
    raise ValueError(
      f'No PyTorch twin for {type(model).__name__}: VGG and CIFAR-stem bottleneck ResNets only.'
    )
  return net.eval()


def to_torch(x: Any, channels_last: bool) -> torch.Tensor:
  """NHWC images as an NCHW tensor (stored channels-last when asked)."""
  t = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
  return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def runner(net: nn.Module, channels_last: bool):
  """``net`` as a function of NCHW tensors, in inference mode (channels-last weights if asked)."""
  if channels_last:
    net = net.to(memory_format=torch.channels_last)

  def run(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
      return net(x)

  return run
