"""The snapshot's ``datasets.json``: which datasets and features it offers, with their declared shapes, and the
choice of one image feature (``elixr.dataset`` / ``elixr.feature``); text-tower outputs are refused."""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.conditioning.elixr_format import ID_COLUMN, MAX_SIZE, SNAPSHOT_INDEX, FeatureSpec, check_inside
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import read_json
from cxr_diffusion.safe_text import visible_text

# A dataset or feature name with one of these words (split on '/' and '_') is a text-tower output.
TEXT_WORDS: frozenset[str] = frozenset({"txt", "text"})


def read_snapshot_index(root: Path) -> tuple[dict[str, dict[str, FeatureSpec]], dict]:
    """``({dataset name: {feature name: spec}}, info)`` from ``root/datasets.json``, at any nesting depth."""
    path = root / SNAPSHOT_INDEX
    check_inside(path, root, "the snapshot", f"copy {SNAPSHOT_INDEX} itself into the snapshot")
    try:
        index = read_json(path, "download the ELIXR snapshot's datasets.json again (or rerun `dvc repro -f "
                                "elixr_standin` for the stand-in)", kind=object)
    except OSError as error:
        raise DataError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(index, dict) or not isinstance(index.get("datasets"), dict):
        raise DataError(f"{path}: expected an object with a 'datasets' mapping (found "
                        f"{sorted(index) if isinstance(index, dict) else type(index).__name__})")
    offered: dict[str, dict[str, FeatureSpec]] = {}

    def visit(node: dict, name: str) -> None:
        if node.get("type") == "dataset":
            offered[name] = _parse_features(path, name, node.get("features"))
            return
        for key, child in node.items():
            if isinstance(child, dict):
                visit(child, f"{name}/{key}" if name else str(key))

    visit(index["datasets"], "")
    if not offered:
        raise DataError(f"{path}: no entry with \"type\": \"dataset\" under 'datasets'; is this the ELIXR snapshot?")
    info = index.get("info")
    return offered, info if isinstance(info, dict) else {}


def select_feature(root: Path, offered: dict[str, dict[str, FeatureSpec]], info: dict, dataset: str,
                   feature: str) -> FeatureSpec:
    """The spec of ``dataset``/``feature``; a missing one or a text embedding is an error listing the offer."""
    where = root / SNAPSHOT_INDEX
    standin = " (the in-pipeline stand-in; set elixr.path to the published snapshot for the others)" \
        if info.get("standin") else ""
    if dataset not in offered:
        raise DataError(f"{where}: no dataset '{dataset}' (elixr.dataset){standin}; it offers "
                        f"{describe_offer(offered)}")
    if feature not in offered[dataset] or feature == ID_COLUMN:
        raise DataError(f"{where}: dataset '{dataset}' has no embedding feature '{feature}' (elixr.feature)"
                        f"{standin}; the snapshot offers {describe_offer(offered)}")
    refuse_text(f"{where}: elixr.dataset '{dataset}', elixr.feature '{feature}'", dataset, feature,
                 describe_offer(offered, images_only=True))
    spec = offered[dataset][feature]
    if spec.shape_problem:
        raise DataError(f"{where}: feature '{feature}' of dataset '{dataset}' declares {spec.shape_problem}; "
                        f"download datasets.json again")
    return spec


def describe_offer(offered: dict[str, dict[str, FeatureSpec]], images_only: bool = False) -> str:
    """One line: ``elixrc: Embedding [1, 8, 8, 1376]; elixrb/img_emb: img_emb [32, 768]; ...``."""
    parts = []
    for dataset, features in offered.items():
        listed = [f"{name} {list(spec.shape) if spec.shape is not None else '[?]'}" for name, spec in features.items()
                  if name != ID_COLUMN and not (images_only and is_text_embedding(dataset, name))]
        if listed:
            parts.append(f"{dataset}: {', '.join(listed)}")
    return "; ".join(parts) or "no embedding features"


def is_text_embedding(dataset: str, feature: str) -> bool:
    """True for ELIXR-B text-tower outputs (``elixrb/txt_emb``, ``contrastive_txt_emb``): not image embeddings."""
    words = {word.lower() for part in f"{dataset}/{feature}".split("/") for word in part.split("_")}
    return bool(words & TEXT_WORDS)


def refuse_text(what: str, dataset: str, feature: str, images: str) -> None:
    if is_text_embedding(dataset, feature):
        raise DataError(f"{what} is a text embedding (ELIXR-B's text tower, stored per image), not an embedding of "
                        f"the image, so it cannot condition the elixr branch; choose an image feature: {images}")


def _parse_features(path: Path, dataset: str, features: object) -> dict[str, FeatureSpec]:
    """Accept ``{name: {dtype, shape}}`` (or ``{name: dtype}``) and ``[{name, dtype, shape}, ...]``."""
    if isinstance(features, dict):
        items = [(name, value) for name, value in features.items()]
    elif isinstance(features, list):
        if not all(isinstance(value, dict) and isinstance(value.get("name"), str) for value in features):
            raise DataError(f"{path}: dataset '{dataset}' lists 'features' without a 'name' in every entry")
        items = [(value["name"], value) for value in features]
    else:
        raise DataError(f"{path}: dataset '{dataset}' has no 'features' mapping or list (found {features!r})")
    specs = {}
    for name, value in items:
        value = {"dtype": value} if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise DataError(f"{path}: feature '{name}' of dataset '{dataset}' is {value!r}; expected {{dtype, shape}}")
        shape, problem = _declared_shape(value.get("shape"))
        dtype = value.get("dtype")
        specs[str(name)] = FeatureSpec(str(name), str(dtype) if dtype is not None else None, shape, problem)
    return specs


def _declared_shape(shape: object) -> tuple[tuple[int, ...] | None, str | None]:
    """A declared per-row shape as the reference loader reads it: a list of sizes or a bare int; ``[-1]``,
    ``[]`` or nothing for a variable-length or scalar column. Anything else is kept as a problem, raised only
    when that feature is the one read."""
    if shape is None or shape == [] or shape == [-1]:
        return None, None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if isinstance(shape, list) and all(isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_SIZE
                                       for size in shape):
        return tuple(shape), None
    return None, f"shape {visible_text(repr(shape), 60)}, not a list of sizes 1 to {MAX_SIZE}"
