"""A safetensors file's header, read without loading a tensor: the one place this project parses it by hand.

The format is an 8-byte little-endian header length, a JSON object of that length (tensor name ->
``{"dtype", "shape", "data_offsets"}``, plus an optional ``"__metadata__"`` of strings), then the tensor
bytes, whose offsets count from the end of the header. Checks that only need the header (is this a weights
file, which dtypes, is a layer all zeros, add a label) read it here instead of asking safetensors to map the
whole file.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
METADATA = "__metadata__"


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

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end, counted from ``data_start`` (0 for no tensor or bad offsets)."""
        ends = [entry.get("data_offsets", [0, 0])[-1] for entry in self.tensors.values() if isinstance(entry, dict)]
        return max((end for end in ends if isinstance(end, int) and not isinstance(end, bool)), default=0)

    def covers(self, file_size: int) -> bool:
        """Whether the tensors end exactly where the file does, as safetensors writes them (a cut or padded
        file does not)."""
        return self.data_start + self.data_end == file_size

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


def encode_header(entries: dict) -> bytes:
    """The 8-byte length and JSON of a header, padded with spaces to a multiple of 8 as safetensors writes it."""
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
