"""lens.io, the one safetensors reader and writer: round trips, and malformed files refused
before any tensor is read."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from lens import io


def _raw(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_round_trip_and_the_safetensors_library_reads_what_lens_writes(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"a": base, "view": base[:, 1], "half": base.to(torch.bfloat16), "ids": torch.arange(5),
               "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    io.write(tensors, tmp_path / "t.safetensors", {"k": "v"})
    f = io.SafetensorsFile(tmp_path / "t.safetensors")
    assert f.metadata == {"k": "v"}
    for reader in (f.read_all(), f.mmap(), load_file(tmp_path / "t.safetensors")):
        for k, t in tensors.items():
            assert torch.equal(reader[k], t.contiguous()), k


@pytest.mark.parametrize("entries,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "share bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "inconsistent offsets"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "inconsistent offsets"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "inconsistent offsets"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "unsupported dtype 'C64'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "malformed header entry"),
])
def test_malformed_headers_are_refused(tmp_path, entries, match):
    _raw(tmp_path / "bad.safetensors", entries, bytes(16))
    with pytest.raises(ValueError, match=match):
        io.SafetensorsFile(tmp_path / "bad.safetensors")


def test_a_file_cut_short_while_read_is_refused(tmp_path):
    io.write({"a": torch.ones(64)}, tmp_path / "t.safetensors", {})
    f = io.SafetensorsFile(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-16])
    with pytest.raises(ValueError, match="cut short"):
        f.get("a")


def test_unstorable_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot store"):
        io.write({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors", {})
