"""`cxr-diffusion memory-plan`: the training memory plan of each branch for a card, before any data exists.

The trainer plans with the condition store and VAE it trains with (``trainer.plan_device_memory``).
Here they may not exist yet, so each branch's condition shape comes from its store under the
repository root when one is there, else from the shape its published encoder gives (CLIP-L text
77x768, CLIP vision 1x768, ELIXR-B 32x768); the VAE's size from its config when the folder is
there, else the SD VAE's. Both are said in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_diffusion.config import Params
from cxr_diffusion.diffusion.memory_plan import BUDGET_HEADROOM, GIB, MemoryPlan, plan_memory

# (tokens, dim) of each branch's condition as its published encoder gives it (before the adapter).
PUBLISHED_CONDITIONS = {"clip_text": (77, 768), "clip_vision": (1, 768), "elixr": (32, 768)}
SD_VAE_PARAMETERS = 83_653_863  # AutoencoderKL of stabilityai/sd-vae-ft-mse
LATENT_FACTOR, LATENT_CHANNELS = 8, 4  # the SD VAE: 512 px -> 4 x 64 x 64


@dataclass(frozen=True)
class BranchPlan:
    branch: str
    condition: tuple[int, int]  # (tokens, dim) the UNet's cross-attention sees
    condition_source: str
    plan: MemoryPlan


def condition_shape(params: Params, root: Path, branch: str) -> tuple[tuple[int, int], str]:
    """The (tokens, dim) that branch's UNet attends to, and where it was read."""
    from cxr_diffusion.conditioning.store import META, ConditionStore, check_store_branch

    store_path = root / "data" / "embeddings" / branch
    if (store_path / META).is_file():
        store = ConditionStore(store_path)
        check_store_branch(store, store_path, branch)  # as train does: another branch's shape plans wrong
        tokens, dim, source = store.tokens, store.dim, f"its store {store_path}"
    else:
        (tokens, dim), source = PUBLISHED_CONDITIONS[branch], "its published encoder (no store yet)"
    train = params.train
    return (train.condition_tokens if tokens == 1 else tokens, train.unet.cross_attention_dim or dim), source


def vae_parameters(params: Params, root: Path) -> tuple[int, str]:
    """Parameters of the VAE the latent space uses: counted from its config (meta device), else the SD VAE's."""
    config = root / params.train.vae / "config.json"
    if config.is_file():
        from diffusers import AutoencoderKL

        from cxr_diffusion.diffusion.model_limits import check_vae_folder

        checked = check_vae_folder(config.parent)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(checked)
        return sum(parameter.numel() for parameter in vae.parameters()), f"{config.parent}"
    return SD_VAE_PARAMETERS, "the SD VAE's size (train.vae not fetched yet)"


def branch_plans(params: Params, root: Path, budget_bytes: int | None, precision: str) -> tuple[list[BranchPlan], str]:
    """Each branch's plan for a card whose plan budget is ``budget_bytes``, and a note on the VAE."""
    latent = params.train.space == "latent"
    size = params.image_size // LATENT_FACTOR if latent else params.image_size
    channels = LATENT_CHANNELS if latent else params.channels
    vae, vae_source = vae_parameters(params, root) if latent else (0, "none (pixel space)")
    plans = []
    for branch in params.branches:
        (tokens, dim), source = condition_shape(params, root, branch)
        plan = plan_memory(params.train, size, channels, dim, tokens, precision, budget_bytes, vae, "cuda")
        plans.append(BranchPlan(branch, (tokens, dim), source, plan))
    return plans, f"VAE: {vae / 1e6:.1f}M parameters, {vae_source}"


def describe(plans: list[BranchPlan], vae_note: str, card: str, precision: str) -> str:
    lines = [f"Training memory plans for {card}, {precision} (budget {BUDGET_HEADROOM:.0%} of the card); {vae_note}."]
    for entry in plans:
        tokens, dim = entry.condition
        lines += ["", f"{entry.branch}: condition {tokens}x{dim} from {entry.condition_source}", entry.plan.describe()]
    return "\n".join(lines)


def card_budget(memory_gib: float) -> int:
    return int(memory_gib * GIB * BUDGET_HEADROOM)
