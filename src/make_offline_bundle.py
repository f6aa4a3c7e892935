"""Prepare what an internet-less Kaggle inference notebook needs to run stage 06.

python src/make_offline_bundle.py --config configs/lumbar/demo.yaml --out bundle/lumbar [--wheels]

The bundle (upload it as a Kaggle dataset, then run notebooks/kaggle_inference.ipynb):
  repo/      the code and configs (src/, configs/, requirements.txt, pyproject.toml)
  models/    <task>/localizer or segmenter, each ensemble member's fold checkpoints, ensemble_<exp>/
  wheels/    with --wheels: `pip download` of requirements.txt (needs PyPI once, here, not on Kaggle)
  bundle.json  what is inside, the git commit, and the stage-06 command
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from spine.core.cli import setup_logging
from spine.core.config import REPO_ROOT, git_commit, load_config, member_configs
from spine.core.paths import Paths, require

REPO_PARTS = ["src", "configs", "requirements.txt", "pyproject.toml"]
MODEL_FILES = ("*.pt", "*.json", "config.yaml")  # not resume states (*.last) or fingerprints (*.key)
SHARED_MODELS = ("localizer", "segmenter")  # stage 02's models, whichever the task has


def copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for part in REPO_PARTS:
        src = REPO_ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / part)


def copy_models(paths: Paths, folders: list[str], dest: Path) -> list[str]:
    """Copy the model folders (checkpoints, configs, specs); returns the files copied."""
    copied = []
    for name in folders:
        src = paths.models_dir / name
        for pattern in MODEL_FILES:
            for f in sorted(src.glob(pattern)):
                target = dest / "models" / paths.task / name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                copied.append(str(target.relative_to(dest)))
    return copied


def download_wheels(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-r", str(REPO_ROOT / "requirements.txt")]
    subprocess.run([*cmd, "-d", str(dest / "wheels")], check=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="bundle folder (made or refreshed)")
    parser.add_argument("--wheels", action="store_true", help="also pip download requirements.txt")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out_dir=... (where models are)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    members = member_configs(cfg, args.overrides)
    paths = Paths.from_config(cfg)
    require(paths.ensemble_spec, "05_ensemble")
    shared = [n for n in SHARED_MODELS if (paths.models_dir / n).is_dir()]
    if not shared:
        raise FileNotFoundError(f"no stage-02 model under {paths.models_dir}: run src/02_localize.py first")
    out = Path(args.out)
    copy_repo(out / "repo")
    files = copy_models(paths, [*shared, *(m.exp for m in members), paths.ensemble_name], out)
    if args.wheels:
        download_wheels(out)
    config = Path(args.config).resolve().relative_to(REPO_ROOT)
    info = {
        "task": cfg.task,
        "config": str(config),
        "members": [m.exp for m in members],
        "git_commit": git_commit(),
        "model_files": files,
        "wheels": args.wheels,
        "command": f"python repo/src/06_predict.py --config repo/{config} data_dir=<competition folder> "
        "out_dir=<writable folder> models_from=<this bundle>",
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    print(f"bundle {out}: {len(files)} model files, config {config}, members {info['members']}")
    return info


if __name__ == "__main__":
    main()
