"""Stage 01: decode every series of a Kaggle-layout folder into cached .npy volumes + metadata tables.

Each series is read on its own (in a worker pool), its instances grouped into stacks of one image
size and orientation (tilted axial blocks become separate stacks, never one resized volume), each
stack ordered by position along its slice normal, and saved as ``{series}_{stack}.npy`` with a
per-series table. The per-series table is written last and atomically, so a series with that
table is complete: a rerun skips it, and an interrupted run leaves no partial file behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from spine.core import geometry
from spine.core.config import save_config
from spine.core.dicom import DicomError, read_instance
from spine.core.io import save_npy, save_table, save_text
from spine.core.parallel import resolve_workers, worker_pool
from spine.core.paths import Paths
from spine.registry import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesJob:
    split: str
    study_id: object
    series_id: object
    description: str
    folder: str


def list_jobs(task_name: str, data_dir: Path, splits) -> list[SeriesJob]:
    """Every series the competition files list for the given splits."""
    task = get_task(task_name)
    jobs = []
    for split in splits:
        table = task.list_series(data_dir, split)
        jobs += [SeriesJob(split, *row) for row in table.itertuples(index=False)]
    return jobs


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the folder's .dcm files in instance order, its other files: stray files recorded, not read)."""
    entries = [p for p in folder.iterdir() if p.is_file()]
    dcm = sorted((p for p in entries if p.suffix.lower() == ".dcm"), key=lambda p: (len(p.stem), p.stem))
    return dcm, sorted(p for p in entries if p.suffix.lower() != ".dcm")


def _stack_key(meta: dict) -> tuple:
    return (
        meta["rows"],
        meta["cols"],
        *(round(v, 3) for v in meta["iop"]),
        *(round(v, 4) for v in meta["pixel_spacing"]),
    )


def group_stacks(metas: list[dict]) -> list[list[int]]:
    """Group instances by image size, orientation and spacing; order each group along its normal.

    Returns lists of indices into ``metas``: one list per stack, stacks ordered by their mean
    position along the series' mean normal (so stack 0 is the lowest block). An image of another
    size than the rest of its series is kept as a stack of its own, never resized or dropped.
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(metas):
        groups.setdefault(_stack_key(m), []).append(i)
    stacks = []
    for idx in groups.values():
        ipp = np.array([metas[i]["ipp"] for i in idx])
        order = geometry.order_by_position(ipp, metas[idx[0]]["iop"])
        stacks.append([idx[k] for k in order])
    normal = geometry.slice_normal(np.array([metas[i]["iop"] for i in range(len(metas))]).mean(0))
    return sorted(stacks, key=lambda s: float(np.mean([np.dot(metas[i]["ipp"], normal) for i in s])))


def find_duplicates(metas: list[dict]) -> dict[int, int]:
    """Instances at the position of an earlier one of the same stack: {duplicate index: kept index}.

    Two images at one position cannot both be slices of a volume; the first (lowest instance
    number, by file order) is kept and the others are counted as failures, never silently merged.
    """
    seen: dict[tuple, int] = {}
    dups = {}
    for i, m in enumerate(metas):
        key = (*_stack_key(m), *(round(v, 3) for v in m["ipp"]))
        if key in seen:
            dups[i] = seen[key]
        else:
            seen[key] = i
    return dups


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Decoded slices come from the heap, and glibc keeps freed chunks below the heap's top mapped, so
    without this the slices already copied into the volume would still count: peak ~ two volumes.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


_LIBC = _load_libc()
TRIM_EVERY = 32  # slices copied between two trims (a trim costs ~0.1 ms)


def _assemble(pixels: list, idx: list[int]) -> np.ndarray:
    """Stack slices ``idx`` into one volume, releasing each slice as it is copied (peak ~ one volume)."""
    dtype = np.int16 if all(pixels[i].dtype == np.int16 for i in idx) else np.float32
    vol = np.empty((len(idx), *pixels[idx[0]].shape), dtype=dtype)
    for k, i in enumerate(idx):
        vol[k] = pixels[i]
        pixels[i] = None
        if k % TRIM_EVERY == TRIM_EVERY - 1:
            _release_freed_memory()
    return vol


# Failure reasons that say nothing about the data source (stray files, repeated slices): they are
# recorded like every failure but left out of the preprocess.max_failed_share check.
BENIGN_REASONS = ("duplicate position", "not a .dcm file")


def _fail(base: dict, file, reason: str, message: str) -> dict:
    return {**base, "file": str(file), "status": message, "reason": reason}


def _read_files(files: list[Path], base: dict):
    """Decode each file; a file that fails becomes a failure row, the rest (pixels, meta, file)."""
    pixels, metas, ok_files, failed = [], [], [], []
    for f in files:
        try:
            px, meta = read_instance(f)
        except DicomError as e:
            log.warning("skipped %s", e)
            failed.append(_fail(base, f, e.reason, str(e)))
            continue
        pixels.append(px)
        metas.append(meta)
        ok_files.append(f)
    return pixels, metas, ok_files, failed


def cache_series(job: SeriesJob, paths: Paths) -> tuple[list[dict], list[dict]]:
    """Decode, order and save one series. Returns (stack rows, instance rows); errors are rows too.

    Every file of the folder gets an instance row: ``status`` "ok", or a message naming the file and
    the fix, with a short ``reason``. Stray non-.dcm files, unreadable files and a second image at
    the same position are such rows; the series still gets a row (stack -1) when nothing is usable.
    """
    folder = Path(job.folder)
    base = {"split": job.split, "study_id": job.study_id, "series_id": job.series_id}
    files, strays = _files(folder) if folder.is_dir() else ([], [])
    rows = [_fail(base, f, "not a .dcm file", f"{f}: not a .dcm file; ignored") for f in strays]
    if not folder.is_dir():
        rows.append(_fail(base, folder, "missing series folder", "missing series folder"))
    elif not files:
        rows.append(_fail(base, folder, "no .dcm files", "no .dcm files in series folder"))
    pixels, metas, ok_files, failed = _read_files(files, base)
    rows += failed
    dups = find_duplicates(metas)
    for i, kept in dups.items():
        msg = f"{ok_files[i]}: same position as {ok_files[kept].name} (ImagePositionPatient); kept that one"
        rows.append(_fail(base, ok_files[i], "duplicate position", msg))
    keep = [i for i in range(len(metas)) if i not in dups]

    series_rows = []
    for s, sub in enumerate(group_stacks([metas[i] for i in keep]) if keep else []):
        idx = [keep[k] for k in sub]
        vol = _assemble(pixels, idx)
        save_npy(paths.volume(job.split, job.study_id, job.series_id, s), vol)
        rows += [
            {
                **base,
                "file": str(ok_files[i]),
                "status": "ok",
                "reason": None,
                **_instance_columns(metas[i]),
                "stack": s,
                "index": k,
            }
            for k, i in enumerate(idx)
        ]
        series_rows.append(
            {
                **base,
                "description": job.description,
                "stack": s,
                "status": "ok",
                "reason": None,
                **_stack_columns(metas, idx, vol, paths, job, s),
            }
        )
    if not series_rows:  # nothing readable: the series still gets a row that says why
        real = [r for r in rows if r["reason"] not in BENIGN_REASONS]
        status, reason = (
            (real[0]["status"], real[0]["reason"])
            if not files
            else ("no readable instance", "no readable instance")
        )
        series_rows = [
            {**base, "description": job.description, "stack": -1, "status": status, "reason": reason}
        ]
    n_failed = sum(r["status"] != "ok" for r in rows if r["file"] != str(folder))
    for r in series_rows:
        r.update(n_files=len(files) + len(strays), n_failed=n_failed)
    # written last and atomically: its presence means every volume of the series is on disk
    done = json.dumps({"stacks": series_rows, "instances": rows}, default=_plain)
    save_text(paths.series_done(job.split, job.study_id, job.series_id), done)
    return series_rows, rows


def _plain(value):
    """JSON fallback for numpy scalars."""
    return value.item()


def _instance_columns(m: dict) -> dict:
    out = {
        "instance_number": m["instance_number"],
        "rows": m["rows"],
        "cols": m["cols"],
        "spacing_row": m["pixel_spacing"][0],
        "spacing_col": m["pixel_spacing"][1],
        "slice_thickness": m["slice_thickness"],
        "transfer_syntax": m["transfer_syntax"],
    }
    out.update({f"ipp_{a}": v for a, v in zip("xyz", m["ipp"])})
    out.update({f"iop_{k}": v for k, v in enumerate(m["iop"])})
    return out


def _stack_columns(metas, idx, vol, paths: Paths, job: SeriesJob, s: int) -> dict:
    first = metas[idx[0]]
    pos = geometry.slice_positions(np.array([metas[i]["ipp"] for i in idx]), first["iop"])
    normal = geometry.slice_normal(first["iop"])
    return {
        "n_slices": len(idx),
        "rows": first["rows"],
        "cols": first["cols"],
        "spacing_row": first["pixel_spacing"][0],
        "spacing_col": first["pixel_spacing"][1],
        "slice_thickness": first["slice_thickness"],
        "slice_spacing": float(np.median(np.diff(pos))) if len(idx) > 1 else np.nan,
        "orientation": geometry.orientation_class(first["iop"]),
        **{f"normal_{a}": v for a, v in zip("xyz", normal)},
        **{f"iop_{k}": v for k, v in enumerate(first["iop"])},
        "dtype": str(vol.dtype),
        "path": str(paths.volume(job.split, job.study_id, job.series_id, s).relative_to(paths.cache_dir)),
    }


def _fingerprint(jobs: list[SeriesJob], data_dir: Path) -> str:
    listing = "\n".join(f"{j.split}/{j.study_id}/{j.series_id}" for j in jobs)
    digest = hashlib.sha1(listing.encode()).hexdigest()
    return f"data_dir: {Path(data_dir).resolve()}\nseries_listing_sha1: {digest}\n"


def _check_source(paths: Paths, jobs: list[SeriesJob], overwrite: bool) -> None:
    """Refuse to mix a cache built from other data with this data, unless asked to rebuild."""
    want = _fingerprint(jobs, paths.data_dir)
    if paths.cache_source.exists() and paths.cache_source.read_text() != want:
        if not overwrite:
            raise RuntimeError(
                f"the cache {paths.cache_dir} was built from other data:\n{paths.cache_source.read_text()}"
                f"Rebuild it with preprocess.overwrite=true, or pass another out_dir=."
            )
    if overwrite and paths.cache_dir.exists():
        shutil.rmtree(paths.cache_dir)
    save_text(paths.cache_source, want)


def _first_per_split(jobs: list[SeriesJob], n: int) -> list[SeriesJob]:
    counts: dict[str, int] = {}
    keep = []
    for j in jobs:
        counts[j.split] = counts.get(j.split, 0) + 1
        if counts[j.split] <= n:
            keep.append(j)
    return keep


@dataclass
class SeriesResult:
    """What a worker sends back for one series: counts and its failure rows (the rest stays on disk)."""

    job: SeriesJob
    images: int = 0
    checked: int = 0  # files that count for preprocess.max_failed_share (BENIGN_REASONS left out)
    failures: list = field(default_factory=list)


def _work(args) -> SeriesResult:
    """Cache one series unless done."""
    job, paths, done = args
    if done:
        return SeriesResult(job)
    _, inst = cache_series(job, paths)
    real = [r for r in inst if r.get("reason") not in BENIGN_REASONS]
    failures = [r for r in real if r["status"] != "ok"]
    return SeriesResult(job, len(real) - len(failures), len(real), failures)


class FailureGate:
    """Stops stage 01 when more than ``max_share`` of a split's files fail (a wrong data_dir, a missing
    decoder): checked early, once a split has ``early_files`` files, and at the end over all of it."""

    early_files = 1000

    def __init__(self, max_share: float, paths: Paths):
        self.max_share, self.paths = float(max_share), paths
        self.checked: dict[str, int] = {}
        self.failures: dict[str, list] = {}

    def add(self, result: SeriesResult) -> None:
        """Count one series' files; raise early when its split is already over the limit."""
        split = result.job.split
        self.checked[split] = self.checked.get(split, 0) + result.checked
        self.failures.setdefault(split, []).extend(result.failures)
        if self.checked[split] >= self.early_files:
            self.check(split, self.checked[split], self.failures[split])

    def check(self, split: str, n_checked: int, failures: list) -> None:
        """Raise when the failed share of ``split`` is above the limit; forget the failed series first
        so that a rerun after the fix decodes them again."""
        if not n_checked or len(failures) / n_checked <= self.max_share:
            return
        for key in {(r["split"], r["study_id"], r["series_id"]) for r in failures}:
            self.paths.series_done(*key).unlink(missing_ok=True)
        first = "\n".join(f"  {r['file']}: [{r['reason']}] {r['status']}" for r in failures[:5])
        raise RuntimeError(
            f"stage 01: {len(failures)} of {n_checked} files of split '{split}' failed "
            f"({len(failures) / n_checked:.0%}), more than preprocess.max_failed_share={self.max_share}. "
            f"Is data_dir right ({self.paths.data_dir}), is every decoder installed? First failures:\n"
            f"{first}\nFix the cause and rerun (the failed series are decoded again), or raise "
            "preprocess.max_failed_share (1.0 never stops)."
        )


