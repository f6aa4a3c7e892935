"""The landmark model: vertebra centres as one heatmap, and each vertebra's 4 corners as offsets from its
centre (Yi et al. 2020, "vertebra-focused landmark detection"), on a timm encoder.

The encoder's feature maps are merged top-down (a small FPN) down to ``stride`` pixels per cell; three
heads read the merged map: the centre heatmap (1 channel, a Gaussian at each vertebra's centre), the
centre's position inside its cell (2) and the corners' offsets from the centre in cells (8: x, y of
top-left, top-right, bottom-left, bottom-right). Decoding takes the 17 strongest local maxima of the
heatmap, sorts them top to bottom (T1..L5: every vertebra is in the image) and reads the offsets there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spine.core.models.encoder import build_encoder

N_VERTEBRAE = 17
FLIP_CORNERS = [1, 0, 3, 2]  # a mirrored image swaps left and right corners
HEADS = {"heat": 1, "offset": 2, "corners": 8}  # output channels of each head


class VertebraNet(nn.Module):
    """Centre heatmap + centre offset + corner offsets at ``stride`` pixels per cell."""

    def __init__(self, backbone: str, checkpoint: str | None = None, width: int = 64, stride: int = 2):
        super().__init__()
        self.encoder = build_encoder(backbone, in_chans=1, checkpoint=checkpoint)
        info = self.encoder.feature_info
        self.levels = [i for i, r in enumerate(info.reduction()) if r >= stride]
        self.stride = stride
        self.first = info.reduction()[self.levels[0]]
        self.lateral = nn.ModuleList(nn.Conv2d(info.channels()[i], width, 1) for i in self.levels)
        # One shared 3x3 conv, then a 1x1 conv per output: at a fine stride, 3x3 convs per head would
        # cost more than the whole encoder on a CPU.
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Conv2d(width, n, 1) for name, n in HEADS.items()})
        nn.init.constant_(self.heads["heat"].bias, -2.19)  # start near p = 0.1 (CenterNet)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        y = None
        for i, conv in reversed(list(zip(self.levels, self.lateral))):
            f = conv(feats[i])
            y = f if y is None else f + F.interpolate(y, size=f.shape[-2:], mode="nearest")
        if self.first > self.stride:  # no encoder level as fine as the output: upsample the finest
            y = F.interpolate(y, scale_factor=self.first // self.stride, mode="nearest")
        y = self.smooth(y)
        return {name: head(y) for name, head in self.heads.items()}


# --- targets and loss --------------------------------------------------------------------------


def targets(
    points: np.ndarray, shape: tuple[int, int], stride: int, sigma: float, radius: int = 0
) -> dict[str, np.ndarray]:
    """Training targets of one image from its (17, 4, 2) corners in model pixels.

    heat (1, h, w): a Gaussian (``sigma`` cells) at each centre, 1 at its cell. The offsets are taught at
    the centre's cell and at the cells up to ``radius`` around it (a peak found one cell off still reads
    good offsets, and each image teaches (2 radius + 1)² times as many): index (K,) the flat cells, K =
    17 (2 radius + 1)²; offset (K, 2): the centre's position from the cell's corner, in cells; corners
    (K, 8): corner - centre, in cells; valid (K,): the cell lies on the grid.
    """
    h, w = shape[0] // stride, shape[1] // stride
    centre = points.mean(axis=1) / stride  # (17, 2) in cells
    cell = np.floor(centre).astype(int)
    on_grid = (cell[:, 0] >= 0) & (cell[:, 0] < w) & (cell[:, 1] >= 0) & (cell[:, 1] < h)
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.zeros((h, w), np.float32)
    for (cx, cy), ok in zip(centre, on_grid):
        if ok:
            g = np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * sigma**2))
            heat = np.maximum(heat, g)
    for (cx, cy), ok in zip(cell, on_grid):
        if ok:
            heat[cy, cx] = 1.0  # the exact peak: the focal loss's positives
    steps = np.arange(-radius, radius + 1)
    shifts = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)[:, ::-1]  # (dx, dy)
    cells = cell[:, None, :] + shifts[None]  # (17, S, 2)
    valid = on_grid[:, None] & (cells >= 0).all(-1) & (cells[..., 0] < w) & (cells[..., 1] < h)
    cells = np.clip(cells, 0, [w - 1, h - 1])
    corners = np.broadcast_to((points / stride - centre[:, None, :]).reshape(-1, 1, 8), (17, len(shifts), 8))
    return {
        "heat": heat[None],
        "index": (cells[..., 1] * w + cells[..., 0]).reshape(-1).astype(np.int64),
        "offset": (centre[:, None, :] - cells).reshape(-1, 2).astype(np.float32),
        "corners": corners.reshape(-1, 8).astype(np.float32),
        "valid": valid.reshape(-1).astype(np.float32),
    }


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on a Gaussian heatmap, per positive cell."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = (1 - target) ** 4
    pos_loss = (torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - p) * p**2 * neg_weight * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def gather(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps at (B, K) flat cell indices → (B, K, C)."""
    b, c = maps.shape[:2]
    flat = maps.reshape(b, c, -1)
    return flat.gather(2, index[:, None, :].expand(b, c, index.shape[1])).transpose(1, 2)


