"""lens.io, the one safetensors reader and writer: round trips; malformed, cut-short and
non-regular files refused with a SafetensorsError naming the file before any tensor is read
(also under fuzzing); saved caches refused by a model of another shape."""

import json
import math
import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

from lens import io
from lens.cache import ActivationCache
from conftest import make_model, make_tokens

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _raw(path, header, data: bytes = bytes(16), length=None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _refused(path, match: str) -> str:
    with pytest.raises(io.SafetensorsError, match=match) as e:
        io.SafetensorsFile(path)
    assert str(path) in str(e.value)
    return str(e.value)


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


@pytest.mark.parametrize("header,match", [
    ([F32_2], r"header is a JSON array; it must be an object"),
    (None, r"header is a JSON null"),
    ({"a": {"dtype": "F32", "shape": [2]}}, r"tensor 'a'.* lacks \['data_offsets'\]"),
    ({"a": {**F32_2, "extra": 1}}, r"tensor 'a'.* has unknown fields \['extra'\]"),
    ({"a": "F32"}, r"tensor 'a': the entry is a JSON string"),
    ({"a": {**F32_2, "shape": "64"}}, r"tensor 'a': shape='64' must be a list of non-negative ints"),
    ({"a": {**F32_2, "shape": "2"}}, r"shape='2' must be a list"),
    ({"a": {**F32_2, "shape": [2.0]}}, r"shape=\[2.0\] must be a list"),
    ({"a": {**F32_2, "shape": [True, 2]}}, r"shape=\[True, 2\] must be a list"),
    ({"a": {**F32_2, "shape": [-1, -2]}}, r"shape=\[-1, -2\] must be a list"),
    ({"a": {**F32_2, "data_offsets": [-8, 0]}}, r"data_offsets=\[-8, 0\] must be \[start, stop\]"),
    ({"a": {**F32_2, "data_offsets": [8, 0]}}, r"data_offsets=\[8, 0\] must be"),
    ({"a": {**F32_2, "data_offsets": [0.0, 8.0]}}, r"data_offsets=\[0.0, 8.0\] must be"),
    ({"a": {**F32_2, "data_offsets": [0, 8, 9]}}, r"data_offsets=\[0, 8, 9\] must be"),
    ({"a": {**F32_2, "data_offsets": "08"}}, r"data_offsets='08' must be"),
    ({"a": {**F32_2, "shape": [3]}}, r"span 8 bytes, but shape \[3\] of F32 takes 12"),
    ({"a": {**F32_2, "shape": [2**62, 2**62]}}, r"span 8 bytes, but shape"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
     r"1 of its 1 tensors end past the file's \d+ bytes \(tensor 'a', data_offsets=\[0, 32\], at byte"),
    ({"a": {**F32_2, "dtype": "C64"}}, r"dtype='C64' is not one of \['BF16'"),
    ({"a": {**F32_2, "dtype": ["F32"]}}, r"dtype=\['F32'\] is not one of"),
    ({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, r"tensors 'a' and 'b' share bytes"),
    ({"a": F32_2, "b": F32_2}, r"tensors 'a' and 'b' share bytes"),
    ({"__metadata__": [1], "a": F32_2}, r"__metadata__=\[1\] must be an object of string values"),
    ({"__metadata__": {"k": 1}, "a": F32_2}, r"__metadata__=\{'k': 1\} must be an object"),
    (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', r"not valid UTF-8 JSON"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', r"'a' appears twice"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', r"not valid"),
    (b'{"\xff": 1}', r"not valid UTF-8 JSON"),
    (b'{"a": 1', r"not valid UTF-8 JSON"),
])
def test_malformed_headers_are_refused_naming_the_tensor_field_and_value(tmp_path, header, match):
    _raw(tmp_path / "bad.safetensors", header)
    _refused(tmp_path / "bad.safetensors", match)


def test_every_problem_is_named_at_once(tmp_path):
    _raw(tmp_path / "bad.safetensors", {"a": {**F32_2, "shape": "64"}, "b": {**F32_2, "dtype": "X"}})
    message = _refused(tmp_path / "bad.safetensors", "shape='64'")
    assert "dtype='X'" in message


def test_a_header_nested_100000_deep_is_refused_without_recursion_error(tmp_path):
    for blob in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        _raw(tmp_path / "deep.safetensors", blob)
        _refused(tmp_path / "deep.safetensors", "nests JSON deeper than can be parsed")


@pytest.mark.parametrize("content,match", [
    (b"", r"it has 0 bytes, fewer than the 8"),
    (b"\x10\x00", r"it has 2 bytes, fewer than the 8"),
    (struct.pack("<Q", 10**6) + b"{}", r"header length of 1000000, more than the 2 bytes after them"),
    (struct.pack("<Q", 2**64 - 1) + b"{}" * 8, r"header length of 18446744073709551615"),
    (struct.pack("<Q", 0) + b"{}", r"header length of 0, fewer than the 2"),
    (pickle.dumps({"a": torch.zeros(2).numpy()}), r"is not a safetensors file"),
])
def test_impossible_header_lengths_are_refused(tmp_path, content, match):
    (tmp_path / "bad.safetensors").write_bytes(content)
    _refused(tmp_path / "bad.safetensors", match)


def test_a_header_larger_than_the_largest_readable_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "MAX_HEADER", 64)
    _raw(tmp_path / "big.safetensors", {"a": F32_2, "pad": " " * 100})
    _refused(tmp_path / "big.safetensors", r"more than the largest header lens reads \(64 bytes\)")


def test_a_file_cut_short_while_read_is_refused(tmp_path):
    io.write({"a": torch.ones(64)}, tmp_path / "t.safetensors", {})
    f = io.SafetensorsFile(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-16])
    with pytest.raises(io.SafetensorsError, match="tensor 'a' is cut short"):
        f.get("a")
    with pytest.raises(io.SafetensorsError, match="shrank from"):
        f.mmap()


class _Trickle:
    """A file whose reads return at most 3 bytes, and nothing after `stop` bytes."""

    def __init__(self, f, stop=None):
        self.f, self.stop, self.read_so_far = f, stop, 0

    def readinto(self, buf):
        if self.stop is not None and self.read_so_far >= self.stop:
            return 0
        n = self.f.readinto(buf[:3])
        self.read_so_far += n
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_short_reads_are_read_on_and_an_early_end_is_refused(tmp_path, monkeypatch):
    t = torch.randn(10)
    io.write({"a": t}, tmp_path / "t.safetensors", {"k": "v"})
    opener = io._open_regular
    monkeypatch.setattr(io, "_open_regular", lambda p: _Trickle(opener(p)))
    f = io.SafetensorsFile(tmp_path / "t.safetensors")
    assert f.metadata == {"k": "v"} and torch.equal(f.get("a"), t)
    monkeypatch.setattr(io, "_open_regular", lambda p: _Trickle(opener(p), stop=20))
    _refused(tmp_path / "t.safetensors", r"header is cut short \(\d+ of \d+ bytes")


def refuse_opening(monkeypatch, *paths) -> None:
    """Make opening any of `paths` raise (opening a FIFO would block the test forever)."""
    import builtins
    import io as std_io

    def guard(real):
        def opener(file, *args, **kwargs):
            if str(file) in map(str, paths):
                raise AssertionError(f"{file} was opened")
            return real(file, *args, **kwargs)
        return opener
    for module, name in ((os, "open"), (builtins, "open"), (std_io, "open")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))


