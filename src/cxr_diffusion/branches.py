"""The three ways of conditioning a model, named once: everything else iterates this registry.

A branch is one diffusion model and one condition store. What differs between branches is only what
the condition is made from, how a user hands it to ``cxr-diffusion generate`` and the encoder a saved
pipeline carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class BranchSpec:
    name: str
    condition: str                  # what the condition is made from (help texts, the report)
    pipeline_input: str             # the keyword of CXRDiffusionPipeline.make_condition that builds it
    generate_option: str            # the option of `cxr-diffusion generate` that takes it
    encoder_components: tuple[str, ...]  # pipeline components beside UNet, adapter and scheduler


BRANCH_SPECS: tuple[BranchSpec, ...] = (
    BranchSpec("clip_text", "a prompt from the Finding Labels through CLIP's text encoder", "prompt", "--prompt",
               ("tokenizer", "text_encoder")),
    BranchSpec("clip_vision", "a reference chest X-ray through CLIP's vision encoder", "image", "--reference",
               ("image_processor", "image_encoder")),
    BranchSpec("elixr", "a pre-extracted ELIXR-B embedding (img_emb)", "embedding", "--embedding", ()),
)
BRANCHES: tuple[str, ...] = tuple(spec.name for spec in BRANCH_SPECS)
Branch = Literal[BRANCHES]  # type: ignore[valid-type]  # the same names, for pydantic to check params against
BRANCH_HELP = ", ".join(BRANCHES[:-1]) + " or " + BRANCHES[-1]


def branch_spec(name: str) -> BranchSpec:
    """The spec of branch ``name``; a KeyError names the known ones (callers have validated ``name``)."""
    for spec in BRANCH_SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no branch {name!r}; the branches are {BRANCH_HELP}")
