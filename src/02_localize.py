"""Stage 02: localization, trained on the study folds (lumbar: disc-level keypoints on sagittal series;
cervical: vertebra segmentation). The task module names the implementation.

python src/02_localize.py --config configs/lumbar/demo.yaml [localize.folds=[0]] [key=value ...]
Lumbar writes localize/<task>/points.csv (OOF for train, fold mean for test) and report.json;
cervical writes localize/<task>/vertebrae.csv, slices.parquet and report.json.
"""

from spine.core.cli import parse_stage_args, stage_runner
from spine.core.report import print_summary, stage_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    run = stage_runner(cfg.task, "localize", "02_localize")
    if run is None:
        return {}
    report = run(cfg)
    print_summary(f"stage 02 {cfg.task} localization (out of fold)", stage_summary(report))
    return report


if __name__ == "__main__":
    main()
