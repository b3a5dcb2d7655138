"""Hostile metadata: NIH-format CSVs and include lists that used to crash, merge patients or leak formulas.

Each case ends either as one DataError line naming the file (and line or row) and what to do, or as a
listed reject with a stable reason, so ``rows_in == kept + rejected`` still holds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_diffusion.config import FilterConfig, SplitConfig
from cxr_diffusion.profiles import params_with, profile_section
from cxr_diffusion.data.filter import REJECT_REASONS, filter_metadata, read_include_list, run_filter
from cxr_diffusion.data.nih import NIH_HEADER, DataError, index_nih_root, read_metadata_csv
from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.data.shards import read_manifest
from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.io import write_csv

from conftest import gradient_image, make_nih_download, nih_row, one_line_message, png_bytes

HYPERLINK = '=HYPERLINK("http://x","click")'


def write_metadata(path, rows):
    """An NIH-format CSV written cell by cell as text, so hostile values reach the reader untouched."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_HEADER)
        for row in rows:
            writer.writerow([row[column] for column in NIH_HEADER])
    return path


def filter_csv(tmp_path, rows, **config):
    frame = read_metadata_csv(write_metadata(tmp_path / "Data_Entry_2017_v2020.csv", rows))
    return filter_metadata(frame, set(frame["Image Index"]), profile_section(FilterConfig, **config), seed=0)


def reject_of(result, image_index):
    row = result.rejects.set_index("Image Index").loc[image_index]
    return row["reason"], row["detail"]


def one_line_error(call) -> str:
    return one_line_message(call, DataError)


# ----------------------------------------------------------------------------- patient ids

def test_patient_ids_too_big_for_int64_stay_distinct_patients(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", patient="99999999999999999999"),
                                   nih_row("b.png", patient="99999999999999999998")])
    assert sorted(result.table["Patient ID"]) == ["99999999999999999998", "99999999999999999999"]


def test_decimal_patient_id_is_not_merged_with_the_integer_one(tmp_path):
    frame = read_metadata_csv(write_metadata(tmp_path / "meta.csv", [nih_row("a.png", patient="7.9"),
                                                                      nih_row("b.png", patient="7")]))
    assert list(frame["Patient ID"]) == ["7.9", "7"]


