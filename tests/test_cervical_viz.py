"""Cervical overlays: mid-plane reformats with mask and prediction, and the vertebra crops, as PNGs."""

import numpy as np
import pytest
from matplotlib.image import imread

from spine.cervical.crops import run_crops
from spine.cervical.segment import run_segment
from spine.core.cli import stage_runner
from spine.core.config import REPO_ROOT, load_config
from spine.core.preprocess import run_preprocess
from spine.core.synth import generate
from tiny import SEGMENT_TINY

CONFIG = REPO_ROOT / "configs/cervical/demo.yaml"
TINY = SEGMENT_TINY


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """Stages 01-03 on 6 train (3 with a mask) + 1 test studies of 32 slices of 40²."""
    root = tmp_path_factory.mktemp("viz")
    generate("cervical", root / "data", 6, 1, seed=3, image_size=40, n_slices=32)
    cfg = load_config(CONFIG, [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY])
    run_preprocess(cfg)
    run_segment(cfg)
    run_crops(cfg)
    return cfg, root


def test_overlays_runner_writes_planes_and_crops(segmented):
    cfg, root = segmented
    run = stage_runner(cfg.task, "overlays", "plot_overlays")
    written = run(cfg, n=3, out=root / "png")
    names = sorted(p.name for p in written)
    assert len([n for n in names if n.endswith("_planes.png")]) == 3
    assert len([n for n in names if n.endswith("_crops.png")]) == 3
    for path in written:
        image = imread(path)
        assert path.stat().st_size > 5_000 and image.ndim == 3
        assert image[..., :3].std() > 0.05  # a picture, not a blank canvas


def test_plot_overlays_script_defaults_to_the_localize_folder(segmented, stage_script):
    cfg, root = segmented
    over = [f"data_dir={root / 'data'}", f"out_dir={root / 'out'}", *TINY]
    written = stage_script("plot_overlays").main(["--config", str(CONFIG), "--n", "1", *over])
    assert len(written) == 2 and all(p.parent.name == "overlays" and p.exists() for p in written)
    assert np.unique(imread(written[0])[..., :3].reshape(-1, 3), axis=0).shape[0] > 50  # colours drawn