def test_non_regular_files_are_refused_before_they_are_opened(tmp_path, monkeypatch):
    fifo, folder = tmp_path / "pipe.safetensors", tmp_path / "dir.safetensors"
    os.mkfifo(fifo)
    folder.mkdir()
    refuse_opening(monkeypatch, fifo, folder)
    _refused(fifo, r"is a FIFO \(named pipe\), not a regular file")
    _refused(folder, r"is a directory, not a regular file")
    with pytest.raises(FileNotFoundError):
        io.SafetensorsFile(tmp_path / "missing.safetensors")


def test_unstorable_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot store"):
        io.write({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors", {})
    with pytest.raises(ValueError, match="names are strings other than '__metadata__'"):
        io.write({"__metadata__": torch.zeros(2)}, tmp_path / "c.safetensors", {})


# ---------------------------------------------------------------------- fuzzing the header
def _valid(header, length_ok: bool, n_data: int) -> bool:
    """The safetensors format, stated independently of lens.io: what a reader must accept."""
    if not length_ok or not isinstance(header, dict):
        return False
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return False
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or sorted(e) != ["data_offsets", "dtype", "shape"]:
            return False
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int for x in xs)  # noqa: E731
        if not (isinstance(dtype, str) and dtype in io.DTYPES and ints(shape) and ints(offsets)
                and len(offsets) == 2 and all(s >= 0 for s in shape)):
            return False
        start, stop = offsets
        nbytes = math.prod(shape) * io.DTYPES[dtype].itemsize
        if not (0 <= start and stop - start == nbytes and stop <= n_data):
            return False
        if stop > start:
            spans.append((start, stop))
    spans.sort()
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4) | st.sampled_from(sorted(io.DTYPES) + ["F8", "C64"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=6)


@st.composite
def _files(draw):
    """(header, header bytes, length written, data): a valid layout, then mutations of it."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(io.DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * io.DTYPES[dtype].itemsize
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["field", "drop", "extra", "entry", "offsets", "dtype", "shape",
                                    "metadata", "whole"]))
        if how == "whole":
            header = draw(JSON)
            break
        if how == "metadata":
            header["__metadata__"] = draw(JSON)
            continue
        if not names:
            continue
        e = header[draw(st.sampled_from(names))]
        if not isinstance(e, dict):
            continue
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if how == "field":
            e[key] = draw(JSON)
        elif how == "drop":
            e.pop(key, None)
        elif how == "extra":
            e[draw(st.text(max_size=3))] = draw(JSON)
        elif how == "entry":
            header[draw(st.sampled_from(names))] = draw(JSON)
        elif how == "offsets" and isinstance(e.get("data_offsets"), list):
            e["data_offsets"] = [x + draw(st.integers(-9, 9)) if type(x) is int else x
                                 for x in e["data_offsets"]]
        elif how == "dtype":
            e["dtype"] = draw(st.sampled_from(sorted(io.DTYPES) + ["F8_E4M3", "U16", "c64", ""]))
        elif how == "shape" and isinstance(e.get("shape"), list):
            e["shape"] = e["shape"] + [draw(st.integers(-1, 3))]
    text = json.dumps(header).encode()
    blob = text + b" " * draw(st.integers(0, 7))  # padding, as lens writes it
    data = draw(st.binary(min_size=max(0, offset - 8), max_size=offset + 8))
    lie = draw(st.sampled_from([0] * 8 + ["short", "long", "huge", "zero"]))
    # a length that cuts the JSON text short, or runs past the end of the file
    length = {0: len(blob), "short": len(text) - draw(st.integers(1, len(text))),
              "long": len(blob) + len(data) + draw(st.integers(1, 9)), "huge": 2**64 - 1, "zero": 0}[lie]
    return header, blob, length, data


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_files())
def test_fuzzed_headers_load_exactly_or_raise_a_safetensors_error(tmp_path, case):
    header, blob, length, data = case
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", length) + blob + data)
    valid = _valid(header, length == len(blob), len(data))
    try:
        f = io.SafetensorsFile(path)
        tensors = f.read_all()
    except io.SafetensorsError as e:
        assert str(path) in str(e)
        assert not valid, f"a valid file was refused: {e}"
        return
    assert valid, f"an invalid file loaded: {header!r}"
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert f.metadata == (header.get("__metadata__") or {})
    assert tensors.keys() == entries.keys()
    try:
        views = f.mmap()
    except io.SafetensorsError as e:
        assert "cannot be a view of the memory map" in str(e)
        views = tensors
    for name, e in entries.items():
        start, stop = e["data_offsets"]
        for t in (tensors[name], views[name]):
            assert t.dtype == io.DTYPES[e["dtype"]] and list(t.shape) == e["shape"]
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == data[start:stop]


# ---------------------------------------------------------------------- saved caches
def test_a_cache_round_trips_and_records_its_models_shape(tmp_path):
    model = make_model()
    _, cache = model.run_with_cache(make_tokens(model))
    cache.save(tmp_path / "c.safetensors")
    meta = io.SafetensorsFile(tmp_path / "c.safetensors").metadata
    assert meta["model.d_model"] == "16" and meta["model.n_layers"] == "2"
    loaded = ActivationCache.load(tmp_path / "c.safetensors", model)
    assert loaded.keys() == cache.keys()
    assert all(torch.equal(loaded[k], cache[k]) for k in cache)


def test_a_cache_is_refused_by_a_model_of_another_shape(tmp_path):
    model, wide = make_model(), make_model(d_model=32, n_heads=4)
    _, cache = model.run_with_cache(make_tokens(model))
    cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"c.safetensors was saved from a model with d_model=16, "
                                         r"n_heads=2, n_kv_heads=2, d_mlp=64; the model given has "
                                         r"d_model=32, n_heads=4, n_kv_heads=4, d_mlp=128"):
        ActivationCache.load(tmp_path / "c.safetensors", wide)


@pytest.mark.parametrize("content,match", [
    (b"", "fewer than the 8"),
    (os.urandom(256), "not a safetensors file|not valid UTF-8 JSON|invalid safetensors header"),
    (struct.pack("<Q", 2**40) + b"{}", "header length of 1099511627776"),
    (pickle.dumps({"blocks.0.hook_resid_pre": torch.zeros(2)}), "is not a safetensors file"),
    ("truncated", r"end past the file's \d+ bytes|not a safetensors file"),
    ("flag", r"__metadata__ has_batch_dim='yes' must be 'True' or 'False'"),
])
def test_a_bad_cache_file_is_refused_naming_it(tmp_path, content, match):
    model, path = make_model(), tmp_path / "c.safetensors"
    if isinstance(content, str):
        _, cache = model.run_with_cache(make_tokens(model))
        cache.save(path)
        data = path.read_bytes()
        if content == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            f = io.SafetensorsFile(path)
            io.write(f.read_all(), path, {**f.metadata, "has_batch_dim": "yes"})
    else:
        path.write_bytes(content)
    with pytest.raises(io.SafetensorsError, match=match) as e:
        ActivationCache.load(path, model)
    assert str(path) in str(e.value)
