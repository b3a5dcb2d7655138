"""The one image decoder: any file the real world hands us -> float32 grayscale in [0, 1].

Handles 8- and 16-bit grayscale PNG (scaled by the real bit depth: the PNG's sBIT chunk when it
declares fewer significant bits, never clipped to 8 bits), RGB/RGBA/LA/palette PNG, and JPEG.
Non-square images are padded with black or centre-cropped; resizing is antialiased.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_diffusion.errors import UserError

Image.MAX_IMAGE_PIXELS = 64_000_000  # 8k x 8k; larger files are rejected, not decompressed
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, what PIL's convert('L') uses


class DecodeError(UserError, ValueError):
    """The bytes are not a usable image; the message says why (it becomes the reject reason)."""


def png_significant_bits(data: bytes) -> int | None:
    """Significant bits per grayscale sample of a PNG: sBIT when present, else the IHDR bit depth."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    position, depth = len(_PNG_SIGNATURE), None
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR" and len(body) >= 9:
            depth = body[8]
        elif kind == b"sBIT" and body:
            return int(body[0])
        elif kind == b"IDAT":
            break  # sBIT must precede the image data
        position += 12 + length
    return depth


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decode image bytes to a float32 (H, W) array in [0, 1]."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _to_unit_gray(image, data)
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as error:
        raise DecodeError(f"cannot decode image: {type(error).__name__}: {error}") from error


def _to_unit_gray(image: Image.Image, data: bytes) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image).astype(np.float32)
        if values.min() < 0:
            raise DecodeError(f"negative pixel values in a {mode} image")
        bits = png_significant_bits(data) or 16
        scale = float(2**bits - 1)
        if values.max() > scale:  # the file under-declares its bit depth: trust the container instead
            scale = 65535.0
        return values / scale
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return (rgba[..., :3] @ _LUMA) * rgba[..., 3]  # transparent pixels are background: black
    if mode in ("RGB", "P", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"), dtype=np.float32) @ _LUMA / 255.0
    raise DecodeError(f"unsupported image mode {mode!r}")


def make_square(pixels: np.ndarray, policy: Literal["pad", "center_crop"]) -> np.ndarray:
    """Pad with black (keeps the whole chest) or crop the centre (keeps the scale) to a square."""
    height, width = pixels.shape
    if height == width:
        return pixels
    if policy == "center_crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return pixels[top:top + side, left:left + side]
    side = max(height, width)
    square = np.zeros((side, side), dtype=pixels.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = pixels
    return square


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a square float image to ``size`` x ``size``."""
    if pixels.shape[0] == size:
        return pixels.astype(np.float32, copy=False)
    image = Image.fromarray(pixels.astype(np.float32, copy=False))
    factor = pixels.shape[0] // (2 * size)
    if factor >= 2:  # box-average down to ~2x the target first: exact antialiasing, much cheaper
        image = image.reduce(factor)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def encode_png(pixels_uint8: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels_uint8).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def preprocess(data: bytes, size: int, square: Literal["pad", "center_crop"]) -> np.ndarray:
    """Bytes -> uint8 (size, size) grayscale: decode, square, resize."""
    return to_uint8(resize_square(make_square(decode_grayscale(data), square), size))
