"""The checkpoint module: exact resume, retention, and refusing damaged or foreign checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from cxr_diffusion.diffusion.checkpoints import (
    CheckpointError,
    TrainingState,
    config_hash,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)

CONFIG = "0123456789abcdef"


@dataclass
class Run:
    """A tiny training run: dropout uses the global RNG, the data its own generator, like the trainer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: torch.Generator
    step: int = 0

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(8, 4, generator=self.data)
            loss = (self.model(x) - x[:, :2]).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1

    def state(self, config: str = CONFIG) -> TrainingState:
        return TrainingState(step=self.step, images_seen=8 * self.step, epoch=0, batch_in_epoch=self.step,
                             config_hash=config, extra={"scheduler": self.scheduler.state_dict()})

    def rng(self) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state(), "data": self.data.get_state()}

    def save(self, directory: Path, total_limit: int = 3, config: str = CONFIG, **kwargs) -> Path:
        return save_checkpoint(directory, self.state(config), {"model": self.model}, self.optimizer, self.rng(),
                               total_limit, **kwargs)

    def load(self, directory: Path, log=None, **kwargs):
        return load_latest_checkpoint(directory, CONFIG, {"model": self.model}, self.optimizer,
                                      log=log if log is not None else (lambda line: None), **kwargs)

    def parameters(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def new_run(seed: int = 0) -> Run:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return Run(model, optimizer, scheduler, torch.Generator().manual_seed(seed + 100))


def all_equal(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return len(left) == len(right) and all(torch.equal(a, b) for a, b in zip(left, right))


def saved_at(directory: Path, *steps: int) -> tuple[Run, dict[int, list[torch.Tensor]]]:
    """One run checkpointed at each of ``steps``; returns it and its parameters at each."""
    run, params = new_run(), {}
    for step in steps:
        run.train(step - run.step)
        run.save(directory)
        params[step] = run.parameters()
    return run, params


def test_resumed_training_is_bit_identical_to_uninterrupted_training(tmp_path):
    uninterrupted = new_run()
    uninterrupted.train(3)
    uninterrupted.save(tmp_path)
    uninterrupted.train(3)

    resumed = new_run(seed=1)  # different weights, fresh optimizer state and generators
    torch.manual_seed(12345)
    loaded = resumed.load(tmp_path)
    torch.set_rng_state(loaded.rng["torch"])
    resumed.data.set_state(loaded.rng["data"])
    resumed.scheduler.load_state_dict(loaded.state.extra["scheduler"])
    resumed.step = loaded.state.step
    resumed.train(3)

    assert loaded.state.step == 3 and loaded.state.images_seen == 24
    assert all_equal(resumed.parameters(), uninterrupted.parameters())
    assert resumed.optimizer.param_groups[0]["lr"] == uninterrupted.optimizer.param_groups[0]["lr"]


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    saved_at(tmp_path, 2)
    names = sorted(path.name for path in (tmp_path / "step-00000002").iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_total_limit_keeps_only_the_newest_checkpoints(tmp_path):
    run = new_run()
    for _ in range(4):
        run.train(1)
        run.save(tmp_path, total_limit=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_truncated_newest_checkpoint_falls_back_to_previous_and_logs_it(tmp_path):
    saved_at(tmp_path, 1, 2)
    newest = tmp_path / "step-00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])
    lines: list[str] = []

    loaded = new_run(seed=1).load(tmp_path, log=lines.append)

    assert loaded.path.name == "step-00000001"
    assert any("step-00000002" in line and "model.safetensors" in line for line in lines)


def test_flipped_byte_is_caught_by_hash_and_previous_checkpoint_is_used(tmp_path):
    _, params = saved_at(tmp_path, 1, 2)
    newest = tmp_path / "step-00000002" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: still a loadable file, only the hash can tell
    newest.write_bytes(bytes(data))
    run, lines = new_run(seed=1), []

    loaded = run.load(tmp_path, log=lines.append)

    assert loaded.path.name == "step-00000001"
    assert all_equal(run.parameters(), params[1])
    assert any("step-00000002" in line and "sha256" in line for line in lines)


def test_checkpoint_whose_module_shapes_differ_is_skipped(tmp_path):
    saved_at(tmp_path, 1)
    wider = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 2))
    lines: list[str] = []
    loaded = load_latest_checkpoint(tmp_path, CONFIG, {"model": wider}, torch.optim.AdamW(wider.parameters()),
                                    log=lines.append)
    assert loaded is None
    assert any("shapes differ" in line for line in lines)


def test_interrupted_save_is_ignored_on_load(tmp_path):
    saved_at(tmp_path, 1, 2)
    crashed = tmp_path / "step-00000003"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes((tmp_path / "step-00000002" / "model.safetensors").read_bytes())
    lines: list[str] = []

    loaded = new_run(seed=1).load(tmp_path, log=lines.append)

    assert loaded.path.name == "step-00000002"
    assert any("step-00000003" in line and "state.json" in line for line in lines)


def test_next_save_removes_leftovers_of_an_interrupted_save(tmp_path):
    run, _ = saved_at(tmp_path, 1)
    for leftover in (tmp_path / ".step-00000007.k3j4h5.tmp", tmp_path / "step-00000007"):  # temp dir, no state.json
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")

    run.train(1)
    run.save(tmp_path, log=lambda line: None)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


def test_saving_removes_newer_checkpoints_of_an_abandoned_run(tmp_path):
    saved_at(tmp_path, 1, 2, 3)
    resumed = new_run(seed=1)
    resumed.load(tmp_path)
    resumed.step = 2  # as if step 3 had been unusable and the run went on from step 2

    resumed.save(tmp_path, log=lambda line: None)

    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def test_config_hash_mismatch_is_not_resumed(tmp_path):
    saved_at(tmp_path, 1)
    run, lines = new_run(seed=1), []
    before = run.parameters()

    loaded = load_latest_checkpoint(tmp_path, "fedcba9876543210", {"model": run.model}, run.optimizer,
                                    log=lines.append)

    assert loaded is None
    assert all_equal(run.parameters(), before)
    assert any(CONFIG in line and "fedcba9876543210" in line and "starting from scratch" in line for line in lines)


def test_extra_tensor_dicts_round_trip(tmp_path):
    run = new_run()
    run.train(2)
    shadow = {name: param.detach() * 0.5 + 1 for name, param in run.model.named_parameters()}
    run.save(tmp_path, tensors={"ema": shadow})

    fresh = new_run(seed=1)
    target = {name: torch.zeros_like(param) for name, param in fresh.model.named_parameters()}
    storage = {name: tensor.data_ptr() for name, tensor in target.items()}
    fresh.load(tmp_path, tensors={"ema": target})

    assert all(torch.equal(target[name], shadow[name]) for name in shadow)
    assert {name: tensor.data_ptr() for name, tensor in target.items()} == storage  # copied in place


def tied_model() -> nn.Module:
    model = nn.ModuleDict({"encoder": nn.Linear(4, 4), "decoder": nn.Linear(4, 4)})
    model["decoder"].weight = model["encoder"].weight  # two state_dict keys, one storage
    return model


def test_tied_weights_round_trip(tmp_path):
    run, saved = new_run(), tied_model()
    save_checkpoint(tmp_path, run.state(), {"model": saved}, run.optimizer, run.rng(), total_limit=1)

    loaded = tied_model()
    load_latest_checkpoint(tmp_path, CONFIG, {"model": loaded}, new_run(seed=1).optimizer, log=lambda line: None)

    assert torch.equal(loaded["encoder"].weight, saved["encoder"].weight)
    assert loaded["decoder"].weight is loaded["encoder"].weight


def test_non_json_extra_is_refused_before_anything_is_written(tmp_path):
    run = new_run()
    state = dataclasses.replace(run.state(), extra={"best_val_loss": float("inf")})
    with pytest.raises(CheckpointError, match="extra"):
        save_checkpoint(tmp_path, state, {"model": run.model}, run.optimizer, run.rng(), total_limit=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make_directory", [False, True])
def test_missing_or_empty_directory_gives_none(tmp_path, make_directory):
    directory = tmp_path / "checkpoints"
    if make_directory:
        directory.mkdir()
    assert new_run().load(directory) is None


def test_list_checkpoints_orders_by_step_not_by_name_length(tmp_path):
    run = new_run()
    for step in (9, 100_000_000):  # the second has 9 digits: plain string order would put it first
        run.step = step
        run.save(tmp_path, total_limit=5)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000009", "step-100000000"]


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Config:
    seed: int = 0
    data: Path = Path("data/shards")
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_config_hash_is_stable_for_equal_configs():
    assert config_hash(Config()) == config_hash(Config())
    assert len(config_hash(Config())) == 16
    assert config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})


def test_config_hash_differs_for_different_configs():
    assert config_hash(Config()) != config_hash(Config(optim=Optim(lr=2e-4)))


def test_config_hash_treats_tuples_as_lists_and_dataclasses_as_dicts():
    as_read_from_json = json.loads(json.dumps({"seed": 0, "data": "data/shards", "optim": {"lr": 1e-4, "betas": [0.9, 0.999]}}))
    assert config_hash(Config()) == config_hash(as_read_from_json)


def test_writer_copies_only_tensors_that_do_not_own_their_storage(monkeypatch, tmp_path):
    """A CPU training state is written from its own memory (no second 6.9 GB of optimizer state at SD
    size); views and tied weights are still copied, because safetensors refuses them."""
    from cxr_diffusion.diffusion import checkpoints

    written = {}
    monkeypatch.setattr(checkpoints, "save_file", lambda tensors, path: written.update(tensors))
    monkeypatch.setattr(checkpoints, "sha256_file", lambda path: "")
    own, base = torch.randn(4, 3), torch.randn(6, 3)
    checkpoints._write_tensors(tmp_path / "x.safetensors", {"own": own, "tied": own, "view": base[2:], "t": base.T})

    assert written["own"].data_ptr() == own.data_ptr()
    for key in ("tied", "view", "t"):
        assert written[key].untyped_storage().data_ptr() not in {own.data_ptr(), base.data_ptr()}, key
        assert written[key].is_contiguous()
    assert torch.equal(written["tied"], own) and torch.equal(written["view"], base[2:]) and torch.equal(written["t"], base.T)
