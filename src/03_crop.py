"""Stage 03: fixed-size crops around every submission row's anatomy (lumbar: sagittal and axial
crops per study, condition and level; cervical: per-vertebra crops). The task module names the
implementation.

python src/03_crop.py --config configs/lumbar/demo.yaml [crop.points=label] [key=value ...]
"""

from spine.core.cli import parse_stage_args, stage_runner
from spine.core.report import print_summary, stage_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    run = stage_runner(cfg.task, "crop", "03_crop")
    if run is None:
        return {}
    summary = run(cfg)
    print_summary(f"stage 03 {cfg.task} crop", stage_summary(summary))
    return summary


if __name__ == "__main__":
    main()
