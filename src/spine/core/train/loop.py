"""The training loop: AdamW, cosine schedule with warmup, gradient accumulation, bf16 autocast on
GPU, optional EMA, DDP under torchrun, validation with best-epoch selection and early stopping,
atomic checkpoints and resume from the last finished epoch.

A model is trained through ``loss_fn(model, batch, device) -> scalar tensor``, so the loop knows
nothing about what a batch holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from spine.core.io import atomic_path
from spine.core.train import dist

log = logging.getLogger(__name__)


def reseed(aug):
    """An albumentations pipeline seeded from torch's generator; call it once per sample.

    albumentations draws from generators of its own, seeded from OS entropy unless told, so two runs
    with the same ``seed`` would train on different augmentations. torch's generator is seeded by
    ``fit`` (main process) and by the DataLoader per worker, so these draws repeat from run to run.
    """
    aug.set_random_seed(int(torch.randint(2**31, ())))
    return aug


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
    select: str = "last"  # which weights to keep: 'last' epoch, or 'best' on the validation score
    patience: int | None = None  # stop after this many epochs without a better validation score

    @classmethod
    def from_config(cls, section, seed: int, **extra) -> TrainSettings:
        """The fields a config section names (``localize``, ``train``), with ``seed`` and ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in section.items() if k in names}, "seed": seed, **extra})


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


def _batch_size(batch) -> int:
    first = next(v for v in batch.values() if torch.is_tensor(v)) if isinstance(batch, dict) else batch[0]
    return len(first)


def train_one_epoch(
    model, loader, loss_fn, optimizer, scheduler, s: TrainSettings, device, ema, desc
) -> dict:
    """One pass over ``loader``. Returns mean loss, samples/s and the share of time spent waiting for data."""
    model.train()
    total, n, samples, wait = 0.0, 0, 0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not dist.is_main())
    optimizer.zero_grad(set_to_none=True)
    start = tick = time.perf_counter()
    for i, batch in enumerate(bar):
        wait += time.perf_counter() - tick
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
                ema.update(dist.unwrap(model))
        total, n, samples = total + loss.item(), n + 1, samples + _batch_size(batch)
        bar.set_postfix(loss=f"{total / n:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that the next wait is data time, not queued GPU work
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": total / max(1, n), "samples_per_s": samples / seconds, "data_wait_share": wait / seconds}


def fit(
    model, loader, loss_fn, s: TrainSettings, checkpoint: Path, device, desc: str = "train", validate=None
):
    """Train ``model`` for ``s.epochs`` and save its weights to ``checkpoint``.

    ``validate(model) -> float`` (lower is better), if given, runs after every epoch on every rank; with
    ``s.select='best'`` the best epoch's weights are kept, and ``s.patience`` stops early. Under torchrun
    the model is wrapped in DDP (the loader should use a DistributedSampler) and only rank 0 writes.
    The state after every epoch goes to ``<checkpoint>.last`` (atomically), so an interrupted run
    resumes from the last finished epoch; it is removed once the final weights are written.
    Returns (the model to predict with — the EMA copy when EMA is on —, the per-epoch history).
    """
    torch.manual_seed(s.seed)
    model.to(device)
    net = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if dist.world_size() > 1
        else model
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / s.accumulate)
    scheduler = cosine_with_warmup(
        optimizer, s.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch)
    )
    ema = EMA(model, s.ema) if s.ema else None
    last = Path(str(checkpoint) + ".last")
    start, history, best = 0, [], {"score": math.inf, "epoch": -1}
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.model.load_state_dict(state["ema"])
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        log.info("resuming %s from epoch %d", checkpoint.name, start)
    for epoch in range(start, s.epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)  # a new shuffle per epoch under DDP
        stats = train_one_epoch(
            net, loader, loss_fn, optimizer, scheduler, s, device, ema, f"{desc} {epoch + 1}/{s.epochs}"
        )
        current = ema.model if ema is not None else model
        if validate is not None:
            stats["val"] = float(validate(current))
            if stats["val"] < best["score"]:
                best = {"score": stats["val"], "epoch": epoch}
                if s.select == "best" and dist.is_main():
                    save_checkpoint(
                        checkpoint.with_suffix(".best"), {"model": current.state_dict(), "epoch": epoch}
                    )
        history.append({"epoch": epoch + 1, **stats})
        log.info("%s epoch %d: %s", desc, epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        if dist.is_main():
            save_checkpoint(
                last,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                    "ema": ema.model.state_dict() if ema else None,
                },
            )
        if s.patience is not None and epoch - best["epoch"] >= s.patience:
            log.info("%s: no better validation score for %d epochs, stopping", desc, s.patience)
            break
    final = ema.model if ema is not None else model
    dist.barrier()
    if s.select == "best" and best["epoch"] >= 0:
        final.load_state_dict(
            torch.load(checkpoint.with_suffix(".best"), map_location=device, weights_only=True)["model"]
        )
    if dist.is_main():
        save_checkpoint(
            checkpoint,
            {
                "model": final.state_dict(),
                "epochs": len(history),
                "history": history,
                "best": best,
                "select": s.select,
            },
        )
        last.unlink(missing_ok=True)
        checkpoint.with_suffix(".best").unlink(missing_ok=True)
    dist.barrier()
    return final.eval(), history


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a checkpoint is never half written.

    Everything is made plain first (tensors, dicts, lists, numbers, strings), so that every checkpoint
    loads with ``torch.load(weights_only=True)``, which runs no code from the file.
    """
    with atomic_path(path) as tmp:
        torch.save(plain(state), tmp)


def plain(obj, where: str = "checkpoint"):
    """``obj`` with numpy scalars and arrays as numbers and tensors and paths as strings; anything else
    not plain is a TypeError naming where it sits (it would not load with weights_only)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return obj
    if isinstance(obj, dict):
        out = type(obj)((k, plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's per-module versions, read by load_state_dict
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"{where} is a {type(obj).__name__}: save a tensor, number, string, list or dict")


def load_weights(model: torch.nn.Module, path: Path, device) -> torch.nn.Module:
    """Load the ``model`` weights of a checkpoint written by ``fit``."""
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model.to(device).eval()
