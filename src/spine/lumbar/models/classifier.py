"""Severity classifiers over crop stacks: one row = views (sagittal, axial) × slices × pixels².

- ``Cnn25d``: a timm 2D encoder. ``slice_mode='channels'``: a view's slices are the channels of one
  image; ``'sequence'``: every slice goes through the encoder alone and a bi-GRU reads the slices.
- ``Cnn3d``: a small ResNet3D-style network over (views as channels, slices, pixels, pixels), striding
  in-plane only, since crops have few slices.
Both fuse the views late (per-view features, concatenated), add a learned embedding of the row's
condition and level, and end in one 3-grade head (and one auxiliary binary head) per condition group;
a row uses the heads of its group.
"""

from __future__ import annotations

import torch
from torch import nn

from spine.core.models.encoder import build_encoder
from spine.core.models.res3d import Res3d


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


class Cnn25d(nn.Module):
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
            width = self.encoder(torch.zeros(1, in_chans, 64, 64)).shape[1]
        if slice_mode == "sequence":
            self.gru = nn.GRU(width, width // 2, batch_first=True, bidirectional=True)
        self.heads = RowHeads(width * n_views, **heads)

    def forward(self, x, condition, level, group):
        b, v, s, h, w = x.shape
        if self.slice_mode == "channels":
            feats = self.encoder(x.reshape(b * v, s, h, w)).view(b, -1)
        else:
            f = self.encoder(x.reshape(b * v * s, 1, h, w)).view(b * v, s, -1)
            feats = self.gru(f)[0].mean(1).view(b, -1)
        return self.heads(feats, condition, level, group)


class Cnn3d(nn.Module):
    def __init__(self, n_views: int, heads: dict, width: int = 32):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.net = nn.Sequential(
            nn.Conv3d(n_views, w[0], (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
            nn.BatchNorm3d(w[0]),
            nn.ReLU(inplace=True),
            Res3d(w[0], w[1], (1, 2, 2)),
            Res3d(w[1], w[2], (1, 2, 2)),
            Res3d(w[2], w[3], (2, 2, 2)),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.heads = RowHeads(w[3], **heads)

    def forward(self, x, condition, level, group):
        return self.heads(self.net(x), condition, level, group)


def build_classifier(tc, n_views: int, n_slices: int, heads: dict) -> nn.Module:
    """The model named by ``train.model`` in a config."""
    if tc.model == "cnn25d":
        return Cnn25d(tc.backbone, n_views, n_slices, heads, tc.slice_mode, tc.checkpoint)
    if tc.model == "cnn3d":
        return Cnn3d(n_views, heads, tc.width_3d)
    raise ValueError(f"unknown train.model {tc.model!r}: choose cnn25d or cnn3d")
