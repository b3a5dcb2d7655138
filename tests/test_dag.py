"""The DAG cannot go stale silently: every stage depends on exactly the project modules it runs.

A stage's code is one dep, `code_deps/<entry>.json`, written by stage `code_deps` from the import closure of
its entry file (read with `ast`, see `cxr_diffusion.code_closure`). These tests check that every stage
depends on its entry's file and on no module directly, that the closure holds every module an entry point
imports when it is run, and, in a locked copy of the pipeline, that editing a module makes exactly the
stages that import it stale.

Every path a stage reads or writes is written once, on its `cmd`: the entry points' path options have no
default but `--params` (DVC's params.yaml), and each cmd's paths are exactly the stage's data deps and
outs, bar a short table of exceptions, each with its reason.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_pipeline import sh
from cxr_diffusion import code_closure
from cxr_diffusion.profiles import profile_data, profile_names

PACKAGE = "cxr_diffusion"
SOURCE_ROOT = Path("src")  # the package lives at src/cxr_diffusion
PLACEHOLDER = "placeholder"


# --- reading the code -------------------------------------------------------------------------

def import_closure(repo: Path, entry: Path) -> set[Path]:
    """The library's closure of ``entry`` (relative to ``repo``), as paths relative to ``repo``."""
    return {path.relative_to(repo) for path in code_closure.import_closure(repo / SOURCE_ROOT, repo / entry)}


# --- reading dvc.yaml ---------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{\s*([\w.@-]+)\s*\}")


def _lookup(context: dict, dotted: str):
    for key in dotted.split("."):
        context = context[key]
    return context


def _interpolate(value, context: dict):
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda match: str(_lookup(context, match.group(1))), value)
    if isinstance(value, list):
        return [_interpolate(v, context) for v in value]
    if isinstance(value, dict):
        return {_interpolate(k, context): _interpolate(v, context) for k, v in value.items()}
    return value


