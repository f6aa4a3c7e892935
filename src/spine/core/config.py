"""One config system for every stage: defaults -> task -> experiment -> command line.

A YAML file may name parents with ``inherit:`` (a path relative to that file, or a list of them);
parents are merged first, the child wins. Command-line overrides are dotted ``key=value`` pairs and
may only set keys that exist: an unknown key is an error, never silently ignored. Every load builds
fresh objects, so no experiment can change another's defaults.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spine.core.io import save_text

REPO_ROOT = Path(__file__).resolve().parents[3]


def _load_chain(path: Path, seen: tuple = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config inheritance loops through {path}")
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = OmegaConf.load(path)
    parents = cfg.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _load_chain(path.parent / parent, seen + (path,)))
    return OmegaConf.merge(merged, cfg)


def load_config(path, overrides=()) -> DictConfig:
    """Load a YAML config with its parents and apply dotted ``key=value`` overrides.

    ``exp`` defaults to the file's stem. Missing mandatory values (``???``) raise, naming the key.
    """
    path = Path(path)
    cfg = _load_chain(path)
    if cfg.get("exp") is None:
        cfg.exp = path.stem
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            raise KeyError(f"unknown config key {key!r} in override {item!r} (config {path})")
        cfg.merge_with_dotlist([item])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config {path} leaves required keys unset: {missing}")
    from spine.registry import get_task

    get_task(cfg.task)  # fail early on an unknown task
    return cfg


def _repo_path(path) -> Path:
    """A relative config path is relative to the repo root (also inside an offline bundle's copy)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def member_configs(cfg: DictConfig, overrides=()) -> list[DictConfig]:
    """The experiments of ``ensemble.members`` (config files), each loaded with ``overrides``.

    Without members, the config itself is the only experiment. Every member must be of the same task
    and read the same localization and crops, since stage 06 localizes and crops the test set once.
    """
    if not cfg.ensemble.members:
        return [cfg]
    members = [load_config(_repo_path(m), overrides) for m in cfg.ensemble.members]
    for m in members:
        for key in ("task", "data_dir", "localize", "segment", "crop"):
            if m.get(key) != cfg.get(key):
                raise ValueError(
                    f"ensemble member {m.exp!r} differs from {cfg.exp!r} in {key!r}: members must share "
                    "the task, data, localization and crops (stage 06 localizes and crops the test set once)"
                )
    if len({m.exp for m in members}) != len(members):
        raise ValueError(f"ensemble.members repeat an experiment name: {[m.exp for m in members]}")
    return members


def git_commit() -> str:
    """The repo's current commit (with '-dirty' when there are uncommitted changes), or 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_config(cfg: DictConfig, folder: Path) -> Path:
    """Write the resolved config and the git commit as ``config.yaml`` in ``folder``."""
    text = f"# git commit: {git_commit()}\n" + OmegaConf.to_yaml(cfg, resolve=True)
    path = Path(folder) / "config.yaml"
    save_text(path, text)
    return path
