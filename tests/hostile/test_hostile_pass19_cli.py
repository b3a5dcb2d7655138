"""Hostile inputs, pass 19 (the user's commands): `inspect`, `memory-plan`, `convert-weights`, `fetch`, `doctor`,
`profile`, `standins` and `generate`, probed with crafted folders, overlapping paths and params strings. Each case
builds its input and runs the real entry point, asserting the project's rule: one line naming the file or key and
what to do, exit 2, no traceback; nothing of the user's lost; no output outside where it belongs; strings from the
inputs escaped in terminal output.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import cxr_diffusion.cli as cli
from cxr_diffusion.cli import app

from conftest import cli_refusal, write_profile
from test_hostile_models import embedding, generate_args, model, saved_model  # noqa: F401  (fixtures)

runner = CliRunner()
ESCAPE = "\x1b]0;pwned\x07"  # an OSC sequence (retitles the terminal); click strips only CSI colour codes


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The console entry point (`cxr-diffusion ARGS`, as installed): exit code and stderr. A traceback (an
    exception main() lets through) fails the test with its type."""
    monkeypatch.setattr(sys, "argv", ["cxr-diffusion", *map(str, args)])
    try:
        cli.main()
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    except Exception as error:
        pytest.fail(f"traceback: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
    else:
        code = 0
    return code, capsys.readouterr().err


def _params(root: Path, changes: dict[str, object], profile: str = "tiny") -> Path:
    """``root/params.yaml``: a shipped profile with dotted-key changes (validated when a command loads it)."""
    data = yaml.safe_load(write_profile(profile, root / ".profile").read_text())
    shutil.rmtree(root / ".profile")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root / "params.yaml"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- generate --out


def test_generate_with_out_the_current_folder_is_not_a_traceback(model, embedding, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    """`generate MODEL --out .` from an empty folder: _check_out accepts it (an empty folder, as the help asks),
    the images are sampled, then _write_outputs calls atomic_directory(Path(".")), whose _new_beside builds
    `target.with_name(...)` and pathlib raises 'ValueError: PosixPath('.') has an empty name': a traceback after the
    sampling, nothing written. `--out ''` is the same path. The images should be written into the folder (or `.`
    refused before sampling, in one line)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, generate_args(model, embedding, Path(".")))
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback: {type(result.exception).__name__}: {result.exception}"
    if result.exit_code == 0:
        assert (work / "settings.json").is_file(), sorted(p.name for p in work.iterdir())
    else:
        assert result.exit_code == 2 and "--out" in result.output, result.output


def test_generate_refuses_an_out_inside_the_model_folder(model, embedding, tmp_path):  # noqa: F811
    """`generate models/elixr --out models/elixr/generated` (or `.../unet/x`): _check_out accepts a new folder
    anywhere, so the PNGs and settings.json are written inside the saved model, a DVC output: `dvc status` then
    says models/<branch> changed, and the next `dvc repro` reruns training and deletes the generations with the
    folder. The model folder is an input of generate: an --out inside it should be one line naming --out and the
    model, before any sampling."""
    before = _files(model)
    result = runner.invoke(app, generate_args(model, embedding, model / "generated"))
    after = _files(model)
    assert after == before, f"exit {result.exit_code}: the model folder now also holds " \
                            f"{sorted(set(after) - set(before))}"
    assert result.exit_code == 2 and "--out" in result.output, result.output


def test_generates_success_line_escapes_the_out_path(model, embedding, tmp_path):  # noqa: F811
    """cli.generate ends with `typer.echo(f"wrote ... to {out}")`: the --out path is printed raw, so a folder
    name holding an OSC sequence retitles the terminal and a newline forges a line of its own ('error: ...'),
    where every refusal goes through visible_text (pass 12 escaped an overlay's name on the profile line the same
    way). The path should be shown escaped, on one line."""
    out = tmp_path / f"gen{ESCAPE}\nerror: forged"
    result = runner.invoke(app, generate_args(model, embedding, out))
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output, repr(result.output)
    assert not any(line.startswith("error: forged") for line in result.output.splitlines()), repr(result.output)


# ---------------------------------------------------------------------------- a file where a folder belongs


@pytest.mark.parametrize("command", ["profile", "convert-weights"])
def test_an_output_path_under_a_file_is_one_line(tmp_path, monkeypatch, capsys, command):
    """io.atomic_path starts with `target.parent.mkdir(parents=True, exist_ok=True)`; when that parent is an
    existing regular file, mkdir raises FileExistsError (EEXIST, not ENOTDIR), which describe_os_error does not
    know, so main() re-raises it: `cxr-diffusion profile tiny --root notes.txt` and `cxr-diffusion convert-weights
    SRC notes.txt/inception.safetensors --flavour fid` end in 'FileExistsError: [Errno 17] File exists'
    tracebacks (generate's --out names the same case in one line). It should be one line naming the path."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes")
    code, errors, err = writing_under(tmp_path, monkeypatch, capsys, command, blocker)
    assert code == 2 and len(errors) == 1 and "notes.txt" in errors[0], err
    assert blocker.read_text() == "the user's notes"


def writing_under(tmp_path, monkeypatch, capsys, command: str, place):
    """`profile tiny --root PLACE` or `convert-weights SRC PLACE/x.safetensors` through the console entry point:
    exit code, its `error:` lines, and all of stderr."""
    if command == "profile":
        args = ["profile", "tiny", "--root", place]
    else:
        source = tmp_path / "source.pth"
        source.write_bytes(b"not read: the target is checked first")
        args = ["convert-weights", source, place / "inception.safetensors", "--flavour", "fid"]
    code, err = _main(monkeypatch, capsys, *args)
    return code, [line for line in err.splitlines() if line.startswith("error: ")], err


# ---------------------------------------------------------------------------- inspect


def test_inspect_refuses_a_prepared_manifest_every_stage_refuses(tmp_path):
    """`inspect` checks only the types of seven manifest keys (cli._json_fields), not the manifest as the stages
    read it (data/shards.read_manifest: whole numbers, shard names, sha256, rows adding up to 'written'): a
    manifest with 'written': -7, 'image_size': 0 and a shard named ../../../etc/passwd is summarised as '-7 images
    (0px, classes [])', '1 shards', exit 0, while train, sample and evaluate refuse the folder. It should be the
    stages' one line, naming manifest.json and the key."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "written": -7, "image_size": 0, "classes": [], "per_split": {"train": 5}, "rejected": -1,
        "rejected_by_reason": {}, "shards": [{"file": "../../../etc/passwd"}]}))
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2, f"accepted (exit {result.exit_code}): {result.output!r}"
    assert "manifest.json" in result.output


def test_inspect_refuses_a_model_folder_the_loader_refuses(model):  # noqa: F811
    """`inspect models/<branch>` reads sample_size, in_channels and block_out_channels by type only: a UNet config
    edited to sample_size -5, in_channels 0 and block_out_channels ['x'] (and a model_index.json without 'branch')
    is summarised as 'None model, UNet -5px x 0 ch, blocks ['x']', exit 0; generate refuses the same folder
    (model_limits, model_files.sha256.json). inspect should check the folder as the loader does, naming the
    file and key."""
    config = model / "unet" / "config.json"
    data = json.loads(config.read_text())
    data.update(sample_size=-5, in_channels=0, block_out_channels=["x"])
    config.write_text(json.dumps(data))
    result = runner.invoke(app, ["inspect", str(model)])
    assert result.exit_code == 2, f"accepted (exit {result.exit_code}): {result.output!r}"
    assert "config.json" in result.output


# ---------------------------------------------------------------------------- fetch, doctor: asset paths


def test_a_fetch_record_inside_an_asset_folder_is_refused(tmp_path, tiny_clip_dir):
    """fetch.manifest (external/assets.json by default) may lie inside an asset's folder (clip.model: external):
    `fetch --record-present` hashes the folder, then writes the record into it, so `doctor` at once says
    'clip (clip.model): mismatch: external changed since fetch recorded it: added assets.json' (exit 2), and every
    later --record-present records the old record, then rewrites it: the asset can never be present. The record
    path is refused when it lies inside an asset's folder, naming fetch.manifest and clip.model."""
    shutil.copytree(tiny_clip_dir, tmp_path / "external")
    _params(tmp_path, {"clip.model": "external"})
    fetched = runner.invoke(app, ["fetch", "--record-present", "--root", str(tmp_path),
                                  "--params", str(tmp_path / "params.yaml")])
    line = cli_refusal(fetched)
    assert "clip.model ('external') and fetch.manifest ('external/assets.json') nest" in line, line
    assert not (tmp_path / "external" / "assets.json").exists()
    doctor = runner.invoke(app, ["doctor", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    assert "clip.model ('external') and fetch.manifest" in cli_refusal(doctor)


def test_fetch_replacing_a_stand_in_folder_keeps_an_asset_nested_in_it(tmp_path, monkeypatch):
    """Asset paths are never compared with each other: clip.model: external and evaluate.xrv_weights:
    external/weights/xrv.safetensors (the DenseNet placed by hand, as fetch cannot download it). When the CLIP
    at external is a stand-in, fetch downloads the real one beside it and _swap_in replaces the whole folder:
    the weights placed by hand are deleted, and fetch then lists xrv_densenet as missing. Params whose asset
    paths nest or coincide should be one line naming both keys, before anything is downloaded."""
    from cxr_diffusion.assets import download
    from test_fetch import FakeHub

    _params(tmp_path, {"clip.model": "external",
                       "evaluate.xrv_weights": "external/weights/xrv-densenet121-res224-all.safetensors"})
    (tmp_path / "external" / "weights").mkdir(parents=True)
    (tmp_path / "external" / "STANDIN.json").write_text(json.dumps({"standin": True, "warning": "random"}))
    placed = tmp_path / "external" / "weights" / "xrv-densenet121-res224-all.safetensors"
    placed.write_bytes(b"weights converted by hand, hours of work")
    monkeypatch.setattr(download, "hub_snapshot", FakeHub(tmp_path / "hf-cache"))
    result = runner.invoke(app, ["fetch", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    assert placed.is_file(), f"exit {result.exit_code}: the weights placed by hand are gone:\n{result.output}"
    assert result.exit_code == 2 and "clip.model" in result.output and "evaluate.xrv_weights" in result.output


def test_standins_keeps_the_fetch_record_inside_an_asset_folder(tmp_path, monkeypatch):
    """The same overlap in `standins`: clip.model: external holds a complete CLIP stand-in from an earlier run,
    and the fetch record of the assets fetched since (external/assets.json). `standins --seed 1` rebuilds the
    stand-in and atomic_directory swaps in a new `external`, so the record is deleted (exit 0). standins
    should refuse before making anything, naming fetch.manifest and clip.model."""
    from cxr_diffusion.params_file import load_params
    from cxr_diffusion.rehearsal.standins import StandinError, make_standins
    from test_standins import TINY

    _params(tmp_path, {"clip.model": "external"})
    (tmp_path / "external").mkdir()
    (tmp_path / "external" / "STANDIN.json").write_text(json.dumps({"standin": True, "settings": {"seed": 0}}))
    record = tmp_path / "external" / "assets.json"
    record.write_text(json.dumps({"version": 1, "assets": {}}))
    params = load_params(tmp_path / "params.yaml")
    try:
        make_standins(params, tmp_path, seed=1, progress=False, echo=lambda line: None, overrides=TINY)
    except StandinError as error:
        assert record.is_file() and "fetch.manifest" in str(error), str(error)
        return
    pytest.fail("accepted: " + ("the fetch record survived" if record.is_file() else
                                "the fetch record external/assets.json was deleted"))


@pytest.mark.parametrize("command", [["doctor"], ["fetch", "--record-present"]])
def test_doctor_and_fetch_show_a_params_path_escaped(tmp_path, command):
    """doctor escapes its state line (visible_text) but prints `fix:` from catalog.how_to_place raw, and fetch
    echoes every line raw: a params path such as clip.model: "external/clip<OSC>\\nerror: forged" retitles the
    terminal and forges a line 'error: forged (clip.model)' (also inside the suggested `hf download ...
    --local-dir '...'` command). Strings from the params should be shown escaped, each line its own."""
    _params(tmp_path, {"clip.model": f"external/clip{ESCAPE}\nerror: forged"})
    result = runner.invoke(app, [*command, "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output, result.output
    forged = [line for line in result.output.splitlines() if line.strip().startswith("error: forged")]
    assert not forged, forged


# ---------------------------------------------------------------------------- memory-plan


def test_memory_plan_refuses_a_store_of_another_branch(tmp_path):
    """memory_report.condition_shape reads data/embeddings/<branch> for each branch's condition shape without
    store.check_store_branch (train and sample call it since pass 16): a clip_text store (77 tokens) placed at
    data/embeddings/elixr is planned as 'elixr: condition 77x16 from its store', exit 0. It should be the
    train stage's one line naming the store and the branch."""
    from cxr_diffusion.conditioning.store import ConditionStoreWriter

    _params(tmp_path, {"branches": ["elixr"]})
    store = tmp_path / "data" / "embeddings" / "elixr"
    with ConditionStoreWriter(store, 2, 77, 16) as writer:
        for i in range(2):
            writer.write(i, np.random.default_rng(i).normal(size=(1, 77, 16)))
        writer.finish(["00000001_000.png", "00000002_000.png"], np.arange(2), {"branch": "clip_text",
                                                                              "encoder": "test"})
    result = runner.invoke(app, ["memory-plan", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"),
                                 "--memory-gib", "24"])
    assert result.exit_code == 2, f"accepted (exit {result.exit_code}): {result.output}"
    assert "clip_text" in result.output and "elixr" in result.output
