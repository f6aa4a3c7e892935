"""Every artifact path of the pipeline, in one place. Stages never retype a path string."""

from __future__ import annotations

from pathlib import Path


def truth_dir(data_dir: Path) -> Path:
    """Folder beside a generated data folder with the generator's ground truth.

    The pipeline never reads it to make predictions; reports read it to show the learnable signal.
    """
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name}_truth"


def require(path: Path, stage: str) -> Path:
    """``path`` if it exists, else a clear error naming the stage that makes it."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path} is missing: run `python src/{stage}.py` first with the same config (data_dir, out_dir)"
        )
    return Path(path)


class Paths:
    """Artifact layout under ``out_dir`` for one task and experiment.

    out_dir/cache/<task>/                        stage 01: series volumes + metadata tables
    out_dir/folds/<task>.csv                     study folds shared by every model
    model_root/models/<task>/<exp>/fold{k}_seed{s}.pt   (model_root = out_dir unless `models_from` is set)
    out_dir/oof/<task>/<exp>/oof.csv
    out_dir/submissions/<task>_<exp>.csv

    Trained models are read from ``model_root``: stage 06 on Kaggle writes its work under
    /kaggle/working while the models come from a read-only dataset folder.
    """

    def __init__(self, data_dir, out_dir, task: str, exp: str, model_root=None):
        self.data_dir = Path(data_dir)
        self.out_dir = Path(out_dir)
        self.model_root = Path(model_root) if model_root is not None else self.out_dir
        self.task = task
        self.exp = exp

    @classmethod
    def from_config(cls, cfg) -> Paths:
        return cls(cfg.data_dir, cfg.out_dir, cfg.task, cfg.exp, cfg.get("models_from"))

    @property
    def models_dir(self) -> Path:
        """Every trained model of the task (localizer, segmenter, classifiers, ensembles)."""
        return self.model_root / "models" / self.task

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

    # Stage 02: localization (one table for all studies: OOF for train, fold mean for test)
    @property
    def folds(self) -> Path:
        """Study folds shared by every model of the task (localizer and classifiers alike)."""
        return self.out_dir / "folds" / f"{self.task}.csv"

    @property
    def localize_dir(self) -> Path:
        return self.out_dir / "localize" / self.task

    def localizer_checkpoint(self, series_kind: str, fold: int, seed: int) -> Path:
        return self.models_dir / "localizer" / f"{series_kind}_fold{fold}_seed{seed}.pt"

    def localizer_predictions(self, series_kind: str, fold: int) -> Path:
        """One fold's predictions (its held-out train studies and every test study); marks the fold done."""
        return self.localize_dir / "folds" / f"{series_kind}_fold{fold}.csv"

    @property
    def points(self) -> Path:
        return self.localize_dir / "points.csv"

    @property
    def localize_report(self) -> Path:
        return self.localize_dir / "report.json"

    # Stage 02, cervical: vertebra segmentation
    def segmenter_checkpoint(self, fold: int, seed: int, part: str = "") -> Path:
        """A fold's segmenter; ``part`` names a second model of the stage (cervical: ``neck``, the first
        pass that finds the neck on the whole stack)."""
        return self.models_dir / "segmenter" / f"{part + '_' if part else ''}fold{fold}_seed{seed}.pt"

    def segmenter_predictions(self, fold: int) -> Path:
        """One fold's per-vertebra table of its held-out segmented studies (OOF); marks the fold done."""
        return self.localize_dir / "folds" / f"segmenter_fold{fold}.csv"

    def segmenter_slices(self, fold: int) -> Path:
        """Per-slice vertebra probabilities of one fold's held-out segmented studies."""
        return self.localize_dir / "folds" / f"segmenter_fold{fold}_slices.parquet"

    @property
    def segmenter_mean_predictions(self) -> Path:
        """Per-vertebra table of every other study, from the mean of the fold models; marks it done."""
        return self.localize_dir / "folds" / "segmenter_fold_mean.csv"

    @property
    def segmenter_mean_slices(self) -> Path:
        return self.localize_dir / "folds" / "segmenter_fold_mean_slices.parquet"

    @property
    def vertebrae(self) -> Path:
        """One row per (study, vertebra C1..C7): slice range, 3D box in the cached stack, found flag."""
        return self.localize_dir / "vertebrae.csv"

    @property
    def slice_labels(self) -> Path:
        """Per-slice vertebra probabilities of every study (the segmenter's output, reduced)."""
        return self.localize_dir / "slices.parquet"

    # Stage 03: crops
    @property
    def crop_dir(self) -> Path:
        return self.out_dir / "crops" / self.task

    def crop_array(self, split: str, study_id, view: str) -> Path:
        """(rows, slices, pixels, pixels) float16 crops of one study and view ('sag' or 'ax')."""
        return self.crop_dir / split / f"{study_id}_{view}.npy"

    def crop_study_manifest(self, split: str, study_id) -> Path:
        """Per-study manifest rows; written last, so its presence marks the study done."""
        return self.crop_dir / split / f"{study_id}.manifest.json"

    @property
    def crop_manifest(self) -> Path:
        return self.crop_dir / "manifest.parquet"

    @property
    def crop_report(self) -> Path:
        return self.crop_dir / "report.json"

    # Stages 04-06

    @property
    def model_dir(self) -> Path:
        return self.models_dir / self.exp

    def checkpoint(self, fold: int, seed: int) -> Path:
        return self.model_dir / f"fold{fold}_seed{seed}.pt"

    @property
    def oof(self) -> Path:
        """Every labelled train row's out-of-fold prediction (written when all folds are done)."""
        return self.out_dir / "oof" / self.task / self.exp / "oof.csv"

    def oof_fold(self, fold: int) -> Path:
        """One fold's held-out predictions; marks the fold done."""
        return self.out_dir / "oof" / self.task / self.exp / f"fold{fold}.csv"

    @property
    def train_report(self) -> Path:
        return self.out_dir / "oof" / self.task / self.exp / "report.json"

    # Stage 05: the ensemble of the experiments named by `ensemble.members`, under this config's exp
    @property
    def ensemble_name(self) -> str:
        return f"ensemble_{self.exp}"

    @property
    def ensemble_spec(self) -> Path:
        """The chosen stacker, its fitted parameters and the members it reads (JSON)."""
        return self.models_dir / self.ensemble_name / "spec.json"

    @property
    def ensemble_oof(self) -> Path:
        return self.out_dir / "oof" / self.task / self.ensemble_name / "oof.csv"

    @property
    def ensemble_report(self) -> Path:
        return self.out_dir / "oof" / self.task / self.ensemble_name / "report.json"

    # Stage 06
    @property
    def predict_dir(self) -> Path:
        """Stage 06's own cache, localization and crops of the test split (apart from training's)."""
        return self.out_dir / "predict" / self.task / self.exp

    @property
    def predict_report(self) -> Path:
        return self.out_dir / "submissions" / f"{self.task}_{self.exp}.report.json"

    @property
    def submission(self) -> Path:
        return self.out_dir / "submissions" / f"{self.task}_{self.exp}.csv"

    @property
    def truth_dir(self) -> Path:
        return truth_dir(self.data_dir)
