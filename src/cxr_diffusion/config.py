"""The params schema: every key of ``params.yaml``, its type, its range and how keys must agree.

Each section of ``params.yaml`` is a frozen pydantic model that declares every key's type, its allowed
range and one comment. The values themselves live only in ``params.yaml`` and the profiles: there
is no default here that could drift from them, so a missing key is an error, like an unknown one, a
wrong type or a value out of range. Every error names the key, the value and what is allowed
(``params_errors``). Types are strict: ``true`` is not the integer 1, and ``"3"`` is not a number.
Reading a file (YAML 1.2 as DVC reads it, no aliases) is ``params_file``'s job.
"""

from __future__ import annotations

import re
import string
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr_diffusion.branches import Branch
from cxr_diffusion.errors import UserError
from cxr_diffusion.nih_labels import NIH_LABELS
from cxr_diffusion.safe_text import is_hidden
from cxr_diffusion.params_errors import KeyProblem, describe

_LAUNCH_CONFIG = re.compile(r"accelerate/[A-Za-z0-9][A-Za-z0-9_.-]*\.(yaml|yml|json)")
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]{1,4}", re.ASCII)  # a machine has tens of GPUs, not 10**20
MAX_ARM_BYTES = 32 * 2**30  # a utility arm's images, held in memory as uint8 at the classifier's side
STUDY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a reader study's id: it names files and storage keys


