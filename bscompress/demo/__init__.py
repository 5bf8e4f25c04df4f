"""Bundled demo model: a small residual CNN trained on Fashion-MNIST.

The network is built from regular 3x3 convolutions with BatchNorm, which makes it a natural
target for convolution decomposition. A trained checkpoint (:data:`CHECKPOINT`) and a held-out
2000-image subset of the official Fashion-MNIST test split (``data/``) ship with the package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ARCH",
    "BLOCKS",
    "CHECKPOINT",
    "INPUT_SHAPE",
    "WIDTHS",
    "BasicBlock",
    "FMNISTResNet",
    "fmnist_resnet",
]

#: Trained ``state_dict`` of ``fmnist_resnet()`` (saved with ``torch.save``).
CHECKPOINT = Path(__file__).parent / "fmnist_resnet.pt"
#: Architecture spec (``module:callable``) that rebuilds the demo model.
ARCH = "bscompress.demo:fmnist_resnet"
#: Input shape ``[B, C, H, W]`` of one normalised Fashion-MNIST image.
INPUT_SHAPE = (1, 1, 28, 28)
#: Default channel widths of the three stages (28x28, 14x14, 7x7).
WIDTHS = (16, 32, 64)
#: Default number of residual blocks per stage.
BLOCKS = (2, 2, 2)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BatchNorm layers and a residual shortcut.

    Maps ``[B, in_channels, H, W]`` to ``[B, out_channels, H / stride, W / stride]``. The
    shortcut is the identity when shape is preserved, otherwise a strided 1x1 conv + BatchNorm
    projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> ``[B, C_out, H / stride, W / stride]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FMNISTResNet(nn.Module):
    """Small ResNet for ``[B, in_channels, 28, 28]`` inputs producing ``[B, num_classes]`` logits.

    Layout: ``stem`` (3x3 conv + BN + ReLU to ``widths[0]`` channels, 28x28), then ``layer1``
    (28x28), ``layer2`` (14x14) and ``layer3`` (7x7), each a sequence of :class:`BasicBlock`;
    the first block of ``layer2`` / ``layer3`` downsamples with a stride-2 3x3 conv and a 1x1
    projection shortcut. Global average pooling and a linear classifier ``fc`` finish it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = WIDTHS,
        in_channels: int = 1,
        blocks: tuple[int, int, int] = BLOCKS,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or len(blocks) != 3:
            raise ValueError("widths and blocks must each have three entries (one per stage).")
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._make_stage(w1, w1, blocks[0], stride=1)
        self.layer2 = self._make_stage(w1, w2, blocks[1], stride=2)
        self.layer3 = self._make_stage(w2, w3, blocks[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch so every block starts as the identity.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, 28, 28]`` normalised images -> ``[B, num_classes]`` logits."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def fmnist_resnet(**kwargs: object) -> FMNISTResNet:
    """Build the demo :class:`FMNISTResNet` (keyword arguments are passed to the constructor)."""
    return FMNISTResNet(**kwargs)  # type: ignore[arg-type]
