"""A small CNN (conv+bn+relu blocks, a linear head) and an MLP for the graph-mode tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(Block(3, 16), Block(16, 32), Block(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.act = nn.ReLU()
        self.down = nn.Linear(128, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.down(self.act(self.up(x))))


@pytest.fixture
def cnn() -> CNN:
    """Random weights, batch norms with non-trivial running statistics, eval mode."""
    torch.manual_seed(0)
    model = CNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def images() -> tuple[torch.Tensor, list[tuple[torch.Tensor]]]:
    """``(test batch, calibration batches)`` of random 16x16 RGB images."""
    g = torch.Generator().manual_seed(1)
    test = torch.randn(4, 3, 16, 16, generator=g)
    return test, [(torch.randn(4, 3, 16, 16, generator=g),) for _ in range(8)]


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()
