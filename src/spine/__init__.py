"""Spine imaging competition pipeline (RSNA 2024 lumbar, RSNA 2022 cervical)."""

__version__ = "0.1.0"
