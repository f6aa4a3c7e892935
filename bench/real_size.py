"""Real image sizes through stages 01 -> 06 with each task's ``base.yaml``, on this machine's CPU:
seconds and peak memory of every stage (docs/BENCHMARKS.md, "Real sizes").

python bench/real_size.py [--task lumbar --task cervical] [--out /tmp/real_size] [--keep]

Per task, 3 training studies and 1 test study are generated at real sizes (lumbar: sagittal 512² x
15-17 slices, axial 384²; cervical: 512² slices 0.625 mm apart). With 3 folds (the fewest stage
05's nested CV takes) every model trains on 2 studies for 1 epoch — a step or two per fold — so the
figures are what a stage costs per study at real size, not what training to convergence costs. Each
stage runs as a fresh process; its peak memory is the larger of its own high-water mark (VmHWM) and
that of its largest worker process.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("01_preprocess", "02_localize", "03_crop", "04_train", "05_ensemble", "06_predict")
# generate() keyword arguments that give real sizes, per task.
REAL_SIZES = {
    "lumbar": {"image_size": 512},
    "cervical": {  # ~600 slices: C1..C7 (~125 mm) plus 60 mm above and ~190 mm below
        "image_size": 512,
        "slice_spacing_mm": [0.625, 0.625],
        "above_c1_mm": [60.0, 60.0],
        "below_c7_mm": [190.0, 190.0],
    },
}
# One optimizer step per model and fold: 3 folds of 3 training studies, one epoch, one batch.
ONE_STEP = {
    "lumbar": ["localize.epochs=1", "localize.batch_studies=1", "train.epochs=1", "train.batch_size=25"],
    "cervical": ["segment.epochs=1", "segment.batch=1", "train.epochs=1", "train.batch_size=1"],
}

GENERATE = """
import json, sys
from spine.core.synth import generate
print(json.dumps(generate(sys.argv[1], sys.argv[2], 3, 1, seed=11, **json.loads(sys.argv[3])), default=str))
"""
# Runs one stage script's main() in this fresh process, then prints the peak memory as JSON.
STAGE = """
import json, resource, runpy, sys
from pathlib import Path
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
status = Path("/proc/self/status").read_text().splitlines()
own = next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("PEAK_KB " + json.dumps({"own": own, "workers": workers}))
"""


def run_stage(stage: str, args: list[str], log: Path) -> dict:
    """One stage in a fresh process: seconds and peak memory (MB); its output goes to ``log``."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", STAGE, str(REPO_ROOT / "src" / f"{stage}.py"), *args]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd[3:])}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True, cwd=REPO_ROOT)
        out.write(done.stdout)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{stage} failed (exit {done.returncode}); see {log}")
    peak = json.loads(done.stdout.rsplit("PEAK_KB ", 1)[1])
    return {"seconds": round(seconds, 1), "peak_mb": round(max(peak.values()) / 1024, 1)}


def run_task(task: str, out: Path) -> dict:
    """Generate the real-size set of ``task`` and run stages 01 -> 06 on it."""
    data, work = out / task / "data", out / task / "out"
    log = out / f"{task}.log"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", GENERATE, task, str(data), json.dumps(REAL_SIZES[task])],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    result = {"generate_seconds": round(time.perf_counter() - t0, 1), "stages": {}}
    config = f"configs/{task}/base.yaml"
    args = ["--config", config, f"data_dir={data}", f"out_dir={work}", "folds.n_folds=3", *ONE_STEP[task]]
    for stage in STAGES:
        result["stages"][stage] = run_stage(stage, args, log)
        print(f"{task} {stage}: {result['stages'][stage]}", flush=True)
    return result


def table(results: dict) -> str:
    """Markdown: one row per stage, seconds and peak MB per task."""
    tasks = list(results)
    head = "| stage | " + " | ".join(f"{t} s | {t} peak MB" for t in tasks) + " |"
    rule = "|---|" + "---:|---:|" * len(tasks)
    rows = [
        f"| {stage} | "
        + " | ".join(
            f"{results[t]['stages'][stage]['seconds']} | {results[t]['stages'][stage]['peak_mb']}"
            for t in tasks
        )
        + " |"
        for stage in STAGES
    ]
    return "\n".join([head, rule, *rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", action="append", choices=sorted(REAL_SIZES), help="default: every task")
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_size"))
    parser.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    a = parser.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    results = {t: run_task(t, a.out) for t in a.task or sorted(REAL_SIZES)}
    (a.out / "real_size.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if not a.keep:
        for t in results:
            shutil.rmtree(a.out / t)
    return results


if __name__ == "__main__":
    main()
