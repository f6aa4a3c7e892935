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


def stage_summary(report: dict) -> dict:
    """What a stage prints: the report's flat ``summary`` when it has one, else its scalar entries."""
    if "summary" in report:
        return report["summary"]
    return {k: v for k, v in report.items() if not isinstance(v, (dict, list, tuple))}


def score_summary(report: dict) -> dict:
    """Flat console table of a stage-04/05 report: model, prior and Bayes scores, signal captured."""
    out = {}
    for who in ("model", "prior", "bayes"):
        if who in report:
            out.update({f"{who} {k}": round(v, 4) for k, v in report[who].items()})
    if "signal_captured" in report:
        out["signal captured (prior-model)/(prior-bayes)"] = round(report["signal_captured"], 3)
    return out
