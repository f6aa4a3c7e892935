"""Stages 00 and 01 through their command-line entry points, on tiny generated data sets."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine.core import geometry
from spine.core.paths import truth_dir


@pytest.fixture(scope="module", params=["lumbar", "cervical"])
def cached(request, tmp_path_factory, stage_script):
    task = request.param
    root = tmp_path_factory.mktemp(task)
    data, out = root / "data", root / "out"
    # 48² pixels: the generator's defaults are real sizes (cervical: 512², up to 1,000 slices a study).
    generate_args = [
        "--task",
        task,
        "--out",
        str(data),
        "--n-train",
        "4",
        "--n-test",
        "2",
        "--image-size",
        "48",
    ]
    stage_script("00_make_demo_data").main(generate_args)
    summary = stage_script("01_preprocess").main(
        ["--config", f"configs/{task}/demo.yaml", f"data_dir={data}", f"out_dir={out}", "num_workers=2"]
    )
    return task, data, out / "cache" / task, summary


def test_every_file_is_cached_or_reported(cached):
    task, data, cache, summary = cached
    inst = pd.read_parquet(cache / "instances.parquet")
    files = sorted(str(p) for p in data.rglob("*.dcm"))
    ok = inst[inst.status == "ok"]
    failed = inst[inst.status != "ok"]
    assert sorted(ok.file.tolist() + failed.file[failed.file.str.endswith(".dcm")].tolist()) == files
    assert len(ok) == summary["images"] and ok.file.is_unique
    quirks = (truth_dir(data) / "summary.json").read_text()
    for f in failed.file[failed.file.str.endswith(".dcm")]:  # every failed file is one the generator broke
        assert str(Path(f).relative_to(data)) in quirks
    assert (cache / "config.yaml").exists() and (cache / "failures.csv").exists()


def test_stacks_are_ordered_by_position(cached):
    _, _, cache, _ = cached
    inst = pd.read_parquet(cache / "instances.parquet")
    ok = inst[inst.status == "ok"]
    reversed_seen = False
    for _, g in ok.groupby(["series_id", "stack"]):
        g = g.sort_values("index")
        ipp = g[["ipp_x", "ipp_y", "ipp_z"]].to_numpy()
        iop = g[[f"iop_{k}" for k in range(6)]].to_numpy()[0]
        assert np.all(np.diff(geometry.slice_positions(ipp, iop)) > 0)
        reversed_seen |= bool(np.all(np.diff(g.instance_number.to_numpy()) < 0))
    assert reversed_seen  # the generator reverses instance numbers in some series


def test_volumes_match_their_tables(cached):
    _, _, cache, _ = cached
    series = pd.read_parquet(cache / "series.parquet")
    for row in series[series.status == "ok"].itertuples():
        vol = np.load(cache / row.path, mmap_mode="r")
        assert vol.shape == (row.n_slices, row.rows, row.cols)
        assert str(vol.dtype) == row.dtype


def test_rerun_skips_everything(cached, stage_script):
    task, data, cache, first = cached
    again = stage_script("01_preprocess").main(
        ["--config", f"configs/{task}/demo.yaml", f"data_dir={data}", f"out_dir={cache.parent.parent}"]
    )
    assert again["series_decoded"] == 0 and again["images"] == first["images"]
