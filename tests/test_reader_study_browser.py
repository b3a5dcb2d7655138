"""The reader-study page in a real headless Chromium, opened from file:// as a reader would.

Skipped where Chromium, chromedriver or selenium are missing, except under CI (which installs them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_diffusion.reader_study.browser import find_chromium, headless_chromium
from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.kit import build_kit, read_kit_manifest
from cxr_diffusion.reader_study.scoring import score_responses

FINDINGS = ["Effusion", "Nodule/Mass"]
READER = "Dr. Ada/01"  # a "/" and a space: the export's file name must be sanitized


def _require_browser() -> None:
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if find_chromium() is None:
        missing.append("chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    if missing:
        message = f"the browser tests need {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def driver(tmp_path):
    _require_browser()
    chrome = headless_chromium(tmp_path / "profile", tmp_path / "downloads")
    yield chrome
    chrome.quit()


@pytest.fixture
def kit(tmp_path) -> tuple[Path, dict]:
    """Six scored items and two calibration items, half real, half from one branch."""
    rng = np.random.default_rng(0)
    labels = [("Effusion",), ("No Finding",), ("Effusion", "Nodule/Mass"), ("Nodule/Mass",)]
    items = [StudyItem(rng.integers(0, 256, (16, 16), dtype=np.uint8), "real" if i % 2 else "clip_text",
                       labels[i % 4], f"{i:08d}_000.png") for i in range(8)]
    build_kit(items, tmp_path / "kit", tmp_path / "key.json", "pilot-1", FINDINGS, 2, display_size=64, study_key=b"\x01")
    return tmp_path / "kit", json.loads((tmp_path / "key.json").read_text())


def keys(driver, *sequence) -> None:
    """Press keys on the page; ("shift", "3") holds Shift."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    actions = ActionChains(driver)
    for key in sequence:
        if isinstance(key, tuple):
            actions.key_down(Keys.SHIFT).send_keys(key[1]).key_up(Keys.SHIFT)
        else:
            actions.send_keys({"enter": Keys.ENTER, "right": Keys.ARROW_RIGHT, "left": Keys.ARROW_LEFT,
                               "escape": Keys.ESCAPE}.get(key, key))
    actions.perform()


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def shown_answer(driver) -> dict:
    """What the form shows for the current item."""
    return driver.execute_script("""
        const pressed = (name) => { const b = document.querySelector('[data-' + name + '][aria-pressed="true"]');
                                    return b ? b.getAttribute('data-' + name) : null; };
        return {call: pressed('call'), confidence: pressed('confidence'), realism: pressed('realism'),
                findings: [...document.querySelectorAll('[data-finding]:checked')].map(b => b.value),
                note: document.getElementById('note').value};""")


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def start(driver, kit_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get((kit_dir / "index.html").as_uri())
    assert driver.find_element(By.ID, "welcome").is_displayed()
    driver.find_element(By.ID, "reader-id").send_keys(READER)
    keys(driver, "enter")


def wait_for_file(folder: Path, name: str, seconds: float = 10) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (folder / name).is_file() and not list(folder.glob("*.crdownload")):
            return folder / name
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded to {folder}: {list(folder.glob('*')) if folder.exists() else []}")


def test_a_reader_answers_by_keyboard_and_mouse_reloads_midway_and_exports_a_scorable_file(driver, kit, tmp_path):
    kit_dir, key = kit
    manifest = read_kit_manifest(kit_dir)
    truth = [key["items"][item["id"]]["source"] for item in manifest["items"]]
    start(driver, kit_dir)
    assert text(driver, "item-counter") == "Calibration 1 of 2"
    assert text(driver, "truth-call").lower() == manifest["calibration"][0]["truth"]["call"]
    keys(driver, "right", "enter")  # past the two calibration items
    assert text(driver, "item-counter") == "Item 1 of 6" and text(driver, "progress-text") == "0 / 6 answered"

    by_keyboard = [("a", ["Effusion"]), ("b", ["Nodule/Mass"]), ("n", ["none"])]
    for position, (finding_key, findings) in enumerate(by_keyboard):
        call = "r" if truth[position] == "real" else "s"
        keys(driver, call, str(position + 2), ("shift", str(position + 1)), finding_key)
        assert shown_answer(driver) == {"call": "real" if call == "r" else "synthetic",
                                        "confidence": str(position + 2), "realism": str(position + 1),
                                        "findings": findings, "note": ""}
        keys(driver, "enter")
    assert text(driver, "progress-text") == "3 / 6 answered"

    driver.refresh()  # nothing is lost: the same reader, the same place, the same answers
    assert text(driver, "item-counter") == "Item 4 of 6" and text(driver, "progress-text") == "3 / 6 answered"
    keys(driver, "left")
    assert shown_answer(driver) == {"call": "real" if truth[2] == "real" else "synthetic", "confidence": "4",
                                    "realism": "3", "findings": ["none"], "note": ""}
    keys(driver, "right")

    for position in range(3, 6):  # by mouse, with a note
        click(driver, f"[data-call='{truth[position] if truth[position] == 'real' else 'synthetic'}']")
        click(driver, "[data-confidence='5']")
        click(driver, "[data-realism='2']")
        click(driver, "input[data-finding='Effusion']")
        click(driver, "#note")
        keys(driver, "rs n 12 AB")  # typed into the note: never answers
        keys(driver, "escape")
        assert shown_answer(driver)["findings"] == ["Effusion"] and shown_answer(driver)["confidence"] == "5"
        click(driver, "#next")
    assert "You answered 6 of 6 items." in text(driver, "finish-text")

    click(driver, "#finish-export")
    exported = wait_for_file(tmp_path / "downloads", "pilot-1__Dr._Ada_01.json")
    payload = json.loads(exported.read_text())
    assert set(payload) == {"study_id", "kit_id", "reader_id", "exported_at", "answers"} and payload["reader_id"] == READER
    assert payload["kit_id"] == read_kit_manifest(kit[0])["kit_id"]
    metrics = score_responses(exported.parent, tmp_path / "key.json")
    reader = metrics["per_reader"][READER]
    assert metrics["rejects"] == [] and reader["answered"] == 6 and reader["unanswered"] == 0
    assert reader["call"]["accuracy"] == 1.0
    notes = sorted(answer["note"] for answer in payload["answers"].values())
    assert notes == ["", "", "", "rs n 12 AB", "rs n 12 AB", "rs n 12 AB"]
    assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_none_excludes_the_findings_and_unfinished_items_are_not_exported(driver, kit, tmp_path):
    kit_dir, _ = kit
    start(driver, kit_dir)
    keys(driver, "right", "right", "a", "b")
    assert shown_answer(driver)["findings"] == ["Effusion", "Nodule/Mass"]
    keys(driver, "n")
    assert shown_answer(driver)["findings"] == ["none"]
    click(driver, "input[data-finding='Nodule/Mass']")
    assert shown_answer(driver)["findings"] == ["Nodule/Mass"]
    keys(driver, "r", "3", ("shift", "5"))  # item 1 complete; item 2 gets a call only
    keys(driver, "enter", "s")
    assert text(driver, "item-state") == "incomplete" and text(driver, "progress-text") == "1 / 6 answered"
    click(driver, "#export")
    exported = wait_for_file(tmp_path / "downloads", "pilot-1__Dr._Ada_01.json")
    [answer] = json.loads(exported.read_text())["answers"].values()
    assert answer == {"call": "real", "confidence": 3, "realism": 5, "findings": ["Nodule/Mass"], "note": ""}
    reader = score_responses(exported.parent, tmp_path / "key.json")["per_reader"][READER]
    assert reader["answered"] == 1 and reader["unanswered"] == 5
