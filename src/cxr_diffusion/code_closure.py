"""Which project modules each stage runs, so that editing a module makes exactly its stages stale.

DVC knows a stage's code only through its deps. Listing every module each stage imports in dvc.yaml
kept staleness exact, and made half of dvc.yaml module lists. Instead, stage ``code_deps`` reads the
code (``import_closure``: an entry script and every project module it imports, directly or not, lazy
imports inside functions and the ``__init__.py`` of every package on the way included) and writes one
file per entry script, ``code_deps/<entry>.json``, listing those modules with the SHA-256 of each. A
stage depends on its entry's file: an edit to a module changes the files of exactly the entries that
run it, so exactly their stages rerun, and dvc.yaml names one dep for all of a stage's code.

The reading is static (``ast``), so it never imports the code it reads. Python's bytecode caches are
not code: `.dvcignore` keeps ``__pycache__`` out of the hash of the source folders.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import tokenize
from pathlib import Path

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_path, lies_inside, require_regular_file

PACKAGE = "cxr_diffusion"
# A module is source text of a few hundred KB at most; a bound keeps a sparse or runaway file from being read.
MAX_SOURCE_BYTES = 4 << 20


class CodeError(UserError, ValueError):
    """A file among the code the stages run is not readable Python source."""


def module_file(source_root: Path, name: str) -> Path | None:
    """``cxr_diffusion.a.b`` -> ``<source_root>/cxr_diffusion/a/b/__init__.py`` or ``.../a/b.py``, if it exists
    (the package first, as Python's import finds it when both exist)."""
    base = source_root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _executed_modules(name: str) -> list[str]:
    """Importing ``a.b.c`` executes ``a``, ``a.b`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _absolute_module(source_root: Path, path: Path, node: ast.ImportFrom) -> str | None:
    """The module a ``from ... import`` names; a relative one resolved against the file's own package
    (None for a relative import in a file outside the package, which cannot reach it)."""
    if not node.level:
        return node.module or ""
    if not path.is_relative_to(source_root):
        return None
    package = list(path.relative_to(source_root).parts[:-1])  # a/b.py and a/__init__.py: package a
    return ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))


# Ways to load a module other than an import statement. No reading can always tell what they load (an alias, a
# computed name, a fromlist or level), so the code the stages run does not use them: code_deps refuses each.
DYNAMIC_IMPORTS = frozenset({"import_module", "__import__", "exec_module", "load_module", "run_module", "run_path",
                             "resolve_name", "module_from_spec", "spec_from_file_location"})
# importlib.util.find_spec("a.b.c") imports a.b (not a.b.c): read when its name is literal text, else refused.
FIND_SPEC = "find_spec"


def imported_modules(source_root: Path, path: Path, source: bytes | None = None) -> set[str]:
    """The project modules one file (of bytes ``source``, else read) imports, anywhere in it (lazy imports
    inside functions included): ``import`` and ``from ... import`` statements, relative ones too. A star import
    of a package counts all its submodules (``__all__`` may name any of them). A dynamic import
    (``DYNAMIC_IMPORTS``, named, called or imported under any alias) is refused with its line."""
    tree = _parsed(path, _source(path) if source is None else source)
    found: set[str] = set()
    for node in ast.walk(tree):
        _refuse_dynamic_import(path, node)
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute_module(source_root, path, node)
            if module is None:
                continue
            # `from a.b import y`: y is an attribute of a.b or its submodule a.b.y
            names = [module] + [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
            if any(alias.name == "*" for alias in node.names):
                names += _submodules(source_root, module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == FIND_SPEC:
            names = _find_spec_parents(path, node)
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.update(m for m in _executed_modules(name) if module_file(source_root, m) is not None)
    return found


def _find_spec_parents(path: Path, node: ast.Call) -> list[str]:
    """The packages ``find_spec("a.b.c")`` imports to look for ``c`` (``a.b``); a computed name is refused."""
    name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        raise CodeError(f"{path} line {node.lineno}: find_spec of a computed name, so code_deps cannot tell which "
                        f"packages it imports; name the module in literal text")
    parent = name.value.rpartition(".")[0]
    return [parent] if parent else []


def _refuse_dynamic_import(path: Path, node: ast.AST) -> None:
    """One line naming the file and line of a use of a dynamic import: ``import_module(...)``,
    ``importlib.import_module``, ``from importlib import import_module as load``, ``__import__`` and kin."""
    if isinstance(node, ast.Name):
        used = node.id
    elif isinstance(node, ast.Attribute):
        used = node.attr
    elif isinstance(node, ast.ImportFrom):
        used = next((alias.name for alias in node.names if alias.name in DYNAMIC_IMPORTS), None)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
          and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):  # getattr(importlib, "import_module")
        used = node.args[1].value
    else:
        return
    if used in DYNAMIC_IMPORTS:
        raise CodeError(f"{path} line {node.lineno}: loads a module with {used}, so code_deps cannot tell which, and "
                        f"an edit to it would not rerun the stages that run it; use an import statement")


def _submodules(source_root: Path, module: str) -> list[str]:
    """The direct submodules of package ``module`` (none for a plain module)."""
    init = module_file(source_root, module)
    if init is None or init.name != "__init__.py":
        return []
    return sorted(f"{module}.{child.stem}" for child in init.parent.iterdir()
                  if (child.suffix == ".py" and child.name != "__init__.py") or (child / "__init__.py").is_file())


def _source(path: Path) -> bytes:
    """The bytes of one source file: a regular file (a FIFO would block the read forever), of source size."""
    fix = "the stages run only Python source files: fix or remove it"
    size = require_regular_file(path, CodeError, fix).st_size
    if size > MAX_SOURCE_BYTES:
        raise CodeError(f"{path}: {size:,} bytes, more than the {MAX_SOURCE_BYTES:,} of any module here; {fix}")
    return path.read_bytes()


def _parsed(path: Path, source: bytes) -> ast.Module:
    """The syntax tree of one module's bytes; a file Python could not import either is one line naming it."""
    try:  # decoded as an import decodes it: a byte-order mark or PEP 263 coding line, else strict UTF-8
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        return ast.parse(source.decode(encoding), filename=str(path))
    except (SyntaxError, ValueError, LookupError) as error:  # bad syntax, NUL, bytes not in the file's (known) encoding
        where = f" line {error.lineno}" if isinstance(error, SyntaxError) and error.lineno else ""
        raise CodeError(f"{path}{where}: not Python source Python can import ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:160]}); fix the file and rerun") from None
    except (MemoryError, RecursionError):  # the parser's limits: an expression nested thousands deep
        raise CodeError(f"{path}: nested too deeply for Python's parser (Python could not import it either); fix "
                        f"the file and rerun") from None


class SourceReader:
    """Each file read, hashed and parsed at most once, however many entry points import it (19 entries share
    most of the package)."""

    def __init__(self, source_root: Path):
        self.source_root = source_root
        self._sources: dict[Path, bytes] = {}
        self._imports: dict[Path, set[str]] = {}

    def source(self, path: Path) -> bytes:
        if path not in self._sources:
            self._sources[path] = _source(path)
        return self._sources[path]

    def imports(self, path: Path) -> set[str]:
        if path not in self._imports:
            self._imports[path] = imported_modules(self.source_root, path, self.source(path))
        return self._imports[path]


def import_closure(source_root: Path, entry: Path, reader: SourceReader | None = None) -> set[Path]:
    """``entry`` and every project module it imports, directly or not (paths as ``source_root`` and ``entry``
    are given: both relative to the repository, or both absolute)."""
    reader = reader or SourceReader(source_root)
    seen: set[Path] = set()
    pending = [entry]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        if path != entry and not lies_inside(path, source_root):  # a link out of the tree: anyone's file
            raise CodeError(f"{path}: links outside {source_root} (to {path.resolve()}); copy the module itself "
                            f"into the source tree")
        pending.extend(module_file(source_root, name) for name in reader.imports(path))
    return seen


def code_record(source_root: Path, entry: Path, reader: SourceReader | None = None) -> dict:
    """What ``code_deps/<entry>.json`` holds: the entry and each module of its closure with its SHA-256."""
    reader = reader or SourceReader(source_root)
    modules = sorted(import_closure(source_root, entry, reader), key=lambda path: path.as_posix())
    return {"entry": entry.as_posix(),
            "modules": {path.as_posix(): hashlib.sha256(reader.source(path)).hexdigest() for path in modules}}


def write_code_deps(source_root: Path, entries: Path, out: Path) -> list[Path]:
    """One ``<out>/<entry stem>.json`` per ``entries/*.py`` script, each written atomically; the paths written.

    Paths are written as given, so run it from the repository root with relative paths (as dvc.yaml does):
    the files then read the same on every machine."""
    scripts = sorted(entries.glob("*.py")) if entries.is_dir() else []
    if not scripts:  # an empty closure set would also delete every stage's code file as stale
        raise CodeError(f"{entries}: no stage entry points (*.py) there; pass --entries stages, the folder of "
                        f"the scripts dvc.yaml runs")
    reader = SourceReader(source_root)
    records = {entry: code_record(source_root, entry, reader) for entry in scripts}  # all read before one is written
    if out.exists() and not out.is_dir():
        raise CodeError(f"{out}: a file, not the folder of code files; move it away, then rerun")
    in_the_way = sorted(path for path in out.glob("*.json") if path.is_dir()) if out.is_dir() else []
    if in_the_way:  # checked before anything is written
        raise CodeError(f"{in_the_way[0]}: a folder named like a code file; move it away, then rerun")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry, record in records.items():
        target = out / f"{entry.stem}.json"
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        written.append(target)
    for stale in set(out.glob("*.json")) - set(written):  # an entry script removed since the last run
        stale.unlink()
    return written
