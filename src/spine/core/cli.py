"""What every numbered stage script shares: argument parsing, config loading, logging."""

from __future__ import annotations

import argparse
import logging

from omegaconf import DictConfig

from spine.core.config import load_config, member_configs
from spine.registry import get_task


def setup_logging(level: str = "INFO") -> None:
    """Console logging for stage scripts; chatty third-party codecs are kept to warnings."""
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every stage takes: ``--config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/lumbar/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data_dir=/data out_dir=/tmp/x")
    return parser


def parse_stage_args(description: str, argv=None) -> DictConfig:
    """``--config FILE [key=value ...]`` → the resolved config."""
    args = stage_parser(description).parse_args(argv)
    setup_logging()
    return load_config(args.config, args.overrides)


def parse_member_args(description: str, argv=None) -> tuple[DictConfig, list[DictConfig]]:
    """The config and the configs of its ``ensemble.members`` (each loaded with the same overrides)."""
    args = stage_parser(description).parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    return cfg, member_configs(cfg, args.overrides)


def stage_runner(task_name: str, stage: str, script: str, core=None):
    """The task's function for ``stage``: its own runner, else ``core`` where the task runs the core's
    implementation of that stage; None, after saying so, when the task has nothing to do there (the
    script then exits 0, so one config runs stages 01 to 06 in order for every task)."""
    task = get_task(task_name)
    if stage in task.runners:
        return task.runner(stage)
    if core is not None and stage in task.core_stages:
        return core
    print(f"{script}: task {task.name!r} has nothing to do in this stage")
    return None