def _listed(entries) -> list[str]:
    """deps/outs entries: `path` or `{path: options}`."""
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def expanded_stages(repo: Path, params_file: str = "params.yaml", params: dict | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with `foreach`/`do` expanded (`name@item`) and `${...}` filled from the params file
    (or from ``params``, a profile's merged mapping)."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    params = params if params is not None else yaml.safe_load((repo / params_file).read_text())
    stages = {}
    for name, stage in pipeline["stages"].items():
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):  # `${branches}`
                items = _lookup(params, _INTERPOLATION.fullmatch(items).group(1))
            for item in items:
                stages[f"{name}@{item}"] = _interpolate(stage["do"], {**params, "item": item})
        else:
            stages[name] = _interpolate(stage, params)
    return stages


def entry_file(stage: dict) -> Path:
    scripts = [Path(word) for word in shlex.split(stage["cmd"]) if word.startswith("stages/") and word.endswith(".py")]
    assert len(scripts) == 1, f"cmd {stage['cmd']!r} should run exactly one stages/*.py"
    return scripts[0]


CODE_STAGE, CODE_FOLDER = "code_deps", "code_deps"


def code_dep(stage: dict) -> str:
    """The file of a stage's code: ``code_deps/<entry stem>.json``."""
    return f"{CODE_FOLDER}/{entry_file(stage).stem}.json"


# --- reading a stage's command line -------------------------------------------------------------

# The launcher's options that name a file: accelerate's config (train.launch_config: processes, GPUs, machines).
LAUNCHER_PATH_OPTIONS = {"--config_file"}
# The one path option with a default: DVC reads `params:` keys from params.yaml (and `dvc exp run -S` edits it),
# so the stages read it too unless told otherwise, and no cmd passes it.
PARAMS_OPTION, PARAMS_DEFAULT = "--params", "Path('params.yaml')"  # as ast.unparse writes it


@dataclass(frozen=True)
class EntryOption:
    is_path: bool           # annotated `Path`
    default: str | None     # its default as written, None when required (`typer.Option(...)`)


def entry_options(repo: Path, entry: Path) -> dict[str, EntryOption]:
    """The `--options` of an entry point's `main()` (typer's names: `demo_clip` is `--demo-clip`), read with ast."""
    tree = ast.parse((repo / entry).read_text(), filename=str(entry))
    mains = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert len(mains) == 1, f"{entry}: no main() (the typer entry point)"
    arguments = mains[0].args.args
    defaults = dict(zip(arguments[len(arguments) - len(mains[0].args.defaults):], mains[0].args.defaults))
    options = {}
    for argument in arguments:
        option = defaults.get(argument)
        assert isinstance(option, ast.Call) and ast.unparse(option.func) == "typer.Option", (
            f"{entry}: main() argument {argument.arg} is not a typer.Option")
        declared = [a.value for a in option.args[1:] if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        default = option.args[0] if option.args else next((k.value for k in option.keywords if k.arg == "default"), None)
        required = isinstance(default, ast.Constant) and default.value is Ellipsis
        options[declared[0] if declared else "--" + argument.arg.replace("_", "-")] = EntryOption(
            is_path=argument.annotation is not None and ast.unparse(argument.annotation) in {"Path", "pathlib.Path"},
            default=None if required else (ast.unparse(default) if default is not None else "None"))
    return options


def _option_pairs(words: list[str], where: str) -> dict[str, str]:
    pairs = {}
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        assert i + 1 < len(words) and not words[i + 1].startswith("--"), f"{where}: {word} has no value"
        assert word not in pairs, f"{where}: {word} is given twice"
        pairs[word] = words[i + 1]
    return pairs


def cmd_options(stage: dict) -> tuple[dict[str, str], dict[str, str]]:
    """A cmd's `--option value` pairs: the launcher's (before the entry point) and the entry point's (after it)."""
    words = shlex.split(stage["cmd"])
    at = words.index(str(entry_file(stage)))
    script = words[at + 1:]
    assert all(word.startswith("--") for word in script[::2]), f"cmd {stage['cmd']!r}: the entry point takes only options"
    return _option_pairs(words[:at], stage["cmd"]), _option_pairs(script, stage["cmd"])


def cmd_paths(repo: Path, stage: dict) -> set[str]:
    """The paths a cmd passes: the launcher's file options, and the values of the entry point's `Path` options."""
    launcher, script = cmd_options(stage)
    options = entry_options(repo, entry_file(stage))
    return ({value for option, value in launcher.items() if option in LAUNCHER_PATH_OPTIONS}
            | {value for option, value in script.items() if option in options and options[option].is_path})


def data_paths(stage: dict) -> set[str]:
    """A stage's deps and outs (metrics and plots files are outs too) less its code: its code_deps file and the
    package's data files it reads (the reader-study page)."""
    paths = {p.rstrip("/") for p in _listed(stage.get("deps")) + _listed(stage.get("outs"))}
    return {p for p in paths if not (p.startswith(f"{CODE_FOLDER}/") or p.startswith(f"{SOURCE_ROOT}/{PACKAGE}/"))}


@cache
def _stages() -> dict[str, dict]:
    return expanded_stages(REPO)


@cache
def _closure(name: str) -> frozenset[Path]:
    return frozenset(import_closure(REPO, entry_file(_stages()[name])))


STAGES = sorted(_stages())


# --- the checker, on code made in the test ------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_closure_follows_lazy_imports_submodules_and_package_inits(tmp_path):
    repo = _write(tmp_path, {
        "stages/s.py": "from cxr_diffusion.a import b\n\ndef main():\n    import cxr_diffusion.c.d\n",
        "src/cxr_diffusion/__init__.py": "", "src/cxr_diffusion/a/__init__.py": "",
        "src/cxr_diffusion/a/b.py": "from cxr_diffusion.e import thing\n", "src/cxr_diffusion/e.py": "thing = 1\n",
        "src/cxr_diffusion/c/__init__.py": "from . import f\n", "src/cxr_diffusion/c/d.py": "from ..g import h\n",
        "src/cxr_diffusion/c/f.py": "", "src/cxr_diffusion/g.py": "h = 1\n", "src/cxr_diffusion/unused.py": "",
    })
    assert import_closure(repo, Path("stages/s.py")) == {Path(p) for p in (
        "stages/s.py", "src/cxr_diffusion/__init__.py", "src/cxr_diffusion/a/__init__.py", "src/cxr_diffusion/a/b.py",
        "src/cxr_diffusion/e.py", "src/cxr_diffusion/c/__init__.py", "src/cxr_diffusion/c/d.py",
        "src/cxr_diffusion/c/f.py", "src/cxr_diffusion/g.py")}


def test_code_files_list_each_entrys_modules_with_their_hashes_and_drop_removed_entries(tmp_path, monkeypatch):
    repo = _write(tmp_path, {
        "stages/s.py": "import cxr_diffusion.a\n", "stages/t.py": "print('no project import')\n",
        "src/cxr_diffusion/__init__.py": "", "src/cxr_diffusion/a.py": "x = 1\n", "src/cxr_diffusion/b.py": "",
        "code_deps/gone.json": "{}",
    })
    monkeypatch.chdir(repo)  # the stage runs from the repository root, with relative paths
    written = code_closure.write_code_deps(Path("src"), Path("stages"), Path("code_deps"))
    assert sorted(path.name for path in written) == ["s.json", "t.json"] == sorted(p.name for p in Path("code_deps").iterdir())
    record = json.loads(Path("code_deps/s.json").read_text())
    assert record["entry"] == "stages/s.py"
    assert record["modules"] == {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in (
        "src/cxr_diffusion/__init__.py", "src/cxr_diffusion/a.py", "stages/s.py")}
    before = Path("code_deps/t.json").read_bytes()
    Path("src/cxr_diffusion/a.py").write_text("x = 2\n")
    code_closure.write_code_deps(Path("src"), Path("stages"), Path("code_deps"))
    assert Path("code_deps/t.json").read_bytes() == before  # t does not run a.py: its file, so its stages, stay
    assert json.loads(Path("code_deps/s.json").read_text())["modules"] != record["modules"]


def test_foreach_stages_expand_per_branch_with_params_filled_in(tmp_path):
    repo = _write(tmp_path, {
        "params.yaml": "branches: [x, y]\ntrain:\n  launch_config: acc/one.yaml\n",
        "dvc.yaml": "stages:\n  t:\n    foreach: ${branches}\n    do:\n"
                    "      cmd: run --config ${train.launch_config} stages/t.py --branch ${item}\n"
                    "      deps:\n        - stages/t.py\n        - ${train.launch_config}\n        - data/${item}\n",
    })
    stages = expanded_stages(repo)
    assert set(stages) == {"t@x", "t@y"}
    assert stages["t@y"]["deps"] == ["stages/t.py", "acc/one.yaml", "data/y"]
    assert entry_file(stages["t@y"]) == Path("stages/t.py")


def test_cmd_paths_are_the_values_of_the_entry_points_path_options(tmp_path):
    repo = _write(tmp_path, {"stages/t.py": (
        "from pathlib import Path\nimport typer\n\n\n"
        "def main(\n    branch: str = typer.Option(..., help='b'),\n"
        "    params: Path = typer.Option(Path('params.yaml'), help='p'),\n"
        "    demo_clip: Path = typer.Option(..., help='c'),\n    out: Path = typer.Option(Path('x'), help='o'),\n"
        ") -> None:\n    pass\n")})
    assert entry_options(repo, Path("stages/t.py")) == {
        "--branch": EntryOption(is_path=False, default=None), "--params": EntryOption(is_path=True, default=PARAMS_DEFAULT),
        "--demo-clip": EntryOption(is_path=True, default=None), "--out": EntryOption(is_path=True, default="Path('x')")}
    stage = {"cmd": "accelerate launch --config_file acc/one.yaml stages/t.py --branch x --demo-clip models/clip --out o"}
    assert cmd_options(stage) == ({"--config_file": "acc/one.yaml"}, {"--branch": "x", "--demo-clip": "models/clip", "--out": "o"})
    assert cmd_paths(repo, stage) == {"acc/one.yaml", "models/clip", "o"}
    assert data_paths({"deps": ["code_deps/t.json", "src/cxr_diffusion/page/a.js", "data/x/"],
                       "outs": [{"m.json": {"cache": False}}]}) == {"data/x", "m.json"}


# --- the real pipeline -------------------------------------------------------------------------

CODE_STAGES = [name for name in STAGES if name != CODE_STAGE]


@pytest.mark.parametrize("name", CODE_STAGES)
def test_each_stage_depends_on_its_entry_points_code_file_and_on_no_module_directly(name):
    deps = _listed(_stages()[name].get("deps"))
    assert code_dep(_stages()[name]) in deps, f"stage {name}: add {code_dep(_stages()[name])} to its deps"
    direct = [dep for dep in deps if dep.endswith(".py") or dep in (str(SOURCE_ROOT), "stages")
              or dep.startswith(f"{SOURCE_ROOT}/") and (REPO / dep).is_dir()]
    assert not direct, f"stage {name}: {direct} are code; {code_dep(_stages()[name])} already covers them"


def test_source_folders_are_deps_of_code_deps_alone_and_bytecode_is_not_hashed():
    """The code_deps stage hashes the source folders; Python's __pycache__ bytecode must not count, or the
    stage would rerun after a fresh clone's first import with no code changed."""
    stage = _stages()[CODE_STAGE]
    assert set(_listed(stage["deps"])) == {f"{SOURCE_ROOT}/{code_closure.PACKAGE}", "stages"}
    assert _listed(stage["outs"]) == [CODE_FOLDER]
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


ENTRY_SCRIPTS = sorted({str(entry_file(stage)) for stage in _stages().values()})
# Prints the project modules Python holds after executing an entry file as a module (its `main` is not run).
_RUNTIME_IMPORTS = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("entry_point", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
repo = Path(sys.argv[2]).resolve()
root = repo / "src" / "cxr_diffusion"
print(json.dumps(sorted(str(Path(m.__file__).resolve().relative_to(repo)) for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(root))))
"""


@pytest.mark.parametrize("entry", ENTRY_SCRIPTS)
def test_the_closure_holds_every_module_an_entry_point_imports_when_run(entry):
    """An oracle the closure does not share: Python's own imports. Executing the entry file imports its
    eager imports (lazy ones inside functions are the closure's to find: see the test on made-up code)."""
    result = subprocess.run([sys.executable, "-c", _RUNTIME_IMPORTS, str(REPO / entry), str(REPO)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, check=True)
    imported = {Path(path) for path in json.loads(result.stdout.splitlines()[-1])}
    assert imported, f"{entry}: imported no project module"
    missing = imported - import_closure(REPO, Path(entry))
    assert not missing, f"{entry}: imports {sorted(map(str, missing))} when run, but its closure misses them"


PACKAGE_DATA = {"src/cxr_diffusion/reader_study/kit.py": "src/cxr_diffusion/reader_study/page"}  # module -> data it copies


@pytest.mark.parametrize("name", CODE_STAGES)
def test_stages_depend_on_the_package_data_their_modules_read(name):
    """The kit copies the page's HTML/JS/CSS: an edit to them must rebuild it (and only those files: no bytecode)."""
    deps = {Path(dep) for dep in _listed(_stages()[name].get("deps"))}
    for module, folder in PACKAGE_DATA.items():
        files = {path.relative_to(REPO) for path in (REPO / folder).iterdir() if path.is_file()}
        if Path(module) in _closure(name):
            assert files <= deps, f"stage {name}: dvc.yaml deps miss {', '.join(sorted(map(str, files - deps)))}"
        else:
            assert not files & deps, f"stage {name} depends on {folder} files but never imports {module}"


# Params that name a file inside the repository, and the stage that reads it.
PARAM_FILES = {("filter", "include_list"): "filter", ("train", "launch_config"): "train"}
PARAMS_FILES = ["params.yaml"] + [f"profile {name}" for name in profile_names()]


@pytest.mark.parametrize("params_file", PARAMS_FILES)
def test_files_named_by_params_are_deps_of_the_stage_that_reads_them(params_file):
    params = profile_data(params_file.removeprefix("profile ")) if params_file.startswith("profile ") else \
        yaml.safe_load((REPO / params_file).read_text())
    stages = expanded_stages(REPO, params=params)
    for (section, key), stage_name in PARAM_FILES.items():
        named = (params.get(section) or {}).get(key)
        if named is None:
            continue
        assert (REPO / named).is_file(), f"{params_file}: {section}.{key} names {named}, which does not exist"
        for name, stage in stages.items():
            if name.split("@")[0] == stage_name:
                deps = [Path(dep) for dep in _listed(stage.get("deps"))]
                assert any(dep == Path(named) or dep in Path(named).parents for dep in deps), (
                    f"{params_file}: stage {name} reads {section}.{key} = {named}, which none of its deps covers")


# --- paths: written once, on each stage's cmd -----------------------------------------------------

ENTRY_FILES = sorted({str(entry_file(stage)) for stage in _stages().values()})

# Where a stage's cmd paths and its data deps + outs differ on purpose (`{item}`: the foreach branch), and why.
PASSED_NOT_DECLARED = {
    "filter": {"data/dataset": "the dataset folder it reads; its deps are the two files of it that it opens "
                               "(below), so images rendered anew alone do not rerun it"},
    "train": {"checkpoints/{item}": "the scratch folder it resumes from, deliberately no out (dvc.yaml says why)"},
}
DECLARED_NOT_PASSED = {
    "filter": {"data/dataset/metadata.csv": "inside --dataset data/dataset (above)",
               "data/dataset/image_paths.csv": "inside --dataset data/dataset (above)",
               "reference": "the folder filter.include_list must lie under: the list is named in params, not on the cmd"},
}


def _expected_gaps(table: dict, name: str) -> dict[str, str]:
    base, _, item = name.partition("@")
    return {path.format(item=item): why for path, why in table.get(base, {}).items()}


@pytest.mark.parametrize("entry", ENTRY_FILES)
def test_entry_point_has_no_default_path_but_the_params_file(entry):
    defaults = {option: spec.default for option, spec in entry_options(REPO, Path(entry)).items()
                if spec.is_path and spec.default is not None}
    assert defaults == {PARAMS_OPTION: PARAMS_DEFAULT}, (
        f"{entry}: path options with a default in code: {defaults}; make them typer.Option(..., help=...) and pass "
        f"them on the cmd in dvc.yaml (only {PARAMS_OPTION} keeps {PARAMS_DEFAULT}, DVC's params file)")


@pytest.mark.parametrize("name", STAGES)
def test_stage_cmd_passes_every_option_its_entry_point_requires_and_no_other(name):
    stage = _stages()[name]
    options = entry_options(REPO, entry_file(stage))
    passed = set(cmd_options(stage)[1])
    unknown = passed - set(options)
    missing = {option for option, spec in options.items() if spec.default is None} - passed
    assert not unknown and not missing, (f"stage {name}: cmd passes unknown {sorted(unknown)}, "
                                         f"misses required {sorted(missing)} of {entry_file(stage)}")


@pytest.mark.parametrize("name", STAGES)
def test_stage_cmd_passes_exactly_its_data_deps_and_outs(name):
    """Each path is written once, on the cmd, and DVC tracks what the stage is told to read and write:
    no path passed but undeclared, no data dep or out the stage is not told about (bar the table above)."""
    stage = _stages()[name]
    passed, declared = cmd_paths(REPO, stage), data_paths(stage)
    allowed_passed, allowed_declared = _expected_gaps(PASSED_NOT_DECLARED, name), _expected_gaps(DECLARED_NOT_PASSED, name)
    assert passed - declared == set(allowed_passed), (
        f"stage {name}: its cmd passes {sorted(passed - declared)}, no dep or out of it "
        f"(expected only {sorted(allowed_passed)}, each explained in PASSED_NOT_DECLARED)")
    assert declared - passed == set(allowed_declared), (
        f"stage {name}: its deps/outs {sorted(declared - passed)} are not passed on its cmd "
        f"(expected only {sorted(allowed_declared)}, each explained in DECLARED_NOT_PASSED)")


# --- behaviour: what `dvc status` reports after an edit -------------------------------------------

@pytest.fixture(scope="module")
def locked_copy(tmp_path_factory) -> Path:
    """The pipeline's definition and code in a DVC repository, locked with placeholder data (no cmd is run)."""
    work = tmp_path_factory.mktemp("dag")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, work / name)
    for folder in ("stages", "src", "accelerate", "reference"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    sh("dvc", "init", "--no-scm", "-q", cwd=work)
    shutil.copy2(REPO / ".dvcignore", work / ".dvcignore")
    refresh_code(work)  # the one stage run for real: the others are locked on placeholders
    paths = {Path(p) for stage in _stages().values() for p in _listed(stage.get("deps")) + _listed(stage.get("outs"))}
    parents = {parent for path in paths for parent in path.parents}
    for path in sorted(paths - parents):  # leaves: files when they look like one, else a folder with one file
        target = work / path
        if not target.exists():
            target = target if path.suffix else target / PLACEHOLDER
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{path}\n")
    sh("dvc", "commit", "-f", "-q", cwd=work)
    return work


def refresh_code(repo: Path) -> None:
    """Rerun stage code_deps, as `dvc repro` does first after an edit (`dvc status` shows only direct changes)."""
    sh("dvc", "repro", "-q", CODE_STAGE, cwd=repo)


def changed_deps(repo: Path) -> dict[str, set[str]]:
    """Stage -> the deps `dvc status` reports as changed (only stages whose own deps changed)."""
    report = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout or "{}")
    changed = {}
    for stage, entries in report.items():
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                changed.setdefault(stage, set()).update(entry["changed deps"])
    return changed


def appended(repo: Path, paths, text: str = "\n# edited\n") -> dict[Path, str]:
    originals = {path: (repo / path).read_text() for path in paths}
    for path, original in originals.items():
        (repo / path).write_text(original + text)
    return originals


def restore(repo: Path, originals: dict[Path, str]) -> None:
    for path, original in originals.items():
        (repo / path).write_text(original)


def importers(module: Path) -> set[str]:
    """The stages whose code file lists ``module`` (code_deps itself hashes every module, and reruns first)."""
    return {name for name in CODE_STAGES if module in _closure(name)}


def test_stages_expand_as_dvc_expands_them(locked_copy):
    assert sh("dvc", "stage", "list", "--name-only", cwd=locked_copy).stdout.split() == list(_stages())


def test_locked_copy_starts_up_to_date(locked_copy):
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=locked_copy).stdout


def stale_after_editing(repo: Path, paths) -> dict[str, set[str]]:
    """The changed deps per stage once ``paths`` are edited and code_deps has rerun; the edit is then undone."""
    originals = appended(repo, paths)
    try:
        refresh_code(repo)
        return changed_deps(repo)
    finally:
        restore(repo, originals)
        refresh_code(repo)


def test_editing_the_prompt_tokenizer_makes_only_the_stages_that_import_it_stale(locked_copy):
    module = Path("src/cxr_diffusion/conditioning/prompt_tokenizer.py")
    assert importers(module), "no stage imports the prompt tokenizer: pick another module"
    changed = stale_after_editing(locked_copy, [module])
    assert set(changed) == importers(module)
    assert all(deps == {code_dep(_stages()[name])} for name, deps in changed.items())
    assert changed_deps(locked_copy) == {}


def test_editing_an_entry_point_makes_only_its_stages_stale(locked_copy):
    assert set(stale_after_editing(locked_copy, [Path("stages/train.py")])) == {
        name for name in STAGES if name.startswith("train@")}


def test_editing_a_module_no_stage_runs_makes_no_stage_stale(locked_copy):
    module = Path("src/cxr_diffusion/cli.py")
    assert not importers(module), "a stage imports the CLI: pick a module no stage runs"
    assert stale_after_editing(locked_copy, [module]) == {}


def test_editing_a_shared_module_makes_every_stage_that_runs_it_stale(locked_copy):
    module = Path("src/cxr_diffusion/errors.py")
    assert set(stale_after_editing(locked_copy, [module])) == importers(module) - {CODE_STAGE} == set(CODE_STAGES)


def test_editing_an_include_list_under_reference_makes_only_the_filter_stale(locked_copy):
    include_list = Path(profile_data("nih-512")["filter"]["include_list"])
    originals = appended(locked_copy, [include_list], "00000000_000.png" + ",0" * 5 + "\n")
    try:
        assert set(changed_deps(locked_copy)) == {"filter"}
    finally:
        restore(locked_copy, originals)
