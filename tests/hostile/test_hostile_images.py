"""Hostile images: each bad file ends as a listed reject with a stable reason, or as one line (exit 2).

The files are made here, byte by byte where PIL would not write them: a 138-byte PNG that says
60000x1, headers that promise 11000x11000 or 40000x40000 pixels, a FIFO named like an image, a
symlink out of the download.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.config import PrepareConfig
from cxr_diffusion.profiles import params_with, profile_section
from cxr_diffusion.data import decode, prepare
from cxr_diffusion.data.decode import DecodeBudget, DecodeError, decode_grayscale, preprocess, read_image_file
from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.prepare import image_roots, prepare_shards, resolve_image_path
from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.sampling import sample

from conftest import gradient_image, make_nih_download, nih_row, png_bytes

BUDGET = DecodeBudget.from_config(profile_section(PrepareConfig))  # what prepare and generate --reference use by default


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(width: int, height: int, rows: bytes = b"") -> bytes:
    """An 8-bit grayscale PNG with this header; ``rows`` (filter byte + samples per row) as its data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9))
            + _chunk(b"IEND", b""))


def gray_png(height: int, width: int) -> bytes:
    return png_bytes(Image.fromarray(np.linspace(0, 255, height * width).reshape(height, width).astype(np.uint8)))


def refused(data: bytes, budget: DecodeBudget = BUDGET) -> str:
    with pytest.raises(DecodeError) as error:
        preprocess(data, 32, "pad", budget)
    return str(error.value)


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (pytest-timeout is not installed)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the decode budget, from the header ---------------------------------------------------------

def test_a_138_byte_png_of_60000x1_is_refused_from_its_header_before_its_13_gib_square():
    bomb = raw_png(60000, 1, b"\x00" * 60001)
    assert len(bomb) == 138
    assert refused(bomb) == "aspect_ratio: 60000x1 exceeds prepare.max_aspect_ratio 2.0"


def test_an_11000x11000_image_is_refused_from_its_header_not_decoded():
    # No valid pixel data follows the header: a decode would say decode_error, not this.
    assert refused(raw_png(11000, 11000)) == "too_many_pixels: 11000x11000 > prepare.max_pixels 50000000"


def test_an_image_past_pils_own_bomb_limit_gets_the_budgets_reason_not_pils():
    assert refused(raw_png(40000, 40000)) == "too_many_pixels: over 1000000000 pixels > prepare.max_pixels 50000000"


def test_an_image_within_the_budget_whose_padded_square_is_not_is_refused_before_padding():
    small_budget = DecodeBudget(max_pixels=1000, max_aspect_ratio=2.0, min_side=1)
    assert refused(gray_png(20, 40), small_budget) == "too_many_pixels: 40x20 pads to 40x40 > prepare.max_pixels 1000"
    assert preprocess(gray_png(20, 40), 8, "center_crop", small_budget).shape == (8, 8)  # cropping stays within


def test_a_1x1_image_is_too_small():
    assert refused(raw_png(1, 1, b"\x00\x00")) == "too_small: 1x1 is below prepare.min_side 64"


def test_a_5000x1_image_is_refused_for_its_aspect_ratio():
    assert refused(raw_png(5000, 1, b"\x00" * 5001)) == "aspect_ratio: 5000x1 exceeds prepare.max_aspect_ratio 2.0"


# --- stable reasons, real bit depth, files that are not images ---------------------------------

def test_bytes_that_are_no_image_give_the_same_reason_every_time_with_no_memory_address():
    reasons = []
    for _ in range(2):
        with pytest.raises(DecodeError) as error:
            decode_grayscale(b"this is not an image at all", BUDGET)
        reasons.append(str(error.value))
    # PIL's own message named the BytesIO by its address (`<_io.BytesIO object at 0x7f...>`)
    assert reasons == ["decode_error: not a PNG or JPEG image (the formats prepare reads)"] * 2


def test_a_12bit_image_in_a_16bit_png_without_sbit_uses_the_full_range():
    pixels = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = decode_grayscale(png_bytes(Image.fromarray(pixels)), BUDGET)
    assert decoded.max() == pytest.approx(1.0)  # was 4095 / 65535: near-black, max 16/255
    np.testing.assert_allclose(decoded, pixels / 4095.0, atol=1e-6)


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "00000001_000.png")
    with deadline(5), pytest.raises(DecodeError) as error:
        read_image_file(tmp_path / "00000001_000.png", BUDGET)
    assert str(error.value) == "not_a_file: not a regular file"


