"""Typed parameters: the only reader of ``params.yaml``.

Every value is cast to the type its dataclass field declares and checked; an unknown key or a
wrong type is an error that names the key. Casting matters because ``dvc exp run -S lr=1e-5``
writes ``lr: 1e-05``, which YAML 1.1 readers (PyYAML) return as the *string* ``'1e-05'``.
The file is read as YAML 1.2, exactly as DVC reads it for ``dvc.lock`` and ``dvc params diff``:
``seed: 010`` is 10 for both (a YAML 1.1 reader would see octal 8 while DVC records 10).
Defaults are written once, here, as literals; ``params.yaml`` may omit any key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML, YAMLError

from cxr_diffusion.errors import UserError

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
NIH_LABELS: tuple[str, ...] = NIH_FINDINGS + (NO_FINDING,)
BRANCHES: tuple[str, ...] = ("clip_text", "clip_vision", "elixr")


class ParamsError(UserError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range (the message names it)."""


_LAUNCH_CONFIG = re.compile(r"accelerate/[A-Za-z0-9][A-Za-z0-9_.-]*\.(yaml|yml|json)")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParamsError(f"params: '{key}' {message}")


@dataclass(frozen=True)
class PhantomConfig:
    n_images: int = 3000        # rows sampled from the real NIH metadata, whole patients at a time
    image_size: int = 1024      # rendered PNG side; NIH ChestX-ray14 images are 1024x1024
    rgba_fraction: float = 0.01  # share of PNGs stored as RGBA, as a few real NIH files are

    def validate(self, key: str) -> None:
        _require(self.n_images > 0, f"{key}.n_images", "must be > 0")
        _require(16 <= self.image_size <= 4096, f"{key}.image_size", "must be in [16, 4096]")
        _require(0.0 <= self.rgba_fraction <= 1.0, f"{key}.rgba_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class DatasetConfig:
    source: Literal["phantom", "nih"] = "phantom"  # phantom: offline embedded default; nih: a real download
    nih_root: str | None = None  # NIH ChestX-ray14 folder (Data_Entry_2017*.csv, images_001/images/...)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def validate(self, key: str) -> None:
        if self.source == "nih":
            _require(bool(self.nih_root), f"{key}.nih_root",
                     "must point at your NIH ChestX-ray14 download when dataset.source is 'nih'")
        self.phantom.validate(f"{key}.phantom")


@dataclass(frozen=True)
class SplitConfig:
    method: Literal["random", "official"] = "random"  # official: NIH train_val_list.txt / test_list.txt
    val_fraction: float = 0.1   # share of patients (random) or of train_val patients (official)
    test_fraction: float = 0.1  # share of patients; ignored by 'official'

    def validate(self, key: str) -> None:
        _require(0.0 <= self.val_fraction < 1.0, f"{key}.val_fraction", "must be in [0, 1)")
        _require(0.0 <= self.test_fraction < 1.0, f"{key}.test_fraction", "must be in [0, 1)")
        _require(self.val_fraction + self.test_fraction < 1.0, key,
                 "val_fraction + test_fraction must be < 1 (train needs patients)")


@dataclass(frozen=True)
class FilterConfig:
    # Output classes; a name that is not an NIH label must be defined in `merges`.
    classes: tuple[str, ...] = ("Infiltration", "No Finding", "Effusion", "Nodule/Mass", "Atelectasis")
    merges: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"Nodule/Mass": ("Nodule", "Mass")})
    allow_other_labels: bool = True  # keep images that also carry findings outside `classes`
    max_per_class: int | None = None  # cap on images per class (seeded), None for no cap
    views: tuple[str, ...] = ("PA", "AP")
    age_min: int = 0
    age_max: int = 100  # the 2017 CSV holds impossible ages (e.g. 414); they are rejected
    follow_up: Literal["all", "first", "last"] = "all"  # which studies of each patient to keep
    include_list: str | None = None  # CSV: `Image Index` + one 0/1 column per class (reference format)
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, key: str) -> None:
        _require(len(self.classes) > 0, f"{key}.classes", "must name at least one class")
        _require(len(set(self.classes)) == len(self.classes), f"{key}.classes", "has duplicates")
        for name in self.classes:
            _require(name in NIH_LABELS or name in self.merges, f"{key}.classes",
                     f"names '{name}', which is neither an NIH label ({', '.join(NIH_LABELS)}) "
                     f"nor defined in {key}.merges")
        for target, sources in self.merges.items():
            _require(target in self.classes, f"{key}.merges.{target}", "is not one of filter.classes")
            for source in sources:
                _require(source in NIH_LABELS, f"{key}.merges.{target}",
                         f"names '{source}', which is not an NIH label ({', '.join(NIH_LABELS)})")
        _require(self.max_per_class is None or self.max_per_class > 0, f"{key}.max_per_class", "must be > 0")
        _require(0 <= self.age_min <= self.age_max, f"{key}.age_min", "must be in [0, age_max]")
        _require(len(self.views) > 0, f"{key}.views", "must name at least one view (PA, AP)")
        _require(self.include_list is None or (Path(self.include_list).parts[:1] == ("reference",)
                                               and ".." not in Path(self.include_list).parts), f"{key}.include_list",
                 f"is {self.include_list!r}; put the list under reference/ and name it relative to the repository "
                 "(reference/ is the filter stage's dep in dvc.yaml, so editing the list reruns the stage)")
        self.split.validate(f"{key}.split")

    def class_members(self) -> dict[str, tuple[str, ...]]:
        """Output class -> the NIH labels it stands for."""
        return {name: tuple(self.merges.get(name, (name,))) for name in self.classes}


