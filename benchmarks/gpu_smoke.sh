#!/usr/bin/env bash
# The tiny profile's whole `dvc repro` and `cxr-diffusion generate` on CUDA, in a scratch copy of this
# working tree. Prints each stage's time and the device it recorded, then fails if any stage that runs
# a model did not record CUDA. CPU tests cannot see a tensor left on the wrong device; this can.
#
#   bash benchmarks/gpu_smoke.sh            # makes its own venv with the CUDA build of torch
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_smoke.sh   # reuse an environment that has it
#   SMOKE_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_smoke.sh   # rehearse the script itself on a CPU
set -euo pipefail
device=${SMOKE_DEVICE:-cuda}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/cxr-gpu-smoke.XXXXXX")
echo "scratch copy: $work"
tar -C "$repo" --exclude=./.venv --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude=./checkpoints \
    --exclude=./data --exclude=./models -cf - . | tar -C "$work" -xf -
cd "$work"
git checkout --quiet -- data models 2>/dev/null || true   # the .gitignore files DVC keeps there

if [ -z "${PYTHON:-}" ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1   # CUDA build
    .venv/bin/python -m pip install --quiet -e ".[test]"
    .venv/bin/python -m pip install --quiet --no-deps torchxrayvision
    PYTHON=.venv/bin/python
fi
bin=$(dirname "$PYTHON")
export PATH="$bin:$PATH"
if [ "$device" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('GPU:', torch.cuda.get_device_name(0))"
fi

cxr-diffusion profile tiny
sed -i "s/^device: auto .*/device: $device  # gpu_smoke: every model stage must run there/" params.yaml
grep -q "^device: $device" params.yaml

printf '%-28s %6s\n' stage seconds
for stage in $(dvc stage list --name-only); do
    started=$(date +%s%N)
    dvc repro --single-item "$stage" > "smoke-$stage.log" 2>&1 || { cat "smoke-$stage.log"; exit 1; }
    elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
    printf '%-28s %4d.%01d\n' "$stage" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
done

cxr-diffusion generate models/clip_text --prompt "chest x-ray showing effusion" --num-images 4 --steps 10 \
    --device "$device" --out generated
SMOKE_DEVICE=$device python - <<'EOF'
"""Which device every model stage recorded; fails when one that runs a model did not use CUDA."""
import json
import os
from pathlib import Path

device = os.environ["SMOKE_DEVICE"]

recorded = {}
for path in sorted(Path("metrics").rglob("*.json")):
    value = json.loads(path.read_text())
    if isinstance(value, dict) and "device" in value:
        recorded[str(path)] = value["device"]
for path in sorted(Path("dvclive").glob("*/params.yaml")):
    for line in path.read_text().splitlines():
        if line.startswith("device:"):
            recorded[str(path)] = line.split(":", 1)[1].strip()
recorded["generated/settings.json"] = json.loads(Path("generated/settings.json").read_text())["device"]
for where, device in recorded.items():
    print(f"{where:44s} {device}")
expected = ["metrics/clip.json", "metrics/embed_clip_text.json", "metrics/embed_clip_vision.json",
            "metrics/evaluator.json", "generated/settings.json"]
expected += [f"metrics/{kind}/{branch}.json" for kind in ("sample", "evaluate")
             for branch in ("clip_text", "clip_vision", "elixr")]
expected += [f"dvclive/{branch}/params.yaml" for branch in ("clip_text", "clip_vision", "elixr")]
wrong = [where for where in expected if not str(recorded.get(where, "missing")).startswith(device)]
if wrong:
    raise SystemExit(f"not on {device}: {', '.join(wrong)}")
print(f"every model stage and generate ran on {device}")
EOF
