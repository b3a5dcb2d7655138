"""Hostile tables between the stages: filtered.csv edited into rows the filter's own rules reject, with a repeated
column or a quoted newline, and a damaged image_paths.csv.

Each case ends as one line naming the file (and the line, the image and the rule where there is one), with exit
code 2 at a stage's boundary and no traceback; never a hang or a silent acceptance of wrong data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.errors import UserError
from cxr_diffusion.profiles import params_with

from conftest import make_nih_download, nih_row, stage_line

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- filtered.csv under the filter's options

def filtered_run(root: Path, filter_overrides: dict, rows: list[dict]) -> tuple:
    """(params, dataset folder, filtered table as text) after the dataset and filter stages on ``rows``."""
    download = make_nih_download(root / "nih", rows)
    params = params_with({"image_size": 16, "prepare": {"shard_size": 64, "row_group_size": 16, "min_side": 16},
                          "filter": {"split": {"val_fraction": 0.2, "test_fraction": 0.2}, **filter_overrides},
                          "dataset": {"source": "nih", "nih_root": str(download)}})
    build_dataset(params, root / "dataset")
    run_filter(root / "dataset", params.filter, params.seed, root / "filtered", root / "filter.json")
    return params, root / "dataset", pd.read_csv(root / "filtered" / "filtered.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory):
    """Effusion vs No Finding, allow_other_labels false, PA films only: 20 patients, one film each."""
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 21)]
    return filtered_run(tmp_path_factory.mktemp("strict"), {"classes": ["Effusion", "No Finding"], "merges": {},
                                                            "allow_other_labels": False, "views": ["PA"]}, rows)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    """Opacity = Infiltration + Consolidation, and No Finding; allow_other_labels false."""
    labels = ["Infiltration", "No Finding", "Consolidation", "Infiltration|Consolidation"]
    rows = [nih_row(f"{p:08d}_000.png", labels[p % 4], patient=p) for p in range(1, 21)]
    return filtered_run(tmp_path_factory.mktemp("merged"), {
        "classes": ["Opacity", "No Finding"], "merges": {"Opacity": ["Infiltration", "Consolidation"]},
        "allow_other_labels": False}, rows)


def prepare_on(tmp_path: Path, run, text: str | pd.DataFrame) -> tuple[str | None, dict | None]:
    """(the error line, None) or (None, the manifest) of prepare on an edited filtered.csv."""
    params, dataset, _ = run
    path = tmp_path / "filtered.csv"
    if isinstance(text, pd.DataFrame):
        text.to_csv(path, index=False)
    else:
        path.write_text(text)
    try:
        return None, prepare_shards(params, dataset, path, tmp_path / "prepared", workers=1)
    except UserError as error:
        assert "\n" not in str(error)
        return str(error), None


def first_row(table: pd.DataFrame, labels: str) -> int:
    return int(table.index[table["Finding Labels"] == labels][0])


@pytest.mark.parametrize("run", ["strict_run", "merged_run"])
def test_prepare_takes_the_table_the_filter_wrote_under_its_options(tmp_path, request, run):
    """The checks below refuse edited rows only: every film the filter kept is prepared."""
    table = request.getfixturevalue(run)[2]
    error, manifest = prepare_on(tmp_path, request.getfixturevalue(run), table)
    assert error is None and manifest["written"] == len(table)


@pytest.mark.parametrize("labels", ["Effusion|Hernia", "Effusion|Mass|Nodule"])
def test_prepare_refuses_a_film_with_findings_outside_the_classes_when_allow_other_labels_is_false(
        tmp_path, strict_run, labels):
    """The filter rejects it (labels_outside_classes); an edited table had it trained as plain Effusion."""
    table = strict_run[2].copy()
    row = first_row(table, "Effusion")
    table.loc[row, "Finding Labels"] = labels
    error, manifest = prepare_on(tmp_path, strict_run, table)
    assert manifest is None, f"accepted silently: {manifest and manifest['per_split']}"
    assert str(tmp_path / "filtered.csv") in error and f"line {row + 2}," in error
    assert f"image '{table.at[row, 'Image Index']}'" in error and "column 'Finding Labels'" in error
    assert "labels_outside_classes" in error and "allow_other_labels" in error


def test_prepare_refuses_a_merged_class_film_with_findings_outside_the_classes(tmp_path, merged_run):
    table = merged_run[2].copy()
    table.loc[first_row(table, "Infiltration"), "Finding Labels"] = "Infiltration|Effusion"
    error, manifest = prepare_on(tmp_path, merged_run, table)
    assert manifest is None, "accepted silently: an Effusion film kept as Opacity with allow_other_labels false"
    assert "'Infiltration|Effusion' carry Effusion" in error and "labels_outside_classes" in error


def test_prepare_refuses_a_finding_label_that_is_not_an_nih_label(tmp_path, strict_run):
    """'Effusion|Foo': the filter lists it as an unknown_label reject; prepare took it."""
    table = strict_run[2].copy()
    table.loc[first_row(table, "Effusion"), "Finding Labels"] = "Effusion|Foo"
    error, manifest = prepare_on(tmp_path, strict_run, table)
    assert manifest is None, "accepted silently: Finding Labels 'Effusion|Foo'"
    assert "holds Foo, which is not an NIH label" in error and "unknown_label" in error


def test_prepare_refuses_a_view_outside_filter_views(tmp_path, strict_run):
    """filter.views [PA]: a lateral film edited in was prepared as a training image."""
    table = strict_run[2].copy()
    table.loc[0, "View Position"] = "LL"
    error, manifest = prepare_on(tmp_path, strict_run, table)
    assert manifest is None, "accepted silently: View Position LL with filter.views [PA]"
    assert "line 2, " in error and "column 'View Position': 'LL' is not one of filter.views ['PA']" in error


@pytest.mark.parametrize("column", ["Effusion", "split"])
def test_prepare_refuses_a_filtered_table_with_a_repeated_column(tmp_path, strict_run, column):
    """pandas renames the second column 'Effusion.1' and prepare used the first: which one the table means is
    unknown (the metadata reader refuses a repeated column)."""
    table = strict_run[2]
    text = table.to_csv(index=False).splitlines()
    other = {"Effusion": lambda row: row["No Finding"], "split": lambda row: "test"}[column]
    lines = [text[0] + f",{column}"] + [line + f",{other(row)}" for line, (_, row) in zip(text[1:], table.iterrows())]
    error, manifest = prepare_on(tmp_path, strict_run, "\n".join(lines) + "\n")
    assert manifest is None, f"accepted silently: two '{column}' columns"
    assert f"line 1: column(s) '{column}' appear more than once in the header" in error


def test_a_filtered_table_error_names_the_file_line_after_a_quoted_newline(tmp_path, strict_run):
    """A quoted cell holding a newline (legal CSV, and the filter copies Patient Gender verbatim) shifts every
    later row down one line; the message counted rows, not lines."""
    table = strict_run[2].copy()
    table.loc[1, "Patient Gender"] = "M\nF"
    table.loc[6, "split"] = "bogus"
    error, _ = prepare_on(tmp_path, strict_run, table)
    path = tmp_path / "filtered.csv"
    line = next(number for number, text in enumerate(path.read_text().split("\n"), start=1) if ",bogus," in text)
    assert line == 9
    assert f"line {line}, column 'split'" in error, f"{error} (the cell is on line {line})"


# ----------------------------------------------------------------------------- image_paths.csv (dataset stage output)

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 11)]
    return filtered_run(tmp_path_factory.mktemp("small"), {"classes": ["Effusion", "No Finding"], "merges": {}}, rows)


IMAGE_PATHS = {
    "empty": lambda p: p.write_text(""),                                 # EmptyDataError
    "binary": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 8),  # UnicodeDecodeError
    "not_utf8": lambda p: p.write_bytes(p.read_bytes() + b"\xff\xfe.png,x\n"),  # UnicodeDecodeError
    "ragged": lambda p: p.write_text(p.read_text() + "a,b,c,d\n"),        # ParserError
    "short_row": lambda p: p.write_text(p.read_text() + "00000099_000.png\n"),  # padded silently by pandas
    "repeated_column": lambda p: p.write_text("Image Index,path,path\n00000001_000.png,a,b\n"),
    "folder": lambda p: (p.unlink(), p.mkdir()),                         # IsADirectoryError (undescribed OSError)
    "no_path_column": lambda p: p.write_text("Image Index\n00000001_000.png\n"),  # KeyError 'path' (prepare)
    "sparse_gigabyte": lambda p: os.truncate(p, 1 << 30),                # refused unread
}


@pytest.mark.parametrize(("case", "stage"), [(case, stage) for case in sorted(IMAGE_PATHS)
                                              for stage in ("filter", "prepare")])
def test_a_damaged_image_paths_csv_is_one_line_naming_it(tmp_path, small_run, stage, case):
    params, dataset, table = small_run
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    IMAGE_PATHS[case](copy / "image_paths.csv")
    (tmp_path / "filtered.csv").write_text(table.to_csv(index=False))
    if stage == "filter":
        call = lambda: run_filter(copy, params.filter, params.seed, tmp_path / "out", tmp_path / "m.json")  # noqa: E731
    else:
        call = lambda: prepare_shards(params, copy, tmp_path / "filtered.csv", tmp_path / "prep", workers=1)  # noqa: E731
    line = stage_line(call)
    assert line.startswith(f"{copy / 'image_paths.csv'}: "), line


def test_an_image_paths_csv_with_a_header_alone_means_no_image_was_found(tmp_path, small_run):
    """A download whose images are all missing: the filter says which param keeps them, not 'unreadable file'."""
    params, dataset, _ = small_run
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    (copy / "image_paths.csv").write_text("Image Index,path\n")
    line = stage_line(lambda: run_filter(copy, params.filter, params.seed, tmp_path / "out", tmp_path / "m.json"))
    assert "the filter kept no image" in line and "image_missing 10" in line and "dataset.nih_root" in line


@pytest.mark.parametrize("stage", ["filter", "prepare"])
def test_a_fifo_named_image_paths_csv_is_refused_without_blocking(tmp_path, small_run, stage):
    params, dataset, table = small_run
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    (copy / "image_paths.csv").unlink()
    os.mkfifo(copy / "image_paths.csv")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    (tmp_path / "filtered.csv").write_text(table.to_csv(index=False))
    script = {"filter": ["stages/filter.py", "--dataset", copy, "--out", tmp_path / "out", "--metrics", tmp_path / "m.json"],
              "prepare": ["stages/prepare.py", "--dataset", copy, "--filtered", tmp_path / "filtered.csv",
                          "--out", tmp_path / "prep", "--metrics", tmp_path / "m.json"]}[stage]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    try:
        result = subprocess.run([sys.executable, *map(str, script), "--params", str(tmp_path / "params.yaml")],
                                capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
                                cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stage {stage} still blocked on a FIFO named image_paths.csv after 60 s")
    assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr[-1500:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"stage {stage} failed:")]
    assert lines == [f"stage {stage} failed: {copy / 'image_paths.csv'}: not a regular file (a folder, FIFO or "
                     f"device); rerun the dataset stage (`dvc repro -f dataset`)"], result.stderr[-1500:]


def test_guard_prepare_takes_the_filter_table_whose_cells_write_csv_marked_as_text(tmp_path):
    """Cells a spreadsheet would run (a leading tab, ``=``, ``-``) get write_csv's ``'`` in every CSV between the
    stages; the filter and prepare read the same marked text, so the film the filter kept is prepared, and a
    marked label is one listed reject, not a table prepare refuses."""
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 21)]
    rows[4]["Patient Gender"], rows[6]["Patient Gender"] = "\tM", "=F"
    rows[8]["Finding Labels"], rows[2]["Finding Labels"] = "Effusion\t", "\tEffusion"
    params, dataset, table = filtered_run(tmp_path / "run", {
        "classes": ["Effusion", "No Finding"], "merges": {}, "allow_other_labels": False, "views": ["PA"]}, rows)
    rejects = pd.read_csv(tmp_path / "run" / "filtered" / "rejects.csv", dtype=str, keep_default_na=False)
    assert sorted(rejects[["Image Index", "reason"]].values.tolist()) == [  # marked sexes are none NIH writes
        ["00000003_000.png", "unknown_label"], ["00000005_000.png", "invalid_sex"], ["00000007_000.png", "invalid_sex"]]
    manifest = prepare_shards(params, dataset, tmp_path / "run" / "filtered" / "filtered.csv", tmp_path / "prepared",
                              workers=1)
    assert manifest["written"] == len(table) == 17
