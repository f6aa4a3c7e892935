"""Stage 05: stack the OOF predictions of the config's ``ensemble.members`` on the competition metric.

python src/05_ensemble.py --config configs/lumbar/demo.yaml [key=value ...]
Scores the prior, every member, their mean, a per-group blend (also with the prior as a member), a
logistic and a LightGBM stacker by nested CV over the study folds; writes
models/<task>/ensemble_<exp>/spec.json (the simplest candidate within one standard error of the best,
refitted on every OOF row) and oof/<task>/ensemble_<exp>/{oof.csv, report.json}.
"""

from spine.core.cli import parse_member_args, stage_runner
from spine.core.report import print_summary, stage_summary


def _core(cfg, members) -> dict:
    """The core's stage for the row tasks, imported on use: a task with its own stage skips its imports
    (scikit-learn, LightGBM: seconds per process on 2 cores)."""
    from spine.core.ensemble import run_ensemble

    return run_ensemble(cfg, members)


def main(argv=None) -> dict:
    cfg, members = parse_member_args(__doc__, argv)
    run = stage_runner(cfg.task, "ensemble", "05_ensemble", core=lambda cfg: _core(cfg, members))
    if run is None:
        return {}
    report = run(cfg)
    title = f"stage 05 {cfg.task} ensemble_{cfg.exp}"
    if "rows" in report:
        title += f": OOF on {report['rows']} rows of {report['studies']} studies"
    print_summary(title, stage_summary(report))
    return report


if __name__ == "__main__":
    main()
