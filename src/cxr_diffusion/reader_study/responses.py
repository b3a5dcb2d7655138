"""The readers' exported answer files, checked against the study's answer key.

A response file (what the page exports, ``<study_id>__<reader_id>.json``)::

    {"study_id": str, "kit_id": str, "reader_id": str (1-64 characters), "exported_at": str (ISO 8601),
     "answers": {item_id: {"call": "real" | "synthetic", "confidence": 1-5, "realism": 1-5,
                           "findings": [finding, ...] (distinct, from the study's list) | ["none"],
                           "note": str (optional, at most 2000 characters)}}}

``kit_id`` must be the key's: a kit rebuilt from other samples cannot score answers given on the earlier
build. Items left out are unanswered (a partial reader is allowed; a file with no answer at all is
rejected). A file that does not fit is rejected as a whole, never dropped silently nor half-read: it is
listed with a reason ``<code>: <detail>``, the code one of ``REJECT_CODES``: also a key given twice in one
object (JSON readers keep the last silently), a symbolic link (it may point anywhere), a hidden file, and
any other file in the folder but its own README (``FOLDER_FILES``).

A reader id is a name a person can read and that no other id can imitate: Latin letters (accents
allowed), digits, spaces and ``. _ - ' @ ( ) / , +``. Look-alike letters of other scripts (a Cyrillic "а", a Greek
capital "Ν", a Cherokee "Ꭺ", a Latin alpha "ɑ" or dotless "ı") would let one person count as two readers,
so ids are kept to what is unambiguous on screen; a study coordinator gives readers codes when names do not
fit. Two files of the same reader are both rejected (which one is the reader's last word is for a person
to decide: keep one and rerun); ids are compared as ``same_reader`` folds them: accents dropped, case
folded, spaces and punctuation ignored, and the Latin look-alikes folded to one form (I, l, 1 and i as l, 0 as o,
rn as m, vv as w, cl as d), so "José", "jose ", "JOSE", "Dr. Smith" and "Dr Smith", "Alice" and "AIice", "Bob" and "B0b"
are each one reader. Two different people whose ids fold alike are told so and pick ids apart.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cxr_diffusion.config import STUDY_ID
from cxr_diffusion.io import JsonFileError, read_json
from cxr_diffusion.reader_study.errors import ReaderStudyError
from cxr_diffusion.reader_study.labels import NONE
from cxr_diffusion.safe_text import is_hidden, visible_text

CALLS = ("real", "synthetic")
MAX_NOTE = 2000
MAX_READER_ID = 64
MAX_FILE_BYTES = 16 * 2**20  # an export of thousands of items with long notes is far below
REJECT_CODES = ("not_json", "bad_format", "other_study", "other_kit", "unknown_item", "out_of_range",
                "duplicate_reader", "bad_reader_id", "not_a_response")
FOLDER_FILES = frozenset({"readme", "readme.md", "readme.txt", ".gitkeep"})  # the folder's own, never scored
READER_ID = re.compile(r"[A-Za-z0-9 ._'@()/,+-]+")  # after accents are dropped (``_plain``); page/app.js agrees
_KEY_FIX = "rebuild the reader-study kit: its answer key is written with it"


@dataclass(frozen=True)
class ItemTruth:
    source: str  # "real" or a branch name
    origin_id: str
    labels: tuple[str, ...]  # class names ("No Finding" included when it is a class)


@dataclass(frozen=True)
class StudyKey:
    study_id: str
    kit_id: str  # the build of the kit the answers must have been given on
    findings: tuple[str, ...]
    items: dict[str, ItemTruth]  # the scored items
    calibration: frozenset[str]  # ids shown first with their truth, never scored


@dataclass(frozen=True)
class Answer:
    call: str
    confidence: int
    realism: int
    findings: tuple[str, ...]  # study findings, or ("none",)
    note: str


@dataclass(frozen=True)
class ReaderResponse:
    file: str
    reader_id: str
    answers: dict[str, Answer]


class Rejected(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


def read_key(key_path: Path) -> StudyKey:
    """The answer key ``kit.build_kit`` wrote, checked."""
    key_path = Path(key_path)
    if not key_path.is_file():
        raise ReaderStudyError(f"{key_path}: no answer key there; {_KEY_FIX}")
    payload = read_json(key_path, _KEY_FIX)
    try:
        items = {str(item_id): _truth(value) for item_id, value in payload["items"].items()}
        key = StudyKey(study_id=payload["study_id"], kit_id=payload["kit_id"], findings=_names(payload["findings"]),
                       items=items, calibration=_calibration_ids(payload.get("calibration", {})))
        if not isinstance(key.study_id, str) or not isinstance(key.kit_id, str) or \
                not all(isinstance(name, str) for name in key.findings) or not items:
            raise TypeError
        if not STUDY_ID.fullmatch(key.study_id) or not re.fullmatch(r"[0-9a-f]{1,128}", key.kit_id):
            raise TypeError  # the kit writes a params-checked study id and a hex fingerprint: anything else is not ours
    except (KeyError, TypeError, AttributeError):
        raise ReaderStudyError(f"{key_path}: not an answer key of a reader-study kit; {_KEY_FIX}") from None
    return key


def _names(value: object) -> tuple:
    """A JSON list as a tuple; any other value (a string would become its characters) is not a key's."""
    if not isinstance(value, list):
        raise TypeError
    return tuple(value)


