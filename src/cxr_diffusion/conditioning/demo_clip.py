"""Stage `train_clip`: the in-pipeline CLIP for offline runs.

A transformers ``CLIPModel`` built from a config and a CLIP-format BPE tokenizer trained on the
prompt corpus, trained contrastively on (train image, prompt) pairs and saved with
``save_pretrained`` (safetensors). The embedding stages then load it through exactly the calls a
hub CLIP uses. Prompts repeat across images (NIH has few label combinations), so every image
whose prompt matches counts as a positive, not only the diagonal.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cxr_diffusion.config import ClipConfig, DemoClipConfig, ParamsError
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.conditioning.prompt_tokenizer import train_prompt_tokenizer
from cxr_diffusion.conditioning.prompts import check_one_prompt_per_finding, prompts_cut_alike, prompt_for
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.shards import MANIFEST, iter_row_groups
from cxr_diffusion.device import describe_device
from cxr_diffusion.io import atomic_directory, write_json
from cxr_diffusion.safe_text import visible_text

def build_demo_clip(config: DemoClipConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=config.width, intermediate_size=4 * config.width,
                num_hidden_layers=config.layers, num_attention_heads=config.heads,
                max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                projection_dim=config.projection_dim)
    vision = dict(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.width,
                  intermediate_size=4 * config.width, num_hidden_layers=config.layers,
                  num_attention_heads=config.heads, num_channels=3, projection_dim=config.projection_dim)
    # Each tower's config carries projection_dim too, as hub CLIPs do, so CLIPVisionModelWithProjection
    # and CLIPTextModelWithProjection load their projections from this checkpoint.
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def build_image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def read_split(prepared_dir: Path, split: str) -> tuple[list[Image.Image], pd.DataFrame]:
    """All images of a split as PIL images, with their rows (demo-sized data only)."""
    images, rows = [], []
    for group in iter_row_groups(prepared_dir, ["image", "image_index", "finding_labels", "labels"], split):
        for image, name, labels, multi_hot in zip(group["image"], group["image_index"], group["finding_labels"],
                                                  group["labels"]):
            images.append(image.convert("RGB"))
            rows.append({"Image Index": name, "Finding Labels": labels, "labels": multi_hot})
    return images, pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "labels"])


def projected(output) -> torch.Tensor:
    """``CLIPModel.get_*_features`` returns a tensor (transformers 4) or an output whose
    ``pooler_output`` holds the projection (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def prompt_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, target: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss when prompts repeat: ``text_embeds`` holds the batch's P distinct prompts and
    ``target[i]`` is image i's prompt. Image -> text is a plain cross entropy; text -> image spreads
    the target evenly over every image with that prompt."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    image_to_text = F.cross_entropy(logits, target)
    positives = F.one_hot(target, len(text_embeds)).T.float()  # (P, B)
    text_to_image = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def evaluate_demo_clip(model, tokenizer, pixel_values, prompts: list[str], labels: np.ndarray, classes: list[str],
                       members: dict[str, tuple[str, ...]], config: ClipConfig, corpus: list[str]) -> dict:
    """Prompt retrieval recall@k (with chance) and zero-shot per-class AUROC on held-out images.

    With no held-out images (``filter.split.val_fraction: 0``) the scores are null: there is nothing to score."""
    model.eval()
    if not prompts:
        metrics = {"val_images": 0, "prompts_in_corpus": len(corpus)}
        for k in (1, 5):
            metrics[f"recall@{k}"], metrics[f"chance_recall@{k}"] = None, min(1.0, k / len(corpus))
        return {**metrics, "zero_shot_auroc": {}, "zero_shot_macro_auroc": None}
    image = F.normalize(projected(model.get_image_features(pixel_values=pixel_values)), dim=-1)

    def embed(texts):
        inputs = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="pt")
        return F.normalize(projected(model.get_text_features(**inputs)), dim=-1)

    corpus_embeds = embed(corpus)
    ranks = (image @ corpus_embeds.T).argsort(dim=1, descending=True)
    truth = torch.tensor([corpus.index(p) for p in prompts])
    position = (ranks == truth[:, None]).float().argmax(1)
    metrics = {"val_images": len(prompts), "prompts_in_corpus": len(corpus)}
    for k in (1, 5):
        metrics[f"recall@{k}"] = float((position < k).float().mean())
        metrics[f"chance_recall@{k}"] = min(1.0, k / len(corpus))
    normal = embed([config.normal_prompt])[0]
    aurocs = {}
    for i, name in enumerate(classes):
        if name == NO_FINDING:
            score = image @ normal
        else:
            member_prompts = [prompt_for(member, config) for member in members[name]]
            score = (image @ embed(member_prompts).T).max(1).values - image @ normal
        positives = labels[:, i]
        if 0 < positives.sum() < len(positives):
            aurocs[name] = float(roc_auc_score(positives, score.numpy()))
    metrics["zero_shot_auroc"] = aurocs
    metrics["zero_shot_macro_auroc"] = float(np.mean(list(aurocs.values()))) if aurocs else None
    return metrics


