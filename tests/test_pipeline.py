"""The whole DVC pipeline on the tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.integration


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test"), env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "test"), env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    return env


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A git copy of the tracked files, switched to the tiny profile, after one full `dvc repro`."""
    work = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        source = REPO / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    sh("git", "init", "-q", cwd=work)
    sh(sys.executable, "-m", "cxr_diffusion.cli", "profile", "tiny", cwd=work)
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-qm", "tiny", cwd=work)
    sh("dvc", "repro", cwd=work)
    return work


def lock_outs(repo: Path, stage: str) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_repro_builds_dataset_filter_prepare_on_the_tiny_profile(tiny_repo):
    manifest = json.loads((tiny_repo / "data" / "prepared" / "manifest.json").read_text())
    filtered = json.loads((tiny_repo / "metrics" / "filter.json").read_text())
    dataset = json.loads((tiny_repo / "metrics" / "dataset.json").read_text())
    assert dataset["source"] == "phantom" and dataset["rows"] == 160
    assert filtered["rows_in"] == 160 and filtered["kept"] == manifest["images_in"]
    assert manifest["written"] == manifest["images_in"] and manifest["image_size"] == 32
    assert all(manifest["per_split"][s] > 0 for s in ("train", "val", "test"))
    shown = sh("dvc", "metrics", "show", "--json", cwd=tiny_repo).stdout
    assert "rows_in" in shown


def test_one_process_training_uses_every_available_core(tiny_repo):
    """`accelerate launch` exports OMP_NUM_THREADS=1; the trainer takes the cores back (one process here)."""
    from cxr_diffusion.diffusion.cpu_threads import available_cores

    for branch in ("clip_text", "clip_vision", "elixr"):
        final = json.loads((tiny_repo / "dvclive" / branch / "metrics.json").read_text())["final"]
        assert final["processes"] == 1 and final["cpu_threads"] == available_cores(), (branch, final)


def test_repro_ends_with_a_summary_for_every_branch_and_a_report(tiny_repo):
    summary = json.loads((tiny_repo / "metrics" / "summary.json").read_text())
    assert set(summary) == {"clip_text", "clip_vision", "elixr"}
    assert summary["elixr"]["condition_source"] == "elixr_standin"
    for branch in summary:
        assert summary[branch]["domain_fd"] is not None and summary[branch]["train_steps"] == 12
        assert (tiny_repo / "reports" / "evaluate" / branch / "pca.png").is_file()
        assert (tiny_repo / "models" / branch / "model_index.json").is_file()
    assert (tiny_repo / "reports" / "samples" / "clip_text" / "one_row_per_finding.png").is_file()
    report = (tiny_repo / "reports" / "report.md").read_text()
    assert "elixr (stand-in)" in report and "Domain FD" in report


def test_utility_arms_are_scored_on_the_same_real_test_images(tiny_repo):
    import pyarrow.parquet as pq

    from cxr_diffusion.data.shards import PreparedImages

    test = PreparedImages(tiny_repo / "data" / "prepared", "test", channels=1)
    summary = json.loads((tiny_repo / "metrics" / "summary.json").read_text())
    for branch in ("clip_text", "clip_vision", "elixr"):
        metrics = json.loads((tiny_repo / "metrics" / "utility" / f"{branch}.json").read_text())
        assert set(metrics["arms"]) == {"real", "synthetic", "real_plus_synthetic", "synthetic_then_real", "synthetic_x2"}
        assert set(summary[branch]["utility"]) == set(metrics["arms"])
        assert metrics["test_images"] == len(test)
        scores = pq.read_table(tiny_repo / "data" / "utility" / branch / "test_scores.parquet").to_pydict()
        for arm in metrics["arms"]:
            rows = [name for name, of in zip(scores["image_index"], scores["arm"]) if of == arm]
            assert rows == test.image_indices, (branch, arm)
        assert (tiny_repo / "reports" / "utility" / branch / "auroc.png").is_file()
        for arm, result in metrics["arms"].items():  # every arm by sex and age band, on the same test films
            assert set(result["subgroups"]) == {"sex", "age"}, (branch, arm)
            for attribute, entry in result["subgroups"].items():
                assert sum(group["images"] for group in entry["groups"].values()) == len(test), (branch, arm)
            assert set(summary[branch]["utility"][arm]["subgroups"]) == {"sex", "age"}
    report = (tiny_repo / "reports" / "report.md").read_text()
    assert "Downstream utility (train on synthetic, test on real)" in report
    assert "### Utility by sex and age" in report
    assert report.index("By sex (test films: F: ") < report.index("By age band (test films: &lt;40: ")


