"""The one image decoder: any file the real world hands us -> float32 grayscale in [0, 1].

Handles 8- and 16-bit grayscale PNG, RGB/RGBA/LA/palette PNG, and JPEG. Non-square images are
padded with black or centre-cropped; resizing is antialiased. PIL may open these two formats only
(``_FORMATS``): its other plugins (DDS, TIFF, EPS, ...) would read any file by its magic bytes, whatever
its name, and a malformed one raises whatever the plugin hits (NotImplementedError, TypeError, ...).
Any exception a decoder raises on a file is the listed reject ``decode_error: <type>: <message>``.

Decode budget: before a single pixel is decoded, the size in the file's header is checked against
a ``DecodeBudget`` (``prepare.max_pixels``, ``prepare.max_aspect_ratio``, ``prepare.min_side``),
and so is the padded square ``preprocess`` would allocate. A 138-byte PNG that says 60000x1 is
refused from its header, never inflated. Each refusal is a ``DecodeError`` whose text is stable (no
memory addresses, no timings): it is the reject reason ``prepare`` lists in ``rejects.csv``.

Bit depth of 16-bit images (the scale that maps the brightest possible value to 1.0):
1. the PNG's sBIT chunk, when it declares fewer significant bits and no value exceeds them;
2. otherwise the data: the smallest of 10, 12, 14 or 16 bits that holds the image's largest value.
A 12-bit detector image stored as 16-bit PNG without sBIT (max <= 4095) is scaled by 4095, not
65535 (which left it near-black, max 16/255). The price: a true 16-bit image without sBIT whose
brightest pixel is below 16384 is stretched as if it had fewer bits. Values above 65535 are refused.
Never clipped to 8 bits.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_diffusion.errors import UserError

if TYPE_CHECKING:
    from cxr_diffusion.config import PrepareConfig

# PIL's own bomb check runs inside Image.open, before ours can. It stays as a backstop for every other
# PIL user in the process, set to the largest prepare.max_pixels the config accepts, so that PIL never
# refuses (or warns about) an image a budget allows; above twice that it raises, and that is mapped to
# the same stable `too_many_pixels` reason as our own check.
Image.MAX_IMAGE_PIXELS = 500_000_000
_PIL_HARD_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FORMATS = ("PNG", "JPEG")  # what the NIH download and our own outputs are; the rest of PIL stays shut
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, what PIL's convert('L') uses
_DATA_BIT_DEPTHS = (10, 12, 14, 16)  # detector depths a 16-bit container may hold without saying so
_OBJECT_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names the BytesIO by its address


class DecodeError(UserError, ValueError):
    """The bytes are not a usable image. ``str(error)`` is the stable reject reason:
    ``<code>`` or ``<code>: <detail>``, e.g. ``too_small: 1x1 is below prepare.min_side 64``."""

    def __init__(self, code: str, detail: str | None = None):
        super().__init__(code if detail is None else f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True)
class DecodeBudget:
    """What a decode may cost, checked from the header: pixels, elongation, and the smallest side."""

    max_pixels: int          # width * height, and the padded square's side**2
    max_aspect_ratio: float  # long side / short side
    min_side: int            # short side

    @classmethod
    def from_config(cls, prepare: PrepareConfig) -> DecodeBudget:
        return cls(prepare.max_pixels, prepare.max_aspect_ratio, prepare.min_side)

    @classmethod
    def for_prepared(cls, image_size: int) -> DecodeBudget:
        """Our own output (prepared shards, samples): exactly ``image_size`` x ``image_size``."""
        return cls(image_size * image_size, 1.0, image_size)

    @property
    def max_file_bytes(self) -> int:
        """The largest file an image within the budget can be: 16-bit RGBA stored uncompressed
        (8 bytes per pixel), plus 1 MiB of metadata."""
        return 8 * self.max_pixels + 2**20

    def check(self, width: int, height: int, square: Literal["pad", "center_crop"] | None) -> None:
        """Raise the reject reason for a ``width`` x ``height`` image (``square``: the policy that
        will be applied, whose output array must fit the budget too; None: no squaring)."""
        size = f"{width}x{height}"
        if width * height > self.max_pixels:
            raise DecodeError("too_many_pixels", f"{size} > prepare.max_pixels {self.max_pixels}")
        short, long = min(width, height), max(width, height)
        if short == 0 or long / short > self.max_aspect_ratio:
            raise DecodeError("aspect_ratio", f"{size} exceeds prepare.max_aspect_ratio {self.max_aspect_ratio}")
        if short < self.min_side:
            raise DecodeError("too_small", f"{size} is below prepare.min_side {self.min_side}")
        if square == "pad" and long * long > self.max_pixels:
            raise DecodeError("too_many_pixels", f"{size} pads to {long}x{long} > prepare.max_pixels {self.max_pixels}")


def png_significant_bits(data: bytes) -> int | None:
    """Significant bits per grayscale sample that a PNG's sBIT chunk declares; None without one."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"sBIT" and body:
            return int(body[0])
        if kind == b"IDAT":
            break  # sBIT must precede the image data
        position += 12 + length
    return None


