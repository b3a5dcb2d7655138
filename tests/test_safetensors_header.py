"""The one hand-written safetensors header reader: it agrees with the safetensors library and refuses what is not one."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cxr_diffusion.assets.standin_marker import METADATA_KEY, label_safetensors
from cxr_diffusion.safetensors_header import (
    MAX_HEADER_BYTES, SafetensorsHeaderError, encode_header, read_safetensors_header,
)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              str(path), metadata={"format": "pt"})
    return path


def test_the_header_lists_what_the_library_reads(weights):
    header = read_safetensors_header(weights)
    with safe_open(str(weights), "pt") as handle:
        assert sorted(header.tensors) == sorted(handle.keys())
        assert header.metadata == handle.metadata()
        for name in handle.keys():
            assert header.tensors[name]["shape"] == list(handle.get_slice(name).get_shape())
    a_start, a_end = header.tensors["a"]["data_offsets"]
    raw = weights.read_bytes()[header.data_start + a_start: header.data_start + a_end]
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() == [0, 1, 2, 3, 4, 5]


def test_an_encoded_header_is_padded_to_eight_bytes_and_reads_back(tmp_path, weights):
    header = read_safetensors_header(weights)
    encoded = encode_header({**header.entries, "__metadata__": {"k": "v"}})
    assert len(encoded) % 8 == 0
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(encoded + weights.read_bytes()[header.data_start:])
    assert load_file(copy)["a"].tolist() == load_file(weights)["a"].tolist()
    assert read_safetensors_header(copy).metadata == {"k": "v"}


def test_a_label_is_added_to_the_metadata_and_the_tensors_stay(weights):
    label_safetensors(weights, {"standin": True, "build": "b1"})
    assert json.loads(read_safetensors_header(weights).metadata[METADATA_KEY]) == {"standin": True, "build": "b1"}
    assert read_safetensors_header(weights).metadata["format"] == "pt"
    assert load_file(weights)["b"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("content, fragment", [
    (b"", "header of 0 bytes"),
    (b"\x01\x00\x00", "header of 0 bytes"),
    (struct.pack("<Q", 1) + b"{", "header of 1 bytes"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", f"header of {MAX_HEADER_BYTES + 1} bytes"),
    (struct.pack("<Q", 2) + b"[]", "unreadable header"),
    (struct.pack("<Q", 4) + b"{\"a\"", "unreadable header"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "unreadable header"),
    (struct.pack("<Q", 2000) + b"[" * 1000 + b"]" * 1000, "unreadable header"),
])
def test_what_is_not_a_safetensors_header_is_refused(tmp_path, content, fragment):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsHeaderError, match=fragment.replace("[", r"\[")):
        read_safetensors_header(path)
