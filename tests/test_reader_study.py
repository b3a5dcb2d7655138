"""The reader study: a blinded kit (nothing in it tells real from generated) and the scoring of readers' files."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_diffusion.data.decode import encode_png
from cxr_diffusion.data.shards import MANIFEST, PreparedImages, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.io import write_json
from cxr_diffusion.reader_study.errors import ReaderStudyError
from cxr_diffusion.reader_study.items import StudyItem, select_items, source_counts
from cxr_diffusion.reader_study.kit import IMAGES, PAGE_FILES, build_kit, read_kit_manifest
from cxr_diffusion.reader_study.labels import answer_findings, study_findings
from cxr_diffusion.reader_study.report import report_lines
from cxr_diffusion.reader_study.scoring import fleiss_kappa, score_responses
from scripted_readers import guesser, response_file, truthful
from cxr_diffusion.profiles import profile_data

FINDINGS = ["Effusion", "Nodule/Mass"]
CLASSES = ("Effusion", "No Finding", "Nodule/Mass")
BRANCHES = ("clip_text", "clip_vision")


# ---- fixtures made in the test -------------------------------------------------------------------
def procedural_item(source: str, index: int, size: tuple[int, int] = (32, 32)) -> StudyItem:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
    labels = [("Effusion",), ("No Finding",), ("Effusion", "Nodule/Mass"), ()][index % 4]
    return StudyItem(pixels=pixels, source=source, labels=labels, origin_id=f"{9000 + index:08d}_000.png")


def mixed_items(per_source: int = 6) -> list[StudyItem]:
    """Real 32x32 images, one branch's 24x24 and another's 20x28: the kit must make them all alike."""
    sizes = {"real": (32, 32), "clip_text": (24, 24), "clip_vision": (20, 28)}
    return [procedural_item(source, i * 3 + k, size) for k, (source, size) in enumerate(sizes.items())
            for i in range(per_source)]


def make_kit(tmp_path: Path, items: list[StudyItem] | None = None, calibration: int = 2, seed: int = 7,
             display_size: int = 64, study_id: str = "pilot-1") -> tuple[Path, Path, dict]:
    """A kit whose study key is ``seed`` (the pipeline draws a secret one at each build)."""
    kit, key = tmp_path / "kit", tmp_path / "key.json"
    summary = build_kit(items or mixed_items(), kit, key, study_id, FINDINGS, calibration, display_size,
                        study_key=seed.to_bytes(4, "big"))
    return kit, key, summary


def png_chunks(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append(kind.decode("ascii"))
        at += 12 + length
    return chunks


def write_prepared(folder: Path, origins: list[str], seed: int = 0, flat: bool = False) -> Path:
    """A prepared-shards folder (test split) of tiny images (one gray level each if ``flat``), read back
    through PreparedImages."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    writer = SplitShardWriter(folder, "test", shard_schema(CLASSES), shard_size=100, row_group_size=8)
    for i, origin in enumerate(origins):
        labels = [(1, 0, 0), (0, 1, 0), (1, 0, 1)][i % 3]
        pixels = np.full((16, 16), 128, np.uint8) if flat else rng.integers(0, 256, (16, 16), dtype=np.uint8)
        writer.write(ShardRecord(image_png=encode_png(pixels),
                                 image_index=origin, patient_id=str(i), view="PA", finding_labels="", split="test",
                                 labels=labels))
    shards = close_writers(folder, {"test": writer})
    write_json(folder / MANIFEST, {"classes": list(CLASSES), "image_size": 16, "written": len(origins),
                                   "shards": shards})
    return folder


def test_kit_images_have_the_same_pixel_and_byte_size_whatever_their_source(tmp_path):
    kit, key, _ = make_kit(tmp_path)
    sources = {item_id: truth["source"] for item_id, truth in json.loads(key.read_text())["items"].items()}
    paths = sorted((kit / IMAGES).iterdir())
    assert len(paths) == 18 and set(sources.values()) == {"real", *BRANCHES}
    assert {Image.open(path).size for path in paths} == {(64, 64)}
    assert {Image.open(path).mode for path in paths} == {"L"}
    assert len({path.stat().st_size for path in paths}) == 1


