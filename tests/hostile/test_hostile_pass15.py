"""Hostile inputs, pass 15: what pass 14 named without filing (a checkpoint's plateau scale above 1 and a data
position past the end of the epoch were resumed; an answer key's calibration string became its letters), and the
problems two fresh passes over the reader study, reports, assets and the training, sampling and evaluation paths
found. Each case builds its input and runs the real entry point or the library function a stage calls, asserting
the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never a hang, a silent
acceptance, or an allocation a small file declares.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_training_data, stage_line
from cxr_diffusion.cli import app
from cxr_diffusion.evaluation.report import MetricsFileError
from cxr_diffusion.reader_study.scoring import score_responses
from scripted_readers import guesser, response_file, truthful
from test_hostile_assets import recorded_root
from test_hostile_pass14 import TwoShapes, _Accelerator
from test_hostile_reader_text import built_key
from test_hostile_reports import inputs, report_of, write


# ---------------------------------------------------------------------------- checkpoints: counters of another run


def _saved_and_resumed(directory: Path, **state_fields) -> tuple[object, list[str]]:
    """A checkpoint of TwoShapes saved with ``state_fields``, then resumed by a run of 4 images per step and 10
    micro-batches per epoch: what ``resume`` returns, and what it logged."""
    from cxr_diffusion.diffusion.checkpoints import TrainingState, config_hash, save_checkpoint
    from cxr_diffusion.diffusion.ema import EMA
    from cxr_diffusion.diffusion.resume import resume
    from cxr_diffusion.diffusion.run_plan import Plan

    torch.manual_seed(0)
    model = TwoShapes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(list(model.parameters()), on_host=True)
    run_hash = config_hash({"x": 1})
    rng = {"noise": torch.Generator().get_state()[None], "torch": torch.get_rng_state()[None]}
    save_checkpoint(directory, TrainingState(config_hash=run_hash, **state_fields), {"denoiser": model}, optimizer,
                    rng, 2, {"ema": ema.tensors()}, log=lambda line: None)
    lines: list[str] = []

    class Logging(_Accelerator):
        @staticmethod
        def print(*args):
            lines.append(" ".join(map(str, args)))

    return resume(Logging(), directory, run_hash, model, optimizer, ema, torch.Generator(), Plan(4, 10, 100)), lines


@pytest.mark.parametrize("fields, reason", [
    ({"step": 2, "images_seen": 8, "plateau_scale": 2.0}, "plateau_scale"),
    ({"step": 2, "images_seen": 8, "batch_in_epoch": 11}, "batch_in_epoch"),
    ({"step": 2, "images_seen": 9}, "images_seen"),
])
def test_a_checkpoint_whose_counters_this_run_cannot_have_written_is_skipped(tmp_path, fields, reason):
    """The plateau schedule only cuts the rate, so `plateau_scale: 2` resumed a run at twice its learning rate;
    `batch_in_epoch` past the epoch's 10 micro-batches silently skipped the rest of the epoch's data; images seen
    that are not step x images per step misplace the EMA's warm-up. Each is skipped with its reason."""
    resumed, lines = _saved_and_resumed(tmp_path, **fields)
    assert resumed is None, f"resumed from {fields}"
    assert any("skipping" in line and reason in line for line in lines), lines


def test_a_checkpoint_saved_at_the_last_micro_batch_of_an_epoch_is_resumed(tmp_path):
    """Guard: a save at an epoch's last step holds `batch_in_epoch` equal to the epoch's micro-batches."""
    resumed, lines = _saved_and_resumed(tmp_path, step=5, images_seen=20, batch_in_epoch=10, plateau_scale=0.25)
    assert resumed is not None and resumed.batch_in_epoch == 10, lines


# ---------------------------------------------------------------------------- answer keys


