"""Architectures the benchmark scripts train (loaded with ``--arch benchmarks.models:NAME``
from the repository root, or ``benchmarks/models/__init__.py:NAME``)."""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 1, 28, 28)


class VGGNet(nn.Module):
    """A plain VGG-style net for 28×28 grey images: three stages of two 3×3 conv-BN-ReLU
    (widths w, 2w, 4w), max-pooling between stages, global average pooling, a linear
    classifier. No shortcuts: errors of one layer reach the next unfiltered."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def vgg_fmnist(num_classes: int = 10) -> VGGNet:
    return VGGNet(num_classes=num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block, ``conv`` a Sequential of: 1×1 expand conv-BN-ReLU6
    (M → t·M; absent when t = 1), 3×3 depthwise conv-BN-ReLU6 (carries the stride), 1×1
    project conv-BN (t·M → N, linear bottleneck). Identity shortcut when stride is 1 and
    M = N. Maps ``[B, M, H, W]`` to ``[B, N, H / stride, W / stride]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                             bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetFMNIST(nn.Module):
    """A small MobileNetV2 for 28×28 grey images, most of whose MACs are in 1×1 convs.

    Layout ([C×H×W] after each part): stem 3×3 conv-BN-ReLU6 1 → 16 (16×28×28); inverted
    residual stages, each (expansion t, width, blocks, stride of its first block):
    (1, 16, 1, 2) → 16×14×14, (4, 24, 2, 1) → 24×14×14, (4, 32, 2, 2) → 32×7×7,
    (6, 64, 2, 1) → 64×7×7, (6, 96, 1, 1) → 96×7×7, (6, 128, 1, 2) → 128×4×4; a final 1×1
    conv-BN-ReLU6 128 → 512 (512×4×4); global average pooling; a linear classifier 512 →
    ``num_classes``. A stage's stride sits on the depthwise conv of its first block; the
    blocks after the first of a stage have identity shortcuts. 377 k parameters, 14.75 M
    MACs per image, 93 % of them in the 18 1×1 convs (6 % in the depthwise convs), as
    ``bscompress inspect`` counts them.

    ``benchmarks/models/mobilenet_fmnist.pt`` (the state_dict, saved with ``torch.save``) was
    trained from the repository root with (1300 s on one shared core, 91.98 % top-1 on the
    full 10k test set)::

        python benchmarks/train_fmnist.py --arch benchmarks.models:mobilenet_fmnist \\
            --epochs 6 --seed 0 --threads 1 --no-fill-uninitialized --eval-every 3 \\
            --out benchmarks/models/mobilenet_fmnist.pt

    The CLI takes it as ``--arch benchmarks/models/__init__.py:mobilenet_fmnist``, e.g.
    ``bscompress evaluate benchmarks/models/mobilenet_fmnist.pt --arch
    benchmarks/models/__init__.py:mobilenet_fmnist --data
    fashion-mnist:/usr/share/datasets/fashion-mnist``.
    """

    SETTINGS = ((1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1),
                (6, 128, 1, 2))

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, stem, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
        channels = stem
        for expand, out, blocks, stride in self.SETTINGS:
            for i in range(blocks):
                layers.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def mobilenet_fmnist(num_classes: int = 10) -> MobileNetFMNIST:
    return MobileNetFMNIST(num_classes=num_classes)


class GreyTo(nn.Module):
    """A fixed input adapter, ``[B, 1, H, W]`` → ``[B, 3, size, size]``: bilinear resize, the
    grey channel repeated three times (no weights: nothing for bscompress to rewrite)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x):
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                      align_corners=False)
        return x.expand(-1, 3, -1, -1)


class ResNet18FMNIST(nn.Module):
    """An unmodified torchvision ``resnet18`` (``net``; 10 classes, its ImageNet stem of a
    7×7 stride-2 conv and a max-pool) behind :class:`GreyTo` ``size``: 28×28 grey images
    upsampled to ``size``² RGB. At 32²: 11.2 M parameters, 37 M MACs per image (the stem
    leaves 8×8 maps, the last stage 1×1); its 16 3×3 convs after the stem hold 92.4 % of
    the MACs, its three 1×1 downsample convs are for ``svd`` (under ``auto``).

    Too large to ship (45 MB): ``make bench`` trains it into
    ``bench-out/models/resnet18_fmnist.pt`` when missing, from the repository root, with
    (1267 s on one core; 92.24 % top-1 on the full 10k test set)::

        python benchmarks/train_fmnist.py --arch benchmarks.models:resnet18_fmnist \\
            --epochs 8 --seed 0 --threads 1 --no-fill-uninitialized --eval-every 2 \\
            --out bench-out/models/resnet18_fmnist.pt
    """

    def __init__(self, num_classes: int = 10, size: int = 32) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.input = GreyTo(size)
        self.net = resnet18(num_classes=num_classes)

    def forward(self, x):
        return self.net(self.input(x))


def resnet18_fmnist(num_classes: int = 10) -> ResNet18FMNIST:
    return ResNet18FMNIST(num_classes=num_classes)
