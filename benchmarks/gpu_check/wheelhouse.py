"""Build wheelhouse/: the wheels an air-gapped CUDA image lacks to run this project, and nothing else.

Run by build_wheelhouse.sh with a Python 3.12 on Linux x86_64 whose pip has `pip lock` (25.1+); it uses
the standard library and pip only. Steps:

1. resolve the image's packages (``--image-packages``: a requirements file, top-level pins or a whole
   ``pip list --format=freeze`` of the real image) with `pip lock`: the image's full set, by metadata only
   (nothing as large as torch is downloaded);
2. build the project's wheel from this checkout (`pip wheel --no-deps`);
3. resolve the project's wheel with `pip lock`, constrained to the image's versions;
3b. a direct dependency of the project that the image has only because another of its packages pulls it in
   (resolved in 1, not named in ``--image-packages``: pydantic, which typer requires on some indexes and
   not on others) is shipped too, at 1's version, with its own dependencies that the file does not name:
   a real image may lack it. run.sh's install takes it only where the image lacks it (pip keeps what is
   installed);
4. download what 3 and 3b have and 1 does not (`pip download --no-deps`, binary wheels for CPython 3.12
   manylinux x86_64), except torchxrayvision; a package published only as an sdist is built
   (`pip wheel --no-deps`) and must come out pure Python;
5. torchxrayvision: the project reads only three of its data files (the phantom's NIH metadata, boxes and
   lung masks; their names are read from ``data/phantom/assets.py``) and finds them through
   ``importlib.util.find_spec("torchxrayvision")``. Instead of its 29 MB wheel, a local wheel named
   torchxrayvision holding an empty ``__init__.py`` and just those files, labelled in its METADATA as a
   data-only cut of the real package.

Prints each wheel, then their count and total size; fails when the folder would not travel comfortably
with the working tree (over MAX_BYTES).
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

TARGET_PYTHON = "3.12"
# manylinux_2_28 too: torch 2.11's own wheels are manylinux_2_28, so an image that runs it has glibc 2.28 or
# newer; some locked versions (pygit2 1.21) publish no manylinux_2_17 wheel any more.
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
MAX_BYTES = 48 * 2**20  # the device machine takes 64 MiB of carried paths in all
XRV = "torchxrayvision"
ASSETS_MODULE = Path("src/cxr_diffusion/data/phantom/assets.py")
EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same files give the same wheel


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    """``python -m pip`` with an argument list (no shell); a failure stops the build with pip's own message."""
    command = [sys.executable, "-m", "pip", *args]
    print("$ pip " + " ".join(args), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"pip {args[0]} failed (above); nothing usable was left in the wheelhouse")


def lock(requirements: list[str], output: Path) -> dict[str, tuple[str, bool]]:
    """`pip lock` of ``requirements`` (pip arguments) for this interpreter: {canonical name: (version, has a
    wheel)}. Wheels are preferred; a package published only as an sdist (dvc's antlr4-python3-runtime) is
    locked as one and built into a wheel later."""
    pip("lock", "--quiet", "--prefer-binary", *requirements, "-o", str(output))
    packages = tomllib.loads(output.read_text())["packages"]
    return {canonical(p["name"]): (p.get("version", "local"), bool(p.get("wheels"))) for p in packages}


def requirement_name(requirement: str) -> str | None:
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return canonical(found.group(1)) if found else None