def test_a_file_larger_than_any_image_within_the_budget_is_refused_unread(tmp_path):
    small_budget = DecodeBudget(max_pixels=1000, max_aspect_ratio=2.0, min_side=1)
    (tmp_path / "big.png").write_bytes(bytes(small_budget.max_file_bytes + 1))
    with pytest.raises(DecodeError) as error:
        read_image_file(tmp_path / "big.png", small_budget)
    assert str(error.value) == ("file_too_large: 1056577 bytes > 1056576 "
                                "(8 bytes per pixel of prepare.max_pixels 1000, plus 1 MiB)")


# --- other formats under a .png name: PIL opens PNG and JPEG only -------------------------------

NOT_PNG_OR_JPEG = "decode_error: not a PNG or JPEG image (the formats prepare reads)"


def malformed_dds(fourcc: bytes = b"ZZZZ") -> bytes:
    """A 64x64 DDS whose pixel format is a FourCC no decoder knows (PIL: NotImplementedError)."""
    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, fourcc, 0, 0, 0, 0, 0)  # DDPF_FOURCC
    header = (struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44) + pixel_format
              + struct.pack("<5I", 0x1000, 0, 0, 0, 0))
    return b"DDS " + header + bytes(4096)


def malformed_tiff() -> bytes:
    """A 64x64 8-bit TIFF whose StripOffsets tag is a RATIONAL, not an integer (PIL: TypeError)."""
    tags = [(256, 3, 64), (257, 3, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 5, 200), (277, 3, 1),
            (278, 3, 64), (279, 4, 4096)]
    directory = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                        for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + bytes(5000)


def other_format(format_name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient_image((64, 64))).save(buffer, format=format_name)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [malformed_dds(), malformed_dds(b"DX10"), malformed_tiff()],
                         ids=["dds_unknown_fourcc", "dds_dx10_unknown_dxgi", "tiff_rational_strip_offsets"])
def test_a_malformed_dds_or_tiff_named_png_is_a_stable_reject_not_a_crash(tmp_path, data):
    (tmp_path / "00000001_000.png").write_bytes(data)
    assert refused(read_image_file(tmp_path / "00000001_000.png", BUDGET)) == NOT_PNG_OR_JPEG


@pytest.mark.parametrize("format_name", ["TIFF", "BMP", "GIF", "WEBP"])
def test_a_well_formed_image_in_another_format_is_refused_before_any_plugin_parses_it(format_name):
    assert refused(other_format(format_name)) == NOT_PNG_OR_JPEG


def test_a_jpeg_is_still_decoded():
    assert preprocess(other_format("JPEG"), 32, "pad", BUDGET).shape == (32, 32)


@pytest.mark.parametrize("exception", [NotImplementedError("no decoder for this"), TypeError("bad tag"),
                                       IndexError("tuple index out of range"), KeyError("mode")],
                         ids=["NotImplementedError", "TypeError", "IndexError", "KeyError"])
def test_any_exception_of_a_png_decoder_is_the_files_reject(monkeypatch, exception):
    def load(self):
        raise exception
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    assert refused(gray_png(64, 64)) == f"decode_error: {type(exception).__name__}: {exception}"


def test_a_bug_in_our_conversion_after_decoding_keeps_its_traceback(monkeypatch):
    def broken(image, data):
        raise TypeError("a bug of ours")
    monkeypatch.setattr(decode, "_to_unit_gray", broken)
    with pytest.raises(TypeError, match="a bug of ours"):
        preprocess(gray_png(64, 64), 32, "pad", BUDGET)


# --- paths stay inside the allowed roots, symlinks followed ------------------------------------