def line_vectors(corners: torch.Tensor) -> torch.Tensor:
    """(..., 8) corner offsets → (..., 2) each vertebra's line: right-edge midpoint - left-edge midpoint
    (what the Cobb routine measures)."""
    c = corners.reshape(*corners.shape[:-1], 4, 2)
    return (c[..., 1, :] + c[..., 3, :] - c[..., 0, :] - c[..., 2, :]) / 2


def landmark_loss(out: dict, batch: dict, corner_weight: float, line_weight: float = 0.0) -> torch.Tensor:
    """Focal heatmap loss + L1 of the centre and corner offsets at the true centres' cells, + L1 of each
    vertebra's line vector (``line_weight``: the corners' error in the direction the angles read)."""
    valid = batch["valid"][..., None]
    n = valid.sum().clamp(min=1)
    off = (gather(out["offset"], batch["index"]) - batch["offset"]).abs()
    corners = gather(out["corners"], batch["index"])
    cor = (corners - batch["corners"]).abs()
    line = (line_vectors(corners) - line_vectors(batch["corners"])).abs()
    return (
        focal_loss(out["heat"], batch["heat"])
        + (off * valid).sum() / (2 * n)
        + corner_weight * (cor * valid).sum() / (8 * n)
        + line_weight * (line * valid).sum() / (2 * n)
    )


# --- decoding ------------------------------------------------------------------------------------


def unflip(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs of a mirrored image, mapped back onto the original: maps mirrored, the centre's
    x in its cell mirrored (1 - x), corner x offsets negated and left / right corners swapped."""
    heat = out["heat"].flip(-1)
    offset = out["offset"].flip(-1).clone()
    offset[:, 0] = 1 - offset[:, 0]
    corners = out["corners"].flip(-1).reshape(len(heat), 4, 2, *heat.shape[-2:])
    corners = corners[:, FLIP_CORNERS].clone()
    corners[:, :, 0] = -corners[:, :, 0]
    return {"heat": heat, "offset": offset, "corners": corners.reshape(len(heat), 8, *heat.shape[-2:])}


def decode(
    out: dict[str, torch.Tensor],
    stride: int,
    k: int = N_VERTEBRAE,
    window: int = 3,
    radius: int = 0,
    min_gap: float = 0.5,
    candidates: int = 40,
) -> np.ndarray:
    """(B, 17, 4, 2) corners in model pixels from the model's maps.

    Candidates are the ``candidates`` strongest local maxima of the centre heatmap (maxima of a
    ``window`` x ``window`` cell neighbourhood). Each cell up to ``radius`` around a peak (where the
    offsets were taught, ``targets``) gives its own estimate of the centre and corners; they are averaged
    with the heatmap as weights, a free ensemble of neighbouring cells. Strongest first, a candidate whose
    centre lies within ``min_gap`` x the height of a vertebra already taken is a second maximum on that
    vertebra and is passed over (a fixed window cannot tell: vertebrae are 2.5-6 cells apart from T1 to
    L5); the first ``k`` distinct ones (topped up with the passed-over ones if too few) are sorted top
    to bottom.
    """
    out = {name: v.detach().float().cpu() for name, v in out.items()}  # small maps; the rest is indexing
    heat = torch.sigmoid(out["heat"])
    peaks = heat * (F.max_pool2d(heat, window, stride=1, padding=window // 2) == heat)
    b, _, h, w = heat.shape
    index = peaks.reshape(b, -1).topk(min(max(candidates, k), h * w), dim=1).indices  # strongest first
    cell = torch.stack([index % w, index // w], dim=-1)  # (B, n, 2) as x, y
    total = torch.zeros(*index.shape, 5, 2)  # centre + 4 corners, weighted sums
    weight = torch.zeros(*index.shape, 1, 1)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near = cell + torch.tensor([dx, dy])
            inside = ((near >= 0) & (near < torch.tensor([w, h]))).all(-1)
            near = torch.minimum(near.clamp(min=0), torch.tensor([w - 1, h - 1]))
            idx = near[..., 1] * w + near[..., 0]
            centre = near.float() + gather(out["offset"], idx)
            corners = centre[..., None, :] + gather(out["corners"], idx).reshape(*idx.shape, 4, 2)
            wgt = (gather(heat, idx)[..., 0] * inside)[..., None, None]
            total += wgt * torch.cat([centre[..., None, :], corners], dim=-2)
            weight += wgt
    mean = (total / weight.clamp(min=1e-12)).numpy()
    result = []
    for found in mean:
        chosen = found[distinct(found, k, min_gap)]
        result.append(chosen[np.argsort(chosen[:, 0, 1]), 1:] * stride)
    return np.stack(result)


def distinct(found: np.ndarray, k: int, min_gap: float) -> np.ndarray:
    """Indices of ``k`` candidates (rows of (n, 5, 2): centre and corners, strongest first) on distinct
    vertebrae: each kept candidate's centre is at least ``min_gap`` x its height away from every stronger
    kept one; when fewer than ``k`` are that far apart, the strongest passed-over ones fill up."""
    corners = found[:, 1:]
    heights = (
        np.linalg.norm(corners[:, 2] - corners[:, 0], axis=-1)
        + np.linalg.norm(corners[:, 3] - corners[:, 1], axis=-1)
    ) / 2
    kept: list[int] = []
    for i, centre in enumerate(found[:, 0]):
        if len(kept) == k:
            break
        if all(np.linalg.norm(centre - found[j, 0]) >= min_gap * heights[j] for j in kept):
            kept.append(i)
    kept += [i for i in range(len(found)) if i not in kept][: k - len(kept)]
    return np.array(kept)
