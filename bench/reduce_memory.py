"""Stage 02's reduction to the stack (cervical): peak memory of the relabelling in anatomical order
(``order_components``) and of the per-slice / per-vertebra figures with the mask overlap (``_gather``)
on one full-size labelled stack, each in a fresh process.

python bench/reduce_memory.py [--slices 1000] [--size 512]

The stack holds C1..C7 and a thoracic vertebra as blocks down the slices, with a few stray voxels, and
a truth mask that differs from it; a step's figure is its process's high-water mark (``ru_maxrss``)
above what the inputs took, and its seconds.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def stack(slices: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidence, truth) uint8 stacks of ``slices`` x ``size``²."""
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    step = slices // 9
    lo, hi = size * 2 // 5, size * 3 // 5
    for v in range(1, 9):
        labels[step * v : step * v + step * 4 // 5, lo:hi, lo:hi] = v
    rng = np.random.default_rng(0)
    labels[rng.integers(0, slices, 200), rng.integers(0, size, 200), rng.integers(0, size, 200)] = 5
    truth = labels.copy()
    truth[:, lo : lo + 8] = 0
    return labels, np.full_like(labels, 200), truth


def run_step(step: str, slices: int, size: int) -> dict:
    """One step in this process: its peak above the inputs (MB) and seconds."""
    from spine.cervical import segment

    labels, conf, truth = stack(slices, size)
    z = -np.arange(slices, dtype=np.float64)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if step == "order_components":
        segment.order_components(labels, z, head=1)
    else:
        field = segment.Field(z, z, z, z, z, z, (size // 2, size // 2))
        segment._gather(labels, conf, field, truth)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"step": step, "peak_above_inputs_mb": round(peak), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process's one step
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, args.slices, args.size)))
        return
    for step in ("order_components", "_gather"):
        cmd = [
            sys.executable,
            __file__,
            "--step",
            step,
            "--slices",
            str(args.slices),
            "--size",
            str(args.size),
        ]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        peak, seconds = out["peak_above_inputs_mb"], out["seconds"]
        print(f"{step:<18} {args.slices} x {args.size}²: peak above inputs {peak:,} MB, {seconds} s")


if __name__ == "__main__":
    main()