class ParamsError(UserError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range (the message names it)."""


def most_sampling_steps(timesteps: int, spacing: str, sampler: str) -> int:
    """The most steps ``sampler`` can take over ``timesteps`` training timesteps spaced by ``spacing`` (the
    scheduler's ``timestep_spacing``). DPM-Solver++ lays out ``steps + 1`` points: with "leading" spacing it steps
    by ``T // (steps + 1)``, which is 0 (an IndexError in diffusers) at ``steps == T``, and with "linspace" (its
    default when a saved config names none) two of them round to one timestep (a zero step, NaN images); with
    "trailing" spacing, and DDIM and DDPM with any, every sampler takes up to ``T``."""
    return timesteps - 1 if sampler == "dpm++" and spacing != "trailing" else timesteps


def training_spacing(zero_terminal_snr: bool) -> str:
    """The training scheduler's timestep spacing, which its samplers inherit (``noise.training_scheduler``)."""
    return "trailing" if zero_terminal_snr else "leading"


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise KeyProblem(key, message)


def _listed(value: Any) -> Any:
    """YAML gives lists; the configs hold tuples (immutable, like the frozen models holding them)."""
    return tuple(value) if isinstance(value, list) else value


def _no_bool(value: Any) -> Any:
    """``true`` is not the integer 1 (pydantic compares literals by equality, and ``True == 1``)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Listed = BeforeValidator(_listed)
Count = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]
Steps = Annotated[int, Field(ge=1, le=1_000_000_000)]
LearningRate = Annotated[float, Field(gt=0, le=1)]


S = TypeVar("S", bound="Section")


# The params that name a file or folder (or a hub id), in whichever section holds them.
PATH_FIELDS = ("nih_root", "include_list", "model", "vae", "path", "inception_weights", "reference_inception_weights",
               "xrv_weights", "raddino", "manifest", "launch_config")


class Section(BaseModel):
    """A block of ``params.yaml``: strict types, no unknown keys, no defaults, immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator(*PATH_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _not_from_a_home_folder(cls, value: Any) -> Any:
        """A path from a home folder (``~/data``) names another folder for each user and machine that runs the
        same params (and expanded, it would put the user's home into a training run's hash): written in full,
        it names one folder for every reader, check and user."""
        if isinstance(value, str) and re.match(r"~[^/]*(/|$)", value):
            raise ValueError("starts from a home folder (~), which differs for each user and machine; write the "
                             "path in full, or relative to the repository")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _one_visible_line(cls, value: Any) -> Any:
        """Every string is visible text on one line: paths, ids and names are shown in messages, reports and
        commands to copy, where an escape sequence or a line break would forge what follows."""
        for text in value if isinstance(value, tuple) else (value,):
            if isinstance(text, str) and any(_unseen(text, at) for at in range(len(text))):
                raise ValueError("holds a control, invisible or line-break character; write it as visible text on "
                                 "one line")
        return value


def _in_word(char: str) -> bool:
    return char.isalpha() or unicodedata.category(char).startswith("M")


JOINERS = "\u200c\u200d"  # zero-width (non-)joiners: part of the spelling of Persian, Indic and other scripts


def _unseen(text: str, at: int) -> bool:
    """Whether ``text[at]`` shows nothing where it stands: a control, format or line-break character, or a
    space other than the plain one; a joiner between two letters is part of the word."""
    char = text[at]
    if char in JOINERS and 0 < at < len(text) - 1 and _in_word(text[at - 1]) and _in_word(text[at + 1]):
        return False  # a joiner after a virama (Indic half forms) follows a mark, not a letter
    return is_hidden(char) or (char.isspace() and char != " ")


class PhantomConfig(Section):
    n_images: Annotated[int, Field(ge=1, le=112_120)]  # rows sampled from the real NIH metadata (112,120), whole patients
    image_size: Annotated[int, Field(ge=16, le=4096)]  # rendered PNG side; NIH ChestX-ray14 images are 1024x1024
    rgba_fraction: Annotated[float, Field(ge=0, le=1)]  # share of PNGs stored as RGBA, as a few real NIH files are


class DatasetConfig(Section):
    source: Literal["phantom", "nih"]  # phantom: offline embedded default; nih: a real download
    nih_root: str | None  # NIH ChestX-ray14 folder (Data_Entry_2017*.csv, images_001/images/...)
    phantom: PhantomConfig

    @model_validator(mode="after")
    def _nih_needs_root(self) -> DatasetConfig:
        _require(self.source != "nih" or bool(self.nih_root), "nih_root",
                 "must point at your NIH ChestX-ray14 download when dataset.source is 'nih'")
        return self


class SplitConfig(Section):
    method: Literal["random", "official"]  # official: NIH train_val_list.txt / test_list.txt
    val_fraction: Fraction   # share of patients (random) or of train_val patients (official)
    test_fraction: Fraction  # share of patients; ignored by 'official'

    @model_validator(mode="after")
    def _train_keeps_patients(self) -> SplitConfig:
        _require(self.val_fraction + self.test_fraction < 1.0, "test_fraction",
                 "val_fraction + test_fraction must be < 1 (train needs patients)")
        _require(self.val_fraction > 0, "val_fraction",
                 "must be above 0: evaluate measures the real images' own distance on val films, and "
                 "train.lr_schedule plateau and early stopping steer by the val loss")
        _require(self.method == "official" or self.test_fraction > 0, "test_fraction",
                 "must be above 0 with method random: sample generates from the test films' conditions, and "
                 "evaluate and utility score on them")
        return self


class FilterConfig(Section):
    # Output classes; a name that is not an NIH label must be defined in `merges`.
    classes: Annotated[tuple[str, ...], Listed, Field(min_length=1, max_length=len(NIH_LABELS))]
    merges: dict[str, Annotated[tuple[str, ...], Listed, Field(min_length=1)]]  # output class -> the NIH labels it joins
    allow_other_labels: bool  # keep images that also carry findings outside `classes`
    max_per_class: Annotated[int, Field(ge=1, le=1_000_000)] | None  # cap on images per class (seeded); null: none
    views: Annotated[tuple[str, ...], Listed, Field(min_length=1)]  # View Position values kept (NIH: PA, AP)
    age_min: Annotated[int, Field(ge=0, le=150)]
    age_max: Annotated[int, Field(ge=0, le=150)]  # the 2017 CSV holds impossible ages (e.g. 414); they are rejected
    follow_up: Literal["all", "first", "last"]  # which studies of each patient to keep
    include_list: str | None  # CSV under reference/: `Image Index` + one 0/1 column per class (reference format)
    split: SplitConfig

    @model_validator(mode="after")
    def _classes_are_known(self) -> FilterConfig:
        _require(len(set(self.classes)) == len(self.classes), "classes", "has duplicates")
        for name in self.classes:
            _require(name in NIH_LABELS or name in self.merges, "classes",
                     f"names '{name}', which is neither an NIH label ({', '.join(NIH_LABELS)}) "
                     f"nor defined in filter.merges")
        for target, sources in self.merges.items():
            _require(target in self.classes, f"merges.{target}", "is not one of filter.classes")
            usable = _usable_class_name(target)
            _require(usable, f"merges.{target if usable else repr(target)}",
                     f"names a class {target!r}; a class becomes a column of the filtered table, the shards and the "
                     f"scores, so use Latin letters (accents allowed), digits, spaces and . , _ ( ) / + & ' -, not one of "
                     f"{', '.join(RESERVED_COLUMNS)} and not an NIH label (give it a new name)")
            for source in sources:
                _require(source in NIH_LABELS, f"merges.{target}",
                         f"names '{source}', which is not an NIH label ({', '.join(NIH_LABELS)})")
        _require(self.age_min <= self.age_max, "age_min", "must be in [0, age_max]")
        _require(self.include_list is None or (Path(self.include_list).parts[:1] == ("reference",)
                                               and ".." not in Path(self.include_list).parts), "include_list",
                 f"is {self.include_list!r}; put the list under reference/ and name it relative to the repository "
                 "(reference/ is the filter stage's dep in dvc.yaml, so editing the list reruns the stage)")
        return self

    def class_members(self) -> dict[str, tuple[str, ...]]:
        """Output class -> the NIH labels it stands for."""
        return {name: tuple(self.merges.get(name, (name,))) for name in self.classes}


# Columns the filtered table, the prepared shards, the scores and the reject lists already have: a merged
# class of one of these names would clash with them.
RESERVED_COLUMNS: tuple[str, ...] = (
    "Image Index", "Patient ID", "Follow-up #", "View Position", "Patient Age", "Patient Gender", "Finding Labels",
    "split", "image", "image_index", "patient_id", "view", "finding_labels", "labels", "arm", "reason", "detail",
    "issue",
)


# What a merged class's name may hold once its accents are dropped: a letter of another script that looks Latin
# ("No Fіnding" with a Cyrillic і) would make a second column and report row that reads like the first.
_CLASS_NAME_CHARS = re.compile(r"[A-Za-z0-9 .,_()/+&'-]+")


def _without_accents(text: str) -> str:
    return "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.combining(char))


def _usable_class_name(name: str) -> bool:
    """A merged class's name: Latin letters (accents allowed), digits, spaces and a little punctuation on one line
    (no $: matplotlib reads $...$ as math), and no column's name, even with other accents or case."""
    plain = _without_accents(name)
    return (bool(name.strip()) and name == name.strip() and _CLASS_NAME_CHARS.fullmatch(plain) is not None
            and plain.casefold() not in {known.casefold() for known in (*RESERVED_COLUMNS, *NIH_LABELS)})


class PrepareConfig(Section):
    square: Literal["pad", "center_crop"]  # non-square images: pad with black, or crop the centre
    shard_size: Annotated[int, Field(ge=1, le=1_000_000)]  # images per Parquet shard
    row_group_size: Annotated[int, Field(ge=1)]  # rows per Parquet row group: the unit of random access in training
    workers: Annotated[int, Field(ge=0, le=1024)]  # decode processes; 0 = all cores
    # The decode budget, read from each image's header before decoding; an image outside it is a listed reject.
    max_pixels: Annotated[int, Field(ge=1, le=500_000_000)]  # 500M pixels are 2 GB as float32
    max_aspect_ratio: Annotated[float, Field(ge=1, le=100)]  # long side / short side; chest X-rays are near 1
    min_side: Annotated[int, Field(ge=1)]  # short side in pixels; a 1x1 or 5000x1 file is no radiograph

    @model_validator(mode="after")
    def _consistent(self) -> PrepareConfig:
        _require(self.min_side**2 <= self.max_pixels, "min_side",
                 f"is {self.min_side}; its square must be <= prepare.max_pixels (else every image is a reject)")
        _require(self.row_group_size <= self.shard_size, "row_group_size", "must be in [1, prepare.shard_size]")
        return self


class DemoClipConfig(Section):
    """The small CLIP that stage `train_clip` trains when no pretrained CLIP is available (offline)."""

    image_size: Annotated[int, Field(ge=8, le=1024)]  # vision tower input side (its image processor resizes to this)
    patch_size: Annotated[int, Field(ge=1, le=1024)]
    width: Annotated[int, Field(ge=8, le=4096)]       # hidden size of both towers
    layers: Annotated[int, Field(ge=1, le=64)]
    heads: Annotated[int, Field(ge=1, le=64)]
    projection_dim: Annotated[int, Field(ge=1, le=4096)]  # joint embedding size: the clip_vision condition is (1, it)
    vocab_size: Annotated[int, Field(ge=1, le=100_000)]  # BPE vocabulary learned from the prompts (at least 514 used)
    # Text positions: the clip_text condition is (max_length, width); CLIP-L has 77. `train_clip` checks that
    # no two prompts are cut to the same tokens.
    max_length: Annotated[int, Field(ge=4, le=512)]
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    batch_size: BatchSize
    lr: LearningRate
    weight_decay: Annotated[float, Field(ge=0, le=1)]

    @model_validator(mode="after")
    def _shapes_divide(self) -> DemoClipConfig:
        _require(self.image_size % self.patch_size == 0, "patch_size", "must divide clip.demo.image_size")
        _require(self.width % self.heads == 0, "heads", "must divide clip.demo.width")
        return self


class ClipConfig(Section):
    # "demo": the small CLIP trained in the pipeline (offline default). Otherwise a Hugging Face hub id
    # (e.g. openai/clip-vit-large-patch14) or a local directory holding a saved CLIP.
    model: Annotated[str, Field(min_length=1)]
    revision: str | None  # pin a hub revision (commit hash or tag)
    prompt_template: str  # {findings}: "effusion and infiltration"
    normal_prompt: str    # the prompt for "No Finding"
    batch_size: BatchSize  # images or prompts per encoder forward
    dtype: Literal["float16", "float32"]  # storage dtype of the condition stores
    demo: DemoClipConfig

    @model_validator(mode="after")
    def _prompts(self) -> ClipConfig:
        fields = _template_fields(self.prompt_template)
        _require(bool(fields) and all(field == "findings" for field in fields), "prompt_template",
                 "must name the field {findings} and no other (write a literal brace as {{ or }})")
        _require(self.normal_prompt.strip() != "", "normal_prompt", "must not be empty")
        _require(self.model.strip() != "", "model", "must be 'demo', a hub id or a local directory")
        return self


def _template_fields(template: str) -> list[str] | None:
    """The fields ``template.format`` fills, in order, each with its conversion and spec kept (``{findings!r}``
    is not ``findings``); None when str.format could not parse it (a lone brace)."""
    try:
        return [name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None


# A file or folder a param names (or a hub id): "" would name the working directory itself, the repository.
AssetPath = Annotated[str, Field(min_length=1)]


class ElixrConfig(Section):
    # The published snapshot's root (Yasintuncer/nih-cxr14-elixr: datasets.json + HDF5 shards), or a folder
    # of older files (HDF5 `embeddings` + `image_ids`, Parquet `Image Index` + embedding). null: the stand-in.
    path: AssetPath | None
    dataset: str  # snapshot dataset (datasets.json name = folder): elixrb/img_emb, elixrc, ...
    feature: str  # image feature of that dataset: img_emb (32 x 768), Embedding (elixrc: 64 x 1376), ...
    # Expected (tokens, dim), e.g. [32, 768] for ELIXR-B; null: from the files.
    shape: Annotated[tuple[Annotated[int, Field(ge=1, le=100_000)], ...], Listed,
                     Field(min_length=2, max_length=2)] | None
    on_missing: Literal["drop", "error"]  # filtered images without a usable embedding
    standin_tokens: Annotated[int, Field(ge=1, le=4096)]  # the stand-in pools the demo CLIP's vision tokens to this many
    dtype: Literal["float16", "float32"]  # storage dtype of the condition store

    @model_validator(mode="after")
    def _names(self) -> ElixrConfig:
        parts = self.dataset.split("/")
        _require(all(p.strip() == p and p not in ("", ".", "..") for p in parts), "dataset",
                 f"is {self.dataset!r}; expected a dataset of the snapshot's datasets.json, e.g. elixrb/img_emb or elixrc")
        _require(bool(self.feature.strip()) and self.feature != "Image Index", "feature",
                 f"is {self.feature!r}; expected an embedding feature of elixr.dataset, e.g. img_emb or Embedding")
        return self


class UNetConfig(Section):
    """A diffusers UNet2DConditionModel. The nih-512 profile sets SD-1.5's shape (320/640/1280/1280)."""

    block_out_channels: Annotated[tuple[Annotated[int, Field(ge=1, le=4096)], ...], Listed,
                                  Field(min_length=1, max_length=8)]
    layers_per_block: Annotated[int, Field(ge=1, le=16)]
    # Per resolution level (down blocks, mirrored on the way up): true = self- and cross-attention blocks.
    # Keep it off large feature maps on CPU: full attention at 64x64 costs 10x that at 16x16.
    cross_attention: Annotated[tuple[bool, ...], Listed, Field(min_length=1, max_length=8)]
    # The bounds are those a saved model is held to when it is loaded (diffusion/model_limits.py), so every model
    # these params train loads again.
    attention_head_dim: Annotated[int, Field(ge=1, le=512)]  # diffusers' (legacy) name: heads per attention layer
    norm_num_groups: Annotated[int, Field(ge=1, le=128)]  # GroupNorm groups; must divide every block's channels
    cross_attention_dim: Annotated[int, Field(ge=1, le=8192)] | None  # null: the branch's condition dim
    # true: the pooled condition is also added to the timestep embedding, so every ResNet block sees it
    timestep_condition: bool

    @model_validator(mode="after")
    def _levels(self) -> UNetConfig:
        _require(len(self.block_out_channels) == len(self.cross_attention), "cross_attention",
                 "needs one entry per block_out_channels level")
        _require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "norm_num_groups",
                 "must divide every entry of block_out_channels")
        attending = [c for c, attend in zip(self.block_out_channels, self.cross_attention) if attend]
        attending.append(self.block_out_channels[-1])  # the mid block always attends
        _require(self.attention_head_dim <= min(attending), "attention_head_dim",
                 f"(heads per attention layer) must be at most the channels of every level that attends "
                 f"({min(attending)}), or each head would have no dimensions")
        _require(any(self.cross_attention) or self.timestep_condition, "cross_attention",
                 "must enable cross-attention on at least one level, or set timestep_condition: true "
                 "(the condition enters there)")
        return self


class BranchRates(Section):
    # Per-branch learning rates; the top-level `lr`, when set, overrides all three.
    clip_text: LearningRate
    clip_vision: LearningRate
    elixr: LearningRate


class TrainConfig(Section):
    space: Literal["pixel", "latent"]  # latent: on precomputed VAE latents (stage encode_latents)
    vae: Annotated[str, Field(min_length=1)]  # AutoencoderKL hub id or local directory (latent space only)
    unet: UNetConfig
    condition_tokens: Annotated[int, Field(ge=1, le=1024)]  # a (1, dim) condition (clip_vision) becomes this many tokens
    prediction_type: Literal["epsilon", "v_prediction"]
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    zero_terminal_snr: bool  # rescale betas so the last step is pure noise (needs v_prediction)
    num_train_timesteps: Annotated[int, Field(ge=1, le=10_000)]  # DDPM's 1000; the schedule is built in memory
    min_snr_gamma: Annotated[float, Field(gt=0, le=1000)] | None  # min-SNR-gamma loss weighting; null = plain MSE
    offset_noise: Annotated[float, Field(ge=0, le=1)]  # per-channel constant added to the noise (brightness freedom)
    cfg_dropout: Fraction  # probability of training on the learned null condition (classifier-free guidance)
    lr: BranchRates
    lr_schedule: Literal["constant", "cosine", "plateau"]
    warmup_steps: Annotated[int, Field(ge=0, le=1_000_000_000)]  # 0 = no warm-up
    plateau_patience: Annotated[int, Field(ge=1, le=10_000)]  # validations without improvement before a cut
    plateau_factor: Annotated[float, Field(gt=0, lt=1)]
    early_stopping_patience: Annotated[int, Field(ge=1, le=10_000)] | None  # validations without improvement; null: never
    weight_decay: Annotated[float, Field(ge=0, le=1)]
    grad_clip: Annotated[float, Field(gt=0, le=1e6)]  # the largest gradient norm kept
    max_nonfinite: Annotated[int, Field(ge=1, le=1_000_000)]  # consecutive non-finite losses before the stage stops
    batch_size: BatchSize  # per process and micro-batch
    gradient_accumulation: Annotated[int, Field(ge=1, le=4096)]
    epochs: Annotated[int, Field(ge=1, le=1_000_000)]
    max_steps: Steps | None  # optimizer steps; the run ends at epochs or max_steps, whichever first
    ema_half_life_images: Annotated[float, Field(gt=0, le=1e9)]  # EMA half-life counted in images seen (EDM style)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"]  # auto: bf16 where a probe shows it pays, else fp32
    val_every_steps: Steps
    val_images: Annotated[int, Field(ge=1, le=1_000_000)]  # validation images (fixed noise and timesteps)
    sample_every_steps: Steps  # sample grid logged to DVCLive
    sample_grid_images: Annotated[int, Field(ge=0, le=256)]  # validation conditions in that grid (0 = no grid)
    sample_grid_steps: Annotated[int, Field(ge=1)]  # DPM-Solver++ steps of the grid (at most num_train_timesteps)
    checkpoint_every_steps: Steps | None  # training-state checkpoints (resume); null = none, a killed run restarts
    checkpoints_total_limit: Annotated[int, Field(ge=1, le=1000)]
    gradient_checkpointing: bool  # recompute UNet activations in backward: less memory, ~1.3x the step time
    compile: Literal["auto", "always", "never"]  # torch.compile the UNet; auto: on CUDA (1.35x on an H200)
    num_workers: Annotated[int, Field(ge=0, le=256)]  # DataLoader workers
    # `accelerate launch --config_file` of the train stage: processes, GPUs, machines (see accelerate/).
    launch_config: str

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        # dvc.yaml puts this value into the train stage's shell command, so only a plain file name under
        # accelerate/ passes: no spaces, quotes, `;`, `$` or `..` can reach the shell.
        _require(bool(_LAUNCH_CONFIG.fullmatch(self.launch_config)), "launch_config",
                 f"is {self.launch_config!r}; must name an accelerate config file in accelerate/ "
                 f"(letters, digits, '_', '-', '.'; .yaml/.yml/.json), e.g. accelerate/one-process.yaml")
        _require(not self.zero_terminal_snr or self.prediction_type == "v_prediction", "zero_terminal_snr",
                 "needs prediction_type v_prediction (epsilon is undefined at the last, pure-noise step)")
        most = most_sampling_steps(self.num_train_timesteps, training_spacing(self.zero_terminal_snr), "dpm++")
        _require(self.sample_grid_steps <= most, "sample_grid_steps",
                 f"must be in [1, {most}]: DPM-Solver++ takes at most "
                 + ("train.num_train_timesteps steps" if most == self.num_train_timesteps else
                    "train.num_train_timesteps - 1 steps without zero_terminal_snr"))
        return self


class EncodeLatentsConfig(Section):
    # Images per VAE encoder forward. Memory grows with it: SD-VAE at 512 px holds ~0.7 GB of fp32
    # activations per image of the batch on a CPU; a larger batch is no faster there.
    batch_size: Annotated[int, Field(ge=1, le=4096)]


class SampleConfig(Section):
    count: Annotated[int, Field(ge=1, le=10_000_000)]  # test images whose conditions are sampled (the first N)
    sampler: Literal["dpm++", "ddim", "ddpm"]
    steps: Annotated[int, Field(ge=1)]  # DPM-Solver++ needs ~20-25; DDPM was trained with 1000 (<= num_train_timesteps)
    guidance_scale: Annotated[float, Field(ge=1, le=30)]  # classifier-free guidance; 1 = off; far above, images saturate
    batch_size: BatchSize
    per_finding: Annotated[int, Field(ge=0, le=256)]  # clip_text: images per finding in the grid (0 = no grid)


class EvaluatorConfig(Section):
    """The CXR classifier trained on real images: its features give the domain Frechet distance and
    the PCA space, its outputs measure conditioning faithfulness."""

    width: Annotated[int, Field(ge=1, le=1024)]  # channels of the first conv block (doubles per block)
    feature_dim: Annotated[int, Field(ge=2, le=16384)]  # the PCA figure draws two components
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    batch_size: BatchSize
    lr: LearningRate
    # Side the classifier sees: larger images are area-averaged down to it, never up. Bounds its memory
    # and compute (at 512 px, training holds ~0.27 GB of activations per image of the batch; at 256, a quarter).
    max_image_size: Annotated[int, Field(ge=8, le=4096)]  # >= 8: three 2x poolings


class UtilityClassifierConfig(EvaluatorConfig):
    """The classifier every arm of the utility study trains, the same way for each arm."""

    architecture: Literal["cnn", "resnet50"]  # cnn: the evaluator's network; resnet50: ours, randomly initialised

    @model_validator(mode="after")
    def _resnet_features(self) -> UtilityClassifierConfig:
        _require(self.architecture == "cnn" or self.feature_dim == 32 * self.width, "feature_dim",
                 f"must be 32 x width ({32 * self.width}) for resnet50: its last stage has 8 x width x 4 channels "
                 "(2048 at the standard width 64)")
        return self


class UtilityConfig(Section):
    """Train on synthetic, test on real: classifiers trained on real, synthetic and both, scored on the real test split."""

    train_images: Annotated[int, Field(ge=2, le=10_000_000)]  # N: seeded subset of the real train split (all when smaller)
    scaling: Annotated[tuple[Annotated[int, Field(ge=2, le=64)], ...], Listed, Field(max_length=8)]  # synthetic-only at k x N
    steps: Annotated[int, Field(ge=1)]  # sampler steps (sample.sampler) of the synthetic sets
    guidance_scale: Annotated[float, Field(ge=1, le=30)]  # classifier-free guidance of the synthetic sets; 1 = off
    bootstrap: Annotated[int, Field(ge=10, le=100_000)]  # resamples of the test images for the 95% intervals
    age_bands: Annotated[tuple[Annotated[int, Field(ge=1, le=120)], ...], Listed, Field(min_length=1, max_length=8)]
    seeds: Annotated[int, Field(ge=1, le=10)]  # each arm trained with seed, seed + 1, ...: the seed-to-seed spread
    classifier: UtilityClassifierConfig

    @model_validator(mode="after")
    def _distinct_scaling(self) -> UtilityConfig:
        _require(len(set(self.scaling)) == len(self.scaling), "scaling", "has duplicates")
        _require(list(self.age_bands) == sorted(set(self.age_bands)), "age_bands",
                 f"is {list(self.age_bands)}; give the ages where bands start, increasing (e.g. [40, 60])")
        return self


class ReaderStudyConfig(Section):
    """The expert reader study (stages reader_study, score_reader_study): a blinded kit of real test images and
    each branch's generations, and the scores of the readers' answers."""

    study_id: str  # names the readers' files (<study_id>__<reader>.json): a new id for every new kit
    count: Annotated[int, Field(ge=2, le=100_000)]  # items, calibration included
    real_fraction: Annotated[float, Field(gt=0, lt=1)] | None  # share of real items; null: equal shares of real and each branch
    calibration: Annotated[int, Field(ge=0, le=1000)]  # of the items, shown first with their truth and not scored
    display_size: Annotated[int, Field(ge=16, le=4096)]  # side in pixels of every image in the kit

    @model_validator(mode="after")
    def _study(self) -> ReaderStudyConfig:
        _require(bool(STUDY_ID.fullmatch(self.study_id)), "study_id",
                 f"is {self.study_id!r}; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                 "(it names the readers' files)")
        _require(self.calibration < self.count, "calibration",
                 f"must be below count ({self.count}) so that some items are scored")
        return self


class EvaluateConfig(Section):
    bootstrap: Annotated[int, Field(ge=10, le=100_000)]  # resamples for the 95% intervals
    kid_subset: Annotated[int, Field(ge=2, le=1_000_000)]
    prdc_k: Annotated[int, Field(ge=1, le=1000)]
    memorization_percentile: Annotated[float, Field(gt=0, lt=100)]  # threshold: this percentile of test-to-train distances
    train_reference: Annotated[int, Field(ge=1, le=10_000_000)]  # train images compared against for memorization
    diversity_pairs: Annotated[int, Field(ge=1, le=10_000_000)]
    untrained_images: Annotated[int, Field(ge=0, le=1_000_000)]  # untrained model's samples (FD baseline); 0 = skip
    # Images held at once by the stage's own batched work: the in-pipeline evaluator's features of every split
    # and of the untrained baseline, MS-SSIM pairs (two images each). The pretrained models use inception_batch_size.
    batch_size: BatchSize
    # Inception FID, only where weights are present (safetensors; see `cxr-diffusion convert-weights`):
    inception_weights: AssetPath | None      # FID-Inception (pt_inception-2015-12-05) -> standard FID
    reference_inception_weights: AssetPath | None  # torchvision inception_v3 ImageNet -> reference-compatible FID
    reference_transform_input: bool          # torchvision's default for its pretrained Inception
    reference_fid_train_images: Annotated[int, Field(ge=2, le=10_000_000)] | None  # training images it uses (null: all)
    inception_batch_size: BatchSize          # batch size of the pretrained evaluators (Inception, DenseNet)
    xrv_weights: AssetPath | None            # torchxrayvision DenseNet-121 state dict as safetensors
    raddino: AssetPath | None                # microsoft/rad-dino: a folder or the hub id -> CheXGenBench's distances

    @model_validator(mode="after")
    def _baseline(self) -> EvaluateConfig:
        _require(self.untrained_images != 1, "untrained_images",
                 "must be 0 (skips the untrained baseline) or >= 2 (a Frechet distance needs two images)")
        return self


class FetchConfig(Section):
    """Where `cxr-diffusion fetch` gets the assets that clip.model, train.vae, elixr.path and evaluate.raddino name (when they
    are local folders it fills; a param equal to the hub id itself means the Hugging Face cache)."""

    manifest: str  # hashes recorded at fetch time; `cxr-diffusion doctor` checks against them
    clip_repo: str  # hub model fetched into clip.model
    clip_revision: str | None  # commit hash or tag to pin; null = the latest
    vae_repo: str  # hub model fetched into train.vae (latent space only)
    vae_revision: str | None
    elixr_repo: str  # hub dataset fetched into elixr.path (elixr.dataset's files only)
    elixr_revision: str | None
    raddino_repo: str  # hub model fetched into evaluate.raddino (config, image processor, model.safetensors)
    raddino_revision: str | None

    @model_validator(mode="after")
    def _hub_names(self) -> FetchConfig:
        _require(self.manifest.endswith(".json"), "manifest", "must be a .json file, e.g. external/assets.json")
        for name in ("clip", "vae", "elixr", "raddino"):
            parts = getattr(self, f"{name}_repo").split("/")
            _require(len(parts) == 2 and all(p.strip() == p and p not in ("", ".", "..") for p in parts),
                     f"{name}_repo", "must be a hub id owner/name, e.g. openai/clip-vit-large-patch14")
            revision = getattr(self, f"{name}_revision")
            _require(revision is None or revision.strip() != "", f"{name}_revision",
                     "must be a commit hash or tag, or null for the latest")
        return self


class Params(Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)]  # one seed for sampling, splits, caps and training (numpy's range)
    image_size: Annotated[int, Field(ge=8, le=2048)]  # side of the prepared (training) images
    channels: Annotated[Literal[1, 3], BeforeValidator(_no_bool)]  # 3 = grayscale replicated to RGB, as the reference did
    lr: LearningRate | None  # when set, overrides every branch's learning rate (dvc exp run -S lr=...)
    device: str  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N; every stage and command
    branches: Annotated[tuple[Branch, ...], Listed, Field(min_length=1)]
    dataset: DatasetConfig
    filter: FilterConfig
    prepare: PrepareConfig
    clip: ClipConfig
    elixr: ElixrConfig
    encode_latents: EncodeLatentsConfig
    train: TrainConfig
    sample: SampleConfig
    evaluator: EvaluatorConfig
    evaluate: EvaluateConfig
    utility: UtilityConfig
    reader_study: ReaderStudyConfig
    fetch: FetchConfig

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        _require(len(set(self.branches)) == len(self.branches), "branches", "has duplicates")
        _require(self.train.space == "latent" or self.image_size <= 1024, "image_size",
                 "must be at most 1024 in pixel space (train.space: pixel), the largest sample_size a saved model "
                 "loads with; use train.space: latent for larger images")
        _require(bool(_DEVICE.fullmatch(self.device)), "device", f"is {self.device!r}; expected auto, cpu, cuda or cuda:N (N the GPU's index)")
        timesteps = self.train.num_train_timesteps
        most = most_sampling_steps(timesteps, training_spacing(self.train.zero_terminal_snr), self.sample.sampler)
        why = (f"train.num_train_timesteps ({timesteps}): the sampler cannot take more steps than the model was "
               "trained with" if most == timesteps else
               f"train.num_train_timesteps - 1 ({most}): DPM-Solver++ over a schedule without zero_terminal_snr "
               "cannot take one step per training timestep")
        for key, steps in (("sample.steps", self.sample.steps), ("utility.steps", self.utility.steps)):
            _require(steps <= most, key, f"must be <= {why}")
        side = min(self.image_size, self.utility.classifier.max_image_size)
        largest_arm = max(self.utility.scaling, default=2) * self.utility.train_images  # real_plus_synthetic: 2 x N
        _require(largest_arm * side**2 <= MAX_ARM_BYTES, "utility.scaling",
                 f"holds {largest_arm:,} images of {side}x{side} in memory for its largest arm "
                 f"({largest_arm * side**2 / 2**30:.1f} GiB, above {MAX_ARM_BYTES // 2**30} GiB); lower utility.scaling, "
                 "utility.train_images or utility.classifier.max_image_size")
        _require(self.train.space == "pixel" or self.channels == 3, "channels",
                 "must be 3 in latent space (the VAE encodes RGB)")
        ages = (self.filter.age_min, self.filter.age_max)
        _require(all(ages[0] < start <= ages[1] for start in self.utility.age_bands), "utility.age_bands",
                 f"is {list(self.utility.age_bands)}; each band must start above filter.age_min and at most at "
                 f"filter.age_max ({ages[0]}..{ages[1]}), or a band holds no film and drops out of the subgroup "
                 "results")
        return self

    def learning_rate(self, branch: str) -> float:
        """The top-level `lr` when set (dvc exp run -S lr=...), else the branch's own rate."""
        return self.lr if self.lr is not None else getattr(self.train.lr, branch)


# ----------------------------------------------------------------------------- reading

def params_from_dict(data: Any) -> Params:
    """Validate a parsed params mapping: every key present, typed and in range."""
    if not isinstance(data, dict):
        raise ParamsError("params: the file must hold a mapping of keys to values")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        problems = error.errors()
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ParamsError(describe(problems[0], Params) + more) from None


def section_of(model: type[Section], key: str) -> type[Section] | None:
    """The section class of ``model``'s key ``key`` (None for a plain value or an unknown key)."""
    info = model.model_fields.get(key)
    annotation = info.annotation if info is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def changed(config: S, **changes: Any) -> S:
    """A copy of a section with some keys changed, validated like the file (pydantic's model_copy is not)."""
    try:
        return type(config).model_validate({**dict(config), **changes})
    except ValidationError as error:
        raise ParamsError(describe(error.errors()[0], type(config))) from None


def to_dict(config: Any) -> Any:
    """A plain, YAML/JSON-friendly copy of a config (tuples become lists)."""
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
