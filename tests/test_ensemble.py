"""Stage 05's stackers on synthetic OOF tables with a known answer (no images, seconds)."""

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from spine.core import ensemble, priors
from spine.core.config import REPO_ROOT, load_config
from spine.core.paths import Paths
from spine.registry import get_task

EC = OmegaConf.load(REPO_ROOT / "configs/defaults.yaml").ensemble


def _table(task_name: str, n_studies: int = 40, seed: int = 0):
    """Rows with labels drawn from known probabilities; member 0 sees them, member 1 is noise."""
    task = get_task(task_name)
    rng = np.random.default_rng(seed)
    studies = [str(1000 + i) if task_name == "lumbar" else f"1.2.3.{i}" for i in range(n_studies)]
    rows = ensemble.row_table(task, task.row_ids(studies))
    k = ensemble.n_classes(task)
    truth = rng.dirichlet(np.ones(k) * 0.7, size=len(rows))
    rows["y"] = [rng.choice(k, p=p) for p in truth]
    rows["weight"] = 1.0 + rows["y"]
    rows["fold"] = rows["study_id"].map({s: i % 4 for i, s in enumerate(studies)}).to_numpy()
    noise = rng.dirichlet(np.ones(k), size=len(rows))
    probs = np.stack([0.9 * truth + 0.1 / k, noise], axis=1)
    feats = ensemble.features(task, rows, probs, None)
    return task, rows, probs, feats


@pytest.mark.parametrize("task_name", ["lumbar", "cervical"])
def test_stackers_learn_to_trust_the_informative_member(task_name):
    task, rows, probs, feats = _table(task_name)
    noisy = ensemble.score(task, rows, probs[:, 1])["score"]
    good = ensemble.score(task, rows, probs[:, 0])["score"]
    assert good < noisy
    cands = ensemble.candidates(["good", "noise"], EC)
    for name in ("blend", "blend+prior", "logistic", "lgbm"):
        oof = ensemble.cv_predict(cands[name], rows, probs, feats)
        assert np.allclose(oof.sum(1), 1) and (oof > 0).all()
        assert ensemble.score(task, rows, oof)["score"] < noisy, name
    blend = ensemble.Blend().fit(rows, probs, feats)
    for params in blend.groups.values():
        assert params["weights"][0] > 0.8  # nearly all weight on the informative member


@pytest.mark.parametrize("name", ["prior", "blend", "blend+prior", "logistic", "lgbm", "mean", "member:good"])
def test_saved_parameters_reproduce_the_predictions(name):
    task, rows, probs, feats = _table("lumbar", n_studies=12)
    model = ensemble.candidates(["good", "noise"], EC)[name]().fit(rows, probs, feats)
    again = ensemble.STACKERS[type(model).__name__.lower()].from_params(model.params())
    np.testing.assert_allclose(again.predict(rows, probs, feats), model.predict(rows, probs, feats))


def test_logistic_on_rows_of_one_class_predicts_that_class():
    """Tiny data (a real-size smoke run of 3 studies) can leave one grade only: sklearn refuses it."""
    task, rows, probs, feats = _table("lumbar", n_studies=6)
    rows["y"] = 0
    q = ensemble.Logistic().fit(rows, probs, feats).predict(rows, probs, feats)
    assert np.allclose(q.sum(1), 1) and (q[:, 0] > 0.99).all()


def test_selection_never_sees_the_fold_it_predicts():
    task, rows, probs, feats = _table("cervical", n_studies=16)
    seen = []

    class Spy(ensemble.Mean):
        def fit(self, r, p, x):
            seen.append(set(r["fold"]))
            return self

    ensemble.selected_predict(task, {"spy": Spy, "mean": ensemble.Mean}, rows, probs, feats, "best")
    assert len(seen) == 4 * (3 + 1)  # per outer fold: 3 inner-CV fits, then the refit of the pick
    for f in range(4):
        inner, refit = seen[4 * f : 4 * f + 3], seen[4 * f + 3]
        assert all(f not in s and len(s) == 2 for s in inner)  # inner CV within the other folds
        assert refit == {0, 1, 2, 3} - {f}  # the pick is refitted without the fold it predicts


