"""Stage 03: fixed-size sagittal and axial crops around every (study, condition, level) row.

python src/03_crop.py --config configs/lumbar/demo.yaml [crop.points=label] [key=value ...]
"""

from spine.cli import parse_stage_args
from spine.crops import run_crops
from spine.report import print_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    summary = run_crops(cfg)
    print_summary("stage 03 crop", summary)
    return summary


if __name__ == "__main__":
    main()