@pytest.mark.parametrize("calibration", ["i2", ["i2"], {"7": "x", "8": "y"}, 3])
def test_an_answer_key_whose_calibration_is_not_a_mapping_of_ids_is_refused(tmp_path, calibration):
    """`calibration: "i2"` was read as the calibration ids i and 2, and a list or number went through
    frozenset() the same way; the kit writes a mapping of item id to truth."""
    from cxr_diffusion.reader_study.responses import read_key

    item = {"source": "real", "origin_id": "00000001_000.png", "labels": ["Effusion"]}
    key = {"study_id": "s1", "kit_id": "ab12", "findings": ["Effusion"], "items": {"i1": item},
           "calibration": calibration}
    (tmp_path / "key.json").write_text(json.dumps(key))
    if isinstance(calibration, dict):  # guard: the kit's own form is read
        assert read_key(tmp_path / "key.json").calibration == frozenset({"7", "8"})
        return
    line = stage_line(lambda: read_key(tmp_path / "key.json"))
    assert "not an answer key" in line, line


# ============================================================================ pass 15a: reader study, reports, assets

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
FINDINGS = ["Effusion"]


def study_key(folder: Path) -> Path:
    """A 12-item kit (6 real, 6 clip_text) and its answer key, built with a fixed study key."""
    return built_key(folder)


# ---------------------------------------------------------------------------- the report's reader-study section


def scored_metrics(tmp_path: Path) -> dict:
    """metrics/reader_study.json as the score_reader_study stage writes it: two readers, one right, one guessing."""
    key = study_key(tmp_path / "study")
    response_file(tmp_path / "responses", key, "alice", truthful)
    response_file(tmp_path / "responses", key, "bob", guesser(3))
    metrics = score_responses(tmp_path / "responses", key)
    assert metrics["readers"] == 2
    return json.loads(json.dumps(metrics))


BOOL_EDITS = {
    "accuracy": lambda pooled: pooled["call"].update(accuracy=True, ci95=[True, True]),
    "balanced_accuracy": lambda pooled: pooled.update(balanced_accuracy=True),
    "auc": lambda pooled: pooled.update(auc=True),
    "realism": lambda pooled: pooled["realism"]["real"].update(mean=True, ci95=None),
}


@pytest.mark.parametrize("edit", sorted(BOOL_EDITS))
def test_a_reader_study_figure_of_true_is_not_reported_as_one(tmp_path, edit):
    """Sibling of the utility fix (a gap fraction of true): the reader-study section formats its numbers with
    its own ``_interval``/``_number`` (``f"{value:.2f}"``), so JSON true in metrics/reader_study.json becomes
    "1.00": a perfect accuracy, balanced accuracy, AUC or realism that no reader gave."""
    metrics = scored_metrics(tmp_path)
    BOOL_EDITS[edit](metrics["pooled"])
    write(inputs(tmp_path).reader_study, metrics)
    try:
        text = report_of(tmp_path)
    except MetricsFileError as error:  # refusing the file is as good as showing the value as text
        assert "\n" not in str(error) and "reader_study.json" in str(error)
        return
    section = text[text.index("## Expert reader study"):]
    rows = [line for line in section.splitlines()
            if line.startswith("| **All readers, pooled**") or line.startswith("| real images")]
    assert rows and all("1.00" not in row for row in rows), rows


def test_a_real_share_of_true_does_not_say_every_item_was_real(tmp_path):
    """``abs(True - 0.5) > 0.05`` and ``f"{True:.0%}"``: the report warned that 100% of the items are real."""
    metrics = scored_metrics(tmp_path)
    metrics["pooled"]["real_share"] = True
    write(inputs(tmp_path).reader_study, metrics)
    try:
        text = report_of(tmp_path)
    except MetricsFileError as error:
        assert "\n" not in str(error) and "reader_study.json" in str(error)
        return
    assert "100% of the answered items are real" not in text


# ---------------------------------------------------------------------------- the responses folder


def test_a_responses_path_that_is_a_file_is_refused_not_scored_as_no_responses(tmp_path):
    """The stage reads ``--responses reader_study/responses``; a reader's export saved there as a file (not
    into the folder) was scored as "No reader responses yet", its answers silently left out."""
    key = study_key(tmp_path / "study")
    export = response_file(tmp_path, key, "alice", truthful, name="export.json")
    responses = tmp_path / "responses"
    export.rename(responses)
    line = stage_line(lambda: score_responses(responses, key))
    assert str(responses) in line and "folder" in line, line


