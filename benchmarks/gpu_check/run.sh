#!/usr/bin/env bash
# The offline GPU check. On the air-gapped GPU machine, from the repository root, with wheelhouse/ built by
# build_wheelhouse.sh (where the package index is reachable) and carried along:
#
#   bash benchmarks/gpu_check/run.sh                      # CUDA: parts (a)-(d), at most 8 minutes of parts
#   bash benchmarks/gpu_check/run.sh --device cpu         # rehearse it on a CPU (shrunk sizes; it says so)
#   IMAGE_PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check/run.sh   # the image's Python (default python3)
#
# Makes a venv over the image's Python (--system-site-packages: the image's torch and transformers are the
# ones used), installs the rest from wheelhouse/ only (pip --no-index: never the network), and runs
# run_all.py in a scratch copy of the working tree without .git (DVC in no-SCM mode). The working tree's
# src/ is what runs (PYTHONPATH), so a wheel built before a later edit of src/ still tests the edit.
# Arguments go to run_all.py: --device, --parts a,b, --limit b=300, --results DIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
wheelhouse=${WHEELHOUSE:-$repo/wheelhouse}
if ! ls "$wheelhouse"/cxr_diffusion-*.whl >/dev/null 2>&1; then
    echo "no project wheel in $wheelhouse: run benchmarks/gpu_check/build_wheelhouse.sh where the index is reachable" >&2
    exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/cxr-gpu-check.XXXXXX")
echo "scratch copy and venv: $work"
mkdir "$work/tree"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./wheelhouse --exclude=./.dvc/cache --exclude=./.dvc/tmp \
    --exclude=./checkpoints --exclude=./data --exclude=./models --exclude=./dvclive --exclude=./metrics \
    --exclude=./gpu_check_results -cf - . | tar -C "$work/tree" -xf -

image_python=${IMAGE_PYTHON:-python3}
"$image_python" -m venv --system-site-packages "$work/venv"
# An image whose Python is itself a venv (/opt/venv) keeps its packages there, not in the base Python's "system"
# site-packages: name its site-packages in a .pth file too (a path already on sys.path is not added twice).
venv_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$image_python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$venv_site/image-site-packages.pth"
"$work/venv/bin/python" -m pip list --format=freeze > "$work/image-freeze.txt" 2>/dev/null || true
# Only wheelhouse/ is read: no pip configuration of this machine (indexes, find-links, constraints) applies.
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
PIP_CONFIG_FILE=/dev/null "$work/venv/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" \
    cxr-diffusion torchxrayvision
# The image's own commands (accelerate, which the train stage launches) live in the image's bin/, run by the
# image's Python, which does not see the wheelhouse's packages: give every console script the venv lacks a
# launcher in the venv's bin/ that runs it with the venv's Python.
"$work/venv/bin/python" - "$work/venv/bin" <<'EOF'
import importlib.metadata, os, sys
from pathlib import Path

bin_dir, made = Path(sys.argv[1]), 0
for entry in importlib.metadata.entry_points(group="console_scripts"):
    script = bin_dir / entry.name
    if os.sep in entry.name or script.exists():
        continue
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {entry.module} import {entry.attr.split('.')[0]} as entry\n"
                      f"for part in {entry.attr.split('.')[1:]!r}:\n    entry = getattr(entry, part)\n"
                      "sys.exit(entry())\n")
    script.chmod(0o755)
    made += 1
print(f"{made} console scripts of the image's packages given launchers in {bin_dir}")
EOF
echo "set-up (copy, venv, offline install from $(ls "$wheelhouse"/*.whl | wc -l) wheels): ${SECONDS} s"
echo "the image's packages before the install: $work/image-freeze.txt (IMAGE_PACKAGES for build_wheelhouse.sh)"

cd "$work/tree"
export PATH="$work/venv/bin:$PATH" PYTHONPATH="$work/tree/src" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1
python benchmarks/gpu_check/run_all.py "$@"
