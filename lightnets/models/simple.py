"""Small CNNs for quick runs on MNIST-sized data (the demo and the test suite)."""

from __future__ import annotations

import torch
from torch import nn

from lightnets.models.norm_option import plain_norm
from lightnets.models.registry import register_variant


class SimpleCNN(nn.Module):
    """Two conv-norm-ReLU-pool stages, a 4x4 adaptive pool and a linear classifier.

    `norm` is any plain kind of the models' convention (`lightnets.models.norm_option`): "bn",
    "gn" (GroupNorm with `gn_groups` groups, batch independent, used by the
    distributed-equality test), "none", ...; the model has no FBN positions.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        width: int = 32,
        norm: str = "bn",
        gn_groups: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        spec = plain_norm("mnist_cnn", norm, {"num_groups": gn_groups} if norm == "gn" else None)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            spec(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            spec(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)  # keeps coarse layout: learns much faster than 1x1
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


mnist_cnn = register_variant(
    "mnist_cnn",
    SimpleCNN,
    "A ~30k-parameter CNN that reaches ~98% on the bundled MNIST subset in a minute.",
)