def test_kit_images_carry_no_png_metadata_chunks(tmp_path):
    kit, _, _ = make_kit(tmp_path)
    for path in (kit / IMAGES).iterdir():
        chunks = png_chunks(path)
        assert chunks[0] == "IHDR" and chunks[-1] == "IEND" and set(chunks) == {"IHDR", "IDAT", "IEND"}, chunks


def test_small_images_are_enlarged_with_nearest_neighbour_not_smoothed(tmp_path):
    checker = StudyItem(pixels=np.array([[0, 255], [255, 0]], dtype=np.uint8), source="real", labels=(),
                        origin_id="a")
    other = StudyItem(pixels=np.zeros((2, 2), dtype=np.uint8), source="clip_text", labels=(), origin_id="b")
    kit, key, _ = make_kit(tmp_path, [checker, other], calibration=0, display_size=16)
    real_id = next(i for i, truth in json.loads(key.read_text())["items"].items() if truth["source"] == "real")
    pixels = np.asarray(Image.open(kit / IMAGES / f"{real_id}.png"))
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert (pixels[:8, :8] == 0).all() and (pixels[:8, 8:] == 255).all() and (pixels[8:, :8] == 255).all()


def test_kit_file_names_and_order_carry_no_hint_of_the_source(tmp_path):
    kit, key, _ = make_kit(tmp_path, mixed_items(per_source=10), calibration=0)
    manifest, truth = read_kit_manifest(kit), json.loads(key.read_text())["items"]
    order = [truth[item["id"]]["source"] for item in manifest["items"]]
    runs = 1 + sum(a != b for a, b in zip(order, order[1:]))
    assert runs > 10, f"the order looks grouped by source: {order}"  # grouped would be 3 runs
    first_half = set(order[:15])
    assert first_half == {"real", *BRANCHES}
    for item in manifest["items"]:
        assert re.fullmatch(r"item-[0-9a-f]{7}", item["id"]) and item["image"] == f"images/{item['id']}.png"
    assert sorted(path.name for path in (kit / IMAGES).iterdir()) == sorted(f"{i['id']}.png" for i in manifest["items"])


def test_nothing_in_the_kit_names_a_source_or_an_origin_id(tmp_path):
    items = mixed_items()
    kit, _, _ = make_kit(tmp_path, items)
    texts = {name: (kit / name).read_text() for name in [*PAGE_FILES, "study.js"]}
    for word in [*BRANCHES, "elixr", "clip", "vision"] + [item.origin_id for item in items]:
        for name, text in texts.items():
            assert word not in text.lower(), f"{name} mentions {word!r}"
    manifest = read_kit_manifest(kit)
    assert set(manifest) == {"study_id", "kit_id", "display_size", "findings", "calibration", "items"}
    assert all(set(item) == {"id", "image"} for item in manifest["items"])
    assert all(set(item) == {"id", "image", "truth"} and item["truth"]["call"] in ("real", "synthetic")
               for item in manifest["calibration"])
    assert sorted(path.name for path in kit.iterdir()) == sorted([*PAGE_FILES, "study.js", IMAGES])


def test_a_key_inside_the_kit_folder_is_refused(tmp_path):
    with pytest.raises(ReaderStudyError, match="inside the kit folder"):
        build_kit(mixed_items(), tmp_path / "kit", tmp_path / "kit" / "sub" / "key.json", "s", FINDINGS, 0, 32)
    assert not (tmp_path / "kit").exists()


