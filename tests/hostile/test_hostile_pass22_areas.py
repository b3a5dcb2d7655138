"""Pass 22, areas: the sample stage, the evaluate stage and its metric modules, the stage entry points.

Each test builds its bad input in tmp_path and asserts the behaviour the project's rule asks for; each failed on
the code at the time of filing (see REPORT_areas.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import stage_line
from test_hostile_pass17 import CLASSES, evaluate_run  # noqa: F401 (the fixture)


def _evaluate_params(**evaluate):
    from test_inference_memory import evaluate_params

    from cxr_diffusion.profiles import params_with

    params = evaluate_params(8)
    return params_with({"image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
                        "sample": {"steps": 2, "batch_size": 2},
                        "evaluate": {**params.evaluate.model_dump(), **evaluate}})


def _paths(root, data, samples, tmp_path, **changes):
    from cxr_diffusion.evaluation.evaluate import EvaluatePaths

    paths = dict(evaluator=root / "evaluator", prepared=data["prepared"], samples=samples, model=root / "model",
                 store=data["store"], figures=tmp_path / "figures", metrics=tmp_path / "metrics.json")
    return EvaluatePaths(**{**paths, **changes})


def test_an_evaluator_whose_weights_hold_a_nan_is_one_line_not_a_traceback(evaluate_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from cxr_diffusion.evaluation.evaluate import evaluate_branch

    root, data, samples, _ = evaluate_run
    evaluator = Path(shutil.copytree(root / "evaluator", tmp_path / "evaluator"))
    weights = load_file(evaluator / "model.safetensors")
    first = sorted(name for name, tensor in weights.items() if tensor.is_floating_point() and tensor.ndim > 1)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, evaluator / "model.safetensors")
    line = stage_line(lambda: evaluate_branch(_evaluate_params(), "elixr",
                                              _paths(root, data, samples, tmp_path, evaluator=evaluator)))
    assert "evaluator" in line and ("finite" in line.lower() or "nan" in line.lower()), line
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------- sample: a failure after the samples are swapped


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """16 prepared 16x16 images, their elixr store, an untrained elixr model, and one good sample run (seed 0)."""
    from conftest import make_training_data
    from test_hostile_pass16 import _sample_params, saved_untrained_model

    from cxr_diffusion.sampling.sample import sample_branch

    root = tmp_path_factory.mktemp("p22-sample")
    data = make_training_data(root / "data", n_images=16)
    saved_untrained_model(data["store"], root / "model")
    sample_branch(_sample_params(), "elixr", root / "model", data["prepared"], data["store"], root / "samples",
                  root / "figures", root / "metrics.json")
    return root, data


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sample_that_fails_writing_its_figures_keeps_the_previous_samples(sampled, tmp_path, monkeypatch):
    """sample_branch swaps the generations into --out (atomic_directory) and only then draws and writes the figures
    and the metrics: a full disk (or any refusal) while the figures are written ends the stage in one line with
    exit 2, but data/samples/<branch> already holds the new run's images (here seed 1) beside the previous run's
    figures and metrics/sample file (seed 0). The rule (reliability.md, 'Stores, shards and writes'): one line,
    the old output unchanged; pass 17 made `filter` swap its outputs whole for the same reason."""
    import errno

    from test_hostile_pass16 import _sample_params

    import cxr_diffusion.sampling.sample as sample_module
    from cxr_diffusion.profiles import params_with

    root, data = sampled
    samples = Path(shutil.copytree(root / "samples", tmp_path / "samples"))
    figures = Path(shutil.copytree(root / "figures", tmp_path / "figures"))
    shutil.copy(root / "metrics.json", tmp_path / "metrics.json")
    before = _snapshot(samples)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample_module, "originals_vs_generated", full_disk)
    params = params_with({**_sample_params().model_dump(), "seed": 1})
    line = stage_line(lambda: sample_module.sample_branch(params, "elixr", root / "model", data["prepared"],
                                                          data["store"], samples, figures, tmp_path / "metrics.json"))
    assert "space" in line.lower(), line
    assert _snapshot(samples) == before, "the failed run replaced the previous samples"


def test_sample_records_or_refuses_test_images_its_store_has_no_condition_for(sampled, tmp_path):
    """ConditionedImages skips the test images the condition store holds no condition for and counts them in
    `missing_condition`; the trainer records that count in its metrics, sample_branch never reads it. With a store
    lacking one of the two test images (another prepared set's store, ELIXR's all-zero rows), sample generates for
    the other one and writes a manifest saying `images_in: 1, written: 1, rejected: 0` and metrics saying
    `images: 1`: the test image left out is recorded nowhere, and evaluate then scores the remaining generations
    as the branch's test set. It should be refused in one line naming the image, or recorded (the manifest's
    `rejected` / `rejected_by_reason`, as prepare counts what it leaves out, so the counts reconcile)."""
    from test_hostile_pass16 import _sample_params

    from cxr_diffusion.data.shards import PreparedImages
    from cxr_diffusion.sampling.sample import sample_branch

    root, data = sampled
    left_out = PreparedImages(data["prepared"], "test").image_indices[0]
    store_without(data["store"], left_out, tmp_path / "store")
    samples = tmp_path / "samples"
    try:
        sample_branch(_sample_params(), "elixr", root / "model", data["prepared"], tmp_path / "store", samples,
                      tmp_path / "figures", tmp_path / "metrics.json")
    except Exception:  # a refusal must be one line naming the image
        line = stage_line(lambda: sample_branch(_sample_params(), "elixr", root / "model", data["prepared"],
                                                tmp_path / "store", samples, tmp_path / "figures",
                                                tmp_path / "metrics.json"))
        assert left_out in line, line
        return
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["rejected"] == 1 and manifest["images_in"] == manifest["written"] + 1, manifest


def test_evaluate_refuses_generations_that_name_a_test_image_twice(evaluate_run, tmp_path):  # noqa: F811
    """check_generated_from_test (pass 15) refuses generations named after no test image, and PreparedImages never
    looks for an image listed twice: a samples folder whose test shard is listed twice (or any generation
    repeated) is evaluated as twice the generations, each test condition counted twice in the faithfulness AUROC,
    FD, PRDC and the `generated` count, silently. sample writes one generation per test condition, so a name listed
    twice is not its output: one line naming the image and the samples folder."""
    from cxr_diffusion.evaluation.evaluate import evaluate_branch

    root, data, samples, _ = evaluate_run
    doubled = Path(shutil.copytree(samples, tmp_path / "samples"))
    manifest = json.loads((doubled / "manifest.json").read_text())
    test_shards = [shard for shard in manifest["shards"] if shard["split"] == "test"]
    for number, shard in enumerate(test_shards):
        copy = f"test-{90000 + number:05d}.parquet"
        shutil.copy(doubled / shard["file"], doubled / copy)
        manifest["shards"].append({**shard, "file": copy})
    extra = sum(shard["rows"] for shard in test_shards)
    manifest["per_split"]["test"] += extra
    manifest["written"] += extra
    manifest["images_in"] += extra
    (doubled / "manifest.json").write_text(json.dumps(manifest))
    line = stage_line(lambda: evaluate_branch(_evaluate_params(), "elixr", _paths(root, data, doubled, tmp_path)))
    assert "twice" in line or "more than once" in line or "duplicate" in line.lower(), line
    assert not (tmp_path / "metrics.json").exists()


def test_a_stage_option_given_twice_is_refused_not_the_last_one_taken(sampled, tmp_path):
    """Typer (click) keeps the last of a repeated option silently: `stages/sample.py ... --out data/samples/elixr
    ... --out data/samples/clip_text` (a command line edited by hand, or a dvc.yaml `cmd` merged badly) writes the
    elixr generations into clip_text's folder with exit 0, replacing them, while dvc.yaml's `outs` name the other
    folder. A stage option given twice should be one line naming it, exit 2, before anything is read or written."""
    import subprocess
    import sys

    import yaml
    from test_hostile_pass16 import _sample_params

    root, data = sampled
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_sample_params().model_dump(mode="json"), sort_keys=False))
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(repo / "stages" / "sample.py"), "--branch", "elixr", "--params", str(params),
         "--model", str(root / "model"), "--prepared", str(data["prepared"]), "--store", str(data["store"]),
         "--out", str(tmp_path / "first"), "--out", str(tmp_path / "second"), "--figures", str(tmp_path / "figures"),
         "--metrics", str(tmp_path / "metrics.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    assert "--out" in result.stderr and "Traceback" not in result.stderr, result.stderr[-500:]
    assert not (tmp_path / "first").exists() and not (tmp_path / "second").exists()


def test_evaluate_that_fails_writing_its_metrics_keeps_the_previous_figures(evaluate_run, tmp_path, monkeypatch):  # noqa: F811
    """evaluate_branch swaps reports/evaluate/<branch> in (write_figures) and only then writes
    metrics/evaluate/<branch>.json: a full disk writing the metrics ends the stage in one line, but the figures
    folder already holds this run's PCA and closest-to-train pictures beside the previous run's metrics (or none).
    The old output should be left unchanged when the stage fails (as pass 17 made `filter` and pass 12 `compare`
    build everything before replacing anything)."""
    import errno

    import cxr_diffusion.evaluation.evaluate as evaluate_module

    root, data, samples, _ = evaluate_run
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "pca.png").write_bytes(b"the previous run's figure")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_module, "write_json", full_disk)
    line = stage_line(lambda: evaluate_module.evaluate_branch(_evaluate_params(), "elixr",
                                                              _paths(root, data, samples, tmp_path)))
    assert "space" in line.lower(), line
    assert _snapshot(figures) == {"pca.png": b"the previous run's figure"}, "the failed run replaced the figures"


def test_evaluate_refuses_more_generations_than_sample_count_allows(evaluate_run, tmp_path):  # noqa: F811
    """Pass 19 made evaluate refuse generations made with another sampler, steps, guidance or seed than the params
    say; `sample.count` (the cap on generations) is never compared: with `sample.count: 2` the sample stage writes
    at most 2 generations, yet a samples folder of another count (here every test image: made before the count was
    lowered, or by hand) is evaluated and written as the branch's metrics under these params (`generated` > 2).
    It should be one line naming sample.count and the samples' manifest (rerun the sample stage)."""
    from cxr_diffusion.data.shards import PreparedImages
    from cxr_diffusion.evaluation.evaluate import evaluate_branch
    from cxr_diffusion.profiles import params_with

    root, data, samples, _ = evaluate_run
    assert len(PreparedImages(samples, "test")) > 2
    params = _evaluate_params()
    params = params_with({**params.model_dump(), "sample": {**params.sample.model_dump(), "count": 2}})
    line = stage_line(lambda: evaluate_branch(params, "elixr", _paths(root, data, samples, tmp_path)))
    assert "sample.count" in line or "count" in line, line
    assert not (tmp_path / "metrics.json").exists()


def store_without(store_dir: Path, left_out: str, out: Path) -> None:
    """A copy of the elixr condition store at ``store_dir`` without the condition of the image ``left_out``."""
    import numpy as np

    from cxr_diffusion.conditioning.store import ConditionStore, ConditionStoreWriter

    full = ConditionStore(store_dir)
    kept = [name for name in full.row_of if name != left_out]
    first = full[kept[0]].embeddings
    with ConditionStoreWriter(out, len(kept), first.shape[0], first.shape[1]) as store:
        for row, name in enumerate(kept):
            store.write(row, full[name].embeddings.numpy()[None])
        store.finish(kept, np.arange(len(kept)), {"branch": "elixr", "encoder": "test"})
