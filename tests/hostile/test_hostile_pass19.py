"""Hostile inputs, pass 19: the cases stop 38 left unfiled (the same path as source and target, a sharded CLIP
whose index disagrees with its shards, a real arm of another classifier, an evaluator of another image size, an
untrained baseline of another branch) and what the nineteenth pass's helpers found. Each case builds its input
and runs the real entry point or the library function a stage calls, asserting the project's rule: one line
naming the file or key and what to do, exit 2, no traceback; nothing of the user's lost; a valid input accepted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.errors import UserError

from conftest import cli_refusal

runner = CliRunner()


# ---------------------------------------------------------------------------- convert-weights: source is target


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
def test_convert_weights_refuses_a_target_that_is_its_source(tmp_path, spelling):
    """`convert-weights W W` wrote the converted file over the published weights (atomic_path replaced the
    source with the converted copy, exit 0): the download was gone. The same file under another spelling too."""
    source = tmp_path / "inception.safetensors"
    source.write_bytes(b"the published weights")
    target = {"same": source, "dotted": tmp_path / "." / "inception.safetensors",
              "link": tmp_path / "link.safetensors"}[spelling]
    if spelling == "link":
        target.symlink_to(source)
    line = cli_refusal(runner.invoke(app, ["convert-weights", str(source), str(target), "--flavour", "fid"]))
    assert line.startswith(f"error: {target} is the source itself") and "another path" in line
    assert source.read_bytes() == b"the published weights"


# ---------------------------------------------------------------------------- a sharded CLIP: index vs shards


def _sharded_clip(tiny_clip_dir: Path, folder: Path, edit=None) -> Path:
    """``tiny_clip_dir`` with its weights split into two shards and an index, as save_pretrained shards a large
    model; ``edit(first, second, weight_map)`` damages them before they are written."""
    clip = Path(shutil.copytree(tiny_clip_dir, folder))
    tensors = load_file(clip / "model.safetensors")
    (clip / "model.safetensors").unlink()
    names = sorted(tensors)
    first = {name: tensors[name] for name in names[: len(names) // 2]}
    second = {name: tensors[name] for name in names[len(names) // 2:]}
    weight_map = {**{name: "model-00001-of-00002.safetensors" for name in first},
                  **{name: "model-00002-of-00002.safetensors" for name in second}}
    if edit is not None:
        edit(first, second, weight_map)
    save_file(first, str(clip / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(clip / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (clip / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return clip


def test_a_sharded_clip_whose_index_matches_its_shards_loads(tmp_path, tiny_clip_dir):
    from cxr_diffusion.conditioning.clip import load_text_encoder, load_vision_encoder

    clip = _sharded_clip(tiny_clip_dir, tmp_path / "clip")
    assert load_text_encoder(str(clip)).model is not None
    assert load_vision_encoder(str(clip)).model is not None


def _in_both_shards(first, second, weight_map):
    name = next(n for n in sorted(first) if n.startswith("text_model.encoder"))
    second[name] = first[name] * 0  # a second copy of one text tensor, other values


def _mapped_to_the_other_shard(first, second, weight_map):
    name = next(n for n in sorted(first) if n.startswith("text_model.encoder"))
    weight_map[name] = "model-00002-of-00002.safetensors"


def _mapped_but_stored_nowhere(first, second, weight_map):
    weight_map["text_model.encoder.layers.9.mlp.fc1.weight"] = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize("edit", [_in_both_shards, _mapped_to_the_other_shard, _mapped_but_stored_nowhere])
def test_a_sharded_clip_whose_index_disagrees_with_its_shards_is_refused(tmp_path, tiny_clip_dir, edit):
    """The tower check merged the shards' headers without reading the index's weight_map: a tensor stored in both
    shards (with other values), or mapped to a shard that does not hold it, passed, and which values transformers
    loads then depends on its reading order. The index and the shards must agree, naming the shard or index."""
    from cxr_diffusion.conditioning.clip import load_text_encoder

    clip = _sharded_clip(tiny_clip_dir, tmp_path / "clip", edit)
    with pytest.raises(UserError) as refused:
        load_text_encoder(str(clip))
    message = str(refused.value)
    assert message.startswith(f"clip.model: {clip} could not be loaded as a saved CLIP")
    assert "model.safetensors.index.json" in message and "\n" not in message


# ---------------------------------------------------------------------------- utility: the real arm's classifier


def _branch_utility_line(tmp_path, monkeypatch, classifier) -> str:
    """What utility@elixr says with a real arm trained with ``classifier`` (None: as old real arms recorded it,
    the architecture only), stopped before anything but the real arm is read."""
    import numpy as np

    from conftest import one_line_message
    from cxr_diffusion.profiles import params_with
    from cxr_diffusion.utility import study
    from cxr_diffusion.utility.real_arm import REAL_ARM, UtilityError
    from test_hostile_utility import CLASSES, TEST, real_arm

    class Prepared:  # only what branch_utility reads before it checks the real arm
        def __init__(self, _folder, split, channels):
            self.classes, self.image_indices = CLASSES, TEST if split == "test" else ["a.png", "b.png"]

    monkeypatch.setattr(study, "PreparedImages", Prepared)
    real = real_arm(tmp_path / "real", np.full((3, 2), 0.25))
    if classifier is not None:
        facts = json.loads((real / REAL_ARM).read_text())
        facts["classifier"] = {**facts["classifier"], **classifier}
    else:
        facts = {**json.loads((real / REAL_ARM).read_text()), "architecture": "cnn"}
        del facts["classifier"]
    (real / REAL_ARM).write_text(json.dumps(facts))
    return one_line_message(lambda: study.branch_utility(
        params_with({}), "elixr", tmp_path / "no-model", tmp_path / "prepared", tmp_path / "filtered.csv",
        tmp_path / "no-store", real, tmp_path / "out", tmp_path / "figures", tmp_path / "m.json"), UtilityError)


@pytest.mark.parametrize("classifier, shown", [
    ({"architecture": "resnet50", "feature_dim": 512}, "architecture 'resnet50', utility.classifier.architecture is 'cnn'"),
    ({"epochs": 99}, "epochs 99, utility.classifier.epochs is"),
    (None, "it records no 'classifier' settings"),
], ids=["architecture", "epochs", "unrecorded"])
def test_utility_refuses_a_real_arm_trained_with_another_classifier(tmp_path, monkeypatch, classifier, shown):
    """`utility@<branch>` compared the real arm's classes, seeds and subset with this run's, but not how it was
    trained: a real arm of `resnet50` (or of other epochs) beside synthetic arms of the evaluator's `cnn` was
    compared as if trained alike, and the chart called the gap the synthetic data's."""
    line = _branch_utility_line(tmp_path, monkeypatch, classifier)
    assert "real_arm.json: the real arm was trained with another classifier" in line and shown in line, line
    assert "dvc repro utility_real" in line and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- memory-plan: a UNet no card holds


