"""Pass 19 (stages after prepare): siblings of earlier guards and mismatches between what one stage writes and what
the next one assumes. Each test builds its bad input in ``tmp_path`` and asserts the behaviour the project's rule
asks for (one line naming the file, row or key; nothing silently accepted). Each failed on the code it was filed on.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_training_data, stage_line
from test_hostile_pass17 import evaluate_run  # noqa: F401  (a module-scoped fixture)

CLASSES = ["Effusion", "No Finding"]


# ---------------------------------------------------------------------------- embed_clip_text: a repeated image


def test_embed_clip_text_names_the_row_of_an_image_listed_twice_in_the_filtered_table(tmp_path, tiny_clip_dir):
    """embed_elixr reads filtered.csv through `_read_filtered_names`, which refuses an image listed twice naming the
    file and both rows; its sibling embed_clip_text (read_filtered_table) never looks, and the store writer finally
    stops the stage with `stage embed_clip_text failed: duplicate Image Index in a condition store`: no file, no row,
    no image, nothing to do. It should name filtered.csv and the rows (as embed_elixr and prepare do)."""
    from cxr_diffusion.conditioning.embed import embed_clip_text
    from cxr_diffusion.profiles import params_with

    data = make_training_data(tmp_path / "data", n_images=8)
    filtered = tmp_path / "data" / "filtered" / "filtered.csv"
    lines = filtered.read_text().splitlines()
    filtered.write_text("\n".join([*lines, lines[1]]) + "\n")  # the first image again, on the last line
    clip = params_with({"clip": {"model": str(tiny_clip_dir)}}).clip
    line = stage_line(lambda: embed_clip_text(filtered, clip, tmp_path / "demo", tmp_path / "store"))
    assert "filtered.csv" in line and lines[1].split(",")[0] in line, line
    assert not (tmp_path / "store").exists()
    assert data  # the prepared data are not read


# ---------------------------------------------------------------------------- train: a checkpoint of other data


def test_train_does_not_resume_a_finished_checkpoint_trained_on_other_data(tmp_path, fresh_accelerate_state):
    """The run hash a checkpoint must match (trainer.py: maths_settings + precision + world + the store's `encoder`
    *string* + condition shape + latents meta) says nothing about the data trained on. After a finished run the
    last checkpoint sits at `max_steps`; change the data (a new filter, another dataset, the in-pipeline CLIP
    retrained: its store's encoder is still the path `models/clip`) and `dvc repro` reruns train@<branch>, which
    resumes that checkpoint (`resuming from .../step-00000002 (step 2)`), trains 0 steps on the new data
    (0.0 s) and saves the old run's weights as the new model, silently. dvc.yaml says a stale checkpoint 'only
    means a fresh start'. A checkpoint written on other prepared data or another store should not be resumed."""
    from accelerate.state import AcceleratorState
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

    first = make_training_data(tmp_path / "first", n_images=24)
    other = make_training_data(tmp_path / "other", n_images=40)  # other films, other conditions
    params = tiny_params(train={"max_steps": 2, "checkpoint_every_steps": 1, "val_every_steps": 2,
                                "sample_every_steps": 2})

    def train(data: dict, out: str) -> tuple[dict, str]:
        AcceleratorState._reset_state(reset_partial_state=True)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = train_branch(params, "elixr", TrainPaths(data["prepared"], data["store"], None, tmp_path / out,
                                                              tmp_path / "checkpoints", tmp_path / "live"))
        return result, printed.getvalue()

    train(first, "model_first")
    result, printed = train(other, "model_other")
    assert "resuming from" not in printed, [line for line in printed.splitlines() if "resum" in line]
    unet = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(tmp_path / "model_first" / unet), load_file(tmp_path / "model_other" / unet)
    assert any(not before[key].equal(after[key]) for key in before), "the other data's model is the first one's"


# ---------------------------------------------------------------------------- generations at another image size


@pytest.fixture(scope="module")
def samples_at_32(tmp_path_factory) -> Path:
    """The same 48 films prepared at 32 px (so the same test split and names), labelled as elixr's generations: what
    data/samples/elixr holds after a run at image_size 32, beside data/prepared re-prepared at 16."""
    root = tmp_path_factory.mktemp("p19-samples32")
    data = make_training_data(root / "data", image_size=32)
    manifest = json.loads((data["prepared"] / "manifest.json").read_text())
    manifest["generated"] = {"branch": "elixr", "model": "models/elixr", "sampler": "dpmpp_2m", "steps": 2,
                             "guidance_scale": 3.0, "seed": 0, "count": 200}
    (data["prepared"] / "manifest.json").write_text(json.dumps(manifest))
    return data["prepared"]


def test_evaluate_refuses_generations_of_another_image_size(evaluate_run, samples_at_32, tmp_path):  # noqa: F811
    """Pass 15-17 made evaluate refuse generations of another branch, under other classes or named after no test
    image, and check the prepared manifest against params.image_size; nothing compares the *samples'* manifest
    `image_size` with the prepared one. Generations at 32 px (a sample stage run before image_size went to 16)
    are embedded by the evaluator without complaint (it pools over any size) and the stage ends in a traceback
    deep in the pixel memorization (`ValueError: feature dimension mismatch: queries have d=1024, reference has
    d=256`), after every embedding was computed. It should be one line, before anything is embedded, naming the
    samples' manifest.json and both sizes."""
    from test_inference_memory import evaluate_params

    from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
    from cxr_diffusion.profiles import params_with

    root, data, _, _ = evaluate_run
    params = params_with({"image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
                          "evaluate": evaluate_params(8).evaluate.model_dump()})
    paths = EvaluatePaths(evaluator=root / "evaluator", prepared=data["prepared"], samples=samples_at_32,
                          model=tmp_path / "unused", store=tmp_path / "unused", figures=tmp_path / "figures",
                          metrics=tmp_path / "metrics.json")
    line = stage_line(lambda: evaluate_branch(params, "elixr", paths))
    assert "32" in line and "16" in line, line
    assert not (tmp_path / "metrics.json").exists()


def test_the_reader_study_refuses_generations_of_another_image_size(evaluate_run, samples_at_32, tmp_path):  # noqa: F811
    """The reader kit scales every image to `display_size` with nearest neighbour: a 16 px real film becomes blocks
    of display_size/16 pixels, a 32 px generation blocks half as wide. select_items compares the generations'
    classes and names with the test split, never their image_size, so generations of another size are put in
    the 'blinded' kit silently, and a reader tells real from generated by the block size alone (the kit's whole
    point is that nothing but the content differs). It should be one line naming the samples' manifest.json."""

    _, data, _, _ = evaluate_run
    samples = tmp_path / "samples"
    shutil.copytree(samples_at_32, samples / "elixr")
    from test_hostile_pass17 import kit_refusal

    line = kit_refusal(data["prepared"], samples, tmp_path, display_size=64)
    assert "manifest.json" in line and "32" in line, line
    assert not (tmp_path / "key.json").exists()


# ---------------------------------------------------------------------------- train in latent space: latents of other data


def test_latent_training_refuses_latents_that_lack_images_of_the_prepared_data(tmp_path, fresh_accelerate_state):
    """encode_latents encodes every prepared image, so a latent store without some of them was encoded from other
    prepared data (the dataset re-filtered or re-rendered, encode_latents not rerun). Pass 15/17 compare the
    latents' shape and VAE with train.vae; nothing compares their images with the prepared split:
    LatentImages keeps only the images that have a latent and counts the rest as `missing_condition`, so a run on
    40 prepared films with the latents of 24 trains on those 24 silently (the summary blames missing conditions).
    It should be one line naming the latent store and `dvc repro -f encode_latents`."""
    from test_hostile_pass15 import tiny_vae
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.latents import encode_latents
    from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

    encoded = make_training_data(tmp_path / "encoded", n_images=24)
    data = make_training_data(tmp_path / "data", n_images=40)
    vae = tiny_vae(tmp_path / "vae")
    latent = {"space": "latent", "vae": str(vae)}
    encode_latents(tiny_params(train=latent), encoded["prepared"], tmp_path / "latents")
    params = tiny_params(train={**latent, "max_steps": 1, "val_every_steps": 1, "sample_every_steps": 1,
                                "checkpoint_every_steps": None})
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live", latents=tmp_path / "latents")
    line = stage_line(lambda: train_branch(params, "elixr", paths))
    assert "latents" in line and "encode_latents" in line, line
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------- compare: the sampler the report names


def test_the_report_does_not_name_sampler_settings_the_sample_metrics_contradict(tmp_path):
    """sample@<branch> records the settings it sampled with in metrics/sample/<branch>.json (`sampler`, `steps`,
    `guidance_scale`), and compare reads that file (images per second), but the report's header line
    `Sampler: dpm++, 20 steps, guidance 3.0, ...` is printed from params.yaml: samples made with 40 steps are
    reported as made with the params' steps, silently (compare refuses another branch's file, pass 17, not
    another sampler's). The disagreement is one line naming the file and the key, before anything is written."""
    from test_hostile_reports import inputs, write

    from cxr_diffusion.evaluation.report import compare
    from cxr_diffusion.profiles import params_with

    params = params_with({"branches": ["elixr"]})
    steps = params.sample.steps * 2
    write(inputs(tmp_path).sampling / "elixr.json", {
        "branch": "elixr", "images": 2, "sampler": params.sample.sampler, "steps": steps,
        "guidance_scale": params.sample.guidance_scale, "images_per_second": 1.0})
    line = stage_line(lambda: compare(params, inputs(tmp_path), tmp_path / "summary.json", tmp_path / "report.md"))
    assert "elixr.json: sampled with steps 40, but sample.steps is 20" in line and "dvc repro" in line, line
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "summary.json").exists()
