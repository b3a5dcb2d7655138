#!/usr/bin/env bash
# Builds wheelhouse/ (gitignored) for the offline GPU check: the project's wheel and the wheels a typical
# CUDA image lacks, for CPython 3.12 manylinux x86_64. Run it where the package index is reachable, from
# any folder; then carry wheelhouse/ with the working tree to the GPU machine and run run.sh there.
#
#   bash benchmarks/gpu_check/build_wheelhouse.sh
#   IMAGE_PACKAGES=image-freeze.txt bash benchmarks/gpu_check/build_wheelhouse.sh   # what the image really has
#   BUILD_PYTHON=/path/to/python3.12 bash benchmarks/gpu_check/build_wheelhouse.sh
#
# IMAGE_PACKAGES (default: image-packages.txt beside this script, the typical image) is a requirements file;
# the most exact is the image's own `python -m pip list --format=freeze`, which run.sh saves on each run.
# Resolution is pip's own (`pip lock`, in a throwaway venv with a current pip); see wheelhouse.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/cxr-wheelhouse.XXXXXX")
trap 'rm -rf "$work"' EXIT
"${BUILD_PYTHON:-python3.12}" -m venv --upgrade-deps "$work/resolver" >/dev/null   # a pip that has `pip lock`
"$work/resolver/bin/python" "$here/wheelhouse.py" --repo "$repo" --out "$repo/wheelhouse" --work "$work" \
    --image-packages "${IMAGE_PACKAGES:-$here/image-packages.txt}"
