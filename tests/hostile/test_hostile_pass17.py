"""Hostile inputs, pass 17: two fresh passes over pass 16's fixes. 17a looked for their siblings (a pretrained
CLIP's config against its weights, the samples' branch in the reader kit, the prepared data and the store's branch
in evaluate, latents of another VAE, metrics files of another branch). 17b called the stage entry points as a user
or a broken environment would (an output naming an input's folder, an output path through a file, a write that
fails halfway, malformed launcher variables, a hub-id VAE at stage time). Each case builds its input and runs the
real entry point or the library function a stage calls, asserting the project's rule: one line naming the file or
key and what to do, exit 2, no traceback; nothing of the user's lost; never a silent acceptance of wrong data.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_nih_download, make_training_data, nih_row, stage_line, write_profile

CLASSES = ["Effusion", "No Finding"]
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- a pretrained CLIP: config vs weights


def _clip_with(tiny_clip_dir: Path, folder: Path, tower: str, **config) -> Path:
    clip = Path(shutil.copytree(tiny_clip_dir, folder))
    saved = json.loads((clip / "config.json").read_text())
    saved[tower] = {**saved[tower], **config}
    (clip / "config.json").write_text(json.dumps(saved))
    return clip


@pytest.mark.parametrize("edit", ["intermediate_size", "num_hidden_layers"])
def test_embed_clip_text_refuses_a_clip_config_its_weights_do_not_fill(tmp_path, tiny_clip_dir, edit):
    """The sibling of pass 16's evaluator fix and of RadDINO's folder check: a `clip.model` folder's config.json
    is handed to transformers unchecked against its model.safetensors. A text tower edited to
    `intermediate_size: 1000000000` over weights of 64 ends embed_clip_text in transformers' `RuntimeError: You
    set ignore_mismatched_sizes to False, thus raising an error` (not caught by _load_tower: a traceback; 65
    over 64 does the same, and on the way transformers allocates the declared size: `intermediate_size:
    1000000000` is 'DefaultCPUAllocator: ... you tried to allocate 64000000000 bytes' from a 3 KB config), and
    `num_hidden_layers: 2` over one layer of weights is accepted: transformers fills the second layer at random
    (its 'missing keys' report is silenced by _quiet_transformers) and the clip_text store is written from a
    half-random encoder, silently. The header's tensors should be checked against the config (as
    raddino_folder does), naming config.json."""
    from cxr_diffusion.conditioning.embed import embed_clip_text
    from cxr_diffusion.profiles import params_with

    value = {"intermediate_size": 65, "num_hidden_layers": 2}[edit]
    clip_dir = _clip_with(tiny_clip_dir, tmp_path / "clip", "text_config", **{edit: value})
    make_training_data(tmp_path / "data", n_images=12)
    clip = params_with({"clip": {"model": str(clip_dir)}}).clip
    line = stage_line(lambda: embed_clip_text(tmp_path / "data" / "filtered" / "filtered.csv", clip, tmp_path / "demo",
                                              tmp_path / "store"))
    assert "config.json" in line or "clip.model" in line, line
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- the reader-study kit: the samples' branch


@pytest.mark.parametrize("case", ["real_images", "other_branch"])
def test_the_reader_study_refuses_samples_that_are_not_the_branchs_generations(tmp_path, case):
    """Evaluate now refuses a samples folder whose manifest's `generated.branch` is another branch's, or absent
    (check_generated_by); the reader study (build_study_kit -> select_items) never reads it: with
    data/samples/elixr replaced by a copy of data/prepared (real test images, no `generated` key) the kit is built
    and the answer key labels real radiographs as elixr's generations, so the readers' 'real' answers on them are
    scored as fooled; another branch's samples are likewise published as elixr's. It should be one line naming
    the samples' manifest.json and `dvc repro -f sample@elixr`."""

    data = make_training_data(tmp_path / "data", n_images=48)
    samples = tmp_path / "samples"
    shutil.copytree(data["prepared"], samples / "elixr")
    if case == "other_branch":
        manifest = json.loads((samples / "elixr" / "manifest.json").read_text())
        manifest["generated"] = {"branch": "clip_text", "model": "models/clip_text", "sampler": "dpmpp_2m",
                                 "steps": 2, "guidance_scale": 3.0, "seed": 0}
        (samples / "elixr" / "manifest.json").write_text(json.dumps(manifest))
    line = kit_refusal(data["prepared"], samples, tmp_path, display_size=16)
    assert "manifest.json" in line and "elixr" in line, line
    assert not (tmp_path / "key.json").exists()


def kit_refusal(prepared: Path, samples: Path, tmp_path: Path, display_size: int) -> str:
    """The one line build_study_kit stops with for elixr's samples in ``samples`` beside 16 px ``prepared``."""
    from cxr_diffusion.profiles import params_with
    from cxr_diffusion.reader_study.build import build_study_kit

    params = params_with({"branches": ["elixr"], "image_size": 16, "filter": {"classes": CLASSES, "merges": {}},
                          "reader_study": {"count": 4, "real_fraction": 0.5, "calibration": 0,
                                           "display_size": display_size}})
    return stage_line(lambda: build_study_kit(params, prepared, samples, tmp_path / "kit", tmp_path / "key.json"))


# ---------------------------------------------------------------------------- evaluate: the untrained baseline's inputs


@pytest.fixture(scope="module")
def evaluate_run(tmp_path_factory):
    """48 prepared 16x16 images, their elixr store, a one-epoch evaluator, an elixr model built on them (not
    trained: the untrained baseline only reads its architecture) and a samples folder that says it is elixr's."""
    from test_hostile_pass16 import saved_untrained_model

    from cxr_diffusion.config import EvaluatorConfig
    from cxr_diffusion.evaluation.evaluator import train_evaluator
    from cxr_diffusion.profiles import profile_section

    root = tmp_path_factory.mktemp("p17a-evaluate")
    data = make_training_data(root / "data")
    train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8),
                    0, root / "evaluator")
    saved_untrained_model(data["store"], root / "model")
    samples = Path(shutil.copytree(data["prepared"], root / "samples"))
    manifest = json.loads((samples / "manifest.json").read_text())
    manifest["generated"] = {"branch": "elixr", "model": "models/elixr", "sampler": "dpm++", "steps": 2,
                             "guidance_scale": 3.0, "seed": 0, "count": 200}
    (samples / "manifest.json").write_text(json.dumps(manifest))
    other_store = Path(shutil.copytree(data["store"], root / "clip_vision_store"))
    meta = json.loads((other_store / "store.json").read_text())
    (other_store / "store.json").write_text(json.dumps({**meta, "branch": "clip_vision"}))
    return root, data, samples, other_store


def test_evaluate_refuses_an_untrained_baseline_on_a_store_of_another_branch(evaluate_run, tmp_path):
    """Pass 16 made train, sample and utility refuse a condition store of another branch (check_store_branch);
    evaluate's untrained baseline (`evaluate.untrained_images` > 0, untrained_features) opens `--store` with a
    bare ConditionStore and never looks: `evaluate --branch elixr --store data/embeddings/clip_vision` writes
    elixr's `untrained_*` closeness figures (the 'how much did training help' baseline) from another branch's
    conditions, silently, whenever the stores' token shapes agree. It should be refused as sample refuses it,
    naming the store and data/embeddings/elixr. (Its `--model` is also never compared with the branch, as sample
    and utility compare it: a sibling of the same fix.)"""
    from test_inference_memory import evaluate_params

    from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
    from cxr_diffusion.profiles import params_with

    root, data, samples, other_store = evaluate_run
    params = evaluate_params(8)
    params = params_with({"image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
                          "sample": {"steps": 2, "batch_size": 2},
                          "evaluate": {**params.evaluate.model_dump(), "untrained_images": 2}})
    paths = EvaluatePaths(evaluator=root / "evaluator", prepared=data["prepared"], samples=samples, model=root / "model",
                          store=other_store, figures=tmp_path / "figures", metrics=tmp_path / "metrics.json")
    line = stage_line(lambda: evaluate_branch(params, "elixr", paths))
    assert "clip_vision" in line, line
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------- train in latent space: another VAE's latents


def test_latent_training_refuses_latents_another_vae_encoded(tmp_path):
    """encode_latents records the VAE in the latent store's store.json (`vae: <train.vae>`, `scaling_factor`), and
    check_latents_fit compares only the channels and side with train.vae: latents encoded by one VAE (say
    sd-vae-ft-ema) and trained with `train.vae` naming another of the same shape (sd-vae-ft-mse) train a model
    whose samples that other VAE decodes, silently (the sibling of pass 16's image_size and store-branch checks:
    data of another run). The recorded `vae` (or its scaling factor) should be compared with train.vae, naming
    store.json and `dvc repro -f encode_latents`."""
    from test_hostile_pass15 import tiny_vae
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.latents import encode_latents
    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

    data = make_training_data(tmp_path / "data", n_images=16)
    encoded_by = tiny_vae(tmp_path / "vae_ema")
    torch.manual_seed(1)
    trained_with = tiny_vae(tmp_path / "vae_mse")
    encode_latents(tiny_params(train={"space": "latent", "vae": str(encoded_by)}), data["prepared"],
                   tmp_path / "latents")
    params = tiny_params(train={"space": "latent", "vae": str(trained_with), "max_steps": 1, "val_every_steps": 1,
                                "sample_every_steps": 1, "checkpoint_every_steps": None})
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live", latents=tmp_path / "latents")
    line = stage_line(lambda: train_branch(params, "elixr", paths))
    assert "vae" in line and "encode_latents" in line, line


def test_a_clip_config_declaring_a_huge_layer_is_refused_before_it_is_allocated(tmp_path, tiny_clip_dir):
    """The allocation half of the CLIP case above: `intermediate_size: 1000000000` in a 3 KB config.json over
    64-wide weights makes transformers try to allocate the declared 64 GB before it reports the size mismatch:
    the RuntimeError traceback ('You set `ignore_mismatched_sizes` to `False`') has as its context 'DefaultCPUAllocator:
    can't allocate memory: you tried to allocate 64000000000 bytes' (here, where it failed; a machine with the
    memory fills it). The config's sizes should be bounded and checked against the weights' header first."""
    from test_hostile_pass16 import _in_capped_process

    clip_dir = _clip_with(tiny_clip_dir, tmp_path / "clip", "text_config", intermediate_size=10**9)
    result = _in_capped_process("from cxr_diffusion.conditioning.clip import load_text_encoder\n"
                                "refused(lambda: load_text_encoder(sys.argv[1]))", str(clip_dir))
    assert result.returncode == 2 and "LINE" in result.stdout and "config.json" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-300:]} {result.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------- evaluate: the params' classes


def test_evaluate_refuses_params_classes_the_prepared_data_are_not_labelled_under(evaluate_run, tmp_path):
    """Pass 16 made train, sample, utility and encode_latents check the prepared manifest against the params
    (check_prepared_for); evaluate never calls it, yet its pretrained judge reads the params: xrv_metrics maps
    `params.filter.class_members()` (params order) onto the prepared label columns (manifest order) by position.
    With `filter.classes: [No Finding, Effusion]` over data prepared as [Effusion, No Finding], the DenseNet's
    Effusion score is scored against the No Finding column and written as `xrv_densenet.auroc_vs_requested_labels
    .Effusion`, silently. It should be one line naming filter.classes and the prepare stage, as sample gives."""
    from safetensors.torch import save_file

    from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
    from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121
    from cxr_diffusion.profiles import params_with
    from test_inference_memory import evaluate_params

    root, data, samples, _ = evaluate_run
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in XRVDenseNet121().state_dict().items()}, tmp_path / "xrv.safetensors")
    evaluate = {**evaluate_params(8).evaluate.model_dump(), "xrv_weights": str(tmp_path / "xrv.safetensors"),
                "bootstrap": 10}
    params = params_with({"image_size": 16, "device": "cpu", "filter": {"classes": CLASSES[::-1], "merges": {}},
                          "evaluate": evaluate})
    paths = EvaluatePaths(evaluator=root / "evaluator", prepared=data["prepared"], samples=samples,
                          model=tmp_path / "unused", store=tmp_path / "unused", figures=tmp_path / "figures",
                          metrics=tmp_path / "metrics.json")
    line = stage_line(lambda: evaluate_branch(params, "elixr", paths))
    assert "classes" in line, line


# ---------------------------------------------------------------------------- compare: a metrics file of another branch


@pytest.mark.parametrize("folder", ["evaluations", "sampling"])
def test_compare_refuses_a_metrics_file_that_says_it_is_another_branchs(tmp_path, folder):
    """Every per-branch metrics file records its branch (evaluate and sample write `"branch": <branch>`), as the
    samples' manifest does; evaluate now refuses samples whose manifest names another branch (check_generated_by),
    but compare reads metrics/evaluate/elixr.json (and metrics/sample/elixr.json) without looking at it: a file
    holding `"branch": "clip_text"` (clip_text's metrics copied or written to elixr's path) is reported as
    elixr's, silently. It should be one line naming the file and both branches."""
    from test_hostile_reports import inputs, report_of, write

    path = getattr(inputs(tmp_path), folder) / "elixr.json"
    write(path, {"branch": "elixr", "closeness": {"kid": 0.5}} if folder == "evaluations" else
          {"branch": "elixr", "images": 2, "sampler": "dpm++", "steps": 20, "guidance_scale": 3.0})
    report_of(tmp_path)  # guard: the file itself is read and reported
    write(path, {**json.loads(path.read_text()), "branch": "clip_text"})
    line = stage_line(lambda: report_of(tmp_path))
    assert "elixr.json" in line and "clip_text" in line, line


# ============================================================================ pass 17b: the stage entry points


def _stage(name: str, *args: str | Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python stages/<name>.py args``, run from the repository root as dvc.yaml runs it."""
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})})


def _one_line(result: subprocess.CompletedProcess, stage: str) -> str:
    tail = result.stderr.strip().splitlines()[-3:]
    assert result.returncode == 2 and "Traceback" not in result.stderr, f"exit {result.returncode}: {tail}"
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"stage {stage} failed: ")]
    assert len(lines) == 1, result.stderr[-600:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def nih_run(tmp_path) -> dict:
    """A 40-image NIH download, a params file reading it (two classes, tiny images allowed), and the dataset
    and filter stages' outputs, made by the real stages' library calls."""
    from cxr_diffusion.data.filter import run_filter
    from cxr_diffusion.data.sources import build_dataset
    from cxr_diffusion.params_file import load_params

    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 41)]
    nih = make_nih_download(tmp_path / "nih", rows)
    text = write_profile("tiny", tmp_path / "profile").read_text()
    for old, new in [("  source: phantom ", "  source: nih #"), ("  nih_root: null ", f"  nih_root: {nih} #"),
                     ("  classes: [Infiltration, No Finding, Effusion, Nodule/Mass, Atelectasis]",
                      "  classes: [Effusion, No Finding]"), ("  merges:\n    Nodule/Mass: [Nodule, Mass]\n",
                                                             "  merges: {}\n"),
                     ("  min_side: 64 ", "  min_side: 16 #"), ("  workers: 0 ", "  workers: 1 #")]:
        assert old in text, old
        text = text.replace(old, new, 1)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text)
    params = load_params(params_file)
    data = tmp_path / "data"
    build_dataset(params, data / "dataset")
    run_filter(data / "dataset", params.filter, params.seed, data / "filtered", tmp_path / "metrics" / "filter.json")
    return {"params_file": params_file, "params": params, "nih": nih, "data": data,
            "dataset": data / "dataset", "filtered": data / "filtered"}


# ---------------------------------------------------------------------------- an output that is an input's folder


def test_dataset_with_out_naming_the_nih_download_refuses_and_keeps_the_download(nih_run, tmp_path):
    """`dataset.nih_root` and `--out` naming the same folder (a user who unpacked NIH's download into
    data/dataset, as the stage's output is called): build_dataset indexes the download into a temporary folder and
    atomic_directory swaps it in place of --out, deleting the 112,120 images and Data_Entry_2017_v2020.csv, which
    no DVC cache holds (the stage printed `DatasetSummary(source='nih', rows=40, ...)` and exited 0; the folder then
    held only image_paths.csv, metadata.csv, missing.csv, unexpected.csv). A stage should refuse an --out that is,
    holds or lies inside one of its inputs (here dataset.nih_root) before writing, naming both."""
    before = _snapshot(nih_run["nih"])
    result = _stage("dataset", "--params", nih_run["params_file"], "--out", nih_run["nih"],
                    "--metrics", tmp_path / "m.json")
    after = _snapshot(nih_run["nih"]) if nih_run["nih"].is_dir() else {}
    assert sorted(after) == sorted(before) and after == before, (f"the NIH download was replaced (exit {result.returncode}); it now holds "
                             f"{sorted(after)[:6]}")
    line = _one_line(result, "dataset")
    assert "nih_root" in line and str(nih_run["nih"]) in line, line


@pytest.mark.parametrize("out", ["filtered_folder", "data_folder"])
def test_prepare_with_out_holding_its_inputs_refuses_and_keeps_them(nih_run, tmp_path, out):
    """`--out data/filtered` (the folder of its own --filtered table) or `--out data` (a typo for data/prepared:
    the folder that holds --dataset and --filtered): prepare reads its inputs, then atomic_directory replaces the
    whole --out folder with the shards, so the filter's output (or the dataset index and the filter's output) is
    deleted and the stage exits 0 ('prepare: 40 written, 0 rejected'). The check belongs before anything is
    written: an output folder must not be, nor hold, an input of the stage."""
    target = nih_run["filtered"] if out == "filtered_folder" else nih_run["data"]
    before = _snapshot(nih_run["data"])
    result = _stage("prepare", "--params", nih_run["params_file"], "--dataset", nih_run["dataset"],
                    "--filtered", nih_run["filtered"] / "filtered.csv", "--out", target,
                    "--metrics", tmp_path / "prepare.json")
    after = _snapshot(nih_run["data"]) if nih_run["data"].is_dir() else {}
    lost = sorted(set(before) - set(after))
    assert not lost, f"exit {result.returncode}; deleted inputs: {lost}"
    line = _one_line(result, "prepare")
    assert str(target) in line, line


# ---------------------------------------------------------------------------- an output path through a file


@pytest.mark.parametrize("case", ["out_under_a_file", "metrics_under_a_file", "metrics_is_a_folder"])
def test_filter_with_an_output_path_in_the_way_is_one_line(nih_run, tmp_path, case):
    """--out or --metrics whose parent is a regular file (`--out results/filtered` where results is a file): the
    atomic writer's `parent.mkdir(parents=True, exist_ok=True)` raises NotADirectoryError ('[Errno 20] Not a
    directory: .../afile/filtered'); --metrics naming an existing folder: the atomic rename raises
    IsADirectoryError ('[Errno 21] Is a directory: .../.mdir.<hex>.tmp -> .../mdir'), after filtered.csv was
    written. Neither errno is one user_error_line describes, so the stage ends in a traceback. (Pass 13 fixed only
    code_deps' --out and train's --checkpoints/--live.) The line should name the path and say it is a file, or a
    folder, where the other belongs."""
    (tmp_path / "afile").write_text("a file\n")
    (tmp_path / "mdir" / "sub").mkdir(parents=True)
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    if case == "out_under_a_file":
        out = tmp_path / "afile" / "filtered"
    elif case == "metrics_under_a_file":
        metrics = tmp_path / "afile" / "metrics" / "filter.json"
    else:
        metrics = tmp_path / "mdir"
    result = _stage("filter", "--params", nih_run["params_file"], "--dataset", nih_run["dataset"],
                    "--out", out, "--metrics", metrics)
    line = _one_line(result, "filter")
    assert "afile" in line or "mdir" in line, line


# ---------------------------------------------------------------------------- a write that fails halfway


def test_a_filter_that_fails_writing_leaves_its_previous_output_whole(nih_run, monkeypatch, tmp_path):
    """run_filter writes rejects.csv, include_list_issues.csv and filtered.csv into --out one file at a time (each
    atomic, the folder not): a full disk while filtered.csv is written leaves the new rejects.csv beside the old
    filtered.csv. The stage says 'the partial output was discarded', but the folder is a mix of two runs whose
    counts do not reconcile, and prepare, run next by hand, reads the old table without a word. The folder
    should be swapped whole (atomic_directory), as prepare's and dataset's are."""
    from cxr_diffusion.data.filter import run_filter
    from cxr_diffusion.params_file import load_params

    out = nih_run["filtered"]
    before = _snapshot(out)
    params_file = tmp_path / "changed.yaml"  # a class cap: other rejects, another filtered.csv
    text = nih_run["params_file"].read_text()
    assert "  max_per_class: null " in text
    params_file.write_text(text.replace("  max_per_class: null ", "  max_per_class: 10 #", 1))
    params = load_params(params_file)
    real_to_csv = pd.DataFrame.to_csv

    def full_disk(self, path, *args, **kwargs):
        if Path(path).name.startswith(".filtered.csv."):
            real_to_csv(self.iloc[: len(self) // 2], path, *args, **kwargs)  # the disk fills halfway through
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    line = stage_line(lambda: run_filter(nih_run["dataset"], params.filter, params.seed, out,
                                         tmp_path / "metrics" / "filter.json"))
    monkeypatch.undo()
    assert "no space left" in line, line
    after = _snapshot(out) if out.is_dir() else {}
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    assert after in (before, {}), f"a mix of two runs left in {out}: changed {changed}, kept the rest"


# ---------------------------------------------------------------------------- the environment a stage runs in


@pytest.mark.parametrize("variable, value", [("WORLD_SIZE", "two"), ("WORLD_SIZE", ""), ("LOCAL_WORLD_SIZE", "1.5")])
def test_train_with_a_malformed_world_size_in_the_environment_is_one_line(tmp_path, monkeypatch, tiny_params_file,
                                                                            variable, value):
    """set_up_machine reads `int(os.environ.get("WORLD_SIZE", 1))` and LOCAL_WORLD_SIZE the same way: a value left
    by a broken launcher or a shell profile (`WORLD_SIZE=two`, an empty `WORLD_SIZE=`) ends stage train in
    'ValueError: invalid literal for int() with base 10', a traceback, before any input is read. The line should
    name the variable, its value and what it must be (a whole number >= 1, as accelerate launch sets it)."""
    from cxr_diffusion.diffusion.machine import set_up_machine
    from cxr_diffusion.params_file import load_params

    monkeypatch.setenv(variable, value)
    params = load_params(tiny_params_file)
    params = params.model_copy(update={"device": "cpu"})
    line = stage_line(lambda: set_up_machine(params, tmp_path / "prepared", tmp_path / "store", None))
    assert variable in line, line


# ---------------------------------------------------------------------------- a hub id loaded at stage time


def test_encode_latents_reads_the_fetched_vae_revision_from_the_cache_only(tmp_path, tiny_params_file):
    """load_vae calls `AutoencoderKL.from_pretrained(train.vae)` with neither `revision=fetch.vae_revision` nor
    `local_files_only=True` (the pass-12 fix made RadDINO's loader do both). A cache holding exactly what
    `cxr-diffusion fetch` downloads with `fetch.vae_revision` pinned (snapshots/<hash>, no refs/main) is not
    found: with HF_HUB_OFFLINE=1 the stage ends 'train.vae: 'stabilityai/sd-vae-ft-mse' could not be loaded
    (OSError)'; without it, it retries the network for 28 s here (5 retries, 1+2+4+8+8 s) and, online, loads
    whatever revision is `main` today, not the one fetch recorded and doctor hashes. Fixed, the VAE loads from the
    pinned snapshot and the stage goes on to its next check (the missing prepared manifest)."""
    from diffusers import AutoencoderKL

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hf" / "hub" / "models--stabilityai--sd-vae-ft-mse" / "snapshots" / revision
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(snapshot)
    text = tiny_params_file.read_text()
    for old, new in [("  space: pixel ", "  space: latent #"), ("  vae_revision: null", f"  vae_revision: {revision}")]:
        assert old in text, old
        text = text.replace(old, new, 1)
    assert "  vae: stabilityai/sd-vae-ft-mse" in text and "  vae_repo: stabilityai/sd-vae-ft-mse" in text
    (tmp_path / "params.yaml").write_text(text)
    started = time.perf_counter()
    result = _stage("encode_latents", "--params", tmp_path / "params.yaml", "--prepared", tmp_path / "prepared",
                    "--out", tmp_path / "latents", "--metrics", tmp_path / "latents.json",
                    env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    line = _one_line(result, "encode_latents")
    assert "train.vae" not in line and "manifest.json" in line, (
        f"{line} ({time.perf_counter() - started:.0f} s): the pinned snapshot in the cache was not read")


# ---------------------------------------------------------------------------- the shared check every stage runs


@pytest.mark.parametrize("reads, folders, files, named", [
    ({"--samples": "data/samples"}, {"--figures": "data/samples/elixr/figures"}, {}, "lies inside the input --samples"),
    ({"--prepared": "data/prepared"}, {"--out": "data"}, {}, "holds the input --prepared"),
    ({"--key": "kit/key.json"}, {}, {"--metrics": "kit/key.json"}, "is also the input --key"),
    ({}, {"--out": "reports/x", "--figures": "reports/x/figures"}, {}, "overlap"),
    ({}, {"--out": "reports/x"}, {"--metrics": "reports/x"}, "overlap"),
])
def test_a_stages_outputs_may_not_collide_with_its_inputs_or_each_other(tmp_path, monkeypatch, reads, folders, files,
                                                                        named):
    """`stage_paths.check_stage_paths`, which `run_stage` calls for every stage before it reads or writes: an output
    that is, holds or lies inside an input folder, or overlaps another output, is one line naming both options."""
    from cxr_diffusion.stage_paths import StagePathError, check_stage_paths

    monkeypatch.chdir(tmp_path)
    for folder in ("data/samples/elixr", "data/prepared", "kit", "reports"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / "kit" / "key.json").write_text("{}")
    with pytest.raises(StagePathError, match=named):
        check_stage_paths({name: Path(path) for name, path in reads.items()},
                          {name: Path(path) for name, path in folders.items()},
                          {name: Path(path) for name, path in files.items()})


def test_the_paths_of_every_stage_in_dvc_yaml_pass_the_check(tmp_path):
    """Guard: the pipeline's own command lines (every `--option path` of dvc.yaml's stages, `${item}` as elixr) give
    no collision: sibling outputs and inputs, as DVC lays them out."""
    import yaml

    from cxr_diffusion.stage_paths import check_stage_paths

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        command = stage["do"]["cmd"] if "do" in stage else stage["cmd"]
        words = " ".join(command.split()).replace("${item}", "elixr").split()
        options = {word: value for word, value in zip(words, words[1:]) if word.startswith("--")}
        body = stage.get("do", stage)
        outs = {str(out if isinstance(out, str) else next(iter(out)))
                for key in ("outs", "metrics", "plots") for out in (body.get(key) or [])}
        outputs = {option: Path(path) for option, path in options.items() if path in outs}
        inputs = {option: Path(REPO / path) for option, path in options.items()
                  if option not in outputs and option not in ("--branch",) and "/" in path}
        kinds = {option: Path(path).suffix in (".json", ".csv", ".md", ".png", ".zip") for option, path in outputs.items()}
        check_stage_paths(inputs, {option: REPO / path for option, path in outputs.items() if not kinds[option]},
                          {option: REPO / path for option, path in outputs.items() if kinds[option]})
        checked += 1
    assert checked >= 15
