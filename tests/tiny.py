"""Config overrides that shrink the demo configs to test size, shared by the test files."""

# Lumbar 3D classifier on labelled points (stage 04 without stage 02).
CLASSIFY_TINY = [
    "num_workers=1",
    "folds.n_folds=2",
    "crop.points=label",
    "crop.pixels=32",
    "train.model=cnn3d",
    "train.width_3d=4",
    "train.epochs=1",
    "train.batch_size=8",
    "train.loader_workers=0",
]
# The cervical segmenter's first pass (the demo configs have none: their scans are narrow).
NECK_TINY = (
    "segment.neck={voxel_mm: [8, 8, 8], field_mm: [640, 64, 64], widths: [4, 8], epochs: 1, "
    "margin_mm: [5, 30]}"
)
# Cervical segmenter (stage 02) on 40² studies.
SEGMENT_TINY = [
    "num_workers=1",
    "folds.n_folds=2",
    "segment.voxel_mm=[8,8,8]",
    "segment.field_mm=[64,64,64]",
    "segment.widths=[4,8]",
    NECK_TINY,
    "segment.epochs=1",
    "segment.batch=2",
    "segment.min_voxels=1",
    "segment.loader_workers=0",
]
# The end-to-end pipelines of conftest (stages 01-06, both families stacked).
LUMBAR_TINY = [
    "num_workers=1",
    "folds.n_folds=3",
    "localize.epochs=1",
    "localize.image_size=48",
    "crop.pixels=24",
    "train.epochs=1",
    "train.batch_size=16",
    "train.width_3d=4",
    "ensemble.lgbm_rounds=20",
    "ensemble.members=[configs/lumbar/demo.yaml,configs/lumbar/demo_3d.yaml]",
]
CERVICAL_TINY = [
    "num_workers=1",
    "folds.n_folds=3",
    "segment.voxel_mm=[8,8,8]",
    "segment.field_mm=[64,64,64]",
    "segment.widths=[4,8]",
    NECK_TINY,
    "segment.epochs=2",
    "segment.min_voxels=1",
    "crop.depth=8",
    "crop.pixels=32",
    "train.n_seq=4",
    "train.width_3d=4",
    "train.epochs=1",
    "ensemble.lgbm_rounds=20",
    "ensemble.members=[configs/cervical/demo.yaml,configs/cervical/demo_3d.yaml]",
]
# The spider segmenter (stages 01-02) on tiny generated .mha images.
SPIDER_TINY = [
    "folds.n_folds=2",
    "preprocess.grid_mm=4.0",
    "segment.crop_px=64",
    "segment.epochs=1",
    "segment.batch=8",
    "segment.mirror=false",
    "hernia.epochs=1",
]
