"""The config loader: inheritance, overrides, fresh objects, and every shipped config resolves."""

from pathlib import Path

import pytest

from spine.core.config import REPO_ROOT, load_config, save_config
from spine.core.paths import Paths
from spine.registry import get_task

CONFIGS = sorted((REPO_ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_resolves(path):
    cfg = load_config(path)
    assert cfg.task == path.parent.name and get_task(cfg.task).name == cfg.task
    assert cfg.exp == path.stem
    assert Path(cfg.data_dir).name == get_task(cfg.task).slug


def test_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("task: lumbar\ndata_dir: a\nout_dir: b\nnested: {x: 1, y: 2}\n")
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\nnested: {y: 3}\n")
    cfg = load_config(tmp_path / "child.yaml", ["nested.x=5", "out_dir=/tmp/o"])
    assert (cfg.nested.x, cfg.nested.y, cfg.out_dir, cfg.exp) == (5, 3, "/tmp/o", "child")
    again = load_config(tmp_path / "child.yaml")
    assert again.nested.x == 1  # a fresh object each load: the override did not leak


def test_unknown_override_key_is_an_error():
    with pytest.raises(KeyError, match="preprocess.colour"):
        load_config(REPO_ROOT / "configs/lumbar/demo.yaml", ["preprocess.colour=red"])


def test_missing_required_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "inherit: " + str(REPO_ROOT / "configs/defaults.yaml") + "\ntask: lumbar\n"
    )
    with pytest.raises(ValueError, match="data_dir"):
        load_config(tmp_path / "c.yaml")


def test_overrides_redirect_every_path(tmp_path):
    cfg = load_config(
        REPO_ROOT / "configs/cervical/demo.yaml", [f"data_dir={tmp_path}/d", f"out_dir={tmp_path}/o"]
    )
    paths = Paths.from_config(cfg)
    for p in (paths.cache_dir, paths.folds, paths.checkpoint(0, 1), paths.oof, paths.submission):
        assert str(p).startswith(f"{tmp_path}/o")
    assert str(save_config(cfg, paths.cache_dir)).startswith(f"{tmp_path}/o")
    assert "git commit" in (paths.cache_dir / "config.yaml").read_text()


def test_a_task_config_carries_no_key_of_the_other_task():
    lumbar = load_config(REPO_ROOT / "configs/lumbar/demo.yaml")
    cervical = load_config(REPO_ROOT / "configs/cervical/demo.yaml")
    assert "segment" not in lumbar and "localize" not in cervical
    assert not {"depth", "margin_mm", "z_margin_mm"} & set(lumbar.crop)
    assert not {"windows", "n_seq", "sequence", "aux_slice", "overall"} & set(lumbar.train)
    assert not {"points", "size_mm", "n_slices", "recess_offset_mm"} & set(cervical.crop)
    assert not {"views", "slice_mode", "aux_binary"} & set(cervical.train)
    with pytest.raises(KeyError, match="crop.depth"):
        load_config(REPO_ROOT / "configs/lumbar/demo.yaml", ["crop.depth=8"])


def test_the_full_demo_keeps_its_data_and_outputs_apart():
    quick = load_config(REPO_ROOT / "configs/lumbar/demo.yaml")
    full = load_config(REPO_ROOT / "configs/lumbar/demo_full.yaml")
    assert quick.data_dir != full.data_dir and quick.out_dir != full.out_dir
    assert full.demo_data.n_train > quick.demo_data.n_train
