"""Backbones by name: timm encoders, built without downloading weights."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


def build_encoder(
    name: str, in_chans: int, checkpoint: str | None = None, features_only: bool = True
) -> nn.Module:
    """A timm encoder, never downloading weights: ``checkpoint`` is a local file or None.

    ``features_only``: a list of feature maps; otherwise pooled features (``num_classes=0``).
    """
    kwargs = {"features_only": True} if features_only else {"num_classes": 0}
    encoder = timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)
    if checkpoint:
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
        state = state.get("state_dict", state.get("model", state))
        missing, _ = encoder.load_state_dict(state, strict=False)
        if len(missing) == len(encoder.state_dict()):
            raise ValueError(f"{checkpoint}: no weight matches backbone {name}")
    return encoder
