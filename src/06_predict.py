"""Stage 06: from the raw test DICOM to submissions/<task>_<exp>.csv, with the trained models only.

python src/06_predict.py --config configs/lumbar/demo.yaml [data_dir=...] [models_from=...] [key=value ...]
Runs stages 01-04 in inference mode on data_dir's test split (work folder out_dir/predict/<task>/<exp>/),
stacks the members with stage 05's spec, and writes the submission in sample_submission.csv's row order,
with a report (seconds per study, peak memory, fallbacks, and on generated data the test score).
"""

from spine.core.cli import parse_member_args, stage_runner
from spine.core.report import print_summary, stage_summary


def _core(cfg, members) -> dict:
    """The core's stage for the row tasks, imported on use: a task with its own stage skips its imports
    (scikit-learn, LightGBM: seconds per process on 2 cores)."""
    from spine.core.predict import run_predict

    return run_predict(cfg, members)


def main(argv=None) -> dict:
    cfg, members = parse_member_args(__doc__, argv)
    run = stage_runner(cfg.task, "submit", "06_predict", core=lambda cfg: _core(cfg, members))
    if run is None:
        return {}
    report = run(cfg)
    print_summary(f"stage 06 {cfg.task} {cfg.exp}: submission", stage_summary(report))
    return report


if __name__ == "__main__":
    main()