@dataclass(frozen=True)
class PrepareConfig:
    square: Literal["pad", "center_crop"] = "pad"  # non-square images: pad with black, or crop the centre
    shard_size: int = 2000     # images per Parquet shard
    row_group_size: int = 64   # rows per Parquet row group: the unit of random access in training
    workers: int = 0           # decode processes; 0 = all cores
    max_pixels: int = 50_000_000     # decode budget, read from the header before decoding: larger is a listed reject
    max_aspect_ratio: float = 2.0    # long side / short side; chest X-rays are near 1, farther is a listed reject
    min_side: int = 64               # short side in pixels; smaller (a 1x1 or 5000x1 file) is a listed reject

    def validate(self, key: str) -> None:
        _require(self.shard_size > 0, f"{key}.shard_size", "must be > 0")
        _require(1 <= self.max_pixels <= 500_000_000, f"{key}.max_pixels",
                 f"is {self.max_pixels}; must be in [1, 500000000] (an image that size is 2 GB as float32)")
        _require(1.0 <= self.max_aspect_ratio <= 100.0, f"{key}.max_aspect_ratio",
                 f"is {self.max_aspect_ratio}; must be in [1, 100] (long side / short side)")
        _require(1 <= self.min_side and self.min_side**2 <= self.max_pixels, f"{key}.min_side",
                 f"is {self.min_side}; must be >= 1 and its square <= prepare.max_pixels (else every image is a reject)")
        _require(0 < self.row_group_size <= self.shard_size, f"{key}.row_group_size",
                 "must be in [1, prepare.shard_size]")
        _require(self.workers >= 0, f"{key}.workers", "must be >= 0 (0 = all cores)")


