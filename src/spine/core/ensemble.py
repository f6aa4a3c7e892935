"""Stage 05: stack the OOF predictions of several experiments on the competition metric.

Every member's ``oof.csv`` holds an out-of-fold prediction for each labelled train row. Stackers
learn how to combine them; each is scored by nested cross-validation over the same study folds (fit
on four folds' OOF rows, predict the fifth), so its reported score is out-of-fold too. Candidates:

- ``prior``: the class frequencies of each target key (core.priors), no member at all;
- ``member:<exp>``: one member as it is;            ``mean``: the members' average;
- ``blend``: per target group (lumbar condition group, cervical vertebra / patient), member weights,
  a temperature and a class-prior shift, fitted with scipy on the metric's weighted log loss;
  ``blend+prior``: the same with the prior as one more member, so that it can shrink toward the prior
  (one more weight per group: it pays on many rows, overfits on few; the nested CV decides);
- ``logistic``: multinomial logistic regression on the members' log probabilities and row features;
- ``lgbm``: a LightGBM classifier on the same features, weighted like the metric.

The choice among candidates is itself made out of fold ("selected"): for each outer fold, the candidate
that ``pick`` takes from the inner-CV scores on the other folds predicts it. The spec saved for stage 06
is the candidate picked from the nested scores, refitted on every OOF row. ``pick`` (``ensemble.pick``):
``best`` the lowest score; ``one_se`` (default) the simplest candidate within one standard error of the
best. As the prior is a candidate, the chosen score is never worse than the prior's by more than that
error; when every member is worse than the prior, the report says so.

Tasks supply their labels and row features through the task module; binary tasks (cervical) are
handled as two classes (not fractured, fractured).
"""

from __future__ import annotations

import json
import logging

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax

from spine.core.config import save_config
from spine.core.io import save_table, save_text
from spine.core.paths import Paths, require
from spine.core.priors import prior_probs, prior_table
from spine.core.report import format_scores
from spine.core.task import EPS
from spine.core.truth import add_bayes, bayes_frame
from spine.registry import get_task

log = logging.getLogger(__name__)


# =============================================================================================
# Rows: labels, groups, member probabilities
# =============================================================================================


def n_classes(task) -> int:
    return max(2, len(task.pred_columns))


def to_matrix(task, df: pd.DataFrame) -> np.ndarray:
    """Prediction columns → (n, K) class probabilities (a binary column becomes [1 - p, p])."""
    p = df[task.pred_columns].to_numpy(np.float64)
    return np.column_stack([1 - p[:, 0], p[:, 0]]) if len(task.pred_columns) == 1 else p


def from_matrix(task, q: np.ndarray) -> pd.DataFrame:
    """(n, K) class probabilities → the task's prediction columns."""
    q = np.asarray(q, dtype=np.float64)
    values = q[:, 1:2] if len(task.pred_columns) == 1 else q
    return pd.DataFrame(values, columns=task.pred_columns)


def row_table(task, row_ids) -> pd.DataFrame:
    """row_id, study_id, group and prior key of each row."""
    parts = pd.DataFrame([task.parse_row_id(r) for r in row_ids])
    return pd.DataFrame(
        {
            "row_id": list(row_ids),
            "study_id": parts["study_id"].astype(str).to_numpy(),
            "group": [task.stack_group(r) for r in row_ids],
            "key": [task.prior_key(r) for r in row_ids],
        }
    )


