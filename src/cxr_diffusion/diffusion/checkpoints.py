"""Save and exactly resume a training run, with nothing pickled.

A checkpoint is a directory ``step-{step:08d}/`` holding

``{name}.safetensors``     one per module ``state_dict`` and per extra tensor dict (the EMA)
``optimizer.safetensors``  the optimizer's tensors, as ``state.{param_index}.{key}``
``optimizer.json``         the rest of ``optimizer.state_dict()`` (param groups, non-tensor entries)
``rng.safetensors``        the caller's RNG states, handed back on load
``state.json``             the ``TrainingState`` and the sha256 of every other file

What it guarantees: the directory is built beside its final name and renamed into place, so a save
killed halfway leaves no checkpoint; every file is checked against its recorded hash on load, and a
damaged checkpoint is skipped for the previous one; a checkpoint written under another config hash
is not resumed; only the newest ``total_limit`` are kept. Loading a checkpoint someone hands us never
runs their code: tensors are safetensors, the rest JSON.

What is taken from accelerate, and what not: ``accelerator.save_state``/``load_state`` write the
model with safetensors but the optimizer, the RNG states and any registered object with
``torch.save`` (pickle), straight into the final folder, with no hash to verify and no fallback.
So the trainer uses accelerate for what it does without pickle: unwrapping the model, the wrapped
optimizer's ``state_dict``/``load_state_dict``, gathering every process's RNG state to the main
process, which alone writes, while the others wait. This module keeps the writing and checking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_directory, give_plain_modes, read_json, sha256_file

FORMAT_VERSION = 2
STATE_FILE = "state.json"
_FIXED_FILES = ("optimizer.safetensors", "optimizer.json", "rng.safetensors")  # besides one per module and tensors
_MAX_STATE_BYTES = 1 << 20  # a few hundred bytes as written
_COUNTERS = ("step", "images_seen", "epoch", "batch_in_epoch", "bad_validations", "nonfinite_in_a_row")
_MAX_COUNTER = 2**62  # int64 with room: the data order seeds torch with the epoch
_CHECKPOINT_DIR = re.compile(r"step-(\d{8,})")
_LEFTOVERS = (".step-*.tmp", ".step-*.old")  # of a save that was killed: atomic_directory's temp dirs


class CheckpointError(UserError, ValueError):
    """The training state cannot be saved as it is (a value JSON cannot hold)."""


class _Unusable(Exception):
    """A checkpoint on disk cannot be resumed; the message says why, for the log line."""


@dataclass
class TrainingState:
    """Where a run stands, apart from its tensors: saved as JSON in every checkpoint."""

    step: int = 0                # optimizer steps done
    images_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0      # micro-batches of the current epoch consumed (where the data resumes)
    config_hash: str = ""        # a checkpoint written under another config is never resumed
    best_val_loss: float | None = None
    bad_validations: int = 0     # validations since the best one (plateau schedule, early stopping)
    plateau_scale: float = 1.0   # the plateau schedule's cuts so far, as one factor on the learning rate
    nonfinite_in_a_row: int = 0  # consecutive micro-batches with a non-finite loss
    extra: dict = field(default_factory=dict)  # anything else JSON-able a caller keeps


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainingState
    rng: dict[str, torch.Tensor]  # as given to save_checkpoint; the caller restores its generators


def config_hash(config: object) -> str:
    """First 16 hex digits of the sha256 of ``config`` (a dict or dataclass) as canonical JSON: sorted
    keys, tuples as lists, paths as POSIX strings, so the same config read back from YAML hashes alike."""
    payload = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_posix_path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _posix_path(value: object) -> str:
    if isinstance(value, PurePath):
        return value.as_posix()
    raise TypeError(f"config_hash: a value of type {type(value).__name__} ({value!r}) has no canonical JSON form")


# ---------------------------------------------------------------- save

def save_checkpoint(directory: Path, state: TrainingState, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor], total_limit: int,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, *,
                    log: Callable[[str], None] = print) -> Path:
    """Write ``directory/step-{state.step:08d}/`` atomically, then prune; return its path.

    Pruning removes complete checkpoints newer than this one (an abandoned run's: we resumed from an
    earlier one or restarted, and load would pick them first), then the oldest beyond ``total_limit``,
    then what interrupted saves left.
    """
    directory = Path(directory)
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
    # Everything that can fail on a bad value fails before the first large file is written.
    optimizer_text = _json_text(optimizer_rest, "optimizer.json (the optimizer's state_dict)")
    _json_text(dataclasses.asdict(state), "state.json (the TrainingState; look at its `extra`)")
    contents = {f"{name}.safetensors": module.state_dict() for name, module in modules.items()}
    contents |= {f"{name}.safetensors": entries for name, entries in (tensors or {}).items()}
    contents |= {"optimizer.safetensors": optimizer_tensors, "rng.safetensors": rng}

    target = directory / f"step-{state.step:08d}"
    with atomic_directory(target) as tmp:
        hashes = {name: _write_tensors(tmp / name, entries) for name, entries in contents.items()}
        give_plain_modes([tmp / name for name in contents])  # safetensors makes them 0600
        (tmp / "optimizer.json").write_text(optimizer_text)
        hashes["optimizer.json"] = sha256_file(tmp / "optimizer.json")
        payload = {"format_version": FORMAT_VERSION, "state": dataclasses.asdict(state), "sha256": hashes}
        (tmp / STATE_FILE).write_text(_json_text(payload, STATE_FILE))  # last: marks the checkpoint complete
    _prune(directory, target, total_limit, log)
    return target


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Save to safetensors and return the file's sha256."""
    save_file(_writable(tensors), str(path))
    return sha256_file(path)