def _nih_with_escaping_symlink(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "nih", tmp_path / "elsewhere"
    (root / "images_001" / "images").mkdir(parents=True)
    outside.mkdir()
    (outside / "00000001_000.png").write_bytes(gray_png(64, 64))
    link = root / "images_001" / "images" / "00000001_000.png"
    link.symlink_to(outside / "00000001_000.png")
    return root, link


def test_a_symlink_in_the_download_pointing_outside_it_is_path_outside_dataset(tmp_path):
    root, link = _nih_with_escaping_symlink(tmp_path)
    roots = (tmp_path / "dataset", root.resolve())
    assert resolve_image_path(tmp_path / "dataset", link.name, str(link), roots) == (None, "path_outside_dataset")


def test_an_absolute_path_outside_every_allowed_root_is_path_outside_dataset(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.png").write_bytes(gray_png(64, 64))
    roots = ((tmp_path / "dataset").resolve(),)
    assert resolve_image_path(tmp_path / "dataset", "a.png", str(tmp_path / "elsewhere" / "a.png"), roots) == \
        (None, "path_outside_dataset")


def test_a_symlink_that_stays_inside_the_download_is_opened_at_its_target(tmp_path):
    root = tmp_path / "nih"
    (root / "images_001" / "images").mkdir(parents=True)
    (root / "originals").mkdir()
    (root / "originals" / "b.png").write_bytes(gray_png(64, 64))
    (root / "images_001" / "images" / "a.png").symlink_to(root / "originals" / "b.png")
    listed = str(root / "images_001" / "images" / "a.png")
    assert resolve_image_path(tmp_path / "dataset", "a.png", listed, (root.resolve(),)) == \
        (str((root / "originals" / "b.png").resolve()), None)


def test_the_allowed_roots_are_the_dataset_folder_and_for_nih_the_download(tmp_path):
    nih = params_with({"dataset": {"source": "nih", "nih_root": str(tmp_path / "nih")}})
    phantom = params_with({"dataset": {"source": "phantom"}})
    assert image_roots(nih, tmp_path / "dataset") == ((tmp_path / "dataset").resolve(), (tmp_path / "nih").resolve())
    assert image_roots(phantom, tmp_path / "dataset") == ((tmp_path / "dataset").resolve(),)


# --- the prepare stage -------------------------------------------------------------------------

def _staged(tmp_path: Path, images: dict[str, bytes]):
    rows = [nih_row(name, "No Finding", patient=p) for p, name in enumerate(images, start=1)]
    root = make_nih_download(tmp_path / "nih", rows, images)
    params = params_with({
        "image_size": 16, "dataset": {"source": "nih", "nih_root": str(root)},
        "filter": {"classes": ["No Finding"], "merges": {}},
        "prepare": {"shard_size": 8, "row_group_size": 4},
    })
    # Every film in train, which params refuse (evaluate needs val and test films): these tests are about how prepare
    # reads hostile files, and a split the rejects empty would be refused before the rejects are written.
    split = params.filter.split.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0})
    params = params.model_copy(update={"filter": params.filter.model_copy(update={"split": split})})
    build_dataset(params, tmp_path / "dataset")
    run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "filter.json")
    return root, params


def test_rejects_csv_is_byte_identical_across_runs_with_a_stable_reason_per_hostile_file(tmp_path):
    images = {f"{p:08d}_000.png": gray_png(64, 64) for p in range(1, 4)}
    images.update({"00000011_000.png": raw_png(60000, 1, b"\x00" * 60001), "00000012_000.png": raw_png(1, 1, b"\0\0"),
                   "00000013_000.png": b"this is not an image at all", "00000014_000.png": gray_png(64, 64)})
    root, params = _staged(tmp_path, images)
    escaping = root / "images_001" / "images" / "00000014_000.png"
    (tmp_path / "00000014_000.png").write_bytes(escaping.read_bytes())
    escaping.unlink()
    escaping.symlink_to(tmp_path / "00000014_000.png")  # a file in the download that is a link out of it
    runs = []
    for run in ("first", "second"):
        prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv", tmp_path / run, workers=2)
        runs.append((tmp_path / run / "rejects.csv").read_bytes())
    assert runs[0] == runs[1]
    assert pd.read_csv(io.BytesIO(runs[0])).set_index("Image Index")["reason"].to_dict() == {
        "00000011_000.png": "aspect_ratio: 60000x1 exceeds prepare.max_aspect_ratio 2.0",
        "00000012_000.png": "too_small: 1x1 is below prepare.min_side 64",
        "00000013_000.png": "decode_error: not a PNG or JPEG image (the formats prepare reads)",
        "00000014_000.png": "path_outside_dataset",
    }


def test_prepare_lists_a_malformed_dds_and_tiff_named_png_as_rejects_and_writes_the_rest(tmp_path):
    images = {"00000001_000.png": gray_png(64, 64), "00000002_000.png": malformed_dds(),
              "00000003_000.png": malformed_tiff()}
    _, params = _staged(tmp_path, images)
    manifest = prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv", tmp_path / "out",
                              workers=1)
    assert manifest["written"] == 1
    assert pd.read_csv(tmp_path / "out" / "rejects.csv").set_index("Image Index")["reason"].to_dict() == {
        "00000002_000.png": NOT_PNG_OR_JPEG, "00000003_000.png": NOT_PNG_OR_JPEG}


