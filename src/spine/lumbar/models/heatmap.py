"""Keypoint heatmaps over the slices of a stack: a 2D timm encoder shared by every slice, a small
FPN decoder to 1/4 resolution, and one logit map per keypoint. A softmax over (slice, row, col)
turns each keypoint's maps into a 3D distribution, so the slice axis is predicted jointly with the
in-plane position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spine.core.models.encoder import build_encoder


class SliceHeatmapNet(nn.Module):
    """(D, C, H, W) slices → (D, K, H/stride, W/stride) keypoint logits.

    ``position`` (D,) is each slice's place in patient space (e.g. mm along patient x / 50): it enters
    the head as a constant map, so the model can tell left from right structures that look alike,
    from geometry rather than from the order in which slices were stored.
    """

    def __init__(
        self,
        backbone: str,
        n_points: int,
        in_chans: int = 3,
        decoder_channels: int = 64,
        checkpoint: str | None = None,
        stride: int = 4,
    ):
        super().__init__()
        self.encoder = build_encoder(backbone, in_chans, checkpoint)
        info = self.encoder.feature_info
        keep = [i for i, r in enumerate(info.reduction()) if r >= stride]
        if info.reduction()[keep[0]] != stride:
            raise ValueError(f"{backbone} has no feature level at stride {stride}: {info.reduction()}")
        self.stride = stride
        self.keep = keep
        self.lateral = nn.ModuleList(nn.Conv2d(info.channels()[i], decoder_channels, 1) for i in keep)
        self.head = nn.Sequential(
            nn.Conv2d(decoder_channels + 1, decoder_channels, 3, padding=1),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(decoder_channels, n_points, 1),
        )

    def forward(self, x: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        feats = [f for i, f in enumerate(self.encoder(x)) if i in self.keep]
        y = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            y = F.interpolate(y, size=f.shape[-2:], mode="nearest") + lat(f)
        pos = torch.zeros(len(x), device=x.device) if position is None else position.to(y.dtype)
        pos_map = (
            pos.view(-1, 1, 1, 1).expand(-1, 1, *y.shape[-2:]).contiguous(memory_format=torch.channels_last)
        )
        return self.head(torch.cat([y, pos_map.to(y.dtype)], 1))


def mask_slices(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits with the slices a keypoint may not lie on set to -inf; ``allowed`` is (D, K) bool."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device)[:, :, None, None], float("-inf"))


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, sigma: float, allowed=None) -> torch.Tensor:
    """Cross entropy between each keypoint's 3D softmax and a Gaussian around its target.

    logits (D, K, h, w); target (K, 3) as (slice, row, col) in heatmap cells, NaN rows are skipped.
    ``sigma`` is in cells in-plane; along the slice axis the Gaussian is half as wide, since slices
    are thick. ``allowed`` (D, K) restricts each keypoint's softmax to some slices.
    """
    logits = mask_slices(logits, allowed)
    d, k, h, w = logits.shape
    valid = ~torch.isnan(target).any(1)
    if not valid.any():
        return logits.sum() * 0
    logp = logits.permute(1, 0, 2, 3)[valid].reshape(int(valid.sum()), -1).float().log_softmax(-1)
    t = target[valid]
    zz = torch.arange(d, device=logits.device, dtype=torch.float32)
    yy = torch.arange(h, device=logits.device, dtype=torch.float32)
    xx = torch.arange(w, device=logits.device, dtype=torch.float32)
    gz = torch.exp(-((zz[None] - t[:, 0:1]) ** 2) / (2 * (sigma / 2) ** 2))
    gy = torch.exp(-((yy[None] - t[:, 1:2]) ** 2) / (2 * sigma**2))
    gx = torch.exp(-((xx[None] - t[:, 2:3]) ** 2) / (2 * sigma**2))
    g = (gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]).reshape(len(t), -1)
    g = g / g.sum(1, keepdim=True).clamp_min(1e-12)
    return -(g * logp.clamp_min(-1e4)).sum(1).mean()  # masked slices carry no target mass


@torch.no_grad()
def decode_peaks(logits: torch.Tensor, radius: int = 2, allowed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-cell keypoints from logits (D, K, h, w), each within its ``allowed`` slices (D, K).

    Returns (coords (K, 3) as (slice, row, col) in heatmap cells, confidence (K,)): the argmax of
    each keypoint's 3D softmax refined by the probability-weighted mean in a window around it; the
    confidence is the probability mass inside that window.
    """
    logits = mask_slices(logits, allowed)
    d, k, h, w = logits.shape
    p = logits.permute(1, 0, 2, 3).reshape(k, -1).float().softmax(-1).reshape(k, d, h, w)
    coords, conf = torch.zeros(k, 3), torch.zeros(k)
    for j in range(k):
        z, y, x = (int(v) for v in torch.unravel_index(p[j].argmax(), (d, h, w)))
        sl = (
            slice(max(0, z - 1), z + 2),
            slice(max(0, y - radius), y + radius + 1),
            slice(max(0, x - radius), x + radius + 1),
        )
        win = p[j][sl]
        mass = win.sum()
        grids = torch.meshgrid(
            *(torch.arange(s.start, s.start + n, dtype=torch.float32) for s, n in zip(sl, win.shape)),
            indexing="ij",
        )
        coords[j] = torch.stack([(g * win).sum() / mass for g in grids])
        conf[j] = mass
    return coords, conf


def patch_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """``heatmap_loss`` over a batch of independent single-slice patches.

    logits (B, K, h, w); target (B, K, 3) in heatmap cells (slice 0), NaN rows skipped. Each patch is
    its own 1-slice stack, so a keypoint's softmax never spreads over another patch.
    """
    return torch.stack([heatmap_loss(logits[b : b + 1], target[b], sigma) for b in range(len(logits))]).mean()