def test_a_fifo_at_the_responses_path_is_refused_not_scored_as_no_responses(tmp_path):
    key = study_key(tmp_path / "study")
    responses = tmp_path / "responses"
    os.mkfifo(responses)
    line = stage_line(lambda: score_responses(responses, key))
    assert str(responses) in line, line


def test_a_responses_folder_that_links_elsewhere_is_not_read(tmp_path):
    """A response file that is a link is refused ("it may point outside the folder"); the folder itself as a
    link was followed, and every export in the folder it points to was scored."""
    key = study_key(tmp_path / "study")
    elsewhere = tmp_path / "someone-elses" / "downloads"
    response_file(elsewhere, key, "alice", truthful)
    (tmp_path / "repo").mkdir()
    responses = tmp_path / "repo" / "responses"
    responses.symlink_to(elsewhere, target_is_directory=True)
    try:
        metrics = score_responses(responses, key)
    except Exception:  # a one-line refusal is what the rule asks: checked by stage_line below
        line = stage_line(lambda: score_responses(responses, key))
        assert "link" in line, line
        return
    assert metrics["readers"] == 0, "read the exports of a folder outside the responses path through a link"


# ---------------------------------------------------------------------------- doctor and the fetch record


def test_doctor_does_not_pass_a_recorded_file_replaced_by_a_link_out_of_the_asset(tmp_path, monkeypatch):
    """fetch refuses a file that links out of a hub folder ("lies outside ...; copy the file itself in") and
    never hashes it; doctor (and fetch's "already in place") compare the record by hashing whatever the name
    resolves to, so the same link, placed after the record, is read and passed as "present"."""
    root = recorded_root(tmp_path / "root")
    folder = root / "external" / "clip-vit-large-patch14"
    outside = tmp_path / "outside" / "config.json"
    outside.parent.mkdir()
    outside.write_bytes((folder / "config.json").read_bytes())  # the same bytes: the hash matches
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    from cxr_diffusion.io import sha256_file

    hashed: list[Path] = []
    monkeypatch.setattr("cxr_diffusion.assets.manifest.sha256_file",
                        lambda path: hashed.append(Path(path)) or sha256_file(path))
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert not any(path.resolve() == outside for path in hashed), "doctor read a file outside the asset folder"
    assert result.exit_code == 2 and ("lies outside" in result.output or "link" in result.output), result.output


# ============================================================================ pass 15b: latents, generate, evaluate


def tiny_vae(folder: Path) -> Path:
    """A two-level AutoencoderKL (downsampling factor 2, 4 latent channels), saved as train.vae names one."""
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """Prepared 16x16 images (16 of them), their condition store, a tiny VAE and its latent store (encode_latents)."""
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.latents import encode_latents

    root = tmp_path_factory.mktemp("p15b-latent")
    data = make_training_data(root / "data", n_images=16)
    vae = tiny_vae(root / "vae")
    params = tiny_params(train={"space": "latent", "vae": str(vae), "max_steps": 1})
    encode_latents(params, data["prepared"], root / "latents")
    return root, data, vae, params


# ---------------------------------------------------------------------------- latent stores: latent_shape


LATENT_SHAPES = {
    "missing": None,                   # KeyError 'latent_shape' (latent_data.LatentImages)
    "not_numbers": ["4", "x", "8"],    # ValueError: invalid literal for int()
    "two_sizes": [4, 64],              # ValueError: not enough values to unpack (denoiser.build_denoiser)
    "negative": [-4, -8, 8],           # RuntimeError: invalid shape dimension -4
    "not_square": [4, 2, 32],          # same 256 values a row: trained silently on 2x32 "latents"
}