@dataclass(frozen=True)
class DemoClipConfig:
    """The small CLIP that stage `train_clip` trains when no pretrained CLIP is available (offline)."""

    image_size: int = 64        # vision tower input side (its image processor resizes to this)
    patch_size: int = 8
    width: int = 128            # hidden size of both towers
    layers: int = 4
    heads: int = 4
    projection_dim: int = 128   # joint embedding size: the clip_vision condition is (1, projection_dim)
    vocab_size: int = 1000      # BPE vocabulary learned from the prompts: 2 specials + 512 byte symbols + merges
    max_length: int = 32        # text positions: the clip_text condition is (max_length, width); CLIP-L has 77
    epochs: int = 15
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1

    def validate(self, key: str) -> None:
        _require(self.image_size > 0 and self.width > 0, key, "image_size and width must be > 0")
        _require(self.image_size % self.patch_size == 0, f"{key}.patch_size", "must divide clip.demo.image_size")
        _require(self.width % self.heads == 0, f"{key}.heads", "must divide clip.demo.width")
        for name in ("layers", "projection_dim", "vocab_size", "max_length", "epochs", "batch_size"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(self.lr > 0, f"{key}.lr", "must be > 0")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class ClipConfig:
    # "demo": the small CLIP trained in the pipeline (offline default). Otherwise a Hugging Face hub id
    # (e.g. openai/clip-vit-large-patch14) or a local directory holding a saved CLIP.
    model: str = "demo"
    revision: str | None = None  # pin a hub revision (commit hash or tag)
    prompt_template: str = "chest x-ray showing {findings}"  # {findings}: "effusion and infiltration"
    normal_prompt: str = "chest x-ray with no findings"      # the prompt for "No Finding"
    batch_size: int = 64        # images or prompts per encoder forward
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of the condition stores
    demo: DemoClipConfig = field(default_factory=DemoClipConfig)

    def validate(self, key: str) -> None:
        _require("{findings}" in self.prompt_template, f"{key}.prompt_template", "must contain {findings}")
        _require(self.normal_prompt.strip() != "", f"{key}.normal_prompt", "must not be empty")
        _require(self.model.strip() != "", f"{key}.model", "must be 'demo', a hub id or a local directory")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        self.demo.validate(f"{key}.demo")


@dataclass(frozen=True)
class ElixrConfig:
    # The published snapshot's root (Yasintuncer/nih-cxr14-elixr: datasets.json + HDF5 shards), or a folder
    # of older files (HDF5 `embeddings` + `image_ids`, Parquet `Image Index` + embedding). null: the stand-in.
    path: str | None = None
    dataset: str = "elixrb/img_emb"  # snapshot dataset (datasets.json name = folder): elixrb/img_emb, elixrc, ...
    feature: str = "img_emb"  # image feature of that dataset: img_emb (32 x 768), Embedding (elixrc: 64 x 1376), ...
    shape: tuple[int, ...] | None = None  # expected (tokens, dim), e.g. [32, 768] for ELIXR-B; null: from the files
    on_missing: Literal["drop", "error"] = "drop"  # filtered images without a usable embedding
    standin_tokens: int = 32  # the stand-in pools the demo CLIP's vision tokens to this many, like ELIXR-B's 32
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of the condition store

    def validate(self, key: str) -> None:
        if self.shape is not None:
            _require(len(self.shape) == 2 and min(self.shape) > 0, f"{key}.shape", "must be [tokens, dim]")
        _require(self.standin_tokens > 0, f"{key}.standin_tokens", "must be > 0")
        parts = self.dataset.split("/")
        _require(all(p.strip() == p and p not in ("", ".", "..") for p in parts), f"{key}.dataset",
                 f"is {self.dataset!r}; expected a dataset of the snapshot's datasets.json, e.g. elixrb/img_emb or elixrc")
        _require(bool(self.feature.strip()) and self.feature != "Image Index", f"{key}.feature",
                 f"is {self.feature!r}; expected an embedding feature of elixr.dataset, e.g. img_emb or Embedding")


@dataclass(frozen=True)
class UNetConfig:
    """A diffusers UNet2DConditionModel. The nih-512 profile sets SD-1.5's shape (320/640/1280/1280)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    # Per resolution level (down blocks, mirrored on the way up): True = self- and cross-attention blocks.
    # Keep it off large feature maps on CPU: full attention at 64x64 costs 10x that at 16x16.
    cross_attention: tuple[bool, ...] = (False, False, True)
    attention_head_dim: int = 8   # diffusers' (legacy) name: heads per attention layer; SD-1.5 uses 8
    norm_num_groups: int = 8      # GroupNorm groups; must divide every block's channels (SD uses 32)
    cross_attention_dim: int | None = None  # None: the branch's condition dim; else the condition is projected

    def validate(self, key: str) -> None:
        _require(len(self.block_out_channels) == len(self.cross_attention), f"{key}.cross_attention",
                 "needs one entry per block_out_channels level")
        _require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), f"{key}.norm_num_groups",
                 "must divide every entry of block_out_channels")
        _require(any(self.cross_attention), f"{key}.cross_attention",
                 "must enable cross-attention on at least one level (the condition enters there)")
        _require(self.layers_per_block > 0, f"{key}.layers_per_block", "must be > 0")
        _require(self.attention_head_dim > 0, f"{key}.attention_head_dim", "must be > 0")
        _require(self.cross_attention_dim is None or self.cross_attention_dim > 0, f"{key}.cross_attention_dim",
                 "must be > 0 or null (the branch's condition dim)")


@dataclass(frozen=True)
class BranchRates:
    # Per-branch learning rates; the top-level `lr`, when set, overrides all three.
    clip_text: float = 1e-3
    clip_vision: float = 1e-3
    elixr: float = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    space: Literal["pixel", "latent"] = "pixel"  # latent: on precomputed VAE latents (stage encode_latents)
    vae: str = "stabilityai/sd-vae-ft-mse"      # AutoencoderKL hub id or local directory (latent space only)
    unet: UNetConfig = field(default_factory=UNetConfig)
    condition_tokens: int = 4     # a (1, dim) condition (clip_vision) is expanded to this many tokens
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    zero_terminal_snr: bool = True  # rescale betas so the last step is pure noise (needs v_prediction)
    num_train_timesteps: int = 1000
    min_snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting; null = plain MSE
    offset_noise: float = 0.0     # per-channel constant added to the noise (brightness freedom)
    cfg_dropout: float = 0.1      # probability of training on the learned null condition (classifier-free guidance)
    lr: BranchRates = field(default_factory=BranchRates)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_steps: int = 50
    plateau_patience: int = 2     # validations without improvement before the lr is cut (plateau)
    plateau_factor: float = 0.5
    early_stopping_patience: int | None = None  # validations without improvement before stopping
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_nonfinite: int = 10       # consecutive non-finite losses before the stage stops
    batch_size: int = 32          # per process and micro-batch
    gradient_accumulation: int = 1
    epochs: int = 100
    max_steps: int | None = 1500  # optimizer steps; the run ends at epochs or max_steps, whichever first
    ema_half_life_images: float = 5000.0  # EMA half-life counted in images seen (EDM style)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs and AMX CPUs, else fp32
    val_every_steps: int = 250
    val_images: int = 256         # validation images (fixed noise and timesteps)
    sample_every_steps: int = 500 # sample grid logged to DVCLive
    sample_grid_images: int = 8   # validation conditions in that grid (0 = no grid)
    sample_grid_steps: int = 20   # DPM-Solver++ steps of the grid (8 x 20 at 512 px costs minutes on a CPU)
    checkpoint_every_steps: int | None = 250  # training-state checkpoints (resume); null = none, a killed run restarts
    checkpoints_total_limit: int = 2
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~1.3x the step time
    compile: Literal["auto", "always", "never"] = "auto"  # torch.compile the UNet; auto: on CUDA (1.35x on an H200), not on CPUs
    num_workers: int = 0          # DataLoader workers
    # `accelerate launch --config_file` of the train stage: processes, GPUs, machines (see accelerate/).
    launch_config: str = "accelerate/one-process.yaml"

    def validate(self, key: str) -> None:
        self.unet.validate(f"{key}.unet")
        # dvc.yaml puts this value into the train stage's shell command, so only a plain file name under
        # accelerate/ passes: no spaces, quotes, `;`, `$` or `..` can reach the shell.
        _require(bool(_LAUNCH_CONFIG.fullmatch(self.launch_config)), f"{key}.launch_config",
                 f"is {self.launch_config!r}; must name an accelerate config file in accelerate/ "
                 f"(letters, digits, '_', '-', '.'; .yaml/.yml/.json), e.g. accelerate/one-process.yaml")
        _require(not self.zero_terminal_snr or self.prediction_type == "v_prediction", f"{key}.zero_terminal_snr",
                 "needs prediction_type v_prediction (epsilon is undefined at the last, pure-noise step)")
        _require(0.0 <= self.cfg_dropout < 1.0, f"{key}.cfg_dropout", "must be in [0, 1)")
        _require(self.min_snr_gamma is None or self.min_snr_gamma > 0, f"{key}.min_snr_gamma", "must be > 0 or null")
        for name in ("clip_text", "clip_vision", "elixr"):
            _require(0 < getattr(self.lr, name) <= 1.0, f"{key}.lr.{name}", "must be in (0, 1]")
        _require(self.plateau_patience >= 1, f"{key}.plateau_patience", "must be >= 1")
        _require(self.val_images >= 1, f"{key}.val_images", "must be >= 1")
        for name in ("batch_size", "gradient_accumulation", "epochs", "val_every_steps", "sample_every_steps",
                     "checkpoints_total_limit", "condition_tokens", "max_nonfinite",
                     "num_train_timesteps"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(self.max_steps is None or self.max_steps > 0, f"{key}.max_steps", "must be > 0 or null")
        _require(self.checkpoint_every_steps is None or self.checkpoint_every_steps > 0,
                 f"{key}.checkpoint_every_steps", "must be > 0 or null (null = no checkpoints)")
        _require(self.sample_grid_images >= 0, f"{key}.sample_grid_images", "must be >= 0 (0 = no sample grid)")
        _require(0 < self.sample_grid_steps <= self.num_train_timesteps, f"{key}.sample_grid_steps",
                 "must be in [1, train.num_train_timesteps]")
        _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 (the largest gradient norm kept)")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _require(self.offset_noise >= 0, f"{key}.offset_noise", "must be >= 0 (0 = none)")
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0 (0 = no warm-up)")
        _require(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0 (0 = load in the main process)")
        _require(self.early_stopping_patience is None or self.early_stopping_patience > 0,
                 f"{key}.early_stopping_patience", "must be > 0 or null (null = never stop early)")
        _require(self.ema_half_life_images > 0, f"{key}.ema_half_life_images", "must be > 0")
        _require(0 < self.plateau_factor < 1, f"{key}.plateau_factor", "must be in (0, 1)")


@dataclass(frozen=True)
class EncodeLatentsConfig:
    # Images per VAE encoder forward. Memory grows with it: SD-VAE at 512 px holds ~0.7 GB of fp32
    # activations per image of the batch on a CPU; a larger batch is no faster there.
    batch_size: int = 16

    def validate(self, key: str) -> None:
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")


@dataclass(frozen=True)
class SampleConfig:
    count: int = 200              # test images whose conditions are sampled (the first N of the test split)
    sampler: Literal["dpm++", "ddim", "ddpm"] = "dpm++"
    steps: int = 20               # DPM-Solver++ needs ~20-25; DDPM was trained with 1000
    guidance_scale: float = 3.0   # classifier-free guidance; 1.0 = off
    batch_size: int = 50
    per_finding: int = 6          # clip_text: images per finding in the one-row-per-finding grid (0 = no grid)

    def validate(self, key: str) -> None:
        for name in ("count", "steps", "batch_size"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(self.per_finding >= 0, f"{key}.per_finding", "must be >= 0 (0 = no one-row-per-finding grid)")
        _require(1.0 <= self.guidance_scale <= 30.0, f"{key}.guidance_scale",
                 "must be in [1, 30] (1 = no guidance; far above that the images saturate)")


@dataclass(frozen=True)
class EvaluatorConfig:
    """The CXR classifier trained on real images: its features give the domain Frechet distance and
    the PCA space, its outputs measure conditioning faithfulness."""

    width: int = 32      # channels of the first conv block (doubles per block)
    feature_dim: int = 128
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    # Side the classifier sees: larger images are area-averaged down to it, never up. Bounds its memory
    # and compute (at 512 px, training holds ~0.27 GB of activations per image of the batch; at 256, a quarter).
    max_image_size: int = 256

    def validate(self, key: str) -> None:
        _require(self.max_image_size >= 8, f"{key}.max_image_size", "must be >= 8 (three 2x poolings)")
        for name in ("width", "feature_dim", "epochs", "batch_size"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(self.lr > 0, f"{key}.lr", "must be > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    bootstrap: int = 200          # resamples for the 95% intervals
    kid_subset: int = 100
    prdc_k: int = 5
    memorization_percentile: float = 1.0  # threshold: this percentile of real-test-to-train distances
    train_reference: int = 2000   # train images compared against for memorization
    diversity_pairs: int = 200
    untrained_images: int = 32    # samples of an untrained model of the same architecture (FD baseline); 0 = skip
    # Images held at once by the stage's own batched work: the in-pipeline evaluator's features of every split
    # and of the untrained baseline, MS-SSIM pairs (two images each). The pretrained models use inception_batch_size.
    batch_size: int = 128
    # Inception FID, only where weights are present (safetensors; see `cxr-diffusion convert-weights`):
    inception_weights: str | None = None            # FID-Inception (pt_inception-2015-12-05) -> standard FID
    reference_inception_weights: str | None = None  # torchvision inception_v3 ImageNet -> reference-compatible FID
    reference_transform_input: bool = True          # torchvision's default for its pretrained Inception
    reference_fid_train_images: int | None = None   # training images the reference-compatible FID uses (None: all)
    inception_batch_size: int = 50                  # batch size of the pretrained evaluators (Inception, DenseNet)
    xrv_weights: str | None = None                  # torchxrayvision DenseNet-121 state dict as safetensors

    def validate(self, key: str) -> None:
        _require(self.bootstrap >= 10, f"{key}.bootstrap", "must be >= 10")
        _require(self.train_reference >= 1, f"{key}.train_reference", "must be >= 1")
        _require(self.diversity_pairs >= 1, f"{key}.diversity_pairs", "must be >= 1")
        _require(self.kid_subset > 1 and self.prdc_k > 0, key, "kid_subset and prdc_k must be positive")
        _require(self.untrained_images == 0 or self.untrained_images >= 2, f"{key}.untrained_images",
                 "must be 0 (skips the untrained baseline) or >= 2 (a Frechet distance needs two images)")
        _require(0 < self.memorization_percentile < 100, f"{key}.memorization_percentile", "must be in (0, 100)")
        _require(self.inception_batch_size > 0, f"{key}.inception_batch_size", "must be > 0")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(self.reference_fid_train_images is None or self.reference_fid_train_images >= 2,
                 f"{key}.reference_fid_train_images", "must be >= 2 or null (all training images)")


@dataclass(frozen=True)
class FetchConfig:
    """Where `cxr-diffusion fetch` gets the assets that clip.model, train.vae and elixr.path name (when they
    are local folders it fills; a param equal to the hub id itself means the Hugging Face cache)."""

    manifest: str = "external/assets.json"  # hashes recorded at fetch time; `cxr-diffusion doctor` checks against them
    clip_repo: str = "openai/clip-vit-large-patch14"  # hub model fetched into clip.model
    clip_revision: str | None = None   # commit hash or tag to pin; null = the latest
    vae_repo: str = "stabilityai/sd-vae-ft-mse"  # hub model fetched into train.vae (latent space only)
    vae_revision: str | None = None    # commit hash or tag to pin; null = the latest
    elixr_repo: str = "Yasintuncer/nih-cxr14-elixr"  # hub dataset fetched into elixr.path (elixr.dataset's files only)
    elixr_revision: str | None = None  # commit hash or tag to pin; null = the latest

    def validate(self, key: str) -> None:
        _require(self.manifest.endswith(".json"), f"{key}.manifest", "must be a .json file, e.g. external/assets.json")
        for name in ("clip", "vae", "elixr"):
            parts = getattr(self, f"{name}_repo").split("/")
            _require(len(parts) == 2 and all(p.strip() == p and p not in ("", ".", "..") for p in parts),
                     f"{key}.{name}_repo", "must be a hub id owner/name, e.g. openai/clip-vit-large-patch14")
            revision = getattr(self, f"{name}_revision")
            _require(revision is None or revision.strip() != "", f"{key}.{name}_revision",
                     "must be a commit hash or tag, or null for the latest")


@dataclass(frozen=True)
class Params:
    seed: int = 0                 # one seed for sampling, splits, caps and training
    image_size: int = 64          # side of the prepared (training) images
    channels: Literal[1, 3] = 3   # 3 = grayscale replicated to RGB, as the reference work did
    lr: float | None = None       # when set, overrides every branch's learning rate (dvc exp run -S lr=...)
    device: str = "auto"          # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N; every stage and command
    branches: tuple[Literal["clip_text", "clip_vision", "elixr"], ...] = BRANCHES
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    elixr: ElixrConfig = field(default_factory=ElixrConfig)
    encode_latents: EncodeLatentsConfig = field(default_factory=EncodeLatentsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def learning_rate(self, branch: str) -> float:
        """The top-level `lr` when set (dvc exp run -S lr=...), else the branch's own rate."""
        return self.lr if self.lr is not None else getattr(self.train.lr, branch)

    def validate(self) -> None:
        _require(8 <= self.image_size <= 2048, "image_size", "must be in [8, 2048]")
        _require(self.lr is None or self.lr > 0, "lr", "must be > 0 (or null to use per-branch rates)")
        _require(len(set(self.branches)) == len(self.branches), "branches", "has duplicates")
        _require(len(self.branches) > 0, "branches", "is empty; list at least one of clip_text, clip_vision, elixr")
        _require(0 <= self.seed < 2**32, "seed", f"is {self.seed}; must be in [0, 2**32 - 1] (numpy's seed range)")
        _require(self.lr is None or self.lr <= 1.0, "lr", f"is {self.lr}; must be <= 1 (AdamW diverges far below that)")
        _require(self.sample.steps <= self.train.num_train_timesteps, "sample.steps",
                 f"must be <= train.num_train_timesteps ({self.train.num_train_timesteps}): the sampler "
                 "cannot take more steps than the model was trained with")
        _require(self.device == "auto" or self.device == "cpu" or self.device == "cuda"
                 or (self.device.startswith("cuda:") and self.device[5:].isdigit()), "device",
                 f"is {self.device!r}; expected auto, cpu, cuda or cuda:N")
        self.dataset.validate("dataset")
        self.filter.validate("filter")
        self.prepare.validate("prepare")
        self.clip.validate("clip")
        self.elixr.validate("elixr")
        self.encode_latents.validate("encode_latents")
        self.train.validate("train")
        _require(self.train.space == "pixel" or self.channels == 3, "channels",
                 "must be 3 in latent space (the VAE encodes RGB)")
        self.sample.validate("sample")
        self.evaluator.validate("evaluator")
        self.evaluate.validate("evaluate")
        self.fetch.validate("fetch")


# ----------------------------------------------------------------------------- casting

def _cast(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _require(type(None) in args, key, "must not be null")
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _cast(value, option, key)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(errors[0])
    if value is None:
        raise ParamsError(f"params: '{key}' must not be null (expected {_describe(annotation)})")
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ParamsError(f"params: '{key}' is {value!r}; expected one of {list(args)}")
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict), key, f"must be a mapping (got {type(value).__name__})")
        return build_config(annotation, value, key)
    if origin in (tuple, list):
        _require(isinstance(value, (list, tuple)), key, f"must be a list (got {value!r})")
        item_type = args[0]
        return tuple(_cast(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping (got {value!r})")
        return {str(k): _cast(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamsError(f"params: '{key}' is {value!r}; expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ParamsError(f"params: '{key}' is {value!r}; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ParamsError(f"params: '{key}' is {value!r}; expected an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ParamsError(f"params: '{key}' is {value!r}; expected a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-05 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ParamsError(f"params: '{key}' is {value!r}; expected a number")
        _require(math.isfinite(number), key, f"is {value!r}; expected a finite number (no param takes inf or nan)")
        return number
    if annotation is str:
        _require(isinstance(value, str), key, f"is {value!r}; expected a string")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {annotation!r}")


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def build_config(cls: type, data: dict, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, casting each value; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            raise ParamsError(
                f"params: unknown key '{where}'. Known keys{' under ' + key if key else ''}: "
                f"{', '.join(sorted(known))}. Check the spelling (dvc exp run -S uses the same names)."
            )
    values = {}
    for name in known:
        if name in data:
            values[name] = _cast(data[name], hints[name], f"{key}.{name}" if key else name)
    return cls(**values)


def params_from_dict(data: dict) -> Params:
    """Cast and validate a parsed params mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError("params: the file must hold a mapping of keys to values")
    params = build_config(Params, data)
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, cast and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params: {path} does not exist; run from the repository root or pass --params")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())  # YAML 1.2, as DVC reads it
    except (YAMLError, UnicodeDecodeError) as error:
        raise ParamsError(f"params: {path} is not valid YAML: {' '.join(str(error).split())}") from error
    try:
        return params_from_dict(data)
    except ParamsError as error:
        raise ParamsError(f"{error} (in {path})") from None


def to_dict(config: Any) -> Any:
    """A plain, YAML/JSON-friendly copy of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
