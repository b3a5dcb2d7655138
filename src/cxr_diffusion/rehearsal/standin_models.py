"""Random-weight stand-ins of the hub models nih-512 reads: CLIP ViT-L/14, the SD VAE (ft-MSE) and RadDINO.

Each is the published architecture with random weights, saved the way the hub repository holds it
(``save_pretrained`` files: config, safetensors weights; CLIP also its tokenizer and image processor), and
then loaded back through the project's own loaders (`conditioning.clip`, `diffusion.latents`) to check the
shapes the pipeline reads from it: 77 x 768 text tokens, a 1 x 768 image embedding, 64 x 64 x 4 latents of
a 512-px image.

The tokenizer is CLIP's format (lowercased words split as CLIP splits them, GPT-2 byte symbols, ``</w>`` word
ends, ``vocab.json`` + ``merges.txt``), its merges learned by the project's deterministic BPE
(`conditioning.prompt_tokenizer`) from every prompt the params can make from NIH finding labels. The ids
follow the real vocabulary's order: the 256 byte symbols, their 256 word-final forms, the merges, then
``<|startoftext|>`` and ``<|endoftext|>`` last (the real ones are 49406 and 49407), so the highest id in a
prompt is its end token, which is what CLIP's pooling looks for when the config's ``eos_token_id`` is the
real config's legacy 2. The vocabulary is smaller than the real 49,408 (only what the prompts need); the
embedding table keeps the real 49,408 rows.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import torch

from cxr_diffusion.config import ClipConfig
from cxr_diffusion.nih_labels import NIH_FINDINGS, NO_FINDING

# openai/clip-vit-large-patch14's config.json (the values that define the architecture and the token ids).
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "projection_dim": 768}
CLIP_PROJECTION_DIM = 768
CLIP_LOGIT_SCALE = 2.6592
# Its preprocessor_config.json as published (the older feature-extractor form: sizes as plain integers).
CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
CLIP_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}
# stabilityai/sd-vae-ft-mse's config.json (scaling_factor: diffusers' value for it, 0.18215).
SD_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 256,
          "scaling_factor": 0.18215}
MERGES_HEADER = "#version: 0.2"  # the first line of CLIP's merges.txt
# microsoft/rad-dino's config.json (DINOv2 ViT-B/14) and preprocessor_config.json: 518-px inputs, which its model
# card's 37 x 37 patch grid shows, normalised with its chest X-ray mean and std.
RADDINO = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14,
           "image_size": 518, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0,
           "qkv_bias": True, "use_swiglu_ffn": False, "drop_path_rate": 0.0}
RADDINO_PREPROCESSOR = {"crop_size": {"height": 518, "width": 518}, "do_center_crop": True, "do_convert_rgb": True,
                        "do_normalize": True, "do_rescale": True, "do_resize": True,
                        "image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583],
                        "image_processor_type": "BitImageProcessor", "resample": 3,
                        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 518}}


def clip_config(text: dict | None = None, vision: dict | None = None, projection_dim: int = CLIP_PROJECTION_DIM):
    """ViT-L/14's ``CLIPConfig``; ``text`` / ``vision`` override entries (tests use tiny towers)."""
    from transformers import CLIPConfig

    return CLIPConfig(text_config={**CLIP_TEXT, **(text or {}), "projection_dim": projection_dim},
                      vision_config={**CLIP_VISION, **(vision or {}), "projection_dim": projection_dim},
                      projection_dim=projection_dim, logit_scale_init_value=CLIP_LOGIT_SCALE)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clip_parameter_count(config) -> int:
    """Parameters of a ``CLIPModel`` of ``config``, counted on the meta device (nothing allocated)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        return parameter_count(CLIPModel(config))


def vae_parameter_count(config: dict) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return parameter_count(AutoencoderKL(**config))


def prompt_corpus(clip: ClipConfig, max_findings: int = 3) -> list[str]:
    """Every prompt the params make from up to ``max_findings`` NIH findings (``prompts.prompt_for``), and
    the normal prompt; longer label lists only repeat these words and separators."""
    from cxr_diffusion.conditioning.prompts import prompt_for

    prompts = [prompt_for(NO_FINDING, clip)]
    for size in range(1, max_findings + 1):
        prompts += [prompt_for("|".join(labels), clip) for labels in itertools.combinations(NIH_FINDINGS, size)]
    return prompts


def clip_vocabulary(prompts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, ranked merges) learned from ``prompts``, in the real CLIP vocabulary's id order (see module)."""
    from cxr_diffusion.conditioning.prompt_tokenizer import (
        BOS, END_OF_WORD, EOS, byte_symbols, learn_merges, split_words,
    )

    symbols = byte_symbols()
    base = [*symbols, *(symbol + END_OF_WORD for symbol in symbols)]
    word_counts = Counter(word for prompt in prompts for word in split_words(prompt))
    merges = learn_merges(word_counts, vocab_size - len(base) - 2)
    tokens = list(dict.fromkeys(base + [a + b for a, b in merges])) + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, prompts: list[str], vocab_size: int, max_length: int):
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json in ``folder``."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(prompts, vocab_size)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, **CLIP_SPECIAL_TOKENS)
    tokenizer.save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(CLIP_SPECIAL_TOKENS, indent=2) + "\n")
    return tokenizer


