"""Stage 01 against a plain single-process loop over the same files, measured in one run.

python bench/preprocess.py [--task lumbar] [--n-train 40] [--repeats 2]

Generates a demo data set in a temporary folder (or takes --data DIR), warms the page cache, then
alternates the two contenders and keeps each one's best time. The plain loop is what a first
notebook does: ``pydicom.dcmread(f).pixel_array`` per file, then ``np.stack`` per series.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from spine.core.config import REPO_ROOT, load_config
from spine.core.preprocess import list_jobs, run_preprocess
from spine.core.synth import generate


def plain_loop(folders: list[Path]) -> int:
    n = 0
    for folder in folders:
        arrays = []
        for f in sorted(folder.glob("*.dcm")):
            try:
                arrays.append(pydicom.dcmread(f).pixel_array)
            except Exception:  # the corrupt file: a plain loop has to survive it too
                continue
        shapes = {a.shape for a in arrays}
        for shape in shapes:
            np.stack([a for a in arrays if a.shape == shape])
        n += len(arrays)
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="lumbar", choices=["lumbar", "cervical"])
    parser.add_argument("--data", help="a Kaggle-layout folder (default: generate one)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        generate(args.task, data, args.n_train, 4, seed=1)
    jobs = list_jobs(args.task, data, ["train", "test"])
    folders = [Path(j.folder) for j in jobs if Path(j.folder).is_dir()]
    files = [f for d in folders for f in d.glob("*.dcm")]
    for f in files:  # warm the page cache so neither contender pays for the first disk read
        f.read_bytes()

    best = {"plain loop (1 process)": np.inf, "stage 01": np.inf}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        n_plain = plain_loop(folders)
        best["plain loop (1 process)"] = min(best["plain loop (1 process)"], time.perf_counter() - t0)
        cfg = load_config(
            REPO_ROOT / f"configs/{args.task}/demo.yaml", [f"data_dir={data}", f"out_dir={tmp / f'out{r}'}"]
        )
        t0 = time.perf_counter()
        summary = run_preprocess(cfg)
        best["stage 01"] = min(best["stage 01"], time.perf_counter() - t0)

    print(
        f"\n{args.task}: {len(folders)} series, {len(files)} files ({n_plain} readable), "
        f"{os.cpu_count()} cores, best of {args.repeats}"
    )
    print("| contender | seconds | images/s |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {n_plain / s:.0f} |")
    print(f"| ratio (plain / stage 01) | {best['plain loop (1 process)'] / best['stage 01']:.2f}x | |")
    assert summary["images"] == n_plain, "stage 01 and the loop must read the same images"


if __name__ == "__main__":
    main()