def load_oof(paths_of: dict, task) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows every member predicted, with labels and folds, and their probabilities (n, M, K).

    Members must cover the same rows (they come from the same crops and labels); a mismatch is an
    error that names the member, never a silent inner join.
    """
    tables = {}
    for exp, p in paths_of.items():
        f = require(p.oof, "04_train")
        tables[exp] = pd.read_csv(f).drop_duplicates("row_id").set_index("row_id")
    first, ref = next(iter(tables.items()))
    for exp, t in tables.items():
        if set(t.index) != set(ref.index):
            raise ValueError(
                f"OOF rows of {exp!r} ({len(t)}) differ from those of {first!r} ({len(ref)}): retrain "
                "both on the same folds and crops (python src/04_train.py with the ensemble config)"
            )
    solution = task.solution_from_train(pd.read_csv(next(iter(paths_of.values())).data_dir / "train.csv"))
    solution = solution.set_index("row_id")
    ids = [r for r in ref.index if r in solution.index]
    if len(ids) < len(ref):
        log.warning("%d OOF rows have no label in train.csv; they are not stacked", len(ref) - len(ids))
    rows = row_table(task, ids)
    rows["fold"] = ref.loc[ids, "fold"].astype(int).to_numpy()
    sol = solution.loc[ids]
    rows["y"] = to_matrix(task, sol).argmax(1)
    rows["weight"] = sol["sample_weight"].to_numpy(np.float64)
    probs = np.stack([to_matrix(task, tables[exp].loc[ids]) for exp in paths_of], axis=1)
    return rows, probs


def score(task, rows: pd.DataFrame, q: np.ndarray) -> dict:
    """The official metric of class probabilities ``q`` on labelled ``rows``."""
    k = n_classes(task)
    onehot = np.eye(k)[rows["y"].to_numpy()]
    sol = pd.concat([rows[["row_id"]].reset_index(drop=True), from_matrix(task, onehot)], axis=1)
    sol["sample_weight"] = rows["weight"].to_numpy()
    sub = pd.concat([rows[["row_id"]].reset_index(drop=True), from_matrix(task, q)], axis=1)
    return task.score(sol, sub)


def _log_loss(q: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(q[np.arange(len(y)), y], EPS, 1.0)
    return float(-(w * np.log(p)).sum() / w.sum())


# =============================================================================================
# Stackers: fit(rows, probs, feats) / predict(rows, probs, feats) / params() / from_params()
# =============================================================================================


class Member:
    """One member's predictions as they are."""

    fitted = False

    def __init__(self, index: int):
        self.index = index

    def fit(self, rows, probs, feats):
        return self

    def predict(self, rows, probs, feats) -> np.ndarray:
        return probs[:, self.index]

    def params(self) -> dict:
        return {"index": self.index}

    @classmethod
    def from_params(cls, p):
        return cls(p["index"])


class Mean(Member):
    """The members' plain average."""

    def __init__(self, index: int = -1):
        super().__init__(index)

    def predict(self, rows, probs, feats) -> np.ndarray:
        return probs.mean(1)


class Prior:
    """Each row's target-key class frequencies among the fitted rows (core.priors), members unused."""

    fitted = True

    def __init__(self, table: dict | None = None):
        self.table = table

    def fit(self, rows, probs, feats):
        self.table = prior_table(rows["key"], rows["y"], probs.shape[2])
        return self

    def predict(self, rows, probs, feats) -> np.ndarray:
        return prior_probs(self.table, rows["key"], probs.shape[2])

    def params(self) -> dict:
        return {"table": self.table}

    @classmethod
    def from_params(cls, p):
        return cls(p["table"])


