"""Hostile inputs, pass 13: code_deps import forms, checkpoints and resume (state.json, optimizer and RNG files,
the DVCLive folder a killed run leaves), generate's embedding and guidance inputs, and the utility, reader study
and store inputs. Each case builds its input, runs the real entry point (a stage script in a fresh interpreter
with a timeout and a memory cap, the CLI through CliRunner, or the library function wrapped as run_stage wraps
it) and asserts the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never
a hang, a silent acceptance, an allocation a small file declares, or a read outside where data belongs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import make_training_data, stage_line
from test_hostile_pass11 import code_deps, small_repo
from test_hostile_pass12 import one_line

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- code_deps: import forms it misses


IMPORT_FORMS = {  # each imports src/cxr_diffusion/sub/inner.py when stages/entry.py runs under python
    # __import__ with a fromlist imports each name that is a submodule (importlib._bootstrap._handle_fromlist)
    "dunder_import_with_a_fromlist": ("__import__('cxr_diffusion.sub', fromlist=['inner'])\n", None),
    # import_module under another name: _called() sees `load`, not `import_module`
    "import_module_imported_under_an_alias": (
        "from importlib import import_module as load\nload('cxr_diffusion.sub.inner')\n", None),
    # __import__(name, globals, locals, fromlist, level=1): relative to the calling module's package
    "relative_dunder_import_with_a_level": (
        "import cxr_diffusion.sub.runner\n", "__import__('inner', globals(), None, ['Y'], 1)\n"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_FORMS))
def test_code_deps_sees_every_literal_import_form(tmp_path, tiny_params_file, case):
    """Each form names its module by literal text, so code_deps could read it (as it reads import_module('...') and
    __import__('...')); instead the module is silently left out of code_deps/entry.json, and an edit to inner.py
    leaves the stage up to date in DVC's eyes. Refusing the form in one line would also keep the contract."""
    entry, runner = IMPORT_FORMS[case]
    repo = small_repo(tmp_path)
    package = repo / "src" / "cxr_diffusion" / "sub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "inner.py").write_text("Y = 1\n")
    if runner:
        (package / "runner.py").write_text(runner)
    (repo / "stages" / "entry.py").write_text(entry)
    result = code_deps(repo, tiny_params_file)
    if result.returncode == 2:  # refused in one line: also fine
        one_line(result, "stage code_deps failed:")
        return
    assert result.returncode == 0, result.stderr[-600:]
    assert "src/cxr_diffusion/sub/inner.py" in (repo / "code_deps" / "entry.json").read_text(), \
        "the module the entry imports is missing from its closure"


def test_code_deps_hashes_the_package_python_runs_when_a_module_file_shadows_it(tmp_path, tiny_params_file):
    """With both sub.py and sub/__init__.py, `import cxr_diffusion.sub` runs sub/__init__.py (a package wins in
    importlib's FileFinder), but module_file() tries `.py` first: code_deps hashes sub.py, which never runs, so
    an edit to sub/__init__.py leaves the stage up to date. Listing what Python runs, or refusing the ambiguity in one
    line, keeps the contract."""
    repo = small_repo(tmp_path)
    package = repo / "src" / "cxr_diffusion"
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("RUNS = True\n")
    (package / "sub.py").write_text("NEVER_RUNS = True\n")
    (repo / "stages" / "entry.py").write_text("import cxr_diffusion.sub\n")
    result = code_deps(repo, tiny_params_file)
    if result.returncode == 2:
        one_line(result, "stage code_deps failed:")
        return
    assert result.returncode == 0, result.stderr[-600:]
    assert "src/cxr_diffusion/sub/__init__.py" in (repo / "code_deps" / "entry.json").read_text(), \
        "the package Python imports is missing; code_deps hashed sub.py instead"


@pytest.mark.parametrize("kind", ["out_is_a_file", "entry_json_is_a_folder"])
def test_code_deps_with_an_output_in_the_way_is_one_line(tmp_path, tiny_params_file, kind):
    """--out a regular file: out.mkdir raises FileExistsError; code_deps/entry.json a folder: the atomic rename
    raises IsADirectoryError. Neither is an OSError user_error_line describes, so both end in a traceback."""
    repo = small_repo(tmp_path)
    if kind == "out_is_a_file":
        (repo / "code_deps").write_text("not a folder\n")
    else:
        (repo / "code_deps" / "entry.json").mkdir(parents=True)
    line = one_line(code_deps(repo, tiny_params_file), "stage code_deps failed:")
    assert "code_deps" in line, line


