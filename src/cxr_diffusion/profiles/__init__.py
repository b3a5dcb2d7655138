"""Profiles: named starting points for ``params.yaml``, shipped with the package.

``default.yaml`` (the embedded default) holds every key with its reason. Every other profile is an overlay:
only the keys it changes, each with why, laid over ``default.yaml``, or over the profile its top-level
``extends:`` names (the rehearsal extends nih-512). Sections merge key by key; any other value, a list or a
mapping such as ``filter.merges``, is replaced whole. ``cxr-diffusion profile <name>`` writes the merged
result as ``params.yaml``: the default's text and comments, with each changed value and the overlay's
comment on it, validated before anything is replaced. A YAML file of your own is an overlay the same way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from cxr_diffusion.config import Params, ParamsError, Section, changed, params_from_dict
from cxr_diffusion.params_file import read_params_file
from cxr_diffusion.config import section_of as _section_of
from cxr_diffusion.safe_text import visible_text

FOLDER = Path(__file__).resolve().parent
DEFAULT = "default"
EXTENDS = "extends"
MAX_DEPTH = 8  # overlays of overlays: more is a cycle or a mistake
S = TypeVar("S", bound=Section)


def profile_names() -> list[str]:
    """The shipped profiles, by name."""
    return sorted(path.stem for path in FOLDER.glob("*.yaml"))


def profile_file(name: str) -> Path:
    """The shipped profile called ``name``; a name only (``../x`` or ``a/b`` never reaches outside)."""
    if name not in profile_names():
        raise ParamsError(f"no profile '{name}' among {FOLDER}; available: {', '.join(profile_names())}")
    return FOLDER / f"{name}.yaml"


def profile_source(source: str | Path) -> Path:
    """A shipped profile's name, or the path of a YAML file (it must end in .yaml or .yml)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ParamsError(f"profile {path} does not exist")
        if not path.is_file():  # a FIFO would make the read wait for a writer forever
            raise ParamsError(f"profile {path} is not a regular file (a folder, FIFO or device); pass a YAML file")
        return path
    return profile_file(str(source))


def _chain(source: str | Path) -> list[tuple[Path, dict]]:
    """The files from the base (default.yaml) to ``source``, each with its mapping (``extends`` removed)."""
    chain: list[tuple[Path, dict]] = []
    path = profile_source(source)
    while True:
        data = read_params_file(path)
        base = data.pop(EXTENDS, None if path == FOLDER / f"{DEFAULT}.yaml" else DEFAULT)
        chain.insert(0, (path, data))
        if base is None:
            return chain
        if not isinstance(base, str) or base not in profile_names() or len(chain) >= MAX_DEPTH \
                or any(p == FOLDER / f"{base}.yaml" for p, _ in chain):
            raise ParamsError(f"params: '{EXTENDS}' is {visible_text(repr(base), 60)}; it must name a shipped profile "
                              f"({', '.join(profile_names())}) without a cycle")
        path = profile_file(base)


def merged(base: dict, overrides: dict, model: type[Section] = Params) -> dict:
    """``base`` with ``overrides`` laid over it, section by section (a value that is itself a mapping, such
    as ``filter.merges``, is replaced whole)."""
    result = dict(base)
    for key, value in overrides.items():
        section = _section_of(model, key)
        if isinstance(value, dict) and section is not None and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value, section)
        else:
            result[key] = value
    return result


def profile_data(source: str | Path) -> dict:
    """The merged mapping of a profile (a shipped name or a YAML path), not yet validated."""
    return _merged_chain(_chain(source))


def _merged_chain(chain: list[tuple[Path, dict]]) -> dict:
    data = chain[0][1]
    for _, overlay in chain[1:]:
        data = merged(data, overlay)
    return data


def params_with(overrides: dict | None = None, profile: str | Path = DEFAULT) -> Params:
    """A profile with ``overrides`` laid over it, validated: tests and benchmarks vary a few keys."""
    return params_from_dict(merged(profile_data(profile), overrides or {}))


