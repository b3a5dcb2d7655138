"""Stage `filter`: which images the study uses, their multi-hot labels, and patient-level splits.

Every input row ends either in the table or in the rejects with exactly one reason (the first
rule it fails, in the order of ``REJECT_REASONS``), so ``rows_in == kept + sum(rejected)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion.config import FilterConfig
from cxr_diffusion.data.image_paths import read_image_paths
from cxr_diffusion.data.nih import (
    OFFICIAL_SPLIT_FILES, SEXES, DataError, FilmRules, canonical_patient_ids, is_safe_image_index, patient_id_problem,
    patient_sort_key, puts_no_finding_beside_a_finding, read_csv_text, read_image_list, read_metadata_csv, split_labels,
    unknown_labels, whole_numbers,
)
from cxr_diffusion.io import atomic_directory, write_csv, write_json

REJECT_REASONS: tuple[str, ...] = (
    "duplicate_image_index",   # a second row for the same image; the first is kept
    "unsafe_image_index",      # not a bare file name (path parts, '..', absolute): never opened
    "invalid_patient_id",      # empty, or not letters/digits/'_.-' from a letter or digit (so never a formula)
    # A bad Follow-up # or Patient Age is one bad row, not a bad file: listed, as NIH's own impossible ages
    # (414) are, rather than failing the stage for every other row.
    "invalid_follow_up",       # Follow-up # is not a whole number >= 0 ('-3', '7.9', '1e400', 'abc', '')
    "invalid_age",             # Patient Age is not a whole number ('7.9', '1e400', 'abc', '')
    "invalid_sex",             # Patient Gender is not M or F ('Female', 'f', ''): the subgroups compare M and F
    "unknown_label",           # a Finding Label that is not one of NIH's 15
    "contradictory_labels",    # 'No Finding' together with a finding ('No Finding|Effusion')
    "image_missing",           # no image file for the row
    "view",                    # View Position not in filter.views
    "age_out_of_range",        # Patient Age outside [filter.age_min, filter.age_max]
    "not_in_include_list",     # filter.include_list is set and does not name the image
    "no_class_of_interest",    # none of the row's labels maps to filter.classes
    "labels_outside_classes",  # carries other findings and filter.allow_other_labels is false
    "follow_up_policy",        # not the first/last study of its patient (filter.follow_up)
    "in_both_official_splits",  # split.method 'official' and both NIH lists name the image: no safe split
    "not_in_official_split",   # split.method 'official' and neither NIH list names the image
    "class_cap",               # a class already holds filter.max_per_class images
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
# The param that lets more images through, for the reasons a param decides (the others are fixed in the data).
LOOSENED_BY: dict[str, str] = {
    "image_missing": "dataset.nih_root", "view": "filter.views", "age_out_of_range": "filter.age_min/filter.age_max",
    "not_in_include_list": "filter.include_list", "no_class_of_interest": "filter.classes/filter.merges",
    "labels_outside_classes": "filter.allow_other_labels", "follow_up_policy": "filter.follow_up",
    "in_both_official_splits": "filter.split.method", "not_in_official_split": "filter.split.method",
    "class_cap": "filter.max_per_class",
}
INCLUDE_LIST_FORMAT = "an include list: 'Image Index' and one 0/1 column per class in filter.classes"
TABLE_COLUMNS: tuple[str, ...] = (
    "Image Index", "Patient ID", "Follow-up #", "View Position", "Patient Age", "Patient Gender",
    "Finding Labels", "split",
)


@dataclass
class FilterResult:
    table: pd.DataFrame                 # kept rows: TABLE_COLUMNS + one 0/1 column per class
    rejects: pd.DataFrame               # Image Index, reason, detail
    include_list_issues: pd.DataFrame   # Image Index, issue, detail
    metrics: dict = field(default_factory=dict)


def read_include_list(path: str | Path, classes: tuple[str, ...]) -> pd.DataFrame:
    """An include list in the reference format: ``Image Index`` plus one 0/1 column per class (ints)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"filter.include_list: {path} not found")
    frame = read_csv_text(path, INCLUDE_LIST_FORMAT)
    missing = [c for c in ("Image Index",) + tuple(classes) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; an include list needs 'Image Index' and one "
                        f"0/1 column per class in filter.classes {list(classes)}")
    extra = [c for c in frame.columns if c != "Image Index" and c not in classes]
    if extra:
        raise DataError(f"{path}: column(s) {extra} are not in filter.classes {list(classes)}; "
                        f"rename them or add the classes")
    for column in classes:
        flags = frame[column].str.strip()
        bad = ~flags.isin(["0", "1"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: row {row + 2}: column '{column}' is {frame[column].iloc[row]!r}, expected 0 or 1")
        frame[column] = flags.astype("int64")
    duplicated = frame["Image Index"].duplicated()
    if duplicated.any():
        raise DataError(f"{path}: 'Image Index' {frame['Image Index'][duplicated].iloc[0]!r} appears more than once")
    return frame


def film_rules(config: FilterConfig) -> FilmRules:
    """The rules of ``config`` on a film's own labels and view: the filter's, and what its table is held to."""
    return FilmRules(config.class_members(), tuple(config.views), config.allow_other_labels,
                     (config.age_min, config.age_max))


def filter_metadata(
    metadata: pd.DataFrame,
    images_present: set[str],
    config: FilterConfig,
    seed: int,
    include_list: pd.DataFrame | None = None,
    official_lists: dict[str, set[str]] | None = None,
) -> FilterResult:
    """Apply the rules of ``config`` to NIH-format ``metadata``; return table, rejects and counts. Each row keeps
    the first reason it is rejected for, in the order the rules run here."""
    members = config.class_members()
    rules = film_rules(config)
    rows = _annotated(metadata, rules)
    reject = _Rejects(len(rows))
    _reject_unusable_rows(rows, reject, images_present, config, rules)

    include_issues = pd.DataFrame(columns=["Image Index", "issue", "detail"])
    if include_list is not None:
        include_issues = _check_include_list(include_list, rows, members, images_present)
        reject(~rows["Image Index"].isin(set(include_list["Image Index"])), "not_in_include_list")
    reject(rows["_classes"].map(len) == 0, "no_class_of_interest", rows["Finding Labels"])
    outside = rows["_labels"].map(lambda labels: "|".join(rules.outside_classes(labels)))
    reject(outside != "", "labels_outside_classes", outside)
    if config.follow_up != "all":
        alive = rows[reject.reason.isna()]
        pick = alive.groupby("Patient ID")["_follow_up"].transform("min" if config.follow_up == "first" else "max")
        reject(rows.index.isin(alive.index[alive["_follow_up"] != pick]), "follow_up_policy")
    split = _split(rows, reject, config, seed, official_lists)

    table = _kept_table(rows, reject.reason.isna(), split, config)
    rejects = pd.DataFrame({"Image Index": rows["Image Index"], "reason": reject.reason, "detail": reject.detail})
    rejects = rejects[reject.reason.notna()].reset_index(drop=True)
    _assert_patient_disjoint(table)
    return FilterResult(table, rejects, include_issues, _metrics(len(rows), table, rejects, include_issues, config,
                                                                 0 if include_list is None else len(include_list)))


def _annotated(metadata: pd.DataFrame, rules: FilmRules) -> pd.DataFrame:
    """The rows with canonical patient ids and parsed follow-up, age, labels and classes of interest."""
    rows = metadata.reset_index(drop=True).copy()
    rows["Patient ID"] = canonical_patient_ids(rows["Patient ID"])
    rows["_follow_up"] = whole_numbers(rows["Follow-up #"])
    rows["_age"] = whole_numbers(rows["Patient Age"])
    rows["_labels"] = rows["Finding Labels"].map(split_labels)
    rows["_classes"] = rows["_labels"].map(rules.classes_of)
    return rows


class _Rejects:
    """Each row's first reject reason and its detail: a later rule never overwrites an earlier one."""

    def __init__(self, rows: int):
        self.reason = pd.Series([None] * rows, dtype=object)
        self.detail = pd.Series([""] * rows, dtype=object)

    def __call__(self, mask: pd.Series, name: str, why: pd.Series | str = "") -> None:
        mask = mask & self.reason.isna()
        self.reason[mask] = name
        self.detail[mask] = why[mask] if isinstance(why, pd.Series) else why


def _reject_unusable_rows(rows: pd.DataFrame, reject: _Rejects, images_present: set[str], config: FilterConfig,
                          rules: FilmRules) -> None:
    """Rows that cannot be used whatever the study: bad ids, values or labels, no image, another view or age."""
    reject(rows["Image Index"].duplicated(keep="first"), "duplicate_image_index", "earlier row kept")
    reject(~rows["Image Index"].map(is_safe_image_index), "unsafe_image_index",
           "Image Index must be a bare file name")
    id_problem = rows["Patient ID"].map(patient_id_problem)
    reject(id_problem.notna(), "invalid_patient_id", id_problem)
    follow_up, age = rows["_follow_up"], rows["_age"]
    reject((follow_up.isna() | (follow_up < 0)).astype(bool), "invalid_follow_up",
           rows["Follow-up #"].map(lambda value: f"Follow-up # is {str(value)!r}, expected a whole number >= 0"))
    reject(age.isna(), "invalid_age",
           rows["Patient Age"].map(lambda value: f"Patient Age is {str(value)!r}, expected a whole number"))
    reject(~rows["Patient Gender"].isin(SEXES), "invalid_sex",  # the subgroups compare M and F
           rows["Patient Gender"].map(lambda value: f"Patient Gender is {str(value)!r}, expected M or F as NIH writes it"))
    unknown = rows["_labels"].map(unknown_labels)
    reject(unknown.map(bool), "unknown_label", unknown.map(lambda names: "|".join(names)))
    reject(rows["_labels"].map(puts_no_finding_beside_a_finding).astype(bool), "contradictory_labels",
           rows["Finding Labels"])
    reject(~rows["Image Index"].isin(images_present), "image_missing")
    reject(~rows["View Position"].map(rules.keeps_view).astype(bool), "view", rows["View Position"].astype(str))
    reject(rules.ages_out_of_range(age), "age_out_of_range", age.astype(str))


def _split(rows: pd.DataFrame, reject: _Rejects, config: FilterConfig, seed: int,
           official_lists: dict[str, set[str]] | None) -> pd.Series:
    """Each row's split: NIH's official lists, or a patient-level random split after the class cap."""
    split = pd.Series([None] * len(rows), dtype=object)
    if config.split.method == "official":
        if not official_lists:
            raise DataError("filter.split.method is 'official' but the dataset has no train_val_list.txt / "
                            "test_list.txt; use method 'random' or add the lists to dataset.nih_root")
        _check_both_official_lists(official_lists)
        split, in_both = _official_split(rows, official_lists)
        reject(in_both, "in_both_official_splits", "named by test_list.txt and train_val_list.txt")
        reject(split.isna(), "not_in_official_split")
    if config.max_per_class is not None:
        reject(_over_cap(rows, reject.reason, config.max_per_class, seed), "class_cap", f"cap {config.max_per_class}")
    if config.split.method == "random":
        return _random_split(rows, reject.reason.isna(), config.split.val_fraction, config.split.test_fraction, seed)
    return _official_val(rows, split, reject.reason.isna(), config.split.val_fraction, seed)


def _kept_table(rows: pd.DataFrame, kept_mask: pd.Series, split: pd.Series, config: FilterConfig) -> pd.DataFrame:
    """The filtered table: the kept rows with their split and one 0/1 column per class, sorted by image."""
    kept = rows[kept_mask].copy()
    kept["split"] = split[kept_mask]
    kept["Follow-up #"] = kept["_follow_up"].astype("int64")
    kept["Patient Age"] = kept["_age"].astype("int64")
    for name in config.classes:
        kept[name] = kept["_classes"].map(lambda classes, n=name: int(n in classes))
    return kept[list(TABLE_COLUMNS) + list(config.classes)].sort_values("Image Index").reset_index(drop=True)


def _check_include_list(include_list: pd.DataFrame, rows: pd.DataFrame,
                        members: dict[str, tuple[str, ...]], images_present: set[str]) -> pd.DataFrame:
    """Report include-list images not in the CSV, those with no image file (a partial download: counted,
    not fatal), and flags that disagree with Finding Labels."""
    issues = []
    known = set(rows["Image Index"])
    for name in include_list["Image Index"]:
        if name not in known:
            issues.append((name, "not_in_metadata", ""))
        elif name not in images_present:
            issues.append((name, "image_missing", "no image file under dataset.nih_root"))
    joined = include_list.merge(rows.drop_duplicates("Image Index")[["Image Index", "_labels"]], on="Image Index")
    for name, labels in members.items():
        derived = joined["_labels"].map(lambda found, ls=labels: int(any(label in found for label in ls)))
        for image, flag, truth in zip(joined["Image Index"], joined[name], derived):
            if int(flag) != truth:
                issues.append((image, "flag_disagrees", f"{name}: include list {int(flag)}, Finding Labels {truth}"))
    return pd.DataFrame(issues, columns=["Image Index", "issue", "detail"])


def _over_cap(rows: pd.DataFrame, reason: pd.Series, cap: int, seed: int) -> pd.Series:
    """Visit surviving rows in seeded order; a row that would push any class past ``cap`` is dropped."""
    alive = np.flatnonzero(reason.isna().to_numpy())
    order = alive[np.random.default_rng([seed, 2]).permutation(len(alive))]
    counts: dict[str, int] = {}
    over = np.zeros(len(rows), dtype=bool)
    classes = rows["_classes"].to_numpy()
    for i in order:
        if any(counts.get(c, 0) >= cap for c in classes[i]):
            over[i] = True
            continue
        for c in classes[i]:
            counts[c] = counts.get(c, 0) + 1
    return pd.Series(over, index=rows.index)


def _random_split(rows: pd.DataFrame, alive: pd.Series, val_fraction: float, test_fraction: float,
                  seed: int) -> pd.Series:
    patients = np.array(sorted(rows.loc[alive, "Patient ID"].unique(), key=patient_sort_key), dtype=object)
    patients = patients[np.random.default_rng([seed, 3]).permutation(len(patients))]
    n_test = int(round(test_fraction * len(patients)))
    n_val = int(round(val_fraction * len(patients)))
    if len(patients) >= 3:  # a non-zero fraction always gets at least one patient
        n_test = max(n_test, int(test_fraction > 0))
        n_val = max(n_val, int(val_fraction > 0))
    n_test = min(n_test, max(len(patients) - 1, 0))  # and train keeps one
    n_val = max(0, min(n_val, len(patients) - 1 - n_test))
    assignment = {p: "test" for p in patients[:n_test]}
    assignment.update({p: "val" for p in patients[n_test:n_test + n_val]})
    assignment.update({p: "train" for p in patients[n_test + n_val:]})
    return rows["Patient ID"].map(assignment).where(alive, None)


def _check_both_official_lists(lists: dict[str, set[str]]) -> None:
    """Both lists, each naming images: with one missing or empty its split would be empty, silently (as with
    a list wholly inside the other, below), so that is an error, never a split without a test set."""
    for key, name in OFFICIAL_SPLIT_FILES.items():
        other = next(n for k, n in OFFICIAL_SPLIT_FILES.items() if k != key)
        if key not in lists:
            raise DataError(f"filter.split.method is 'official' but the dataset has {other} and no {name}: both NIH "
                            f"lists are needed (the {key} split would be empty); add {name} to dataset.nih_root and "
                            f"rerun `dvc repro -f dataset`, or use filter.split.method 'random'")
        if not lists[key]:
            raise DataError(f"{name} lists no image, so with filter.split.method 'official' the {key} split would be "
                            f"empty; restore NIH's {name} in dataset.nih_root and rerun `dvc repro -f dataset`, or "
                            f"use filter.split.method 'random'")


def _official_split(rows: pd.DataFrame, lists: dict[str, set[str]]) -> tuple[pd.Series, pd.Series]:
    """(split per row: test or train, None off both lists or on both; rows on both lists). A few images on both
    lists are listed rejects; a list that lies wholly inside the other is a corrupt download, since one split
    would then be empty: an error."""
    test, train_val = lists.get("test", set()), lists.get("train_val", set())
    for inner, outer, inner_name, outer_name in ((test, train_val, "test_list.txt", "train_val_list.txt"),
                                                 (train_val, test, "train_val_list.txt", "test_list.txt")):
        if inner and inner <= outer:
            raise DataError(f"the official split lists are corrupt: every image of {inner_name} is also in "
                            f"{outer_name} ({len(inner)} images); restore NIH's lists or use "
                            f"filter.split.method 'random'")
    in_both = rows["Image Index"].map(lambda n: n in test and n in train_val).astype(bool)
    split = rows["Image Index"].map(lambda n: "test" if n in test else ("train" if n in train_val else None))
    split = split.where(~in_both, None)
    both = set(rows.loc[split == "test", "Patient ID"]) & set(rows.loc[split == "train", "Patient ID"])
    if both:
        raise DataError(f"official split lists put patient(s) {sorted(both)[:5]} in both test_list.txt and "
                        f"train_val_list.txt; fix the lists or use filter.split.method 'random'")
    return split, in_both


def _official_val(rows: pd.DataFrame, split: pd.Series, alive: pd.Series, val_fraction: float,
                  seed: int) -> pd.Series:
    """The official split with ``val_fraction`` of the train list's patients moved to val, drawn from those with a
    film kept after every reject and the class cap (as the random split draws): a non-zero fraction gets at least
    one patient, and train keeps one; a non-zero fraction that can give val no film is an error."""
    train_patients = np.array(sorted(rows.loc[(split == "train") & alive, "Patient ID"].unique(),
                                     key=patient_sort_key), dtype=object)
    train_patients = train_patients[np.random.default_rng([seed, 3]).permutation(len(train_patients))]
    n_val = int(round(val_fraction * len(train_patients)))
    if len(train_patients) >= 2:
        n_val = min(max(n_val, int(val_fraction > 0)), len(train_patients) - 1)
    elif val_fraction > 0:
        raise DataError(f"filter.split.val_fraction is {val_fraction}, but {len(train_patients)} patient(s) of "
                        "train_val_list.txt keep a film: val and train cannot both have one; widen the filter or "
                        "use filter.split.method 'random'")
    val_patients = set(train_patients[:n_val])
    return split.where(~((split == "train") & rows["Patient ID"].isin(val_patients)), "val")


def _assert_patient_disjoint(table: pd.DataFrame) -> None:
    per_patient = table.groupby("Patient ID")["split"].nunique()
    leaking = per_patient[per_patient > 1]
    assert leaking.empty, f"patients {list(leaking.index[:5])} are in more than one split"


def _metrics(rows_in: int, table: pd.DataFrame, rejects: pd.DataFrame, include_issues: pd.DataFrame,
             config: FilterConfig, include_listed: int) -> dict:
    rejected = {name: int((rejects["reason"] == name).sum()) for name in REJECT_REASONS}
    splits = {}
    for split in SPLITS:
        part = table[table["split"] == split]
        splits[split] = {
            "images": len(part),
            "patients": int(part["Patient ID"].nunique()),
            "classes": {name: int(part[name].sum()) for name in config.classes},
        }
    metrics = {
        "rows_in": rows_in,
        "kept": len(table),
        "rejected": rejected,
        "classes": {name: int(table[name].sum()) for name in config.classes},
        "splits": splits,
    }
    if config.include_list is not None:
        metrics["include_list"] = {
            "listed": include_listed,
            "not_in_metadata": int((include_issues["issue"] == "not_in_metadata").sum()),
            "image_missing": int((include_issues["issue"] == "image_missing").sum()),
            "flag_disagreements": int((include_issues["issue"] == "flag_disagrees").sum()),
        }
    assert rows_in == len(table) + sum(rejected.values()), "filter counts do not reconcile"
    return metrics


def run_filter(dataset_dir: str | Path, config: FilterConfig, seed: int, out_dir: str | Path,
               metrics_path: str | Path) -> FilterResult:
    """Stage entry: read the `dataset` stage's output, filter, write table, rejects and metrics."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    metadata = read_metadata_csv(dataset_dir / "metadata.csv")
    images_present = set(read_image_paths(dataset_dir / "image_paths.csv")["Image Index"])
    include_list = read_include_list(config.include_list, config.classes) if config.include_list else None
    official = {key: read_image_list(dataset_dir / "official" / name)  # read only when used: 'random' ignores them
                for key, name in OFFICIAL_SPLIT_FILES.items()
                if config.split.method == "official" and (dataset_dir / "official" / name).is_file()}
    result = filter_metadata(metadata, images_present, config, seed, include_list, official or None)
    # The folder is swapped in whole: a write that fails leaves the previous run's files, never a mix of two.
    with atomic_directory(out_dir) as tmp:
        write_csv(tmp / "rejects.csv", result.rejects)
        write_csv(tmp / "include_list_issues.csv", result.include_list_issues)
        if not result.table.empty:
            write_csv(tmp / "filtered.csv", result.table)
    if result.table.empty:  # every later stage needs images; say which rules took them all (the rejects stay)
        raise DataError(_nothing_kept(dataset_dir / "metadata.csv", out_dir / "rejects.csv", result.metrics))
    write_json(metrics_path, result.metrics)
    return result


def _nothing_kept(metadata_csv: Path, rejects_csv: Path, metrics: dict) -> str:
    counts = sorted(((n, name) for name, n in metrics["rejected"].items() if n),
                    key=lambda item: (-item[0], REJECT_REASONS.index(item[1])))
    params = list(dict.fromkeys(LOOSENED_BY[name] for _, name in counts if name in LOOSENED_BY))
    fix = f"loosen {', '.join(params)}" if params else "fix those rows of the metadata CSV"
    return (f"{metadata_csv}: the filter kept no image of {metrics['rows_in']} rows (rejected: "
            f"{', '.join(f'{name} {n}' for n, name in counts)}); {fix} (every reject is listed in {rejects_csv})")
