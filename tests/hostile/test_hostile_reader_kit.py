"""The blinded kit played as an adversary: a reader who looks at everything in the kit but the pixels.

The items are built so that real and generated images differ in how well they compress (real: noise,
generated: smooth), the signal a compressing zip leaked. The adversary reads every feature of the kit
and its zip except the pixels it shows (file names, ids, manifest order, byte sizes, compressed sizes,
modification times, zip order and dates) and, knowing the public seed, replays the build. Each must
tell real from generated at chance.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.kit import IMAGES, build_kit, read_kit_manifest

FINDINGS = ["Effusion"]
PER_SOURCE = 20
KITS = 8


def telling_items() -> list[StudyItem]:
    """Real images of noise, generated ones smooth: they compress very differently."""
    items = []
    for index in range(2 * PER_SOURCE):
        rng = np.random.default_rng(index)
        real = index < PER_SOURCE
        if real:
            pixels = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
        else:
            ramp = np.linspace(0, 255, 48, dtype=np.float32)
            pixels = np.clip(np.add.outer(ramp, ramp) / 2 + rng.normal(0, 1, (48, 48)), 0, 255).astype(np.uint8)
        items.append(StudyItem(pixels=pixels, source="real" if real else "clip_text", labels=("Effusion",),
                               origin_id=f"{index:08d}_000.png"))
    return items


def build(folder: Path, study_key: bytes | None) -> tuple[Path, Path, Path]:
    kit, key, archive = folder / "kit", folder / "key.json", folder / "kit.zip"
    build_kit(telling_items(), kit, key, "pilot-1", FINDINGS, 0, 64, study_key=study_key, archive_path=archive)
    return kit, key, archive


def features(kit: Path, archive: Path) -> dict[str, dict[str, float]]:
    """Item id -> every feature of the kit's files but the pixels."""
    manifest = read_kit_manifest(kit)
    with zipfile.ZipFile(archive) as opened:
        entries = {Path(info.filename).stem: (position, info) for position, info in enumerate(opened.infolist())}
    table = {}
    for position, item in enumerate(manifest["items"]):
        path = kit / item["image"]
        stat = path.stat()
        zip_position, info = entries[item["id"]]
        table[item["id"]] = {
            "page position": position, "id value": int(item["id"].removeprefix("item-"), 16),
            "name order": sorted(entries).index(item["id"]), "bytes": stat.st_size, "mtime": stat.st_mtime_ns,
            "inode": stat.st_ino, "zip compressed size": info.compress_size, "zip position": zip_position,
            "zip date": sum(part * 100**k for k, part in enumerate(reversed(info.date_time))),
            "zip attributes": info.external_attr,
        }
    return table


def test_the_fixture_carries_the_signal_a_compressing_zip_leaked():
    """Guards the test itself: compressed, the images separate perfectly."""
    items = telling_items()
    sizes = [len(zlib.compress(item.pixels.tobytes(), 9)) for item in items]
    assert roc_auc_score([item.source == "real" for item in items], sizes) == 1.0


def test_no_feature_but_the_pixels_tells_real_from_generated(tmp_path):
    truth, table = [], {}
    for k in range(KITS):
        kit, key, archive = build(tmp_path / str(k), study_key=bytes([k + 1]) * 32)
        sources = json.loads(key.read_text())["items"]
        for item_id, values in features(kit, archive).items():
            truth.append(sources[item_id]["source"] == "real")
            for name, value in values.items():
                table.setdefault(name, []).append(value)
    # 320 items: a feature at chance lands within 0.5 +- 0.1 (about 3 standard errors); a leak is near 0 or 1.
    scores = {name: roc_auc_score(truth, values) for name, values in table.items()}
    leaking = {name: round(score, 3) for name, score in scores.items() if abs(score - 0.5) > 0.1}
    assert not leaking, f"features that tell real from generated: {leaking}"
    assert len({*table["bytes"]}) == len({*table["mtime"]}) == len({*table["zip compressed size"]}) == 1


def test_replaying_the_build_with_the_public_seed_reveals_nothing(tmp_path):
    """The old kit drew its ids and order from the pipeline seed: an adversary tried seeds until the ids
    matched. Now they come from a secret key: two builds of the same items differ, and a guess at the key
    (any small number, as seeds are) rebuilds other ids."""
    kit, key, _ = build(tmp_path / "real", study_key=None)
    shown = {item["id"] for item in read_kit_manifest(kit)["items"]}
    again, _, _ = build(tmp_path / "again", study_key=None)
    assert shown.isdisjoint({item["id"] for item in read_kit_manifest(again)["items"]})
    for guess in range(64):
        guessed, _, _ = build(tmp_path / f"guess{guess}", study_key=guess.to_bytes(8, "big"))
        assert len(shown & {item["id"] for item in read_kit_manifest(guessed)["items"]}) <= 2, guess
    study_key = bytes.fromhex(json.loads(key.read_text())["study_key"])
    assert len(study_key) == 32
    rebuilt, _, _ = build(tmp_path / "rebuilt", study_key=study_key)
    assert (rebuilt / "study.js").read_bytes() == (kit / "study.js").read_bytes()


def test_the_kit_files_carry_one_date_and_the_zip_stores_them_uncompressed(tmp_path):
    kit, _, archive = build(tmp_path, study_key=b"k")
    assert {path.stat().st_mtime_ns for path in kit.rglob("*")} | {kit.stat().st_mtime_ns} == {315_532_800 * 10**9}
    with zipfile.ZipFile(archive) as opened:
        infos = opened.infolist()
        assert [info.filename for info in infos] == sorted(info.filename for info in infos)
        assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}
        assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
        names = {info.filename.removeprefix("kit/") for info in infos}
    assert names == {path.relative_to(kit).as_posix() for path in kit.rglob("*") if path.is_file()}
    assert sum(name.startswith(f"{IMAGES}/") for name in names) == 2 * PER_SOURCE


@pytest.mark.parametrize("study_key", [b"", "a string"])
def test_a_study_key_that_is_not_bytes_is_refused(tmp_path, study_key):
    from cxr_diffusion.reader_study.errors import ReaderStudyError

    with pytest.raises(ReaderStudyError, match="study_key"):
        build(tmp_path, study_key=study_key)
