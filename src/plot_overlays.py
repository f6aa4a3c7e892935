"""Overlays for a person (lumbar: labelled vs predicted points on sagittal slices, axial crop boxes,
crops). A task without overlays says so and exits 0.

python src/plot_overlays.py --config configs/lumbar/demo.yaml [--n 3] [--out DIR] [key=value ...]
"""

import argparse

from spine.core.cli import setup_logging, stage_runner
from spine.core.config import load_config


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/lumbar/demo.yaml")
    parser.add_argument("--n", type=int, default=3, help="number of train studies")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: <localize_dir>/overlays)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data_dir=/data out_dir=/tmp/x")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    run = stage_runner(cfg.task, "overlays", "plot_overlays")
    if run is None:
        return []
    written = run(cfg, n=args.n, out=args.out)
    print(f"wrote {len(written)} overlays to {written[0].parent if written else '(none)'}")
    return written


if __name__ == "__main__":
    main()
