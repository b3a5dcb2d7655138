"""DVCLive upkeep for a training run: a fresh or resumed log folder, repaired after an interrupted write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from cxr_diffusion.diffusion.checkpoints import TrainingState
from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_path, require_regular_file


MAX_SERIES_BYTES = 64 << 20  # as evaluation.training_curves reads a series (a million steps stay far below)


class LiveLogError(UserError, ValueError):
    """A file in the DVCLive folder is not what DVCLive writes there."""


def open_live(directory: Path, resumed: TrainingState | None, logged_params: dict):
    """DVCLive for this run: a fresh run's folder starts empty, a resumed run's keeps its rows up to the checkpoint."""
    from dvclive import Live

    if resumed is None:
        if Path(directory).is_symlink():  # DVC's symlink cache: drop the link, never write through it
            Path(directory).unlink()
        shutil.rmtree(directory, ignore_errors=True)
    else:
        _drop_unreadable_live_summaries(directory)
    live = Live(dir=str(directory), resume=resumed is not None, save_dvc_exp=False, dvcyaml=False)
    if resumed is not None:
        _log_truncated_live(directory, resumed.step)
    live.log_params(logged_params)
    return live


def _drop_unreadable_live_summaries(live_dir: Path) -> None:
    """DVCLive rewrites metrics.json and params.yaml in place, so a run killed mid-write leaves one cut short,
    and ``Live(resume=True)`` would fail on it. Both are summaries it writes again (the step is set from the
    checkpoint, params are logged at once); a cut-short one is dropped, a readable one kept."""
    for name, parse in (("metrics.json", json.loads), ("params.yaml", yaml.safe_load)):
        path = live_dir / name
        try:
            if path.is_file():
                parse(path.read_text(encoding="utf-8"))
        except (ValueError, yaml.YAMLError):
            print(f"{path}: cut short by an interrupted run; dropped (DVCLive writes it again)")
            path.unlink()


def _log_truncated_live(live_dir: Path, keep_until_step: int) -> None:
    """Drop DVCLive rows logged after the checkpoint we resume from (they will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        require_regular_file(tsv, LiveLogError, "remove it (DVCLive writes its series as files), then rerun")
        if tsv.stat().st_size > MAX_SERIES_BYTES:
            raise LiveLogError(f"{tsv}: larger than {MAX_SERIES_BYTES >> 20} MB, not a DVCLive series; remove it, "
                               f"then rerun")
        lines = tsv.read_text(encoding="utf-8", errors="replace").splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:  # emptied by a kill right after DVCLive created it: DVCLive starts it again
            print(f"{tsv}: no header (cut short by an interrupted run); dropped (DVCLive writes it again)")
            tsv.unlink()
            continue
        step_column = header.index("step")
        steps = [_logged_step(line, step_column, len(header)) for line in lines[1:]]
        kept = lines[:1] + [line for line, step in zip(lines[1:], steps) if step is not None and step <= keep_until_step]
        with atomic_path(tsv) as tmp:  # a kill mid-write leaves the old series, not half of it
            tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")


def _logged_step(line: str, step_column: int, columns: int) -> int | None:
    """The step of one DVCLive row; None for a row a kill cut short (dropped: it is logged again)."""
    fields = line.split("\t")
    step = fields[step_column] if len(fields) == columns else ""
    return int(step) if step.isascii() and step.isdigit() else None


def log_metrics(live, metrics: dict[str, float]) -> None:
    if live is not None:
        for name, value in metrics.items():
            live.log_metric(name, value)


def live_step_restore(live, step: int) -> None:
    """Lagged rows set ``live.step`` to their own step; put it back to the current one for what follows."""
    if live is not None:
        live.step = step
