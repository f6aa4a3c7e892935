"""Short end-of-stage summaries for the console."""

from __future__ import annotations


def print_summary(title: str, summary: dict) -> None:
    """Print ``summary`` as an aligned two-column table under ``title``."""
    width = max(len(k) for k in summary) if summary else 0
    print(f"\n== {title} ==")
    for k, v in summary.items():
        print(f"  {k:<{width}}  {v}")


def format_scores(scores: dict[str, float]) -> str:
    """'score 0.5123 | spinal 0.4 | ...' with the overall score first."""
    return " | ".join(f"{k} {v:.4f}" for k, v in scores.items())
