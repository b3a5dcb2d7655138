"""Loading a CLIP, hub or local, through exactly the calls the pretrained models use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_diffusion.config import ClipConfig
from cxr_diffusion.conditioning.clip_folder import ClipFolderError, check_clip_tower
from cxr_diffusion.data.nih import DataError

DEMO = "demo"


def clip_source(config: ClipConfig, demo_dir: str | Path) -> str:
    """Where the CLIP comes from: the in-pipeline demo directory, a local directory or a hub id."""
    if config.model == DEMO:
        return str(demo_dir)
    return config.model


def _not_available(source: str, error: Exception) -> DataError:
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        return DataError(f"clip.model: {source} could not be loaded as a saved CLIP ({error}). Point clip.model at "
                         f"a directory written by CLIPModel.save_pretrained (config.json, model.safetensors, "
                         f"tokenizer and preprocessor files), or use 'demo'; with 'demo', a damaged in-pipeline "
                         f"CLIP is rebuilt by `dvc repro -f train_clip`.")
    return DataError(
        f"clip.model: '{source}' is neither a local directory nor in the Hugging Face cache, and the hub is not "
        f"reachable ({type(error).__name__}). Download it where you have network "
        f"(`huggingface-cli download {source} --local-dir /path/to/clip`) and set clip.model to that directory, "
        f"or use clip.model: demo for the in-pipeline CLIP."
    )


@dataclass
class TextEncoder:
    tokenizer: object
    model: torch.nn.Module

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TextEncoder":
        self.model.to(device, dtype)
        return self

    @property
    def preprocessor(self) -> object:
        return self.tokenizer

    @property
    def shape(self) -> tuple[int, int]:
        """(tokens, dim) of the condition: the tokenizer's max length x the text hidden size."""
        return int(self.tokenizer.model_max_length), int(self.model.config.hidden_size)


@dataclass
class VisionEncoder:
    processor: object
    model: torch.nn.Module

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "VisionEncoder":
        self.model.to(device, dtype)
        return self

    @property
    def preprocessor(self) -> object:
        return self.processor

    @property
    def shape(self) -> tuple[int, int]:
        """(1, projection_dim): one projected image embedding, CLIP's `image_embeds`."""
        return 1, int(self.model.config.projection_dim)


def _quiet_transformers() -> None:
    # Loading one tower from a full CLIPModel checkpoint makes transformers list every weight of the
    # other tower as "unexpected"; that is by design here, and the list drowns the stage's own output.
    from transformers.utils import logging

    logging.set_verbosity_error()


def _local_folder(source: str, revision: str | None) -> Path | None:
    """``source`` as a folder on this machine: itself, or a hub id's snapshot in the local cache (None: neither;
    the loader then says it is not available)."""
    if Path(source).is_dir():
        return Path(source)
    from cxr_diffusion.assets.download import AssetError, hub_snapshot

    try:
        return hub_snapshot(source, revision=revision, local_files_only=True,
                            allow_patterns=("config.json", "model.safetensors", "model.safetensors.index.json",
                                            "model-*.safetensors"))
    except (OSError, ValueError, AssetError):
        return None


def _load_tower(source: str, revision: str | None, preprocessor_class, model_class):
    """A preprocessor (tokenizer or image processor) and a CLIP tower, through the hub's own calls."""
    from safetensors import SafetensorError  # a truncated or damaged model.safetensors

    _quiet_transformers()
    folder = _local_folder(source, revision)
    if folder is not None:
        try:
            check_clip_tower(folder, model_class)
        except ClipFolderError as error:
            raise _not_available(source, error) from None
    try:
        preprocessor = preprocessor_class.from_pretrained(source, revision=revision)
        model = model_class.from_pretrained(source, revision=revision, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise _not_available(source, error) from error
    return preprocessor, model.eval()


def load_text_encoder(source: str, revision: str | None = None) -> TextEncoder:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer, model = _load_tower(source, revision, CLIPTokenizer, CLIPTextModel)
    if tokenizer.model_max_length > model.config.max_position_embeddings:  # hub files sometimes say 1e30
        tokenizer.model_max_length = model.config.max_position_embeddings
    return TextEncoder(tokenizer, model)


def load_vision_encoder(source: str, revision: str | None = None) -> VisionEncoder:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    return VisionEncoder(*_load_tower(source, revision, CLIPImageProcessor, CLIPVisionModelWithProjection))


@torch.no_grad()
def encode_prompts(encoder: TextEncoder, prompts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token embeddings (last hidden state, float32 on the encoder's device) padded to max length,
    their attention masks, and how many prompts were truncated."""
    tokens, _ = encoder.shape
    device = encoder.model.device
    hidden, masks, truncated = [], [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        full = encoder.tokenizer(batch, truncation=False)["input_ids"]
        truncated += sum(len(ids) > tokens for ids in full)
        inputs = encoder.tokenizer(batch, padding="max_length", max_length=tokens, truncation=True, return_tensors="pt")
        output = encoder.model(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device))
        hidden.append(output.last_hidden_state.float())
        masks.append(inputs["attention_mask"].bool())
    return torch.cat(hidden), torch.cat(masks), truncated


@torch.no_grad()
def encode_images(encoder: VisionEncoder, images: list) -> torch.Tensor:
    """Projected image embeddings ``(n, 1, projection_dim)``, float32 on the encoder's device, for PIL
    images (grayscale becomes RGB)."""
    inputs = encoder.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    pixels = inputs["pixel_values"].to(encoder.model.device, encoder.model.dtype)
    return encoder.model(pixel_values=pixels).image_embeds.float().unsqueeze(1)