def test_the_key_holds_every_items_truth_and_the_manifest_none(tmp_path):
    items = mixed_items()
    kit, key_path, summary = make_kit(tmp_path, items, calibration=2)
    key, manifest = json.loads(key_path.read_text()), read_kit_manifest(kit)
    assert summary["items"] == 16 and summary["calibration"] == 2
    assert [item["id"] for item in manifest["items"]] == sorted(key["items"], key=[i["id"] for i in
                                                                                   manifest["items"]].index)
    assert set(key["calibration"]) == {item["id"] for item in manifest["calibration"]}
    truths = sorted((t["source"], t["origin_id"], tuple(t["labels"])) for t in
                    [*key["items"].values(), *key["calibration"].values()])
    assert truths == sorted((item.source, item.origin_id, item.labels) for item in items)


def test_calibration_items_come_first_alternately_real_and_generated_with_their_truth(tmp_path):
    kit, key_path, _ = make_kit(tmp_path, calibration=4)
    key, manifest = json.loads(key_path.read_text()), read_kit_manifest(kit)
    calls = [item["truth"]["call"] for item in manifest["calibration"]]
    assert calls == ["real", "synthetic", "real", "synthetic"]
    for item in manifest["calibration"]:
        truth = key["calibration"][item["id"]]
        assert item["truth"]["findings"] == answer_findings(truth["labels"], FINDINGS)
        assert item["id"] not in key["items"]


def test_the_same_study_key_builds_the_same_kit_and_another_key_another_order(tmp_path):
    first, _, _ = make_kit(tmp_path / "a", seed=3)
    again, _, _ = make_kit(tmp_path / "b", seed=3)
    other, _, _ = make_kit(tmp_path / "c", seed=4)
    assert (first / "study.js").read_bytes() == (again / "study.js").read_bytes()
    assert read_kit_manifest(first)["items"] != read_kit_manifest(other)["items"]


def test_the_kit_id_fingerprints_the_images_behind_the_item_ids(tmp_path):
    """A kit rebuilt from other images with the same study key keeps its item ids: only the kit id tells the
    builds apart."""
    kit, key, _ = make_kit(tmp_path / "a", seed=3)
    again, _, _ = make_kit(tmp_path / "b", seed=3)
    items = mixed_items()
    brighter = [StudyItem(np.clip(item.pixels.astype(int) + 1, 0, 255).astype(np.uint8), item.source, item.labels,
                          item.origin_id) for item in items]
    other, other_key, _ = make_kit(tmp_path / "c", brighter, seed=3)
    first, rebuilt = read_kit_manifest(kit), read_kit_manifest(other)
    assert [item["id"] for item in first["items"]] == [item["id"] for item in rebuilt["items"]]
    assert first["kit_id"] == json.loads(key.read_text())["kit_id"] == read_kit_manifest(again)["kit_id"]
    assert rebuilt["kit_id"] == json.loads(other_key.read_text())["kit_id"] != first["kit_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", first["kit_id"])


def test_answers_given_on_an_earlier_build_of_the_kit_are_rejected(tmp_path):
    _, old_key, _ = make_kit(tmp_path / "old", seed=3)
    brighter = [StudyItem(255 - item.pixels, item.source, item.labels, item.origin_id) for item in mixed_items()]
    _, new_key, _ = make_kit(tmp_path / "new", brighter, seed=3)
    response_file(tmp_path / "responses", old_key, "early", truthful)
    metrics = score_responses(tmp_path / "responses", new_key)
    assert metrics["readers"] == 0 and metrics["rejects"][0]["reason"].startswith("other_kit: ")


def test_rebuilding_replaces_the_whole_kit(tmp_path):
    kit, _, _ = make_kit(tmp_path, seed=1)
    (kit / "stray.txt").write_text("left from before")
    make_kit(tmp_path, seed=2)
    assert not (kit / "stray.txt").exists()
    assert len(list((kit / IMAGES).iterdir())) == 18


def test_labels_outside_the_findings_are_refused(tmp_path):
    items = [procedural_item("real", 0), StudyItem(np.zeros((4, 4), np.uint8), "clip_text", ("Hernia",), "x")]
    with pytest.raises(ReaderStudyError, match="Hernia"):
        build_kit(items, tmp_path / "kit", tmp_path / "key.json", "s", FINDINGS, 0, 32)


