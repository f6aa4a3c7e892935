"""Stage 01: DICOM → cached .npy volumes + metadata tables, for every train and test series.

python src/01_preprocess.py --config configs/lumbar/demo.yaml [key=value ...]
"""

from spine.core.cli import parse_stage_args
from spine.core.preprocess import run_preprocess
from spine.core.report import print_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    summary = run_preprocess(cfg)
    print_summary("stage 01 preprocess", summary)
    return summary


if __name__ == "__main__":
    main()
