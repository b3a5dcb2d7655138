"""A params validation error as one line a person can act on: the key, the value, and what is allowed."""

from __future__ import annotations

from typing import Any

import annotated_types
from pydantic import BaseModel

from cxr_diffusion.safe_text import shown_value


class KeyProblem(ValueError):
    """Raised by the cross-key checks of the params: names the key (relative to its section) that is wrong."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))
_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
               "tuple_type": "a list", "model_type": "a mapping", "model_attributes_type": "a mapping"}


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section model an annotation holds (``X`` or ``X | None``), else None."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(location: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in location:
        if model is None or part not in model.model_fields:
            return None
        model = _section(model.model_fields[part].annotation)
    return model


def _allowed_range(location: tuple, root: type[BaseModel]) -> str:
    """'in [1, 65536]', '>= 0', ... from the Field(ge=, le=) constraints of the key at ``location``."""
    model = _model_at(location[:-1], root)
    info = model.model_fields.get(location[-1]) if model else None
    if info is None:
        return ""
    constraints = list(info.metadata)
    for arg in getattr(info.annotation, "__args__", ()):  # `Annotated[int, Field(...)] | None`
        for item in getattr(arg, "__metadata__", ()):
            constraints.extend(getattr(item, "metadata", [item]))
    bounds = {symbol: getattr(item, name) for item in constraints
              for kind, name, symbol in _BOUNDS if isinstance(item, kind)}
    low = next(((s, bounds[s]) for s in (">=", ">") if s in bounds), None)
    high = next(((s, bounds[s]) for s in ("<=", "<") if s in bounds), None)
    if low and high:
        return f"in {'[' if low[0] == '>=' else '('}{low[1]}, {high[1]}{']' if high[0] == '<=' else ')'}"
    bound = low or high
    return f"{bound[0]} {bound[1]}" if bound else ""


def _key(location: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if index else str(part))
                   for index, part in enumerate(location))


def describe(error: dict, root: type[BaseModel]) -> str:
    """One pydantic error of ``root`` (the params, or one section) as ``params: 'key' is VALUE; what is allowed``."""
    location = tuple(error["loc"])
    kind = error["type"]
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, KeyProblem):
        return f"params: '{_key(location + tuple(problem.key.split('.')))}' {problem}"
    key = _key(location)
    if kind == "extra_forbidden":
        model = _model_at(location[:-1], root)
        under = f" under {_key(location[:-1])}" if len(location) > 1 else ""
        known = f" Known keys{under}: {', '.join(model.model_fields)}." if model else ""
        return f"params: unknown key '{key}'.{known} Check the spelling (dvc exp run -S uses the same names)."
    if kind == "missing":
        return (f"params: '{key}' is missing; every key must be set in params.yaml "
                f"(the default profile, src/cxr_diffusion/profiles/default.yaml, lists them all)")
    value = shown_value(error.get("input"), 80)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        context = error.get("ctx") or {}
        allowed = _allowed_range(location, root) or " ".join(f"{symbol} {context[name]}" for _, name, symbol in _BOUNDS
                                                       if name in context)
        return f"params: '{key}' is {value}; must be {allowed}"
    if kind == "finite_number":
        return f"params: '{key}' is {value}; expected a finite number (no param takes inf or nan)"
    if kind == "literal_error":
        return f"params: '{key}' is {value}; expected one of {error['ctx']['expected']}"
    if kind == "too_short":
        return f"params: '{key}' is {value}; must have at least {error['ctx']['min_length']} entries"
    if kind == "too_long":
        return f"params: '{key}' is {value}; must have at most {error['ctx']['max_length']} entries"
    if kind in _TYPE_WORDS:
        return f"params: '{key}' is {value}; expected {_TYPE_WORDS[kind]}"
    message = error["msg"].removeprefix("Value error, ")
    return f"params: '{key}' is {value}; {message}"
