"""Severity classifiers over crop stacks: one row = views (sagittal, axial) × slices × pixels², plus a
per-view ``present`` mask (False where the row's crop of that view could not be made).

- ``Cnn25d``: a timm 2D encoder. ``slice_mode='channels'``: a view's slices are the channels of one
  image; ``'sequence'``: every slice goes through the encoder alone and a bi-GRU reads the slices.
- ``Cnn3d``: a small ResNet3D-style network over one view's (slices, pixels, pixels), striding in-plane
  only, since crops have few slices.

Both encode each present view alone with shared weights (a missing view is never encoded, so its
zero-filled crop touches neither the features nor the BatchNorm statistics), fuse the views late
(``ViewFusion``: a view-specific projection, a masked mean over the present views, and the mask
itself), add a learned embedding of the row's condition and level, and end in one 3-grade head (and one
auxiliary binary head) per condition group; a row uses the heads of its group. A row with only its
sagittal crop is thus predicted from it, not dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from spine.core.models.encoder import build_encoder
from spine.core.models.res3d import Res3d

# A buffer every classifier holds, so a checkpoint of the classifiers before the present mask (views
# concatenated, or stacked as 3D channels) is told apart from a mismatched config when it is loaded.
MASK_VERSION_KEY = "view_mask_version"


class RowHeads(nn.Module):
    """Features + (condition, level) embedding → the row group's grade logits (B, 3) and binary logit (B,)."""

    def __init__(self, in_features: int, n_groups: int, n_conditions: int, n_levels: int, emb: int = 16):
        super().__init__()
        self.condition = nn.Embedding(n_conditions, emb)
        self.level = nn.Embedding(n_levels, emb)
        self.mix = nn.Sequential(nn.Linear(in_features + 2 * emb, 256), nn.GELU(), nn.Dropout(0.2))
        self.grade = nn.Linear(256, 3 * n_groups)
        self.binary = nn.Linear(256, n_groups)

    def forward(self, feats, condition, level, group):
        h = self.mix(torch.cat([feats, self.condition(condition), self.level(level)], 1))
        b = torch.arange(len(h), device=h.device)
        grade = self.grade(h).view(len(h), -1, 3)[b, group]
        return grade, self.binary(h)[b, group]


class ViewFusion(nn.Module):
    """Per-view features (B, V, W) and the present mask (B, V) → (B, dim + V).

    Each view has its own projection, so the fused vector still knows which view said what (with every
    view present this is a linear map of the concatenated features); the mean runs over the present
    views only, and the mask is appended so the heads can tell a one-view row from a full one.
    """

    def __init__(self, n_views: int, width: int, dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, dim) for _ in range(n_views))
        self.out_features = dim + n_views

    def forward(self, feats, present):
        h = torch.stack([p(feats[:, i]) for i, p in enumerate(self.proj)], 1)
        m = present.to(h.dtype).unsqueeze(-1)
        fused = (h * m).sum(1) / m.sum(1).clamp(min=1)  # a row with no view: zeros (callers skip those)
        return torch.cat([fused, present.to(h.dtype)], 1)


class MaskedViews(nn.Module):
    """Base of the classifiers: encode the present views, fuse them, apply the row heads.

    Subclasses set ``self.width`` and implement ``encode((N, S, P, P)) -> (N, width)``.
    """

    def _setup(self, n_views: int, heads: dict) -> None:
        self.fusion = ViewFusion(n_views, self.width, self.width)
        self.heads = RowHeads(self.fusion.out_features, **heads)
        self.register_buffer(MASK_VERSION_KEY, torch.tensor(1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, present, condition, level, group):
        """x (B, V, S, P, P), present (B, V) bool → grade logits (B, 3), binary logit (B,)."""
        b, v = x.shape[:2]
        keep = present.reshape(-1).bool()
        flat = x.reshape(b * v, *x.shape[2:])
        if keep.any():
            out = self.encode(flat[keep])
            feats = out.new_zeros(b * v, out.shape[1]).index_put((keep.nonzero()[:, 0],), out)
        else:  # no view anywhere in the batch: nothing to encode
            feats = flat.new_zeros(b * v, self.width)
        return self.heads(self.fusion(feats.view(b, v, -1), present), condition, level, group)


class Cnn25d(MaskedViews):
    def __init__(
        self,
        backbone: str,
        n_views: int,
        n_slices: int,
        heads: dict,
        slice_mode: str = "channels",
        checkpoint: str | None = None,
    ):
        super().__init__()
        if slice_mode not in ("channels", "sequence"):
            raise ValueError(f"slice_mode must be 'channels' or 'sequence', not {slice_mode!r}")
        self.slice_mode = slice_mode
        in_chans = n_slices if slice_mode == "channels" else 1
        self.encoder = build_encoder(backbone, in_chans, checkpoint, features_only=False)
        with torch.no_grad():  # pooled width (some timm models add a head conv after num_features)
            self.width = self.encoder(torch.zeros(1, in_chans, 64, 64)).shape[1]
        if slice_mode == "sequence":
            self.gru = nn.GRU(self.width, self.width // 2, batch_first=True, bidirectional=True)
        self._setup(n_views, heads)

    def encode(self, x):
        n, s, h, w = x.shape
        if self.slice_mode == "channels":
            return self.encoder(x).view(n, -1)
        f = self.encoder(x.reshape(n * s, 1, h, w)).view(n, s, -1)
        return self.gru(f)[0].mean(1)


class Cnn3d(MaskedViews):
    def __init__(self, n_views: int, heads: dict, width: int = 32):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.net = nn.Sequential(
            nn.Conv3d(1, w[0], (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
            nn.BatchNorm3d(w[0]),
            nn.ReLU(inplace=True),
            Res3d(w[0], w[1], (1, 2, 2)),
            Res3d(w[1], w[2], (1, 2, 2)),
            Res3d(w[2], w[3], (2, 2, 2)),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.width = w[3]
        self._setup(n_views, heads)

    def encode(self, x):
        return self.net(x.unsqueeze(1))


def build_classifier(tc, n_views: int, n_slices: int, heads: dict) -> nn.Module:
    """The model named by ``train.model`` in a config."""
    if tc.model == "cnn25d":
        return Cnn25d(tc.backbone, n_views, n_slices, heads, tc.slice_mode, tc.checkpoint)
    if tc.model == "cnn3d":
        return Cnn3d(n_views, heads, tc.width_3d)
    raise ValueError(f"unknown train.model {tc.model!r}: choose cnn25d or cnn3d")