def _calibration_ids(value: object) -> frozenset[str]:
    """The calibration items' ids: the kit writes them as a mapping of id to truth (a string would otherwise
    become its letters, a list of numbers ids no export can name)."""
    if not isinstance(value, dict) or not all(isinstance(item_id, str) for item_id in value):
        raise TypeError
    return frozenset(value)


def _truth(value: dict) -> ItemTruth:
    labels = _names(value["labels"])
    if not isinstance(value["source"], str) or not all(isinstance(label, str) for label in labels):
        raise TypeError
    return ItemTruth(source=value["source"], origin_id=str(value["origin_id"]), labels=labels)


def _responses_folder(path: Path) -> Path:
    """``path`` if it is a folder or nothing yet; a file there is not read as "no responses", and a link is
    refused as a linked export is (it may point outside the project)."""
    if path.is_symlink():
        raise ReaderStudyError(f"{visible_text(str(path), 300)}: a symbolic link (it may point outside the project); "
                               "make it a folder and copy the exported files in")
    if path.exists() and not path.is_dir():
        raise ReaderStudyError(f"{visible_text(str(path), 300)}: not a folder; make it a folder and put the readers' "
                               "exported <study_id>__<reader>.json files in it")
    return path


def load_responses(responses_dir: Path, key: StudyKey) -> tuple[list[ReaderResponse], list[dict]]:
    """Every file in ``responses_dir`` but hidden ones and READMEs (sorted by name; a missing folder holds
    none): the accepted responses, and the rejected files as ``{"file": name, "reason": "<code>: <detail>"}``."""
    responses_dir = _responses_folder(Path(responses_dir))
    paths = sorted(path for path in responses_dir.iterdir()
                   if not (path.name.lower() in FOLDER_FILES and path.is_file())) if responses_dir.is_dir() else []
    accepted: list[ReaderResponse] = []
    rejects: list[dict] = []
    for path in paths:
        try:
            if not _is_text(path.name):  # os gives undecodable bytes as lone surrogates, which no JSON can hold
                raise Rejected("not_a_response", "its name is not valid UTF-8 text; rename it "
                                                 "<study_id>__<reader>.json")
            if path.name.startswith("."):
                raise Rejected("not_a_response", "a hidden file; if it holds answers, name it "
                                                 "<study_id>__<reader>.json")
            if path.is_symlink():
                raise Rejected("not_a_response", "a symbolic link (it may point outside the folder); copy the "
                                                 "file itself in")
            if path.suffix.lower() != ".json":
                raise Rejected("not_json", "not a .json file (the study page exports <study_id>__<reader>.json)")
            accepted.append(read_response(path, key))
        except Rejected as rejected:
            rejects.append({"file": path.name, "reason": str(rejected)})
        except OSError as error:  # unreadable (permissions, a link to a device): listed, never fatal
            rejects.append({"file": path.name, "reason": f"not_json: cannot be read ({error.strerror or error})"})
    for reject in rejects:  # the metrics file is JSON text: a name's undecodable bytes are shown escaped
        reject["file"] = reject["file"] if _is_text(reject["file"]) else visible_text(reject["file"], 200)
    by_reader: dict[str, list[ReaderResponse]] = defaultdict(list)
    for response in accepted:
        by_reader[same_reader(response.reader_id)].append(response)
    kept = []
    for response in accepted:
        twins = by_reader[same_reader(response.reader_id)]
        if len(twins) == 1:
            kept.append(response)
            continue
        others = ", ".join(twin.file for twin in twins if twin is not response)
        rejects.append({"file": response.file, "reason": f"duplicate_reader: reader {_shown(response.reader_id)} "
                                                         f"also sent {others}; keep one file per reader and rerun"})
    return kept, sorted(rejects, key=lambda reject: reject["file"])