def test_one_se_pick_takes_the_simplest_candidate_within_the_noise():
    task, rows, probs, feats = _table("cervical", n_studies=40)
    good = probs[:, 0]
    near = np.clip(good + 0.001 * np.random.default_rng(1).standard_normal(good.shape), 1e-3, 1)
    near /= near.sum(1, keepdims=True)
    prior = ensemble.cv_predict(ensemble.Prior, rows, probs, feats)
    preds = {"prior": prior, "member:good": near, "lgbm": good}
    scores = {name: ensemble.score(task, rows, q)["score"] for name, q in preds.items()}
    assert scores["lgbm"] < scores["member:good"] < scores["prior"]
    assert ensemble.pick(task, scores, preds, rows, "best") == "lgbm"
    # the member is as good as the best within noise; the prior is far worse: the member is taken
    assert ensemble.pick(task, scores, preds, rows, "one_se") == "member:good"
    # a "best" that is the prior with random noise on it, lucky enough to score a little better: noise
    for seed in range(100):
        noisy = prior * np.exp(0.3 * np.random.default_rng(seed).standard_normal(prior.shape))
        noisy /= noisy.sum(1, keepdims=True)
        if ensemble.score(task, rows, noisy)["score"] < scores["prior"]:
            break
    preds2 = {"prior": prior, "lgbm": noisy}
    scores2 = {name: ensemble.score(task, rows, q)["score"] for name, q in preds2.items()}
    assert scores2["lgbm"] < scores2["prior"]
    assert ensemble.pick(task, scores2, preds2, rows, "best") == "lgbm"
    assert ensemble.pick(task, scores2, preds2, rows, "one_se") == "prior"


def test_binary_matrix_round_trip_and_prior():
    task = get_task("cervical")
    df = pd.DataFrame({"fractured": [0.1, 0.9]})
    m = ensemble.to_matrix(task, df)
    np.testing.assert_allclose(m, [[0.9, 0.1], [0.1, 0.9]])
    np.testing.assert_allclose(ensemble.from_matrix(task, m)["fractured"], df["fractured"])
    rows = pd.DataFrame({"key": ["C1", "C1", "C1", "C2"], "y": [0, 0, 1, 1]})
    table = priors.prior_table(rows["key"], rows["y"], 2)
    np.testing.assert_allclose(table["C1"], [2.5 / 4, 1.5 / 4])
    np.testing.assert_allclose(priors.prior_probs(table, ["C7"], 2), [[0.5, 0.5]])


