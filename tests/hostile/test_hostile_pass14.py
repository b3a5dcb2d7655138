"""Hostile inputs, pass 14: siblings of pass 13's fixes. Checkpoints (the optimizer state beyond the moments'
shapes, the RNG file's contents, the DVCLive folder on resume), code_deps (dynamic imports it does not know, its
output folder), .npy headers of other dtypes, a condition store's row count, and params the loader of the model
they train refuses. Each case builds its input and runs the real entry point or the library function a stage
calls, asserting the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never
a hang, a silent acceptance, or an allocation a small file declares.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import stage_line
from test_hostile_pass11 import code_deps, small_repo
from test_hostile_pass12 import one_line

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- checkpoints: optimizer and RNG


class TwoShapes(torch.nn.Module):
    """Two parameters of different shapes: the optimizer's state of one cannot serve the other."""

    def __init__(self):
        super().__init__()
        self.big = torch.nn.Parameter(torch.randn(64, 8))
        self.small = torch.nn.Parameter(torch.randn(4))


def _trained_checkpoint(directory: Path, rng: dict | None = None) -> tuple[TwoShapes, torch.optim.Optimizer]:
    """One AdamW step on TwoShapes (as the trainer builds it, fused), saved as step-00000001."""
    from cxr_diffusion.diffusion.checkpoints import TrainingState, config_hash, save_checkpoint

    torch.manual_seed(0)
    model = TwoShapes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    (model.big.sum() + model.small.sum()).backward()
    optimizer.step()
    state = TrainingState(step=1, images_seen=8, config_hash=config_hash({"x": 1}))
    save_checkpoint(directory, state, {"model": model}, optimizer,
                    rng if rng is not None else {"noise": torch.Generator().get_state()[None],
                                                 "torch": torch.get_rng_state()[None]},
                    total_limit=2, log=lambda line: None)
    return model, optimizer


def _rehash(checkpoint: Path, name: str) -> None:
    path = checkpoint / "state.json"
    payload = json.loads(path.read_text())
    payload["sha256"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(payload))


def _load_fresh(directory: Path):
    from cxr_diffusion.diffusion.checkpoints import config_hash, load_latest_checkpoint

    torch.manual_seed(1)
    model = TwoShapes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    lines: list[str] = []
    loaded = load_latest_checkpoint(directory, config_hash({"x": 1}), {"model": model}, optimizer, log=lines.append)
    return loaded, model, optimizer, lines


def _moments_fit(optimizer: torch.optim.Optimizer) -> list[str]:
    """Each parameter's optimizer state tensors that are not its shape (AdamW's step excepted)."""
    wrong = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.shape != parameter.shape:
                    wrong.append(f"{key} {tuple(value.shape)} on a parameter of {tuple(parameter.shape)}")
    return wrong


def test_optimizer_json_whose_params_order_maps_moments_onto_other_parameters_is_not_resumed(tmp_path):
    """_check_moments compares state entry i with the i-th live parameter, but torch's load_state_dict maps state
    keys to parameters through the saved param_groups' "params" list (id_map): optimizer.json listing params [1, 0]
    (its hash re-recorded, as for pass 13's cut exp_avg) puts the (64, 8) moments on the (4,) parameter and the (4,)
    moments on the (64, 8) one. It is resumed; the fused AdamW step then writes 512 values through a 4-value buffer
    (heap corruption; the plain step is a RuntimeError traceback). The checkpoint should be skipped with its reason."""
    _trained_checkpoint(tmp_path)
    checkpoint = tmp_path / "step-00000001"
    rest = json.loads((checkpoint / "optimizer.json").read_text())
    rest["param_groups"][0]["params"] = list(reversed(rest["param_groups"][0]["params"]))
    (checkpoint / "optimizer.json").write_text(json.dumps(rest))
    _rehash(checkpoint, "optimizer.json")
    loaded, _, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        return  # skipped with its reason: the contract
    wrong = _moments_fit(optimizer)
    assert not wrong, f"resumed with optimizer moments on parameters of another shape: {wrong}"


