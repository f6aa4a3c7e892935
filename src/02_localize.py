"""Stage 02: level localization on sagittal series (heatmap keypoints), trained on study folds.

python src/02_localize.py --config configs/lumbar/demo.yaml [localize.folds=[0]] [key=value ...]
Writes localize/<task>/points.csv (OOF for train, fold mean for test) and report.json.
"""

from spine.cli import parse_stage_args
from spine.localize import run_localize
from spine.report import print_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    report = run_localize(cfg)
    for name in ("model", "baseline_mean_position"):
        r = report[name]
        print_summary(
            f"stage 02 OOF localization: {name}",
            {
                **r["all"],
                "level_assignment": r["level_assignment_accuracy"],
                **{f"median_mm {lv}": v["median_mm"] for lv, v in r["per_level"].items()},
            },
        )
    return report


if __name__ == "__main__":
    main()