# Letters and digits that read alike in the fonts a reader id is shown in; applied after case folding.
_LOOK_ALIKES = (("rn", "m"), ("vv", "w"), ("cl", "d"))
_LOOK_ALIKE_CHARS = str.maketrans({"i": "l", "1": "l", "0": "o"})


def same_reader(reader_id: str) -> str:
    """The form two reader ids are compared in (see the module docstring)."""
    folded = "".join(char for char in _plain(reader_id).casefold() if char.isalnum()).translate(_LOOK_ALIKE_CHARS)
    for pair, single in _LOOK_ALIKES:
        folded = folded.replace(pair, single)
    return folded


def _plain(text: str) -> str:
    """``text`` in compatibility form with its marks dropped: "Ｊosé" -> "Jose". Every mark (category M), as the
    study page's ``\\p{M}`` drops them, not only those with a combining class: an id the page accepted (with a
    combining grapheme joiner, say) would otherwise be refused after the reader finished."""
    return "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.category(char).startswith("M"))


def reader_id_problem(reader_id: object) -> str | None:
    """Why ``reader_id`` cannot name a reader, or None."""
    if not isinstance(reader_id, str) or not 1 <= len(reader_id) <= MAX_READER_ID:
        return f"is not 1-{MAX_READER_ID} characters of text"
    hidden = sorted({char for char in reader_id if is_hidden(char)})
    if hidden:
        return f"holds invisible or control characters ({', '.join(f'U+{ord(char):04X}' for char in hidden)})"
    if not reader_id.strip():
        return "is blank"
    if not any(char.isalnum() for char in _plain(reader_id)):
        return "holds no letter or digit"
    others = sorted({char for char in _plain(reader_id) if not READER_ID.fullmatch(char)})
    if others:
        return (f"holds {', '.join(f'{char!r} (U+{ord(char):04X})' for char in others[:3])}: reader ids are Latin "
                f"letters (accents allowed), digits, spaces and . _ - ' @ ( ) / , +, so that no id can imitate another")
    return None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise Rejected("bad_format", f"key {_shown(name)} given twice in one object; export the answers again")
        seen.add(name)
    return dict(pairs)


