"""Part (a): the tiny profile's whole `dvc repro` and `cxr-diffusion generate` on one device, and where each ran.

    python benchmarks/gpu_check/pipeline_check.py --device cuda --result a.json   # in a scratch copy of the repo

Switches the copy to the tiny profile with ``device: <device>``, runs every stage (`dvc repro --single-item`,
in `dvc stage list` order) and `generate`, printing each one's seconds. Then checks the device every model
stage recorded. Which stages those are is read from the run itself, not listed here: every stage whose
resolved params in dvc.lock include ``device`` (the stages that place a model) must have written a
``device`` field into one of its outs (a JSON or YAML file, at the top level or one level down), and every
such field, in any stage's outs, must name the device asked for. The one exception is derived from the params too:
encode_latents runs no model when ``train.space`` is ``pixel``. CPU tests cannot see a tensor left on the
wrong device; this can.

Without a ``.git`` folder (the scratch copy has none) DVC runs in its no-SCM mode (``core.no_scm``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from common import check_device, markdown_table, run_with_limit, write_result

RECORD_SUFFIXES = (".json", ".yaml", ".yml")
MAX_RECORD_BYTES = 1 << 20  # a metrics or settings file; larger JSON files are data, not a record


def set_device(params_file: Path, device: str) -> None:
    """The one top-level ``device:`` line of params.yaml set to ``device``, checked through the typed params."""
    from cxr_diffusion.params_file import load_params

    text, count = re.subn(r"^device: .*$", f"device: {device}  # gpu_check: every model stage must run there",
                          params_file.read_text(), count=1, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"{params_file}: no top-level 'device:' line to set")
    params_file.write_text(text)
    if load_params(params_file).device != device:
        raise SystemExit(f"{params_file}: device did not become {device}")


def recorded_devices(path: Path) -> list[tuple[str, str]]:
    """(file, device) for every JSON/YAML file at or under ``path`` with a ``device`` field at its top level or
    in one of its top-level mappings (one level down, e.g. ``info.device``)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    found = []
    for file in files:
        if file.suffix not in RECORD_SUFFIXES or file.stat().st_size > MAX_RECORD_BYTES:
            continue
        text = file.read_text(errors="replace")
        try:
            value = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            continue
        if not isinstance(value, dict):
            continue
        if "device" in value:
            found.append((str(file), str(value["device"])))
        # A fixed published layout keeps its own top level: the ELIXR snapshot's datasets.json records it under "info".
        found += [(f"{file} ({key})", str(inner["device"])) for key, inner in value.items()
                  if isinstance(inner, dict) and "device" in inner and not isinstance(inner["device"], dict)]
    return found


def device_records(lock: dict) -> dict[str, dict]:
    """Per stage of dvc.lock: whether it reads the ``device`` param, and the devices its outs recorded."""
    records = {}
    for stage, entry in lock.get("stages", {}).items():
        params = entry.get("params", {}).get("params.yaml", {})
        found = [record for out in entry.get("outs", []) for record in recorded_devices(Path(out["path"]))]
        records[stage] = {"reads_device": "device" in params, "recorded": found,
                          "pixel_space": params.get("train.space", params.get("train", {}).get("space")) == "pixel"}
    return records


def check_devices(records: dict[str, dict], generated: Path, device: str) -> tuple[list[list[str]], list[str]]:
    """Table rows and the problems: a device stage that recorded none, or any record not on ``device``."""
    def on_device(value: str) -> bool:
        return value.startswith("cuda") if device.startswith("cuda") else value == device

    rows, problems = [], []
    settings = generated / "settings.json"
    records = {**records, "generate": {"reads_device": True, "pixel_space": False,
                                       "recorded": recorded_devices(settings) if settings.is_file() else []}}
    for stage, record in records.items():
        exempt = stage == "encode_latents" and record["pixel_space"]  # pixel space: no VAE, no model
        if not record["recorded"]:
            if record["reads_device"] and not exempt:
                problems.append(f"{stage}: reads the device param but recorded no device")
                rows.append([stage, "NONE RECORDED", "-"])
            elif record["reads_device"]:
                rows.append([stage, "none (train.space: pixel, no model)", "-"])
            continue
        for where, value in record["recorded"]:
            if not on_device(value):
                problems.append(f"{stage}: {where} says {value!r}, not {device}")
            rows.append([stage, value if on_device(value) else f"WRONG: {value}", where])
    return rows, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--result", default=None)
    parser.add_argument("--logs", type=Path, default=Path("gpu_check_logs"), help="one log per stage")
    parser.add_argument("--time-limit", type=float, default=170.0, help="seconds for this whole part")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    check_device(args.device)
    # The stages' commands (`python stages/...`, `accelerate launch`) must find this environment's tools.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    python = [sys.executable]
    args.logs.mkdir(parents=True, exist_ok=True)

    def step(name: str, command: list[str]) -> dict:
        code, seconds = run_with_limit(command, deadline - time.monotonic(), log=args.logs / f"{name}.log")
        status = "ok" if code == 0 else "timed out" if code == 124 else f"failed (exit {code})"
        print(f"{name:28s} {seconds:7.1f} s  {status}", flush=True)
        if code != 0:
            print("".join((args.logs / f"{name}.log").read_text(errors="replace").splitlines(True)[-30:]))
        return {"step": name, "seconds": round(seconds, 1), "status": status}

    steps = [step("profile tiny", python + ["-m", "cxr_diffusion.cli", "profile", "tiny"])]
    set_device(Path("params.yaml"), args.device)
    if not Path(".git").exists():
        steps.append(step("dvc no-SCM mode", python + ["-m", "dvc", "config", "--local", "core.no_scm", "true"]))
    listed = run_with_limit(python + ["-m", "dvc", "stage", "list", "--name-only"], 60, log=args.logs / "stages.txt")
    stages = (args.logs / "stages.txt").read_text().split() if listed[0] == 0 else []
    print(f"\n{len(stages)} stages: {' '.join(stages)}\n", flush=True)
    for stage in stages:
        steps.append(step(stage, python + ["-m", "dvc", "repro", "--single-item", stage]))
        if steps[-1]["status"] != "ok":
            break
    if all(s["status"] == "ok" for s in steps) and stages:
        steps.append(step("generate", python + ["-m", "cxr_diffusion.cli", "generate", "models/clip_text", "--prompt",
                                                "chest x-ray showing effusion", "--num-images", "4", "--steps", "10",
                                                "--device", args.device, "--out", "generated"]))
    ran_all = bool(stages) and all(s["status"] == "ok" for s in steps)

    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").is_file() else {}
    rows, problems = check_devices(device_records(lock), Path("generated"), args.device)
    if not ran_all:
        problems.insert(0, "the pipeline did not run to the end (see the step that failed above)")
    print(f"\n## (a) tiny profile: dvc repro + generate on {args.device}\n")
    print(markdown_table(["step", "seconds", "status"], [[s["step"], f"{s['seconds']:.1f}", s["status"]] for s in steps]))
    print("\n### device each model stage recorded\n")
    print(markdown_table(["stage", "device", "recorded in"], rows))
    print("\n" + ("\n".join(f"FAIL: {p}" for p in problems) if problems
                  else f"every model stage and generate ran on {args.device}"))
    write_result(args.result, {"part": "a", "status": "ok" if not problems else "failed", "steps": steps,
                               "devices": rows, "problems": problems})
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