@pytest.mark.parametrize("case", sorted(LATENT_SHAPES))
def test_a_latent_store_whose_latent_shape_is_damaged_is_one_line(latent_run, tmp_path, case):
    """train reads the latent store's store.json `latent_shape` unchecked (ConditionStore._read_meta checks only
    shape, dtype and images): machine.set_up_machine indexes it, LatentImages does int() on each entry and
    .view(-1, *latent_shape), denoiser unpacks three values. A missing, non-numeric, two-entry or negative
    latent_shape ends train in KeyError/ValueError/RuntimeError tracebacks; a non-square one of the row's size
    ([4, 2, 32] for 4 x 64 values) is trained on silently and saved as a sample_size-2 model. It should be refused
    on open: three whole numbers, channels x side x side equal to the store's row, naming store.json and the
    encode_latents stage."""
    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

    root, data, _, params = latent_run
    latents = Path(shutil.copytree(root / "latents", tmp_path / "latents"))
    meta = json.loads((latents / "store.json").read_text())
    if LATENT_SHAPES[case] is None:
        del meta["latent_shape"]
    else:
        meta["latent_shape"] = LATENT_SHAPES[case]
    (latents / "store.json").write_text(json.dumps(meta))
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live", latents=latents)
    line = stage_line(lambda: train_branch(params, "elixr", paths))
    assert "store.json" in line or "latent" in line, line


# ---------------------------------------------------------------------------- encode_latents: image_size


def test_encode_latents_on_images_of_another_size_than_the_params_is_one_line(latent_run, tmp_path):
    """encode_latents sizes its store from params.image_size // the VAE's factor but encodes the prepared images at
    the size their manifest records: params image_size 32 over images prepared at 16 ends in torch's 'shape
    [n, 4, 256] is invalid for input of size ...' RuntimeError traceback. The prepared manifest's image_size should
    be checked against the params (naming image_size and the prepare stage) or used."""
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.latents import encode_latents

    _, data, vae, _ = latent_run
    params = tiny_params(image_size=32, train={"space": "latent", "vae": str(vae)})
    line = stage_line(lambda: encode_latents(params, data["prepared"], tmp_path / "latents"))
    assert "image_size" in line, line


def test_encode_latents_refuses_an_image_size_the_vae_does_not_divide(tmp_path):
    """A VAE halves the side per level with floor rounding, so image_size 17 under a factor-2 VAE gives 8x8 latents
    that decode to 16x16: the last row and column of every training image are dropped without a word, the model
    generates 16x16 images, and sample writes them into shards whose manifest says image_size 17. The params (or
    encode_latents, which knows the VAE's factor) should refuse an image_size that is not a multiple of it."""
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.latents import encode_latents

    data = make_training_data(tmp_path / "data", n_images=8, image_size=17)
    vae = tiny_vae(tmp_path / "vae")
    params = tiny_params(image_size=17, train={"space": "latent", "vae": str(vae)})
    line = stage_line(lambda: encode_latents(params, data["prepared"], tmp_path / "latents"))
    assert "image_size" in line, line


# ---------------------------------------------------------------------------- generate: a .safetensors embedding


def sparse_safetensors(path: Path, shape: list[int], dtype: str = "F32", itemsize: int = 4) -> Path:
    """A one-tensor safetensors file whose header declares ``shape``; its data is a hole (a few KB on disk)."""
    size = itemsize
    for n in shape:
        size *= n
    header = json.dumps({"embedding": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + size)
    return path


@pytest.mark.parametrize("dtype, itemsize", [("F32", 4), ("I64", 8)])
def test_generate_bounds_a_safetensors_embedding_by_its_header_before_loading_it(tmp_path, dtype, itemsize):
    """The .npy sibling of passes 13/14: _read_embedding bounds an .npy by its header (MAX_EMBEDDING_VALUES, float
    dtype, bytes on disk) but hands a .safetensors straight to safetensors' load_file, which allocates what the
    header declares. A sparse file (a few KB on disk) declaring (1, 2**20, 8192) float32 (32 GiB) or int64 (64
    GiB, refused anyway once loaded) is, under a 4 GiB address-space cap, a MemoryError ('Cannot allocate memory
    (os error 12)') traceback; without the cap, tens of GiB read. It should be refused from its header
    (safetensors_header.read_safetensors_header), naming --embedding and the file."""
    path = sparse_safetensors(tmp_path / "huge.safetensors", [1, 2**20, 8192], dtype, itemsize)
    from test_hostile_pass16 import _in_capped_process

    result = _in_capped_process("from cxr_diffusion.sampling.generate import _read_embedding\n"
                                "refused(lambda: _read_embedding(Path(sys.argv[1])))", str(path))
    assert result.returncode == 2 and "LINE" in result.stdout and "huge.safetensors" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-300:]} {result.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------- evaluate: the generated set


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Prepared data (48 images), a one-epoch evaluator on it, and a second prepared set of 70 images whose test
    split holds images the first one's does not."""
    from cxr_diffusion.config import EvaluatorConfig
    from cxr_diffusion.evaluation.evaluator import train_evaluator
    from cxr_diffusion.profiles import profile_section

    root = tmp_path_factory.mktemp("p15b-evaluate")
    data = make_training_data(root / "data")
    other = make_training_data(root / "other", n_images=70)
    train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8),
                    0, root / "evaluator")
    return root, data, other


