"""Hostile RadDINO checkpoints: the folder `evaluate.raddino` names, read by the evaluate stage and recorded by
`fetch --record-present`.

Each test builds a tiny DINOv2 saved as microsoft/rad-dino is (config.json, preprocessor_config.json,
model.safetensors), breaks one thing, and asserts what the project's rule asks for: one line naming the file and
what to do (exit code 2 through the stage, no traceback), never a hang, an allocation of what a file declares, or
distances computed in a partly random network. Calls that could hang or allocate without bound run in a fresh
interpreter with a timeout (and a memory cap); the others run here, through the stage's own error handling.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cxr_diffusion.config import EvaluateConfig, changed
from cxr_diffusion.evaluation.raddino import load_raddino, raddino_metrics
from cxr_diffusion.evaluation.raddino_folder import (
    MAX_PATCHES, RadDinoFolderError, check_raddino_folder, checkpoint_tensors,
)
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.rehearsal import standin_models
from cxr_diffusion.safetensors_header import encode_header
from conftest import stage_line
from test_inception import _Images

REPO = Path(__file__).resolve().parents[2]
SRC, TESTS = REPO / "src", REPO / "tests"
CPU = torch.device("cpu")
TINY_RADDINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28}
runner = CliRunner()


def run_python(code: str, *args: object, timeout: int = 60, memory_gib: int | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this checkout's sources first on the path); a run past ``timeout`` fails the
    test as a hang, and ``memory_gib`` caps its address space (an allocation past it fails)."""
    prelude = "import warnings\nwarnings.simplefilter('ignore')\n"
    if memory_gib is not None:
        prelude += f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({memory_gib} << 30, {memory_gib} << 30))\n"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    try:
        return subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: a hang (it should have been refused at once)")


def one_error_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    """The single ``prefix`` line of a run that must have ended in a user error: exit 2, no traceback."""
    tail = result.stdout[-600:] + "\n---\n" + result.stderr[-1500:]
    assert "Traceback" not in result.stderr, f"traceback instead of one line:\n{tail}"
    assert result.returncode == 2, f"exit {result.returncode}, expected 2 (refused):\n{tail}"
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, tail
    return lines[0]


# The evaluate stage's RadDINO part through the stage boundary (run_stage), on two tiny image sets.
RADDINO_STAGE = """
import sys
from pathlib import Path
import torch
from cxr_diffusion.config import changed
from cxr_diffusion.evaluation.raddino import raddino_metrics
from cxr_diffusion.stage import run_stage
from test_inception import _Images

def body(params):
    config = changed(params.evaluate, raddino=sys.argv[2], inception_batch_size=2)
    result = raddino_metrics(config, _Images(2, 0), _Images(2, 1), 0, torch.device("cpu"))
    print("COMPUTED fd", result["fd"])

run_stage("evaluate", Path(sys.argv[1]), body)
"""


