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