def _evaluate(root: Path, prepared: Path, samples: Path, tmp_path: Path):
    from test_inference_memory import evaluate_params

    from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch

    paths = EvaluatePaths(evaluator=root / "evaluator", prepared=prepared, samples=samples, model=tmp_path / "unused",
                          store=tmp_path / "unused", figures=tmp_path / "figures", metrics=tmp_path / "metrics.json")
    return lambda: evaluate_branch(evaluate_params(8), "elixr", paths)


def test_evaluate_on_generations_of_images_outside_the_test_split_is_one_line(evaluated, tmp_path):
    """faithfulness_metrics maps each generation to its source by `test_row[name] for name in
    generated.image_index`: a generated folder sampled from another prepared set (70 images, so another test
    split) ends evaluate in KeyError: np.str_('00000001_000.png'), a traceback. The generated set's image_index
    should be checked against the test split first (naming the samples folder and `dvc repro -f sample@<branch>`)."""
    root, data, other = evaluated
    line = stage_line(_evaluate(root, data["prepared"], other["prepared"], tmp_path))
    assert "manifest.json" in line or "sample" in line, line


@pytest.mark.parametrize("classes", [["Effusion", "Mass"], ["No Finding", "Effusion"]], ids=["renamed", "swapped"])
def test_evaluate_refuses_generations_labelled_under_other_classes(evaluated, tmp_path, classes):
    """Nothing compares the generated set's manifest classes with the prepared splits' or the evaluator's: a
    generated folder whose labels are columns of other classes (a class renamed, or the two in the other order)
    is evaluated silently, its requested labels read against the evaluator's classes column by column, so the
    faithfulness AUROCs of 'Effusion' are computed against another class's labels. It should be refused naming
    the classes of both."""
    root, data, _ = evaluated
    samples = Path(shutil.copytree(data["prepared"], tmp_path / "samples"))
    manifest = json.loads((samples / "manifest.json").read_text())
    (samples / "manifest.json").write_text(json.dumps({**manifest, "classes": classes}))
    line = stage_line(_evaluate(root, data["prepared"], samples, tmp_path))
    assert "classes" in line, line


# ---------------------------------------------------------------------------- reader ids: the page and scoring agree


@pytest.mark.parametrize("mark", ["\u034f", "\u0903", "\u20dd"], ids=["grapheme_joiner", "spacing_mark", "enclosing"])
def test_a_reader_id_the_study_page_accepts_is_not_refused_by_scoring(mark):
    """The page checks an id after dropping every mark (`\\p{M}`); scoring dropped only marks with a combining
    class, so `Jo<U+034F>se` (a combining grapheme joiner, class 0) passed the page and was refused as
    `bad_reader_id` once the reader had answered every item. Both now drop the same marks, and the id is the
    same reader as `Jose`."""
    from cxr_diffusion.reader_study.responses import reader_id_problem, same_reader

    reader = f"Jo{mark}se"
    assert reader_id_problem(reader) is None, reader_id_problem(reader)
    assert same_reader(reader) == same_reader("Jose")