def test_bring_your_own_patient_ids_are_kept_as_text(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", patient="P00123")])
    assert list(result.table["Patient ID"]) == ["P00123"]


def test_zero_padded_and_plain_patient_id_are_one_patient(tmp_path):
    frame = read_metadata_csv(write_metadata(tmp_path / "meta.csv", [nih_row("a.png", patient="0001"),
                                                                      nih_row("b.png", patient=" 1 ")]))
    assert list(frame["Patient ID"]) == ["1", "1"]


def test_empty_patient_id_is_a_listed_reject(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", patient=""), nih_row("b.png", patient="2")])
    assert reject_of(result, "a.png") == ("invalid_patient_id", "Patient ID is empty")
    assert list(result.table["Image Index"]) == ["b.png"]


def test_patient_id_starting_with_a_formula_character_is_a_listed_reject(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", patient="-5"), nih_row("b.png", patient="=1+1")])
    assert set(result.rejects["reason"]) == {"invalid_patient_id"}
    assert reject_of(result, "a.png")[1] == ("Patient ID is '-5': use letters, digits, '_', '.' or '-', "
                                            "starting with a letter or digit")


def test_string_patient_id_reaches_the_shards_unchanged(tmp_path):
    rows = [nih_row(f"{i:08d}_000.png", "Effusion" if i % 2 else "No Finding", patient=f"P{i:05d}")
            for i in range(1, 7)]
    images = {row["Image Index"]: png_bytes(Image.fromarray(gradient_image((96, 96), seed=i)))
              for i, row in enumerate(rows)}
    download = make_nih_download(tmp_path / "nih", rows, images)
    params = params_with({
        "image_size": 16, "dataset": {"source": "nih", "nih_root": str(download)},
        "filter": {"classes": ["Effusion", "No Finding"], "merges": {}, "split": {"val_fraction": 0.2,
                                                                                "test_fraction": 0.2}},
        "prepare": {"shard_size": 8, "row_group_size": 4},
    })
    build_dataset(params, tmp_path / "dataset")
    run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "filter.json")
    prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv", tmp_path / "prepared",
                   workers=1)
    seen = {}
    for shard in read_manifest(tmp_path / "prepared")["shards"]:
        table = pq.read_table(tmp_path / "prepared" / shard["file"], columns=["image_index", "patient_id"])
        assert table.schema.field("patient_id").type == pa.string()
        seen.update(zip(table.column("image_index").to_pylist(), table.column("patient_id").to_pylist()))
    assert seen == {row["Image Index"]: row["Patient ID"] for row in rows}


# ----------------------------------------------------------------------------- follow-up and age

@pytest.mark.parametrize("value", ["1e400", "7.9", "abc", ""])
def test_follow_up_that_is_not_a_whole_number_is_a_listed_reject(tmp_path, value):
    result = filter_csv(tmp_path, [nih_row("a.png", follow_up=value), nih_row("b.png", patient=2)])
    assert reject_of(result, "a.png") == ("invalid_follow_up",
                                          f"Follow-up # is {value!r}, expected a whole number >= 0")
    assert result.metrics["rows_in"] == result.metrics["kept"] + sum(result.metrics["rejected"].values())


def test_negative_follow_up_is_a_listed_reject(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", follow_up="-3"), nih_row("b.png", patient=2)])
    assert reject_of(result, "a.png") == ("invalid_follow_up", "Follow-up # is '-3', expected a whole number >= 0")


@pytest.mark.parametrize("value", ["1e400", "7.9", "abc", ""])
def test_age_that_is_not_a_whole_number_is_a_listed_reject(tmp_path, value):
    result = filter_csv(tmp_path, [nih_row("a.png", age=value), nih_row("b.png", patient=2)])
    assert reject_of(result, "a.png") == ("invalid_age", f"Patient Age is {value!r}, expected a whole number")


def test_age_too_big_for_an_integer_is_a_listed_reject(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", age="99999999999999999999"), nih_row("b.png", patient=2)])
    assert reject_of(result, "a.png")[0] == "invalid_age"


# ----------------------------------------------------------------------------- CSV shape

def test_metadata_row_with_an_extra_field_names_file_and_line(tmp_path):
    path = write_metadata(tmp_path / "meta.csv", [nih_row("a.png"), nih_row("b.png")])
    path.write_text(path.read_text().replace("b.png,", "b.png,surplus,", 1))
    message = one_line_error(lambda: read_metadata_csv(path))
    assert message == (f"{path}: line 3 has 12 fields but the header has 11; quote values that contain "
                       f"commas, or remove the extra fields")


def test_header_only_metadata_csv_is_an_error(tmp_path):
    path = write_metadata(tmp_path / "meta.csv", [])
    message = one_line_error(lambda: read_metadata_csv(path))
    assert message == (f"{path}: a header but no rows; expected an NIH-format metadata CSV such as "
                       f"Data_Entry_2017_v2020.csv")


def test_zero_byte_metadata_csv_is_an_error(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv").write_bytes(b"")
    message = one_line_error(lambda: index_nih_root(root))
    assert message == (f"{root / 'Data_Entry_2017_v2020.csv'}: empty file (0 bytes); expected an NIH-format "
                       f"metadata CSV such as Data_Entry_2017_v2020.csv")


def test_binary_metadata_file_is_an_error(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    message = one_line_error(lambda: read_metadata_csv(path))
    assert message == (f"{path}: not a text CSV (binary data); expected an NIH-format metadata CSV such as "
                       f"Data_Entry_2017_v2020.csv")


def test_include_list_that_is_not_a_csv_is_an_error(tmp_path):
    path = tmp_path / "include.csv"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5U0#\xf4")  # an .xlsx saved as .csv
    message = one_line_error(lambda: read_include_list(path, ("Effusion",)))
    assert message == (f"{path}: not a text CSV (binary data); expected an include list: 'Image Index' and "
                       f"one 0/1 column per class in filter.classes")


def test_zero_byte_include_list_is_an_error(tmp_path):
    path = tmp_path / "include.csv"
    path.write_bytes(b"")
    message = one_line_error(lambda: read_include_list(path, ("Effusion",)))
    assert message == (f"{path}: empty file (0 bytes); expected an include list: 'Image Index' and one 0/1 "
                       f"column per class in filter.classes")


def test_include_list_of_bare_names_reports_missing_columns(tmp_path):
    path = tmp_path / "include.csv"
    path.write_text("00000001_000.png\n00000002_000.png\n")
    message = one_line_error(lambda: read_include_list(path, ("Effusion",)))
    assert message.startswith(f"{path}: missing column(s) ['Image Index', 'Effusion']")


@pytest.mark.parametrize("value", ["", "yes", "1.5", "-1"])
def test_include_list_flag_that_is_not_0_or_1_names_row_and_column(tmp_path, value):
    path = tmp_path / "include.csv"
    path.write_text(f"Image Index,Effusion\na.png,1\nb.png,{value}\n")
    message = one_line_error(lambda: read_include_list(path, ("Effusion",)))
    assert message == f"{path}: row 3: column 'Effusion' is {value!r}, expected 0 or 1"


# ----------------------------------------------------------------------------- contradictory labels

def test_no_finding_together_with_a_finding_is_a_listed_reject(tmp_path):
    result = filter_csv(tmp_path, [nih_row("a.png", "No Finding|Effusion"), nih_row("b.png", "Effusion", patient=2)])
    assert reject_of(result, "a.png") == ("contradictory_labels", "No Finding|Effusion")


def test_image_in_both_official_lists_is_a_listed_reject():
    frame = pd.DataFrame([nih_row("a.png", patient=1), nih_row("b.png", patient=2), nih_row("c.png", patient=3),
                          nih_row("d.png", patient=4)])  # train_val keeps two patients: one for val, one for train
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official"))
    lists = {"test": {"a.png", "b.png"}, "train_val": {"a.png", "c.png", "d.png"}}
    result = filter_metadata(frame, set(frame["Image Index"]), config, 0, None, lists)
    assert reject_of(result, "a.png") == ("in_both_official_splits", "named by test_list.txt and train_val_list.txt")
    assert dict(zip(result.table["Image Index"], result.table["split"]))["b.png"] == "test"
    assert result.metrics["rejected"]["in_both_official_splits"] == 1


def test_official_lists_that_are_one_list_twice_are_an_error():
    frame = pd.DataFrame([nih_row("a.png", patient=1), nih_row("b.png", patient=2)])
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official"))
    lists = {"test": {"a.png", "b.png"}, "train_val": {"a.png", "b.png"}}
    message = one_line_error(lambda: filter_metadata(frame, {"a.png", "b.png"}, config, 0, None, lists))
    assert message == ("the official split lists are corrupt: every image of test_list.txt is also in "
                       "train_val_list.txt (2 images); restore NIH's lists or use filter.split.method 'random'")


def official_dataset(tmp_path, lists: dict[str, bytes]):
    """A `dataset` stage output of four patients with NIH's official lists as given (file name -> bytes)."""
    dataset = tmp_path / "dataset"
    (dataset / "official").mkdir(parents=True)
    names = [f"{p:08d}_000.png" for p in range(1, 5)]
    write_metadata(dataset / "metadata.csv", [nih_row(name, patient=p) for p, name in enumerate(names, start=1)])
    write_csv(dataset / "image_paths.csv", pd.DataFrame({"Image Index": names, "path": names}))
    for name, data in lists.items():
        (dataset / "official" / name).write_bytes(data)
    return dataset


def run_official_filter(tmp_path, dataset, method: str = "official"):
    config = profile_section(FilterConfig, classes=["No Finding"], merges={},
                             split=profile_section(SplitConfig, method=method, val_fraction=0.25, test_fraction=0.25))
    return run_filter(dataset, config, 0, tmp_path / "out", tmp_path / "m.json")


TEST_LIST, TRAIN_VAL_LIST = b"00000001_000.png\n", b"00000002_000.png\n00000003_000.png\n00000004_000.png\n"


@pytest.mark.parametrize("name", ["test_list.txt", "train_val_list.txt"])
def test_an_official_list_that_is_not_utf8_is_one_line_naming_the_file_and_line(tmp_path, name):
    lists = {"test_list.txt": TEST_LIST, "train_val_list.txt": TRAIN_VAL_LIST}
    lists[name] = lists[name] + b"0000000\xff_000.png\n"
    dataset = official_dataset(tmp_path, lists)
    line = lists[name].count(b"\n")
    assert one_line_error(lambda: run_official_filter(tmp_path, dataset)) == (
        f"{dataset / 'official' / name}: line {line} is not UTF-8 text (byte 0xff); it must list one Image Index per "
        f"line: restore NIH's {name} in dataset.nih_root and rerun `dvc repro -f dataset`")


def test_the_random_split_never_reads_the_official_lists(tmp_path):
    dataset = official_dataset(tmp_path, {"test_list.txt": b"\xff\xfe", "train_val_list.txt": b"\x00\xff"})
    assert len(run_official_filter(tmp_path, dataset, method="random").table) == 4


@pytest.mark.parametrize(("present", "missing", "split"), [("train_val_list.txt", "test_list.txt", "test"),
                                                            ("test_list.txt", "train_val_list.txt", "train_val")])
def test_a_single_official_list_is_an_error_not_an_empty_split(tmp_path, present, missing, split):
    lists = {"test_list.txt": TEST_LIST, "train_val_list.txt": TRAIN_VAL_LIST}
    dataset = official_dataset(tmp_path, {present: lists[present]})
    assert one_line_error(lambda: run_official_filter(tmp_path, dataset)) == (
        f"filter.split.method is 'official' but the dataset has {present} and no {missing}: both NIH lists are "
        f"needed (the {split} split would be empty); add {missing} to dataset.nih_root and rerun "
        f"`dvc repro -f dataset`, or use filter.split.method 'random'")
    assert not (tmp_path / "out" / "filtered.csv").exists()


@pytest.mark.parametrize(("name", "split", "content"), [("test_list.txt", "test", b""),
                                                        ("train_val_list.txt", "train_val", b"\n  \n")])
def test_an_empty_official_list_is_an_error_not_an_empty_split(tmp_path, name, split, content):
    lists = {"test_list.txt": TEST_LIST, "train_val_list.txt": TRAIN_VAL_LIST}
    lists[name] = content
    dataset = official_dataset(tmp_path, lists)
    assert one_line_error(lambda: run_official_filter(tmp_path, dataset)) == (
        f"{name} lists no image, so with filter.split.method 'official' the {split} split would be empty; restore "
        f"NIH's {name} in dataset.nih_root and rerun `dvc repro -f dataset`, or use filter.split.method 'random'")


def test_both_official_lists_split_the_dataset_by_them(tmp_path):
    dataset = official_dataset(tmp_path, {"test_list.txt": TEST_LIST, "train_val_list.txt": TRAIN_VAL_LIST})
    table = run_official_filter(tmp_path, dataset).table
    splits = dict(zip(table["Image Index"], table["split"]))
    assert splits.pop("00000001_000.png") == "test"
    assert sorted(splits) == ["00000002_000.png", "00000003_000.png", "00000004_000.png"]
    assert sorted(splits.values()) == ["train", "train", "val"]  # val_fraction 0.25 of train_val's 3 patients


def test_counts_reconcile_with_every_new_reason(tmp_path):
    rows = [nih_row("a.png", patient=""), nih_row("b.png", follow_up="x"), nih_row("c.png", age="x"),
            nih_row("d.png", "No Finding|Mass"), nih_row("e.png", patient=5)]
    result = filter_csv(tmp_path, rows)
    metrics = result.metrics
    assert set(metrics["rejected"]) == set(REJECT_REASONS)
    assert {name: n for name, n in metrics["rejected"].items() if n} == {
        "invalid_patient_id": 1, "invalid_follow_up": 1, "invalid_age": 1, "contradictory_labels": 1}
    assert metrics["rows_in"] == metrics["kept"] + sum(metrics["rejected"].values()) == 5


# ----------------------------------------------------------------------------- nothing kept

def test_filter_that_keeps_no_image_is_an_error_naming_the_params_to_loosen(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    write_metadata(dataset / "metadata.csv", [nih_row("a.png", view="LL"), nih_row("b.png", view="LL", patient=2),
                                              nih_row("c.png", age=120, patient=3)])
    write_csv(dataset / "image_paths.csv", pd.DataFrame({"Image Index": ["a.png", "b.png", "c.png"],
                                                          "path": ["a.png", "b.png", "c.png"]}))
    message = one_line_error(lambda: run_filter(dataset, profile_section(FilterConfig), 0, tmp_path / "out", tmp_path / "m.json"))
    assert message == (f"{dataset / 'metadata.csv'}: the filter kept no image of 3 rows (rejected: view 2, "
                       f"age_out_of_range 1); loosen filter.views, filter.age_min/filter.age_max "
                       f"(every reject is listed in {tmp_path / 'out' / 'rejects.csv'})")
    assert len(pd.read_csv(tmp_path / "out" / "rejects.csv")) == 3


# ----------------------------------------------------------------------------- spreadsheet injection

def read_cells(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_write_csv_prefixes_text_cells_that_a_spreadsheet_would_run(tmp_path):
    values = [HYPERLINK, "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain", "a=b"]
    write_csv(tmp_path / "out.csv", pd.DataFrame({"text": values}))
    assert [row[0] for row in read_cells(tmp_path / "out.csv")[1:]] == [
        "'" + HYPERLINK, "'+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "plain", "a=b"]


def test_write_csv_leaves_numeric_columns_alone(tmp_path):
    write_csv(tmp_path / "out.csv", pd.DataFrame({"int": [-3, 4], "float": [-0.5, 1.5]}))
    assert read_cells(tmp_path / "out.csv") == [["int", "float"], ["-3", "-0.5"], ["4", "1.5"]]


def test_write_csv_prefixing_is_idempotent(tmp_path):
    write_csv(tmp_path / "once.csv", pd.DataFrame({"text": [HYPERLINK]}))
    again = pd.read_csv(tmp_path / "once.csv", dtype=str, keep_default_na=False)
    write_csv(tmp_path / "twice.csv", again)
    assert read_cells(tmp_path / "twice.csv")[1] == ["'" + HYPERLINK]


def test_formula_in_metadata_never_reaches_written_csvs_as_a_formula(tmp_path):
    rows = [nih_row("00000001_000.png", "Effusion", patient=1, gender=HYPERLINK),
            nih_row("00000002_000.png", "No Finding", patient=2),
            nih_row("00000003_000.png", "Effusion", patient=3, view="@SUM(A1)")]
    download = make_nih_download(tmp_path / "nih", rows)
    params = params_with({"dataset": {"source": "nih", "nih_root": str(download)},
                               "filter": {"classes": ["Effusion", "No Finding"], "merges": {}}})
    build_dataset(params, tmp_path / "dataset")
    run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "filter.json")
    filtered = pd.read_csv(tmp_path / "filtered" / "filtered.csv", dtype=str, keep_default_na=False)
    assert dict(zip(filtered["Image Index"], filtered["Patient Gender"])) == {"00000002_000.png": "M"}
    rejects = pd.read_csv(tmp_path / "filtered" / "rejects.csv", dtype=str, keep_default_na=False)
    assert rejects.values.tolist() == [  # a formula as Patient Gender is no sex NIH writes (pass 21): a reject
        ["00000001_000.png", "invalid_sex", f"Patient Gender is {chr(39) + HYPERLINK!r}, expected M or F as NIH "
                                            f"writes it"],  # as the dataset stage's table marks it
        ["00000003_000.png", "view", "'@SUM(A1)"]]
    metadata = pd.read_csv(tmp_path / "dataset" / "metadata.csv", dtype=str, keep_default_na=False)
    assert dict(zip(metadata["Image Index"], metadata["Patient Gender"]))["00000001_000.png"] == "'" + HYPERLINK
    for name in ("filtered/filtered.csv", "filtered/rejects.csv", "dataset/metadata.csv"):
        cells = [cell for row in read_cells(tmp_path / name) for cell in row]
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells), name
    assert json.loads((tmp_path / "filter.json").read_text())["kept"] == 1


# ----------------------------------------------------------------------------- the filtered table after the filter
PREPARE_OVERRIDES = {"image_size": 16, "prepare": {"shard_size": 64, "row_group_size": 16},
                     "filter": {"classes": ["Effusion", "No Finding"], "merges": {},
                                "split": {"val_fraction": 0.2, "test_fraction": 0.2}}}


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory):
    """(params, dataset folder, filtered table as text) for 20 patients, one film each, as the filter wrote it."""
    root = tmp_path_factory.mktemp("filtered_run")
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 21)]
    download = make_nih_download(root / "nih", rows)
    params = params_with({**PREPARE_OVERRIDES, "dataset": {"source": "nih", "nih_root": str(download)}})
    build_dataset(params, root / "dataset")
    run_filter(root / "dataset", params.filter, params.seed, root / "filtered", root / "filter.json")
    return params, root / "dataset", pd.read_csv(root / "filtered" / "filtered.csv", dtype=str, keep_default_na=False)


def prepare_refusal(tmp_path, filtered_run, table: pd.DataFrame) -> str:
    """The one-line DataError of prepare on ``table``; nothing may have been written."""
    params, dataset, _ = filtered_run
    table.to_csv(tmp_path / "filtered.csv", index=False)
    line = one_line_error(lambda: prepare_shards(params, dataset, tmp_path / "filtered.csv", tmp_path / "prepared",
                                                 workers=1))
    assert not (tmp_path / "prepared").exists()
    return line


@pytest.mark.parametrize("column, value, shown", [("Effusion", "abc", "'abc'"), ("Effusion", "", "''"),
                                                  ("Effusion", "2", "'2'"), ("Effusion", "-1", "'-1'"),
                                                  ("split", "bogus", "'bogus'")])
def test_prepare_refuses_a_filtered_cell_the_filter_never_writes_naming_line_and_column(tmp_path, filtered_run,
                                                                                         column, value, shown):
    """'abc' and '' were a ValueError traceback from int(), 'bogus' a KeyError, both after the workers started;
    2 and -1 were written into the shards as labels."""
    table = filtered_run[2].copy()
    table.loc[3, column] = value
    line = prepare_refusal(tmp_path, filtered_run, table)
    assert line.startswith(f"{tmp_path / 'filtered.csv'}: line 5, column '{column}': {shown} is not ")
    assert line.endswith("rerun the filter stage (`dvc repro filter`)")


@pytest.mark.parametrize("split", ["same", "test"])
def test_prepare_refuses_an_image_listed_twice_naming_both_lines(tmp_path, filtered_run, split):
    """A repeated row wrote 21 images from 20; repeated with split=test, a train film was scored as a test film."""
    table = filtered_run[2]
    train = table.index[table["split"] == "train"][0]
    again = table.loc[[train]] if split == "same" else table.loc[[train]].assign(split="test")
    line = prepare_refusal(tmp_path, filtered_run, pd.concat([table, again], ignore_index=True))
    assert f"image '{table.at[train, 'Image Index']}' is on lines {train + 2} and 22" in line


def test_prepare_refuses_a_patient_in_two_splits_naming_both_lines(tmp_path, filtered_run):
    """A test film given a train patient's id was prepared: that patient's films were in both splits."""
    table = filtered_run[2].copy()
    train, test = (table.index[table["split"] == split][0] for split in ("train", "test"))
    table.loc[test, "Patient ID"] = table.loc[train, "Patient ID"]
    line = prepare_refusal(tmp_path, filtered_run, table)
    first, second = sorted([(train, "train"), (test, "test")])
    assert (f"patient '{table.at[train, 'Patient ID']}' is in split '{first[1]}' (line {first[0] + 2}) and "
            f"'{second[1]}' (line {second[0] + 2})") in line


FIFO_READERS = {  # (imports, the call), run in a fresh interpreter with `table` the FIFO's path
    "prepare": ("from cxr_diffusion.profiles import params_with\nfrom cxr_diffusion.data.prepare import prepare_shards",
                "prepare_shards(params_with({}), table.parent / 'dataset', table, table.parent / 'out', workers=1)"),
    "embed_clip_text": ("from cxr_diffusion.conditioning.embed import read_filtered_table", "read_filtered_table(table)"),
    "embed_elixr": ("from cxr_diffusion.conditioning.elixr import build_elixr_store\n"
                    "from cxr_diffusion.config import ElixrConfig\nfrom cxr_diffusion.profiles import profile_section",
                    "build_elixr_store(table, profile_section(ElixrConfig, path=str(table.parent)), table.parent / 's', "
                    "table.parent / 'r.csv', None, 'elixr')"),
}


@pytest.mark.parametrize("reader", sorted(FIFO_READERS))
def test_a_fifo_named_filtered_csv_is_refused_without_blocking(tmp_path, reader):
    """pd.read_csv opened the FIFO and waited for a writer forever (embed_elixr said 'not found')."""
    fifo = tmp_path / "filtered.csv"
    os.mkfifo(fifo)
    imports, call = FIFO_READERS[reader]
    code = (f"import sys\nfrom pathlib import Path\nfrom cxr_diffusion.data.nih import DataError\n{imports}\n"
            f"table = Path(sys.argv[1])\ntry:\n    {call}\nexcept DataError as error:\n    print(error)\n")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{reader} still blocked on a FIFO named filtered.csv after 60 s")
    assert result.stdout == (f"{fifo}: not a regular file (a folder, FIFO or device); rerun the filter stage "
                             f"(`dvc repro filter`)\n"), result.stdout + result.stderr


# ----------------------------------------------------------------------------- pass 9: filtered.csv as the filter writes it

def _train_and_test_rows(table: pd.DataFrame) -> tuple[int, int]:
    return tuple(int(table.index[table["split"] == split][0]) for split in ("train", "test"))


@pytest.mark.parametrize("written", ["000{}", " {} "])
def test_a_patient_written_another_way_in_another_split_is_still_one_patient(tmp_path, filtered_run, written):
    """The filter reads '0005' and ' 5 ' as patient 5: an edit that puts patient 5's test film under '0005' still
    leaks patient 5 into two splits."""
    table = filtered_run[2].copy()
    train, test = _train_and_test_rows(table)
    table.loc[test, "Patient ID"] = written.format(table.loc[train, "Patient ID"])
    line = prepare_refusal(tmp_path, filtered_run, table)
    assert f"patient '{table.loc[train, 'Patient ID']}' is in split" in line


def test_a_patient_id_the_filter_rejects_is_refused_by_prepare(tmp_path, filtered_run):
    table = filtered_run[2].copy()
    table.loc[3, "Patient ID"] = "=1+1"
    assert "line 5, column 'Patient ID': '=1+1' is not an id the filter writes" in prepare_refusal(
        tmp_path, filtered_run, table)


@pytest.mark.parametrize("effusion, no_finding, expected", [
    ("0", "0", "column 'Effusion': 0, but its Finding Labels"),    # a row with no class at all
    ("1", "1", "column "),                                         # No Finding beside a finding
])
def test_class_columns_must_be_what_the_finding_labels_say(tmp_path, filtered_run, effusion, no_finding, expected):
    table = filtered_run[2].copy()
    row = int(table.index[table["Finding Labels"] == "Effusion"][0])
    table.loc[row, "Effusion"], table.loc[row, "No Finding"] = effusion, no_finding
    line = prepare_refusal(tmp_path, filtered_run, table)
    assert expected in line and "make it" in line


def test_a_no_finding_film_labelled_effusion_is_refused(tmp_path, filtered_run):
    """The label would train Effusion while the clip_text prompt says No Finding."""
    table = filtered_run[2].copy()
    row = int(table.index[table["Finding Labels"] == "No Finding"][0])
    table.loc[row, "Effusion"], table.loc[row, "No Finding"] = "1", "0"
    assert "column 'Effusion': 1, but its Finding Labels 'No Finding' make it 0" in prepare_refusal(
        tmp_path, filtered_run, table)


def test_finding_labels_that_put_no_finding_beside_a_finding_are_refused(tmp_path, filtered_run):
    table = filtered_run[2].copy()
    row = int(table.index[table["Finding Labels"] == "Effusion"][0])
    table.loc[row, "Finding Labels"], table.loc[row, "No Finding"] = "No Finding|Effusion", "1"
    assert "puts No Finding beside a finding" in prepare_refusal(tmp_path, filtered_run, table)


def test_finding_labels_with_none_of_the_classes_are_refused(tmp_path, filtered_run):
    table = filtered_run[2].copy()
    row = int(table.index[table["Finding Labels"] == "Effusion"][0])
    table.loc[row, "Finding Labels"], table.loc[row, "Effusion"] = "Hernia", "0"
    assert "give none of the classes" in prepare_refusal(tmp_path, filtered_run, table)


def test_a_header_only_table_does_not_replace_the_prepared_images_with_nothing(tmp_path, filtered_run):
    assert "no images (a header and no rows)" in prepare_refusal(tmp_path, filtered_run, filtered_run[2].iloc[:0])


def test_a_filtered_table_larger_than_any_the_filter_writes_is_refused_unread(tmp_path):
    """A sparse 1 GB file (no disk used) took 15 s and 4.3 GB of memory in pandas before it was refused."""
    from cxr_diffusion.data.filtered_table import read_filtered_csv

    path = tmp_path / "filtered.csv"
    with open(path, "wb") as handle:
        handle.write(b"Image Index,Patient Age,Patient Gender\n")
        handle.truncate(1 << 30)
    assert "more than the 64 MB of any table the filter writes" in one_line_error(lambda: read_filtered_csv(path))
