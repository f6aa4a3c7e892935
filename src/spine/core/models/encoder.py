"""Backbones by name: timm encoders, never downloading weights.

Pretrained weights come from a local file only: a ``.safetensors`` or ``.pth``/``.bin`` state dict of the
3-channel ImageNet model in timm's key layout (as timm's own weight files are), bare or wrapped as
``{"state_dict": ...}`` / ``{"model": ...}``. timm itself loads it (``pretrained_cfg_overlay=dict(file=...)``
makes timm read that file and nothing else) and adapts the stem to any number of input channels with
``adapt_input_conv``: summed for one channel, repeated and rescaled by 3 / in_chans otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from torch import nn

log = logging.getLogger(__name__)


def build_encoder(
    name: str, in_chans: int, checkpoint: str | None = None, features_only: bool = True
) -> nn.Module:
    """A timm encoder with ``in_chans`` input channels, never downloading weights.

    ``checkpoint``: a local weights file of the 3-channel model (see the module docstring) or None for
    random init. A file that does not fit the backbone is a ValueError naming the file and the first
    mismatched key. ``features_only``: a list of feature maps; otherwise pooled features (``num_classes=0``).
    """
    kwargs = {"features_only": True} if features_only else {"num_classes": 0}
    if not checkpoint:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)
    path = Path(checkpoint)
    check_checkpoint(name, path)
    encoder = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=in_chans, **kwargs
    )
    log.info("%s: weights from %s, stem adapted to %d input channels", name, path, in_chans)
    return encoder


def read_checkpoint(path: Path) -> dict:
    """The state dict of a local weights file, read the way timm reads it (safetensors, or torch.load
    with ``weights_only=True``; wrappers ``state_dict`` / ``model`` unwrapped, DDP prefixes removed)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: backbone weights file not found; set `checkpoint` in the config to a local "
            "timm weights file (.safetensors, .pth, .bin) or to null for random init"
        )
    try:
        return load_state_dict(str(path))
    except Exception as e:  # unpickling refused, corrupt safetensors, ...: all mean the same to the user
        raise ValueError(
            f"{path}: not a plain weights file ({type(e).__name__}: {str(e).splitlines()[0]}); save "
            "model.state_dict() with torch.save or safetensors.torch.save_file"
        ) from e


def check_checkpoint(name: str, path: Path) -> None:
    """Raise a ValueError naming ``path`` and the first key that does not fit the 3-channel ``name``.

    Every weight of the model except its classifier (which a feature encoder drops) must be in the file
    with the model's shape. Extra keys in the file are logged and counted, not loaded.
    """
    state = read_checkpoint(path)
    with torch.device("meta"):  # shapes only: no memory, no init time
        reference = timm.create_model(name, pretrained=False)
    head = reference.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in head)

    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not is_head(k)}
    for key, shape in expected.items():
        found = tuple(state[key].shape) if torch.is_tensor(state.get(key)) else None
        if found != shape:
            raise ValueError(
                f"{path} does not fit backbone {name}: first mismatched key {key!r}, expected shape "
                f"{shape}, file {'has no such key' if found is None else f'shape {found}'} "
                "(a timm state dict of the 3-channel model of that name is needed)"
            )
    extra = [k for k in state if k not in expected and not is_head(k)]
    if extra:
        log.warning(
            "%s: %d keys that %s does not have are ignored, e.g. %s", path, len(extra), name, extra[0]
        )
