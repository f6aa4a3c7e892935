"""Stage 03: fixed-size crops around every submission row's anatomy (lumbar: sagittal and axial
crops per study, condition and level; cervical: per-vertebra crops). The task module names the
implementation.

python src/03_crop.py --config configs/lumbar/demo.yaml [crop.points=label] [key=value ...]
"""

from spine.core.cli import parse_stage_args
from spine.core.report import print_summary, stage_summary
from spine.registry import get_task


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    summary = get_task(cfg.task).runner("crop")(cfg)
    print_summary(f"stage 03 {cfg.task} crop", stage_summary(summary))
    return summary


if __name__ == "__main__":
    main()