def _writable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors accepts: dense CPU tensors that each own their whole storage.

    Only the tensors that are not already so are copied (accelerator tensors, views, tied weights);
    safetensors writes the others from their own memory: at SD-1.5 size the optimizer state alone is 6.9 GB.
    """
    writable, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach()
        storage = value.untyped_storage()
        if not (value.device.type == "cpu" and value.is_contiguous() and value.storage_offset() == 0
                and storage.nbytes() == value.nbytes and storage.data_ptr() not in storages):
            value = value.to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        storages.add(value.untyped_storage().data_ptr())
        writable[key] = value
    return writable


def _split_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as its tensors (for safetensors) and everything else (for JSON)."""
    tensors = {f"state.{index}.{key}": value for index, entries in state_dict["state"].items()
               for key, value in entries.items() if isinstance(value, torch.Tensor)}
    rest = {str(index): {key: value for key, value in entries.items() if not isinstance(value, torch.Tensor)}
            for index, entries in state_dict["state"].items()}
    return tensors, {"param_groups": state_dict["param_groups"], "state": rest}


def _json_text(payload: object, where: str) -> str:
    try:
        return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where} cannot be written as JSON ({error}); use numbers, strings, bools, None, "
                              "lists and str-keyed dicts (None rather than inf/nan)") from error


def _prune(directory: Path, saved: Path, total_limit: int, log: Callable[[str], None]) -> None:
    for pattern in _LEFTOVERS:
        for leftover in directory.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    kept = []
    for path in _checkpoint_dirs(directory):
        if not (path / STATE_FILE).is_file():
            log(f"checkpoint: removing {path}: incomplete (no {STATE_FILE}), left by an interrupted save")
            shutil.rmtree(path)
        elif _step_of(path) > _step_of(saved):
            log(f"checkpoint: removing {path}: newer than {saved.name}, just saved, so it belongs to an abandoned run")
            _remove(path)
        else:
            kept.append(path)
    for path in kept[:-total_limit]:
        _remove(path)


def _remove(path: Path) -> None:
    # state.json first: a delete killed halfway leaves an incomplete checkpoint, never one that looks complete
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


# ---------------------------------------------------------------- list and load

