"""A residual 3D block, shared by the 3D classifiers of every task."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
    )


class Res3d(nn.Module):
    """A residual 3D block; the shortcut is projected when shape changes."""

    def __init__(self, cin: int, cout: int, stride):
        super().__init__()
        self.body = _block(cin, cout, stride)
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))
