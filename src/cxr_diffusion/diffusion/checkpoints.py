"""Save and exactly resume the training of one model, with nothing pickled.

A checkpoint is a directory ``step-{step:08d}/`` holding:

``{name}.safetensors``     one per module ``state_dict`` and per extra tensor dict (e.g. EMA shadow params)
``optimizer.safetensors``  every tensor of the optimizer state, as ``state.{param_index}.{key}``
                           (and ``param_groups.{group_index}.{key}`` for a tensor-valued lr)
``optimizer.json``         the param groups and the non-tensor state entries
``rng.safetensors``        the caller's RNG states, handed back on load for the caller to restore
``state.json``             the TrainingState and the sha256 of every other file; written last, so
                           its presence marks a complete checkpoint

Tensors live in safetensors and everything else in JSON, so loading a checkpoint someone hands
us never runs their code. The directory is built beside its final name and renamed into place, and
every file is checked against its recorded hash on load, so a save killed halfway or a file damaged
later is skipped in favour of the previous checkpoint instead of being half-loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_directory, sha256_file

FORMAT_VERSION = 1
STATE_FILE = "state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
_RESERVED_NAMES = frozenset({"optimizer", "rng", "state"})
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # becomes a file name: no separators, no dots
_CHECKPOINT_DIR = re.compile(r"step-(\d{8,})")
# Leftovers of a save that was killed: atomic_directory's temp dirs and the old copy it swaps out.
_LEFTOVER_PATTERNS = (".step-*.tmp", ".step-*.old")


class CheckpointError(UserError, ValueError):
    """What the trainer asked to save cannot be saved as it is (bad name, non-JSON value...)."""


class _Unusable(Exception):
    """A checkpoint on disk cannot be resumed; the message says why, for the log line."""


@dataclass
class TrainingState:
    step: int            # optimizer steps done
    images_seen: int
    epoch: int
    batch_in_epoch: int  # batches of the current epoch already consumed (where the data resumes)
    config_hash: str     # a checkpoint written under another config is never resumed
    extra: dict = field(default_factory=dict)  # JSON-able: scheduler state_dict, counters, best val loss...


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainingState
    rng: dict[str, torch.Tensor]  # as given to save_checkpoint; the caller restores its generators


@dataclass
class _VerifiedContents:
    """Everything a checkpoint holds, read and checked against the live objects before any is touched."""

    modules: dict[str, dict[str, torch.Tensor]]
    tensors: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


# ---------------------------------------------------------------- config hash

def config_hash(config: object) -> str:
    """First 16 hex digits of the sha256 of the config as canonical JSON.

    Canonical: dataclasses become dicts, tuples become lists, keys are sorted, paths are POSIX
    strings, so a config and the same config read back from YAML or JSON hash alike.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        payload = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        payload = dict(config)
    else:
        raise TypeError(f"config_hash takes a dataclass instance or a dict, not {type(config).__name__}")
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False, default=_canonical_config_value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"config_hash: the config cannot be written as canonical JSON ({error}); "
                        "keep config values to numbers, strings, bools, None, lists, dicts, paths and dataclasses") from error
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def _canonical_config_value(value: object) -> object:
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"a config value of type {type(value).__name__} ({value!r}) has no canonical JSON form")


# ---------------------------------------------------------------- save

def save_checkpoint(directory: Path, state: TrainingState, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor], total_limit: int,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, *,
                    log: Callable[[str], None] = print) -> Path:
    """Write ``directory/step-{state.step:08d}/`` atomically, then prune; return its path.

    After the write, complete checkpoints newer than this one are deleted (they belong to a run that
    was abandoned: we resumed from an earlier one or restarted, and load would otherwise pick them
    first), then the oldest beyond ``total_limit``, then leftovers of interrupted saves.
    """
    directory = Path(directory)
    tensors = tensors or {}
    if isinstance(total_limit, bool) or not isinstance(total_limit, int) or total_limit < 1:
        raise CheckpointError(f"save_checkpoint: total_limit must be an int >= 1 (checkpoints kept), got {total_limit!r}")
    if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
        raise CheckpointError(f"save_checkpoint: TrainingState.step must be an int >= 0, got {state.step!r}")
    _check_names(modules, tensors)
    # Everything that can fail on bad input is checked before the first large file is written.
    optimizer_tensors, optimizer_plain = _split_optimizer_state(optimizer.state_dict())
    optimizer_text = _json_text(optimizer_plain, where=f"{OPTIMIZER_JSON} ({type(optimizer).__name__}.state_dict())")
    _json_text(dataclasses.asdict(state), where=f"{STATE_FILE} (TrainingState; look at its `extra`)")
    _check_all_tensors(rng, where="rng[{key!r}]")

    target = directory / f"step-{state.step:08d}"
    with atomic_directory(target) as tmp:
        files: dict[str, str] = {}
        for name, module in modules.items():
            files[f"{name}.safetensors"] = _write_tensors(tmp / f"{name}.safetensors", module.state_dict(),
                                                          where=f"module {name!r} state_dict()")
        for name, entries in tensors.items():
            files[f"{name}.safetensors"] = _write_tensors(tmp / f"{name}.safetensors", entries, where=f"tensors[{name!r}]")
        files[OPTIMIZER_TENSORS] = _write_tensors(tmp / OPTIMIZER_TENSORS, optimizer_tensors, where="optimizer state")
        (tmp / OPTIMIZER_JSON).write_text(optimizer_text)
        files[OPTIMIZER_JSON] = sha256_file(tmp / OPTIMIZER_JSON)
        files[RNG_FILE] = _write_tensors(tmp / RNG_FILE, rng, where="rng")
        (tmp / STATE_FILE).write_text(_state_text(state, files))  # last: marks the checkpoint complete
    _prune(directory, target, total_limit, log)
    return target


