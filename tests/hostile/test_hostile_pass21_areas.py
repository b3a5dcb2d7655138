"""Pass 21 (areas: filter and prepare, the utility statistics, compare's report): new hostile inputs.

Each test builds its bad input in tmp_path and asserts what must happen (one line naming the file, row or key,
or a listed reject); each failed on the code at the time of filing.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import gradient_image, make_nih_download, nih_row, png_bytes, stage_line
from cxr_diffusion.data.decode import DecodeBudget, DecodeError, decode_grayscale
from cxr_diffusion.data.filter import SPLITS, run_filter
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.errors import UserError
from cxr_diffusion.evaluation.report import MetricsFileError, compare
from cxr_diffusion.profiles import params_with
from cxr_diffusion.utility.statistics import auroc_with_intervals, paired_difference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_report import utility_metrics

CLASSES = ["Effusion", "No Finding"]


def nih_params(nih: Path, method: str = "random", **prepare):
    return params_with({
        "image_size": 16, "dataset": {"source": "nih", "nih_root": str(nih)},
        "filter": {"classes": CLASSES, "merges": {}, "split": {"method": method, "val_fraction": 0.2,
                                                               "test_fraction": 0.2}},
        "prepare": {"shard_size": 64, "row_group_size": 16, "min_side": 16, **prepare},
    })


def twelve_rows(**changes) -> list[dict]:
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 13)]
    for image, values in changes.items():
        rows[int(image) - 1].update(values)
    return rows


def filtered_and_prepared(tmp_path: Path, rows: list[dict] | None = None):
    """A 12-image NIH download, its dataset folder, filter output and a good prepared folder."""
    nih = make_nih_download(tmp_path / "nih", rows or twelve_rows())
    params = nih_params(nih)
    build_dataset(params, tmp_path / "dataset")
    result = run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "f.json")
    prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv", tmp_path / "prepared",
                   workers=1)
    return nih, params, result


def prepare_again(tmp_path: Path, params):
    return prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv",
                          tmp_path / "prepared", tmp_path / "prepare.json", workers=1)


# ----------------------------------------------------------------------------- official split lists

def test_an_official_split_list_saved_with_a_byte_order_mark_still_names_its_first_image(tmp_path):
    """read_image_list decodes with 'utf-8', not 'utf-8-sig' (as read_csv_text does): a list saved by Notepad or
    Excel starts with U+FEFF, its first name becomes '\\ufeff00000001_000.png', matches no image, and that image
    is quietly rejected as `not_in_official_split` (empty detail) though test_list.txt names it."""
    rows = twelve_rows()
    names = [row["Image Index"] for row in rows]
    nih = make_nih_download(tmp_path / "nih", rows)
    (nih / "test_list.txt").write_bytes(("\ufeff" + "\n".join(names[:4]) + "\n").encode())
    (nih / "train_val_list.txt").write_text("\n".join(names[4:]) + "\n")
    params = nih_params(nih, method="official")
    build_dataset(params, tmp_path / "dataset")
    try:
        result = run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "f.json")
    except DataError as error:  # refusing the list, naming it, is right too
        assert "\n" not in str(error) and "test_list.txt" in str(error)
        return
    split = dict(zip(result.table["Image Index"], result.table["split"]))
    assert split.get(names[0]) == "test", result.rejects.to_dict("records")


@pytest.mark.parametrize("name", ["test_list.txt", "Data_Entry_2017_v2020.csv"])
def test_a_download_file_linked_from_outside_the_download_is_refused(tmp_path, name):
    """Images whose real path leaves dataset.nih_root are `path_outside_dataset`, but the metadata CSV and the
    official lists are read through any symbolic link: a test_list.txt linked to a file outside the download is
    read and copied, bytes and all, into data/dataset/official/ (then into DVC's cache and remote)."""
    rows = twelve_rows()
    nih = make_nih_download(tmp_path / "nih", rows)
    (nih / "train_val_list.txt").write_text("\n".join(r["Image Index"] for r in rows[4:]) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if name == "test_list.txt":
        (outside / "notes.txt").write_text("\n".join(r["Image Index"] for r in rows[:4]) + "\nprivate-token\n")
    else:
        (nih / name).rename(outside / "notes.txt")
    (nih / name).symlink_to(outside / "notes.txt")
    line = stage_line(lambda: build_dataset(nih_params(nih), tmp_path / "dataset"))
    assert name in line and "\n" not in line


# ----------------------------------------------------------------------------- prepare: outputs and counts

def test_prepare_that_rejects_every_image_keeps_the_last_good_output(tmp_path):
    """Every image now unreadable (a download unmounted and replaced, a bad copy): prepare lists 12
    decode_error rejects, writes 0 images and replaces the good prepared folder with an empty one, exit 0.
    The filter refuses a table with no rows for exactly this reason; prepare should too."""
    nih, params, result = filtered_and_prepared(tmp_path)
    for name in result.table["Image Index"]:
        (nih / "images_001" / "images" / name).write_bytes(b"not an image")
    line = stage_line(lambda: prepare_again(tmp_path, params))
    assert "\n" not in line and "rejects" in line
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["written"] == 12


def test_prepare_that_empties_a_split_the_filter_filled_is_refused(tmp_path):
    """The test split's images all unreadable: prepare writes train and val and a test split of 0 images, exit 0,
    replacing the good output; every later score is then over no test image. One line naming the split."""
    nih, params, result = filtered_and_prepared(tmp_path)
    for name in result.table.loc[result.table["split"] == "test", "Image Index"]:
        (nih / "images_001" / "images" / name).write_bytes(b"not an image")
    line = stage_line(lambda: prepare_again(tmp_path, params))
    assert "test" in line and "\n" not in line
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["per_split"]["test"] > 0


def test_prepare_rejects_reconcile_per_split(tmp_path):
    """manifest.json and metrics/prepare.json give per_split only the images written, and rejects.csv has no split
    column: images_in = written + rejected holds in total, but per split it cannot be checked from prepare's own
    outputs (which split lost its images?)."""
    nih, params, result = filtered_and_prepared(tmp_path)
    bad = result.table.loc[result.table["split"] == "train", "Image Index"].iloc[0]
    (nih / "images_001" / "images" / bad).write_bytes(b"not an image")
    manifest = prepare_again(tmp_path, params)
    rejects = pd.read_csv(tmp_path / "prepared" / "rejects.csv", dtype=str)
    assert "split" in rejects.columns, list(rejects.columns)
    for split in SPLITS:
        images_in = int((result.table["split"] == split).sum())
        assert images_in == manifest["per_split"][split] + int((rejects["split"] == split).sum())


# ----------------------------------------------------------------------------- images

def test_a_jpegs_exif_orientation_is_applied_or_the_image_is_rejected():
    """decode reads JPEG (and PNG eXIf) but ignores the EXIF Orientation tag: a film stored landscape with
    Orientation 6 ('rotate 90 degrees to view') is trained on lying on its side, silently."""
    pixels = np.zeros((40, 60), np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    try:
        decoded = decode_grayscale(buffer.getvalue(), DecodeBudget(10**7, 10, 16))
    except DecodeError:
        return  # a listed reject is right too
    assert decoded.shape == (60, 40)


def test_an_image_that_decodes_to_one_flat_level_is_a_listed_reject(tmp_path):
    """An RGBA PNG whose X-ray is in its RGB channels and whose alpha is 0 everywhere (an export that saved no
    opacity) decodes to all zeros (transparent = black) and is written as a blank black training image with
    no reject; any image of one flat level carries no film."""
    rows = twelve_rows()
    images = {row["Image Index"]: png_bytes(Image.fromarray(gradient_image(seed=i))) for i, row in enumerate(rows)}
    film = gradient_image(seed=99)
    images[rows[0]["Image Index"]] = png_bytes(Image.fromarray(np.dstack([film] * 3 + [np.zeros_like(film)]), "RGBA"))
    filtered_and_prepared(tmp_path, rows)  # builds with good images first
    (tmp_path / "nih" / "images_001" / "images" / rows[0]["Image Index"]).write_bytes(images[rows[0]["Image Index"]])
    prepare_again(tmp_path, nih_params(tmp_path / "nih"))
    rejects = pd.read_csv(tmp_path / "prepared" / "rejects.csv", dtype=str)
    assert rows[0]["Image Index"] in set(rejects["Image Index"]), rejects.to_dict("records")


# ----------------------------------------------------------------------------- subgroups

def test_a_patient_gender_other_than_m_or_f_is_not_kept_silently(tmp_path):
    """The filter never looks at Patient Gender, and the utility subgroups put every value but 'M' and 'F' in
    'other': a metadata CSV that writes 'Female' / 'Male' (or 'f', or a blank) passes the filter and prepare and
    the sex table compares nobody, with no reject or message. A listed reject naming Patient Gender (or one
    line naming the row) is expected."""
    rows = twelve_rows(**{"3": {"Patient Gender": "Female"}})
    nih = make_nih_download(tmp_path / "nih", rows)
    params = nih_params(nih)
    build_dataset(params, tmp_path / "dataset")
    try:
        result = run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "f.json")
    except DataError as error:
        assert "Patient Gender" in str(error) and "\n" not in str(error)
        return
    rejected = result.rejects.set_index("Image Index")
    assert rows[2]["Image Index"] in rejected.index, result.table[["Image Index", "Patient Gender"]].to_dict("records")
    assert "Gender" in " ".join(rejected.loc[rows[2]["Image Index"]].astype(str))


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("which", ["auroc", "difference"])
def test_a_test_split_of_one_patient_gives_no_bootstrap_interval(which):
    """patient_draws resamples patients; with one patient every draw is the whole split, so the '95% CI' is
    [x, x] over 200 'draws' and a paired difference of -0.06 gets [-0.06, -0.06], which reads as significant.
    With fewer than two patients there is no interval (None, or one line saying why)."""
    rng = np.random.default_rng(0)
    labels = np.array([[1, 0], [0, 1]] * 10)
    scores, baseline = rng.random((20, 2)), rng.random((20, 2))
    patients = ["p1"] * 20
    try:
        if which == "auroc":
            interval = auroc_with_intervals(labels, scores, CLASSES, patients, 200, 0)["macro"]
        else:
            interval = paired_difference(labels, scores, baseline, CLASSES, patients, 200, 0)["macro"]
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert interval["ci_low"] is None and interval["ci_high"] is None, interval


# ----------------------------------------------------------------------------- compare

from test_hostile_reports import inputs as report_inputs, write  # noqa: E402  (the reports' own helpers)


def run_compare(tmp_path: Path, params=None) -> dict:
    return compare(params or params_with({"branches": ["elixr"]}), report_inputs(tmp_path), tmp_path / "summary.json",
                   tmp_path / "report.md")


@pytest.mark.parametrize("key, value, honest", [("domain_fd", 1.0, 50.0),
                                                ("condition_source", "elixr", "elixr_standin")])
def test_a_prdc_key_cannot_replace_another_metric_in_the_summary_and_report(tmp_path, key, value, honest):
    """_branch_summary spreads every key of evaluate's `prdc` section (but `k`) into the summary after domain_fd
    and condition_source: `"prdc": {"domain_fd": 1.0}` makes the report's Domain FD 1.00 where closeness says
    50.0, and `"prdc": {"condition_source": "elixr"}` takes '(stand-in)' off a stand-in ELIXR column."""
    inputs = report_inputs(tmp_path)
    write(inputs.elixr_embedding, {"source": "elixr_standin"})
    write(inputs.evaluations / "elixr.json", {"closeness": {"domain_fd": 50.0},
                                              "prdc": {"precision": 0.5, "recall": 0.5, key: value}})
    try:
        summary = run_compare(tmp_path)
    except MetricsFileError as error:
        assert "\n" not in str(error) and "prdc" in str(error)
        return
    assert summary["elixr"][key] == honest
    assert json.loads((tmp_path / "summary.json").read_text())["elixr"][key] == honest


@pytest.mark.parametrize("where", ["utility_macro_auroc", "utility_ci", "utility_train_images", "domain_fd",
                                   "memorized_fraction"])
def test_a_metric_outside_its_range_is_one_line_naming_file_and_key(tmp_path, where):
    """compare checks a metric's type and finiteness but not its range: a macro AUROC of 1.7, an interval bound
    of -4, -5 train images, a negative Frechet distance or a memorized fraction of 7 are written to report.md
    and summary.json as results."""
    inputs = report_inputs(tmp_path)
    metrics, evaluation = utility_metrics(), {"closeness": {"domain_fd": 50.0}}
    if where == "utility_macro_auroc":
        metrics["arms"]["synthetic"]["macro"]["auroc"] = 1.7
    elif where == "utility_ci":
        metrics["arms"]["synthetic"]["macro"]["ci_low"] = -4.0
    elif where == "utility_train_images":
        metrics["arms"]["synthetic"]["train_images"] = -5
    elif where == "domain_fd":
        evaluation["closeness"]["domain_fd"] = -3.0
    else:
        evaluation["memorization"] = {"pixels": {"fraction_at_or_below_threshold": 7.0}}
    write(inputs.utility / "elixr.json", metrics)
    write(inputs.evaluations / "elixr.json", evaluation)
    with pytest.raises(MetricsFileError) as raised:
        run_compare(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "elixr.json" in message
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "summary.json").exists()