def named_packages(requirements: Path) -> set[str]:
    """The packages a requirements file names itself (a pin, a range or a bare name; options and -r skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines())
    return {name for line in lines if line and not line.startswith("-") and (name := requirement_name(line))}


def direct_requirements(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist, extras left out."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line]


def asset_files(repo: Path) -> list[str]:
    """The torchxrayvision data files the phantom reads: the ``*_FILE`` names in data/phantom/assets.py."""
    tree = ast.parse((repo / ASSETS_MODULE).read_text())
    names = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
             and any(isinstance(t, ast.Name) and t.id.endswith("_FILE") for t in node.targets)]
    if not names:
        raise SystemExit(f"{ASSETS_MODULE}: no *_FILE names found; update asset_files() to where the files are named")
    return names


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def data_only_metadata(version: str, files: list[str]) -> str:
    listed = "\n".join(f"- torchxrayvision/data/{name}" for name in files)
    return (f"Metadata-Version: 2.1\nName: {XRV}\nVersion: {version}+datacut\n"
            f"Summary: DATA-ONLY CUT of torchxrayvision {version}: {len(files)} data files, no code. "
            f"Not the real package.\n"
            "Home-page: https://github.com/mlmed/torchxrayvision\n"
            "License: Apache-2.0 (torchxrayvision's main library; the data files are as torchxrayvision ships them)\n"
            "Description-Content-Type: text/markdown\n\n"
            f"A cut of torchxrayvision {version} made by cxr-diffusion's benchmarks/gpu_check/wheelhouse.py for "
            "air-gapped GPU checks. It holds an empty `torchxrayvision/__init__.py` and only the data files that "
            "cxr-diffusion's phantom dataset reads (it finds them with `importlib.util.find_spec`, never imports "
            f"the package):\n\n{listed}\n\nNothing of torchxrayvision's code, models or other data is here: "
            "`import torchxrayvision` gives an empty module. Install the real package for anything else.\n")


def build_data_only_wheel(real_wheel: Path, files: list[str], out_dir: Path) -> Path:
    """A py3-none-any wheel ``torchxrayvision-<version>+datacut`` with ``files`` from ``real_wheel``'s data/."""
    version = real_wheel.name.split("-")[1]
    dist_info = f"{XRV}-{version}+datacut.dist-info"
    contents: dict[str, bytes] = {f"{XRV}/__init__.py": b""}
    with zipfile.ZipFile(real_wheel) as source:
        for name in files:
            contents[f"{XRV}/data/{name}"] = source.read(f"{XRV}/data/{name}")
    contents[f"{dist_info}/METADATA"] = data_only_metadata(version, files).encode()
    contents[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: cxr-diffusion gpu_check\n"
                                      b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    contents[f"{dist_info}/top_level.txt"] = f"{XRV}\n".encode()
    record = [record_line(name, data) for name, data in contents.items()] + [f"{dist_info}/RECORD,,"]
    contents[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = out_dir / f"{XRV}-{version}+datacut-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in contents.items():
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data, compress_type=zipfile.ZIP_STORED if name.endswith((".gz", ".zip"))
                           else zipfile.ZIP_DEFLATED)
    return path


def check_interpreter() -> None:
    """`pip lock` resolves for the running Python: it must be the target's (markers, wheels)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != TARGET_PYTHON or sys.platform != "linux" or platform.machine() != "x86_64":
        raise SystemExit(f"resolving needs CPython {TARGET_PYTHON} on Linux x86_64 (the GPU image's); this is "
                         f"{here} on {sys.platform} {platform.machine()}: set BUILD_PYTHON to a python{TARGET_PYTHON}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--image-packages", type=Path, required=True, help="requirements the GPU image already has")
    parser.add_argument("--out", type=Path, required=True, help="the wheelhouse (emptied first)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    args = parser.parse_args()
    check_interpreter()
    repo, work = args.repo.resolve(), args.work.resolve()

    image = lock(["-r", str(args.image_packages.resolve())], work / "pylock.image.toml")
    print(f"image: {len(image)} packages resolved from {args.image_packages}", flush=True)
    pip("wheel", "--quiet", "--no-deps", "-w", str(work / "project"), str(repo))
    project_wheel = next((work / "project").glob("cxr_diffusion-*.whl"))
    constraints = work / "image-constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, (version, _) in sorted(image.items())))
    project = lock([str(project_wheel), "-c", str(constraints)], work / "pylock.project.toml")
    needed = {name: entry for name, entry in sorted(project.items())
              if name not in image and name not in ("cxr-diffusion", XRV)}
    print(f"project: {len(project)} packages; {len(needed)} not in the image: "
          f"{' '.join(f'{n}=={v}' for n, (v, _) in needed.items())}", flush=True)
    named = named_packages(args.image_packages)
    pulled_in = [r for r in direct_requirements(project_wheel) if (name := requirement_name(r)) in image
                 and name not in named]
    fallback: dict[str, tuple[str, bool]] = {}
    if pulled_in:
        locked = lock([*pulled_in, "-c", str(constraints)], work / "pylock.fallback.toml")
        fallback = {name: entry for name, entry in sorted(locked.items()) if name not in named and name not in needed}
        needed.update(fallback)
        print(f"fallback: the project's {', '.join(pulled_in)} the image has only through another package: "
              f"{' '.join(f'{n}=={v}' for n, (v, _) in fallback.items())}", flush=True)

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    platform_args = [arg for name in PLATFORMS for arg in ("--platform", name)]
    published = [f"{name}=={version}" for name, (version, wheel) in needed.items() if wheel]
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
        "--implementation", "cp", *platform_args, "-d", str(args.out), *published)
    sdist_only = [f"{name}=={version}" for name, (version, wheel) in needed.items() if not wheel]
    if sdist_only:
        pip("wheel", "--quiet", "--no-deps", "-w", str(work / "built"), *sdist_only)
        for built in (work / "built").glob("*.whl"):
            if not built.name.endswith("-py3-none-any.whl"):
                raise SystemExit(f"{built.name}: built from an sdist for this machine only; the GPU image needs a "
                                 "manylinux wheel of it")
            shutil.copy2(built, args.out / built.name)
    shutil.copy2(project_wheel, args.out / project_wheel.name)
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(work / "xrv"), XRV)
    build_data_only_wheel(next((work / "xrv").glob(f"{XRV}-*.whl")), asset_files(repo), args.out)

    wheels = sorted(args.out.glob("*.whl"))
    rows = [(w.name, w.stat().st_size, not w.name.endswith("-any.whl")) for w in wheels]
    total = sum(size for _, size, _ in rows)
    (args.out / "wheelhouse.json").write_text(json.dumps({
        "python": TARGET_PYTHON, "platforms": list(PLATFORMS), "image_packages": str(args.image_packages),
        "image_resolved": {name: version for name, (version, _) in image.items()},
        "fallback": {name: version for name, (version, _) in fallback.items()}, "wheels": [{"file": n, "bytes": s, "compiled": c} for n, s, c in rows]},
        indent=2) + "\n")
    width = max(len(name) for name, _, _ in rows)
    for name, size, compiled in rows:
        print(f"{name:{width}s} {size / 1e6:7.2f} MB{'  compiled' if compiled else ''}")
    print(f"\n{len(rows)} wheels, {total / 1e6:.1f} MB ({total / 2**20:.1f} MiB), "
          f"{sum(c for _, _, c in rows)} compiled: {', '.join(n.split('-')[0] for n, _, c in rows if c)}")
    if total > MAX_BYTES:
        raise SystemExit(f"{args.out}: {total / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB; it travels with the "
                         "working tree (64 MiB in all): find what pulled in the large wheels above")


if __name__ == "__main__":
    main()
