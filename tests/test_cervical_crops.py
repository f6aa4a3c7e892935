"""Cervical stage 03 (vertebra crops) and stage-04 prediction on bad input: a listed study with no folder,
a study whose every file failed in stage 01, a study stage 02 found no vertebra in. None raises; every
study keeps its rows, with a reason, and its predictions fall back to the prior."""

import numpy as np
import pandas as pd
import pytest
import torch

from spine.cervical import crops, fracture
from spine.cervical.segment import VERTEBRA_COLUMNS
from spine.cervical.task import TARGETS, VERTEBRAE
from spine.core.config import load_config
from spine.core.paths import Paths, truth_dir
from spine.core.synth import common, generate

SIZE, SLICES = 32, 24
TINY = ["num_workers=1", "crop.depth=4", "crop.pixels=16", "train.n_seq=2", "train.loader_workers=0"]


def _vertebra_rows(paths: Paths, series: pd.DataFrame) -> pd.DataFrame:
    """A stage-02 table from the generator's truth: each true vertebra found, in a box around the centre."""
    truth = pd.read_csv(truth_dir(paths.data_dir) / "vertebrae.csv", dtype={"study_id": str})
    ok = series[series["status"] == "ok"].set_index("study_id")
    rows = []
    for r in truth[truth["vertebra"].isin(VERTEBRAE)].itertuples(index=False):
        if r.study_id not in ok.index:
            continue
        stack = ok.loc[r.study_id]
        rows.append(
            {
                "study_id": r.study_id,
                "split": r.split,
                "vertebra": r.vertebra,
                "series_id": str(stack["series_id"]),
                "stack": int(stack["stack"]),
                "found": True,
                "slice_start": r.slice_min,
                "slice_end": r.slice_max,
                "row_start": 8,
                "row_end": 24,
                "col_start": 8,
                "col_end": 24,
                "voxels": 100,
                "confidence": 0.9,
                "source": "truth",
            }
        )
    return pd.DataFrame(rows, columns=VERTEBRA_COLUMNS)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, stage_script):
    """Stage 01 on 3 train + 3 test studies: one test study has no folder (the generator's), every file
    of one train study is cut short, and stage 02 found nothing in another train study."""
    root = tmp_path_factory.mktemp("cervical_bad")
    summary = generate("cervical", root / "data", 3, 3, seed=4, image_size=SIZE, n_slices=SLICES)
    train = pd.read_csv(root / "data" / "train.csv")["StudyInstanceUID"].astype(str).tolist()
    unreadable, empty = train[0], train[1]
    for f in (root / "data" / "train_images" / unreadable).glob("*.dcm"):
        common.corrupt(f)
    args = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    stage_script("01_preprocess").main(["--config", "configs/cervical/demo.yaml", *args])
    cfg = load_config("configs/cervical/demo.yaml", args)
    paths = Paths.from_config(cfg)
    series = pd.read_parquet(paths.series_table)
    series["study_id"], series["series_id"] = series["study_id"].astype(str), series["series_id"].astype(str)
    vert = _vertebra_rows(paths, series)
    vert.loc[vert["study_id"] == empty, ["found", "slice_start", "slice_end"]] = [False, np.nan, np.nan]
    paths.vertebrae.parent.mkdir(parents=True, exist_ok=True)
    vert.to_csv(paths.vertebrae, index=False)
    crops_summary = crops.run_crops(cfg)
    cases = {
        "missing": summary["quirks"]["missing_test_studies"][0],
        "unreadable": unreadable,
        "empty": empty,
    }
    return cfg, paths, cases, crops_summary


def test_every_study_keeps_seven_rows_with_a_reason(bad):
    cfg, paths, cases, _ = bad
    manifest = pd.read_parquet(paths.crop_manifest)
    listed = crops.list_studies(paths.data_dir, cfg.preprocess.splits)
    assert len(manifest) == 7 * len(listed)
    assert set(manifest["study_id"]) == set(listed["study_id"])
    for case, uid in cases.items():
        rows = manifest[manifest["study_id"] == uid]
        assert len(rows) == 7 and not rows["found"].any(), case
        assert (rows["reason"].str.len() > 0).all(), case
        assert np.load(paths.crop_array(rows["split"].iloc[0], uid, crops.VIEW)).max() == crops.AIR_HU
    reasons = manifest.set_index("study_id")["reason"]
    assert reasons[cases["missing"]].str.startswith("no volume").all()
    assert reasons[cases["unreadable"]].str.startswith("no volume").all()
    assert (reasons[cases["empty"]] == "vertebra not found by stage 02").all()
    others = manifest[~manifest["study_id"].isin(cases.values())]
    assert len(others) and others["found"].all()


def test_report_counts_the_missing_rows_by_reason(bad):
    _, paths, cases, summary = bad
    report = pd.read_json(paths.crop_report, typ="series").to_dict()
    counted = sum(sum(part["missing_reasons"].values()) for part in report.values())
    assert counted == 7 * len(cases) == summary["rows_missing"]


def test_a_stage_02_box_on_another_stack_is_not_cropped(bad):
    cfg, paths, cases, _ = bad
    job = next(
        j
        for j in crops.build_jobs(
            crops.list_studies(paths.data_dir, ["train"]),
            crops.load_vertebrae(paths),
            pd.read_parquet(paths.series_table).astype({"study_id": str, "series_id": str}),
            pd.read_parquet(paths.instance_table).astype({"study_id": str, "series_id": str}),
            crops.load_boxes(paths.data_dir),
            crops.VertebraCropSpec.from_config(cfg),
        )
        if j.stack is not None and j.vertebrae["found"].any()
    )
    job.vertebrae = job.vertebrae.assign(stack=job.stack["stack"] + 1)
    rows = crops.crop_study(job, paths, crops.VertebraCropSpec.from_config(cfg))
    assert not any(r["found"] for r in rows)
    assert {r["reason"] for r in rows} == {"stage 02 found it on another stack than the one cropped"}


def test_prediction_gives_every_listed_study_rows_and_the_prior_where_nothing_was_cropped(bad):
    cfg, paths, cases, _ = bad
    listed = crops.list_studies(paths.data_dir, ["test"])["study_id"]
    studies = fracture.study_table(paths, "test", [*listed, "1.2.3.not.cropped"])
    assert len(studies) == len(listed) + 1
    fracture.check_crops(paths, studies, cfg)
    model = fracture.build_model(cfg)
    probs = fracture.predict_studies(model, paths, studies, cfg.train, torch.device("cpu"))
    frame = fracture.long_frame(studies, probs)
    assert len(frame) == len(TARGETS) * len(studies)
    nothing = frame["study_id"].isin([cases["missing"], "1.2.3.not.cropped"])
    assert frame.loc[nothing, "fractured"].isna().all() and (frame.loc[nothing, "reason"] != "").all()
    assert frame.loc[~nothing, "fractured"].notna().all()
    filled = fracture.fill_with_prior(frame, np.full(len(TARGETS), 0.1))
    assert filled["fractured"].between(0, 1).all()
    assert filled.loc[nothing, "reason"].str.endswith(fracture.FILLED).all()