class Blend:
    """Per group: softmax(log(sum_m w_m p_m) / T + b), w on the simplex, T > 0, b[0] = 0.

    With ``shrink``, the prior of the fitted rows is one more member (the last weight), so a blend of
    weak members can shrink toward it; its table is saved as ``prior`` (None: members only).
    """

    fitted = True

    def __init__(self, groups: dict | None = None, prior: dict | None = None, shrink: bool = False):
        self.groups = groups or {}
        self.prior, self.shrink = prior, shrink

    def _with_prior(self, rows, probs) -> np.ndarray:
        if self.prior is None:
            return probs
        return np.concatenate([probs, Prior(self.prior).predict(rows, probs, None)[:, None]], axis=1)

    @staticmethod
    def _unpack(theta, m, k):
        w = softmax(np.concatenate([[0.0], theta[: m - 1]]))
        t = np.exp(theta[m - 1])
        b = np.concatenate([[0.0], theta[m : m + k - 1]])
        return w, t, b

    @staticmethod
    def _apply(p, w, t, b):
        mix = np.clip(np.einsum("nmk,m->nk", p, w), EPS, 1.0)
        return softmax(np.log(mix) / t + b, axis=1)

    def fit(self, rows, probs, feats):
        self.prior = Prior().fit(rows, probs, feats).table if self.shrink else None
        probs = self._with_prior(rows, probs)
        _, m, k = probs.shape
        for g in rows["group"].unique():
            sel = (rows["group"] == g).to_numpy()
            p, y, wt = probs[sel], rows["y"].to_numpy()[sel], rows["weight"].to_numpy()[sel]

            def loss(theta, p=p, y=y, wt=wt):
                return _log_loss(self._apply(p, *self._unpack(theta, m, k)), y, wt)

            bounds = [(None, None)] * (m - 1) + [(-3.0, 3.0)] + [(None, None)] * (k - 1)  # T in [e^-3, e^3]
            theta = minimize(loss, np.zeros(m + k - 1), method="L-BFGS-B", bounds=bounds).x
            w, t, b = self._unpack(theta, m, k)
            self.groups[g] = {"weights": w.tolist(), "temperature": float(t), "bias": b.tolist()}
        return self

    def predict(self, rows, probs, feats) -> np.ndarray:
        out = probs.mean(1)  # a group unseen in fitting keeps the plain mean
        probs = self._with_prior(rows, probs)
        for g, prm in self.groups.items():
            sel = (rows["group"] == g).to_numpy()
            if sel.any():
                out[sel] = self._apply(
                    probs[sel], np.array(prm["weights"]), prm["temperature"], np.array(prm["bias"])
                )
        return out

    def params(self) -> dict:
        return {"groups": self.groups, "prior": self.prior}

    @classmethod
    def from_params(cls, p):
        return cls(p["groups"], p.get("prior"))


