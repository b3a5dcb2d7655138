import io

import numpy as np
import pytest
from PIL import Image

from cxr_diffusion.data.decode import (DecodeBudget, DecodeError, decode_grayscale, make_square, png_significant_bits,
                                       preprocess)

from conftest import gradient_image, png_bytes

BUDGET = DecodeBudget(max_pixels=50_000_000, max_aspect_ratio=2.0, min_side=8)  # the test images are small


def test_8bit_grayscale_png_maps_255_to_one():
    pixels = gradient_image()
    decoded = decode_grayscale(png_bytes(Image.fromarray(pixels)), BUDGET)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, pixels / 255.0, atol=1e-6)


def test_16bit_png_is_scaled_by_its_bit_depth_not_clipped():
    pixels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = decode_grayscale(png_bytes(Image.fromarray(pixels)), BUDGET)
    assert decoded.max() == pytest.approx(1.0)
    assert decoded[32, 0] == pytest.approx(pixels[32, 0] / 65535.0, abs=1e-6)
    assert len(np.unique(decoded)) > 256  # more levels than an 8-bit clip would keep


def _with_sbit(data: bytes, bits: int) -> bytes:
    import struct
    import zlib
    chunk = b"sBIT" + bytes([bits])
    sbit = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    ihdr_end = 8 + 12 + 13
    return data[:ihdr_end] + sbit + data[ihdr_end:]


def test_16bit_png_with_12_significant_bits_uses_sbit():
    pixels = np.full((8, 8), 4095, dtype=np.uint16)
    data = _with_sbit(png_bytes(Image.fromarray(pixels)), 12)
    assert png_significant_bits(data) == 12
    assert decode_grayscale(data, BUDGET).max() == pytest.approx(1.0)


def test_rgba_png_with_opaque_alpha_decodes_to_its_gray_values():
    pixels = gradient_image()
    rgba = Image.fromarray(pixels).convert("RGBA")
    np.testing.assert_allclose(decode_grayscale(png_bytes(rgba), BUDGET), pixels / 255.0, atol=1 / 255)


def test_rgb_palette_and_jpeg_decode_to_gray():
    pixels = gradient_image()
    rgb = Image.fromarray(np.stack([pixels] * 3, -1))
    palette = Image.fromarray(pixels).convert("L")
    palette = Image.frombytes("P", palette.size, palette.tobytes())
    palette.putpalette([v for level in range(256) for v in (level, level, level)])
    for data in (png_bytes(rgb), png_bytes(palette)):
        np.testing.assert_allclose(decode_grayscale(data, BUDGET), pixels / 255.0, atol=2 / 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    assert np.abs(decode_grayscale(buffer.getvalue(), BUDGET) - pixels / 255.0).mean() < 0.02


def test_zero_byte_file_is_a_decode_error():
    with pytest.raises(DecodeError, match="^empty_file$"):
        decode_grayscale(b"", BUDGET)


def test_truncated_png_is_a_decode_error():
    data = png_bytes(Image.fromarray(gradient_image((200, 200))))
    with pytest.raises(DecodeError):
        decode_grayscale(data[: len(data) // 2], BUDGET)


def test_garbage_bytes_are_a_decode_error():
    with pytest.raises(DecodeError, match="^decode_error: "):
        decode_grayscale(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10, BUDGET)


def test_pad_keeps_the_whole_image_centered_on_black():
    wide = np.ones((10, 20), dtype=np.float32)
    square = make_square(wide, "pad")
    assert square.shape == (20, 20)
    assert square[:5].sum() == 0 and square[5:15].min() == 1.0


def test_center_crop_keeps_the_middle():
    wide = np.tile(np.arange(20, dtype=np.float32), (10, 1))
    square = make_square(wide, "center_crop")
    assert square.shape == (10, 10) and square[0, 0] == 5.0


def test_downsizing_is_antialiased():
    # A one-pixel checkerboard must average to mid-gray, not alias into stripes.
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    small = preprocess(png_bytes(Image.fromarray(checker)), 32, "pad", BUDGET)
    assert small.shape == (32, 32)
    assert abs(float(small.mean()) - 127.5) < 3 and small.std() < 3