def _killed(job):
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker


def test_a_killed_decode_worker_fails_prepare_with_one_line_instead_of_hanging(tmp_path, monkeypatch):
    _, params = _staged(tmp_path, {f"{p:08d}_000.png": gray_png(64, 64) for p in range(1, 5)})
    monkeypatch.setattr(prepare, "_process", _killed)  # forked workers inherit it
    with deadline(20), pytest.raises(DataError) as error:
        prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv", tmp_path / "out",
                       workers=2)
    assert str(error.value) == ("prepare: a decode worker died (killed by the system, most likely out of memory); "
                                "lower prepare.workers (was 2) or prepare.max_pixels and rerun")
    assert not (tmp_path / "out").exists()


# --- generate --reference: the same decoder --------------------------------------------------

class _CapturingPipeline:
    """Stands in for a saved clip_vision model: records the reference image it is handed, then stops."""

    def __init__(self):
        self.config = SimpleNamespace(branch="clip_vision")
        self.unet = SimpleNamespace(config=SimpleNamespace(sample_size=32))
        self.vae = None
        self.images = []

    def make_condition(self, image=None, **unused):
        self.images.append(image)
        raise ValueError("stub: stops before sampling")


def generate_reference(tmp_path: Path, monkeypatch, reference: Path):
    stub = _CapturingPipeline()
    monkeypatch.setattr(sample, "load_pipeline", lambda model, sampler, device: stub)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "model"), "--reference", str(reference),
                                      "--device", "cpu"])
    return result, stub.images


def test_a_16bit_reference_reaches_the_model_at_full_range_like_prepare_decodes_it(tmp_path, monkeypatch):
    reference = tmp_path / "ref.png"
    reference.write_bytes(png_bytes(Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))))
    _, images = generate_reference(tmp_path, monkeypatch, reference)
    assert len(images) == 1 and images[0].mode == "L" and images[0].size == (32, 32)  # the model's image size
    assert np.asarray(images[0]).mean() == pytest.approx(127.5, abs=1.0)  # Image.open().convert('L') gave 254.5
    assert np.array_equal(np.asarray(images[0]), preprocess(reference.read_bytes(), 32, "pad", BUDGET))


def test_a_decompression_bomb_reference_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(raw_png(11000, 11000))
    result, images = generate_reference(tmp_path, monkeypatch, tmp_path / "bomb.png")
    assert result.exit_code == 2 and not images
    assert result.output == f"error: --reference {tmp_path / 'bomb.png'}: too_many_pixels: 11000x11000 > " \
                            f"prepare.max_pixels 50000000\n"


def test_a_truncated_reference_is_a_one_line_error(tmp_path, monkeypatch):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    result, _ = generate_reference(tmp_path, monkeypatch, tmp_path / "cut.png")
    assert result.exit_code == 2
    assert result.output == f"error: --reference {tmp_path / 'cut.png'}: decode_error: OSError: image file is truncated\n"


def test_a_directory_as_reference_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "folder.png").mkdir()
    result, _ = generate_reference(tmp_path, monkeypatch, tmp_path / "folder.png")
    assert result.exit_code == 2
    assert result.output == f"error: --reference {tmp_path / 'folder.png'}: not_a_file: a directory\n"


def test_a_missing_reference_is_a_one_line_error(tmp_path, monkeypatch):
    result, _ = generate_reference(tmp_path, monkeypatch, tmp_path / "absent.png")
    assert result.exit_code == 2
    assert result.output == f"error: --reference {tmp_path / 'absent.png'}: missing_file\n"


@pytest.mark.parametrize("data", [malformed_dds(), malformed_tiff()], ids=["dds", "tiff"])
def test_a_malformed_dds_or_tiff_reference_named_png_is_a_one_line_error(tmp_path, monkeypatch, data):
    (tmp_path / "ref.png").write_bytes(data)
    result, images = generate_reference(tmp_path, monkeypatch, tmp_path / "ref.png")
    assert result.exit_code == 2 and not images
    assert result.output == f"error: --reference {tmp_path / 'ref.png'}: {NOT_PNG_OR_JPEG}\n"
