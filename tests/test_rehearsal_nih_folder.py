"""The stand-in NIH ChestX-ray14 folder: NIH's layout and metadata, phantom images, read by the real stages."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
from PIL import Image

from cxr_diffusion.profiles import params_with
from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.data.nih import NIH_HEADER, index_nih_root, read_metadata_csv
from cxr_diffusion.data.phantom.assets import nih_metadata_csv
from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.rehearsal.nih_folder import (
    ARCHIVE_SIZES, MANIFEST_NAME, METADATA_NAME, NOTE_NAME, archive_folders, build_nih_folder, select_images,
)

from conftest import REPO
from cxr_diffusion.profiles import profile_data

INCLUDE_LIST = REPO / "reference/nih-512/filtered_nihcxr14.csv"
COUNT, SIZE = 12, 64
N_METADATA_ROWS = 112_120


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return read_metadata_csv(nih_metadata_csv())


@pytest.fixture(scope="module")
def include_list() -> pd.DataFrame:
    return pd.read_csv(INCLUDE_LIST, dtype={"Image Index": str})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One small stand-in, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("standin") / "nih"
    summary = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=0, image_size=SIZE, progress=False)
    return root, summary


def rendered_files(root):
    return sorted(root.glob("images_*/images/*.png"))


def test_archives_split_the_sorted_ids_as_nih_ships_them(metadata):
    assert ARCHIVE_SIZES == (4_999,) + (10_000,) * 10 + (7_121,) and sum(ARCHIVE_SIZES) == N_METADATA_ROWS
    folders = archive_folders(metadata["Image Index"].tolist())
    by_folder = pd.Series(folders).groupby(lambda name: folders[name])
    first = by_folder.apply(lambda s: min(s.index)).to_dict()
    last = by_folder.apply(lambda s: max(s.index)).to_dict()
    assert by_folder.size().tolist() == list(ARCHIVE_SIZES)
    assert (first["images_001/images"], last["images_001/images"]) == ("00000001_000.png", "00001335_006.png")
    assert (first["images_002/images"], last["images_002/images"]) == ("00001336_000.png", "00003923_013.png")
    assert (first["images_012/images"], last["images_012/images"]) == ("00028173_003.png", "00030805_000.png")


def test_archive_folders_refuse_a_metadata_that_is_not_all_of_nih(metadata):
    with pytest.raises(ValueError, match="112120"):
        archive_folders(metadata["Image Index"].tolist()[:-1])


def test_metadata_is_torchxrayvision_copy_byte_for_byte_with_nih_header(folder):
    root, _ = folder
    written = (root / METADATA_NAME).read_bytes()
    assert written == gzip.decompress(nih_metadata_csv().read_bytes())
    assert written.split(b"\n", 1)[0].decode() == ",".join(NIH_HEADER)
    assert len(read_metadata_csv(root / METADATA_NAME)) == N_METADATA_ROWS


def test_images_are_grayscale_pngs_named_by_real_id_in_their_nih_archive_folder(folder, metadata):
    root, summary = folder
    files = rendered_files(root)
    assert sorted(p.name for p in files) == summary["ids"] and len(files) == COUNT
    folders = archive_folders(metadata["Image Index"].tolist())
    for path in files:
        assert str(path.parent.relative_to(root)) == folders[path.name]
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (SIZE, SIZE))
    assert {p.name for p in root.glob("images_*")} == {folders[p.name].split("/")[0] for p in files}
    assert sum(summary["archives"].values()) == COUNT


def test_selection_is_one_image_per_patient_over_every_class_and_view(folder, metadata, include_list):
    _, summary = folder
    chosen = include_list[include_list["Image Index"].isin(summary["ids"])].merge(metadata, on="Image Index")
    assert len(chosen) == COUNT and chosen["Patient ID"].is_unique
    classes = [c for c in include_list.columns if c != "Image Index"]
    assert (chosen[classes].sum() > 0).all(), chosen[classes].sum().to_dict()
    assert set(chosen["View Position"]) == {"PA", "AP"}


def test_selection_depends_only_on_the_seed(metadata, include_list):
    first = select_images(include_list, metadata, COUNT, seed=0)["Image Index"].tolist()
    shuffled = metadata.sample(frac=1.0, random_state=1)
    assert select_images(include_list, shuffled, COUNT, seed=0)["Image Index"].tolist() == first
    assert select_images(include_list, metadata, COUNT, seed=1)["Image Index"].tolist() != first


def test_count_below_one_patient_per_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="count=2"):
        build_nih_folder(tmp_path / "nih", INCLUDE_LIST, count=2, image_size=SIZE, progress=False)
    assert not (tmp_path / "nih").exists()


def test_note_says_it_is_a_phantom_and_how_it_was_made(folder):
    root, _ = folder
    note = (root / NOTE_NAME).read_text()
    assert "NOT NIH ChestX-ray14 DATA" in note and "cxr-diffusion" in note
    assert f"count={COUNT}, seed=0, image_size={SIZE}" in note and "build_nih_folder" in note


def test_nih_reader_finds_the_rendered_images_and_reports_the_rest_missing(folder):
    root, summary = folder
    index = index_nih_root(root)
    assert sorted(index.image_paths["Image Index"]) == summary["ids"]
    assert len(index.missing) == N_METADATA_ROWS - COUNT and not set(index.missing) & set(summary["ids"])
    assert index.unexpected == [] and index.official_lists == {}


def test_dataset_and_filter_stages_keep_the_rendered_ids_and_reject_the_rest_as_missing(folder, tmp_path,
                                                                                         monkeypatch):
    root, summary = folder
    monkeypatch.chdir(REPO)  # the profile names its include list relative to the repository, as DVC runs it
    profile = profile_data("nih-512")
    profile["dataset"]["nih_root"] = str(root)
    params = params_with(profile)
    assert params.dataset.source == "nih" and params.filter.include_list

    dataset = build_dataset(params, tmp_path / "dataset", tmp_path / "dataset.json")
    assert (dataset.rows, dataset.images, dataset.missing, dataset.unexpected) == \
        (N_METADATA_ROWS, COUNT, N_METADATA_ROWS - COUNT, 0)
    result = run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered",
                        tmp_path / "filter.json")

    assert sorted(result.table["Image Index"]) == summary["ids"]
    missing = result.rejects[result.rejects["reason"] == "image_missing"]
    assert len(missing) == len(result.rejects) == N_METADATA_ROWS - COUNT
    include_ids = set(pd.read_csv(INCLUDE_LIST, dtype=str)["Image Index"])
    assert include_ids - set(summary["ids"]) <= set(missing["Image Index"])
    metrics = json.loads((tmp_path / "filter.json").read_text())
    assert metrics["rows_in"] == metrics["kept"] + sum(metrics["rejected"].values()) == N_METADATA_ROWS
    assert metrics["include_list"] == {"listed": 48311, "not_in_metadata": 0, "image_missing": 48311 - COUNT,
                                       "flag_disagreements": 0}
    assert all(metrics["splits"][split]["images"] > 0 for split in ("train", "val", "test"))


def test_rerun_with_the_same_arguments_leaves_a_complete_folder_untouched(folder):
    root, summary = folder
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}
    again = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=0, image_size=SIZE, progress=False)
    assert again["skipped"] and again["ids"] == summary["ids"] and again["archives"] == summary["archives"]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")} == before


def test_a_partial_folder_is_rebuilt_to_the_same_bytes(tmp_path):
    root = tmp_path / "nih"
    first = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=0, image_size=SIZE, progress=False)
    files = rendered_files(root)
    original = {p: p.read_bytes() for p in files}
    files[0].unlink()
    files[1].write_bytes(b"truncated")
    again = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=0, image_size=SIZE, progress=False)
    assert not again["skipped"] and again["ids"] == first["ids"]
    assert {p: p.read_bytes() for p in rendered_files(root)} == original
    assert not list(tmp_path.glob(".nih.*"))  # no temporary folder left beside it


def test_other_arguments_replace_the_folder_whole(tmp_path):
    root = tmp_path / "nih"
    first = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=0, image_size=SIZE, progress=False)
    second = build_nih_folder(root, INCLUDE_LIST, count=COUNT, seed=1, image_size=SIZE, progress=False)
    assert not second["skipped"] and second["ids"] != first["ids"]
    assert sorted(p.name for p in rendered_files(root)) == second["ids"]
    assert json.loads((root / MANIFEST_NAME).read_text())["arguments"]["seed"] == 1


def test_a_folder_it_did_not_make_is_never_replaced(tmp_path):
    root = tmp_path / "download"
    (root / "images_001" / "images").mkdir(parents=True)
    (root / "images_001" / "images" / "00000001_000.png").write_bytes(b"someone's data")
    with pytest.raises(FileExistsError, match="not made by build_nih_folder"):
        build_nih_folder(root, INCLUDE_LIST, count=COUNT, image_size=SIZE, progress=False)
    assert (root / "images_001" / "images" / "00000001_000.png").read_bytes() == b"someone's data"


def test_full_size_images_are_8_bit_grayscale_1024_pngs(tmp_path):
    summary = build_nih_folder(tmp_path / "nih", INCLUDE_LIST, count=3, image_size=1024, progress=False)
    path = rendered_files(tmp_path / "nih")[0]
    assert path.name in summary["ids"]
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (1024, 1024))
