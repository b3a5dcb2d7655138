"""Hostile inputs, pass 16: two fresh passes over pass 15's fixes. 16a looked for their siblings: the same kind of
value read elsewhere without the check (the evaluator's own config and weights, the Inception weights, pixel-space
training's image_size, the sample stage's manifest, the condition store's branch in train and sample, the
reader-study kit's generations, the metrics files compare reads). 16b looked where no pass had been (the stand-in
NIH folder, a one-image evaluation, the real arm's scores, the phantom's lung masks, a pretrained CLIP's token
limit). Each case builds its input and runs the real entry point or the library function a stage calls, asserting
the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never a silent
acceptance, or an allocation a small file declares.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_training_data, stage_line
from cxr_diffusion.cli import app
from test_fetch import write_params
from test_hostile_pass15 import _evaluate, evaluated  # noqa: F401  (evaluated: a module-scoped fixture)
from test_hostile_reports import inputs, report_of, write

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["Effusion", "No Finding"]
runner = CliRunner()


def _in_capped_process(code: str, *args: str, cap_gib: int = 4) -> subprocess.CompletedProcess:
    """``code`` run in a fresh interpreter whose address space is capped (an allocation a header declares fails
    fast instead of swapping); it prints ``LINE <user-error line>`` and exits 2 on a user error."""
    prologue = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap_gib} << 30, {cap_gib} << 30))\n"
                "from pathlib import Path\nfrom cxr_diffusion.errors import user_error_line\n"
                "def refused(call):\n    try:\n        call()\n    except Exception as error:\n"
                "        line = user_error_line(error)\n        if line is None: raise\n"
                "        print('LINE', line); sys.exit(2)\n    print('ACCEPTED')\n")
    return subprocess.run([sys.executable, "-c", prologue + code, *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def _sparse_safetensors(path: Path, tensors: dict[str, list[int]]) -> Path:
    """A float32 safetensors file whose header declares ``tensors``; its data is a hole (a few KB on disk)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for n in shape:
            size *= n
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)
    return path


# ---------------------------------------------------------------------------- the evaluator's config and weights


@pytest.mark.parametrize("key, value", [("width", 100_000), ("feature_dim", 10**12), ("width", 5), ("feature_dim", 9)],
                         ids=["width_huge", "feature_dim_huge", "width_other", "feature_dim_other"])
