"""Small architectures shipped with the project (the bundled demo's CNN)."""
from __future__ import annotations

from torch import nn


class DemoCNN(nn.Module):
    """CIFAR-style conv/pool/FC classifier: three 3x3 conv blocks and a two-layer head, for 32x32 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4 * w * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def demo_cnn(**kwargs) -> DemoCNN:
    """Return an untrained `DemoCNN` (the factory the demo's model cards name)."""
    return DemoCNN(**kwargs)


class SmallCNN(nn.Module):
    """A small all-size colour classifier: four conv-BN blocks (the first strided), adaptive pooling to 4x4 (so
    the head keeps where things are) and a two-layer head; trains on a CPU in minutes at 224x224."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def small_cnn(**kwargs) -> SmallCNN:
    return SmallCNN(**kwargs)
