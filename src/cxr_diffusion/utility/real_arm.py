"""Stage `utility_real`: the real-only arm of the utility study, trained once for every branch on a seeded
subset of N real train images, and its probabilities on the real test split (the baseline of the paired
differences). Also what the branch stages share with it: the test images and the scores file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_diffusion.config import Params
from cxr_diffusion.data.shards import PreparedImages, check_prepared_for, iter_row_groups
from cxr_diffusion.device import describe_device, resolve_device
from cxr_diffusion.errors import UserError
from cxr_diffusion.utility.statistics import macro_auroc_of
from cxr_diffusion.io import atomic_directory, atomic_path, read_json, require_regular_file, write_json
from cxr_diffusion.utility.arms import ArmImages, predict, train_arm
from cxr_diffusion.utility.images import classifier_side, read_arm_images, train_subset
from cxr_diffusion.whole_number import is_whole_number
from cxr_diffusion.safe_text import shown_value

SCORES = "test_scores.parquet"
REAL_ARM = "real_arm.json"
REAL = "real"


class UtilityError(UserError, ValueError):
    """The utility study cannot run on these inputs; the message names the file and what to do."""


@dataclass(frozen=True)
class TestSplit:
    """The whole real test split, as every arm is scored on it: images, ids and patient ids in row order."""

    images: ArmImages
    image_indices: list[str]
    patients: list[str]  # the bootstrap resamples patients, not images


def test_split(params: Params, prepared_dir: Path) -> TestSplit:
    test = PreparedImages(prepared_dir, "test", channels=1)
    if len(test) == 0:
        raise UtilityError(f"{prepared_dir}: no test images to score the utility arms on; check the filter split")
    side = classifier_side(test.image_size, params.utility.classifier.max_image_size)
    names, patients = [], []
    for group in iter_row_groups(prepared_dir, ["image_index", "patient_id"], "test"):
        names += group["image_index"]
        patients += [str(patient) for patient in group["patient_id"]]
    if names != test.image_indices:  # one reading of one manifest: a mismatch is a bug, not user input
        raise AssertionError(f"{prepared_dir}: the test split's rows came in two orders")
    return TestSplit(read_arm_images(test, range(len(test)), side, "real test split"), names, patients)


def macro_auroc_on_test(test: TestSplit, scores: np.ndarray) -> float | None:
    """An arm's macro AUROC on the test split (the point estimate, without an interval)."""
    return macro_auroc_of(test.images.labels, scores)


def write_scores(path: Path, arms: dict[str, np.ndarray], image_indices: list[str], classes: list[str]) -> None:
    """One row per (arm, test image): the arm's probability for every class."""
    rows = len(image_indices)
    columns = {"arm": pa.array([arm for arm in arms for _ in range(rows)], pa.string()),
               "image_index": pa.array(image_indices * len(arms), pa.string())}
    for column, name in enumerate(classes):
        columns[name] = pa.array(np.concatenate([scores[:, column] for scores in arms.values()]), pa.float32())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_real_arm(real_dir: Path, classes: list[str], image_indices: list[str], seeds: int) -> tuple[dict, np.ndarray]:
    """The real-only arm's facts and test probabilities, checked against this run's test split, classes and
    number of training seeds."""
    fix = "rerun it with `dvc repro utility_real`"
    facts = read_json(real_dir / REAL_ARM, fix)
    per_seed = facts.get("seed_macro_auroc")
    if not (isinstance(per_seed, list) and len(per_seed) == seeds and all(
            value is None or (isinstance(value, float) and 0.0 <= value <= 1.0) for value in per_seed)):
        raise UtilityError(f"{real_dir / REAL_ARM}: 'seed_macro_auroc' is not {seeds} AUROC(s), one per training seed "
                           f"(utility.seeds); {fix}")
    if not is_whole_number(facts.get("train_images")) or not isinstance(facts.get("train_image_indices"), list):
        raise UtilityError(f"{real_dir / REAL_ARM}: no 'train_images' count or 'train_image_indices' list; {fix}")
    if facts["train_images"] != len(facts["train_image_indices"]):
        raise UtilityError(f"{real_dir / REAL_ARM}: 'train_images' is {facts['train_images']} but its list holds "
                           f"{len(facts['train_image_indices'])} images; {fix}")
    try:
        _check_scores_footer(real_dir / SCORES, len(image_indices), len(classes), fix)
        table = pq.read_table(real_dir / SCORES)
    except (OSError, pa.ArrowException) as error:
        raise UtilityError(f"{real_dir / SCORES}: unreadable ({str(error).splitlines()[0]}); {fix}") from None
    if table.column_names[:2] != ["arm", "image_index"]:
        raise UtilityError(f"{real_dir / SCORES}: columns {table.column_names[:2]}, expected arm, image_index; {fix}")
    not_text = [name for name in ("arm", "image_index") if not (pa.types.is_string(table.schema.field(name).type)
                                                               or pa.types.is_large_string(table.schema.field(name).type))]
    if not_text:  # lists or structs are unhashable below; numbers would never equal an image name
        raise UtilityError(f"{real_dir / SCORES}: column {not_text[0]!r} holds {table.schema.field(not_text[0]).type}, "
                           f"expected text; {fix}")
    if facts.get("classes") != classes:
        raise UtilityError(f"{real_dir / REAL_ARM}: scored classes {shown_value(facts.get('classes'), 200)}, this "
                           f"run's are {classes}; {fix}")
    if table.column_names[2:] != classes:
        raise UtilityError(f"{real_dir / SCORES}: class columns {shown_value(table.column_names[2:], 200)}, this "
                           f"run's classes are {classes}; {fix}")
    if table.column("image_index").to_pylist() != image_indices:
        raise UtilityError(f"{real_dir / SCORES}: scored other test images than this run's real test split; {fix}")
    if set(table.column("arm").to_pylist()) != {REAL}:
        raise UtilityError(f"{real_dir / SCORES}: rows of arms {sorted(map(str, set(table.column('arm').to_pylist())))}"
                           f", expected only {REAL!r}; {fix}")
    not_float = [name for name in classes if not pa.types.is_floating(table.schema.field(name).type)]
    if not_float:  # strings, bools or decimals would be cast silently; lists would fail later
        raise UtilityError(f"{real_dir / SCORES}: class columns {not_float} are not floating-point probabilities "
                           f"({table.schema.field(not_float[0]).type}); {fix}")
    scores = np.column_stack([table.column(name).to_numpy(zero_copy_only=False) for name in classes]).astype(np.float64)
    # Checked here, before a synthetic image is made: a NaN found after the arms were trained wastes the run.
    outside = ~(np.isfinite(scores) & (scores >= 0.0) & (scores <= 1.0))
    if outside.any():
        row, column = map(int, np.argwhere(outside)[0])
        raise UtilityError(f"{real_dir / SCORES}: {int(outside.sum())} probabilities are not in [0, 1] (first: "
                           f"{scores[row, column]!r} for {image_indices[row]}, {classes[column]}); {fix}")
    return facts, scores