def read_response(path: Path, key: StudyKey) -> ReaderResponse:
    """One response file, checked against ``key``; raises ``Rejected`` with a reason code."""
    if not path.is_file():
        raise Rejected("not_json", "not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise Rejected("bad_format", f"{path.stat().st_size} bytes, more than an export can be ({MAX_FILE_BYTES})")
    try:  # one parse: twin keys in one object (JSON readers keep the last silently) are refused inside it
        payload = read_json(path, "export the answers again from the study page", object_pairs_hook=_unique_keys)
    except JsonFileError as error:
        raise Rejected("not_json", str(error).removeprefix(f"{path}: ")) from None
    _exact_keys(payload, {"study_id", "kit_id", "reader_id", "exported_at", "answers"}, set(), "the file")
    if payload["study_id"] != key.study_id:
        raise Rejected("other_study", f"study_id {_shown(payload['study_id'])}, this study is {key.study_id!r}")
    if payload["kit_id"] != key.kit_id:
        raise Rejected("other_kit", f"answered on kit build {_shown(payload['kit_id'])}, the key is of build "
                                    f"{key.kit_id!r}: the kit was rebuilt (other images behind the same item ids); "
                                    f"score it against the key of its own build, or give the reader the new kit")
    reader = payload["reader_id"]
    problem = reader_id_problem(reader)
    if problem:
        raise Rejected("bad_reader_id", f"reader_id {_shown(reader)} {problem}; export again under a plain name")
    if not _is_iso_time(payload["exported_at"]):
        raise Rejected("bad_format", f"exported_at {_shown(payload['exported_at'])} is not an ISO 8601 date and "
                                     f"time (the page writes e.g. 2026-05-01T10:00:00.000Z)")
    if not isinstance(payload["answers"], dict):
        raise Rejected("bad_format", "answers is not an object of item id -> answer")
    answers = {}
    for item_id, answer in payload["answers"].items():
        if item_id not in key.items:
            why = "a calibration item (not scored)" if item_id in key.calibration else "not an item of this study"
            raise Rejected("unknown_item", f"item {_shown(item_id)} is {why}")
        answers[item_id] = _answer(item_id, answer, key.findings)
    if not answers:
        raise Rejected("bad_format", "no answers (exported before any item was answered); export again at the end")
    return ReaderResponse(file=path.name, reader_id=" ".join(reader.split()), answers=answers)


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A date and a time as the page writes them (toISOString: 2026-05-01T10:00:00.000Z), or with an offset.
_ISO_TIME = re.compile(r"(2\d{3})-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?", re.ASCII)


def _is_iso_time(value: object) -> bool:
    """A date and time as the page writes it, and not later than a day from now (clocks differ, not by years)."""
    if not isinstance(value, str) or not _ISO_TIME.fullmatch(value):
        return False
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
    return moment <= datetime.now(timezone.utc) + timedelta(days=1)


def _answer(item_id: str, answer: object, findings: tuple[str, ...]) -> Answer:
    where = f"item {item_id}"
    if not isinstance(answer, dict):
        raise Rejected("bad_format", f"{where}: the answer is not an object")
    _exact_keys(answer, {"call", "confidence", "realism", "findings"}, {"note"}, where)
    if answer["call"] not in CALLS:
        raise Rejected("out_of_range", f"{where}: call {_shown(answer['call'])}, expected 'real' or 'synthetic'")
    for name in ("confidence", "realism"):
        value = answer[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5):
            raise Rejected("out_of_range", f"{where}: {name} {_shown(value)}, expected a whole number 1 to 5")
    ticked = answer["findings"]
    if not isinstance(ticked, list) or not ticked or not all(isinstance(name, str) for name in ticked) \
            or len(set(ticked)) != len(ticked):
        raise Rejected("out_of_range", f"{where}: findings {_shown(ticked)}, expected distinct names or ['none']")
    if NONE in ticked and ticked != [NONE]:
        raise Rejected("out_of_range", f"{where}: findings {_shown(ticked)} has 'none' with findings")
    unknown = [name for name in ticked if name != NONE and name not in findings]
    if unknown:
        raise Rejected("out_of_range", f"{where}: findings {_shown(unknown)} are not among {list(findings)}")
    note = answer.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise Rejected("out_of_range", f"{where}: note is not text of at most {MAX_NOTE} characters")
    return Answer(call=answer["call"], confidence=answer["confidence"], realism=answer["realism"],
                  findings=tuple(ticked), note=note)


def _exact_keys(payload: dict, required: set[str], optional: set[str], where: str) -> None:
    missing, extra = required - payload.keys(), payload.keys() - required - optional
    if missing or extra:
        parts = ([f"missing {sorted(missing)}"] if missing else []) + ([f"unexpected {sorted(extra)}"] if extra else [])
        raise Rejected("bad_format", f"{where}: {' and '.join(parts)} keys")


def _shown(value: object) -> str:
    """A value from the file, quoted for a reason: one line, every hidden character escaped."""
    return visible_text(repr(value) if not isinstance(value, str) else f"'{value}'", 60)