def demo_clip_loss(model, pixels: torch.Tensor, tokens, batch_prompts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The contrastive loss of one batch on ``device``: its images against the distinct prompts they carry."""
    in_batch = batch_prompts.unique()
    text = projected(model.get_text_features(input_ids=tokens["input_ids"][in_batch].to(device),
                                             attention_mask=tokens["attention_mask"][in_batch].to(device)))
    image = projected(model.get_image_features(pixel_values=pixels.to(device)))
    target = torch.searchsorted(in_batch, batch_prompts).to(device)  # index of each image's prompt in `in_batch`
    return prompt_contrastive_loss(image, text, target, model.logit_scale)


def check_prompts_stay_distinct(tokenizer, prompts: list[str], max_length: int) -> None:
    """Refuse a ``clip.demo.max_length`` that cuts two different prompts to the same tokens: the CLIP
    (and the clip_text model after it) could not tell their findings apart."""
    alike = prompts_cut_alike(tokenizer, prompts, max_length)
    if alike is None:
        return
    (other, prompt), longest = alike
    whole = tokenizer([other, prompt], truncation=False)["input_ids"]
    if whole[0] == whole[1]:  # alike before any cut: no max_length tells them apart
        raise ParamsError(f"params: the prompts {visible_text(repr(other), 160)} and {visible_text(repr(prompt), 160)} "
                          "differ only in case or spaces, which the tokenizer drops; change clip.normal_prompt or "
                          "clip.prompt_template so that each finding has a prompt of its own")
    raise ParamsError(f"params: 'clip.demo.max_length' is {max_length}; the prompts {visible_text(repr(other), 160)} "
                      f"and {visible_text(repr(prompt), 160)} are cut to the same tokens; set it to at least {longest} "
                      "(the longest prompt)")


def train_demo_clip(prepared_dir: str | Path, config: ClipConfig, classes: list[str], members: dict[str, tuple[str, ...]],
                    seed: int, out_dir: str | Path, metrics_path: str | Path | None = None,
                    device: torch.device = torch.device("cpu")) -> dict:
    """Train and save the demo CLIP; return its validation metrics. Writes a note instead when
    ``clip.model`` names a pretrained CLIP (nothing to train)."""
    out_dir = Path(out_dir)
    if config.model != "demo":
        with atomic_directory(out_dir) as tmp:
            write_json(tmp / "not_used.json", {"reason": f"clip.model is '{config.model}': the pretrained CLIP is used"})
        metrics = {"trained": False, "clip_model": config.model}
        if metrics_path:
            write_json(metrics_path, metrics)
        return metrics

    demo = config.demo
    torch.manual_seed(seed)
    prepared_dir = Path(prepared_dir)
    train_images, train_rows = read_split(prepared_dir, "train")
    if not train_images:
        raise DataError(f"{prepared_dir / MANIFEST}: the train split has no images; nothing to train the in-pipeline "
                        f"CLIP on. Check that the filter stage keeps images (filter.* params) and rerun "
                        f"`dvc repro prepare`")
    val_images, val_rows = read_split(prepared_dir, "val")
    train_prompts = [prompt_for(labels, config) for labels in train_rows["Finding Labels"]]
    val_prompts = [prompt_for(labels, config) for labels in val_rows["Finding Labels"]]
    check_one_prompt_per_finding([*train_rows["Finding Labels"], *val_rows["Finding Labels"]],
                                 [*train_prompts, *val_prompts])
    class_prompts = [prompt_for(member, config) for name in classes for member in members[name] if member != NO_FINDING]
    corpus = sorted(set(train_prompts) | set(val_prompts))
    tokenizer = train_prompt_tokenizer(corpus + class_prompts + [config.normal_prompt], demo.vocab_size, demo.max_length)
    check_prompts_stay_distinct(tokenizer, corpus + class_prompts + [config.normal_prompt], demo.max_length)
    processor = build_image_processor(demo.image_size)
    model = build_demo_clip(demo, tokenizer).to(device)  # initialised on the CPU: the same weights on every device

    pixels = processor(images=train_images, return_tensors="pt")["pixel_values"]
    unique = sorted(set(train_prompts))
    prompt_ids = torch.tensor([unique.index(p) for p in train_prompts])
    tokens = tokenizer(unique, padding="max_length", truncation=True, max_length=demo.max_length, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=demo.lr, weight_decay=demo.weight_decay)
    steps_per_epoch = math.ceil(len(pixels) / demo.batch_size)
    total = demo.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=demo.lr, total_steps=total, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    progress = tqdm(total=total, desc="train_clip", unit="step")
    model.train()
    for _ in range(demo.epochs):
        for batch in torch.randperm(len(pixels), generator=generator).split(demo.batch_size):
            loss = demo_clip_loss(model, pixels[batch], tokens, prompt_ids[batch], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    train_seconds = time.perf_counter() - started

    val_pixels = processor(images=val_images, return_tensors="pt")["pixel_values"] if val_images else None
    labels = np.array(val_rows["labels"].tolist()) if len(val_rows) else np.zeros((0, len(classes)))
    model.cpu()  # the held-out evaluation is a few hundred images: cheap on the CPU, where it was measured
    metrics = evaluate_demo_clip(model, tokenizer, val_pixels, val_prompts, labels, classes, members, config, corpus)
    metrics.update({"trained": True, "train_images": len(pixels), "epochs": demo.epochs,
                    "train_seconds": round(train_seconds, 1), "final_loss": float(loss.item()),
                    "parameters": sum(p.numel() for p in model.parameters()), "device": describe_device(device)})
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics
