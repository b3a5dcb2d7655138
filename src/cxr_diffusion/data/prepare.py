"""Stage `prepare`: decode, square and resize every filtered image into Parquet shards.

Workers decode in parallel; results come back in table order and stream into the shard writers,
so memory stays flat as the dataset grows and the output is identical however many workers ran.
Everything is written into a temporary directory that replaces ``out_dir`` only when complete.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from cxr_diffusion.config import Params, to_dict
from cxr_diffusion.data.decode import DecodeError, encode_png, preprocess
from cxr_diffusion.data.filter import SPLITS
from cxr_diffusion.data.nih import DataError, is_safe_image_index
from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.data.sources import default_workers
from cxr_diffusion.io import atomic_directory, write_csv, write_json


@dataclass(frozen=True)
class _Job:
    position: int
    image_index: str
    path: str | None  # None when no usable path exists; the reason is in `problem`
    problem: str | None
    size: int
    square: str


@dataclass(frozen=True)
class _Outcome:
    position: int
    png: bytes | None
    reject_reason: str | None


def _process(job: _Job) -> _Outcome:
    if job.problem is not None:
        return _Outcome(job.position, None, job.problem)
    try:
        data = Path(job.path).read_bytes()
    except FileNotFoundError:
        return _Outcome(job.position, None, "missing_file")
    except OSError as error:
        return _Outcome(job.position, None, f"unreadable_file: {error.strerror}")
    try:
        return _Outcome(job.position, encode_png(preprocess(data, job.size, job.square)), None)
    except DecodeError as error:
        reason = "empty_file" if not data else f"decode_error: {error}"
        return _Outcome(job.position, None, reason)


def resolve_image_path(dataset_dir: Path, image_index: str, path: str) -> tuple[str | None, str | None]:
    """(path to open, None) or (None, reason). A path is opened only if it names this very image
    and, when relative, stays inside the dataset directory."""
    if not is_safe_image_index(image_index):
        return None, "unsafe_image_index"
    candidate = Path(path)
    if candidate.name != image_index:
        return None, "path_does_not_match_image_index"
    if not candidate.is_absolute():
        candidate = (dataset_dir / candidate).resolve()
        if not candidate.is_relative_to(dataset_dir.resolve()):
            return None, "path_outside_dataset"
    return str(candidate), None


def prepare_shards(params: Params, dataset_dir: str | Path, filtered_csv: str | Path, out_dir: str | Path,
                   metrics_path: str | Path | None = None, workers: int | None = None) -> dict:
    """Write the prepared shards, ``manifest.json`` and ``rejects.csv``; return the manifest."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    table = pd.read_csv(filtered_csv, dtype={"Image Index": str, "Finding Labels": str, "split": str})
    classes = tuple(params.filter.classes)
    missing_columns = [c for c in ("Image Index", "Patient ID", "View Position", "Finding Labels", "split") + classes
                       if c not in table.columns]
    if missing_columns:
        raise DataError(f"{filtered_csv}: missing column(s) {missing_columns}; rerun the filter stage "
                        f"(the filter params and this table disagree)")
    paths = pd.read_csv(dataset_dir / "image_paths.csv", dtype=str)
    path_of = dict(zip(paths["Image Index"], paths["path"]))
    jobs = []
    for position, name in enumerate(table["Image Index"]):
        path, problem = (None, "missing_file") if name not in path_of else resolve_image_path(dataset_dir, name, path_of[name])
        jobs.append(_Job(position, name, path, problem, params.image_size, params.prepare.square))

    workers = workers or params.prepare.workers or default_workers()
    schema = shard_schema(classes)
    rejects: list[tuple[str, str]] = []
    started = time.perf_counter()
    with atomic_directory(out_dir) as tmp:
        writers = {split: SplitShardWriter(tmp, split, schema, params.prepare.shard_size,
                                           params.prepare.row_group_size) for split in SPLITS}
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outcomes = pool.imap(_process, jobs, chunksize=16)
            for outcome in tqdm(outcomes, total=len(jobs), desc="prepare", unit="img"):
                row = table.iloc[outcome.position]
                if outcome.png is None:
                    rejects.append((row["Image Index"], outcome.reject_reason))
                    continue
                writers[row["split"]].write(ShardRecord(
                    image_png=outcome.png, image_index=row["Image Index"], patient_id=int(row["Patient ID"]),
                    view=row["View Position"], finding_labels=row["Finding Labels"], split=row["split"],
                    labels=tuple(int(row[c]) for c in classes),
                ))
        shards = close_writers(tmp, writers)
        rejects_frame = pd.DataFrame(rejects, columns=["Image Index", "reason"])
        write_csv(tmp / "rejects.csv", rejects_frame)
        written = sum(s["rows"] for s in shards)
        manifest = {
            "images_in": len(table),
            "written": written,
            "rejected": len(rejects),
            "rejected_by_reason": rejects_frame["reason"].str.split(":").str[0].value_counts().sort_index().to_dict(),
            "per_split": {split: sum(s["rows"] for s in shards if s["split"] == split) for split in SPLITS},
            "classes": list(classes),
            "image_size": params.image_size,
            "square": params.prepare.square,
            "shards": shards,
            "params": {"image_size": params.image_size, "prepare": to_dict(params.prepare)},
        }
        assert manifest["images_in"] == written + len(rejects), "prepare counts do not reconcile"
        write_json(tmp / MANIFEST, manifest)
    elapsed = time.perf_counter() - started
    if metrics_path is not None:
        summary = {k: manifest[k] for k in ("images_in", "written", "rejected", "rejected_by_reason", "per_split")}
        write_json(metrics_path, summary)
    tqdm.write(f"prepare: {written} written, {len(rejects)} rejected in {elapsed:.1f}s "
               f"({len(jobs) / max(elapsed, 1e-9):.1f} img/s, {workers} workers)")
    return manifest
