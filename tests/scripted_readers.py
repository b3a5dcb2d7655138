"""Scripted readers of a reader-study kit: exports written from the answer key as the kit's page writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cxr_diffusion.reader_study.labels import answer_findings

Call = Callable[[str, dict], str]  # (item id, its truth in the key) -> "real" | "synthetic"


def response_file(folder: Path, key_path: Path, reader: str, call: Call, study_id: str | None = None,
                  name: str | None = None, skip: int = 0, **overrides) -> Path:
    """A reader's export, scripted from the key: ``call(item_id, truth) -> "real" | "synthetic"``."""
    key = json.loads(key_path.read_text())
    answers = {}
    for item_id, truth in sorted(key["items"].items())[skip:]:
        answers[item_id] = {"call": call(item_id, truth), "confidence": 4, "realism": 3,
                            "findings": answer_findings(truth["labels"], key["findings"]), "note": ""}
    payload = {"study_id": study_id or key["study_id"], "kit_id": key["kit_id"], "reader_id": reader,
               "exported_at": "2025-01-01T00:00:00.000Z", "answers": answers, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{payload['study_id']}__{reader}.json")
    path.write_text(json.dumps(payload))
    return path


def truthful(_item_id: str, truth: dict) -> str:
    """The reader who is always right."""
    return "real" if truth["source"] == "real" else "synthetic"


def guesser(seed: int) -> Call:
    """A reader who calls real or synthetic at random (a fair coin, seeded)."""
    rng = np.random.default_rng(seed)
    return lambda _item_id, _truth: "real" if rng.random() < 0.5 else "synthetic"
