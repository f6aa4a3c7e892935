"""Stage 01 against a plain single-process loop over the same files, measured in one run.

python bench/preprocess.py [--task lumbar] [--n-train 40] [--repeats 2]
python bench/preprocess.py --mr-files 8000 [--size 320] [--repeats 2]

Generates a data set in a temporary folder (or takes --data DIR), warms the page cache, then
alternates the two contenders and keeps each one's best time. The plain loop is what a first
notebook does: ``pydicom.dcmread(f).pixel_array`` per file, then ``np.stack`` per series.

``--mr-files N`` skips the task's generator and writes N lumbar-layout MR files the way scanners do
(BitsAllocated 16, BitsStored 12), in series of 15-20 slices: 80 % explicit VR, 10 % implicit VR and
10 % RLE series. ``--profile`` runs stage 01 once more in one process under cProfile and prints
where the time goes. ``--tmp /dev/shm`` keeps the cache in memory, to tell decoding from disk speed.
"""

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from spine.core.config import REPO_ROOT, load_config
from spine.core.preprocess import list_jobs, run_preprocess
from spine.core.synth import generate
from spine.core.synth.dicom_writer import write_slice


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


def write_mr_set(data: Path, n_files: int, size: int, seed: int = 0) -> None:
    """``n_files`` 12-bit MR slices in the lumbar layout: smooth anatomy-like images plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    rows, written, series_id = [], 0, 1000
    while written < n_files:
        study_id, n = 1 + len(rows) // 3, int(min(rng.integers(15, 21), n_files - written))
        syntax = rng.choice(["explicit", "implicit", "rle"], p=[0.8, 0.1, 0.1])
        description = ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"][len(rows) % 3]
        base = 1500 + 1000 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy)
        for k in range(n):
            img = base + rng.normal(0, 60, base.shape)
            write_slice(
                data / "train_images" / str(study_id) / str(series_id) / f"{k + 1}.dcm",
                np.clip(img, 0, 4095).astype(np.uint16),
                ipp=[4.0 * k - 30, -100, 100],
                iop=[0, 1, 0, 0, 0, -1],
                spacing=[0.6, 0.6],
                thickness=3.5,
                instance_number=k + 1,
                study_uid=f"1.2.{study_id}",
                series_uid=f"1.2.{study_id}.{series_id}",
                series_number=len(rows) % 3 + 1,
                series_description=description,
                syntax=str(syntax),
            )
        rows.append((study_id, series_id, description))
        written, series_id = written + n, series_id + 1
    cols = ["study_id", "series_id", "series_description"]
    pd.DataFrame(rows, columns=cols).to_csv(data / "train_series_descriptions.csv", index=False)
    pd.DataFrame(columns=cols).to_csv(data / "test_series_descriptions.csv", index=False)


def profile_stage(cfg_path: Path, data: Path, out: Path, top: int = 25) -> None:
    """Stage 01 in this process (one worker) under cProfile: cumulative time of its top functions."""
    cfg = load_config(cfg_path, [f"data_dir={data}", f"out_dir={out}", "num_workers=1"])
    prof = cProfile.Profile()
    prof.runcall(run_preprocess, cfg)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="lumbar", choices=["lumbar", "cervical"])
    parser.add_argument("--data", help="a Kaggle-layout folder (default: generate one)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--mr-files", type=int, help="write this many 12-bit MR files instead (lumbar)")
    parser.add_argument("--size", type=int, default=320, help="image size of --mr-files")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile stage 01 in one process")
    parser.add_argument("--tmp", help="folder for the data and stage 01's cache (default: the system's temp)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pre_", dir=args.tmp))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # GBs of generated files and caches


def run(args, tmp: Path) -> None:
    """Generate (or take) the data, time both contenders, print the table."""
    data = Path(args.data) if args.data else tmp / "data"
    task = "lumbar" if args.mr_files else args.task
    if args.mr_files and not args.data:
        write_mr_set(data, args.mr_files, args.size)
    elif not args.data:
        generate(task, data, args.n_train, 4, seed=1)
    jobs = list_jobs(task, data, ["train", "test"])
    folders = [Path(j.folder) for j in jobs if Path(j.folder).is_dir()]
    files = [f for d in folders for f in d.glob("*.dcm")]
    for f in files:  # warm the page cache so neither contender pays for the first disk read
        f.read_bytes()

    cfg_path = REPO_ROOT / f"configs/{task}/demo.yaml"
    best = {"plain loop (1 process)": np.inf, "stage 01": np.inf}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        n_plain = plain_loop(folders)
        best["plain loop (1 process)"] = min(best["plain loop (1 process)"], time.perf_counter() - t0)
        cfg = load_config(cfg_path, [f"data_dir={data}", f"out_dir={tmp / f'out{r}'}"])
        t0 = time.perf_counter()
        summary = run_preprocess(cfg)
        best["stage 01"] = min(best["stage 01"], time.perf_counter() - t0)
        shutil.rmtree(tmp / f"out{r}")  # keep one cache at a time (disk, or memory under --tmp /dev/shm)
    if args.profile:
        profile_stage(cfg_path, data, tmp / "out_profile")

    print(
        f"\n{task}: {len(folders)} series, {len(files)} files ({n_plain} readable), "
        f"{os.cpu_count()} cores, best of {args.repeats}"
    )
    print("| contender | seconds | images/s |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {n_plain / s:.0f} |")
    print(f"| ratio (plain / stage 01) | {best['plain loop (1 process)'] / best['stage 01']:.2f}x | |")
    assert summary["images"] == n_plain, "stage 01 and the loop must read the same images"


if __name__ == "__main__":
    main()
