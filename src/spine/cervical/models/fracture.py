"""Fracture classifiers over the 7 vertebra crops of a study: (B, 7, C, D, H, W) → logits.

A sample is one study: its 7 vertebra crops (C1..C7), each with C HU-window channels, D positions
along the slices and H x W pixels, and a ``found`` mask (a vertebra stage 02 did not find has an air
crop and is left out of every pooling). Every model returns

- ``aux``: (B, 7, K) local fracture scores, at K equal bins along D (trained on the bounding boxes);
- ``vertebra``: (B, 7) fracture logits from each vertebra's best bin (``VertebraHeads``);
- ``overall``: (B,) patient_overall logit, from the 7 vertebra logits.

Two families: ``Seq25d`` (a timm 2D encoder over slabs of consecutive slices, a bidirectional GRU or
LSTM over the slabs) and ``Res3dNet`` (a small residual 3D CNN, blocks from ``models.classifier``).
"""

from __future__ import annotations

import torch
from torch import nn

from spine.core.models.encoder import build_encoder
from spine.core.models.res3d import Res3d

N_VERTEBRAE = 7
PRIOR_LOGIT = -2.0  # vertebra logits start near the label rate (~12 %), so training starts calibrated
MASKED = -1.0e4  # stands in for -inf in masked pooling (no NaN when a study has no vertebra)


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``x`` over ``dim`` where ``mask`` (broadcast to x) is true."""
    return x.masked_fill(~mask, MASKED).amax(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def noisy_or_logit(vertebra: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """logit(1 - prod(1 - p_v)) over the found vertebrae, computed in log space.

    log(1 - p_overall) = -S with S = sum softplus(logit_v); logit = log(e^S - 1) = S + log(1 - e^-S).
    """
    s = (nn.functional.softplus(vertebra.float()) * found).sum(1).clamp_min(1e-6)
    return s + torch.log(-torch.expm1(-s))


class VertebraHeads(nn.Module):
    """Per-vertebra evidence (B, 7) + found mask → vertebra logits (B, 7), patient_overall logit (B,).

    A vertebra's evidence is the max of a local fracture score over its crop, so only what shows in
    one place of one vertebra counts, never how a study looks as a whole (with a few dozen train
    studies a study-level feature overfits at once). vertebra = scale x evidence + a per-vertebra
    bias (C7 breaks more often than C3). ``overall='head'``: a learned scale and offset on the masked
    log-sum-exp of the vertebra logits (a soft "any vertebra", which the prior's contiguous fracture
    blocks make better than independence); ``'noisy_or'``: 1 - prod(1 - p) of the found vertebrae.
    """

    def __init__(self, overall: str = "head"):
        super().__init__()
        if overall not in ("head", "noisy_or"):
            raise ValueError(f"train.overall must be 'head' or 'noisy_or', not {overall!r}")
        self.overall_mode = overall
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.full((N_VERTEBRAE,), PRIOR_LOGIT))
        if overall == "head":
            self.overall_scale = nn.Parameter(torch.ones(1))
            self.overall_offset = nn.Parameter(torch.zeros(1))

    def forward(self, evidence: torch.Tensor, found: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vertebra = self.scale * evidence.float() + self.bias
        if self.overall_mode == "noisy_or":
            return vertebra, noisy_or_logit(vertebra, found)
        lse = torch.logsumexp(vertebra.masked_fill(~found, MASKED), 1)
        return vertebra, self.overall_scale * lse + self.overall_offset


class Seq25d(nn.Module):
    """2.5D: each vertebra crop is cut into ``n_seq`` slabs of D / n_seq consecutive slices; a slab's
    slices x windows are the channels of one image for a timm encoder (its last feature map, max- and
    mean-pooled in-plane); a bidirectional GRU/LSTM reads the slabs in order and scores each slab
    (the aux logits); a vertebra's evidence is its best slab."""

    def __init__(
        self,
        backbone: str,
        n_windows: int,
        depth: int,
        n_seq: int,
        overall: str = "head",
        sequence: str = "gru",
        checkpoint: str | None = None,
        hidden: int = 128,
    ):
        super().__init__()
        if depth % n_seq:
            raise ValueError(f"crop.depth ({depth}) must be a multiple of train.n_seq ({n_seq})")
        if sequence not in ("gru", "lstm"):
            raise ValueError(f"train.sequence must be 'gru' or 'lstm', not {sequence!r}")
        self.n_seq, self.slab = n_seq, depth // n_seq
        in_chans = n_windows * self.slab
        self.encoder = build_encoder(backbone, in_chans, checkpoint, features_only=True)
        width = self.encoder.feature_info.channels()[-1]
        self.proj = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU())  # a small sequence head
        rnn = nn.GRU if sequence == "gru" else nn.LSTM
        self.rnn = rnn(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.score = nn.Linear(2 * (hidden // 2), 1)
        self.heads = VertebraHeads(overall)

    def forward(self, x: torch.Tensor, found: torch.Tensor):
        b, v, c, d, h, w = x.shape
        n = b * v
        slabs = x.reshape(n, c, self.n_seq, self.slab, h, w).transpose(1, 2)
        fm = self.encoder(slabs.reshape(n * self.n_seq, c * self.slab, h, w))[-1]
        f = torch.cat([fm.amax((2, 3)), fm.mean((2, 3))], 1).view(n, self.n_seq, -1)
        aux = self.score(self.rnn(self.proj(f))[0]).view(b, v, self.n_seq)
        vertebra, overall = self.heads(aux.amax(2), found)
        return vertebra, overall, aux


class Res3dNet(nn.Module):
    """3D: a full-resolution stem, three residual stages (in-plane stride first, then all axes) and a
    1x1x1 convolution to a local fracture score; its in-plane max per depth bin is the aux logit, its
    overall max the vertebra's evidence."""

    def __init__(self, n_windows: int, width: int = 16, overall: str = "head"):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.net = nn.Sequential(
            nn.Conv3d(n_windows, w[0], 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(w[0]),
            nn.ReLU(inplace=True),
            Res3d(w[0], w[1], (1, 2, 2)),
            Res3d(w[1], w[2], 2),
            Res3d(w[2], w[3], 2),
            nn.Conv3d(w[3], 1, 1),
        )
        self.heads = VertebraHeads(overall)

    def forward(self, x: torch.Tensor, found: torch.Tensor):
        b, v = x.shape[:2]
        local = self.net(x.flatten(0, 1))[:, 0]  # (n, d, h, w)
        aux = local.amax((2, 3)).view(b, v, -1)
        vertebra, overall = self.heads(aux.amax(2), found)
        return vertebra, overall, aux


MODELS = ("seq25d", "res3d")


def build_fracture_model(tc, depth: int) -> nn.Module:
    """The model named by ``train.model`` (seq25d | res3d) of a cervical config."""
    n_windows = len(tc.windows)
    if tc.model == "seq25d":
        return Seq25d(tc.backbone, n_windows, depth, tc.n_seq, tc.overall, tc.sequence, tc.checkpoint)
    if tc.model == "res3d":
        return Res3dNet(n_windows, tc.width_3d, tc.overall)
    raise ValueError(f"unknown train.model {tc.model!r} for cervical: choose one of {MODELS}")
