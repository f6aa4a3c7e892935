"""Stage 06 on a test set damaged the ways real test folders are, with a trained pipeline's models.

python bench/bad_input.py --config configs/lumbar/demo.yaml [--n-test 24] [--out /tmp/bad_input]

Needs the config's stages 04-05 done (e.g. after `make demo`). Generates ``--n-test`` test studies
(demo sizes), damages one study per kind (spine.core.synth.corrupt: absent study, truncated / empty /
non-DICOM / unknown-syntax files, missing geometry tags, a duplicated slice, another image size, a
MONOCHROME1 series, a one-slice series, an unknown series description, an unreadable study) and runs
stage 06 twice with the same models: on the damaged copy and on a copy where the bad files are simply
absent. Prints, per damaged study, what stage 06 reported and the score of the readable studies in
both runs (they should agree), beside the prior.
"""

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from spine.core.config import REPO_ROOT, load_config
from spine.core.paths import Paths
from spine.core.synth import generate
from spine.core.synth.corrupt import STUDY_KINDS, damage_test_split
from spine.registry import get_task


def stage_06(args: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("predict", REPO_ROOT / "src/06_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bad_input"))
    a = parser.parse_args(argv)
    cfg = load_config(a.config)
    task = get_task(cfg.task)
    models = Paths.from_config(cfg).model_root
    shutil.rmtree(a.out, ignore_errors=True)
    drawn = OmegaConf.to_container(cfg.demo_data, resolve=True)
    kwargs = {k: v for k, v in drawn.items() if k not in ("n_train", "n_test", "seed")}
    generate(cfg.task, a.out / "clean", 2, a.n_test, seed=123, **kwargs)
    runs = {}
    for name, removed in (("damaged", False), ("removed", True)):
        shutil.copytree(a.out / "clean", a.out / name)
        shutil.copytree(a.out / "clean_truth", a.out / f"{name}_truth")
        plan = damage_test_split(task, a.out / name, removed=removed)
        args = ["--config", a.config, f"data_dir={a.out / name}", f"out_dir={a.out / f'out_{name}'}"]
        report = stage_06([*args, f"models_from={models}"])
        runs[name] = (plan, report, pd.read_csv(report["submission"]))
    plan, report, _ = runs["damaged"]
    sol = pd.read_csv(a.out / "clean_truth/test_solution.csv")
    lost = set(plan.loc[plan["kind"].isin(STUDY_KINDS), "study_id"].astype(str))
    readable = sol[[str(task.parse_row_id(r)["study_id"]) not in lost for r in sol["row_id"]]]
    scores = {name: task.score(readable, sub)["score"] for name, (_, _, sub) in runs.items()}
    problems = report["studies_with_problems"]
    print(f"\n{cfg.task}: stage 06 on {a.n_test} test studies, one damaged per kind")
    for row in plan.itertuples():
        print(f"  {row.kind:28s} study {row.study_id}: {json.dumps(problems.get(str(row.study_id), {}))}")
    test = report.get("test", {})
    n_readable = len({task.parse_row_id(r)["study_id"] for r in readable["row_id"]})
    lines = [
        f"  fallback rows (prior): {report['fallback_rows']}, rows from part of their input: "
        f"{report['partial_rows']}",
        f"  {n_readable} readable studies: score with the bad files {scores['damaged']:.4f}, "
        f"with them removed {scores['removed']:.4f}",
    ]
    if test:
        lines.append(
            f"  whole test split: model {test['model']['score']:.4f}, prior {test['prior']['score']:.4f}"
        )
    print("\n".join(lines))
    return {"plan": plan, "report": report, "readable_scores": scores}


if __name__ == "__main__":
    main()