def test_an_evaluator_config_is_checked_against_bounds_and_its_weights_before_the_network_is_built(tmp_path, key,
                                                                                                     value):
    """read_classifier_spec checks that width and feature_dim are whole numbers >= 1 and nothing more, and
    load_classifier builds CXRClassifier(spec) before comparing it with model.safetensors: `width: 100000` in
    models/evaluator/config.json asks for 360 GB ('DefaultCPUAllocator: can't allocate memory: you tried to allocate
    360000000000 bytes', a RuntimeError traceback; `feature_dim: 10**12`, 64 TB), and a config edited to width 5
    over width-4 weights ends evaluate in load_state_dict's 'size mismatch for body.0.0.weight' traceback. The sizes
    should be bounded (as the UNet's are, model_limits) and the weights' header checked against the config's
    shapes, naming config.json and `dvc repro -f evaluator`."""
    from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, save_classifier

    folder = tmp_path / "evaluator"
    save_classifier(CXRClassifier(ClassifierSpec(tuple(CLASSES), 4, 8, 16)), folder, {})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    result = _in_capped_process("from cxr_diffusion.evaluation.evaluator import load_classifier\n"
                                "refused(lambda: load_classifier(Path(sys.argv[1])))", str(folder))
    assert result.returncode == 2 and "LINE" in result.stdout and "evaluator" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-300:]} {result.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------- Inception weights: header first


@pytest.mark.parametrize("reader", ["convert_weights", "evaluate_inception_weights"])
def test_inception_weights_are_bounded_by_their_header_before_they_are_loaded(tmp_path, reader):
    """The sibling of pass 15's generate fix: convert-weights (`_read_checkpoint`) and evaluate's Inception weights
    (`weights.load_safetensors_into`) hand a .safetensors file straight to safetensors' load_file, which allocates
    what the header declares. A sparse download of a few KB declaring one 32 GiB tensor is, under a 4 GiB
    address-space cap, `MemoryError: Cannot allocate memory (os error 12)`: convert-weights exits 1 with a traceback
    and evaluate dies the same way (without the cap, 32 GiB read). The header should be checked first
    (safetensors_header.read_safetensors_header: its names and shapes against the network's), naming the file."""
    path = _sparse_safetensors(tmp_path / "pt_inception.safetensors", {"Conv2d_1a_3x3.conv.weight": [1000, 2**23]})
    if reader == "convert_weights":
        code = ("from typer.testing import CliRunner\nfrom cxr_diffusion.cli import app\n"
                "result = CliRunner().invoke(app, ['convert-weights', sys.argv[1], sys.argv[2], '--flavour', 'fid'])\n"
                "print('EXIT', result.exit_code, result.output.strip()[-300:], repr(result.exception)[:200])\n"
                "sys.exit(result.exit_code)")
        result = _in_capped_process(code, str(path), str(tmp_path / "out.safetensors"))
        assert result.returncode == 2 and "error:" in result.stdout and "pt_inception" in result.stdout, (
            f"exit {result.returncode}: {result.stdout[-400:]} {result.stderr.strip().splitlines()[-1:]}")
        return
    code = ("import torch\nfrom cxr_diffusion.evaluation.inception import InceptionSpec, load_inception\n"
            "refused(lambda: load_inception(sys.argv[1], InceptionSpec('fid', 'pool'), torch.device('cpu')))")
    result = _in_capped_process(code, str(path))
    assert result.returncode == 2 and "LINE" in result.stdout and "pt_inception" in result.stdout, (
        f"exit {result.returncode}: {result.stdout[-300:]} {result.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------- train and sample: data of another run


def saved_untrained_model(store: Path, folder: Path) -> Path:
    """A two-level elixr model built on ``store`` and saved as train saves one (untrained: what is tested reads its
    architecture or samples it)."""
    from test_inference_memory import sample_params

    from cxr_diffusion.conditioning.store import ConditionStore
    from cxr_diffusion.diffusion.denoiser import build_denoiser
    from cxr_diffusion.diffusion.noise import sampling_scheduler, training_scheduler
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    params = sample_params(2)
    torch.manual_seed(0)
    model = build_denoiser(params, ConditionStore(store))
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(training_scheduler(params.train)),
                                    condition_adapter=model.adapter, branch="elixr", channels=params.channels)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """16 prepared 16x16 images and their (elixr) condition store, and an untrained elixr model saved on them."""
    root = tmp_path_factory.mktemp("p16a-run")
    data = make_training_data(root / "data", n_images=16)
    saved_untrained_model(data["store"], root / "model")
    return root, data


def _train_params(**overrides):
    from test_trainer import tiny_params

    return tiny_params(train={"max_steps": 1, "val_every_steps": 1, "sample_every_steps": 1,
                              "checkpoint_every_steps": None}, **overrides)


def _sample_params(**overrides):
    from cxr_diffusion.profiles import params_with

    return params_with({
        "image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
        "train": {"unet": {"block_out_channels": [8, 16], "cross_attention": [False, True], "norm_num_groups": 4,
                           "attention_head_dim": 2}},
        "sample": {"count": 2, "steps": 2, "batch_size": 2, "per_finding": 0}, **overrides})


def test_pixel_space_training_refuses_an_image_size_the_prepared_images_do_not_have(small_run, tmp_path):
    """Pass 15 made encode_latents check params.image_size against the prepared manifest; in pixel space nothing
    does: params image_size 32 over images prepared at 16 trains silently (the UNet is convolutional) and saves
    unet/config.json with sample_size 32, so sample and generate draw 32x32 images from a model that only ever saw
    16x16 ones (and sample then writes them under a manifest the evaluate stage reads as 32 px). It should be one
    line naming image_size and the prepare stage, before the first step."""
    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

    _, data = small_run
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live")
    line = stage_line(lambda: train_branch(_train_params(image_size=32), "elixr", paths))
    assert "image_size" in line, line


def _store_of_branch(source: Path, folder: Path, branch: str) -> Path:
    store = Path(shutil.copytree(source, folder))
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps({**meta, "branch": branch}))
    return store


@pytest.mark.parametrize("stage", ["train", "sample"])
def test_train_and_sample_refuse_a_condition_store_of_another_branch(small_run, tmp_path, stage):
    """utility@<branch> refuses a store whose store.json names another branch ("holds 'clip_vision' conditions,
    not elixr's"); train and sample read store.json and never look: `train@elixr --store
    data/embeddings/clip_vision` trains and saves an 'elixr' model on CLIP vision embeddings, and sample@elixr draws
    the elixr model's generations from them, both silently, whenever the two stores have the same token shape.
    Both should refuse it as utility does, naming the store and data/embeddings/<branch>."""
    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch
    from cxr_diffusion.sampling.sample import sample_branch

    root, data = small_run
    store = _store_of_branch(data["store"], tmp_path / "store", "clip_vision")
    if stage == "train":
        paths = TrainPaths(data["prepared"], store, None, tmp_path / "model", tmp_path / "checkpoints",
                           tmp_path / "live")
        call = lambda: train_branch(_train_params(), "elixr", paths)  # noqa: E731
    else:
        call = lambda: sample_branch(_sample_params(), "elixr", root / "model", data["prepared"], store,  # noqa: E731
                                     tmp_path / "samples", tmp_path / "figures")
    line = stage_line(call)
    assert "clip_vision" in line or "branch" in line, line


