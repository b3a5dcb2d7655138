"""Reading a params file: YAML 1.2 as DVC reads it, no aliases, a few KB at most; then validated (``config``)."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent

from cxr_diffusion.config import Params, ParamsError, params_from_dict
from cxr_diffusion.io import require_regular_file

MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; far larger is not one
# Sections, their subsections and a list of lists (filter.merges): params nest 4 deep. Brackets nested 10,000 deep
# took the YAML parser 17 s before Python's recursion limit stopped it.
MAX_DEPTH = 16


def read_params_file(path: str | Path) -> dict:
    """The mapping in a params file, read as YAML 1.2 like DVC; no aliases, no duplicate keys, a few KB at most."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params: {path} does not exist; run from the repository root or pass --params")
    size = require_regular_file(path, ParamsError, "a params file is a YAML file: pass one").st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(f"params: {path} is {size} bytes; a params file is a few KB (at most {MAX_PARAMS_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
        yaml = YAML(typ="safe", pure=True)  # YAML 1.2, as DVC reads it
        depth = 0
        for event in yaml.parse(text):  # events come one at a time: a refusal here has read only that far
            depth += isinstance(event, CollectionStartEvent) - isinstance(event, CollectionEndEvent)
            if depth > MAX_DEPTH:
                raise ParamsError(f"params: {path} line {event.start_mark.line + 1}: values nested more than "
                                  f"{MAX_DEPTH} deep; a params file is a mapping of sections a few levels deep")
            if isinstance(event, AliasEvent):
                raise ParamsError(f"params: {path} line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                                  "are not supported (dvc exp run -S does not follow them); write the value out")
        data = YAML(typ="safe", pure=True).load(text)
    except (YAMLError, UnicodeDecodeError) as error:
        raise ParamsError(f"params: {path} is not valid YAML: {' '.join(str(error).split())[:300]}") from None
    except ParamsError:
        raise
    except ValueError as error:  # an integer past Python's digit limit (int() refuses over 4300 digits)
        raise ParamsError(f"params: {path} holds a value that cannot be read "
                          f"({' '.join(str(error).split())[:120]}); no param takes a number that long") from None
    if not isinstance(data, dict):
        raise ParamsError(f"params: {path} must hold a mapping of keys to values")
    return data


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (or a profile)."""
    data = read_params_file(path)
    try:
        return params_from_dict(data)
    except ParamsError as error:
        raise ParamsError(f"{error} (in {path})") from None