def profile_section(cls: type[S], profile: str | Path = DEFAULT, **changes: Any) -> S:
    """Section ``cls`` as ``profile`` sets it, with ``changes`` (validated)."""
    section: Any = params_with(profile=profile)
    for name in _path_of(cls):
        section = getattr(section, name)
    return changed(section, **changes)


def _path_of(cls: type[Section], model: type[Section] = Params, prefix: tuple = ()) -> tuple:
    if cls is model:
        return prefix
    for name in model.model_fields:
        inner = _section_of(model, name)
        if inner is not None:
            try:
                return _path_of(cls, inner, prefix + (name,))
            except LookupError:
                continue
    raise LookupError(f"{cls.__name__} is not a section of {model.__name__}")


def profile_text(source: str | Path) -> str:
    """``params.yaml`` for a profile: the base file's text and comments with each overlay's values (and their
    comments) laid over it. A profile with no overlay is its file, byte for byte."""
    return _chain_text(_chain(source))


def _chain_text(chain: list[tuple[Path, dict]]) -> str:
    if len(chain) == 1:
        return chain[0][0].read_text(encoding="utf-8")
    yaml = YAML()  # round trip: comments, quotes and flow styles are kept
    yaml.width = 120
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(chain[0][0].read_text(encoding="utf-8"))
    for path, _ in chain[1:]:
        overlay = yaml.load(path.read_text(encoding="utf-8"))
        overlay.pop(EXTENDS, None)
        _lay_over(document, overlay, Params)
    _retitle(document, [path for path, _ in chain])
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def _lay_over(target, overlay, model: type[Section]) -> None:
    """Set ``overlay``'s values into the round-trip mapping ``target``; a value's end-of-line comment replaces
    the base's first comment line on it (the lines after it, which introduce the next key, stay)."""
    for key, value in overlay.items():
        section = _section_of(model, key)
        if section is not None and isinstance(value, dict) and isinstance(target.get(key), dict):
            _lay_over(target[key], value, section)
            continue
        target[key] = value
        comment = _comment_token(overlay, key)
        if comment is None:
            continue
        line = comment.value.split("\n", 1)[0].strip()
        base = _comment_token(target, key)
        column = (base or comment).start_mark.column
        rest = _after_comment(base.value, column) if base is not None else ""
        target.ca.items[key] = [None, None, CommentToken(f"{line}\n{rest}", CommentMark(column), None), None]


def _after_comment(text: str, column: int) -> str:
    """What follows an end-of-line comment in its token: its own continuation lines (comment lines indented to
    its column) are dropped; blank lines and the comments that introduce the next key are kept."""
    lines = text.split("\n")[1:]
    while lines and lines[0].lstrip().startswith("#") and len(lines[0]) - len(lines[0].lstrip()) >= column:
        lines.pop(0)
    return "\n".join(lines)


def _comment_token(mapping, key):
    """The end-of-line comment on ``key``'s scalar value in a round-trip mapping, or None."""
    entry = mapping.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    return token if token is not None and token.value.lstrip().startswith("#") else None


def _retitle(document, chain: list[Path]) -> None:
    """The merged file opens with the profile's own header comment, then says how it was made."""
    header = []
    for line in chain[-1].read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").removeprefix(" "))
    # File names on one line of printable text: a line break or control character in a name would end the
    # comment and write YAML (a second key), or bytes YAML refuses.
    layers = " laid over ".join(visible_text(path.name, 1000) for path in reversed(chain))
    header.append(f"params.yaml written by `cxr-diffusion profile {visible_text(chain[-1].stem, 1000)}`: {layers}")
    header.append("(edit it freely; the command starts over from the profile).")
    document.ca.comment = None  # the base file's own header describes the base, not this profile
    document.yaml_set_start_comment("\n".join(header))


def validated_profile_text(source: str | Path, check=params_from_dict) -> str:
    """``profile_text(source)`` after its merged data passed ``check`` (which raises ``ParamsError``)."""
    chain = _chain(source)
    data = _merged_chain(chain)
    check(data)
    text = _chain_text(chain)
    reread = YAML(typ="safe", pure=True).load(text)
    if reread != data:  # the text must say exactly what was validated
        raise ParamsError(f"params: profile {source} did not round-trip through YAML; report this as a bug")
    return text