def test_no_finding_is_answered_as_none():
    assert study_findings(CLASSES) == FINDINGS
    assert answer_findings(("No Finding",), FINDINGS) == ["none"]
    assert answer_findings((), FINDINGS) == ["none"]
    assert answer_findings(("Nodule/Mass", "Effusion"), FINDINGS) == ["Effusion", "Nodule/Mass"]


# ---- selection -------------------------------------------------------------------------------------
def test_default_mix_gives_real_and_each_branch_an_equal_share():
    assert source_counts(["clip_text", "clip_vision", "elixr"], 60, None) == \
        {"real": 15, "clip_text": 15, "clip_vision": 15, "elixr": 15}
    assert source_counts(["clip_text", "elixr"], 10, None) == {"real": 4, "clip_text": 3, "elixr": 3}
    assert source_counts(["clip_text", "elixr"], 10, 0.5) == {"real": 5, "clip_text": 3, "elixr": 2}


def test_selected_items_come_from_distinct_origins_with_their_labels(tmp_path):
    origins = [f"{i:08d}_000.png" for i in range(30)]
    real = PreparedImages(write_prepared(tmp_path / "prepared", origins), "test", channels=1)
    generated = {branch: PreparedImages(write_prepared(tmp_path / branch, origins[:12], seed=k + 1), "test",
                                        channels=1) for k, branch in enumerate(BRANCHES)}
    items = select_items(real, generated, count=12, real_fraction=None, seed=0)
    assert [item.source for item in items] == ["real"] * 4 + ["clip_text"] * 4 + ["clip_vision"] * 4
    assert len({item.origin_id for item in items}) == 12
    for item in items:
        assert item.pixels.shape == (16, 16) and item.pixels.dtype == np.uint8
        assert item.labels == [("Effusion",), ("No Finding",), ("Effusion", "Nodule/Mass")][origins.index(
            item.origin_id) % 3]
    again = select_items(real, generated, count=12, real_fraction=None, seed=0)
    assert [item.origin_id for item in again] == [item.origin_id for item in items]


def test_selection_refuses_when_the_generations_run_out_of_distinct_origins(tmp_path):
    origins = [f"{i:08d}_000.png" for i in range(30)]
    real = PreparedImages(write_prepared(tmp_path / "prepared", origins), "test", channels=1)
    generated = {branch: PreparedImages(write_prepared(tmp_path / branch, origins[:5], seed=1), "test", channels=1)
                 for branch in BRANCHES}
    with pytest.raises(ReaderStudyError, match="clip_vision: 4 images wanted but only 1"):
        select_items(real, generated, count=12, real_fraction=None, seed=0)