SAMPLE_PARAMS = {
    "classes_swapped": {"filter": {"classes": CLASSES[::-1], "merges": {}}},
    "class_renamed": {"filter": {"classes": ["Mass", "No Finding"], "merges": {}}},
    "image_size": {"image_size": 32},
}


@pytest.mark.parametrize("case", sorted(SAMPLE_PARAMS))
def test_sample_does_not_write_a_manifest_its_images_and_labels_contradict(small_run, tmp_path, case):
    """sample_branch labels each generation with its prepared test image's label columns (the prepared manifest's
    classes) but writes `classes: params.filter.classes` and `image_size: params.image_size` into the generated
    manifest, checking neither: with the classes swapped or renamed in params, the Effusion column is published as
    'No Finding' (or 'Mass'), silently; with image_size 32 over a 16 px model and prepared set, 16x16 images are
    written under `image_size: 32`, and every reader then refuses the shards with 'too_small: 16x16 is below
    prepare.min_side 32; rebuild it with `dvc repro -f sample@elixr`', which rebuilds the same thing. The prepared
    manifest's classes and image_size (and the model's output side) should be checked against the params first,
    naming the key and the prepare stage."""
    from cxr_diffusion.sampling.sample import sample_branch

    root, data = small_run
    params = _sample_params(**SAMPLE_PARAMS[case])
    line = stage_line(lambda: sample_branch(params, "elixr", root / "model", data["prepared"], data["store"],
                                            tmp_path / "samples", tmp_path / "figures"))
    assert ("classes" if "class" in case else "image_size") in line, line


# ---------------------------------------------------------------------------- the reader-study kit's generations


def test_the_reader_study_refuses_generations_of_images_outside_the_test_split(evaluated):  # noqa: F811 (the fixture)
    """Sibling of pass 15's evaluate fix: select_items checks a branch's generated classes against the real
    ones but never its image_index against the test split, so samples drawn from another prepared set (another
    split: 7 of 7 origins, e.g. 00000001_000.png, are not test images here, some are train images) are put in
    the kit silently, and the answer key records origins the study's real images do not come from (the
    one-origin-per-study rule is then checked against the wrong ids). It should be one line naming the branch
    and `dvc repro -f sample@<branch>`."""
    from cxr_diffusion.data.shards import PreparedImages
    from cxr_diffusion.reader_study.items import select_items

    _, data, other = evaluated
    real = PreparedImages(data["prepared"], "test", channels=1)
    generated = PreparedImages(other["prepared"], "test", channels=1)
    assert set(generated.image_indices) - set(real.image_indices)  # the premise: other origins
    line = stage_line(lambda: select_items(real, {"elixr": generated}, 6, None, 0))
    assert "elixr" in line and "test" in line, line


# ---------------------------------------------------------------------------- evaluate: the generations' branch


def test_evaluate_refuses_generations_of_another_branch(evaluated, tmp_path):  # noqa: F811 (the fixture)
    """The generated manifest records `generated.branch` (sample writes it, and rebuild_hint reads it); evaluate
    never compares it with the branch it evaluates, so `evaluate --branch elixr --samples data/samples/clip_text`
    writes clip_text's closeness, faithfulness and memorization as elixr's metrics, silently. It should be one line
    naming the samples' manifest and both branches."""
    root, data, _ = evaluated
    samples = Path(shutil.copytree(data["prepared"], tmp_path / "samples"))
    manifest = json.loads((samples / "manifest.json").read_text())
    generated = {"branch": "clip_text", "model": "models/clip_text", "sampler": "dpmpp_2m", "steps": 2,
                 "guidance_scale": 3.0, "seed": 0}
    (samples / "manifest.json").write_text(json.dumps({**manifest, "generated": generated}))
    line = stage_line(_evaluate(root, data["prepared"], samples, tmp_path))
    assert "clip_text" in line, line


# ---------------------------------------------------------------------------- compare: a metrics path that is no file