def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json) in ``directory``, oldest first."""
    return [path for path in _checkpoint_dirs(Path(directory)) if (path / STATE_FILE).is_file()]


def _checkpoint_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    # A link named like a checkpoint is not one this run wrote: never resumed, and never pruned (deleting through
    # it would delete files outside the checkpoints folder).
    return sorted((path for path in directory.iterdir()
                   if _CHECKPOINT_DIR.fullmatch(path.name) and path.is_dir() and not path.is_symlink()), key=_step_of)


def _step_of(path: Path) -> int:
    return int(_CHECKPOINT_DIR.fullmatch(path.name).group(1))


def load_latest_checkpoint(directory: Path, expected_config_hash: str, modules: dict[str, torch.nn.Module],
                           optimizer: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                           log: Callable[[str], None] = print,
                           rng_like: Mapping[str, torch.Tensor] | None = None,
                           state_misfit: Callable[[TrainingState], str | None] | None = None) -> LoadedCheckpoint | None:
    """Restore the newest usable checkpoint into ``modules``, ``optimizer`` and ``tensors`` (in place).

    Incomplete or damaged checkpoints, and those whose state ``state_misfit`` names a reason against (a
    data position past this run's epoch, say), are logged and skipped for the previous one. The newest readable
    checkpoint written under another config stops the search: None, start from scratch. Nothing is
    modified unless a checkpoint passed every check.
    """
    directory, tensors = Path(directory), tensors or {}
    for path in reversed(_checkpoint_dirs(directory)):
        try:
            state, hashes = _read_state(path)
            if state.config_hash != expected_config_hash:
                log(f"checkpoint: not resuming {path}: it was written under config hash {state.config_hash}, "
                    f"this run's config hash is {expected_config_hash}; starting from scratch")
                return None
            misfit = state_misfit(state) if state_misfit is not None else None
            if misfit:
                raise _Unusable(f"{STATE_FILE}: {misfit}")
            _verify_hashes(path, hashes, [f"{name}.safetensors" for name in [*modules, *tensors]] + list(_FIXED_FILES))
            loaded = {name: _load_tensors(path / f"{name}.safetensors") for name in [*modules, *tensors]}
            for name, module in modules.items():
                _check_layout(loaded[name], module.state_dict(), f"{name}.safetensors vs module {name!r}")
            for name, entries in tensors.items():
                _check_layout(loaded[name], entries, f"{name}.safetensors vs tensors[{name!r}]")
            rng = _load_tensors(path / "rng.safetensors")
            if rng_like is not None:  # the RNG states the caller will restore: their keys, shapes and dtypes
                _check_layout(rng, rng_like, "rng.safetensors vs this run's RNG states")
                wrong = [key for key, value in rng_like.items() if rng[key].dtype != value.dtype]
                if wrong:
                    raise _Unusable(f"rng.safetensors: {wrong[0]} is {rng[wrong[0]].dtype}, expected {rng_like[wrong[0]].dtype}")
            optimizer.load_state_dict(_optimizer_state(path, optimizer))
        except _Unusable as why:
            log(f"checkpoint: skipping {path}: {why}")
            continue
        for name, module in modules.items():
            module.load_state_dict(loaded[name])
        with torch.no_grad():
            for name, entries in tensors.items():
                for key, target in entries.items():
                    target.copy_(loaded[name][key])
        log(f"checkpoint: resumed from {path} (step {state.step}, {state.images_seen} images seen)")
        return LoadedCheckpoint(path=path, state=state, rng=rng)
    log(f"checkpoint: no usable checkpoint in {directory}; starting from scratch")
    return None


def _read_state(path: Path) -> tuple[TrainingState, dict[str, str]]:
    if not (path / STATE_FILE).is_file():
        raise _Unusable(f"incomplete: no {STATE_FILE} (the save was interrupted)")
    if (path / STATE_FILE).is_symlink():  # it holds the counters and every other file's hash
        raise _Unusable(f"{STATE_FILE} is a symbolic link; a checkpoint's files are its own")
    try:
        payload = read_json(path / STATE_FILE, "the checkpoint is damaged", max_bytes=_MAX_STATE_BYTES)
        if payload.get("format_version") != FORMAT_VERSION:
            raise _Unusable(f"{STATE_FILE} is format {payload.get('format_version')!r}; this code reads "
                            f"{FORMAT_VERSION}")
        hashes = payload["sha256"]
        if not (isinstance(hashes, dict) and all(isinstance(value, str) for value in hashes.values())):
            raise TypeError("sha256 is not a mapping of file names to hex digests")
        return _checked_state(payload["state"]), dict(hashes)
    except (UserError, OSError, KeyError, TypeError, ValueError) as error:
        raise _Unusable(f"{STATE_FILE} cannot be read ({type(error).__name__}: {error}): truncated or damaged") from error


def _checked_state(fields: object) -> TrainingState:
    """The ``TrainingState`` a state.json holds, each value of its field's type and range (a hand-edited or
    damaged value would otherwise be resumed into a traceback, or a silently wrong data position)."""
    if not isinstance(fields, dict):
        raise TypeError("state is not a mapping")
    state = TrainingState(**fields)
    for name in _COUNTERS:
        value = getattr(state, name)
        if type(value) is not int or not 0 <= value <= _MAX_COUNTER:
            raise ValueError(f"{name} is {value!r}, expected a whole number in 0..{_MAX_COUNTER}")
    loss, scale = state.best_val_loss, state.plateau_scale
    if loss is not None and (type(loss) not in (int, float) or not math.isfinite(loss) or loss < 0):
        raise ValueError(f"best_val_loss is {loss!r}, expected null or a finite number >= 0")
    # the plateau schedule only ever cuts the rate (train.plateau_factor < 1): a scale above 1 was not saved by it
    if type(scale) not in (int, float) or not 0 < scale <= 1:
        raise ValueError(f"plateau_scale is {scale!r}, expected a number in (0, 1]")
    if not isinstance(state.config_hash, str) or not isinstance(state.extra, dict):
        raise TypeError("config_hash must be text and extra a mapping")
    return state


def _verify_hashes(path: Path, hashes: dict[str, str], wanted: list[str]) -> None:
    not_saved = sorted(set(wanted) - hashes.keys())
    if not_saved:
        raise _Unusable(f"it does not hold {not_saved} (saved with other modules or tensors?)")
    for name, recorded in sorted(hashes.items()):
        if PurePath(name).name != name or not (path / name).is_file():
            raise _Unusable(f"{name} is missing")
        if (path / name).is_symlink():  # a checkpoint is what was saved in its folder, not what a link reaches
            raise _Unusable(f"{name} is a symbolic link; a checkpoint's files are its own")
        actual = sha256_file(path / name)
        if actual != recorded:
            raise _Unusable(f"{name} has sha256 {actual[:16]}..., {STATE_FILE} recorded {recorded[:16]}...: "
                            "truncated or damaged")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for every malformed file
        raise _Unusable(f"{path.name} fails to load as safetensors ({error})") from error


def _check_layout(loaded: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], where: str) -> None:
    if loaded.keys() != live.keys():
        raise _Unusable(f"{where}: keys differ (missing {sorted(live.keys() - loaded.keys())[:5]}, "
                        f"unexpected {sorted(loaded.keys() - live.keys())[:5]})")
    wrong = [f"{key} {tuple(loaded[key].shape)} != {tuple(value.shape)}"
             for key, value in live.items() if loaded[key].shape != value.shape]
    if wrong:
        raise _Unusable(f"{where}: shapes differ ({'; '.join(wrong[:5])})")


def _optimizer_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as it was saved: the JSON part with the tensors put back."""
    try:
        rest = read_json(path / "optimizer.json", "the checkpoint is damaged")
        state = {int(index): entries for index, entries in rest["state"].items()}
        for key, value in _load_tensors(path / "optimizer.safetensors").items():
            _, index, name = key.split(".", 2)
            state[int(index)][name] = value
        groups = rest["param_groups"]
        for saved, live in zip(groups, optimizer.param_groups):  # JSON has no tuples (AdamW's betas)
            saved.update({key: tuple(value) for key, value in saved.items() if isinstance(live.get(key), tuple)})
        sizes = [len(group["params"]) for group in groups]
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise _Unusable(f"optimizer.json/optimizer.safetensors are malformed ({error!r})") from error
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        raise _Unusable(f"its optimizer's parameter groups hold {sizes} parameters, this run's "
                        f"{[len(group['params']) for group in optimizer.param_groups]}")
    saved_ids = [index for group in groups for index in group["params"]]
    live = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if len(set(saved_ids)) != len(saved_ids) or not all(type(index) is int for index in saved_ids):
        raise _Unusable("optimizer.json: its parameter groups do not list each parameter once")
    _check_same_settings(groups, optimizer.param_groups, optimizer)
    # load_state_dict gives saved parameter id k's state to the live parameter at k's place in the saved groups
    _check_moments(state, dict(zip(saved_ids, live)), _state_keys(optimizer))
    return {"state": state, "param_groups": groups}


