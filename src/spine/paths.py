"""Every artifact path of the pipeline, in one place. Stages never retype a path string."""

from __future__ import annotations

from pathlib import Path


def truth_dir(data_dir: Path) -> Path:
    """Folder beside a generated data folder with the generator's ground truth.

    The pipeline never reads it to make predictions; reports read it to show the learnable signal.
    """
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name}_truth"


class Paths:
    """Artifact layout under ``out_dir`` for one task and experiment.

    out_dir/cache/<task>/                        stage 01: series volumes + metadata tables
    out_dir/folds/<task>.csv                     study folds shared by every model
    out_dir/models/<task>/<exp>/fold{k}_seed{s}.pt
    out_dir/oof/<task>/<exp>/oof.csv
    out_dir/submissions/<task>_<exp>.csv
    """

    def __init__(self, data_dir, out_dir, task: str, exp: str):
        self.data_dir = Path(data_dir)
        self.out_dir = Path(out_dir)
        self.task = task
        self.exp = exp

    @classmethod
    def from_config(cls, cfg) -> Paths:
        return cls(cfg.data_dir, cfg.out_dir, cfg.task, cfg.exp)

    # Stage 01
    @property
    def cache_dir(self) -> Path:
        return self.out_dir / "cache" / self.task

    def volume(self, split: str, study_id, series_id, stack: int) -> Path:
        return self.cache_dir / split / str(study_id) / f"{series_id}_{stack}.npy"

    def series_done(self, split: str, study_id, series_id) -> Path:
        """Per-series stacks and instances (JSON); its presence marks the series as done."""
        return self.cache_dir / split / str(study_id) / f"{series_id}.done.json"

    @property
    def series_table(self) -> Path:
        return self.cache_dir / "series.parquet"

    @property
    def instance_table(self) -> Path:
        return self.cache_dir / "instances.parquet"

    @property
    def failure_table(self) -> Path:
        return self.cache_dir / "failures.csv"

    @property
    def cache_source(self) -> Path:
        """Records which data_dir the cache was built from, so a mix-up is caught."""
        return self.cache_dir / "source.txt"

    # Later stages
    @property
    def folds(self) -> Path:
        return self.out_dir / "folds" / f"{self.task}.csv"

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "models" / self.task / self.exp

    def checkpoint(self, fold: int, seed: int) -> Path:
        return self.model_dir / f"fold{fold}_seed{seed}.pt"

    @property
    def oof(self) -> Path:
        return self.out_dir / "oof" / self.task / self.exp / "oof.csv"

    @property
    def submission(self) -> Path:
        return self.out_dir / "submissions" / f"{self.task}_{self.exp}.csv"

    @property
    def truth_dir(self) -> Path:
        return truth_dir(self.data_dir)
