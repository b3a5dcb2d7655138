"""Small NIH-format datasets made in the test, so the real loaders run on real files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_diffusion.data.nih import NIH_HEADER

REPO = Path(__file__).resolve().parents[1]


def write_profile(name: str, folder: Path) -> Path:
    """``folder/params.yaml``: a shipped profile merged over the default, as `cxr-diffusion profile` writes it."""
    from cxr_diffusion.profiles import validated_profile_text

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(validated_profile_text(name))
    return path


@pytest.fixture(scope="session")
def tiny_params_file(tmp_path_factory) -> Path:
    """The tiny profile as a complete params file (read-only for tests: copy it to change it)."""
    return write_profile("tiny", tmp_path_factory.mktemp("tiny-profile"))


def nih_row(image_index: str, labels: str = "No Finding", patient: int = 1, follow_up: int = 0,
            age: int = 50, view: str = "PA", gender: str = "M") -> dict:
    return {"Image Index": image_index, "Finding Labels": labels, "Follow-up #": follow_up, "Patient ID": patient,
            "Patient Age": age, "Patient Gender": gender, "View Position": view, "OriginalImage[Width": 2500,
            "Height]": 2048, "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143}


def gradient_image(size: tuple[int, int] = (40, 40), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    height, width = size
    base = np.add.outer(np.linspace(0, 150, height), np.linspace(0, 100, width))
    return np.clip(base + rng.normal(0, 5, size), 0, 255).astype(np.uint8)


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def make_nih_download(root: Path, rows: list[dict], images: dict[str, bytes] | None = None) -> Path:
    """An NIH ChestX-ray14 layout: Data_Entry_2017_v2020.csv + images_001/images/<name>."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(NIH_HEADER)).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = {row["Image Index"]: png_bytes(Image.fromarray(gradient_image(seed=i))) for i, row in enumerate(rows)}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return root


@pytest.fixture
def repo() -> Path:
    return REPO


def make_training_data(root: Path, n_images: int = 48, image_size: int = 16, tokens: int = 4, dim: int = 8) -> dict:
    """Prepared shards (real stages) plus an ELIXR-like condition store whose conditions encode the labels."""
    from cxr_diffusion.conditioning.store import ConditionStoreWriter
    from cxr_diffusion.profiles import params_with
    from cxr_diffusion.data.filter import run_filter
    from cxr_diffusion.data.prepare import prepare_shards
    from cxr_diffusion.data.sources import build_dataset

    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, n_images + 1)]
    images = {}
    for i, row in enumerate(rows):
        pixels = gradient_image((32, 32), seed=i)
        if row["Finding Labels"] == "Effusion":
            pixels[20:, :] = 230  # a bright base: something the condition can explain
        images[row["Image Index"]] = png_bytes(Image.fromarray(pixels))
    download = make_nih_download(root / "nih", rows, images)
    params = params_with({
        "image_size": image_size, "dataset": {"source": "nih", "nih_root": str(download)},
        "filter": {"classes": ["Effusion", "No Finding"], "merges": {}, "split": {"val_fraction": 0.2, "test_fraction": 0.1}},
        "prepare": {"shard_size": 64, "row_group_size": 16, "min_side": 16},  # tiny images on purpose
    })
    build_dataset(params, root / "dataset")
    run_filter(root / "dataset", params.filter, params.seed, root / "filtered", root / "filter.json")
    prepare_shards(params, root / "dataset", root / "filtered" / "filtered.csv", root / "prepared", workers=1)
    rng = np.random.default_rng(0)
    with ConditionStoreWriter(root / "store", len(rows), tokens, dim) as store:
        base = rng.normal(size=(2, tokens, dim))
        for i, row in enumerate(rows):
            store.write(i, (base[i % 2] + 0.1 * rng.normal(size=(tokens, dim)))[None])
        store.finish([r["Image Index"] for r in rows], np.arange(len(rows)), {"branch": "elixr", "encoder": "test"})
    return {"prepared": root / "prepared", "store": root / "store"}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A demo CLIP saved exactly as stage train_clip saves it."""
    from cxr_diffusion.conditioning.demo_clip import build_demo_clip, build_image_processor
    from cxr_diffusion.conditioning.prompt_tokenizer import train_prompt_tokenizer
    from cxr_diffusion.conditioning.prompts import prompt_for
    from cxr_diffusion.config import ClipConfig, DemoClipConfig
    from cxr_diffusion.profiles import profile_section

    directory = tmp_path_factory.mktemp("clip")
    prompts = [prompt_for(x, profile_section(ClipConfig)) for x in ("No Finding", "Effusion", "Effusion|Infiltration", "Mass")]
    config = profile_section(DemoClipConfig, image_size=16, patch_size=4, width=16, layers=1, heads=2, projection_dim=8, max_length=16)
    tokenizer = train_prompt_tokenizer(prompts, config.vocab_size, config.max_length)
    build_demo_clip(config, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    build_image_processor(config.image_size).save_pretrained(directory)
    return directory


def cli_refusal(result) -> str:
    """The one `error:` line of a CLI command that refused its input with exit code 2 (no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def stage_line(call) -> str:
    """What a stage prints for ``call()``'s error, as ``run_stage`` decides it: the user-error line; a bug
    (anything else, or an OSError that ``user_error_line`` does not describe) or no error at all fails the test."""
    from cxr_diffusion.errors import UserError, user_error_line

    try:
        call()
    except (UserError, OSError) as error:
        line = user_error_line(error)
        if line is None:
            pytest.fail(f"traceback: {type(error).__name__}: {error}")
        return line
    except Exception as error:  # a bug: the stage would print a traceback
        pytest.fail(f"traceback: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
    pytest.fail("accepted silently: no error at all")


def one_line_message(call, kind: type[Exception]) -> str:
    """The message of the ``kind`` error that ``call()`` raises, which must be one line."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: an fp16 one would refuse every later Accelerator()."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
