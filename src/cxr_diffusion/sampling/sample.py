"""Stage `sample` (per branch): generate one image per test condition, plus the figures people look at.

Conditions come from the test images themselves (their prompt, the image as reference, their
ELIXR embedding), read from the branch's condition store. Generated images are written as
Parquet shards in exactly the `prepare` format (split "test", the source image's id and labels),
so every reader of real images reads them too.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cxr_diffusion.errors import UserError
from cxr_diffusion.branches import BRANCHES, branch_spec
from cxr_diffusion.config import Params
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.safe_text import shown_value
from cxr_diffusion.conditioning.prompts import prompt_for
from cxr_diffusion.conditioning.store import ConditionStore, check_store_branch
from cxr_diffusion.data.decode import encode_png
from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, check_prepared_for, close_writers, shard_schema
from cxr_diffusion.diffusion.data import ConditionedImages
from cxr_diffusion.diffusion.grid import tensor_to_pil
from cxr_diffusion.diffusion.latents import vae_factor
from cxr_diffusion.diffusion.noise import sampling_scheduler
from cxr_diffusion.diffusion.model_files import verify_model_files
from cxr_diffusion.diffusion.model_limits import check_model_limits
from cxr_diffusion.diffusion.pipeline import SATURATED_FRACTION, CXRDiffusionPipeline, to_pil, unusable_images
from cxr_diffusion.device import describe_device, half_dtype, resolve_device
from cxr_diffusion.io import JsonFileError, atomic_directory, atomic_path, read_json, write_json
from cxr_diffusion.sampling.figures import one_row_per_finding, originals_vs_generated
from cxr_diffusion.sampling.settings import sampling_settings


# Originals and generations kept for the figures: original_vs_generated_24.png shows this many pairs.
FIGURE_PAIRS = 24


class SamplingError(UserError, ValueError):
    """The model or the data cannot be sampled as asked; the message says why."""


def load_pipeline(model_dir: str | Path, sampler: str, device: torch.device) -> CXRDiffusionPipeline:
    """A saved model on ``device``: UNet, adapter and CLIP towers in bf16/fp16 on a GPU (fp32 on the CPU);
    the VAE in fp32 (SD VAEs can overflow in fp16), decoding one image at a time so that memory does
    not grow with ``sample.batch_size`` (50 decoded 512px images take ~36 GB on a CPU otherwise).

    The folder's files are checked against the hashes written when it was saved, its
    ``model_index.json`` against what our pipeline is made of, and its configs and weight headers against
    sane ranges (``model_limits``), before diffusers reads anything; only
    safetensors weights are read, and only files whose size and sha256 match the folder's record (a file may be a
    link, as DVC's symlink cache makes them; its content is what is checked)."""
    model_dir = Path(model_dir)
    check_saved_model(model_dir)
    try:
        pipeline = CXRDiffusionPipeline.from_pretrained(str(model_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as error:  # diffusers' errors for unreadable configs, weights and components
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SamplingError(f"{model_dir}: not a loadable saved model ({detail}); retrain it (`dvc repro`, "
                            f"stage train@<branch>) or re-fetch the folder") from None
    _check_every_weight_loaded(pipeline, model_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler, sampler)
    return place_pipeline(pipeline, device)


def check_saved_model(model_dir: Path) -> dict:
    """A saved model's ``model_index.json``, once its files match the hashes written when it was saved, the index
    names what our pipeline is made of and its configs and weight headers are in range: nothing is built."""
    verify_model_files(model_dir)
    index = _check_model_index(model_dir)
    check_model_limits(model_dir, index)
    return index


_DIFFUSERS_PARTS = ("unet", "condition_adapter", "vae")


def _check_every_weight_loaded(pipeline: CXRDiffusionPipeline, model_dir: Path) -> None:
    """Every tensor of each component's weights files went into its module, and every tensor of the module came
    from them. diffusers leaves a tensor missing from the file on the meta device (no data), and drops one the
    config has no place for with a warning: a model whose config lost its class embedding would sample without
    the condition it was trained with. Refuse either here rather than fail at the first use, or never."""
    from cxr_diffusion.safetensors_header import read_safetensors_header

    for name in ("unet", "condition_adapter", "vae", "text_encoder", "image_encoder"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        state = module.state_dict()
        missing = [key for key, tensor in state.items() if tensor.is_meta]
        # The diffusers parts' files use the modules' own names; transformers renames some keys as it loads (and
        # reports what it could not place itself), so its towers are not compared here.
        stored = {key for path in sorted((model_dir / name).glob("*.safetensors"))
                  for key in read_safetensors_header(path).tensors} if name in _DIFFUSERS_PARTS else set()
        unused = sorted(stored - set(state))
        if missing or unused:
            what = (f"lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}" if missing else
                    f"hold {len(unused)} tensors its config has no place for, e.g. {shown_value(', '.join(unused[:3]), 160)}")
            raise SamplingError(f"{model_dir}: not a loadable saved model ({name} weights {what}); retrain it (`dvc "
                                f"repro`, stage train@<branch>) or re-fetch the folder")


# What model_index.json may name for each component: [library, class], the class as a pattern.
_COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "condition_adapter": ("cxr_diffusion.diffusion.condition", "ConditionAdapter"),
    # The saved one (sampling_scheduler picks the sampler): only the discrete-time schedulers this project uses.
    "scheduler": ("diffusers", r"(DDPM|DDIM|DPMSolverMultistep|EulerDiscrete|EulerAncestralDiscrete|UniPCMultistep"
                               r"|PNDM)Scheduler"),
    "tokenizer": ("transformers", r"CLIPTokenizer(Fast)?"),
    # The towers save_pipeline writes: model_limits checks their configs as these classes build them.
    "text_encoder": ("transformers", "CLIPTextModel"),
    "image_processor": ("transformers", r"CLIP\w+"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "vae": ("diffusers", "AutoencoderKL"),
}
_REQUIRED = {"unet", "condition_adapter", "scheduler"}
_WEIGHTED = {"unet", "condition_adapter", "vae", "text_encoder", "image_encoder"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_index(model_dir: Path) -> dict:
    """Refuse a model_index.json that is not one of ours (class, branch, components, their folders), with
    one line naming the file and the entry, before diffusers turns it into a traceback; return it."""
    path = model_dir / "model_index.json"
    fix = "retrain it (`dvc repro`, stage train@<branch>) or re-fetch the folder"
    try:
        index = read_json(path, fix, kind=object)
    except FileNotFoundError:
        raise SamplingError(f"{model_dir}: not a saved model (no model_index.json); train one with `dvc repro`") from None
    except JsonFileError as error:  # bad bytes, syntax, nesting or a huge integer
        raise SamplingError(str(error)) from None
    if not isinstance(index, dict):
        raise SamplingError(f"{path}: expected a JSON object, got {type(index).__name__}; {fix}")
    if index.get("_class_name") != CXRDiffusionPipeline.__name__:
        raise SamplingError(f"{path}: a {index.get('_class_name')!r} pipeline, not a {CXRDiffusionPipeline.__name__} "
                            f"saved by this project; {fix}")
    branch = index.get("branch")
    if branch not in BRANCHES:
        raise SamplingError(f"{path}: branch {branch!r} is not one of {', '.join(BRANCHES)}; {fix}")
    needed = _REQUIRED | set(branch_spec(branch).encoder_components)
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if name not in _COMPONENTS:
            raise SamplingError(f"{path}: names a component {name!r} that a {branch} model does not have; {fix}")
    for name, (library, pattern) in _COMPONENTS.items():
        entry = index.get(name, [None, None])  # save_pipeline writes [null, null] for a component a branch lacks
        if entry == [None, None]:
            if name in needed:
                raise SamplingError(f"{path}: a {branch} model needs the component {name!r}, which it does not name; "
                                    f"{fix}")
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library and isinstance(entry[1], str)
                and re.fullmatch(pattern, entry[1])):
            raise SamplingError(f"{path}: component {name!r} is {entry!r}; expected [{library!r}, {pattern!r}]; {fix}")
        folder = model_dir / name
        if not folder.is_dir():
            raise SamplingError(f"{folder}: missing (model_index.json names the component {name!r}); {fix}")
        if name in _WEIGHTED:
            _check_safetensors(folder, fix)
    return index


def _check_safetensors(folder: Path, fix: str) -> None:
    """A component with weights must hold them as .safetensors; pickle files are never read."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise SamplingError(f"{folder}: weights only as pickle ({', '.join(sorted(pickles))}); this loader reads "
                            f"safetensors only (pickles can run code); re-save with safe_serialization=True or {fix}")
    raise SamplingError(f"{folder}: no .safetensors weights; {fix}")


def place_pipeline(pipeline: CXRDiffusionPipeline, device: torch.device) -> CXRDiffusionPipeline:
    dtype = half_dtype(device)
    for name in ("unet", "condition_adapter", "text_encoder", "image_encoder"):
        module = getattr(pipeline, name, None)
        if module is not None:  # diffusers warns on any dtype cast, so cast only when it changes something
            module.to(device) if module.dtype == dtype else module.to(device, dtype)
    if pipeline.vae is not None:
        pipeline.vae.to(device, torch.float32)
        pipeline.vae.enable_slicing()
    return pipeline


@dataclass(frozen=True)
class SamplerSettings:
    """How a set of images is sampled, and the params section the values come from (named in errors)."""

    steps: int
    guidance_scale: float
    batch_size: int
    section: str = "sample"


def generate(pipeline: CXRDiffusionPipeline, conditions: torch.Tensor, params: Params, seed: int,
             batch_size: int | None = None, settings: SamplerSettings | None = None) -> list[Image.Image]:
    """One image per condition row, batch by batch; batch ``i`` uses generator seed ``seed + i``. A batch
    with a non-finite or saturated image is refused (SamplingError, see ``check_generated``). ``settings``:
    steps, guidance and batch size (default: the sample section's; ``batch_size`` overrides its batch size)."""
    settings = settings or SamplerSettings(params.sample.steps, params.sample.guidance_scale, params.sample.batch_size)
    batch_size = batch_size or settings.batch_size
    timesteps = pipeline.scheduler.config.num_train_timesteps
    if settings.steps > timesteps:
        raise SamplingError(f"params: '{settings.section}.steps' is {settings.steps}, more than the {timesteps} timesteps "
                            f"{pipeline.name_or_path or 'the model'} was trained with; lower it")
    images = []
    for i, start in enumerate(range(0, len(conditions), batch_size)):
        out = pipeline(condition=conditions[start:start + batch_size], guidance_scale=settings.guidance_scale,
                       num_inference_steps=settings.steps, generator=torch.Generator().manual_seed(seed + i),
                       output_type="pt", progress=False)
        check_generated(out.images, pipeline.name_or_path or "the model",
                        f"guidance scale {settings.guidance_scale} ({settings.section}.guidance_scale)")
        images += to_pil(out.images)
    return images


def check_generated(images: torch.Tensor, model: str, settings: str) -> None:
    """Refuse generations (batch, channels, H, W) in [0, 1] of which any is non-finite or saturated (at least
    SATURATED_FRACTION of its pixels black or white): a collapsed sampler, never a chest X-ray."""
    counts = unusable_images(images)
    failed = sum(counts.values())
    if failed:
        raise SamplingError(
            f"{model}: {failed} of {len(images)} generated images are unusable ({counts['non-finite']} with NaN/infinite "
            f"values, {counts['saturated']} saturated: >= {SATURATED_FRACTION:.0%} of pixels black or white), with "
            f"{settings}; likely causes: a guidance scale too high (3-7 is usual), a condition far from the "
            f"training ones (scale or file), or corrupted model weights (retrain or re-fetch the model)")


def findings_grid(pipeline: CXRDiffusionPipeline, params: Params, seed: int) -> tuple[Image.Image, list[str]]:
    """clip_text only: one row per class, ``per_finding`` images of its prompt, labelled with the class."""
    prompts, names = [], []
    for name, members in params.filter.class_members().items():
        label = NO_FINDING if name == NO_FINDING else members[0]
        prompts.append(prompt_for(label, params.clip))
        names.append(name)
    condition = pipeline.make_condition(prompt=prompts).repeat_interleave(params.sample.per_finding, 0)
    images = generate(pipeline, condition, params, seed + 10_000)
    return one_row_per_finding(images, names), prompts


def output_side(pipeline: CXRDiffusionPipeline) -> int:
    """The side of the images ``pipeline`` generates: its UNet's, times the VAE's factor in latent space."""
    vae = getattr(pipeline, "vae", None)
    return pipeline.unet.config.sample_size * (vae_factor(vae) if vae is not None else 1)


def sample_branch(params: Params, branch: str, model_dir: Path, prepared_dir: Path, store_dir: Path,
                  out_dir: Path, figures_dir: Path, metrics_path: Path | None = None) -> dict:
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)
    pipeline = load_pipeline(model_dir, params.sample.sampler, device)
    if pipeline.config.branch != branch:
        raise SamplingError(f"{model_dir} holds a {pipeline.config.branch} model, not {branch}")
    # The manifest written below says these classes and this size: the labels and images must be them.
    check_prepared_for(prepared_dir, params.image_size, params.filter.classes)
    if output_side(pipeline) != params.image_size:
        raise SamplingError(f"{model_dir} generates {output_side(pipeline)} px images but image_size is "
                            f"{params.image_size}; retrain it (dvc repro) after changing image_size")
    store = ConditionStore(store_dir)
    check_store_branch(store, store_dir, branch)
    test = ConditionedImages(prepared_dir, "test", store, params.channels, limit=params.sample.count)
    if len(test) == 0:
        raise SamplingError(f"no test images with a {branch} condition in {prepared_dir}; check the filter split")
    # Streamed batch by batch: each batch of generations is written as it comes, and only the first
    # FIGURE_PAIRS originals and generations are kept (for the figures), so memory does not grow with sample.count.
    classes, size = tuple(params.filter.classes), params.sample.batch_size
    originals: list[Image.Image] = []
    generated: list[Image.Image] = []
    findings: list[str] = []
    seconds = 0.0
    missing = test.missing_before_limit  # test images without a condition (an ELIXR embedding left out): counted
    # The samples, their figures and their metrics are replaced together, or none of them: a failure while the
    # figures or the metrics are written keeps the previous samples beside their own figures and metrics.
    with contextlib.ExitStack() as replaced:
        tmp = replaced.enter_context(atomic_directory(out_dir))
        figures = replaced.enter_context(atomic_directory(figures_dir))
        metrics_file = replaced.enter_context(atomic_path(metrics_path)) if metrics_path is not None else None
        writer = SplitShardWriter(tmp, "test", shard_schema(classes), shard_size=10_000, row_group_size=64)
        with tqdm(total=len(test), desc=f"sample {branch}", unit="img") as progress:
            for i, start in enumerate(range(0, len(test), size)):
                items = [test[j] for j in range(start, min(start + size, len(test)))]
                started = time.perf_counter()
                batch = generate(pipeline, torch.stack([item["condition"] for item in items]), params,
                                 params.seed + i, batch_size=size)
                seconds += time.perf_counter() - started
                for item, image in zip(items, batch):  # each generation carries its source image's id and labels
                    writer.write(ShardRecord(image_png=encode_png(np.asarray(image)), image_index=item["image_index"],
                                             patient_id=item["patient_id"], view=item["view"],
                                             finding_labels=item["finding_labels"], split="test",
                                             labels=tuple(int(v) for v in item["labels"].tolist())))
                    if len(generated) < FIGURE_PAIRS:
                        originals.append(tensor_to_pil(item["pixel_values"]))
                        generated.append(image)
                        findings.append(item["finding_labels"])
                progress.update(len(batch))
        shards = close_writers(tmp, {"test": writer})
        write_json(tmp / MANIFEST, {
            "images_in": len(test) + missing, "written": len(test), "rejected": missing,
            "rejected_by_reason": {"missing_condition": missing} if missing else {},
            "per_split": {"train": 0, "val": 0, "test": len(test)}, "classes": list(classes),
            "image_size": params.image_size, "square": "generated", "shards": shards,
            "generated": {"branch": branch, "model": str(model_dir), **sampling_settings(params)},
        })
        originals_vs_generated(originals[:6], generated[:6], findings[:6]).save(figures / "original_vs_generated_6.png")
        originals_vs_generated(originals[:24], generated[:24], findings[:24]).save(figures / "original_vs_generated_24.png")
        if branch == "clip_text" and params.sample.per_finding > 0:
            grid, prompts = findings_grid(pipeline, params, params.seed)
            grid.save(figures / "one_row_per_finding.png")
            (figures / "one_row_per_finding.txt").write_text("\n".join(prompts) + "\n")
        metrics = {"branch": branch, "images": len(test), "missing_condition": missing,
                   **sampling_settings(params), "device": describe_device(device),
                   "seconds": round(seconds, 1),
                   "images_per_second": round(len(test) / max(seconds, 1e-9), 2)}
        if metrics_file is not None:
            write_json(metrics_file, metrics)
    return metrics