def read_image_file(path: str | os.PathLike, budget: DecodeBudget) -> bytes:
    """The bytes of the image file at ``path``. Refused before reading: anything but a regular file (a
    FIFO would block forever, a directory is no image) and a file larger than any image within ``budget``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DecodeError("missing_file") from None
    except OSError as error:
        raise DecodeError("unreadable_file", error.strerror) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise DecodeError("not_a_file", kind)
    if info.st_size > budget.max_file_bytes:
        raise DecodeError("file_too_large", f"{info.st_size} bytes > {budget.max_file_bytes} "
                                            f"(8 bytes per pixel of prepare.max_pixels {budget.max_pixels}, plus 1 MiB)")
    try:
        with open(path, "rb") as file:
            return file.read(budget.max_file_bytes + 1)
    except OSError as error:
        raise DecodeError("unreadable_file", error.strerror) from None


def decode_grayscale(data: bytes, budget: DecodeBudget) -> np.ndarray:
    """Decode image bytes to a float32 (H, W) array in [0, 1], within ``budget``."""
    return _decode(data, budget, None)


def _decode(data: bytes, budget: DecodeBudget, square: Literal["pad", "center_crop"] | None) -> np.ndarray:
    image = _open_within(data, budget, square)
    try:
        return _to_unit_gray(image, data)
    except (OSError, ValueError) as error:  # converting decoded pixels; anything else there is our bug
        raise DecodeError("decode_error", f"{type(error).__name__}: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    return " ".join(_OBJECT_ADDRESS.sub("", str(error)).split())[:200]


def _open_within(data: bytes, budget: DecodeBudget, square: Literal["pad", "center_crop"] | None) -> Image.Image:
    """The decoded PNG or JPEG image, its size checked against ``budget`` from the header first."""
    if not data:
        raise DecodeError("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget decides, not PIL
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            budget.check(*image.size, square)  # from the header: nothing is decoded yet
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a JPEG's EXIF Orientation: the film upright
            return image
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise DecodeError("too_many_pixels",
                          f"over {_PIL_HARD_LIMIT} pixels > prepare.max_pixels {budget.max_pixels}") from error
    except UnidentifiedImageError as error:
        raise DecodeError("decode_error", "not a PNG or JPEG image (the formats prepare reads)") from error
    except MemoryError:
        raise  # not the file's fault once the budget passed: keep the traceback
    except Exception as error:  # a decoder plugin on hostile bytes raises anything (struct.error, zlib.error,
        # SyntaxError, NotImplementedError, TypeError, IndexError, ...): each is this file's reject, not a crash
        raise DecodeError("decode_error", f"{type(error).__name__}: {_one_line(error)}") from error


def _to_unit_gray(image: Image.Image, data: bytes) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image)
        if values.size and values.min() < 0:
            raise DecodeError("decode_error", f"negative pixel values in a {mode} image")
        peak = int(values.max()) if values.size else 0
        if peak > 65535:
            raise DecodeError("decode_error", f"pixel values above 65535 in a {mode} image")
        declared = png_significant_bits(data)
        if declared is not None and 0 < declared <= 16 and peak < 2**declared:
            bits = declared
        else:  # no sBIT, or one the data contradicts: the data's own depth (see the module docstring)
            bits = next(b for b in _DATA_BIT_DEPTHS if peak < 2**b)
        return values.astype(np.float32) / float(2**bits - 1)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return (rgba[..., :3] @ _LUMA) * rgba[..., 3]  # transparent pixels are background: black
    if mode in ("RGB", "P", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"), dtype=np.float32) @ _LUMA / 255.0
    raise DecodeError("decode_error", f"unsupported image mode {mode!r}")


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


def preprocess(data: bytes, size: int, square: Literal["pad", "center_crop"], budget: DecodeBudget) -> np.ndarray:
    """Bytes -> uint8 (size, size) grayscale: decode, square, resize (the image and its square within ``budget``).
    An image of one flat level (blank, or an RGBA film whose alpha hides it all) carries no film: a reject."""
    pixels = _decode(data, budget, square)
    if pixels.size and pixels.min() == pixels.max():
        raise DecodeError("flat_image", f"every pixel is {float(pixels.flat[0]):.3f} of full scale")
    return to_uint8(resize_square(make_square(pixels, square), size))