def test_a_scalar_exp_avg_passes_the_moment_shape_check_and_is_resumed(tmp_path):
    """_check_moments lets any 0-d tensor through ("or is a scalar (its step)") whatever its key: an exp_avg cut to
    a 0-d tensor (hash re-recorded) is resumed onto a (64, 8) parameter, the case pass 13 fixed for a 1-d cut. Only
    `step` may be a scalar."""
    _trained_checkpoint(tmp_path)
    checkpoint = tmp_path / "step-00000001"
    tensors = load_file(checkpoint / "optimizer.safetensors")
    key = next(k for k in tensors if k.endswith("exp_avg") and tensors[k].numel() == 512)
    tensors[key] = tensors[key].flatten()[0].clone()
    save_file(tensors, checkpoint / "optimizer.safetensors")
    _rehash(checkpoint, "optimizer.safetensors")
    loaded, _, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        return
    wrong = _moments_fit(optimizer)
    assert not wrong, f"resumed with a scalar moment: {wrong}"


def test_optimizer_state_missing_a_moment_is_resumed_into_a_keyerror(tmp_path):
    """A parameter's saved state holding `step` and exp_avg but no exp_avg_sq (the tensor dropped from
    optimizer.safetensors, its hash re-recorded) passes every check and is resumed; AdamW's first step then reads
    state['exp_avg_sq']: a KeyError traceback in the train stage. The checkpoint should be skipped with its reason."""
    _trained_checkpoint(tmp_path)
    checkpoint = tmp_path / "step-00000001"
    tensors = load_file(checkpoint / "optimizer.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.endswith("exp_avg_sq")}
    save_file(tensors, checkpoint / "optimizer.safetensors")
    _rehash(checkpoint, "optimizer.safetensors")
    loaded, model, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        return
    (model.big.sum() + model.small.sum()).backward()
    try:
        optimizer.step()
    except Exception as error:
        pytest.fail(f"resumed, then the first step is a traceback: {type(error).__name__}: {error}")


class _Accelerator:
    process_index, num_processes = 0, 1

    @staticmethod
    def print(*args):
        pass


@pytest.mark.parametrize("case", ["float_noise_state", "missing_noise_key", "short_noise_state"])
def test_an_rng_file_of_the_wrong_contents_is_not_resumed_into_a_traceback(tmp_path, case):
    """rng.safetensors is hashed and must load (pass 13), but what it holds is not checked: resume() indexes
    rng['noise'][rank] and hands it to Generator.set_state. A float tensor, a missing 'noise' entry or a state cut
    short (each saved with its hash, as a checkpoint from another tool or an edit would be) ends the train stage in
    a RuntimeError/KeyError traceback, after the model and optimizer were already overwritten from it. The
    checkpoint should be skipped with its reason, like a damaged one."""
    from cxr_diffusion.diffusion.checkpoints import config_hash
    from cxr_diffusion.diffusion.ema import EMA
    from cxr_diffusion.diffusion.resume import resume
    from cxr_diffusion.diffusion.run_plan import Plan
    from cxr_diffusion.diffusion.checkpoints import save_checkpoint, TrainingState

    good_noise, good_torch = torch.Generator().get_state()[None], torch.get_rng_state()[None]
    rng = {"float_noise_state": {"noise": good_noise.float(), "torch": good_torch},
           "missing_noise_key": {"torch": good_torch},
           "short_noise_state": {"noise": good_noise[:, :100].clone(), "torch": good_torch}}[case]
    torch.manual_seed(0)
    model = TwoShapes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(list(model.parameters()), on_host=True)
    run_hash = config_hash({"x": 1})
    save_checkpoint(tmp_path, TrainingState(step=1, images_seen=4, config_hash=run_hash), {"denoiser": model},
                    optimizer, rng, 2,
                    {"ema": ema.tensors()}, log=lambda line: None)
    generator = torch.Generator()
    try:
        assert resume(_Accelerator(), tmp_path, run_hash, model, optimizer, ema, generator, Plan(4, 10, 100)) is None, \
            "resumed from a checkpoint whose RNG states this run cannot restore"
    except Exception as error:
        from cxr_diffusion.errors import user_error_line
        assert user_error_line(error) is not None, f"traceback: {type(error).__name__}: {str(error)[:200]}"


# ---------------------------------------------------------------------------- DVCLive folder on resume


def test_a_folder_named_like_a_dvclive_series_is_not_a_traceback_on_resume(tmp_path):
    """_log_truncated_live reads every ``plots/metrics/**/*.tsv`` with read_text: a folder of that name (a sync tool
    or a user made it; read_series names one as 'not a regular file') raises IsADirectoryError, an OSError
    user_error_line does not describe: the resumed train stage ends in a traceback."""
    from cxr_diffusion.diffusion.checkpoints import TrainingState
    from cxr_diffusion.diffusion.live_log import open_live

    live = tmp_path / "live"
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    (live / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n1\t0.5\n")
    (live / "plots" / "metrics" / "train" / "lr.tsv").mkdir()
    line = stage_line(lambda: open_live(live, TrainingState(step=1), {}).end())
    assert "lr.tsv" in line, line


# ---------------------------------------------------------------------------- code_deps


LOADERS = {  # each loads src/cxr_diffusion/hidden.py when stages/entry.py runs, by literal text
    "pkgutil_resolve_name": "import pkgutil\npkgutil.resolve_name('cxr_diffusion.hidden:Y')\n",
    "getattr_import_module": "import importlib\ngetattr(importlib, 'import_module')('cxr_diffusion.hidden')\n",
    "importlib_util_find_spec_of_a_child": "import importlib.util\nimportlib.util.find_spec('cxr_diffusion.hidden.x')\n",
}


@pytest.mark.parametrize("case", sorted(LOADERS))
def test_code_deps_refuses_or_lists_every_stdlib_module_loader(tmp_path, tiny_params_file, case):
    """Pass 13 refuses DYNAMIC_IMPORTS by name (import_module, __import__, exec_module, load_module, run_module,
    run_path), but the standard library has other loaders: pkgutil.resolve_name imports its module, getattr(importlib,
    'import_module') names it as a string, and importlib.util.find_spec('a.b.c') imports the parent a.b. Each is
    silently left out of code_deps/entry.json, so an edit to hidden.py leaves the stage up to date."""
    repo = small_repo(tmp_path)
    package = repo / "src" / "cxr_diffusion"
    if case == "importlib_util_find_spec_of_a_child":
        (package / "hidden").mkdir()
        (package / "hidden" / "__init__.py").write_text("Y = 1\n")
    else:
        (package / "hidden.py").write_text("Y = 1\n")
    (repo / "stages" / "entry.py").write_text(LOADERS[case])
    check = subprocess.run([sys.executable, "-c", LOADERS[case] + "import sys; assert 'cxr_diffusion.hidden' in "
                            "sys.modules"], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo / "src")},
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"the form does not import hidden (test is wrong): {check.stderr[-400:]}"
    result = code_deps(repo, tiny_params_file)
    if result.returncode == 2:
        one_line(result, "stage code_deps failed:")
        return
    assert result.returncode == 0, result.stderr[-600:]
    assert "src/cxr_diffusion/hidden" in (repo / "code_deps" / "entry.json").read_text(), \
        "the module the entry loads is missing from its closure"


def test_code_deps_with_a_folder_named_like_a_stale_code_file_is_one_line(tmp_path, tiny_params_file):
    """Pass 13 names a folder where an entry's code file goes, but the stale sweep (out.glob('*.json') minus what
    was written) calls unlink() on whatever matches: a folder code_deps/old.json raises IsADirectoryError, an
    OSError user_error_line does not describe: a traceback (after the new files were written)."""
    repo = small_repo(tmp_path)
    (repo / "code_deps" / "old.json").mkdir(parents=True)
    result = code_deps(repo, tiny_params_file)
    assert result.returncode == 0 or "Traceback" not in result.stderr, result.stderr[-800:]
    if result.returncode != 0:
        one_line(result, "stage code_deps failed:")


# ---------------------------------------------------------------------------- .npy headers of other dtypes


@pytest.mark.parametrize("descr", ["<i8", "<c16", "|b1"])
def test_generate_bounds_an_npy_embedding_of_any_dtype_by_its_header(tmp_path, descr):
    """_check_npy_embedding_header bounds the declared size only when the dtype is a float (kind 'f'): a 200-byte
    .npy of int64, complex or bool declaring (10**7, 10**7) goes to np.load, which allocates what it declares
    (hundreds of TiB: a MemoryError, not among the errors _read_embedding turns into one line). Such a file is refused
    anyway once loaded (not floats), so the dtype can be refused from the header first."""
    import io

    from numpy.lib import format as npy_format

    from cxr_diffusion.sampling.generate import _read_embedding

    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": (10**7, 10**7)})
    path = tmp_path / "huge.npy"
    path.write_bytes(buffer.getvalue() + bytes(64))
    line = stage_line(lambda: _read_embedding(path))
    assert "huge.npy" in line, line


# ---------------------------------------------------------------------------- a condition store's row count


def test_a_store_declaring_millions_of_rows_for_one_image_is_refused_before_read_all(tmp_path):
    """Pass 13 bounds a store row (tokens x dim) but not the row count: a sparse embeddings.npy (a few blocks on
    disk) declaring 4,194,304 rows of 1 x 8192 float16 (64 GiB), with a 4 MB mask, a one-line index and a
    matching store.json, opens; LatentImages then calls read_all(), which allocates all 64 GiB (np.empty) and reads
    it. Each row is some image's (the writer writes at most as many rows as images): rows beyond the index are
    not a store the embed stages write. Run under a 4 GiB address-space cap: the allocation is a MemoryError
    traceback instead of one line."""
    from numpy.lib import format as npy_format

    store = tmp_path / "store"
    store.mkdir()
    rows, dim = 4 * 2**20, 8192
    with open(store / "embeddings.npy", "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<f2", "fortran_order": False, "shape": (rows, 1, dim)})
        handle.truncate(handle.tell() + rows * dim * 2)
    np.save(store / "mask.npy", np.ones((rows, 1), dtype=bool))
    (store / "index.csv").write_text("Image Index,row\n00000001_000.png,0\n")
    (store / "store.json").write_text(json.dumps({"shape": [rows, 1, dim], "dtype": "float16", "images": 1}))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30));"
            "from cxr_diffusion.conditioning.store import ConditionStore; from cxr_diffusion.errors import "
            "user_error_line\ntry:\n    ConditionStore(sys.argv[1]).read_all()\nexcept Exception as error:\n"
            "    line = user_error_line(error)\n    if line is None: raise\n    print('LINE', line); sys.exit(2)\n"
            "print('READ ALL')")
    result = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 2 and "LINE" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-300:]} {result.stderr[-500:]}")


