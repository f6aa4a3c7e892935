"""Score a submission against a solution with a task's official metric.

python src/score.py --task lumbar SOLUTION.csv SUBMISSION.csv

Lumbar solution: row_id, normal_mild, moderate, severe (one-hot), optional sample_weight.
Cervical solution: row_id, fractured (0/1). Solution rows without a label are not scored.
Both weighted log loss: lower is better.
Scoliosis: both files filename,pt,mt,tl (the generator's truth: <data_dir>_truth/test_angles.csv);
SMAPE % over the three angles (lower is better), per-angle SMAPE and mean absolute error in degrees.
Spider: SOLUTION = <data_dir>_truth/measurements.csv (test masks in masks/ beside it), SUBMISSION =
submissions/spider_<exp>.csv (predicted masks found in predict/spider/<exp>/masks/); Dice (higher is
better), measurement errors, grade accuracy and herniation average precision, each beside a baseline.
"""

import argparse

import pandas as pd

from spine.core.report import print_summary
from spine.registry import TASKS, get_task


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("solution")
    parser.add_argument("submission")
    args = parser.parse_args(argv)
    task = get_task(args.task)
    if "score" in task.runners:  # a task scored from files of its own kind (masks, measurements)
        scores = task.runner("score")(args.solution, args.submission)
    else:
        scores = task.score(pd.read_csv(args.solution), pd.read_csv(args.submission))
    print_summary(f"{args.task} score", {k: round(v, 6) for k, v in scores.items()})
    return scores


if __name__ == "__main__":
    main()