def test_a_branch_whose_generations_are_one_flat_gray_is_refused(tmp_path):
    origins = [f"{i:08d}_000.png" for i in range(30)]
    real = PreparedImages(write_prepared(tmp_path / "prepared", origins), "test", channels=1)
    generated = {"clip_text": PreparedImages(write_prepared(tmp_path / "clip_text", origins[:12], seed=1), "test", 1),
                 "clip_vision": PreparedImages(write_prepared(tmp_path / "clip_vision", origins[:12], flat=True),
                                               "test", 1)}
    with pytest.raises(ReaderStudyError, match="clip_vision: its generation for .* is one flat gray level"):
        select_items(real, generated, count=12, real_fraction=None, seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_the_rehearsal_profiles_study_fits_its_three_test_images(tmp_path, seed):
    """The rehearsal's 32 images leave 3 in the test split, and each branch samples the first 2 of them: its
    study must draw distinct origins from that (a count of 4 at half real once failed the rehearsal here)."""

    profile = profile_data("rehearsal")
    study, sampled = profile["reader_study"], profile["sample"]["count"]
    origins = [f"{i:08d}_000.png" for i in range(3)]
    real = PreparedImages(write_prepared(tmp_path / "prepared", origins), "test", channels=1)
    generated = {branch: PreparedImages(write_prepared(tmp_path / branch, origins[:sampled], seed=k + 1), "test",
                                        channels=1) for k, branch in enumerate(profile["branches"])}
    items = select_items(real, generated, study["count"], study["real_fraction"], seed)
    assert len(items) == study["count"] and len({item.origin_id for item in items}) == study["count"]
    assert len({item.source for item in items}) >= 3  # real and two branches


# ---- scoring ---------------------------------------------------------------------------------------
@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    _, key, _ = make_kit(tmp_path, mixed_items(per_source=14), calibration=2)  # 40 scored items: 13 real, 27 generated
    return tmp_path / "responses", key


def test_a_reader_who_is_always_right(study):
    responses, key = study
    response_file(responses, key, "expert", truthful)
    metrics = score_responses(responses, key)
    reader = metrics["per_reader"]["expert"]
    assert metrics["readers"] == 1 and metrics["rejects"] == [] and reader["answered"] == 40
    assert reader["call"]["accuracy"] == 1.0 and reader["call"]["ci95"][1] == 1.0
    assert reader["call"]["ci95"][0] == pytest.approx(0.9119, abs=1e-4)  # exact: 0.025 ** (1 / 40)
    assert reader["call"]["p_value"] < 1e-10 and reader["auc"] == 1.0
    assert reader["called_real"]["real"]["fraction"] == 1.0
    assert all(reader["called_real"][branch]["fraction"] == 0.0 for branch in BRANCHES)
    assert all(cell["f1"] in (1.0, None) for per_source in reader["findings"].values() for cell in per_source.values())
    assert reader["findings"]["none"]["real"]["f1"] == 1.0
    assert reader["realism"]["real"] == {"n": 13, "mean": 3.0, "ci95": [3.0, 3.0]}
    assert metrics["agreement"] == {"readers": 1, "items": 40, "method": None, "kappa": None, "left_out": []}


def test_a_reader_answering_at_random_stays_near_chance(study):
    responses, key = study
    response_file(responses, key, "guesser", guesser(5))
    call = score_responses(responses, key)["per_reader"]["guesser"]["call"]
    assert call["ci95"][0] <= 0.5 <= call["ci95"][1] and call["p_value"] > 0.05


def test_two_readers_who_agree_have_cohen_kappa_one_and_three_have_fleiss(study):
    responses, key = study
    response_file(responses, key, "a", truthful)
    response_file(responses, key, "b", truthful)
    metrics = score_responses(responses, key)
    assert metrics["agreement"] == {"readers": 2, "items": 40, "method": "cohen", "kappa": 1.0,
                                   "left_out": []}
    assert metrics["pooled"]["answered"] == 80 and metrics["pooled"]["call"]["accuracy"] == 1.0
    response_file(responses, key, "c", lambda _i, truth: "synthetic" if truth["source"] == "real" else "real")
    agreement = score_responses(responses, key)["agreement"]
    # Every item split 2:1 (observed agreement 1/3); "real" is 13 * 2 + 27 * 1 = 53 of the 120 calls.
    chance = (53 / 120) ** 2 + (67 / 120) ** 2
    assert agreement["method"] == "fleiss" and agreement["kappa"] == pytest.approx((1 / 3 - chance) / (1 - chance),
                                                                                   abs=1e-4)


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa = 0.210.
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(counts)) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa(np.array([[3, 0], [3, 0]])) is None  # everyone always says the same: undefined
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 1], [1, 1]]))


def test_a_reader_who_always_says_synthetic_is_at_chance_on_balanced_accuracy_not_on_accuracy(study):
    """27 of the 40 items are generated: always answering "synthetic" scores 0.675 without seeing anything."""
    responses, key = study
    response_file(responses, key, "lazy", lambda _i, _t: "synthetic")
    metrics = score_responses(responses, key)
    lazy = metrics["per_reader"]["lazy"]
    assert lazy["call"]["accuracy"] == 0.675 and lazy["balanced_accuracy"] == 0.5 and lazy["auc"] == 0.5
    assert lazy["real_share"] == 0.325
    text = "\n".join(report_lines(metrics))
    assert "**32% of the answered items are real, not half**" in text and "| lazy | 40 | 0.68" in text
    response_file(responses, key, "expert", truthful)
    assert score_responses(responses, key)["per_reader"]["expert"]["balanced_accuracy"] == 1.0