def _check_names(modules: Mapping[str, object], tensors: Mapping[str, object]) -> None:
    for kind, names in (("modules", modules), ("tensors", tensors)):
        for name in names:
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
                raise CheckpointError(f"save_checkpoint: {kind} key {name!r} becomes a file name: use letters, digits, "
                                      f"'_' or '-', and none of {sorted(_RESERVED_NAMES)}")
    shared = sorted(set(modules) & set(tensors))
    if shared:
        raise CheckpointError(f"save_checkpoint: {shared} named in both modules and tensors would share one file; rename one")


def _check_all_tensors(entries: Mapping[str, object], where: str) -> None:
    """``where`` is a format string with a ``{key}`` field, filled in for the entry at fault."""
    for key, value in entries.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where.format(key=key)}: keys must be strings, got {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where.format(key=key)} is a {type(value).__name__}, not a tensor: only tensors "
                                  "go to safetensors; put other values in TrainingState.extra")


def _write_tensors(path: Path, entries: Mapping[str, torch.Tensor], where: str) -> str:
    """Save to safetensors and return the file's sha256."""
    _check_all_tensors(entries, where=f"{where}[{{key!r}}]")
    save_file(_writable(entries), str(path))
    return sha256_file(path)


def _writable(entries: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors accepts: dense CPU tensors that each own their whole storage.

    Only the tensors that are not already so are copied (accelerator tensors, views, tied weights).
    safetensors writes from the tensors' own memory, so a CPU state is written with no second copy:
    at SD-1.5 size the optimizer state alone is 6.9 GB.
    """
    writable, storages = {}, set()
    for key, value in entries.items():
        value = value.detach()
        storage = value.untyped_storage()
        owns_storage = (value.device.type == "cpu" and value.is_contiguous() and value.storage_offset() == 0
                        and storage.nbytes() == value.nbytes and storage.data_ptr() not in storages)
        if not owns_storage:
            value = value.to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            storage = value.untyped_storage()
        storages.add(storage.data_ptr())
        writable[key] = value
    return writable


def _split_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (for safetensors) and everything else (for JSON) of ``optimizer.state_dict()``."""
    tensors: dict[str, torch.Tensor] = {}

    def plain_part(entries: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Move the tensors of ``entries`` into ``tensors`` under ``prefix.key``; return the rest."""
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{key}"] = value
            else:
                plain[key] = value
        return plain

    groups = [plain_part(group, f"param_groups.{i}") for i, group in enumerate(state_dict["param_groups"])]
    state = {str(i): plain_part(entries, f"state.{i}") for i, entries in state_dict["state"].items()}
    return tensors, {"param_groups": groups, "state": state}


def _json_text(payload: object, where: str) -> str:
    try:
        return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where} cannot be written as JSON ({error}); use numbers, strings, bools, None, "
                              "lists and str-keyed dicts (None rather than inf/nan), or pass tensors separately") from error


def _state_text(state: TrainingState, files: dict[str, str]) -> str:
    payload = {"format_version": FORMAT_VERSION, **dataclasses.asdict(state), "files": files}
    # state.json is the one file not in `files`; it carries its own checksum instead.
    payload["state_sha256"] = _payload_digest(payload)
    return _json_text(payload, where=STATE_FILE)


def _payload_digest(payload: Mapping[str, Any]) -> str:
    body = {key: value for key, value in payload.items() if key != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _prune(directory: Path, saved: Path, total_limit: int, log: Callable[[str], None]) -> None:
    for pattern in _LEFTOVER_PATTERNS:
        for leftover in directory.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    saved_step = _step_of(saved)
    kept = []
    for path in _checkpoint_dirs(directory):
        if not (path / STATE_FILE).is_file():
            log(f"checkpoint: removing {path}: incomplete (no {STATE_FILE}), left by an interrupted save")
            _remove_checkpoint(path)
        elif _step_of(path) > saved_step:
            log(f"checkpoint: removing {path}: newer than the step-{saved_step:08d} just saved, so it belongs "
                "to an abandoned run (resumed from an earlier checkpoint or restarted from scratch)")
            _remove_checkpoint(path)
        else:
            kept.append(path)
    for path in kept[:-total_limit]:
        _remove_checkpoint(path)


def _remove_checkpoint(path: Path) -> None:
    # state.json goes first: a delete killed halfway leaves an incomplete checkpoint, never a
    # "complete" one with files missing.
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


# ---------------------------------------------------------------- list and load

def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json) in ``directory``, oldest first."""
    return [path for path in _checkpoint_dirs(Path(directory)) if (path / STATE_FILE).is_file()]


def _checkpoint_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and _CHECKPOINT_DIR.fullmatch(path.name)]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_CHECKPOINT_DIR.fullmatch(path.name).group(1))