@pytest.mark.parametrize("kind", ["fifo", "dangling_link", "folder"])
def test_a_metrics_file_that_is_not_a_regular_file_is_not_reported_as_not_computed(tmp_path, kind):
    """compare's `_read` returns {} ("before its stage ran") whenever `path.is_file()` is false, so a FIFO, a
    folder or a dangling link at metrics/evaluate/elixr.json gives a report whose every elixr row says n/a, as if
    the branch were never evaluated: silently (the DVCLive reader refuses the same dangling link, pass 12, and
    read_json refuses a FIFO, but _read never calls it). It should be one line naming the file."""
    path = inputs(tmp_path).evaluations / "elixr.json"
    write(path, {"closeness": {"kid": 0.5}})
    assert "| KID | 0.5000 |" in report_of(tmp_path)  # guard: the file itself is read
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling_link":
        path.symlink_to(tmp_path / "lost-from-the-cache.json")
    else:
        path.mkdir()
    line = stage_line(lambda: report_of(tmp_path))
    assert "elixr.json" in line, line


# ============================================================================ pass 16b: where no pass had been


# ---------------------------------------------------------------------------- standins: the NIH folder's include list


@pytest.mark.parametrize("content, named", [
    ("Image Idx,Effusion\n00000001_000.png,1\n", "Image Index"),
    ("Image Index,Infiltration,No Finding,Effusion,Nodule/Mass,Atelectasis,Patient ID\n"
     "00000001_000.png,0,0,1,0,0,3\n", "Patient ID"),
])
def test_standins_with_an_include_list_the_filter_refuses_is_one_line(tmp_path, content, named):
    """`standins` builds the stand-in NIH folder from `filter.include_list` read by a bare `pd.read_csv`, not the
    filter's `read_include_list`: a list without an `Image Index` column, or with a column the metadata also has,
    ended in `KeyError: 'Image Index'` / `KeyError: 'Patient ID'` and a traceback."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "inc.csv").write_text(content)
    write_params(tmp_path, {"dataset.nih_root": "nih", "filter.include_list": "reference/inc.csv"})
    result = runner.invoke(app, ["standins", "--root", str(tmp_path), "--images", "3"])
    assert result.exit_code == 2, (result.exit_code, repr(result.exception), result.output[-400:])
    assert "inc.csv" in result.output and named in result.output, result.output
    assert not (tmp_path / "nih").exists()


# ---------------------------------------------------------------------------- evaluate: a generated set of one image


def test_evaluate_on_a_single_generated_image_is_one_line(tmp_path):
    """`sample.count: 1` is a valid param (ge=1), and a filter that leaves one test image gives the same: evaluate
    then ended in `ValueError: features_a: needs at least 2 rows, got 1; pass more images` from
    `distances.as_feature_matrix` (frechet_distance in closeness_metrics), a traceback. It should be one line
    naming the generated set's size and `sample.count` (or the test split)."""
    from conftest import make_training_data, stage_line
    from cxr_diffusion.config import EvaluatorConfig
    from cxr_diffusion.data.shards import PreparedImages
    from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
    from cxr_diffusion.evaluation.evaluator import train_evaluator
    from cxr_diffusion.profiles import profile_section
    from test_inference_memory import evaluate_params

    data = make_training_data(tmp_path / "data", n_images=12)
    assert len(PreparedImages(data["prepared"], "test")) == 1  # the generated set below: the test split itself
    train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8),
                    0, tmp_path / "evaluator")
    paths = EvaluatePaths(evaluator=tmp_path / "evaluator", prepared=data["prepared"], samples=data["prepared"],
                          model=tmp_path / "unused", store=tmp_path / "unused", figures=tmp_path / "figures",
                          metrics=tmp_path / "metrics.json")
    line = stage_line(lambda: evaluate_branch(evaluate_params(8), "elixr", paths))
    assert "sample.count" in line or "test split" in line, line


# ---------------------------------------------------------------------------- utility: the real arm's scores file