# train.csv label rates of the real competition (DOMAIN.md): the prior differs by target
RATES = {"C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.053, "C5": 0.08, "C6": 0.137, "C7": 0.195}
RATES["patient_overall"] = 0.476


def _stage05(tmp_path, informative: bool, n_studies: int = 40, seed: int = 0) -> tuple[dict, object]:
    """Stage 05 on a cervical train.csv and one member's oof.csv, written to ``tmp_path``.

    Labels follow the real per-target rates; an informative member knows each row's own fracture probability,
    an uninformative one says 0.02 or 0.98 at random, whatever the label."""
    cfg = load_config(
        REPO_ROOT / "configs/cervical/demo.yaml", [f"data_dir={tmp_path}/data", f"out_dir={tmp_path}/out"]
    )
    task, rng = get_task("cervical"), np.random.default_rng(seed)
    studies = [f"1.2.3.{i}" for i in range(n_studies)]
    rows = ensemble.row_table(task, task.row_ids(studies))
    rate = rows["key"].map(RATES).to_numpy()
    p = rng.beta(rate * 2, (1 - rate) * 2) if informative else rate
    y = (rng.random(len(rows)) < p).astype(int)
    member = 0.9 * p + 0.05 if informative else rng.choice([0.02, 0.98], size=len(rows))
    train = rows.assign(y=y).pivot(index="study_id", columns="key", values="y").reset_index()
    (tmp_path / "data").mkdir()
    train.rename(columns={"study_id": "StudyInstanceUID"}).to_csv(tmp_path / "data/train.csv", index=False)
    paths = Paths.from_config(cfg)
    paths.oof.parent.mkdir(parents=True)
    folds = rows["study_id"].map({s: i % 4 for i, s in enumerate(studies)})
    pd.DataFrame({"row_id": rows["row_id"], "fold": folds, "fractured": member}).to_csv(
        paths.oof, index=False
    )
    return ensemble.run_ensemble(cfg, [cfg]), paths


def test_members_worse_than_the_prior_leave_the_prior_chosen(tmp_path, monkeypatch):
    # the prior against the members alone: the fitted stackers may beat the prior on noise, because
    # the metric weights positives more than the (unweighted) label frequencies do
    full = ensemble.candidates
    monkeypatch.setattr(
        ensemble, "candidates", lambda names, ec: {k: full(names, ec)[k] for k in ("prior", "member:demo")}
    )
    report, paths = _stage05(tmp_path, informative=False)
    prior, member = report["prior"]["score"], report["candidates"]["member:demo"]["score"]
    assert member > prior and report["chosen"] == "prior"
    message = (
        f"every member scores worse than the prior out of fold ({member:.4f} vs {prior:.4f}): "
        "the prior was chosen"
    )
    assert message in report["notes"]
    assert message in report["summary"].values()
    assert message in json.loads(paths.ensemble_report.read_text())["notes"]
    # stage 06 applies the chosen prior through apply_spec: the spec's own prior table
    spec = ensemble.load_spec(paths)
    assert spec["stacker"] == "prior"
    task = get_task("cervical")
    new_ids = task.row_ids(["9.9.9"])
    q = ensemble.apply_spec(spec, task, new_ids, np.full((len(new_ids), 1, 2), 0.5), None)
    np.testing.assert_allclose(q, priors.prior_probs(spec["prior"], [task.prior_key(r) for r in new_ids], 2))


def test_the_chosen_stack_is_never_worse_than_the_prior(tmp_path):
    report, paths = _stage05(tmp_path, informative=False)
    prior, member = report["prior"]["score"], report["candidates"]["member:demo"]["score"]
    chosen = report["candidates"][report["chosen"]]["score"]
    assert member > prior >= chosen
    said = f"every member scores worse than the prior out of fold ({member:.4f} vs {prior:.4f}): "
    assert any(note.startswith(said) for note in report["notes"])
    assert ensemble.load_spec(paths)["chosen"] == report["chosen"]


def test_good_members_are_chosen_over_the_prior(tmp_path):
    report, paths = _stage05(tmp_path, informative=True)
    assert report["chosen"] != "prior"
    assert report["candidates"][report["chosen"]]["score"] < report["prior"]["score"]
    assert report["selected"]["score"] < report["prior"]["score"]
    assert not any("worse than the prior" in n for n in report["notes"])
    assert ensemble.load_spec(paths)["stacker"] != "prior"


def test_the_prior_candidate_is_the_out_of_fold_prior():
    task, rows, probs, feats = _table("lumbar", n_studies=12)
    k = ensemble.n_classes(task)
    oof = ensemble.cv_predict(ensemble.Prior, rows, probs, feats)
    expected = priors.oof_prior(rows["key"], rows["fold"], k, rows["key"], rows["y"], rows["fold"])
    np.testing.assert_allclose(oof, expected)


def test_a_blend_of_noise_leans_on_the_prior():
    task, rows, probs, feats = _table("cervical")
    noise = probs[:, [1]]  # the uninformative member alone, plus the prior the blend adds
    blend = ensemble.candidates(["noise"], EC)["blend+prior"]().fit(rows, noise, feats)
    for params in blend.groups.values():
        assert len(params["weights"]) == 2 and params["weights"][1] > 0.5