def load_latest_checkpoint(directory: Path, expected_config_hash: str, modules: dict[str, torch.nn.Module],
                           optimizer: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                           log: Callable[[str], None] = print) -> LoadedCheckpoint | None:
    """Restore the newest usable checkpoint into ``modules``, ``optimizer`` and ``tensors``.

    Incomplete or corrupt checkpoints are logged and skipped for the previous one. The newest
    readable checkpoint written under another config stops the search: None, start from scratch.
    Nothing is modified unless a checkpoint passed every check.
    """
    directory = Path(directory)
    tensors = tensors or {}
    candidates = _checkpoint_dirs(directory)
    if not candidates:
        log(f"checkpoint: no checkpoint in {directory}; starting from scratch")
        return None
    for path in reversed(candidates):
        try:
            state, files = _read_state(path)
        except _Unusable as why:
            log(f"checkpoint: skipping {path}: {why}")
            continue
        if state.config_hash != expected_config_hash:
            log(f"checkpoint: not resuming {path}: it was written under config hash {state.config_hash}, this run's "
                f"config hash is {expected_config_hash}; starting from scratch")
            return None
        try:
            contents = _read_verified(path, files, modules, optimizer, tensors)
        except _Unusable as why:
            log(f"checkpoint: skipping {path}: {why}")
            continue
        _apply(contents, modules, optimizer, tensors)
        log(f"checkpoint: resumed from {path} (step {state.step}, {state.images_seen} images seen)")
        return LoadedCheckpoint(path=path, state=state, rng=contents.rng)
    log(f"checkpoint: no usable checkpoint in {directory}; starting from scratch")
    return None


def _read_state(path: Path) -> tuple[TrainingState, dict[str, str]]:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise _Unusable(f"incomplete: no {STATE_FILE} (the save was interrupted)")
    try:
        payload = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Unusable(f"{STATE_FILE} cannot be read as JSON ({error}): truncated or corrupt") from error
    if not isinstance(payload, dict) or payload.get("state_sha256") != _payload_digest(payload):
        raise _Unusable(f"{STATE_FILE} does not match its own checksum: corrupt")
    if payload.get("format_version") != FORMAT_VERSION:
        raise _Unusable(f"{STATE_FILE} has format_version {payload.get('format_version')!r}; "
                        f"this code reads {FORMAT_VERSION}")
    expected_types = {"step": int, "images_seen": int, "epoch": int, "batch_in_epoch": int, "config_hash": str, "extra": dict}
    for key, kind in expected_types.items():
        if not isinstance(payload.get(key), kind):
            raise _Unusable(f"{STATE_FILE}: {key} should be {kind.__name__}, found {payload.get(key)!r}")
    files = payload.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) and isinstance(digest, str)
                                              for name, digest in files.items()):
        raise _Unusable(f"{STATE_FILE}: `files` should map file names to sha256 digests")
    return TrainingState(**{key: payload[key] for key in expected_types}), files


