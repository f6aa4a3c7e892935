"""Stage 04: severity classifiers over the stage-03 crops, on the shared study folds, with OOF files.

python src/04_train.py --config configs/lumbar/demo.yaml [fold=0] [key=value ...]
torchrun --nproc_per_node=N src/04_train.py --config configs/lumbar/base.yaml
Writes models/<task>/<exp>/fold{k}_seed{s}.pt and oof/<task>/<exp>/{fold{k}.csv, oof.csv, report.json}.
"""

from spine.classify import run_train
from spine.cli import parse_stage_args
from spine.report import print_summary
from spine.train import dist


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    try:
        report = run_train(cfg)
    finally:
        dist.shutdown()
    if dist.is_main():
        print_summary(
            f"stage 04 {cfg.exp}: OOF on {report['rows']} rows of {report['studies']} studies "
            f"(folds {report['folds_done']})",
            _table(report),
        )
    return report


def _table(report: dict) -> dict:
    out = {}
    for who in ("model", "prior", "bayes"):
        if who in report:
            out.update({f"{who} {k}": round(v, 4) for k, v in report[who].items()})
    if "signal_captured" in report:
        out["signal captured (prior-model)/(prior-bayes)"] = round(report["signal_captured"], 3)
    return out


if __name__ == "__main__":
    main()