def test_a_unet_whose_state_alone_exceeds_the_card_is_refused_before_activations_are_measured(monkeypatch):
    """`memory-plan` with the largest UNet the params allow (8 levels of 4096 channels, 16 layers per block)
    measured fake-tensor training steps for every relaxation it tried, 9 minutes on 2 cores, before saying that
    no plan fits: the weights, gradients and AdamW state alone were 6115 GiB. Those are known from the parameter
    count: the refusal comes first, and no activation is measured."""
    from cxr_diffusion.diffusion import memory_plan
    from cxr_diffusion.diffusion.memory_plan import GIB, MemoryPlanError, plan_memory
    from cxr_diffusion.profiles import params_with

    def measured(*_args, **_kwargs):
        raise AssertionError("activations were measured for a UNet whose state alone exceeds the card")

    monkeypatch.setattr(memory_plan, "measure_activations", measured)
    train = params_with(profile="nih-512").train
    with pytest.raises(MemoryPlanError) as refused:
        plan_memory(train, 64, 4, 768, 77, "bf16", 8 * GIB)
    message = str(refused.value)
    assert message.startswith("train.batch_size: no training plan fits the device's 8.0 GiB budget: the UNet's "
                              "weights, gradients and optimizer state alone take") and "block_out_channels" in message