def _read_verified(path: Path, files: dict[str, str], modules: Mapping[str, torch.nn.Module],
                   optimizer: torch.optim.Optimizer, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> _VerifiedContents:
    wanted = {f"{name}.safetensors" for name in [*modules, *tensors]} | {OPTIMIZER_TENSORS, OPTIMIZER_JSON, RNG_FILE}
    not_recorded = sorted(wanted - set(files))
    if not_recorded:
        raise _Unusable(f"it does not hold {not_recorded} (saved with other modules or tensors?)")
    for name, recorded in sorted(files.items()):
        if PurePath(name).name != name:
            raise _Unusable(f"{STATE_FILE} lists {name!r}, which is not a plain file name")
        if not (path / name).is_file():
            raise _Unusable(f"{name} is missing")
        actual = sha256_file(path / name)
        if actual != recorded:
            raise _Unusable(f"{name} has sha256 {actual[:16]}..., {STATE_FILE} recorded {recorded[:16]}...: truncated or corrupt")

    module_states = {}
    for name, module in modules.items():
        loaded = _load_tensors(path / f"{name}.safetensors")
        _check_matches(loaded, module.state_dict(), where=f"{name}.safetensors vs module {name!r}")
        module_states[name] = loaded
    tensor_states = {}
    for name, entries in tensors.items():
        loaded = _load_tensors(path / f"{name}.safetensors")
        _check_matches(loaded, entries, where=f"{name}.safetensors vs tensors[{name!r}]")
        tensor_states[name] = loaded
    try:
        optimizer_plain = json.loads((path / OPTIMIZER_JSON).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Unusable(f"{OPTIMIZER_JSON} cannot be read as JSON ({error})") from error
    optimizer_state = _rebuild_optimizer_state(optimizer_plain, _load_tensors(path / OPTIMIZER_TENSORS), optimizer)
    return _VerifiedContents(module_states, tensor_states, optimizer_state, _load_tensors(path / RNG_FILE))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for every malformed file
        raise _Unusable(f"{path.name} fails to load as safetensors ({error})") from error


def _check_matches(loaded: Mapping[str, torch.Tensor], live: Mapping[str, Any], where: str) -> None:
    live_tensors = {key: value for key, value in live.items() if isinstance(value, torch.Tensor)}
    missing, unexpected = sorted(set(live_tensors) - set(loaded)), sorted(set(loaded) - set(live_tensors))
    if missing or unexpected:
        raise _Unusable(f"{where}: keys differ (missing {missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [f"{key} {tuple(loaded[key].shape)} != {tuple(value.shape)}"
             for key, value in live_tensors.items() if loaded[key].shape != value.shape]
    if wrong:
        raise _Unusable(f"{where}: shapes differ ({'; '.join(wrong[:5])})")


def _rebuild_optimizer_state(plain: object, tensors: dict[str, torch.Tensor],
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as it was saved, checked against the live optimizer's groups."""
    try:
        groups = [dict(group) for group in plain["param_groups"]]
        state = {int(index): dict(entries) for index, entries in plain["state"].items()}
        for key, value in tensors.items():
            section, index, name = key.split(".", 2)
            if section == "state":
                state.setdefault(int(index), {})[name] = value
            elif section == "param_groups":
                groups[int(index)][name] = value
            else:
                raise ValueError(f"unknown tensor key {key!r}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise _Unusable(f"{OPTIMIZER_JSON}/{OPTIMIZER_TENSORS} are malformed ({error!r})") from error
    live_groups = optimizer.param_groups
    if len(groups) != len(live_groups):
        raise _Unusable(f"the optimizer has {len(live_groups)} param groups, the checkpoint {len(groups)}")
    known_params = set()
    for index, (saved, live) in enumerate(zip(groups, live_groups)):
        params = saved.get("params")
        if not isinstance(params, list) or len(params) != len(live["params"]):
            raise _Unusable(f"param group {index} has {len(live['params'])} parameters, the checkpoint "
                            f"{len(params) if isinstance(params, list) else params!r}")
        known_params.update(params)
        for key, value in saved.items():
            # JSON has no tuples; give back the live group's type (AdamW's betas) so nothing downstream differs.
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                saved[key] = tuple(value)
    stray = sorted(set(state) - known_params)
    if stray:
        raise _Unusable(f"optimizer state refers to parameters {stray[:5]} that no param group holds")
    return {"state": state, "param_groups": groups}


def _apply(contents: _VerifiedContents, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
           tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for name, module in modules.items():
        module.load_state_dict(contents.modules[name], strict=True)
    with torch.no_grad():
        for name, entries in tensors.items():
            for key, target in entries.items():
                target.copy_(contents.tensors[name][key])
    optimizer.load_state_dict(contents.optimizer)
