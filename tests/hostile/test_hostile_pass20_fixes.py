"""Pass 20: the pass-19 fixes probed, as a hostile and as a legitimate user (commit 945bc96 and the three before
it). Each test builds its input in ``tmp_path`` and asserts the behaviour the project's rule asks for; each failed
on the code it was filed on.
"""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from cxr_diffusion.cli import app

from conftest import cli_refusal
from test_hostile_pass19_cli import writing_under

runner = CliRunner()


# ---------------------------------------------------------------------------- overlapping_paths and `~`


def test_doctor_refuses_an_nih_root_that_names_an_asset_folder_through_the_home_folder(tmp_path, monkeypatch):
    """catalog.overlapping_paths joins dataset.nih_root to the root as written (`root / "~/external/clip..."`),
    but every reader of that key expands `~` first (data/nih.py and prepare.py: `Path(nih_root).expanduser()`,
    standins._resolve). So `dataset.nih_root: ~/external/clip-vit-large-patch14` with the repository at ~ names
    the very folder of clip.model and is not refused: `doctor`/`fetch` go on, and `standins` builds the stand-in
    NIH folder there, then replaces it whole with the CLIP stand-in, and stops at elixr with 'no NIH metadata CSV
    found' (the "same path" refusal it gives for the literal `external/clip-vit-large-patch14`). The overlap should
    be refused as for the literal path, naming both keys."""
    from test_hostile_pass19_cli import _params

    monkeypatch.setenv("HOME", str(tmp_path))
    _params(tmp_path, {"dataset.nih_root": "~/external/clip-vit-large-patch14"}, profile="rehearsal")
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    line = cli_refusal(result)  # pass 22: a path from a home folder is refused by the params themselves
    assert "dataset.nih_root" in line and "home folder (~)" in line, line
    _params(tmp_path, {"dataset.nih_root": "external/clip-vit-large-patch14"}, profile="rehearsal")
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    line = cli_refusal(result)
    assert "clip.model" in line and "dataset.nih_root" in line and "same path" in line, line


# ---------------------------------------------------------------------------- describe_os_error: EEXIST


@pytest.mark.parametrize("blocker", ["dangling link", "fifo"])
@pytest.mark.parametrize("command", ["profile", "convert-weights"])
def test_an_output_path_under_a_link_or_fifo_is_one_line(tmp_path, monkeypatch, capsys, command, blocker):
    """Pass 19 taught describe_os_error that EEXIST from mkdir means 'a file where a folder belongs', but only when
    `os.path.isfile(error.filename)`: a dangling symlink (a DVC link whose cache entry was gc'ed, a moved disk) or
    a FIFO/socket in that place raises the same EEXIST from `target.parent.mkdir(parents=True, exist_ok=True)`
    and still ends in 'FileExistsError: [Errno 17] File exists' tracebacks from `profile tiny --root LINK` and
    `convert-weights SRC LINK/x.safetensors`. It should be one line naming the path, exit 2."""
    place = tmp_path / "out"
    if blocker == "fifo":
        os.mkfifo(place)
    else:
        place.symlink_to(tmp_path / "nowhere")
    code, errors, err = writing_under(tmp_path, monkeypatch, capsys, command, place)
    assert code == 2 and len(errors) == 1 and str(place) in errors[0], err
    assert place.is_symlink() or place.exists()


# ---------------------------------------------------------------------------- _one_visible_line: legitimate text


def test_a_persian_folder_name_with_its_zero_width_non_joiner_is_a_usable_nih_root():
    """Section._one_visible_line refuses every string holding an `is_hidden` character, which counts every
    format character (category Cf). U+200C ZERO WIDTH NON-JOINER is part of ordinary Persian spelling
    (`نامه‌ها`, `می‌خواهم`): a user's folder named in Persian cannot be given as dataset.nih_root (nor any other
    path), though it is a real path on their disk. Such a value is visible text on one line; it should load (and be
    shown escaped where printed, as visible_text already does), not be refused."""
    from cxr_diffusion.profiles import params_with

    folder = "/data/\u062f\u0627\u062f\u0647\u200c\u0647\u0627/nih"  # /data/داده‌ها/nih ("data" in Persian)
    params = params_with({"dataset": {"source": "nih", "nih_root": folder}})
    assert params.dataset.nih_root == folder
