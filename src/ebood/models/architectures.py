"""The classifiers the benchmark protocols use, each ending in an ``nn.Linear`` head named ``fc``.

* :class:`WideResNet`: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; WRN-40-2 with
  dropout 0.3 is the network of the energy-OOD paper (Liu et al., NeurIPS 2020) and of Outlier
  Exposure (Hendrycks et al., ICLR 2019).
* :class:`ResNet18`: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, in the
  CIFAR variant of OpenOOD v1.5 (3x3 stem with stride 1, no max-pool, 512-d penultimate layer).
* :class:`DigitsCNN`: a small CNN for the 1x8x8 scikit-learn digits of ebood's built-in benchmark.
* :class:`FashionCNN`: a small CNN for 1x28x28 images (the Fashion-MNIST benchmark).

Parameter and buffer names follow the reference implementations (the energy / OE code for the
WideResNet, OpenOOD for the ResNet-18), so their published state dicts load with ``load_state_dict``.
The input of ``fc`` is the penultimate representation that ``ebood.extract`` returns by default, and
``ood_layers`` lists the stage outputs that multi-layer detectors (``mahalanobis_ensemble``) use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "ResNet18", "DigitsCNN", "FashionCNN"]


# ----- WideResNet ------------------------------------------------------------------------------


class _WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, (dropout), BN-ReLU-conv3x3, plus a shortcut.

    When the width or stride changes, the shortcut is a 1x1 convolution applied to the
    pre-activated input (as in the reference code).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        # A module (not F.dropout) so that MC-Dropout can switch it on at test time.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _WideStage(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(_WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout) for i in range(blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 RGB inputs (Zagoruyko & Komodakis, BMVC 2016).

    A 3x3 convolution with 16 channels, three stages of ``(depth - 4) / 6`` pre-activation blocks
    with ``16k, 32k, 64k`` channels (``k = widen_factor``, strides 1, 2, 2), BN-ReLU, global average
    pooling and the linear head ``fc``. Defaults give the energy paper's WRN-40-2 with dropout 0.3
    (2.2 M parameters, 128-d penultimate layer).
    """

    ood_layers = ("block1", "block2", "block3", "penultimate")

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10, dropout: float = 0.3, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 40), got {depth}")
        if widen_factor < 1 or num_classes < 1:
            raise ValueError(f"widen_factor and num_classes must be >= 1, got {widen_factor} and {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.num_classes, self.dropout = depth, widen_factor, num_classes, dropout
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1, dropout)
        self.block2 = _WideStage(n, widths[1], widths[2], 2, dropout)
        self.block3 = _WideStage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation (fan-out) as in the reference code; BN to identity; zero head bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ----- ResNet-18 (CIFAR) -----------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs as in OpenOOD v1.5 (``ResNet18_32x32``).

    A 3x3 stride-1 stem (64 channels, BN, ReLU; no max-pool), four stages of two basic blocks with
    64, 128, 256, 512 channels (strides 1, 2, 2, 2), global average pooling (``avgpool``) and the
    linear head ``fc`` on the 512-d penultimate layer (11.2 M parameters).
    """

    ood_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes = [64, 128, 256, 512]
        strides = [1, 2, 2, 2]
        in_planes = 64
        for i, (p, s) in enumerate(zip(planes, strides), start=1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(in_planes, p, s), _BasicBlock(p, p, 1)))
            in_planes = p
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


# ----- DigitsCNN -------------------------------------------------------------------------------


def _check_small_cnn(num_classes: int, hidden: int, dropout: float) -> None:
    if num_classes < 1 or hidden < 1:
        raise ValueError(f"num_classes and hidden must be >= 1, got {num_classes} and {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images with values in [0, 1] (scikit-learn's digits, scaled by 1/16).

    conv3x3(1->16)-ReLU, conv3x3(16->32)-ReLU, 2x2 max-pool (32x4x4), ``fc1`` 512->64-ReLU,
    dropout, head ``fc`` 64->``num_classes``. About 40 k parameters: it reaches >= 95% test accuracy
    on the digits in a few seconds of CPU training, and its dropout layer makes MC-Dropout usable.
    """

    ood_layers = ("conv1", "conv2", "penultimate")

    def __init__(self, num_classes: int = 10, hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        _check_small_cnn(num_classes, hidden, dropout)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (N, 8, 8): add the channel axis
            x = x.unsqueeze(1)
        out = F.relu(self.conv1(x))
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.relu(self.fc1(torch.flatten(out, 1)))
        return self.fc(self.dropout(out))


# ----- FashionCNN ------------------------------------------------------------------------------


class FashionCNN(nn.Module):
    """A small CNN for 1x28x28 images in [0, 1] (Fashion-MNIST, MNIST), cheap on a CPU.

    conv5x5(1->16, stride 2)-BN-ReLU (16x14x14), conv3x3(16->32, stride 2)-BN-ReLU (32x7x7), ``fc1``
    1568->128-ReLU, dropout, head ``fc`` 128->``num_classes``. About 0.5 M multiply-adds per image
    and 207 k parameters: strided convolutions instead of max-pooling, which costs more than the
    convolutions on a CPU at these sizes. The Fashion-MNIST benchmark trains it for 7 epochs of Adam
    (about 9 s per epoch on two idle cores); its dropout layer makes MC-Dropout usable.
    """

    ood_layers = ("conv1", "conv2", "penultimate")

    def __init__(self, num_classes: int = 10, hidden: int = 128, dropout: float = 0.2, in_channels: int = 1) -> None:
        super().__init__()
        _check_small_cnn(num_classes, hidden, dropout)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 16, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 7 * 7, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (N, 28, 28): add the channel axis
            x = x.unsqueeze(1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.fc1(torch.flatten(out, 1)))
        return self.fc(self.dropout(out))
