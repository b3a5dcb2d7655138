"""Reader text as an attacker writes it: ids, file names and quoted values that try to become markup in
the report, hide part of it, drive a terminal, pass for another reader, or stall scoring.

The report is rendered with a CommonMark parser that lets raw HTML through (as GitHub's and most
viewers' do before sanitising), so a payload that survived escaping would show up as a tag, comment,
link or image in the HTML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from markdown_it import MarkdownIt

from cxr_diffusion.evaluation.report import write_report
from cxr_diffusion.io import JsonFileError, read_json
from cxr_diffusion.reader_study.errors import ReaderStudyError
from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.kit import build_kit
from cxr_diffusion.reader_study.report import POOLED_ROW, report_lines
from cxr_diffusion.reader_study.responses import same_reader
from cxr_diffusion.reader_study.scoring import score_responses
from cxr_diffusion.safe_text import markdown_text, visible_text
from scripted_readers import response_file, truthful

FINDINGS = ["Effusion"]
# Markup, hidden text, terminal control, look-alikes: each must come out as inert, visible text.
PAYLOADS = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "![beacon](https://tracker.example/p.png)",
    "[click](javascript:alert(1))", "<javascript:alert(1)>", "<!-- the rest of the report is hidden",
    "`code` **bold** _em_ ~~gone~~", "a | b | c", "# heading", "- item", "\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "nul\x00byte", "left\u202eright", "zero\u200bwidth", "soft\u00adhyphen", "join\u2060ed", "\u3164", "line\nbreak",
    "para\u2029graph", "&lt;already&gt;", "\\<escaped\\>", "<style>body{display:none}</style>", "<a href='x'>y</a>",
    "<https://example.org>", "\ue000private", "<iframe src=//evil>", "javascript:alert(1)", "'\"quotes\"'",
    "7. a numbered list", "12) another", "www.tracker.example", "alice@evil.example", "https://evil.example/x",
    "evil.com", "see ftp://files.example",
]


def rendered(markdown: str) -> str:
    """HTML as a CommonMark viewer that passes raw HTML and autolinks bare URLs, domains and e-mails shows it."""
    return MarkdownIt("commonmark", {"linkify": True}).enable(["table", "linkify"]).render(markdown)


def inert(html: str) -> bool:
    """No element a payload could have made that acts: script, image, link, frame, style, comment."""
    for tag in ("<script", "<img", "<a ", "<a>", "<iframe", "<style", "<!--"):
        if tag in html:
            return False
    return "\x1b" not in html and "\x00" not in html and "\u202e" not in html


@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_payload_comes_out_as_inert_visible_text(payload):
    cell = markdown_text(payload)
    html = rendered(f"| reader |\n|---|\n| {cell} |\n\nIn a line: {cell}\n")
    assert inert(html), (payload, html)
    assert not any(tag in html for tag in ("<code", "<strong", "<em", "<del", "<li", "<h1", "<ol")), (payload, html)
    start = rendered(f"- {cell}: x\n")  # as the first thing of a list item, where a reject line puts a file name
    assert inert(start) and "<ol" not in start and "<ul" in start, (payload, start)
    assert html.count("<td>") == 1 and "\n" not in cell  # one cell, one line: nothing split the table
    assert all(char.isprintable() for char in visible_text(payload))


def test_hidden_characters_stay_readable_as_escapes():
    assert visible_text("left\u202eright") == "left\\u202eright"
    assert visible_text("\x1b[31m") == "\\u001b[31m"
    assert visible_text("two  spaces\tand\na line") == "two spaces and a line"
    assert len(visible_text("x" * 500, 60)) == 60


# ---- through the pipeline: reader files -> scoring -> report.md ------------------------------------
def built_key(folder: Path) -> Path:
    """A 12-item kit (6 real, 6 clip_text) in ``folder`` and its answer key, built with a fixed study key."""
    items = [StudyItem(np.full((8, 8), index * 10, np.uint8), "real" if index % 2 else "clip_text", ("Effusion",),
                       f"{index:08d}_000.png") for index in range(12)]
    key = folder / "key.json"
    build_kit(items, folder / "kit", key, "pilot-1", FINDINGS, 0, 32, study_key=b"k")
    return key


@pytest.fixture
def key_path(tmp_path) -> Path:
    return built_key(tmp_path)


def report_of(metrics: dict) -> str:
    return "\n".join(report_lines(metrics))


@pytest.mark.parametrize("payload", ["<script>alert(1)</script>", "![b](https://t.example/p.png)",
                                     "[x](javascript:alert(1))", "<!-- hide", "**(pooled)**", "a|b", "(pooled)"])
def test_reader_ids_reach_the_report_only_as_text(tmp_path, key_path, payload):
    """Markup in an id is refused (bad_reader_id) and its reason, quoting the id, is escaped; "(pooled)" is a
    valid id whose row cannot pass for the pooled one."""
    response_file(tmp_path / "responses", key_path, payload, truthful, name="pilot-1__r.json")
    metrics = score_responses(tmp_path / "responses", key_path)
    html = rendered(report_of(metrics))
    assert inert(html), html
    if metrics["readers"]:
        assert report_of(metrics).count(POOLED_ROW) == 1 and html.count("<strong>") == 2
    else:
        assert metrics["rejects"][0]["reason"].startswith("bad_reader_id: ")


@pytest.mark.parametrize("reader", ["nul\x00", "esc\x1b[2J", "rtl\u202eevil", "zero\u200bwidth", "\u3164",
                                    "soft\u00adhyphen", "word\u2060joiner", "\ud800lone", "Аlice", "   "])
def test_reader_ids_with_hidden_characters_or_mixed_scripts_are_rejected(tmp_path, key_path, reader):
    path = tmp_path / "responses" / "pilot-1__r.json"
    path.parent.mkdir()
    payload = json.loads(response_file(tmp_path / "other", key_path, "x", truthful).read_text())
    path.write_text(json.dumps({**payload, "reader_id": reader}))  # ensure_ascii: a lone surrogate as \ud800
    metrics = score_responses(tmp_path / "responses", key_path)
    assert metrics["readers"] == 0
    reason = metrics["rejects"][0]["reason"]
    assert reason.split(":")[0] in {"bad_reader_id", "not_json"}, reason
    assert all(char.isprintable() for char in reason)
    assert inert(rendered(report_of(metrics)))


@pytest.mark.parametrize(("one", "other"), [("Alice", "alice "), ("dr  smith", "Dr Smith"), ("Jos\u00e9", "JOSE"),
                                            ("\uff42\uff4f\uff42", "bob"), ("Alice", "AIice"), ("Ian", "lan"),
                                            ("willow", "wiIIow"), ("Bob", "B0b"), ("Kim", "Kirn"),
                                            ("Dr. Smith", "Dr Smith"), ("J.Doe", "J. Doe"), ("alice", "alice."),
                                            ("Ann", "Ann ,"), ("wera", "vvera"), ("Wu", "VVu")])
def test_ids_that_only_look_different_are_one_reader(one, other):
    assert same_reader(one) == same_reader(other)


@pytest.mark.parametrize(("one", "other"), [("Reader 1", "Reader 2"), ("Ann", "Anna"), ("Bob", "Rob"), ("Kim", "Kin")])
def test_ids_that_read_differently_stay_two_readers(one, other):
    assert same_reader(one) != same_reader(other)


def test_two_files_under_look_alike_ids_are_both_listed_as_one_reader(tmp_path, key_path):
    responses = tmp_path / "responses"
    response_file(responses, key_path, "Alice", truthful, name="pilot-1__a.json")
    response_file(responses, key_path, "AIice", truthful, name="pilot-1__b.json")
    metrics = score_responses(responses, key_path)
    assert metrics["readers"] == 0
    assert [reject["reason"].split(":")[0] for reject in metrics["rejects"]] == ["duplicate_reader"] * 2


@pytest.mark.parametrize("study_id", ["<!-- ![t](https://tracker.example/p.png) <script>alert(1)</script>",
                                      "pilot 1", "", 7])
def test_an_answer_key_whose_study_id_the_kit_never_writes_is_refused(tmp_path, key_path, study_id):
    key = json.loads(key_path.read_text())
    key_path.write_text(json.dumps({**key, "study_id": study_id}))
    with pytest.raises(ReaderStudyError, match="not an answer key of a reader-study kit"):
        score_responses(tmp_path / "responses", key_path)


def test_the_no_responses_text_reaches_the_report_as_text(tmp_path, key_path):
    metrics = score_responses(tmp_path / "nothing <script>alert(1)</script>", key_path, kit_dir=tmp_path / "kit <b>")
    html = rendered(report_of(metrics))
    assert inert(html) and "<b>" not in html and "&lt;reader&gt;" in html, html


@pytest.mark.parametrize("look_alike", ["\u0430\u04cf\u0456\u0441\u0435", "\u039d\u0399\u039d\u0391",
                                        "\u13aa\u13de\u13c6\u13df\u13ac", "\u0251lice", "al\u0131ce",
                                        "\u042c\u043e\u044c"])
def test_an_id_in_look_alike_letters_is_refused_so_one_reader_never_counts_twice(tmp_path, key_path, look_alike):
    """Cyrillic, Greek capitals, Cherokee, a Latin alpha, a dotless i: each can imitate a Latin id."""
    responses = tmp_path / "responses"
    response_file(responses, key_path, "alice", truthful, name="pilot-1__a.json")
    response_file(responses, key_path, look_alike, truthful, name="pilot-1__b.json")
    metrics = score_responses(responses, key_path)
    assert list(metrics["per_reader"]) == ["alice"]
    assert [reject["reason"].split(":")[0] for reject in metrics["rejects"]] == ["bad_reader_id"]


def test_a_study_id_starting_with_readme_is_scored_and_hidden_files_and_links_are_listed(tmp_path, key_path):
    responses = tmp_path / "responses"
    kept = response_file(responses, key_path, "r1", truthful, name="readme-pilot__r1.json")
    hidden = response_file(responses, key_path, "r2", truthful, name=".pilot-1__r2.json")
    outside = response_file(tmp_path / "elsewhere", key_path, "r3", truthful)
    os.symlink(outside, responses / "pilot-1__r3.json")
    (responses / "README.md").write_text("the folder's own note")
    metrics = score_responses(responses, key_path)
    assert list(metrics["per_reader"]) == ["r1"] and kept.exists()
    assert {reject["file"]: reject["reason"].split(":")[0] for reject in metrics["rejects"]} == {
        hidden.name: "not_a_response", "pilot-1__r3.json": "not_a_response"}
    assert metrics["files"] == 3


def test_exported_at_must_be_an_iso_time(tmp_path, key_path):
    for value in ["yesterday", 5, "", "2026-13-01T00:00:00Z"]:
        responses = tmp_path / f"r{value!s:.4}"
        response_file(responses, key_path, "r1", truthful, exported_at=value)
        reason = score_responses(responses, key_path)["rejects"][0]["reason"]
        assert reason.startswith("bad_format: exported_at"), reason


def test_a_large_file_of_many_keys_is_checked_in_linear_time(tmp_path, key_path):
    """The duplicate-key check was quadratic: a 0.4 MB file took 98 s, a 15 MB one stalled dvc repro."""
    responses = tmp_path / "responses"
    path = response_file(responses, key_path, "r1", truthful)
    payload = json.loads(path.read_text())
    payload["answers"].update({f"item-x{index:07d}": {} for index in range(400_000)})  # ~10 MB of keys
    path.write_text(json.dumps(payload))
    reason = score_responses(responses, key_path)["rejects"][0]["reason"]  # quadratic: hours; linear: a second
    assert reason.startswith("unknown_item"), reason


def test_a_lone_surrogate_anywhere_in_a_json_file_is_refused_when_read(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"note": "\\udc80"}')
    with pytest.raises(JsonFileError, match="not valid Unicode"):
        read_json(path, "write it again")


def test_the_comparison_report_escapes_input_strings(tmp_path):
    """The main report quotes reasons and class names from inputs: the same escaping applies."""
    from cxr_diffusion.profiles import params_with

    params = params_with({})
    summary = {}
    evaluations = {"clip_text": {"closeness": {"inception_fid_details": {"reason": "<img src=x onerror=alert(1)>"}},
                                 "xrv_densenet": {"fd": None, "reason": "![b](https://t.example/p.png)"}}}
    out = write_report(params, summary, evaluations, {}, tmp_path / "report.md")
    html = rendered(out.read_text())
    assert "onerror" in html and inert(html), html


def test_a_file_name_that_is_not_utf8_is_listed_and_the_metrics_stay_json(tmp_path, key_path):
    """A name with a byte that is not UTF-8 reached metrics/reader_study.json, which compare then refused."""
    from cxr_diffusion.io import write_json

    responses = tmp_path / "responses"
    path = response_file(responses, key_path, "r1", truthful)
    os.rename(path, os.fsencode(responses) + b"/pilot-1__\xff.json")
    metrics = score_responses(responses, key_path)
    assert metrics["readers"] == 0 and metrics["rejects"][0]["reason"].startswith("not_a_response: its name")
    write_json(tmp_path / "metrics.json", metrics)
    assert read_json(tmp_path / "metrics.json", "unused")["rejects"][0]["file"] == "pilot-1__\\udcff.json"


@pytest.mark.parametrize(("one", "other"), [("clan", "dan"), ("Dave", "cIave")])
def test_cl_reads_as_d(one, other):
    assert same_reader(one) == same_reader(other)


@pytest.mark.parametrize("value", ["2026-05-01", "2026-W01-1", "0001-01-01T00:00:00", "9999-12-31T23:59:59",
                                   "2999-12-31T23:59:59.000Z",
                                   "2026-05-01 10:00:00"])
def test_exported_at_must_be_a_date_and_time_as_the_page_writes_it(tmp_path, key_path, value):
    response_file(tmp_path / "responses", key_path, "r1", truthful, exported_at=value)
    reason = score_responses(tmp_path / "responses", key_path)["rejects"][0]["reason"]
    assert reason.startswith("bad_format: exported_at"), reason


@pytest.mark.parametrize("value", ["2026-05-01T10:00:00.000Z", "2026-05-01T10:00:00+02:00", "2026-05-01T10:00"])
def test_exported_at_as_browsers_write_it_is_accepted(tmp_path, key_path, value):
    response_file(tmp_path / "responses", key_path, "r1", truthful, exported_at=value)
    assert score_responses(tmp_path / "responses", key_path)["readers"] == 1


@pytest.mark.parametrize("reader", ["...", "\u00b4\u00b4", "- ( )"])
def test_a_reader_id_without_a_letter_or_digit_is_refused(tmp_path, key_path, reader):
    response_file(tmp_path / "responses", key_path, reader, truthful, name="pilot-1__r.json")
    reason = score_responses(tmp_path / "responses", key_path)["rejects"][0]["reason"]
    assert reason.startswith("bad_reader_id: ") and "no letter or digit" in reason, reason


def test_a_folder_named_readme_is_listed_not_skipped(tmp_path, key_path):
    responses = tmp_path / "responses"
    response_file(responses / "README", key_path, "r1", truthful)
    metrics = score_responses(responses, key_path)
    assert [reject["file"] for reject in metrics["rejects"]] == ["README"] and metrics["files"] == 1


def test_objects_nested_to_the_parsers_limit_are_a_listed_reject_not_a_traceback(tmp_path, key_path):
    """One nesting depth passed the first parse and overflowed the duplicate-key parse: scoring stopped."""
    responses = tmp_path / "responses"
    responses.mkdir()
    for depth in range(900, 1020):
        (responses / f"pilot-1__d{depth}.json").write_text('{"a":' * depth + "1" + "}" * depth)
    metrics = score_responses(responses, key_path)
    assert metrics["readers"] == 0 and metrics["files"] == 120
    assert {reject["reason"].split(":")[0] for reject in metrics["rejects"]} <= {"not_json", "bad_format"}
