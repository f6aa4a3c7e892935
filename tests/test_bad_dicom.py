"""Stage 01 on bad input: every bad file is a failure row with a reason, and the run goes on."""

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate

from spine.core.config import REPO_ROOT, load_config
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth.dicom_writer import write_slice

SAG = [0, 1, 0, 0, 0, -1]


def _slice(path, x, inum, shape=(16, 12)):
    write_slice(
        path,
        np.full(shape, 100 + inum, np.uint16),
        ipp=[x, -50, 50],
        iop=SAG,
        spacing=[0.7, 0.7],
        thickness=3,
        instance_number=inum,
        study_uid="1.2.3",
        series_uid=f"1.2.3.{path.parent.name}",
        series_number=1,
        series_description="Sagittal T2/STIR",
    )
    return path


def _series(folder, n):
    return [_slice(folder / f"{i + 1}.dcm", 4.0 * i, i + 1) for i in range(n)]


def _listing(d, split, rows):
    pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        d / f"{split}_series_descriptions.csv", index=False
    )


def _cfg(data_dir, out_dir, *extra):
    return load_config(
        REPO_ROOT / "configs/lumbar/demo.yaml",
        [f"data_dir={data_dir}", f"out_dir={out_dir}", "num_workers=1", *extra],
    )


@pytest.fixture
def bad_dir(tmp_path):
    """Study 1, series 10: 6 good slices plus one of each kind of bad file; series 11: one slice;
    study 2: every file unreadable. Test split: one clean series."""
    d = tmp_path / "data"
    s10 = d / "train_images" / "1" / "10"
    files = _series(s10, 6)
    data = files[0].read_bytes()
    (s10 / "7.dcm").write_bytes(data[: len(data) - 200])  # truncated inside the pixel data
    (s10 / "8.dcm").write_bytes(b"")  # empty
    (s10 / "notes.txt").write_text("scanner export log")
    (s10 / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    ds = pydicom.dcmread(_slice(s10 / "9.dcm", 30.0, 9))
    del ds.ImagePositionPatient
    ds.save_as(s10 / "9.dcm")
    ds = pydicom.dcmread(_slice(s10 / "10.dcm", 34.0, 10))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder reads it
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(s10 / "10.dcm")
    _slice(s10 / "11.dcm", 8.0, 11)  # same position as 3.dcm: a duplicate
    _slice(s10 / "12.dcm", 12.0, 12, shape=(20, 20))  # another image size
    _series(d / "train_images" / "1" / "11", 1)
    for name in ("1.dcm", "2.dcm"):
        (d / "train_images" / "2" / "20").mkdir(parents=True, exist_ok=True)
        (d / "train_images" / "2" / "20" / name).write_bytes(b"DICM garbage")
    _series(d / "test_images" / "3" / "30", 3)
    _listing(d, "train", [(1, 10, "Sagittal T2/STIR"), (1, 11, "Sagittal T1"), (2, 20, "Axial T2")])
    _listing(d, "test", [(3, 30, "Sagittal T2/STIR")])
    return d


def test_bad_files_are_rows_with_reasons(bad_dir, tmp_path):
    cfg = _cfg(bad_dir, tmp_path / "out")
    summary = run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    failures = pd.read_csv(paths.failure_table)
    reason = {f.split("/")[-1]: r for f, r in zip(failures.file, failures.reason)}
    assert reason == {
        "7.dcm": "truncated pixel data",
        "8.dcm": "empty file",
        "notes.txt": "not a .dcm file",
        "DICOMDIR": "not a .dcm file",
        "9.dcm": "missing geometry",
        "10.dcm": "unsupported transfer syntax",
        "11.dcm": "duplicate position",
        "1.dcm": "unreadable",
        "2.dcm": "unreadable",
    }
    assert failures.status.str.len().gt(20).all()  # a message, not only a category
    assert "3.dcm" in failures[failures.reason == "duplicate position"].status.iloc[0]
    assert summary["failures_by_reason"] == {
        "not a .dcm file": 2,
        "unreadable": 2,
        "truncated pixel data": 1,
        "empty file": 1,
        "missing geometry": 1,
        "unsupported transfer syntax": 1,
        "duplicate position": 1,
    }

    series = pd.read_parquet(paths.series_table)
    s10 = series[series.series_id == 10].sort_values("n_slices")
    # the odd-sized image is a stack of its own; the 6 good slices are the other
    assert s10[["n_slices", "rows", "cols"]].values.tolist() == [[1, 20, 20], [6, 16, 12]]
    assert (s10.status == "ok").all() and (s10.n_failed == 7).all() and (s10.n_files == 14).all()
    one = series[series.series_id == 11].iloc[0]
    assert one.status == "ok" and one.n_slices == 1 and np.isnan(one.slice_spacing)
    dead = series[series.study_id == 2].iloc[0]
    assert dead.stack == -1 and dead.status == "no readable instance" and dead.n_failed == 2
    assert summary["images"] == 6 + 1 + 1 + 3


def test_too_many_failures_stop_with_a_clear_error(bad_dir, tmp_path):
    for f in (bad_dir / "test_images" / "3" / "30").glob("*.dcm"):
        f.write_bytes(b"DICM junk")  # 3 of 3 test files fail: more than half
    cfg = _cfg(bad_dir, tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"3 of 3 files of split 'test'.*max_failed_share=0.5") as e:
        run_preprocess(cfg)
    assert "30/1.dcm: [unreadable]" in str(e.value)
    paths = Paths.from_config(cfg)
    assert not paths.series_done("test", 3, 30).exists()  # forgotten: a rerun decodes it again
    assert pd.read_csv(paths.failure_table).reason.notna().all()

    _series(bad_dir / "test_images" / "3" / "30", 3)  # the fix
    summary = run_preprocess(cfg)
    assert summary["series_decoded"] == 1 and summary["images"] == 6 + 1 + 1 + 3


def test_failure_share_limit_can_be_raised(bad_dir, tmp_path):
    shutil.rmtree(bad_dir / "test_images")
    cfg = _cfg(bad_dir, tmp_path / "out", "preprocess.max_failed_share=1.0")
    summary = run_preprocess(cfg)
    assert summary["failures_by_reason"]["missing series folder"] == 1
