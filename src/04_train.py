"""Stage 04: the task's classifiers over the stage-03 crops, on the shared study folds, with OOF files.

python src/04_train.py --config configs/lumbar/demo.yaml [fold=0] [key=value ...]
torchrun --nproc_per_node=N src/04_train.py --config configs/lumbar/base.yaml
Trains every experiment of the config's ``ensemble.members`` (or the config's own experiment), each
resumable per fold, and writes models/<task>/<exp>/fold{k}_seed{s}.pt and
oof/<task>/<exp>/{fold{k}.csv, oof.csv, report.json}.
"""

from spine.core.cli import parse_member_args, stage_runner
from spine.core.report import print_summary, stage_summary


def main(argv=None) -> dict:
    """Returns {experiment: report}."""
    _, members = parse_member_args(__doc__, argv)
    runs = [(cfg, stage_runner(cfg.task, "train", "04_train")) for cfg in members]
    if not all(run for _, run in runs):
        return {}  # nothing to train for this task: exit before torch is imported
    from spine.core.train import dist

    reports = {}
    try:
        for cfg, run in runs:
            reports[cfg.exp] = report = run(cfg)
            if dist.is_main():
                title = f"stage 04 {cfg.exp}"
                if "rows" in report:
                    title += (
                        f": OOF on {report['rows']} rows of {report['studies']} studies "
                        f"(folds {report['folds_done']})"
                    )
                print_summary(title, stage_summary(report))
    finally:
        dist.shutdown()
    return reports


if __name__ == "__main__":
    main()
