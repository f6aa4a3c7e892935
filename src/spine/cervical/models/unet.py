"""A small 3D UNet for vertebra segmentation on a CT volume resampled to fixed millimetres per voxel.

Why 3D over the neck rather than 2.5D slices: C3..C7 look alike slice by slice; which one a vertebra
is follows from counting down from C1 and C2, so the model needs context along the neck. The grid has
fixed mm per voxel (``segment.voxel_mm``), so a vertebra has the same size in voxels whatever the
study's slice spacing or count, and the network is fully convolutional along the slices (any depth
that is a multiple of ``multiple``).

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

    With ``coord_mm`` (the grid's row and column spacing in mm), two channels are appended to the input
    (CoordConv): each voxel's distance from the grid's centre in the row and column directions, in
    units of 100 mm. The grid is centred on the spine (found before the model runs), so these say
    "how far from the spine's axis", the same in every study whatever its pixel spacing; no channel
    for the slice axis, where a grid position would say nothing anatomical.

    With ``z_context``, the deepest level also gets a bidirectional GRU along the slices (``ZContext``):
    the convolutions see a few vertebrae at most, the GRU the whole column, so a vertebra's label can
    follow from counting down from C1 / C2 (or up from the thorax) rather than from its look.
    """

    def __init__(
        self,
        in_chans: int,
        n_classes: int,
        widths=(16, 32, 64, 128),
        coord_mm: tuple | None = None,
        z_context: bool = False,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        self.coord_mm = tuple(float(v) for v in coord_mm) if coord_mm else None
        c0 = in_chans + 2 * bool(self.coord_mm)
        self.down = nn.ModuleList(ConvBlock(c_in, c) for c_in, c in zip([c0, *widths[:-1]], widths))
        self.up = nn.ModuleList(ConvBlock(c_deep + c, c) for c_deep, c in zip(widths[1:], widths[:-1]))
        self.head = nn.Conv3d(widths[0], n_classes, 1)
        self.multiple = 2 ** (len(widths) - 1)
        self.z_context = ZContext(widths[-1]) if z_context else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.multiple for s in x.shape[2:]):
            raise ValueError(f"grid {tuple(x.shape[2:])} is not divisible by {self.multiple}")
        if self.coord_mm:
            x = torch.cat([x, self._coords(x)], 1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            if self.z_context is not None and i == len(self.down) - 1:
                x = self.z_context(x)
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)

    def _coords(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, D, H, W): row and column distance of each voxel from the grid centre, in 100 mm."""
        b, _, d, h, w = x.shape
        rows, cols = (
            (torch.arange(n, device=x.device, dtype=x.dtype) + 0.5 - n / 2) * mm / 100.0
            for n, mm in zip((h, w), self.coord_mm)
        )
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
        return grid[None, :, None].expand(b, 2, d, h, w)


class ZContext(nn.Module):
    """(B, C, D, H, W) → the same plus, per plane, a bidirectional GRU's reading of the whole column.

    Each plane is summarised by its mean feature over rows and columns; a GRU runs along the slices
    both ways and its output (projected back to C channels) is added to every voxel of the plane. Cheap
    at the deepest level (a few dozen planes); the residual form starts near the plain UNet.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gru = nn.GRU(channels, channels, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.mean((3, 4)).transpose(1, 2)  # (B, D, C)
        ctx = self.proj(self.gru(seq.float())[0]).to(x.dtype)  # (B, D, C)
        return x + ctx.transpose(1, 2)[..., None, None]
