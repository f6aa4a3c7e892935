"""The training loop: AdamW, cosine schedule with warmup, gradient accumulation, bf16 autocast on
GPU, optional EMA, atomic checkpoints and resume from the last finished epoch.

A model is trained through ``loss_fn(model, batch, device) -> scalar tensor``, so the loop knows
nothing about what a batch holds.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    accumulate: int = 1  # batches per optimizer step
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    ema: float | None = None  # EMA decay per optimizer step, e.g. 0.99
    grad_clip: float | None = None
    seed: int = 42


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    return torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU autocast is slower than fp32 here)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EMA:
    """Exponential moving average of a model's weights (a frozen copy used for prediction)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            else:
                e.copy_(p)


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup to the base LR, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model, loader, loss_fn, optimizer, scheduler, s: TrainSettings, device, ema, desc
) -> float:
    """One pass over ``loader``; returns the mean loss."""
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        with autocast(device, s.amp):
            loss = loss_fn(model, batch, device)
        (loss / s.accumulate).backward()
        if (i + 1) % s.accumulate == 0 or i + 1 == len(loader):
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
        total, n = total + loss.item(), n + 1
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(1, n)


def fit(model, loader, loss_fn, s: TrainSettings, checkpoint: Path, device, desc: str = "train"):
    """Train ``model`` for ``s.epochs`` and save its final (or EMA) weights to ``checkpoint``.

    The state after every epoch goes to ``<checkpoint>.last`` (atomically), so an interrupted run
    resumes from the last finished epoch; it is removed once the final weights are written.
    Returns the model to predict with (the EMA copy when EMA is on).
    """
    torch.manual_seed(s.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / s.accumulate)
    scheduler = cosine_with_warmup(
        optimizer, s.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch)
    )
    ema = EMA(model, s.ema) if s.ema else None
    last = Path(str(checkpoint) + ".last")
    start = 0
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.model.load_state_dict(state["ema"])
        start = state["epoch"] + 1
        log.info("resuming %s from epoch %d", checkpoint.name, start)
    for epoch in range(start, s.epochs):
        loss = train_one_epoch(
            model, loader, loss_fn, optimizer, scheduler, s, device, ema, f"{desc} {epoch + 1}/{s.epochs}"
        )
        log.debug("%s epoch %d loss %.4f", desc, epoch + 1, loss)
        save_checkpoint(
            last,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "loss": loss,
                "ema": ema.model.state_dict() if ema else None,
            },
        )
    final = ema.model if ema is not None else model
    save_checkpoint(checkpoint, {"model": final.state_dict(), "epochs": s.epochs})
    last.unlink(missing_ok=True)
    return final.eval()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a checkpoint is never half written."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_weights(model: torch.nn.Module, path: Path, device) -> torch.nn.Module:
    """Load the ``model`` weights of a checkpoint written by ``fit``."""
    model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"])
    return model.to(device).eval()
