"""Peak memory of stage 01 on one full-size CT study, beside the size of the volume it caches.

python bench/preprocess_memory.py [--slices 600] [--size 512] [--data DIR] [--keep]

Generates one cervical study of ``--slices`` axial slices of ``--size``² pixels (or takes --data, a
Kaggle-layout folder), then runs stage 01 on it in a fresh subprocess with one worker and reads that
process's peak resident set size (``VmHWM`` from /proc: ``ru_maxrss`` would carry over the peak of
the generating parent across fork and exec). A second subprocess that
only imports the same modules and loads the config gives the baseline, so the difference is what
decoding and caching the study cost. The cached volume's size in bytes is printed beside both.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spine.core.config import REPO_ROOT
from spine.core.synth import generate

# Runs in the child: stage 01 (or only its imports and config), then the peak RSS in bytes on stdout.
CHILD = """
import json, resource, sys
from pathlib import Path
from spine.core.config import load_config
from spine.core.preprocess import run_preprocess
cfg = load_config(sys.argv[1], sys.argv[3:])
summary = run_preprocess(cfg) if sys.argv[2] == "run" else {}
# VmHWM is this process's own high-water mark; ru_maxrss would carry over the parent's across exec
status = Path("/proc/self/status").read_text().splitlines()
hwm = next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM"))
peak = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"peak_rss": peak * 1024, "summary": summary}))
"""


def child(mode: str, overrides: list[str]) -> dict:
    """Run CHILD in a fresh interpreter; returns its peak RSS (bytes) and the stage summary."""
    config = str(REPO_ROOT / "configs/cervical/demo.yaml")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, config, mode, *overrides], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--data", help="a cervical Kaggle-layout folder (default: generate one study)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        t0 = time.perf_counter()
        generate("cervical", data, 1, 0, seed=3, image_size=args.size, n_slices=args.slices)
        print(f"generated 1 study ({args.slices} x {args.size}^2) in {time.perf_counter() - t0:.0f} s")
    over = [f"data_dir={data}", f"out_dir={tmp / 'out'}", "num_workers=1", "preprocess.splits=[train]"]
    base = child("import", over)
    t0 = time.perf_counter()
    run = child("run", over)
    seconds = time.perf_counter() - t0
    cache = tmp / "out" / "cache" / "cervical"
    volumes = list(cache.rglob("*.npy"))
    shapes = [np.load(v, mmap_mode="r").shape for v in volumes]
    vol_bytes = sum(v.stat().st_size for v in volumes)
    mib = 2**20
    print(
        f"\nstage 01 on {len(volumes)} volume(s) {shapes}, {run['summary']['images']} images, {seconds:.1f} s"
    )
    print("| measure | MiB | x volume |\n|---|---|---|")
    for name, value in (
        ("cached volume (.npy)", vol_bytes),
        ("peak RSS, stage 01 process", run["peak_rss"]),
        ("peak RSS, imports + config only", base["peak_rss"]),
        ("stage 01 increment (peak - baseline)", run["peak_rss"] - base["peak_rss"]),
    ):
        print(f"| {name} | {value / mib:.0f} | {value / vol_bytes:.2f} |")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
