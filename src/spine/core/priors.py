"""The label prior: per target key (a row's target without its study, e.g. 'spinal_canal_stenosis_l4_l5'
or 'C3'), the class frequencies of the labelled rows, each class with a pseudo count so that a class
never seen for a key is not impossible. One rule for every use: stage 04's prior-only baseline and the
cervical gap filling, stage 05's baseline and saved spec, stage 06's fallback. A binary target is two
classes (not fractured, fractured), so its rate is (positives + 0.5) / (labelled + 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PSEUDO_COUNT = 0.5  # per class


def prior_table(keys, labels, k: int) -> dict:
    """key → its ``k`` class frequencies (a list) among the labelled rows: class counts plus
    ``PSEUDO_COUNT`` each, normalized. ``labels`` are class indices; a negative or NaN one (no label)
    is left out."""
    y = np.asarray(labels, dtype=np.float64)
    ok = np.isfinite(y) & (y >= 0)
    if not ok.any():
        return {}
    rows = pd.DataFrame({"key": np.asarray(keys, dtype=object)[ok], "y": y[ok].astype(np.int64)})
    counts = rows.groupby("key")["y"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=range(k), fill_value=0) + PSEUDO_COUNT
    freq = counts.div(counts.sum(axis=1), axis=0)
    return {key: freq.loc[key].tolist() for key in freq.index}


def prior_probs(table: dict, keys, k: int) -> np.ndarray:
    """(len(keys), k) prior probabilities; a key the table has not seen gets the uniform distribution."""
    return np.array([table.get(key, [1.0 / k] * k) for key in keys], dtype=np.float64).reshape(-1, k)


def oof_prior(keys, folds, k: int, ref_keys, ref_labels, ref_folds) -> np.ndarray:
    """Prior-only baseline, out of fold: (len(keys), k), each row of fold f given the prior table of
    the reference rows (``ref_keys``, ``ref_labels``, ``ref_folds``) of the other folds."""
    keys, folds = np.asarray(keys, dtype=object), np.asarray(folds)
    ref_keys, ref_labels = np.asarray(ref_keys, dtype=object), np.asarray(ref_labels)
    ref_folds = np.asarray(ref_folds)
    out = np.zeros((len(keys), k))
    for f in np.unique(folds):
        other, m = ref_folds != f, folds == f
        out[m] = prior_probs(prior_table(ref_keys[other], ref_labels[other], k), keys[m], k)
    return out
