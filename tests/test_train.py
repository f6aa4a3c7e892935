"""Stage 04: OOF files on a tiny generated set, in one process and under torchrun with 2 CPU ranks."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from spine.core.config import REPO_ROOT, load_config
from spine.core.io import save_table
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from spine.lumbar.classify import build_model, prior_baseline, run_train, train_rows
from spine.lumbar.crops import run_crops
from spine.lumbar.points import label_points
from spine.lumbar.task import PRED_COLUMNS
from tiny import CLASSIFY_TINY

TINY = CLASSIFY_TINY


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """6 train + 1 test studies through stages 01 and 03 (label points stand in for stage 02)."""
    root = tmp_path_factory.mktemp("train")
    generate("lumbar", root / "data", 6, 1, seed=11, image_size=64)
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    save_table(
        paths.points, label_points(paths.data_dir, pd.read_parquet(paths.instance_table)).assign(source="oof")
    )
    run_crops(cfg)
    return root, over


def _labelled(paths):
    rows = train_rows(paths)
    return rows[rows["grade"] >= 0]


def test_oof_covers_every_labelled_row_out_of_fold(cropped):
    root, over = cropped
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    report = run_train(cfg)
    paths = Paths.from_config(cfg)
    oof = pd.read_csv(paths.oof)
    labelled = _labelled(paths)
    assert sorted(oof["row_id"]) == sorted(labelled["row_id"])  # every labelled row, exactly once
    folds = pd.read_csv(paths.folds).set_index("study_id")["fold"]
    assert (
        oof["fold"].to_numpy() == folds.loc[oof["study_id"]].to_numpy()
    ).all()  # predicted by the other fold
    p = oof[PRED_COLUMNS].to_numpy()
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-5)
    assert report["complete"] and {"model", "prior", "bayes", "signal_captured"} <= set(report)
    for fold in (0, 1):
        assert paths.checkpoint(fold, cfg.seed).exists()
    # a rerun trains nothing: every fold has its predictions
    stamp = paths.checkpoint(0, cfg.seed).stat().st_mtime_ns
    run_train(cfg)
    assert paths.checkpoint(0, cfg.seed).stat().st_mtime_ns == stamp
    # another config trains again: outputs made from other settings are never reused
    run_train(load_config(REPO_ROOT / "configs/lumbar/demo.yaml", [*over, "train.aux_binary=0.5"]))
    assert paths.checkpoint(0, cfg.seed).stat().st_mtime_ns != stamp


def test_prior_baseline_uses_other_folds_only(cropped):
    root, over = cropped
    paths = Paths.from_config(load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over))
    rows = _labelled(paths)
    one = rows[rows["study_id"] == rows["study_id"].iloc[0]]
    fold_of = {s: int(s == one["study_id"].iloc[0]) for s in rows["study_id"]}
    probs = prior_baseline(one, fold_of, rows)
    others = rows[rows["study_id"] != one["study_id"].iloc[0]]
    r = one.iloc[0]
    counts = np.bincount(
        others[(others.condition == r.condition) & (others.level == r.level)]["grade"], minlength=3
    )
    np.testing.assert_allclose(probs[0], (counts + 0.5) / (counts.sum() + 1.5))


def test_ddp_two_cpu_ranks(cropped):
    root, over = cropped
    out = root / "ddp"
    out.mkdir()
    for name in ("cache", "crops", "folds"):  # reuse the stage 01-03 outputs of the fixture
        (out / name).symlink_to(root / "out" / name)
    over = [o for o in over if not o.startswith("out_dir=")]
    over += [f"out_dir={out}", "fold=0", "ensemble.members=null"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "src" / "04_train.py"),
        "--config",
        str(REPO_ROOT / "configs/lumbar/demo.yaml"),
        *over,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(rank 0 of 2)" in done.stderr and "(rank 1 of 2)" in done.stderr
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    paths = Paths.from_config(cfg)
    state = torch.load(paths.checkpoint(0, cfg.seed), weights_only=True)
    build_model(cfg).load_state_dict(state["model"])  # a complete, unwrapped state dict
    fold0 = pd.read_csv(paths.oof_fold(0))
    folds = pd.read_csv(paths.folds).set_index("study_id")["fold"]
    expected = _labelled(paths)
    expected = expected[expected["study_id"].map(folds) == 0]
    assert sorted(fold0["row_id"]) == sorted(expected["row_id"])  # both ranks' shards, no padding repeats
    assert np.isfinite(fold0[PRED_COLUMNS].to_numpy()).all()
