"""Stage 05's stackers on synthetic OOF tables with a known answer (no images, seconds)."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from spine.core import ensemble, priors
from spine.core.config import REPO_ROOT
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
    for name in ("blend", "logistic", "lgbm"):
        oof = ensemble.cv_predict(cands[name], rows, probs, feats)
        assert np.allclose(oof.sum(1), 1) and (oof > 0).all()
        assert ensemble.score(task, rows, oof)["score"] < noisy, name
    blend = ensemble.Blend().fit(rows, probs, feats)
    for params in blend.groups.values():
        assert params["weights"][0] > 0.8  # nearly all weight on the informative member


@pytest.mark.parametrize("name", ["blend", "logistic", "lgbm", "mean", "member:good"])
def test_saved_parameters_reproduce_the_predictions(name):
    task, rows, probs, feats = _table("lumbar", n_studies=12)
    model = ensemble.candidates(["good", "noise"], EC)[name]().fit(rows, probs, feats)
    again = ensemble.STACKERS[type(model).__name__.lower()].from_params(model.params())
    np.testing.assert_allclose(again.predict(rows, probs, feats), model.predict(rows, probs, feats))


def test_selection_never_sees_the_fold_it_predicts():
    task, rows, probs, feats = _table("cervical", n_studies=16)
    seen = []

    class Spy(ensemble.Mean):
        def fit(self, r, p, x):
            seen.append(set(r["fold"]))
            return self

    ensemble.selected_predict(task, {"spy": Spy, "mean": ensemble.Mean}, rows, probs, feats)
    assert len(seen) == 4 * (3 + 1)  # per outer fold: 3 inner-CV fits, then the refit of the pick
    for f in range(4):
        inner, refit = seen[4 * f : 4 * f + 3], seen[4 * f + 3]
        assert all(f not in s and len(s) == 2 for s in inner)  # inner CV within the other folds
        assert refit == {0, 1, 2, 3} - {f}  # the pick is refitted without the fold it predicts


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
