"""Small architectures for the tests, loaded through the ``file.py:NAME`` arch spec."""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class TinyNet(nn.Module):
    """Stem (3 input channels), a 3×3 conv, a grouped conv, a depthwise conv, a 1×1 conv and a
    classifier: one layer of each eligibility case."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.features = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width),
            nn.Conv2d(2 * width, width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.features(self.bn(self.stem(x)).relu())
        return self.fc(self.pool(x).flatten(1))


def tiny_net(num_classes: int = 10) -> TinyNet:
    return TinyNet(num_classes=num_classes)


class PointwiseNet(nn.Module):
    """1×1-heavy (MobileNetV2-like): a stem, two inverted residuals (1×1 expand → depthwise
    3×3 → 1×1 project, BatchNorm, ReLU6), a 1×1 head, a hidden Linear and the classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, expand: int = 4) -> None:
        super().__init__()
        hidden = width * expand
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))
            for _ in range(2))
        self.head = nn.Sequential(nn.Conv2d(width, 4 * width, 1, bias=False),
                                  nn.BatchNorm2d(4 * width), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(4 * width, 4 * width)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        x = self.pool(self.head(x)).flatten(1)
        return self.fc(self.hidden(x).relu())
