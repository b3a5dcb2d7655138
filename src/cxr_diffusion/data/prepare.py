"""Stage `prepare`: decode, square and resize every filtered image into Parquet shards.

Workers decode in parallel; results come back in table order and stream into the shard writers,
so memory stays flat as the dataset grows and the output is identical however many workers ran.
Everything is written into a temporary directory that replaces ``out_dir`` only when complete.

Every image problem is a listed reject in ``rejects.csv`` with a stable reason (the same file gives
the same text on every run). A file is opened only if its real path (symlinks followed) lies inside
an allowed root (``image_roots``); a worker that dies (the OOM killer) fails the stage with one line.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from cxr_diffusion.config import Params, to_dict
from cxr_diffusion.data.decode import DecodeBudget, DecodeError, encode_png, preprocess, read_image_file
from cxr_diffusion.data.filter import SPLITS, film_rules
from cxr_diffusion.data.filtered_table import check_split_table, read_filtered_csv
from cxr_diffusion.data.image_paths import read_image_paths
from cxr_diffusion.data.nih import DataError, is_safe_image_index
from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.data.sources import default_workers
from cxr_diffusion.io import atomic_directory, write_csv, write_json

_CHUNK = 16               # images per worker task: amortises the round trip between processes
_CHUNKS_PER_WORKER = 4    # tasks queued per worker: keeps workers busy, bounds what is held in memory


@dataclass(frozen=True)
class _Job:
    position: int
    image_index: str
    path: str | None  # None when no usable path exists; the reason is in `problem`
    problem: str | None
    size: int
    square: str
    budget: DecodeBudget


@dataclass(frozen=True)
class _Outcome:
    position: int
    png: bytes | None
    reject_reason: str | None


def _process(job: _Job) -> _Outcome:
    if job.problem is not None:
        return _Outcome(job.position, None, job.problem)
    try:
        data = read_image_file(job.path, job.budget)
        return _Outcome(job.position, encode_png(preprocess(data, job.size, job.square, job.budget)), None)
    except DecodeError as error:
        return _Outcome(job.position, None, str(error))


def _process_chunk(jobs: Sequence[_Job]) -> list[_Outcome]:
    return [_process(job) for job in jobs]


def _decode_in_workers(jobs: Sequence[_Job], workers: int) -> Iterator[_Outcome]:
    """Outcomes in job order, streamed: at most ``workers * _CHUNKS_PER_WORKER`` tasks in flight.

    A process pool that loses a worker (killed by the OOM killer or a signal) raises
    ``BrokenProcessPool`` for every task in flight, where ``multiprocessing.Pool`` would wait forever."""
    pending: deque[Future] = deque()
    processes = max(1, min(workers, -(-len(jobs) // _CHUNK)))  # no more processes than tasks
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as executor:
        try:
            for start in range(0, len(jobs), _CHUNK):
                pending.append(executor.submit(_process_chunk, jobs[start:start + _CHUNK]))
                if len(pending) >= workers * _CHUNKS_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise DataError(f"prepare: a decode worker died (killed by the system, most likely out of memory); "
                            f"lower prepare.workers (was {workers}) or prepare.max_pixels and rerun") from None
        finally:
            for future in pending:
                future.cancel()


def image_roots(params: Params, dataset_dir: Path) -> tuple[Path, ...]:
    """The folders whose files prepare may open (real paths): the dataset stage's output, where the
    phantom's images and every relative path lie, and for ``dataset.source: nih`` the download at
    ``dataset.nih_root`` that image_paths.csv names by absolute path. Nothing else, via symlink or not."""
    roots = [dataset_dir.resolve()]
    if params.dataset.source == "nih":
        roots.append(Path(params.dataset.nih_root).expanduser().resolve())
    return tuple(roots)


def resolve_image_path(dataset_dir: Path, image_index: str, path: str,
                       roots: Sequence[Path]) -> tuple[str | None, str | None]:
    """(real path to open, None) or (None, reason). A path is opened only if it names this very image
    and its real path (relative to ``dataset_dir`` when relative, every symlink followed) lies inside
    one of ``roots``."""
    if not is_safe_image_index(image_index):
        return None, "unsafe_image_index"
    candidate = Path(path)
    if candidate.name != image_index:
        return None, "path_does_not_match_image_index"
    real = Path(os.path.realpath(dataset_dir / candidate))  # an absolute `candidate` replaces dataset_dir
    if not any(real.is_relative_to(root) for root in roots):
        return None, "path_outside_dataset"
    return str(real), None


def prepare_shards(params: Params, dataset_dir: str | Path, filtered_csv: str | Path, out_dir: str | Path,
                   metrics_path: str | Path | None = None, workers: int | None = None) -> dict:
    """Write the prepared shards, ``manifest.json`` and ``rejects.csv``; return the manifest."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    table = read_filtered_csv(filtered_csv, dtype=str, keep_default_na=False)  # labels: ints once checked
    classes = tuple(params.filter.classes)
    missing_columns = [c for c in ("Image Index", "Patient ID", "View Position", "Finding Labels", "split") + classes
                       if c not in table.columns]
    if missing_columns:
        raise DataError(f"{filtered_csv}: missing column(s) {missing_columns}; rerun the filter stage "
                        f"(the filter params and this table disagree)")
    # Before a worker starts or a shard is made.
    table = check_split_table(filtered_csv, table, film_rules(params.filter), SPLITS)
    paths = read_image_paths(dataset_dir / "image_paths.csv")
    path_of = dict(zip(paths["Image Index"], paths["path"]))
    roots, budget = image_roots(params, dataset_dir), DecodeBudget.from_config(params.prepare)
    jobs = []
    for position, name in enumerate(table["Image Index"]):
        path, problem = ((None, "missing_file") if name not in path_of
                         else resolve_image_path(dataset_dir, name, path_of[name], roots))
        jobs.append(_Job(position, name, path, problem, params.image_size, params.prepare.square, budget))

    workers = workers or params.prepare.workers or default_workers()
    schema = shard_schema(classes)
    rejects: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    with atomic_directory(out_dir) as tmp:
        writers = {split: SplitShardWriter(tmp, split, schema, params.prepare.shard_size,
                                           params.prepare.row_group_size) for split in SPLITS}
        with closing(_decode_in_workers(jobs, workers)) as outcomes:  # an error below stops the workers at once
            for outcome in tqdm(outcomes, total=len(jobs), desc="prepare", unit="img"):
                row = table.iloc[outcome.position]
                if outcome.png is None:
                    rejects.append((row["Image Index"], row["split"], outcome.reject_reason))
                    continue
                writers[row["split"]].write(ShardRecord(
                    image_png=outcome.png, image_index=row["Image Index"], patient_id=row["Patient ID"],
                    view=row["View Position"], finding_labels=row["Finding Labels"], split=row["split"],
                    labels=tuple(int(row[c]) for c in classes),
                ))
        shards = close_writers(tmp, writers)
        rejects_frame = pd.DataFrame(rejects, columns=["Image Index", "split", "reason"])
        written = sum(s["rows"] for s in shards)
        _refuse_an_emptied_split(table, shards, rejects_frame)  # before the last good output is replaced
        write_csv(tmp / "rejects.csv", rejects_frame)
        manifest = {
            "images_in": len(table),
            "written": written,
            "rejected": len(rejects),
            "rejected_by_reason": rejects_frame["reason"].str.split(":").str[0].value_counts().sort_index().to_dict(),
            "per_split": {split: sum(s["rows"] for s in shards if s["split"] == split) for split in SPLITS},
            "rejected_per_split": {split: int((rejects_frame["split"] == split).sum()) for split in SPLITS},
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
        summary = {k: manifest[k] for k in ("images_in", "written", "rejected", "rejected_by_reason", "per_split",
                                            "rejected_per_split")}
        write_json(metrics_path, summary)
    tqdm.write(f"prepare: {written} written, {len(rejects)} rejected in {elapsed:.1f}s "
               f"({len(jobs) / max(elapsed, 1e-9):.1f} img/s, {workers} workers)")
    return manifest


def _refuse_an_emptied_split(table: pd.DataFrame, shards: list[dict], rejects: pd.DataFrame) -> None:
    """A split the filter filled whose every image was rejected (an unreadable copy, a failed mount) would
    replace the last good prepared images with none, and score every later metric over nothing: one line
    naming the split and the reasons instead, the last output kept."""
    for split in SPLITS:
        images_in = int((table["split"] == split).sum())
        if images_in and not sum(shard["rows"] for shard in shards if shard["split"] == split):
            reasons = rejects.loc[rejects["split"] == split, "reason"].str.split(":").str[0].value_counts()
            listed = ", ".join(f"{reason} {count}" for reason, count in reasons.sort_index().items())
            raise DataError(f"prepare: every one of the {images_in:,} images of the {split} split was rejected "
                            f"(rejects: {listed}); the last prepared images are kept. Check the images under "
                            f"dataset.nih_root (or the phantom's) and rerun `dvc repro prepare`")