@pytest.mark.parametrize("column, values", [
    ("arm", [["real"]] * 3),
    ("arm", [{"name": "real"}] * 3),
], ids=["list", "struct"])
def test_a_scores_file_whose_arm_column_is_not_text_is_one_line(tmp_path, column, values):
    """`read_real_arm` checks the first two column names but not their types, then builds
    `set(table.column('arm').to_pylist())`: an `arm` column of lists or structs (a hand-edited or foreign Parquet
    file) ended `utility@<branch>` in `TypeError: unhashable type: 'list'` / `'dict'`, a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import stage_line
    from cxr_diffusion.utility.real_arm import SCORES, read_real_arm
    from test_hostile_utility import CLASSES, TEST, real_arm

    folder = real_arm(tmp_path / "real", np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), folder / SCORES)
    line = stage_line(lambda: read_real_arm(folder, CLASSES, TEST, 1))
    assert SCORES in line and "arm" in line, line


# ---------------------------------------------------------------------------- phantom: torchxrayvision's lung masks


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit gray pixels and holds 100 bytes of them."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


@pytest.fixture
def xrv_data(tmp_path, monkeypatch):
    from cxr_diffusion.data.phantom import assets

    monkeypatch.setattr(assets, "torchxrayvision_data_dir", lambda: tmp_path)
    assets.load_lung_mask_set.cache_clear()
    yield tmp_path
    assets.load_lung_mask_set.cache_clear()


def test_a_lung_mask_declaring_1600_million_pixels_is_counted_unreadable_not_a_traceback(xrv_data):
    """`_decode_mask` catches UnidentifiedImageError, OSError, ValueError, ...; a 200-byte PNG declaring
    40000 x 40000 pixels makes `Image.open` raise PIL's `DecompressionBombError` (an Exception only; over twice
    `decode.py`'s raised MAX_IMAGE_PIXELS, so importing it does not help), so the
    phantom `dataset` stage ended in a traceback instead of counting the entry unreadable (and, with no other
    mask, the one-line 'reinstall torchxrayvision')."""
    import zipfile

    from conftest import stage_line
    from cxr_diffusion.data.phantom.assets import LUNG_MASKS_FILE, load_lung_masks

    with zipfile.ZipFile(xrv_data / LUNG_MASKS_FILE, "w") as archive:
        archive.writestr("a.png", _png_header(40_000, 40_000))
    line = stage_line(lambda: load_lung_masks(32))
    assert "1 unreadable" in line and "reinstall" in line, line


def test_a_lung_mask_entry_inflating_to_hundreds_of_megabytes_is_skipped_before_it_is_read(xrv_data):
    """`load_lung_mask_set` reads every zip entry whole (`archive.read(name)`) before PIL sees its header: an entry
    of 256 MB of zeros, 250 KB in the zip, is inflated into memory (a lung mask PNG is tens of KB). The declared
    `file_size` in the zip's directory should bound what is read."""
    import tracemalloc
    import zipfile

    from cxr_diffusion.data.phantom.assets import LUNG_MASKS_FILE, load_lung_masks
    from cxr_diffusion.errors import UserError

    with zipfile.ZipFile(xrv_data / LUNG_MASKS_FILE, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", bytes(256 << 20))
    assert (xrv_data / LUNG_MASKS_FILE).stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="no usable lung mask"):
            load_lung_masks(32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak >> 20} MiB while reading a {LUNG_MASKS_FILE} of < 1 MiB"


# ---------------------------------------------------------------------------- embed_clip_text: prompts cut to one


def test_a_pretrained_clip_that_cuts_two_prompts_to_the_same_tokens_is_refused(tmp_path, tiny_clip_dir):
    """For the demo CLIP, `check_prompts_stay_distinct` refuses a `clip.demo.max_length` that cuts two prompts to
    the same tokens; for a pretrained CLIP (`clip.model` a folder or hub id: 77 tokens for CLIP-L) nothing does.
    A long `clip.prompt_template` and `clip.normal_prompt` that share their first tokens are embedded silently:
    `embed_clip_text` writes one condition for Effusion and No Finding alike (a 16-token CLIP: `unique_prompts: 2,
    truncated_prompts: 2`, and the store's two rows differ by 0.0; only `truncated_prompts` counts them),
    and the clip_text branch trains on a condition that carries no finding. It should be refused naming
    `clip.prompt_template` / `clip.normal_prompt` and the encoder's token limit."""
    from conftest import make_training_data, stage_line
    from cxr_diffusion.conditioning.embed import embed_clip_text
    from cxr_diffusion.profiles import params_with

    make_training_data(tmp_path / "data", n_images=12)
    prefix = "chest x-ray of an adult patient taken in the posterior anterior view at a large teaching hospital"
    clip = params_with({"clip": {"model": str(tiny_clip_dir), "prompt_template": prefix + " showing {findings}",
                                 "normal_prompt": prefix + " with no findings"}}).clip
    line = stage_line(lambda: embed_clip_text(tmp_path / "data" / "filtered" / "filtered.csv", clip, tmp_path / "demo",
                                              tmp_path / "store"))
    assert "prompt" in line, line
    assert not (tmp_path / "store").exists()