def test_utility_synthetic_images_carry_the_labels_they_were_generated_for(tiny_repo):
    from cxr_diffusion.data.shards import PreparedImages

    train = PreparedImages(tiny_repo / "data" / "prepared", "train", channels=1)
    labels_of = dict(zip(train.image_indices, train.labels.tolist()))
    for branch in ("clip_text", "clip_vision", "elixr"):
        metrics = json.loads((tiny_repo / "metrics" / "utility" / branch).with_suffix(".json").read_text())
        synthetic = PreparedImages(tiny_repo / "data" / "utility" / branch / "synthetic", "train", channels=1)
        assert len(synthetic) == 2 * metrics["synthetic_set"]["conditions"] == metrics["arms"]["synthetic_x2"]["train_images"]
        for name, labels in zip(synthetic.image_indices, synthetic.labels.tolist()):
            source, variation = name.rsplit("#syn", 1)
            assert labels == labels_of[source] and variation in ("0", "1"), (branch, name)


def test_utility_refuses_a_real_arm_of_another_subset_in_one_line(tiny_repo, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(tiny_repo / "data" / "utility" / "real", real)
    facts = json.loads((real / "real_arm.json").read_text())
    (real / "real_arm.json").write_text(json.dumps({**facts, "train_image_indices": facts["train_image_indices"][1:],
                                                    "train_images": facts["train_images"] - 1}))
    result = sh(sys.executable, "stages/utility.py", "--branch", "elixr", "--model", "models/elixr", "--prepared",
                "data/prepared", "--filtered", "data/filtered/filtered.csv", "--store", "data/embeddings/elixr", "--real", str(real), "--out", str(tmp_path / "o"),
                "--figures", str(tmp_path / "f"), "--metrics", str(tmp_path / "m.json"), cwd=tiny_repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"stage utility failed: {real / 'real_arm.json'}: the real arm was trained on another subset of the train "
        "split than this run draws; rerun it with `dvc repro utility_real`"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()


def test_repro_builds_the_reader_study_kit_and_scores_no_responses_yet(tiny_repo):
    kit, key_path = tiny_repo / "reports" / "reader_study", tiny_repo / "data" / "reader_study" / "key.json"
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())["reader_study"]
    key = json.loads(key_path.read_text())
    assert (kit / "index.html").is_file() and not (kit / key_path.name).exists()
    assert len(key["items"]) == params["count"] - params["calibration"] and len(key["calibration"]) == params["calibration"]
    sources = [truth["source"] for truth in [*key["items"].values(), *key["calibration"].values()]]
    assert sorted(set(sources)) == ["clip_text", "clip_vision", "elixr", "real"]  # tiny: 4 real, 2 + 1 + 1 generated
    assert len({truth["origin_id"] for truth in [*key["items"].values(), *key["calibration"].values()]}) == len(sources)
    assert len(list((kit / "images").glob("*.png"))) == params["count"]
    metrics = json.loads((tiny_repo / "metrics" / "reader_study.json").read_text())
    assert metrics["readers"] == 0 and metrics["rejects"] == [] and metrics["study_id"] == params["study_id"]
    report = (tiny_repo / "reports" / "report.md").read_text()
    assert "## Expert reader study" in report and "No reader responses yet" in report
    assert "reports/reader_study.zip" in report and "reader_study/index.html" in report
    with zipfile.ZipFile(tiny_repo / "reports" / "reader_study.zip") as archive:
        assert sum(name.startswith("reader_study/images/") for name in archive.namelist()) == params["count"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    summary = json.loads((tiny_repo / "metrics" / "summary.json").read_text())
    assert all(summary[branch]["reader_study"] is None for branch in summary)


def test_readers_dropped_into_the_responses_folder_are_scored_by_repro(tiny_repo):
    from sklearn.metrics import cohen_kappa_score

    from scripted_readers import guesser, response_file, truthful

    responses, key_path = tiny_repo / "reader_study" / "responses", tiny_repo / "data" / "reader_study" / "key.json"
    files = [response_file(responses, key_path, "expert", truthful), response_file(responses, key_path, "coin", guesser(3))]
    try:
        assert stale_stages(tiny_repo) == {"score_reader_study"}
        sh("dvc", "repro", cwd=tiny_repo)
        metrics = json.loads((tiny_repo / "metrics" / "reader_study.json").read_text())
        assert metrics["readers"] == 2 and metrics["rejects"] == []
        expert, coin = metrics["per_reader"]["expert"], metrics["per_reader"]["coin"]
        assert expert["call"]["accuracy"] == 1.0 and expert["auc"] == 1.0
        assert coin["call"]["ci95"][0] <= 0.5 <= coin["call"]["ci95"][1]
        # Two readers: Cohen's kappa between them, which with an always-right reader is the coin's kappa with the key.
        key = json.loads(key_path.read_text())
        truth = [truthful(item, key["items"][item]) for item in sorted(key["items"])]
        calls = json.loads(files[1].read_text())["answers"]
        expected = cohen_kappa_score(truth, [calls[item]["call"] for item in sorted(key["items"])])
        assert metrics["agreement"]["method"] == "cohen"
        assert metrics["agreement"]["kappa"] == pytest.approx(expected, abs=1e-4)
        summary = json.loads((tiny_repo / "metrics" / "summary.json").read_text())
        entries = [summary[branch]["reader_study"] for branch in summary if summary[branch]["reader_study"]]
        assert entries and all(entry["readers"] == 2 and entry["answers"] >= 2 for entry in entries)
        report = (tiny_repo / "reports" / "report.md").read_text()
        assert "2 reader(s)" in report and "| expert |" in report and "| coin |" in report
    finally:
        for path in files:
            path.unlink()
        sh("dvc", "repro", cwd=tiny_repo)
    assert json.loads((tiny_repo / "metrics" / "reader_study.json").read_text())["readers"] == 0


def test_a_reader_study_larger_than_the_samples_is_refused_in_one_line(tiny_repo, tmp_path):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["reader_study"]["count"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = sh(sys.executable, "stages/reader_study.py", "--params", str(tmp_path / "params.yaml"), "--prepared",
                "data/prepared", "--samples", "data/samples", "--kit", str(tmp_path / "kit"), "--key",
                str(tmp_path / "key.json"), "--archive", str(tmp_path / "kit.zip"), cwd=tiny_repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage reader_study failed: clip_text: 17 images wanted")
    assert "lower reader_study.count" in lines[0]
    assert not (tmp_path / "kit").exists() and not (tmp_path / "key.json").exists()
    assert not (tmp_path / "kit.zip").exists()


def test_plots_render_loss_curves_grids_and_pca(tiny_repo, tmp_path):
    result = sh("dvc", "plots", "show", "--json", cwd=tiny_repo)
    rendered = json.loads(result.stdout)["data"]
    names = " ".join(rendered)
    assert "Training loss" in names and "Conditioning gap" in names
    assert "pca.png" in names and "one_row_per_finding.png" in names and "samples.png" in names
    assert "utility/clip_text/auroc.png" in names
    assert "failed" not in result.stderr.lower()
    assert all(rendered[name] for name in rendered), "a declared plot has no data"


def stale_stages(repo: Path) -> set[str]:
    """Stages whose own deps or params changed (`dvc repro --dry`). DVC then reruns every stage
    downstream of them as their inputs change; the exp-run test below shows that on a real run."""
    output = sh("dvc", "repro", "--dry", cwd=repo).stdout
    return {line.split("'")[1].split("@")[0] for line in output.splitlines() if line.startswith("Running stage")}


def edited_params(repo: Path, old: str, new: str):
    params = repo / "params.yaml"
    original = params.read_text()
    assert old in original
    params.write_text(original.replace(old, new, 1))
    return original


def test_training_param_change_makes_only_training_stale(tiny_repo):
    original = edited_params(tiny_repo, "cfg_dropout: 0.1", "cfg_dropout: 0.2")
    try:
        assert stale_stages(tiny_repo) == {"train"}
    finally:
        (tiny_repo / "params.yaml").write_text(original)


def test_filter_param_change_makes_the_filter_stale_not_the_dataset(tiny_repo):
    original = edited_params(tiny_repo, "age_max: 100", "age_max: 90")
    try:
        assert stale_stages(tiny_repo) == {"filter"}
    finally:
        (tiny_repo / "params.yaml").write_text(original)


@pytest.mark.parametrize(("old", "new", "stale"), [
    ("  bootstrap: 50 ", "  bootstrap: 60 ", {"utility"}),
    ("train_images: 32", "train_images: 30", {"utility_real", "utility"}),
])
def test_utility_param_changes_make_only_the_utility_stages_stale(tiny_repo, old, new, stale):
    original = edited_params(tiny_repo, old, new)
    try:
        assert stale_stages(tiny_repo) == stale
    finally:
        (tiny_repo / "params.yaml").write_text(original)


def test_second_repro_does_nothing(tiny_repo):
    result = sh("dvc", "status", cwd=tiny_repo)
    assert "Data and pipelines are up to date" in result.stdout


def test_rerunning_the_demo_clip_and_its_embeddings_gives_identical_outputs(tiny_repo):
    # The demo CLIP's tokenizer was once learned by a trainer whose vocabulary changed from run to run.
    stages = ("train_clip", "embed_clip_text", "embed_clip_vision")

    def artifacts() -> dict:  # models and embeddings; the metrics files also hold timings
        return {path: md5 for stage in stages for path, md5 in lock_outs(tiny_repo, stage).items()
                if not path.startswith("metrics/")}

    expected = artifacts()
    for stage in stages:
        sh("dvc", "repro", "-f", "-s", stage, cwd=tiny_repo)
    assert artifacts() == expected
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=tiny_repo).stdout


def test_kill_9_during_prepare_then_repro_gives_identical_outputs(tiny_repo):
    expected = lock_outs(tiny_repo, "prepare")
    # Kill the whole `dvc repro` (DVC has already removed the old output) while shards are being written.
    process = subprocess.Popen(["dvc", "repro", "-f", "-s", "prepare"], cwd=tiny_repo, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if any((tiny_repo / "data").glob(".prepared.*.tmp/*.parquet")):
            break
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed; make the test dataset larger"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    sh("dvc", "repro", cwd=tiny_repo)
    assert lock_outs(tiny_repo, "prepare") == expected
    assert not list((tiny_repo / "data").glob(".prepared.*.tmp"))


def test_mistyped_param_in_an_experiment_fails_naming_it(tiny_repo):
    result = sh("dvc", "exp", "run", "-S", "lrr=1e-5", cwd=tiny_repo, check=False)
    assert result.returncode != 0
    assert "lrr" in result.stdout + result.stderr
    sh("git", "checkout", "--", "params.yaml", cwd=tiny_repo)


def test_exp_run_lr_override_retrains_every_branch_at_that_rate_only(tiny_repo):
    result = sh("dvc", "exp", "run", "-S", "lr=1e-5", cwd=tiny_repo)
    output = result.stdout + result.stderr
    for stage in ("dataset", "filter", "prepare", "train_clip", "embed_clip_text"):
        assert f"'{stage}' didn't change" in output or f"Stage '{stage}' is cached" in output, stage
    for branch in ("clip_text", "clip_vision", "elixr"):
        assert f"train@{branch}" in output
        logged = (tiny_repo / "dvclive" / branch / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()
        rates = [float(line.split("\t")[-1]) for line in logged[1:]]
        assert max(rates) == pytest.approx(1e-5)  # warm-up and cosine scale it, never above 1e-5
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=tiny_repo).stdout)
    assert "1e-05" in json.dumps(shown) or "1e-5" in json.dumps(shown)


def test_back_at_the_commit_after_an_experiment_nothing_is_stale(tiny_repo):
    """Restoring the commit after an experiment (git, then DVC's cache) leaves no stage to rerun: the
    experiment's training checkpoints stay behind, but they are a scratch folder, not a stage output."""
    sh("git", "add", "-A", cwd=tiny_repo)
    sh("git", "commit", "-qm", "baseline for the experiment", cwd=tiny_repo)
    def checkpoint_files() -> dict:
        return {p: p.stat().st_mtime_ns for p in (tiny_repo / "checkpoints" / "elixr").rglob("*") if p.is_file()}

    before = checkpoint_files()
    sh("dvc", "exp", "run", "train@elixr", "-S", "lr=3e-5", cwd=tiny_repo)
    assert checkpoint_files() != before  # the experiment's checkpoints replaced the commit's
    sh("git", "checkout", "--", ".", cwd=tiny_repo)
    sh("dvc", "checkout", cwd=tiny_repo)
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=tiny_repo).stdout


def test_exp_with_pretrained_weights_reruns_only_evaluation_and_reports_every_fid(tiny_repo):
    """With (seeded stand-in) weights configured, evaluate computes standard FID, reference-compatible FID, the
    DenseNet metrics and the RadDINO distances for every branch, and nothing upstream of evaluation reruns."""
    from safetensors.torch import save_file

    from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3
    from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121
    from cxr_diffusion.rehearsal import standin_models
    from oracle_weights import seeded_state

    weights = tiny_repo / "external" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for name, model in (("fid", InceptionV3(InceptionSpec("fid", "pool"))),
                        ("torchvision", InceptionV3(InceptionSpec("torchvision", "pool"))), ("xrv", XRVDenseNet121())):
        save_file({k: v.float() for k, v in seeded_state(model).items()}, str(weights / f"{name}.safetensors"))
    tiny_raddino = {**standin_models.RADDINO, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": 28}  # the real preprocessing and features, a small network
    standin_models.write_raddino(tiny_repo / "external" / "rad-dino", seed=0, config=tiny_raddino)
    result = sh("dvc", "exp", "run", "-S", "evaluate.inception_weights=external/weights/fid.safetensors",
                "-S", "evaluate.reference_inception_weights=external/weights/torchvision.safetensors",
                "-S", "evaluate.xrv_weights=external/weights/xrv.safetensors",
                "-S", "evaluate.raddino=external/rad-dino",
                "-S", "evaluate.reference_fid_train_images=64", cwd=tiny_repo)
    output = result.stdout + result.stderr
    for branch in ("clip_text", "clip_vision", "elixr"):
        for stage in (f"train@{branch}", f"sample@{branch}"):
            assert f"'{stage}' didn't change" in output or f"Stage '{stage}' is cached" in output, stage
        assert f"evaluate@{branch}" in output
    summary = json.loads((tiny_repo / "metrics" / "summary.json").read_text())
    for branch, row in summary.items():
        assert row["inception_fid"] > 0 and row["reference_compatible_fid"] > 0 and row["xrv_fd"] > 0, branch
        assert row["raddino_fd"] > 0 and 0 <= row["raddino_coverage"] <= 1, branch
        details = json.loads((tiny_repo / "metrics" / "evaluate" / f"{branch}.json").read_text())["closeness"]
        assert details["reference_compatible_fid_details"]["n_real"] == 64
        assert details["inception_fid_details"]["real"] == "test split"
    report = (tiny_repo / "reports" / "report.md").read_text()
    assert "Reference-compatible FID: torchvision Inception\\-v3" in report and "not computed" not in report


def test_training_stage_runs_as_two_processes_through_the_accelerate_config(tiny_repo):
    """`train.launch_config` switches the train stage to `accelerate launch` with two processes (gloo on CPUs)."""
    from cxr_diffusion.diffusion.cpu_threads import available_cores

    result = sh("dvc", "exp", "run", "train@elixr", "-S", "train.launch_config=accelerate/two-processes.yaml",
                cwd=tiny_repo)
    assert "accelerate launch --config_file accelerate/two-processes.yaml" in result.stdout + result.stderr
    final = json.loads((tiny_repo / "dvclive" / "elixr" / "metrics.json").read_text())["final"]
    assert final["processes"] == 2
    assert final["cpu_threads"] == max(1, available_cores() // 2)


def _experiment_metrics(repo: Path) -> dict[str, dict]:
    """Experiment name -> its metrics files, from `dvc exp show --json`."""
    found = {}
    for commit in json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]["metrics"]
    return found


def test_queued_per_branch_sweep_runs_every_experiment_and_plots_diff_compares_them(tiny_repo):
    """The README's sweep: queue experiments with per-branch rates, run the queue, compare with plots diff."""
    names = []
    for rate in ("3e-4", "1e-4"):
        # lr=null: an earlier experiment left the top-level override (which beats per-branch rates) in params.
        queued = sh("dvc", "exp", "run", "--queue", "train@elixr", "-S", "lr=null", "-S", f"train.lr.elixr={rate}",
                    cwd=tiny_repo)
        names.append(re.search(r"Queued experiment '([\w-]+)'", queued.stdout + queued.stderr).group(1))
    sh("dvc", "queue", "start", "-j", "1", cwd=tiny_repo)
    deadline = time.monotonic() + 600
    while re.search(r"Queued|Running", status := sh("dvc", "queue", "status", cwd=tiny_repo).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    for name in names:
        assert re.search(rf"{name}\s.*Success", status), status
    metrics = _experiment_metrics(tiny_repo)
    rates = {name: metrics[name]["dvclive/elixr/metrics.json"]["data"]["final"]["lr"] for name in names}
    assert rates == {names[0]: pytest.approx(3e-4), names[1]: pytest.approx(1e-4)}

    plots = json.loads(sh("dvc", "plots", "diff", *names, "--json", cwd=tiny_repo).stdout)["data"]
    assert set(plots["Training loss"][0]["revisions"]) == set(names)
    assert {entry["revisions"][0] for entry in plots["dvclive/elixr/plots/images/samples.png"]} == set(names)
