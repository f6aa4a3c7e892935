"""Stage 01: raw images → cached arrays + metadata tables, for every train and test series or image
(DICOM for the RSNA tasks: .npy volumes; a task reading other files names its own implementation).

python src/01_preprocess.py --config configs/lumbar/demo.yaml [key=value ...]
"""

from spine.core.cli import parse_stage_args, stage_runner
from spine.core.preprocess import run_preprocess
from spine.core.report import print_summary, stage_summary


def main(argv=None) -> dict:
    cfg = parse_stage_args(__doc__, argv)
    run = stage_runner(cfg.task, "preprocess", "01_preprocess", core=run_preprocess)
    if run is None:
        return {}
    summary = run(cfg)
    print_summary(f"stage 01 {cfg.task} preprocess", stage_summary(summary))
    return summary


if __name__ == "__main__":
    main()