# What one row of the scores file can hold: an image id (NIH's are 16 bytes; 256 at most, as the ELIXR ids),
# an arm name and one float per class, with generous room for Parquet's own bookkeeping.
_MAX_ROW_BYTES = 512
_MAX_CLASS_BYTES = 16


def _check_scores_footer(path: Path, images: int, classes: int, fix: str) -> None:
    """Refuse, from the footer and before a value is decompressed, a scores file that is not a regular file (a
    FIFO would block the read), has another row count than the test split, or declares more bytes than such
    rows can hold (a few KB of zstd can declare gigabytes of ids)."""
    require_regular_file(path, UtilityError, fix)
    metadata = pq.ParquetFile(path).metadata
    if metadata.num_rows != images:
        raise UtilityError(f"{path}: {metadata.num_rows:,} rows, this run's real test split has {images:,} images; {fix}")
    declared = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    allowed = images * (_MAX_ROW_BYTES + _MAX_CLASS_BYTES * classes) + (1 << 20)
    if declared > allowed:
        raise UtilityError(f"{path}: declares {declared:,} bytes of values, more than {images:,} rows of scores "
                           f"can hold ({allowed:,}); {fix}")


def train_real_arm(params: Params, prepared_dir: Path, out_dir: Path) -> dict:
    """Stage `utility_real`: the real-only arm (N real train images), its test probabilities and its subset."""
    started = time.perf_counter()
    device = resolve_device(params.device)
    config = params.utility.classifier
    check_prepared_for(prepared_dir, params.image_size, params.filter.classes)  # as utility@<branch> checks it
    train = PreparedImages(prepared_dir, "train", channels=1)
    if len(train) < 2:
        raise UtilityError(f"{prepared_dir}: {len(train)} train images; the utility arms need at least 2")
    positions = train_subset(train, params.utility.train_images, params.seed)
    real = read_arm_images(train, positions, classifier_side(train.image_size, config.max_image_size), "real arm")
    test = test_split(params, prepared_dir)
    per_seed = [predict(train_arm(real, train.classes, config, params.seed + extra, device, name=f"{REAL} seed {extra}"),
                        test.images, config.batch_size, REAL) for extra in range(params.utility.seeds)]
    facts = {"classes": list(train.classes), "train_images": len(positions), "train_split_images": len(train),
             "test_images": len(test.image_indices), "architecture": config.architecture,
             "classifier": config.model_dump(mode="json"), "device": describe_device(device),
             "train_image_indices": [train.image_indices[p] for p in positions],
             "seed_macro_auroc": [macro_auroc_on_test(test, scores) for scores in per_seed]}
    with atomic_directory(out_dir) as tmp:
        write_scores(tmp / SCORES, {REAL: per_seed[0]}, test.image_indices, list(train.classes))
        write_json(tmp / REAL_ARM, facts)  # no wall-clock time in a cached output: the same run, the same bytes
    return {**{k: v for k, v in facts.items() if k != "train_image_indices"},
            "seconds": round(time.perf_counter() - started, 1)}