def run_preprocess(cfg) -> dict:
    """Stage 01 over every series of ``cfg.preprocess.splits``. Returns the run summary."""
    paths = Paths.from_config(cfg)
    jobs = list_jobs(cfg.task, paths.data_dir, cfg.preprocess.splits)
    _check_source(paths, jobs, bool(cfg.preprocess.overwrite))
    if cfg.preprocess.limit:
        jobs = _first_per_split(jobs, int(cfg.preprocess.limit))
    todo = [(j, paths, paths.series_done(j.split, j.study_id, j.series_id).exists()) for j in jobs]
    n_new = sum(not done for _, _, done in todo)
    workers = resolve_workers(cfg.num_workers)
    log.info(
        "stage 01: %d series (%d to decode, %d cached) with %d workers",
        len(jobs),
        n_new,
        len(jobs) - n_new,
        workers,
    )
    t0, n_images = time.perf_counter(), 0
    gate = FailureGate(cfg.preprocess.max_failed_share, paths)
    bar = tqdm(total=len(jobs), desc="preprocess", unit="series")
    with worker_pool(workers, n_new) as pool:
        for result in pool(_work, todo):
            n_images += result.images
            gate.add(result)
            bar.update()
            bar.set_postfix(images=n_images)
    bar.close()
    seconds = time.perf_counter() - t0
    series, inst = _merge_tables(paths, jobs)
    failures = inst[inst["status"] != "ok"][["split", "study_id", "series_id", "file", "reason", "status"]]
    save_table(paths.failure_table, failures)
    for split, g in inst.groupby("split"):  # the whole split, cached series included
        real = g[~g["reason"].isin(BENIGN_REASONS)]
        gate.check(split, len(real), real[real["status"] != "ok"].to_dict("records"))
    by_reason = failures["reason"].fillna("unknown").value_counts()
    summary = {
        "series": len(jobs),
        "series_decoded": n_new,
        "series_skipped_cached": len(jobs) - n_new,
        "stacks": int((series["status"] == "ok").sum()),
        "images": int((inst["status"] == "ok").sum()),
        "images_decoded": n_images,
        "failures": len(failures),
        "failures_by_reason": {str(k): int(v) for k, v in by_reason.items()},
        "seconds": round(seconds, 2),
        "images_per_s": round(n_images / seconds, 1) if seconds > 0 else 0.0,
        "cache_dir": str(paths.cache_dir),
    }
    save_config(cfg, paths.cache_dir)
    return summary


def _merge_tables(paths: Paths, jobs: list[SeriesJob]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the per-series records into series.parquet and instances.parquet."""
    stacks, instances = [], []
    for j in jobs:
        done = json.loads(paths.series_done(j.split, j.study_id, j.series_id).read_text())
        stacks += done["stacks"]
        instances += done["instances"]
    series, inst = pd.DataFrame(stacks), pd.DataFrame(instances)
    for col in ("instance_number", "rows", "cols", "stack", "index"):  # NaN on failed rows: keep ints
        if col in inst:
            inst[col] = inst[col].astype("Int64")
    save_table(paths.series_table, series)
    save_table(paths.instance_table, inst)
    return series, inst


def load_volume(paths: Paths, row, mmap: bool = True) -> np.ndarray:
    """The cached volume of one stack row of series.parquet (memory-mapped by default)."""
    return np.load(paths.cache_dir / row["path"], mmap_mode="r" if mmap else None)
