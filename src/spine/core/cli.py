"""What every numbered stage script shares: argument parsing, config loading, logging."""

from __future__ import annotations

import argparse
import logging

from omegaconf import DictConfig

from spine.core.config import load_config, member_configs


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