def test_agreement_leaves_out_a_partial_reader_rather_than_the_items(study):
    responses, key = study
    response_file(responses, key, "a", truthful)
    response_file(responses, key, "b", truthful)
    response_file(responses, key, "c", truthful, skip=39)  # one answer only
    agreement = score_responses(responses, key)["agreement"]
    assert agreement == {"readers": 2, "items": 40, "method": "cohen", "kappa": 1.0, "left_out": ["c"]}


def test_one_file_with_a_key_twice_is_rejected_not_read_last_wins(study):
    responses, key = study
    path = response_file(responses, key, "r", truthful)
    text = path.read_text()
    path.write_text(text.replace('"reader_id": "r"', '"reader_id": "r", "reader_id": "someone-else"'))
    [reject] = score_responses(responses, key)["rejects"]
    assert reject["reason"].startswith("bad_format: key 'reader_id' given twice")


def test_reader_ids_that_differ_in_case_space_or_unicode_form_are_one_reader(study):
    responses, key = study
    for number, reader in enumerate(["Jos\u00e9", "jose\u0301 ", "JOS\u00c9"]):
        response_file(responses, key, reader, truthful, name=f"r{number}.json")
    metrics = score_responses(responses, key)
    assert metrics["readers"] == 0 and [r["reason"].split(":")[0] for r in metrics["rejects"]] == ["duplicate_reader"] * 3


def test_every_file_in_the_folder_is_read_or_listed(study):
    responses, key = study
    response_file(responses, key, "upper", truthful, name="upper.JSON")
    (responses / "notes.txt").write_text("reader 3 will send theirs next week")
    (responses / "README.md").write_text("the folder's own readme: not a response")
    (responses / ".DS_Store").write_bytes(b"\0")
    (responses / "device.json").symlink_to("/proc/self/mem")  # reading it fails with an OSError
    metrics = score_responses(responses, key)
    assert metrics["readers"] == 1 and "upper" in metrics["per_reader"]
    assert {r["file"]: r["reason"].split(":")[0] for r in metrics["rejects"]} == {
        "notes.txt": "not_json", "device.json": "not_a_response", ".DS_Store": "not_a_response"}  # a link; hidden


def test_a_partial_reader_is_scored_on_what_they_answered(study):
    responses, key = study
    response_file(responses, key, "halfway", truthful, skip=25)
    reader = score_responses(responses, key)["per_reader"]["halfway"]
    assert reader["answered"] == 15 and reader["unanswered"] == 25 and reader["call"]["n"] == 15


@pytest.mark.parametrize("change, code", [
    ({"study_id": "another-study"}, "other_study"),
    ({"kit_id": "0123456789abcdef"}, "other_kit"),
    ({"answers": {"item-zzzzzzz": {"call": "real", "confidence": 3, "realism": 3, "findings": ["none"]}}},
     "unknown_item"),
    ({"answers": "all of them"}, "bad_format"),
    ({"answers": {}}, "bad_format"),  # exported before answering anything
    ({"reader_id": "\u200b"}, "bad_reader_id"),  # no visible character
    ({"extra": 1}, "bad_format"),
])
def test_files_that_do_not_fit_the_study_are_rejected_with_a_reason(study, change, code):
    responses, key = study
    response_file(responses, key, "good", truthful)
    bad = response_file(responses, key, "bad", truthful, name="bad.json", **change)
    metrics = score_responses(responses, key)
    assert metrics["readers"] == 1 and metrics["files"] == 2
    assert [reject["file"] for reject in metrics["rejects"]] == [bad.name]
    assert metrics["rejects"][0]["reason"].startswith(f"{code}: ")


@pytest.mark.parametrize("field, value", [("confidence", 6), ("confidence", True), ("realism", 0),
                                          ("realism", 2.5), ("call", "fake"), ("findings", []),
                                          ("findings", ["none", "Effusion"]), ("findings", ["Hernia"])])