# ---------------------------------------------------------------------------- train: checkpoints and resume


from test_trainer import tiny_params, paths_in  # noqa: E402

TRAIN = {"max_steps": 6, "checkpoint_every_steps": 3, "checkpoints_total_limit": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run (checkpoints step-3 and step-6, its DVCLive folder) on the tiny training data."""
    from cxr_diffusion.diffusion.trainer import train_branch

    root = tmp_path_factory.mktemp("p13-train")
    data = make_training_data(root / "data")
    train_branch(tiny_params(train=TRAIN), "elixr", paths_in(root / "run", data))
    return root / "run", data


@pytest.fixture
def killed_at_3(trained, tmp_path):
    """A copy of the run as a kill after its step-3 checkpoint leaves it: step-3, the logs, no model."""
    run, data = trained
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    shutil.copytree(run / "live", tmp_path / "live")
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    return tmp_path, data


def resume_line(root: Path, data: dict) -> str:
    from cxr_diffusion.diffusion.trainer import train_branch

    return stage_line(lambda: train_branch(tiny_params(train=TRAIN), "elixr", paths_in(root, data)))


def resumes_or_one_line(root: Path, data: dict) -> None:
    """Train on from what ``root`` holds: finishing (the checkpoint resumed or skipped) or one user-error line is
    the contract; any other exception is a traceback."""
    from cxr_diffusion.diffusion.trainer import train_branch
    from cxr_diffusion.errors import user_error_line

    try:
        train_branch(tiny_params(train=TRAIN), "elixr", paths_in(root, data))
    except Exception as error:
        if user_error_line(error) is None:
            pytest.fail(f"traceback: {type(error).__name__}: {' '.join(str(error).split())[:200]}")


def edit_state(checkpoint: Path, **changes) -> None:
    path = checkpoint / "state.json"
    payload = json.loads(path.read_text())
    payload["state"].update(changes)
    path.write_text(json.dumps(payload))


def rehash(checkpoint: Path, name: str) -> None:
    """Record ``name``'s new sha256 in state.json, as the save would have."""
    path = checkpoint / "state.json"
    payload = json.loads(path.read_text())
    payload["sha256"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(payload))


def test_a_dvclive_series_emptied_by_a_kill_does_not_end_the_resume_in_a_traceback(killed_at_3):
    """A kill right after DVCLive created a series file leaves it empty: lines[0] is an IndexError."""
    root, data = killed_at_3
    (root / "live" / "plots" / "metrics" / "train" / "lr.tsv").write_text("")
    resumes_or_one_line(root, data)


@pytest.mark.parametrize("field, value", [("step", "3"), ("images_seen", None), ("epoch", 10**20),
                                          ("batch_in_epoch", "3")])
def test_a_state_json_value_of_the_wrong_type_or_range_is_not_resumed_into_a_traceback(killed_at_3, field, value):
    """state.json is the one file of a checkpoint with no recorded hash, and TrainingState(**payload['state'])
    takes any JSON value: a string step, a null images_seen or an epoch past 2**64 (torch's manual_seed overflows)
    is resumed and ends the run in a TypeError/RuntimeError traceback. The checkpoint should be skipped with its
    reason (as a damaged one is) or refused in one line."""
    root, data = killed_at_3
    edit_state(root / "checkpoints" / "step-00000003", **{field: value})
    resumes_or_one_line(root, data)


def test_a_negative_data_position_in_state_json_is_not_silently_resumed(killed_at_3, capsys):
    """batch_in_epoch -1 slices the epoch's micro-batches from the end (mine[-1:]): the run resumes, trains on
    one micro-batch instead of the rest of the epoch, and reports success. A position outside the epoch should
    make the checkpoint unusable (skipped with its reason) or be refused."""
    root, data = killed_at_3
    edit_state(root / "checkpoints" / "step-00000003", batch_in_epoch=-1)
    from cxr_diffusion.diffusion.trainer import train_branch
    try:
        train_branch(tiny_params(train=TRAIN), "elixr", paths_in(root, data))
    except Exception as error:
        from cxr_diffusion.errors import user_error_line
        assert user_error_line(error) is not None, f"traceback: {type(error).__name__}: {error}"
        return
    out = capsys.readouterr().out
    assert "resuming from" not in out, "a checkpoint at data position -1 was resumed as if valid"


def test_a_deeply_nested_state_json_is_skipped_not_a_recursion_traceback(killed_at_3):
    """_read_state parses state.json with json.loads and catches JSONDecodeError/ValueError, not RecursionError:
    a state.json nested 100,000 deep (the io.read_json case every other JSON file is guarded against) escapes."""
    root, data = killed_at_3
    (root / "checkpoints" / "step-00000003" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    resumes_or_one_line(root, data)  # skipped (the run goes on from scratch) or one line: both keep the contract


def test_optimizer_state_whose_shapes_differ_from_the_model_is_not_resumed(killed_at_3, tmp_path):
    """_check_layout compares the module and EMA tensors with the live model, but the optimizer's moments go to
    load_state_dict unchecked: an optimizer.safetensors whose largest exp_avg is cut to one value (its hash recorded
    in state.json, as for a checkpoint edited or pieced together from another run) is resumed, and the fused AdamW
    step then writes a whole parameter's worth through a 1-element buffer: heap corruption (in a plain script the
    same load and step abort with `malloc(): unaligned tcache chunk detected`, or a segfault). Run in a fresh
    interpreter; the checkpoint should be skipped with its reason, like one whose module shapes differ."""
    import subprocess
    import sys

    root, data = killed_at_3
    checkpoint = root / "checkpoints" / "step-00000003"
    tensors = load_file(checkpoint / "optimizer.safetensors")
    key = max((k for k in tensors if k.endswith("exp_avg")), key=lambda k: tensors[k].numel())
    tensors[key] = tensors[key].flatten()[:1].clone()
    save_file(tensors, checkpoint / "optimizer.safetensors")
    rehash(checkpoint, "optimizer.safetensors")
    code = (
        "import json, sys; from pathlib import Path; sys.path[:0] = [sys.argv[4], sys.argv[5]];"
        "from test_trainer import tiny_params, paths_in; from cxr_diffusion.diffusion.trainer import train_branch;"
        "root = Path(sys.argv[1]); data = {'prepared': Path(sys.argv[2]), 'store': Path(sys.argv[3])};"
        f"train_branch(tiny_params(train={TRAIN!r}), 'elixr', paths_in(root, data))"
    )
    tests = REPO / "tests"
    process = subprocess.Popen([sys.executable, "-u", "-c", code, str(root), str(data["prepared"]), str(data["store"]),
                                str(tests), str(tests / "hostile")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=tmp_path)
    seen = []
    try:
        for line in process.stdout:  # stop at the resume line: what follows is undefined behaviour
            seen.append(line)
            if "resumed from" in line:
                break
    finally:
        process.kill()
        process.wait()
    tail = ascii("".join(seen)[-600:])
    assert not any("resumed from" in line for line in seen), f"the optimizer state of another shape was resumed: {tail}"


def test_an_unhashed_damaged_rng_file_is_not_a_traceback(killed_at_3):
    """The RNG file is read after the try that skips unusable checkpoints, and is not among the files a checkpoint
    must have a hash for: with its entry gone from state.json and the file truncated, _load_tensors raises
    _Unusable (a plain Exception) out of load_latest_checkpoint: a traceback, not 'skipping ...'."""
    root, data = killed_at_3
    checkpoint = root / "checkpoints" / "step-00000003"
    payload = json.loads((checkpoint / "state.json").read_text())
    del payload["sha256"]["rng.safetensors"]
    (checkpoint / "state.json").write_text(json.dumps(payload))
    (checkpoint / "rng.safetensors").write_bytes((checkpoint / "rng.safetensors").read_bytes()[:50])
    resumes_or_one_line(root, data)


@pytest.mark.parametrize("name", ["checkpoints", "live"])
def test_a_checkpoints_or_live_path_that_is_a_file_is_one_line(trained, tmp_path, name):
    """--checkpoints (or --live) naming a regular file: not a folder, so no checkpoint is found and the run trains;
    then the first save's (or DVCLive's) mkdir raises FileExistsError, an OSError user_error_line does not describe:
    a traceback after the training steps, where a check before them would be one line."""
    _, data = trained
    (tmp_path / name).write_text("a file\n")
    line = resume_line(tmp_path, data)
    assert name in line, line


def test_pruning_never_deletes_through_a_linked_checkpoint_folder(trained, tmp_path):
    """A step-NNNNNNNN entry that is a symbolic link to a checkpoint elsewhere (written under another config, so
    the run starts from scratch) is pruned after the first save as 'newer than the one just saved': _remove unlinks
    state.json inside the link's target, outside --checkpoints, then shutil.rmtree refuses the link with an
    undescribed OSError: a file outside the run's folder deleted, and a traceback."""
    run, data = trained
    elsewhere = tmp_path / "kept-elsewhere" / "step-00000006"
    shutil.copytree(run / "checkpoints" / "step-00000006", elsewhere)
    edit_state(elsewhere, config_hash="0123456789abcdef")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000009").symlink_to(elsewhere, target_is_directory=True)
    try:
        resumes_or_one_line(tmp_path, data)
    finally:
        assert (elsewhere / "state.json").is_file(), "deleted state.json outside the checkpoints folder"


# ---------------------------------------------------------------------------- generate: embeddings and guidance


from test_hostile_models import generate_args, runner, saved_model as saved_model_fixture  # noqa: E402
from test_hostile_models import model as model_fixture, embedding as embedding_fixture, no_sampling as no_sampling_fixture  # noqa: E402

saved_model, model, embedding, no_sampling = saved_model_fixture, model_fixture, embedding_fixture, no_sampling_fixture


def npy_declaring(path: Path, shape: tuple, descr: str = "<f4") -> Path:
    """A .npy whose header declares ``shape`` over 64 bytes of data (a few hundred bytes on disk)."""
    import io

    from numpy.lib import format as npy_format

    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    path.write_bytes(buffer.getvalue() + bytes(64))
    return path


def test_generate_bounds_an_npy_embedding_by_its_header_before_loading_it(model, tmp_path, no_sampling):
    """np.load allocates what the header declares before reading: a 192-byte file declaring (10**6, 77, 768) floats
    asks for 220 GiB, and the MemoryError is not among the errors _read_embedding turns into one line (nor an
    OSError user_error_line describes): a traceback. The header (as the store's mask.npy is) should be checked
    against the file's size and the model's (tokens, dim) first."""
    from conftest import cli_refusal

    path = npy_declaring(tmp_path / "huge.npy", (10**6, 77, 768))
    line = cli_refusal(runner.invoke(app_cli(), generate_args(model, path, tmp_path / "out")))
    assert "--embedding" in line and "huge.npy" in line, line


def app_cli():
    from cxr_diffusion.cli import app

    return app


# ---------------------------------------------------------------------------- memory-plan and train.unet params


def params_file_with(tmp_path: Path, tiny_params_file: Path, edit) -> Path:
    import yaml

    data = yaml.safe_load(tiny_params_file.read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("config", [
    '{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],',   # cut short: JSONDecodeError
    '{"_class_name": "AutoencoderKL", "norm_num_groups": 0}',             # ZeroDivisionError building it
    '{"_class_name": "AutoencoderKL", "block_out_channels": "abc"}',      # TypeError building it
], ids=["truncated", "zero_groups", "channels_a_string"])
def test_memory_plan_with_a_damaged_vae_config_is_one_line(tmp_path, tiny_params_file, config):
    """In latent space memory-plan counts the VAE's parameters from ROOT/<train.vae>/config.json: read with
    json.loads (not io.read_json) and built by AutoencoderKL.from_config unchecked (the checks a saved model's vae/
    config gets, model_limits._check_vae, are not applied): a cut-short or out-of-range config is a traceback."""
    from typer.testing import CliRunner

    from conftest import cli_refusal
    from cxr_diffusion.cli import app

    def latent(data):
        data["train"].update(space="latent", vae="vae")
        data["channels"] = 3

    params = params_file_with(tmp_path, tiny_params_file, latent)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(config)
    line = cli_refusal(CliRunner().invoke(app, ["memory-plan", "--params", str(params), "--root", str(tmp_path),
                                                "--memory-gib", "24"]))
    assert "config.json" in line, line


def test_an_attention_head_count_above_a_levels_channels_is_refused_by_the_params(tmp_path, tiny_params_file):
    """train.unet.attention_head_dim is diffusers' legacy name for the number of heads; each head gets
    channels // heads dims, so 1024 heads on a 32-channel attention level gives 0-dim heads and Attention's
    0 ** -0.5 raises ZeroDivisionError when the UNet is built: a traceback from `memory-plan` (and from train,
    after the data is loaded). The params accept it (1-1024); they check norm_num_groups against the channels
    but not the heads."""
    from typer.testing import CliRunner

    from conftest import cli_refusal
    from cxr_diffusion.cli import app

    params = params_file_with(tmp_path, tiny_params_file,
                              lambda data: data["train"]["unet"].update(attention_head_dim=1024))
    line = cli_refusal(CliRunner().invoke(app, ["memory-plan", "--params", str(params), "--root", str(tmp_path),
                                                "--memory-gib", "24"]))
    assert "attention_head_dim" in line, line


# ---------------------------------------------------------------------------- condition stores


def test_a_store_declaring_an_enormous_row_is_refused_on_open(trained, tmp_path):
    """ConditionStore checks embeddings.npy's header against its size, store.json and the mask, but not the row's
    size: a sparse embeddings.npy (eight blocks on disk) declaring (48, 1, 2**34) float16, with a matching
    store.json and mask, opens, and train allocates a 2**34-wide condition (RuntimeError 'can't allocate memory':
    a traceback; with less declared, gigabytes really allocated). ELIXR rows are bounded at 1024 tokens of 8192
    values when written; the reader has no such bound."""
    from numpy.lib import format as npy_format

    from cxr_diffusion.diffusion.trainer import train_branch

    _, data = trained
    store = Path(shutil.copytree(data["store"], tmp_path / "store"))
    meta = json.loads((store / "store.json").read_text())
    rows, dim = meta["shape"][0], 2**34
    with open(store / "embeddings.npy", "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<f2", "fortran_order": False, "shape": (rows, 1, dim)})
        handle.truncate(handle.tell() + rows * dim * 2)
    np.save(store / "mask.npy", np.ones((rows, 1), dtype=bool))
    (store / "store.json").write_text(json.dumps({**meta, "shape": [rows, 1, dim]}))
    paths = paths_in(tmp_path, {**data, "store": store})
    line = stage_line(lambda: train_branch(tiny_params(train=TRAIN), "elixr", paths))
    assert "embeddings.npy" in line or "store" in line, line


def test_encode_latents_with_an_out_of_range_vae_config_is_one_line(trained, tmp_path):
    """load_vae turns OSError and ValueError from AutoencoderKL.from_pretrained into one line, but the train.vae
    folder's config is not checked against ranges (model_limits._check_vae checks only a saved model's vae/): a
    config with norm_num_groups 0 ends encode_latents in diffusers' ZeroDivisionError traceback."""
    from diffusers import AutoencoderKL

    from cxr_diffusion.diffusion.latents import encode_latents

    _, data = trained
    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps({**config, "norm_num_groups": 0}))
    params = tiny_params(train={"space": "latent", "vae": str(vae_dir)})
    line = stage_line(lambda: encode_latents(params, data["prepared"], tmp_path / "latents"))
    assert "vae" in line, line


@pytest.mark.parametrize("field", ["findings", "labels"])
def test_an_answer_key_naming_findings_as_a_string_is_refused(tmp_path, field):
    """`findings: "Effusion"` (a string, not a list) was read as the findings E, f, f, u, s, i, o, n."""
    from cxr_diffusion.reader_study.responses import read_key

    item = {"source": "real", "origin_id": "00000001_000.png", "labels": ["Effusion"]}
    key = {"study_id": "s1", "kit_id": "ab12", "findings": ["Effusion"], "items": {"i1": item}}
    if field == "findings":
        key["findings"] = "Effusion"
    else:
        item["labels"] = "Effusion"
    (tmp_path / "key.json").write_text(json.dumps(key))
    line = stage_line(lambda: read_key(tmp_path / "key.json"))
    assert "not an answer key" in line, line
