"""Stage 01 on tiny hand-built series: ordering, rescale, stacks, bad files, resume."""

import numpy as np
import pandas as pd
import pydicom
import pytest

from spine.core import geometry
from spine.core.config import REPO_ROOT, load_config
from spine.core.paths import Paths
from spine.core.preprocess import load_volume, run_preprocess
from spine.core.synth.dicom_writer import write_slice

SAG = [0, 1, 0, 0, 0, -1]
AX = [1, 0, 0, 0, 1, 0]


def _write_series(
    folder,
    positions,
    iops,
    *,
    instance_numbers,
    syntax="explicit",
    rescale=None,
    dtype=np.uint16,
    shape=(40, 32),
    modality="MR",
    description="Sagittal T2/STIR",
):
    """Each slice is filled with round(10 * its position along its normal) so order can be checked."""
    for ipp, iop, inum in zip(positions, iops, instance_numbers):
        pos = float(geometry.slice_positions(ipp, iop))
        value = round(10 * pos) + 300
        stored = value - (rescale[1] if rescale else 0)
        write_slice(
            folder / f"{inum}.dcm",
            np.full(shape, stored, dtype=dtype),
            ipp=ipp,
            iop=iop,
            spacing=[0.7, 0.7],
            thickness=3,
            instance_number=inum,
            study_uid="1.2.3",
            series_uid=f"1.2.3.{folder.name}",
            series_number=1,
            series_description=description,
            modality=modality,
            rescale=rescale,
            syntax=syntax,
        )


@pytest.fixture
def lumbar_dir(tmp_path):
    """Study 1: a sagittal series (reversed instance numbers, RLE, one corrupt file), an axial series of
    two tilted blocks (JPEG 2000), and a listed series whose folder is missing. Study 2 in test."""
    d = tmp_path / "data"
    img = d / "train_images" / "1"
    xs = [-6.0, -2.0, 2.0, 6.0, 10.0]
    _write_series(
        img / "10", [[x, -50, 50] for x in xs], [SAG] * 5, instance_numbers=[1, 2, 3, 4, 5], syntax="rle"
    )  # normal is -x: position falls as x grows, so instance 5 comes first
    (img / "10" / "6.dcm").write_bytes(b"DICM broken")
    tilt = list(geometry.rotation([1, 0, 0], 15) @ [1, 0, 0]) + list(
        geometry.rotation([1, 0, 0], 15) @ [0, 1, 0]
    )
    pos = [[-40, -40, z] for z in (0.0, 4.0, 8.0)] + [[-40, -40, z] for z in (30.0, 34.0)]
    _write_series(
        img / "11",
        pos,
        [AX] * 3 + [tilt] * 2,
        instance_numbers=[5, 4, 3, 2, 1],
        syntax="j2k",
        description="Axial T2",
    )
    _write_series(
        d / "test_images" / "2" / "20",
        [[x, -50, 50] for x in xs[:2]],
        [SAG] * 2,
        instance_numbers=[2, 1],
        syntax="implicit",
    )
    pd.DataFrame(
        {
            "study_id": [1, 1, 1],
            "series_id": [10, 11, 12],
            "series_description": ["Sagittal T2/STIR", "Axial T2", "Sagittal T1"],
        }
    ).to_csv(d / "train_series_descriptions.csv", index=False)
    pd.DataFrame({"study_id": [2], "series_id": [20], "series_description": ["Sagittal T2/STIR"]}).to_csv(
        d / "test_series_descriptions.csv", index=False
    )
    return d


def _cfg(task, data_dir, out_dir, *extra):
    return load_config(
        REPO_ROOT / f"configs/{task}/demo.yaml",
        [f"data_dir={data_dir}", f"out_dir={out_dir}", "num_workers=1", *extra],
    )


def test_preprocess_lumbar_layout(lumbar_dir, tmp_path):
    cfg = _cfg("lumbar", lumbar_dir, tmp_path / "out")
    summary = run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    series = pd.read_parquet(paths.series_table)
    inst = pd.read_parquet(paths.instance_table)

    sag = series[(series.series_id == 10)].iloc[0]
    vol = load_volume(paths, sag)
    assert vol.shape == (5, 40, 32) and sag.orientation == "sagittal" and sag.n_failed == 1
    # ascending position along the normal (-x): x = 10, 6, 2, -2, -6, i.e. instances 5..1
    assert vol[:, 0, 0].tolist() == [300 - 100, 300 - 60, 300 - 20, 300 + 20, 300 + 60]
    sag_inst = inst[(inst.series_id == 10) & (inst.status == "ok")].sort_values("index")
    assert sag_inst.instance_number.tolist() == [5, 4, 3, 2, 1]
    assert sag_inst.transfer_syntax.unique().tolist() == ["rle"]

    ax = series[series.series_id == 11].sort_values("stack")
    assert ax.n_slices.tolist() == [3, 2] and ax.orientation.tolist() == ["axial", "axial"]
    assert load_volume(paths, ax.iloc[0])[:, 0, 0].tolist() == [
        300,
        340,
        380,
    ]  # z = 0, 4, 8 from instances 5, 4, 3

    missing = series[series.series_id == 12].iloc[0]
    assert missing.status == "missing series folder" and missing.stack == -1
    failures = pd.read_csv(paths.failure_table)
    assert {f.split("/")[-1] for f in failures.file} == {"6.dcm", "12"}
    assert "re-download" in failures[failures.file.str.endswith("6.dcm")].status.iloc[0]
    assert summary["failures"] == 2 and summary["images"] == 5 + 5 + 2
    assert (paths.cache_dir / "source.txt").exists()


