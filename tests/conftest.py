"""Fixtures shared by the test files: the stage-script loader and the two tiny end-to-end pipelines
(built once per session; the end-to-end, stage-06 and bad-input tests all read them)."""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spine.core.config import REPO_ROOT
from spine.core.synth import generate
from tiny import CERVICAL_TINY, LUMBAR_TINY

STAGES = ("01_preprocess", "02_localize", "03_crop", "04_train", "05_ensemble", "06_predict")


@dataclass
class Pipeline:
    """One config's stages 01 to 06 run on a tiny generated set (``root/data`` -> ``root/out``)."""

    root: Path
    config: str
    tiny: list[str]
    reports: dict = field(default_factory=dict)

    def args(self, data: Path | None = None, out: Path | None = None, *extra: str) -> list[str]:
        data, out = data or self.root / "data", out or self.root / "out"
        return ["--config", self.config, f"data_dir={data}", f"out_dir={out}", *self.tiny, *extra]


@pytest.fixture(scope="session")
def stage_script():
    """Load a script of ``src/`` (e.g. ``"02_localize"``) as a module; its ``main(argv)`` runs it."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "src" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _run(pipe: Pipeline, stage_script) -> Pipeline:
    for stage in STAGES:
        pipe.reports[stage] = stage_script(stage).main(pipe.args())
    return pipe


@pytest.fixture(scope="session")
def lumbar_pipeline(tmp_path_factory, stage_script) -> Pipeline:
    """9 train + 3 test lumbar studies; two members (2.5D and 3D) stacked."""
    root = tmp_path_factory.mktemp("lumbar_e2e")
    generate("lumbar", root / "data", 9, 3, seed=21, image_size=48)
    return _run(Pipeline(root, "configs/lumbar/demo.yaml", LUMBAR_TINY), stage_script)


@pytest.fixture(scope="session")
def cervical_pipeline(tmp_path_factory, stage_script) -> Pipeline:
    """9 train studies (3 with a mask) + 3 test studies (the generator drops one); two members."""
    root = tmp_path_factory.mktemp("cervical_e2e")
    generate("cervical", root / "data", 9, 3, seed=5, image_size=48, n_slices=40)
    return _run(Pipeline(root, "configs/cervical/demo.yaml", CERVICAL_TINY), stage_script)
