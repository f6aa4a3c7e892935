"""A small 3D UNet for vertebra segmentation on a whole resampled CT volume.

Why 3D over the whole volume rather than 2.5D slices: C3..C7 look alike slice by slice; which one a
vertebra is follows from counting down from C1 and C2, so the model needs context along the whole
neck. A UNet over the volume resampled to a fixed grid (e.g. 24 x 32² on CPU, 128³ on a GPU) sees it
all.

CPU note: PyTorch runs a 3D convolution through oneDNN only when the batch (or the first dimensions)
is large enough; a batch of one volume takes a ~3x slower path, so train with batches of 2 or more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each with instance norm (batches of one or two volumes) and LeakyReLU."""

    def __init__(self, c_in: int, c_out: int):
        layers = []
        for c in (c_in, c_out):
            layers += [
                nn.Conv3d(c, c_out, 3, padding=1, bias=False),
                nn.InstanceNorm3d(c_out, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """(B, in_chans, D, H, W) → (B, n_classes, D, H, W) logits.

    ``widths`` are the channels of each level; every level but the last halves the grid, so D, H and W
    must be divisible by 2 ** (len(widths) - 1). The decoder upsamples trilinearly (no transposed
    convolutions: no checkerboard artefacts, fewer weights).

    With ``coords``, three channels with each voxel's place in the grid (-1..1 along slices, rows and
    columns) are appended to the input (CoordConv): where in the field of view a vertebra lies is a
    strong first guess of which one it is, learned in a few steps, which the image then corrects.
    """

    def __init__(self, in_chans: int, n_classes: int, widths=(16, 32, 64, 128), coords: bool = False):
        super().__init__()
        widths = [int(w) for w in widths]
        self.coords = coords
        c0 = in_chans + 3 * coords
        self.down = nn.ModuleList(ConvBlock(c_in, c) for c_in, c in zip([c0, *widths[:-1]], widths))
        self.up = nn.ModuleList(ConvBlock(c_deep + c, c) for c_deep, c in zip(widths[1:], widths[:-1]))
        self.head = nn.Conv3d(widths[0], n_classes, 1)
        self.multiple = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.multiple for s in x.shape[2:]):
            raise ValueError(f"grid {tuple(x.shape[2:])} is not divisible by {self.multiple}")
        if self.coords:
            axes = [torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
            x = torch.cat([x, grid[None].expand(len(x), -1, -1, -1, -1)], 1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)
