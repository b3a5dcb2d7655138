"""A safetensors file's header, read without loading a tensor: the one place this project parses it by hand.

The format is an 8-byte little-endian header length, a JSON object of that length (tensor name ->
``{"dtype", "shape", "data_offsets"}``, plus an optional ``"__metadata__"`` of strings), then the tensor
bytes, whose offsets count from the end of the header. Checks that only need the header (is this a weights
file, which dtypes, is a layer all zeros, add a label) read it here instead of asking safetensors to map the
whole file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from cxr_diffusion.safe_text import shown_value
from cxr_diffusion.whole_number import is_whole_number

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
METADATA = "__metadata__"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class SafetensorsHeaderError(ValueError):
    """The file is not a safetensors file: its header length or JSON is unreadable (the message says which)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header and where the tensor bytes start in the file."""

    entries: dict
    data_start: int

    @property
    def tensors(self) -> dict:
        """Tensor name -> entry, without the metadata."""
        return {name: entry for name, entry in self.entries.items() if name != METADATA}

    def problem(self, file_size: int) -> str | None:
        """Why the header does not describe the file as safetensors writes one, or None: every entry a known
        dtype, a shape of whole numbers and offsets whose span is exactly dtype x shape, the tensors back to back
        from the start of the data to the end of the file (a cut, padded, overlapping or gapped file does not)."""
        spans = []
        for name, entry in self.tensors.items():
            tensor = f"tensor {shown_value(name)}"
            if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
                return f"{tensor} has no known dtype"
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_whole_number(offset) for offset in offsets)):
                return f"{tensor} has data_offsets {shown_value(offsets)}, not [start, end]"
            if not (isinstance(shape, list) and all(is_whole_number(size) for size in shape)):
                return f"{tensor} has shape {shown_value(shape)}, not a list of sizes"
            if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
                return f"{tensor} spans {offsets[1] - offsets[0]} bytes, not its dtype x shape"
            spans.append(tuple(offsets))
        position = 0
        for start, end in sorted(spans):
            if start != position:
                return "its tensors overlap or leave gaps"
            position = end
        if self.data_start + position != file_size:
            return f"its tensors end at byte {self.data_start + position:,} of {file_size:,}"
        return None

    @property
    def metadata(self) -> dict:
        value = self.entries.get(METADATA)
        return value if isinstance(value, dict) else {}


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read ``path``'s header; raise ``SafetensorsHeaderError`` if it is not one (``OSError`` if unreadable)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
        raise SafetensorsHeaderError("not a regular file")
    with open(path, "rb") as handle:
        raw = handle.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise SafetensorsHeaderError(f"header of {length} bytes")
        text = handle.read(length)
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, a huge integer, deep nesting
        entries = None
    if not isinstance(entries, dict):
        raise SafetensorsHeaderError("unreadable header")
    return SafetensorsHeader(entries, 8 + length)


def checked_header(path: Path) -> tuple[SafetensorsHeader | None, str | None]:
    """``path``'s header, and why it does not describe the file as safetensors writes one (None: it does; the
    header is None when it cannot be read at all). For a reader to refuse a file before ``load_file`` allocates
    what its header declares."""
    try:
        header = read_safetensors_header(path)
        return header, header.problem(os.stat(path).st_size)
    except (SafetensorsHeaderError, OSError) as error:
        return None, str(error) or type(error).__name__


def encode_header(entries: dict) -> bytes:
    """The 8-byte length and JSON of a header, padded with spaces to a multiple of 8 as safetensors writes it."""
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
