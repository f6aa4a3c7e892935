"""DistributedDataParallel plumbing: one process per GPU under torchrun, or a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPU; each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank(), world


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def device_for_rank(name: str) -> torch.device:
    """The device of this rank: its own GPU under DDP, else ``name`` ('auto' → CUDA if available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (a one-item list without DDP)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