def test_answers_out_of_range_reject_the_file_naming_the_item(study, field, value):
    responses, key = study
    path = response_file(responses, key, "r", truthful)
    payload = json.loads(path.read_text())
    item_id = sorted(payload["answers"])[3]
    payload["answers"][item_id][field] = value
    path.write_text(json.dumps(payload))
    [reject] = score_responses(responses, key)["rejects"]
    assert reject["reason"].startswith("out_of_range: ") and item_id in reject["reason"] and field in reject["reason"]


def test_a_calibration_item_in_a_file_is_an_unknown_item(study):
    responses, key = study
    calibration_id = next(iter(json.loads(key.read_text())["calibration"]))
    answer = {"call": "real", "confidence": 3, "realism": 3, "findings": ["none"], "note": ""}
    response_file(responses, key, "r", truthful, answers={calibration_id: answer})
    [reject] = score_responses(responses, key)["rejects"]
    assert reject["reason"].startswith("unknown_item: ") and "calibration" in reject["reason"]


def test_two_files_of_the_same_reader_are_both_rejected(study):
    responses, key = study
    response_file(responses, key, "dr-a", truthful, name="first.json")
    response_file(responses, key, "dr-a", truthful, name="second.json")
    response_file(responses, key, "dr-b", truthful)
    metrics = score_responses(responses, key)
    assert metrics["readers"] == 1 and list(metrics["per_reader"]) == ["dr-b"]
    assert [(r["file"], r["reason"].split(":")[0]) for r in metrics["rejects"]] == \
        [("first.json", "duplicate_reader"), ("second.json", "duplicate_reader")]


def test_a_malformed_file_is_rejected_not_fatal(study):
    responses, key = study
    responses.mkdir()
    (responses / "broken.json").write_text('{"study_id": ')
    metrics = score_responses(responses, key)
    assert metrics["readers"] == 0 and metrics["rejects"][0]["reason"].startswith("not_json: ")


def test_no_responses_says_how_to_run_the_study(study, tmp_path):
    responses, key = study
    for folder in (responses, tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        metrics = score_responses(folder, key, kit_dir=Path("reports/reader_study"))
        assert metrics["readers"] == 0 and metrics["items"] == 40 and metrics["rejects"] == []
        assert "reports/reader_study.zip" in metrics["how_to"] and "reader_study/index.html" in metrics["how_to"] and str(folder) in metrics["how_to"]
    assert "No reader responses yet" in "\n".join(report_lines(metrics))


def test_metrics_are_plain_json_and_render_as_a_report_section(study, tmp_path):
    responses, key = study
    response_file(responses, key, "a", truthful)
    response_file(responses, key, "b (c)", lambda _i, _t: "real")
    (responses / "x.json").write_text("[]")
    metrics = score_responses(responses, key)
    write_json(tmp_path / "metrics.json", metrics)  # no NaN, no numpy types; keys sorted, as compare reads them back
    text = "\n".join(report_lines(json.loads((tmp_path / "metrics.json").read_text())))
    assert text.startswith("## Expert reader study")
    assert "| a | 40 | 1.00 [0.91, 1.00] |" in text and "| b \\(c\\) | 40 |" in text
    assert "Cohen's kappa" in text and "- x&#46;json: `not_json`: " in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| real images") or
            any(line.startswith(f"| {branch} |") for branch in BRANCHES)]
    assert rows == ["| real images", "| clip_text", "| clip_vision"]  # real first, whatever the JSON order
    assert "| Finding | real | clip_text | clip_vision |" in text


def test_scoring_without_an_answer_key_is_a_clear_error(tmp_path):
    with pytest.raises(ReaderStudyError, match="no answer key there"):
        score_responses(tmp_path / "responses", tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"items": []}')
    with pytest.raises(ReaderStudyError, match="not an answer key"):
        score_responses(tmp_path / "responses", tmp_path / "other.json")