# ---------------------------------------------------------------------------- params its own model loader refuses


UNET_PARAMS = {  # accepted by the params' ranges (config.UNetConfig, Params.image_size), outside model_limits'
    "norm_num_groups_256": ({"unet": {"block_out_channels": [256], "cross_attention": [True], "norm_num_groups": 256,
                                      "attention_head_dim": 2}}, 16),
    "image_size_2048_in_pixel_space": ({}, 2048),
}


@pytest.mark.parametrize("case", sorted(UNET_PARAMS))
def test_params_accept_only_models_their_own_loader_loads(tmp_path, case):
    """The params allow train.unet.norm_num_groups up to 1024, attention_head_dim up to 1024, cross_attention_dim up
    to 16384 and image_size up to 2048; model_limits (every saved model is checked on load) allows 128 groups, 512,
    8192 and sample_size 1024. A run with norm_num_groups 256 (or pixel-space image_size 2048) trains for its hours,
    saves its model exactly as the train stage does, and then generate/evaluate refuse it: 'norm_num_groups 256 is
    not 1-128; retrain it' - retraining gives the same model. The params should refuse what the loader will."""
    from cxr_diffusion.diffusion.condition import ConditionAdapter
    from cxr_diffusion.diffusion.denoiser import Denoiser
    from cxr_diffusion.diffusion.export import save_pipeline
    from cxr_diffusion.diffusion.noise import training_scheduler
    from cxr_diffusion.diffusion.unet import build_unet
    from cxr_diffusion.errors import UserError
    from cxr_diffusion.sampling.sample import load_pipeline
    from test_trainer import tiny_params

    train, image_size = UNET_PARAMS[case]
    try:
        params = tiny_params(train=train, image_size=image_size)
    except UserError:
        return  # refused by the params: the contract
    torch.manual_seed(0)
    unet = build_unet(params.train.unet, params.image_size, params.channels, 8)
    model = Denoiser(unet, ConditionAdapter(tokens=4, dim=8, out_tokens=4, out_dim=8))
    saved = save_pipeline(params, "elixr", model, training_scheduler(params.train), tmp_path / "model", None)
    try:
        load_pipeline(saved, "ddim", torch.device("cpu"))
    except UserError as error:
        pytest.fail(f"params accepted, the model trained from them is refused on load: {str(error)[:300]}")