def test_ct_rescale_and_signed_storage(tmp_path):
    d = tmp_path / "ct"
    zs = [10.0, 12.5, 15.0]
    _write_series(
        d / "train_images" / "1.2.5",
        [[0, 0, z] for z in zs],
        [AX] * 3,
        instance_numbers=[1, 2, 3],
        rescale=(1, -1024),
        modality="CT",
        description="CT",
    )
    _write_series(
        d / "train_images" / "1.2.6",
        [[0, 0, z] for z in zs],
        [AX] * 3,
        instance_numbers=[3, 2, 1],
        rescale=(1, 0),
        dtype=np.int16,
        modality="CT",
        description="CT",
    )
    pd.DataFrame({"StudyInstanceUID": ["1.2.5", "1.2.6"]}).to_csv(d / "train.csv", index=False)
    cfg = _cfg("cervical", d, tmp_path / "out", "preprocess.splits=[train]")
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    series = pd.read_parquet(paths.series_table).set_index("study_id")
    for uid in ("1.2.5", "1.2.6"):
        vol = load_volume(paths, series.loc[uid])
        assert vol.dtype == np.int16 and vol[:, 3, 3].tolist() == [400, 425, 450]


def test_unsupported_transfer_syntax_is_counted(lumbar_dir, tmp_path):
    f = lumbar_dir / "train_images" / "1" / "11" / "5.dcm"
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.save_as(f, enforce_file_format=True)
    cfg = _cfg("lumbar", lumbar_dir, tmp_path / "out")
    summary = run_preprocess(cfg)
    failures = pd.read_csv(Paths.from_config(cfg).failure_table)
    assert summary["failures"] == 3
    assert "unsupported transfer syntax" in failures[failures.file.str.endswith("11/5.dcm")].status.iloc[0]


def test_resume_after_interruption(lumbar_dir, tmp_path, monkeypatch):
    cfg = _cfg("lumbar", lumbar_dir, tmp_path / "out")
    paths = Paths.from_config(cfg)
    import spine.core.preprocess as pre

    calls = {"n": 0}
    real_save = pre.save_npy

    def failing_save(path, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_save(path, arr)

    monkeypatch.setattr(pre, "save_npy", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg)
    assert not list(paths.cache_dir.rglob("*.tmp"))
    done = list(paths.cache_dir.rglob("*.done.json"))
    assert len(done) <= 1  # the interrupted series has no done-marker

    monkeypatch.setattr(pre, "save_npy", real_save)
    first = run_preprocess(cfg)
    assert first["series_decoded"] == 4 - len(done)
    again = run_preprocess(cfg)
    assert again["series_decoded"] == 0 and again["series_skipped_cached"] == 4
    paths.series_done("train", 1, 11).unlink()
    third = run_preprocess(cfg)
    assert third["series_decoded"] == 1 and third["images"] == first["images"]


def test_cache_from_other_data_is_refused(lumbar_dir, tmp_path):
    run_preprocess(_cfg("lumbar", lumbar_dir, tmp_path / "out"))
    (lumbar_dir / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n")
    with pytest.raises(RuntimeError, match="overwrite"):
        run_preprocess(_cfg("lumbar", lumbar_dir, tmp_path / "out"))
    summary = run_preprocess(_cfg("lumbar", lumbar_dir, tmp_path / "out", "preprocess.overwrite=true"))
    assert summary["series"] == 3


def test_worker_pool_gives_same_tables(lumbar_dir, tmp_path):
    one = _cfg("lumbar", lumbar_dir, tmp_path / "a")
    two = _cfg("lumbar", lumbar_dir, tmp_path / "b", "num_workers=2")
    run_preprocess(one), run_preprocess(two)
    a = pd.read_parquet(Paths.from_config(one).instance_table).drop(columns="file")
    b = pd.read_parquet(Paths.from_config(two).instance_table).drop(columns="file")
    key = ["series_id", "stack", "index", "status"]
    pd.testing.assert_frame_equal(
        a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True)
    )