def _check_same_settings(saved: list[dict], live: list[dict], optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` replaces each live group's settings with the saved ones: a checkpoint edited to
    ``maximize`` (gradient ascent), another weight decay or ``amsgrad`` (a KeyError at the first step) would
    override this run's. The learning rate moves during a run (the schedule sets it every step), and ``foreach``
    is a kernel choice the fused step ignores. A setting the saved group lacks (an older torch
    did not write it) is one torch fills with its default as it loads: that default must be this run's. One only
    the saved group has (a newer torch) is not read by this one."""
    fills = _filled_by_torch(optimizer)
    for number, (saved_group, live_group) in enumerate(zip(saved, live)):
        for key, value in live_group.items():
            if key == "foreach" and not (saved_group.get(key) is None or type(saved_group[key]) is bool):
                raise _Unusable(f"optimizer.json: parameter group {number}'s {key} is {repr(saved_group[key])[:40]}, "
                                f"expected true, false or null")
            if key in _NOT_COMPARED or key == "params":
                continue
            if key not in saved_group:
                if key in fills and fills[key] == value and type(fills[key]) is type(value):
                    continue
                raise _Unusable(f"optimizer.json: parameter group {number} has no {key}, this run's is {value!r}")
            if type(saved_group[key]) is not type(value) or saved_group[key] != value:
                raise _Unusable(f"optimizer.json: parameter group {number}'s {key} is {repr(saved_group[key])[:40]}, "
                                f"this run's is {value!r}")


def _filled_by_torch(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The settings Adam's and AdamW's ``__setstate__`` give a loaded group that lacks them."""
    base = getattr(optimizer, "optimizer", optimizer)
    return {"maximize": False, "amsgrad": False, "capturable": False, "differentiable": False,
            "decoupled_weight_decay": isinstance(base, torch.optim.AdamW)}


# set by the schedule as the run goes, or (foreach) a kernel choice the fused step ignores. `fused` is compared:
# the trainer's step hands the fused kernel `found_inf`, which the other AdamW kernels refuse.
_NOT_COMPARED = frozenset({"lr", "initial_lr", "foreach"})


def _state_keys(optimizer: torch.optim.Optimizer) -> frozenset[str] | None:
    """The per-parameter state keys the optimizer keeps once it has stepped (Adam and AdamW); None: unknown."""
    base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    amsgrad = any(group.get("amsgrad") for group in base.param_groups)
    return frozenset({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set()))


def _check_moments(state: dict[int, dict[str, Any]], parameters: dict[int, torch.Tensor],
                   keys: frozenset[str] | None) -> None:
    """Each parameter's saved state has the optimizer's keys, its step a scalar and every other tensor (AdamW's
    moments) its parameter's shape: ``load_state_dict`` checks none of it, and a fused step through a smaller
    buffer corrupts memory."""
    for index, entries in state.items():
        if not isinstance(entries, dict):
            raise _Unusable(f"optimizer state of parameter {index} is {type(entries).__name__}, not a mapping")
        if index not in parameters:
            raise _Unusable(f"optimizer state for parameter {index}, which its parameter groups do not list")
        if keys is not None and set(entries) != keys:
            raise _Unusable(f"optimizer state of parameter {index} holds {sorted(entries)}, expected {sorted(keys)}")
        if "step" in entries:
            _check_step(index, entries["step"])
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            wanted = () if key == "step" else tuple(parameters[index].shape)
            if tuple(value.shape) != wanted and not (key == "step" and value.numel() == 1):
                raise _Unusable(f"optimizer.safetensors: state.{index}.{key} {tuple(value.shape)} != {wanted}")


def _check_step(index: int, step: Any) -> None:
    """AdamW's step count: a whole number of steps taken, at least 0 (its bias correction divides by
    ``1 - beta ** step``: a negative or NaN step scales every update wrongly, text fails inside torch)."""
    if isinstance(step, torch.Tensor):
        value = float(step.reshape(-1)[0]) if step.numel() == 1 and step.is_floating_point() else None
    elif isinstance(step, (int, float)) and not isinstance(step, bool) and abs(step) < 2 ** 53:
        value = float(step)  # a step count past 2**53 is no count this run can have reached (nor a float hold)
    else:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or value != int(value):
        raise _Unusable(f"optimizer state of parameter {index}: step {repr(step)[:40]} is not a count of steps taken")