def raddino_stage(params_file: Path, folder: Path | str, timeout: int = 90, memory_gib: int | None = 6,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    return run_python(RADDINO_STAGE, params_file, folder, timeout=timeout, memory_gib=memory_gib, env=env)


def metrics_line(folder: Path | str, revision: str | None = None) -> str:
    """The evaluate stage's line for RadDINO distances from ``folder`` (loading and features), computed here."""
    config = changed(profile_section(EvaluateConfig), raddino=str(folder), inception_batch_size=2)
    return stage_line(lambda: raddino_metrics(config, _Images(2, 0), _Images(2, 1), 0, CPU, revision))


@pytest.fixture(scope="module")
def raddino_folder(tmp_path_factory) -> Path:
    """A tiny DINOv2 saved as microsoft/rad-dino is, by the rehearsal stand-in's writer."""
    folder = tmp_path_factory.mktemp("rad-dino") / "rad-dino"
    standin_models.write_raddino(folder, seed=3, config={**standin_models.RADDINO, **TINY_RADDINO})
    return folder


def raddino_copy(raddino_folder: Path, tmp_path: Path, *, config: dict | None = None,
                 processor: dict | None = None) -> Path:
    folder = tmp_path / "rad-dino"
    shutil.copytree(raddino_folder, folder)
    for name, changes in (("config.json", config), ("preprocessor_config.json", processor)):
        if changes:
            path = folder / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file(change(tensors), folder / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------------------- what must keep working

def test_guard_an_intact_tiny_raddino_computes_through_the_stage(raddino_folder, tiny_params_file):
    result = raddino_stage(tiny_params_file, raddino_folder)
    assert result.returncode == 0 and "COMPUTED fd" in result.stdout, result.stderr[-2000:]


def test_guard_the_processor_made_from_the_checked_settings_is_the_one_transformers_reads(raddino_folder):
    """The checked settings alone make the processor: its pixels are those of transformers' own reading of the file
    (CheXGenBench's ``AutoImageProcessor``, PIL backend)."""
    from transformers import AutoImageProcessor

    from cxr_diffusion.evaluation.raddino import chexgenbench_bytes

    images = chexgenbench_bytes(torch.stack([_Images(3, 4)[i]["pixel_values"] for i in range(3)]))
    ours = load_raddino(str(raddino_folder), CPU).processor(images=images, return_tensors="pt")["pixel_values"]
    reference = AutoImageProcessor.from_pretrained(str(raddino_folder), backend="pil")
    assert torch.equal(ours, reference(images=images, return_tensors="pt")["pixel_values"])


def test_guard_microsoft_rad_dinos_own_settings_pass_the_checks(tmp_path):
    """The real checkpoint's config and processor (the stand-in's copies of them) and a model.safetensors of its
    86.6 M fp32 values, named as the hub file names them, pass every bound; the file is sparse (no disk used)."""
    folder = tmp_path / "rad-dino"
    folder.mkdir()
    config = {**standin_models.RADDINO, "model_type": "dinov2", "architectures": ["Dinov2Model"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(standin_models.RADDINO_PREPROCESSOR))
    from transformers import Dinov2Config

    entries, offset = {}, 0
    for name, (shape, count) in checkpoint_tensors(Dinov2Config(**config)).items():
        entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    header = encode_header(entries)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + offset)
    checked = check_raddino_folder(folder)
    assert checked.config.hidden_size == 768 and offset == 4 * 86_580_480
    assert checked.processor["crop_size"] == {"height": 518, "width": 518} and (518 // 14) ** 2 <= MAX_PATCHES


RUNTIME_SWITCHES = {  # how transformers runs the network and what it returns, not the network itself
    "return_dict": False,                            # a tuple: AttributeError reading pooler_output
    "attn_implementation": "flash_attention_2",      # ImportError: flash-attn is not installed
    "_attn_implementation": "flash_attention_2",
    "output_hidden_states": True, "output_attentions": True, "torchscript": True,
    "dtype": "float16",                              # features in half precision
}


def test_runtime_switches_in_config_json_change_nothing_evaluate_reads(raddino_folder, tmp_path):
    from cxr_diffusion.evaluation.raddino import raddino_features

    switched = raddino_copy(raddino_folder, tmp_path, config=RUNTIME_SWITCHES)
    images = _Images(3, seed=2)
    features = [raddino_features(load_raddino(str(folder), CPU), images, 3, "test")
                for folder in (raddino_folder, switched)]
    assert features[0].shape == (3, 32) and (features[0] == features[1]).all()


# ---------------------------------------------------------------------------- 1. preprocessor_config.json in range

BAD_PROCESSORS = {  # each ended the stage in a traceback at feature time (or, last, in NaN features)
    "crop_size_0": {"crop_size": {"height": 0, "width": 0}},              # RuntimeError from conv2d
    "crop_size_negative": {"crop_size": {"height": -5, "width": -5}},     # RuntimeError from conv2d
    "crop_size_smaller_than_a_patch": {"crop_size": {"height": 8, "width": 8}},  # no patch at all
    "shortest_edge_negative": {"size": {"shortest_edge": -28}},           # ValueError from PIL
    "shortest_edge_0": {"size": {"shortest_edge": 0}},                    # ValueError from transformers
    "size_not_an_object": {"size": 28},
    "image_mean_of_2": {"image_mean": [0.5, 0.5]},                        # ValueError: mean must have 3 elements
    "image_mean_of_5": {"image_mean": [0.5] * 5},
    "image_mean_text": {"image_mean": ["0.5", "0.5", "0.5"]},
    "resample_99": {"resample": 99},                                      # ValueError: unknown resampling filter
    "image_std_0": {"image_std": [0, 0, 0]},                              # NaN features -> ValueError in distances
    "do_resize_text": {"do_resize": "yes"},
    "image_processor_type_other": {"image_processor_type": "CLIPImageProcessor"},
    "image_std_past_any_float": {"image_std": [10 ** 400] * 3},            # OverflowError in a float() of it
}


@pytest.mark.parametrize("case", sorted(BAD_PROCESSORS))
def test_a_raddino_image_processor_out_of_range_is_one_line_naming_the_file(raddino_folder, tmp_path, case):
    folder = raddino_copy(raddino_folder, tmp_path, processor=BAD_PROCESSORS[case])
    line = metrics_line(folder)
    assert line.startswith("evaluate.raddino: ") and "preprocessor_config.json" in line, line


def test_a_raddino_processor_that_blanks_every_image_is_refused(raddino_folder, tmp_path):
    """rescale_factor 0 turns every input into the same constant image: an FD of 0.0 between nothing and nothing."""
    folder = raddino_copy(raddino_folder, tmp_path, processor={"rescale_factor": 0})
    assert "rescale_factor" in metrics_line(folder)


# ---------------------------------------------------------------------------- 2. config.json in range

BAD_CONFIGS = {  # each ended the stage in a traceback (or, for the NaN, in NaN features)
    "heads_0": {"num_attention_heads": 0},        # ZeroDivisionError
    "patch_size_0": {"patch_size": 0},            # ZeroDivisionError
    "hidden_size_text": {"hidden_size": "32"},    # huggingface_hub StrictDataclassFieldValidationError
    "heads_3": {"num_attention_heads": 3},        # RuntimeError: ignore_mismatched_sizes
    "channels_1": {"num_channels": 1},            # RuntimeError: ignore_mismatched_sizes
    "hidden_act_unknown": {"hidden_act": "nosuch"},  # KeyError: 'nosuch'
    "layer_norm_eps_nan": {"layer_norm_eps": float("nan")},  # NaN features -> ValueError in distances
    "hidden_size_true": {"hidden_size": True},
    "patch_larger_than_the_image": {"patch_size": 56},
    "layer_norm_eps_past_any_float": {"layer_norm_eps": 10 ** 400},
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_raddino_config_out_of_range_is_one_line_naming_the_file(raddino_folder, tmp_path, case):
    folder = raddino_copy(raddino_folder, tmp_path, config=BAD_CONFIGS[case])
    line = metrics_line(folder)
    assert line.startswith("evaluate.raddino: ") and "config.json" in line, line


# ---------------------------------------------------------------------------- 3. sizes refused before allocating

HUGE_CONFIGS = {  # refused from the files, before anything is allocated (run under a 4 GiB cap)
    "crop_size_60000": {"processor": {"crop_size": {"height": 60000, "width": 60000}}},  # 10 GiB array
    "shortest_edge_100000": {"processor": {"size": {"shortest_edge": 100000}}},         # MemoryError
    "crop_4096_in_1px_patches": {"processor": {"crop_size": {"height": 4096, "width": 4096}},
                                 "config": {"patch_size": 1}},                          # 16.7 M tokens per image
    "num_hidden_layers_100000": {"config": {"num_hidden_layers": 100000}},              # > 45 s, growing
    "mlp_ratio_100000": {"config": {"mlp_ratio": 100000}},                              # 2.4 GB, then traceback
    "image_size_100000": {"config": {"image_size": 100000}},                            # 51 M position embeddings
    "hidden_4096_in_64_layers": {"config": {"hidden_size": 4096, "num_hidden_layers": 64,
                                            "num_attention_heads": 64}},                # 12.9 G values
}


@pytest.mark.parametrize("case", sorted(HUGE_CONFIGS))
def test_a_raddino_folder_declaring_a_huge_model_or_input_is_refused_before_allocating(raddino_folder,
                                                                                       tiny_params_file, tmp_path,
                                                                                       case):
    folder = raddino_copy(raddino_folder, tmp_path, **HUGE_CONFIGS[case])
    result = raddino_stage(tiny_params_file, folder, timeout=60, memory_gib=4)
    line = one_error_line(result, "stage evaluate failed:")
    assert "config.json" in line, line  # config.json or preprocessor_config.json, named


# ---------------------------------------------------------------------------- 4. weights that do not fill the model

SILENT_WEIGHTS = {  # the model loaded with weights that are not the checkpoint's: random where missing
    "layer_1_missing": lambda t: {k: v for k, v in t.items() if "encoder.layer.1." not in k},
    "only_cls_token": lambda t: {"embeddings.cls_token": t["embeddings.cls_token"]},
    "int32_layernorm": lambda t: {**t, "layernorm.weight": t["layernorm.weight"].round().to(torch.int32)},
    "one_tensor_more": lambda t: {**t, "encoder.layer.2.norm1.weight": t["layernorm.weight"].clone()},
    "a_wrong_shape": lambda t: {**t, "layernorm.weight": torch.zeros(16)},
}


@pytest.mark.parametrize("case", sorted(SILENT_WEIGHTS))
def test_raddino_weights_that_do_not_fill_the_model_are_refused_not_randomly_initialised(raddino_folder, tmp_path,
                                                                                         case):
    """transformers initialises every tensor missing from model.safetensors at random (a 'load report' on stderr)
    and casts integer tensors to float: the FD would be computed in a random network's features."""
    folder = raddino_copy(raddino_folder, tmp_path)
    edit_weights(folder, SILENT_WEIGHTS[case])
    line = metrics_line(folder)
    assert "model.safetensors" in line, line


def test_raddino_weights_holding_nan_are_one_line_not_a_traceback_in_the_distances(raddino_folder, tmp_path):
    folder = raddino_copy(raddino_folder, tmp_path)
    edit_weights(folder, lambda t: {**t, "layernorm.weight": torch.full_like(t["layernorm.weight"], float("nan"))})
    assert "gives features that are not finite" in metrics_line(folder)


SILENT_CONFIGS = {
    "one_layer_more_than_the_weights": {"num_hidden_layers": 3},  # layer 2 random
    "swiglu_ffn_not_in_the_weights": {"use_swiglu_ffn": True},    # every MLP random
    "model_type_bert": {"model_type": "bert"},                    # `fetch --record-present` refuses this folder
}


@pytest.mark.parametrize("case", sorted(SILENT_CONFIGS))
def test_a_raddino_config_that_is_not_the_checkpoints_architecture_is_refused(raddino_folder, tmp_path, case):
    folder = raddino_copy(raddino_folder, tmp_path, config=SILENT_CONFIGS[case])
    line = metrics_line(folder)
    assert "config.json" in line or "model.safetensors" in line, line


def test_guard_a_pickled_raddino_bin_alone_is_one_line(raddino_folder, tmp_path):
    folder = raddino_copy(raddino_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    line = metrics_line(folder)
    assert "model.safetensors is missing" in line and "pytorch_model.bin" in line, line


def test_guard_raddino_auto_map_code_is_never_executed(raddino_folder, tmp_path):
    folder = raddino_copy(raddino_folder, tmp_path, processor={"auto_map": {"AutoImageProcessor": "evil.Evil"}},
                          config={"auto_map": {"AutoModel": "evil.Evil"}})
    marker = tmp_path / "RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "from transformers import BitImageProcessor as Evil\n")
    load_raddino(str(folder), CPU)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 5. and 8. only the folder's own files

@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "model.safetensors"])
def test_a_fifo_in_the_raddino_folder_is_refused_without_blocking(raddino_folder, tiny_params_file, tmp_path, name):
    folder = raddino_copy(raddino_folder, tmp_path)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    line = one_error_line(raddino_stage(tiny_params_file, folder, timeout=30), "stage evaluate failed:")
    assert f"{name} is not a regular file" in line, line


def test_a_raddino_file_linking_outside_its_folder_is_refused(raddino_folder, tmp_path):
    """A link may point anywhere on the machine: what evaluate reads (and fetch hashes) is the folder's own."""
    folder = raddino_copy(raddino_folder, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    line = metrics_line(folder)
    assert "model.safetensors links outside the folder" in line, line


# ---------------------------------------------------------------------------- 6. a hub id: the local cache only

def test_raddino_as_the_hub_id_offline_says_so_without_minutes_of_retries(tiny_params_file, tmp_path):
    """evaluate.raddino: microsoft/rad-dino with an empty cache and no network: transformers retried every file
    5 times (99 s per evaluate stage) before a line; the cache alone is read, as `doctor` does."""
    result = raddino_stage(tiny_params_file, "microsoft/rad-dino", timeout=40,
                           env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
    line = one_error_line(result, "stage evaluate failed:")
    assert "not in the Hugging Face cache" in line and "cxr-diffusion fetch" in line, line


def hub_cache(raddino_folder: Path, cache: Path, repo: str = "microsoft/rad-dino") -> Path:
    """``raddino_folder`` as huggingface_hub caches a download: blobs, a snapshot of links to them, refs/main."""
    revision = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / revision).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    for number, path in enumerate(sorted(raddino_folder.iterdir())):
        shutil.copy(path, base / "blobs" / f"blob{number}")
        (base / "snapshots" / revision / path.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    return base / "snapshots" / revision


def test_guard_raddino_as_the_hub_id_is_read_from_the_cache(raddino_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = hub_cache(raddino_folder, tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    raddino = load_raddino("microsoft/rad-dino", CPU)
    assert raddino.width == 32
    assert check_raddino_folder(snapshot).folder == snapshot  # links into the repository's blobs/ are its own


def test_raddino_as_the_hub_id_is_read_at_the_pinned_revision(raddino_folder, tmp_path, monkeypatch):
    """fetch.raddino_revision pins what `fetch` downloads and `doctor` checks; evaluate read the cache's refs/main
    whatever the pin. Here main is another checkpoint, with 16 hidden units where the pinned one has 32."""
    from huggingface_hub import constants

    snapshot = hub_cache(raddino_folder, tmp_path / "hub")  # refs/main -> 000...0
    pinned = snapshot.parent / ("1" * 40)
    shutil.copytree(snapshot, pinned, symlinks=True)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").write_text(json.dumps({**config, "hidden_size": 16}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_raddino("microsoft/rad-dino", CPU, revision="1" * 40).width == 32
    line = metrics_line("microsoft/rad-dino", revision="2" * 40)
    assert "not in the Hugging Face cache at revision 2222" in line, line


def test_a_missing_relative_folder_is_not_looked_for_on_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    line = metrics_line("external/rad-dino")
    assert line.startswith("evaluate.raddino: external/rad-dino is not a folder and not in the Hugging Face cache")


def test_raddino_naming_a_file_is_one_line(raddino_folder):
    line = metrics_line(raddino_folder / "model.safetensors")
    assert line.startswith("evaluate.raddino: ") and "is a file, not a folder" in line, line


# ---------------------------------------------------------------------------- 7. fetch --record-present of RadDINO

def raddino_root(root: Path, folder: Path) -> Path:
    """The nih-512 profile needing only its RadDINO folder, which is a copy of ``folder``."""
    from cxr_diffusion.profiles import profile_data

    raw = profile_data("nih-512")
    raw["clip"]["model"], raw["train"]["space"], raw["elixr"]["path"] = "demo", "pixel", None
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights"):
        raw["evaluate"][key] = None
    raw["evaluate"]["raddino"] = "external/rad-dino"
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(folder, root / "external" / "rad-dino", symlinks=True)
    return root


def test_guard_an_intact_raddino_folder_is_recorded(raddino_folder, tmp_path):
    from cxr_diffusion.cli import app

    root = raddino_root(tmp_path / "root", raddino_folder)
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)])
    assert result.exit_code == 0 and "raddino: recorded external/rad-dino" in result.output, result.output


RECORD_BREAKS = {
    "no_preprocessor_config": lambda f: (f / "preprocessor_config.json").unlink(),
    "crop_size_0": lambda f: (f / "preprocessor_config.json").write_text(json.dumps(
        {**json.loads((f / "preprocessor_config.json").read_text()), "crop_size": {"height": 0, "width": 0}})),
    "layer_1_missing": lambda f: edit_weights(f, SILENT_WEIGHTS["layer_1_missing"]),
}


@pytest.mark.parametrize("case", sorted(RECORD_BREAKS))
def test_fetch_record_present_refuses_a_raddino_folder_evaluate_cannot_use(raddino_folder, tmp_path, case):
    """Recorded, `doctor` would call it present, and the evaluate stage fail (or use random weights) much later."""
    from cxr_diffusion.cli import app

    folder = tmp_path / "src"
    shutil.copytree(raddino_folder, folder)
    RECORD_BREAKS[case](folder)
    root = raddino_root(tmp_path / "root", folder)
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)])
    assert result.exit_code == 2 and "raddino: could not place it" in result.output, result.output
    assert "not a RadDINO checkpoint the evaluate stage can load" in result.output, result.output


def test_the_folder_check_names_the_file_and_tensor(raddino_folder, tmp_path):
    folder = raddino_copy(raddino_folder, tmp_path)
    edit_weights(folder, SILENT_WEIGHTS["layer_1_missing"])
    with pytest.raises(RadDinoFolderError, match=r"^model\.safetensors: lacks 18 of the 43 tensors .* "
                                                 r"e\.g\. encoder\.layer\.1\."):
        check_raddino_folder(folder)
