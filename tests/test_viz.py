"""Overlays for a person: the overlay script and the notebook on a tiny generated set."""

from __future__ import annotations

import cv2
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

from spine.core.config import REPO_ROOT, load_config
from spine.core.io import save_table
from spine.core.paths import Paths
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from spine.lumbar.crops import run_crops
from spine.lumbar.points import label_points
from spine.registry import get_task

NOTEBOOK = REPO_ROOT / "notebooks" / "lumbar_localization.ipynb"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 train + 2 test studies through stages 01 and 03, with 'predicted' points = labels moved 2 mm."""
    root = tmp_path_factory.mktemp("viz")
    data, out = root / "data", root / "out"
    generate("lumbar", data, 4, 2, 0, image_size=64)
    over = [f"data_dir={data}", f"out_dir={out}", "num_workers=1", "crop.points=label"]
    cfg = load_config(REPO_ROOT / "configs/lumbar/demo.yaml", over)
    run_preprocess(cfg)
    paths = Paths.from_config(cfg)
    predicted = label_points(paths.data_dir, pd.read_parquet(paths.instance_table)).assign(source="oof")
    predicted["z_mm"] += 2.0
    save_table(paths.points, predicted)
    run_crops(cfg)
    return over, paths


def _is_picture(path) -> bool:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return image is not None and image.shape[0] > 100 and float(image.std()) > 10.0


def test_overlay_script_writes_non_blank_pngs(tiny, tmp_path, stage_script):
    over, paths = tiny
    written = stage_script("plot_overlays").main(["--config", "configs/lumbar/demo.yaml", "--n", "2", *over])
    assert {p.parent for p in written} == {paths.localize_dir / "overlays"}
    names = sorted(p.name.split("_", 1)[1] for p in written)
    assert names == sorted(["sagittal.png", "axial.png", "crops_sag.png", "crops_ax.png"] * 2)
    assert all(_is_picture(p) for p in written)
    args = ["--config", "configs/lumbar/demo.yaml", "--n", "1", "--out", str(tmp_path), *over]
    elsewhere = stage_script("plot_overlays").main(args)
    assert len(elsewhere) == 4 and all(p.parent == tmp_path for p in elsewhere)


def test_notebook_runs_on_the_outputs(tiny, monkeypatch):
    _, paths = tiny
    monkeypatch.setenv("SPINE_DATA_DIR", str(paths.data_dir))
    monkeypatch.setenv("SPINE_OUT_DIR", str(paths.out_dir))
    monkeypatch.setenv("SPINE_N_STUDIES", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()  # raises on a cell error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4
    text = "".join(o.get("text", "") for o in outputs)
    assert str(paths.out_dir) in text and "no crop report" not in text
    assert np.all([o.output_type != "error" for o in outputs])


def test_a_task_without_overlays_says_so_and_returns_nothing(stage_script, capsys, monkeypatch):
    task = get_task("cervical")
    runners = {k: v for k, v in task.runners.items() if k != "overlays"}
    monkeypatch.setattr(type(task), "runners", runners)
    assert stage_script("plot_overlays").main(["--config", "configs/cervical/demo.yaml"]) == []
    assert "task 'cervical' has nothing to do" in capsys.readouterr().out
