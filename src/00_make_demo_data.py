"""Stage 00: write synthetic studies in the exact Kaggle layout of a competition.

python src/00_make_demo_data.py --config configs/lumbar/demo.yaml        # data_dir + demo_data sizes
python src/00_make_demo_data.py --task lumbar --out DIR --n-train 40 --n-test 8 --seed 0

The generator's ground truth lands beside the data in ``<out>_truth/``. With --config, every key of
``demo_data`` other than n_train / n_test / seed is passed to the task's generator as a keyword
argument (e.g. image_size), and a data set already generated with the same parameters is kept (the
stage is resumable).
"""

import argparse
import json
import time

from omegaconf import OmegaConf

from spine.core.cli import setup_logging
from spine.core.config import load_config
from spine.core.io import save_text
from spine.core.paths import truth_dir
from spine.core.report import print_summary
from spine.core.synth import generate, generator_tasks


def _args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="take task, data_dir (as --out) and demo_data sizes from a config")
    parser.add_argument("--task", choices=generator_tasks())
    parser.add_argument("--out", help="folder to write (replaced only if it was generated before)")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size", type=int, default=None, help="pixels per side (default: the generator's)"
    )
    parser.add_argument("overrides", nargs="*", help="with --config: dotted key=value overrides")
    args = parser.parse_args(argv)
    args.generator = {"image_size": args.image_size} if args.image_size else {}
    if args.config:
        cfg = load_config(args.config, args.overrides)
        d = cfg.demo_data
        args.task, args.out, args.n_train, args.n_test, args.seed = (
            cfg.task,
            cfg.data_dir,
            d.n_train,
            d.n_test,
            d.seed,
        )
        drawn = OmegaConf.to_container(d, resolve=True)
        args.generator = {k: v for k, v in drawn.items() if k not in ("n_train", "n_test", "seed")}
    elif not (args.task and args.out):
        parser.error("give --config, or both --task and --out")
    return args


def _scores(summary: dict) -> dict:
    """'test score, bayes' → value, from the generator's summary."""
    return {
        f"{split} score, {who}": round(parts[who]["score"], 4)
        for split, parts in summary.get("scores", {}).items()
        for who in ("prior", "bayes")
    }


def main(argv=None) -> dict:
    args = _args(argv)
    setup_logging()
    params = {
        "task": args.task,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "seed": args.seed,
        **args.generator,
    }
    marker = truth_dir(args.out) / "params.json"
    if args.config and marker.exists() and json.loads(marker.read_text()) == params:
        print(f"{args.out}: already generated with {params}; kept")
        return json.loads((truth_dir(args.out) / "summary.json").read_text())
    t0 = time.perf_counter()
    summary = generate(args.task, args.out, args.n_train, args.n_test, args.seed, **args.generator)
    save_text(marker, json.dumps(params))
    flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    print_summary(
        f"stage 00 {args.task} demo data ({time.perf_counter() - t0:.1f}s)",
        {"data": args.out, "truth": str(truth_dir(args.out)), **flat, **_scores(summary)},
    )
    return summary


if __name__ == "__main__":
    main()