def write_clip(folder: Path, prompts: list[str], seed: int, config=None, echo=print) -> dict:
    """A random-weight CLIP of ``config`` (default ViT-L/14) in ``folder`` as the hub repository holds it."""
    from transformers import CLIPModel

    config = config if config is not None else clip_config()
    text = config.text_config
    write_clip_tokenizer(folder, prompts, text.vocab_size, text.max_position_embeddings)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**CLIP_PREPROCESSOR, "size": config.vision_config.image_size, "crop_size": config.vision_config.image_size},
        indent=2) + "\n")
    echo(f"    random weights for CLIP ({clip_parameter_count(config) / 1e6:.1f}M parameters)")
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    parameters = parameter_count(model)
    model.save_pretrained(folder, max_shard_size="20GB")  # one model.safetensors, as the hub repository
    del model
    return {"parameters": parameters, "architecture": clip_architecture(config)}


def clip_architecture(config) -> dict:
    """What defines a CLIP stand-in's shape, for its label (and for telling whether a rebuild is needed)."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "image_size", "patch_size", "hidden_act", "bos_token_id", "eos_token_id",
            "pad_token_id")

    def tower(part) -> dict:
        return {key: getattr(part, key) for key in keys if hasattr(part, key)}

    return {"model": "CLIPModel", "text": tower(config.text_config), "vision": tower(config.vision_config),
            "projection_dim": config.projection_dim}


def check_clip(folder: Path, prompt: str) -> dict:
    """Load ``folder`` with the pipeline's loaders; the shapes of a prompt's tokens and of an image embedding."""
    import numpy as np
    from PIL import Image

    from cxr_diffusion.conditioning.clip import encode_images, encode_prompts, load_text_encoder, load_vision_encoder

    text = load_text_encoder(str(folder))
    hidden, mask, _ = encode_prompts(text, [prompt])
    text_shape = tuple(hidden.shape[1:])
    inputs = text.tokenizer([prompt], padding="max_length", max_length=text.shape[0], truncation=True)
    if len(inputs["input_ids"][0]) != text.shape[0] or not torch.isfinite(hidden).all():
        raise ValueError(f"{folder}: the stand-in CLIP's text tower gives {text_shape} tokens, not finite "
                         f"{text.shape} ones")
    del text, hidden
    vision = load_vision_encoder(str(folder))
    gray = Image.fromarray(np.full((300, 256), 128, dtype=np.uint8))  # non-square: resize + centre crop
    embedding = encode_images(vision, [gray])
    if not torch.isfinite(embedding).all():
        raise ValueError(f"{folder}: the stand-in CLIP's image embedding is not finite")
    return {"text_tokens": list(text_shape), "image_embedding": list(embedding.shape[1:]),
            "prompt_tokens": int(mask.sum())}


def write_vae(folder: Path, seed: int, config: dict | None = None) -> dict:
    """A random-weight ``AutoencoderKL`` of ``config`` (default sd-vae-ft-mse's) in ``folder``."""
    from diffusers import AutoencoderKL

    config = config if config is not None else SD_VAE
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    parameters = parameter_count(vae)
    vae.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    del vae
    return {"parameters": parameters, "architecture": vae_architecture(config)}


def vae_architecture(config: dict) -> dict:
    return {"model": "AutoencoderKL", **config}


@torch.no_grad()
def check_vae(folder: Path, image_size: int) -> dict:
    """Load ``folder`` with ``latents.load_vae`` and encode one ``image_size`` image; the latent's shape."""
    from cxr_diffusion.diffusion.latents import encode_batch, load_vae

    vae = load_vae(str(folder))
    latent = encode_batch(vae, torch.zeros(1, vae.config.in_channels, image_size, image_size))
    if not torch.isfinite(latent).all():
        raise ValueError(f"{folder}: the stand-in VAE's latents are not finite")
    return {"latent_shape": list(latent.shape[1:]), "image_size": image_size}


def write_raddino(folder: Path, seed: int, config: dict | None = None) -> dict:
    """A random-weight ``Dinov2Model`` of ``config`` (default rad-dino's) in ``folder``, with its image processor."""
    from transformers import Dinov2Config, Dinov2Model

    config = config if config is not None else RADDINO
    size = config["image_size"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**RADDINO_PREPROCESSOR, "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}},
        indent=2) + "\n")
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**config)).eval()
    parameters = parameter_count(model)
    model.save_pretrained(folder, max_shard_size="20GB")  # config.json + one model.safetensors, as the hub holds it
    del model
    return {"parameters": parameters, "architecture": {"model": "Dinov2Model", **config}}


def check_raddino(folder: Path, image_size: int) -> dict:
    """Load ``folder`` with ``evaluation.raddino.load_raddino`` and embed one ``image_size`` image the way the
    evaluate stage does; the feature's width."""
    from cxr_diffusion.evaluation.raddino import chexgenbench_bytes, load_raddino

    raddino = load_raddino(str(folder), torch.device("cpu"))
    with torch.no_grad():
        inputs = raddino.processor(images=chexgenbench_bytes(torch.zeros(1, 3, image_size, image_size)),
                                   return_tensors="pt")
        feature = raddino.model(pixel_values=inputs["pixel_values"]).pooler_output
    if not torch.isfinite(feature).all():
        raise ValueError(f"{folder}: the stand-in RadDINO's features are not finite")
    return {"feature": list(feature.shape[1:]), "input": list(inputs["pixel_values"].shape[1:])}
