"""One table of a finished run: each member's OOF score, the stacked OOF score and the test score,
beside the prior and (on generated data) the Bayes optimum; a task scored otherwise gives its own rows
(its ``summary_rows`` runner). Reads the stages' reports only.

python src/demo_summary.py --config configs/lumbar/demo.yaml [--config configs/cervical/demo.yaml]
"""

from __future__ import annotations

import argparse
import json

from spine.core.config import load_config, member_configs
from spine.core.paths import Paths
from spine.registry import get_task


def _score(path, *keys):
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def rows_of(cfg, overrides=()) -> list[tuple[str, str, object, object, object]]:
    """(task, what, score, prior, bayes) rows of one pipeline config."""
    task = get_task(cfg.task)
    if "summary_rows" in task.runners:  # a task with other scores: (what, model, baseline, best) rows
        return [(cfg.task, *row) for row in task.runner("summary_rows")(cfg)]
    paths = Paths.from_config(cfg)
    out = []
    for m in member_configs(cfg, overrides):
        p = Paths.from_config(m).train_report
        out.append((cfg.task, f"OOF {m.exp}", *(_score(p, w, "score") for w in ("model", "prior", "bayes"))))
    e = paths.ensemble_report
    out.append((cfg.task, "OOF stacked", *(_score(e, w, "score") for w in ("selected", "prior", "bayes"))))
    t = paths.predict_report
    out.append(
        (cfg.task, "test submission", *(_score(t, "test", w, "score") for w in ("model", "prior", "bayes")))
    )
    return out


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every config")
    args = parser.parse_args(argv)
    rows = [r for c in args.config for r in rows_of(load_config(c, args.overrides), args.overrides)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    print("\n== demo scores (each task's metric; baseline: the train prior or mean; best: the generator's")
    print("   Bayes optimum where it has one. lumbar, cervical: weighted log loss; scoliosis: SMAPE %,")
    print("   landmark error % of height, spider errors: lower is better; spider Dice and AP: higher) ==")
    print(f"  {'task':<10}{'':<30}{'model':>9}{'baseline':>9}{'best':>9}")
    for task, what, s, p, b in rows:
        print(f"  {task:<10}{what:<30}{fmt(s):>9}{fmt(p):>9}{fmt(b):>9}")
    return rows


if __name__ == "__main__":
    main()
