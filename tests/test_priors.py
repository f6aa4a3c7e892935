"""The one label prior (spine.core.priors) with known answers: 3 studies of known grades."""

import numpy as np
import pandas as pd

from spine.core.priors import oof_prior, prior_probs, prior_table


def test_prior_table_counts_labelled_rows_plus_half_a_count_per_class():
    # 3 studies: grades 0, 0 and 2 of one key, a fourth row without a label (-1) and one NaN
    table = prior_table(["spinal_l4_l5"] * 5, [0, 0, 2, -1, np.nan], 3)
    assert table == {"spinal_l4_l5": [2.5 / 4.5, 0.5 / 4.5, 1.5 / 4.5]}
    probs = prior_probs(table, ["spinal_l4_l5", "spinal_l5_s1"], 3)
    np.testing.assert_array_equal(probs, [[2.5 / 4.5, 0.5 / 4.5, 1.5 / 4.5], [1 / 3, 1 / 3, 1 / 3]])
    assert prior_table([], [], 2) == {} and prior_probs({}, [], 2).shape == (0, 2)


def test_binary_prior_is_the_rate_with_half_a_count_each_side_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 500))
        y = (rng.random((n, 2)) < rng.random()).astype(np.float32)  # studies x 2 targets, some unknown
        y[rng.random((n, 2)) < 0.1] = np.nan
        known = np.isfinite(y)
        rate = (np.where(known, y, 0).sum(0) + 0.5) / (known.sum(0) + 1.0)  # the cervical rule as it was
        keys = np.tile(["C1", "C2"], n)
        p = prior_probs(prior_table(keys, y.reshape(-1), 2), ["C1", "C2"], 2)
        assert (p[:, 1] == rate).all()
        counts = np.bincount(rng.integers(0, 3, n), minlength=3)
        labels = np.repeat([0, 1, 2], counts)
        q = prior_probs(prior_table(["k"] * n, labels, 3), ["k"], 3)[0]
        assert (q == (counts + 0.5) / (counts + 0.5).sum()).all()


def test_oof_prior_uses_the_other_folds_only():
    # one row per study and key, 3 studies in folds 0, 1, 2 with grades 0, 1, 2
    ref = pd.DataFrame({"key": ["a", "a", "a", "b"], "y": [0, 1, 2, 1], "fold": [0, 1, 2, 2]})
    out = oof_prior(["a", "a", "a", "b"], [0, 1, 2, 2], 3, ref["key"], ref["y"], ref["fold"])
    np.testing.assert_allclose(out[0], [0.5, 1.5, 1.5] / np.float64(3.5))  # studies of folds 1 and 2
    np.testing.assert_allclose(out[1], [1.5, 0.5, 1.5] / np.float64(3.5))
    np.testing.assert_allclose(out[2], [1.5, 1.5, 0.5] / np.float64(3.5))
    np.testing.assert_allclose(out[3], [1 / 3] * 3)  # key b only labelled in its own fold