def _design(feats: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Numeric design matrix: categoricals one-hot, NaN → 0 with an is-missing column."""
    num = feats.select_dtypes(exclude="category")
    parts = [num.fillna(0.0), num.isna().astype(float).add_suffix("_nan")]
    parts += [pd.get_dummies(feats[c], prefix=c, dtype=float) for c in feats.select_dtypes("category")]
    x = pd.concat(parts, axis=1)
    return x if columns is None else x.reindex(columns=columns, fill_value=0.0)


class Logistic:
    """Multinomial logistic regression on standardized features, weighted like the metric."""

    fitted = True

    def __init__(self, c: float = 0.1, state: dict | None = None):
        self.c, self.state = c, state

    def fit(self, rows, probs, feats):
        from sklearn.linear_model import LogisticRegression

        x = _design(feats)
        mean, scale = x.mean(), x.std().replace(0.0, 1.0).fillna(1.0)
        y = rows["y"].to_numpy()
        full = np.zeros((probs.shape[2], x.shape[1]))  # a class absent from these rows: logit -inf-ish
        full_icpt = np.full(probs.shape[2], -30.0)
        if len(np.unique(y)) < 2:  # one class only (tiny data): sklearn refuses; predict that class
            full_icpt[y[0]] = 0.0
        else:
            model = LogisticRegression(C=self.c, max_iter=2000)
            model.fit(((x - mean) / scale).to_numpy(), y, sample_weight=rows["weight"].to_numpy())
            coef, icpt = model.coef_, model.intercept_
            if coef.shape[0] == 1:  # binary: sklearn keeps one row for class 1
                coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
            full[model.classes_], full_icpt[model.classes_] = coef, icpt
        self.state = {
            "columns": list(x.columns),
            "mean": mean.tolist(),
            "scale": scale.tolist(),
            "coef": full.tolist(),
            "intercept": full_icpt.tolist(),
        }
        return self

    def predict(self, rows, probs, feats) -> np.ndarray:
        s = self.state
        x = (_design(feats, s["columns"]).to_numpy() - np.array(s["mean"])) / np.array(s["scale"])
        return softmax(x @ np.array(s["coef"]).T + np.array(s["intercept"]), axis=1)

    def params(self) -> dict:
        return {"c": self.c, "state": self.state}

    @classmethod
    def from_params(cls, p):
        return cls(p["c"], p["state"])


class Lgbm:
    """LightGBM on the members' log probabilities and row features, weighted like the metric."""

    fitted = True

    def __init__(self, params: dict, rounds: int, model: str | None = None):
        self.lgb_params, self.rounds, self.model = dict(params), rounds, model

    def _booster_params(self, k: int) -> dict:
        obj = {"objective": "binary"} if k == 2 else {"objective": "multiclass", "num_class": k}
        return {**obj, "verbose": -1, "seed": 0, "deterministic": True, "num_threads": 1, **self.lgb_params}

    def fit(self, rows, probs, feats):
        k = probs.shape[2]
        data = lgb.Dataset(feats, label=rows["y"].to_numpy(), weight=rows["weight"].to_numpy())
        booster = lgb.train(self._booster_params(k), data, num_boost_round=self.rounds)
        self.model = booster.model_to_string()
        return self

    def predict(self, rows, probs, feats) -> np.ndarray:
        p = lgb.Booster(model_str=self.model).predict(feats)
        return np.column_stack([1 - p, p]) if p.ndim == 1 else p

    def params(self) -> dict:
        return {"params": self.lgb_params, "rounds": self.rounds, "model": self.model}

    @classmethod
    def from_params(cls, p):
        return cls(p["params"], p["rounds"], p["model"])


STACKERS = {
    "prior": Prior,
    "member": Member,
    "mean": Mean,
    "blend": Blend,
    "logistic": Logistic,
    "lgbm": Lgbm,
}


def candidates(members: list[str], ec) -> dict:
    """name → a factory of a fresh stacker. The prior comes first: on a tie the simplest one wins."""
    out = {"prior": Prior}
    out.update({f"member:{m}": (lambda i=i: Member(i)) for i, m in enumerate(members)})
    if len(members) > 1:
        out["mean"] = Mean
    out["blend"] = Blend
    out["blend+prior"] = lambda: Blend(shrink=True)
    out["logistic"] = lambda: Logistic(float(ec.logistic_c))
    out["lgbm"] = lambda: Lgbm(dict(ec.lgbm), int(ec.lgbm_rounds))
    return out


def features(
    task, rows: pd.DataFrame, probs: np.ndarray, manifest: pd.DataFrame | None, cfg=None
) -> pd.DataFrame:
    """Stacker inputs: every member's log probabilities, the row's target key and group (categorical)
    and the task's row features (localization confidence, missing views, ...)."""
    n, m, k = probs.shape
    logp = np.log(np.clip(probs, EPS, 1.0)).reshape(n, m * k)
    out = pd.DataFrame(logp, columns=[f"m{i}_logp{c}" for i in range(m) for c in range(k)])
    out["key"] = pd.Categorical(rows["key"].to_numpy(), categories=sorted(task.prior_keys()))
    out["group"] = pd.Categorical(rows["group"].to_numpy(), categories=sorted(task.stack_groups()))
    extra = task.stack_features(rows[["row_id"]].reset_index(drop=True), probs, manifest, cfg)
    return pd.concat([out, extra.reset_index(drop=True)], axis=1)


# =============================================================================================
# Cross-validation
# =============================================================================================


def cv_predict(factory, rows, probs, feats) -> np.ndarray:
    """Out-of-fold predictions of a stacker: fit on the other folds' rows, predict each fold's."""
    out = np.zeros((len(rows), probs.shape[2]))
    folds = rows["fold"].to_numpy()
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        model = factory().fit(rows[tr], probs[tr], feats[tr])
        out[te] = model.predict(rows[te], probs[te], feats[te])
    return out


def leave_group_out_scores(task, rows: pd.DataFrame, q: np.ndarray, n_groups: int = 20) -> np.ndarray:
    """The official score of ``q`` with each of ``n_groups`` groups of studies left out in turn (the
    delete-a-group jackknife: a per-row or per-study loss would miss how the metric pools and weights
    rows, e.g. lumbar's severe-row weights and any-severe term)."""
    studies = np.sort(rows["study_id"].unique())
    group_of = dict(zip(studies, np.arange(len(studies)) % min(n_groups, len(studies)), strict=True))
    group = rows["study_id"].map(group_of).to_numpy()
    return np.array(
        [
            score(task, rows[group != g].reset_index(drop=True), q[group != g])["score"]
            for g in np.unique(group)
        ]
    )


def pick(task, scores: dict, preds: dict, rows: pd.DataFrame, rule: str) -> str:
    """The candidate to use. ``best``: the lowest score. ``one_se``: the first candidate (they come
    simplest first: the prior, each member, ..., LightGBM) not worse than the best by more than one
    standard error of the paired difference (jackknife over groups of studies). A stacker whose edge
    over the prior is within the noise of a few dozen studies does not carry over to new ones."""
    best = min(scores, key=scores.get)
    if rule == "best":
        return best
    if rule != "one_se":
        raise ValueError(f"ensemble.pick must be 'best' or 'one_se', got {rule!r}")
    ref = leave_group_out_scores(task, rows, preds[best])
    for name in scores:
        d = leave_group_out_scores(task, rows, preds[name]) - ref
        se = np.sqrt((len(d) - 1) / len(d) * ((d - d.mean()) ** 2).sum())
        if scores[name] - scores[best] <= se:
            return name
    return best


def selected_predict(task, cands: dict, rows, probs, feats, rule: str) -> tuple[np.ndarray, dict]:
    """Model selection out of fold: for each fold, the candidate that ``pick`` takes from the inner-CV
    predictions on the other folds is refitted on them and predicts the fold. Returns predictions and
    the picks."""
    out = np.zeros((len(rows), probs.shape[2]))
    folds = rows["fold"].to_numpy()
    picks = {}
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        r, p, x = rows[tr].reset_index(drop=True), probs[tr], feats[tr].reset_index(drop=True)
        inner_preds = {name: cv_predict(fac, r, p, x) for name, fac in cands.items()}
        inner = {name: score(task, r, q)["score"] for name, q in inner_preds.items()}
        best = pick(task, inner, inner_preds, r, rule)
        picks[int(f)] = best
        out[te] = cands[best]().fit(r, p, x).predict(rows[te], probs[te], feats[te])
    return out, picks


# =============================================================================================
# The stage
# =============================================================================================


def _manifest(paths: Paths) -> pd.DataFrame | None:
    return pd.read_parquet(paths.crop_manifest) if paths.crop_manifest.exists() else None


def run_ensemble(cfg, members: list) -> dict:
    """Stage 05: score every candidate out of fold, save the best one's spec and the stacked OOF."""
    task = get_task(cfg.task)
    paths = Paths.from_config(cfg)
    names = [m.exp for m in members]
    rows, probs = load_oof({m.exp: Paths.from_config(m) for m in members}, task)
    if rows["fold"].nunique() < 3:
        raise ValueError(
            f"stage 05 needs OOF rows from at least 3 folds (nested CV), got {rows['fold'].nunique()}: "
            "train every fold in stage 04 (folds.n_folds >= 3)"
        )
    k = n_classes(task)
    feats = features(task, rows, probs, _manifest(paths), cfg)
    cands = candidates(names, cfg.ensemble)
    log.info("stage 05: %d rows of %d studies, members %s", len(rows), rows["study_id"].nunique(), names)
    scores, preds = {}, {}
    for name, fac in cands.items():
        preds[name] = cv_predict(fac, rows, probs, feats)
        scores[name] = score(task, rows, preds[name])
        log.info("%-16s %s", name, format_scores(scores[name]))
    rule = cfg.ensemble.pick
    selected, picks = selected_predict(task, cands, rows, probs, feats, rule)
    best = pick(task, {n: s["score"] for n, s in scores.items()}, preds, rows, rule)
    final = cands[best]().fit(rows, probs, feats)
    report = {
        "exp": cfg.exp,
        "members": names,
        "rows": len(rows),
        "studies": int(rows["study_id"].nunique()),
        "candidates": scores,
        "selected": score(task, rows, selected),
        "selected_per_fold": picks,
        "chosen": best,
        "pick": rule,
        "prior": scores["prior"],  # the prior candidate: each fold given the other folds' frequencies
    }
    report["notes"] = prior_notes(report, names)
    for note in report["notes"]:
        log.warning("stage 05: %s", note)
    bayes = bayes_frame(paths, rows["row_id"], task.pred_columns)
    add_bayes(report, None if bayes is None else score(task, rows, to_matrix(task, bayes)), model="selected")
    spec = {
        "task": task.name,
        "members": names,
        "chosen": best,
        "stacker": type(final).__name__.lower(),
        "params": final.params(),
        "classes": k,
        "prior": prior_table(rows["key"], rows["y"], k),
        "feature_columns": list(feats.columns),
    }
    save_text(paths.ensemble_spec, json.dumps(spec, indent=1))
    save_config(cfg, paths.ensemble_spec.parent)
    oof = pd.concat([rows[["row_id", "study_id"]], from_matrix(task, selected)], axis=1)
    save_table(paths.ensemble_oof, oof.assign(fold=rows["fold"].to_numpy(), stacker="selected"))
    save_text(paths.ensemble_report, json.dumps(report, indent=2, default=float))
    return {**report, "summary": _summary(report)}


def prior_notes(report: dict, members: list[str]) -> list[str]:
    """Plain sentences for a report whose members, or whose stack, score worse than the prior."""
    prior = report["prior"]["score"]
    member = [report["candidates"][f"member:{m}"]["score"] for m in members]
    chosen, notes = report["chosen"], []
    if min(member) > prior:
        outcome = (
            "the prior was chosen"
            if chosen == "prior"
            else f"{chosen} was chosen ({report['candidates'][chosen]['score']:.4f})"
        )
        listed = ", ".join(f"{s:.4f}" for s in member)
        notes.append(
            f"every member scores worse than the prior out of fold ({listed} vs {prior:.4f}): {outcome}"
        )
    if report["selected"]["score"] > prior:
        notes.append(
            f"the stack selected out of fold scores worse than the prior ({report['selected']['score']:.4f} "
            f"vs {prior:.4f}): the inner-CV pick of some folds did not carry over to the fold it predicts"
        )
    return notes


def _summary(report: dict) -> dict:
    out = {f"OOF {name}": round(s["score"], 4) for name, s in report["candidates"].items()}
    out["OOF stacked (selection out of fold)"] = round(report["selected"]["score"], 4)
    out["prior (out of fold)"] = round(report["prior"]["score"], 4)
    if "bayes" in report:
        out["Bayes optimum"] = round(report["bayes"]["score"], 4)
        out["signal captured by the stack"] = round(report["signal_captured"], 3)
    out["chosen for stage 06"] = report["chosen"]
    for i, note in enumerate(report["notes"], 1):
        out[f"note {i}"] = note
    return out


# =============================================================================================
# Applying a spec (stage 06)
# =============================================================================================


def load_spec(paths: Paths) -> dict:
    spec = json.loads(require(paths.ensemble_spec, "05_ensemble").read_text())
    return spec


def apply_spec(
    spec: dict, task, row_ids, probs: np.ndarray, manifest: pd.DataFrame | None, cfg=None
) -> np.ndarray:
    """The spec's stacker on new rows: (n, K) probabilities from the members' (n, M, K)."""
    rows = row_table(task, row_ids)
    feats = features(task, rows, probs, manifest, cfg)
    stacker = STACKERS[spec["stacker"]].from_params(spec["params"])
    return stacker.predict(rows, probs, feats)
