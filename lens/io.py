"""The one safetensors reader and writer of lens, used for checkpoints, caches and harvests:
headers are validated before any tensor is read (JSON of the expected shape, known dtypes,
offsets after the header and inside the file, sizes that match the shapes, one tensor per byte
range), only regular files are opened, every read is checked to be whole, and tensors are read
with plain file reads or memory-mapped, and written straight from their memory."""

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
ENTRY = ("dtype", "shape", "data_offsets")  # the fields of a tensor's header entry
MAX_HEADER = 100_000_000  # bytes; the largest header the safetensors library reads
# the config fields a cache records in its metadata (as "model.<field>"), so that it loads only
# into a model of the same shape
MODEL_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")
PathLike = Union[str, Path]


class SafetensorsError(ValueError):
    """A file that is not a safetensors file lens can read. The message names the file, the
    part of it at fault (a tensor, a field), the value found and what is valid."""


def brief(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: values from files go into messages this way."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value) -> str:
    """What JSON calls the type of a parsed value."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def regular_file(path: PathLike, error: type = ValueError) -> os.stat_result:
    """The stat of `path`, which must be a regular file (after symlinks): a FIFO or a device
    would block or never end, a directory is no file. Checked before the file is opened; a
    missing file raises FileNotFoundError, anything else `error`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        raise error(f"{path} is {kind}, not a regular file; lens reads checkpoints, configs and "
                    "caches only from regular files")
    return st


def _open_regular(path: Path):
    """`path` opened for reading, once it is known to be a regular file. The open does not
    block (were the file swapped for a FIFO meanwhile) and what was opened is checked again."""
    regular_file(path, SafetensorsError)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SafetensorsError(f"{path} changed into something other than a regular file while "
                               "being opened")
    return os.fdopen(fd, "rb", buffering=0)


def _read_into(f, buf: memoryview) -> int:
    """Fill `buf` from `f` with as many reads as it takes; the bytes read (fewer at the end of
    the file)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _parse(path: Path, blob: bytes):
    """The header's JSON: UTF-8, no NaN or Infinity, no key twice in an object."""
    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            seen = set()
            for k, _ in items:
                if k in seen:
                    raise ValueError(f"the key {brief(k)} appears twice in one object")
                seen.add(k)
        return out

    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(blob.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise SafetensorsError(f"{path}: the safetensors header nests JSON deeper than can be "
                               "parsed; a header is an object of tensor entries, three levels "
                               "deep") from None
    except ValueError as e:  # also UnicodeDecodeError, and ints too long to convert
        raise SafetensorsError(f"{path}: the safetensors header (bytes 8 to {8 + len(blob)}) is "
                               f"not valid UTF-8 JSON ({brief(str(e), 200)})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name, e, data_start: int):
    """(dtype, shape, absolute offset, count, (start, stop)) of one tensor entry, or the reason
    it is invalid."""
    where = f"tensor {brief(name)}"
    if not isinstance(e, dict):
        return f"{where}: the entry is a JSON {json_type(e)} ({brief(e)}); it must be an object " \
               f"with the fields {list(ENTRY)}"
    missing, extra = [k for k in ENTRY if k not in e], sorted(set(e) - set(ENTRY))
    if missing or extra:
        what = [f"lacks {missing}"] * bool(missing) + [f"has unknown fields {extra}"] * bool(extra)
        return f"{where}: the entry {brief(e)} {' and '.join(what)}; it must have exactly " \
               f"the fields {list(ENTRY)}"
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    problems = []
    if not (isinstance(dtype, str) and dtype in DTYPES):
        problems.append(f"dtype={brief(dtype)} is not one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        problems.append(f"shape={brief(shape)} must be a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        problems.append(f"data_offsets={brief(offsets)} must be [start, stop], two ints with "
                        "0 <= start <= stop (bytes after the header)")
    if problems:
        return f"{where}: " + "; ".join(problems)
    count, (start, stop) = math.prod(shape), offsets
    nbytes = count * DTYPES[dtype].itemsize
    if stop - start != nbytes:
        return f"{where}: data_offsets={offsets} span {stop - start} bytes, but shape {shape} of " \
               f"{dtype} takes {nbytes}"
    return DTYPES[dtype], tuple(shape), data_start + start, count, (start, stop)


class SafetensorsFile:
    """A safetensors file's header, checked; tensors come one at a time (`get`, plain reads
    into fresh memory: the file's pages never count toward the process) or all at once as
    views of a memory map (`mmap`). entries: name -> (dtype, shape, absolute offset, count).
    Anything wrong with the file raises SafetensorsError."""

    def __init__(self, path: PathLike):
        self.path = path = Path(path)
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = bytearray(8)
            if _read_into(f, memoryview(head)) < 8:
                raise SafetensorsError(f"{path} is not a safetensors file: it has {size} bytes, "
                                       "fewer than the 8 that give the header's length")
            n = int.from_bytes(head, "little")
            why = (f"more than the {size - 8} bytes after them" if n > size - 8 else
                   f"more than the largest header lens reads ({MAX_HEADER} bytes)" if n > MAX_HEADER
                   else "fewer than the 2 of the smallest header ({})" if n < 2 else None)
            if why:
                raise SafetensorsError(f"{path} is not a safetensors file: its first 8 bytes give "
                                       f"a header length of {n}, {why}")
            blob = bytearray(n)
            got = _read_into(f, memoryview(blob))
            if got != n:
                raise SafetensorsError(f"{path}: the safetensors header is cut short ({got} of {n} "
                                       "bytes; the file changed while read?)")
        header = _parse(path, bytes(blob))
        if not isinstance(header, dict):
            raise SafetensorsError(
                f"{path}: the safetensors header is a JSON {json_type(header)}; it must be an "
                f"object mapping tensor names to entries with the fields {list(ENTRY)}")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise SafetensorsError(f"{path}: __metadata__={brief(meta)} must be an object of "
                                   "string values")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple] = {}
        problems, spans = [], []
        for name, e in header.items():
            checked = _entry(name, e, 8 + n)
            if isinstance(checked, str):
                problems.append(checked)
                continue
            self.entries[name] = checked[:4]
            if checked[3]:  # a tensor of no elements has no bytes to share
                spans.append((*checked[4], name))
        past = [(stop, name) for _, stop, name in spans if 8 + n + stop > size]
        if past:
            stop, name = max(past)
            problems.append(f"{len(past)} of its {len(header)} tensors end past the file's {size} "
                            f"bytes (tensor {brief(name)}, data_offsets={header[name]['data_offsets']}, "
                            f"at byte {8 + n + stop}): the file is cut short")
        spans.sort()
        for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
            if start < stop:
                problems.append(f"tensors {brief(a)} and {brief(b)} share bytes "
                                f"({header[a]['data_offsets']} and {header[b]['data_offsets']}); "
                                "each tensor must have its own byte range")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise SafetensorsError(f"{path}: invalid safetensors header: "
                                   + "; ".join(problems[:5]) + more)
        self.header_len, self.size = n, size

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple:
        return self.entries[key][1]

    def get(self, key: str) -> Tensor:
        dtype, shape, offset, count = self.entries[key]
        out = torch.empty(count, dtype=dtype)
        if count:
            with _open_regular(self.path) as f:
                f.seek(offset)
                got = _read_into(f, memoryview(out.view(torch.uint8).numpy()))
            if got != count * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {key!r} is cut short ({got} of "
                                       f"{count * dtype.itemsize} bytes; the file changed while read?)")
        return out.view(shape)

    def read_all(self) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self.entries}

    def mmap(self) -> dict[str, Tensor]:
        """Every tensor as a zero-copy view of the memory-mapped file."""
        for name, (dtype, _, start, _) in self.entries.items():
            if start % dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} starts at byte {start}, not a "
                                       f"multiple of its {dtype} size {dtype.itemsize}, so it cannot "
                                       "be a view of the memory map; read it with get()")
        now = regular_file(self.path, SafetensorsError).st_size
        if now < self.size:
            raise SafetensorsError(f"{self.path} shrank from {self.size} to {now} bytes since its "
                                   "header was read")
        storage = torch.UntypedStorage.from_file(str(self.path), False, self.size)
        out = {}
        for name, (dtype, shape, start, _) in self.entries.items():
            out[name] = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
        return out

    def check_model(self, cfg) -> None:
        """Refuse a model whose shape differs from the one recorded in the metadata (see
        model_metadata), naming both."""
        differ = [k for k in MODEL_FIELDS
                  if f"model.{k}" in self.metadata and self.metadata[f"model.{k}"] != str(getattr(cfg, k))]
        if differ:
            saved = ", ".join(f"{k}={self.metadata['model.' + k]}" for k in differ)
            given = ", ".join(f"{k}={getattr(cfg, k)}" for k in differ)
            raise ValueError(f"{self.path} was saved from a model with {saved}; the model given has "
                             f"{given}: load it with a model of the shape it was saved from")

    def flag(self, key: str, default: bool) -> bool:
        """A bool stored in the metadata as "True" / "False" (`default` when absent)."""
        value = self.metadata.get(key, str(default))
        if value not in ("True", "False"):
            raise SafetensorsError(f"{self.path}: __metadata__ {key}={brief(value)} must be "
                                   "'True' or 'False'")
        return value == "True"


def model_metadata(cfg) -> dict[str, str]:
    """The shape of the model of config `cfg`, as safetensors metadata (see check_model)."""
    return {f"model.{k}": str(getattr(cfg, k)) for k in MODEL_FIELDS}


def write(tensors: dict[str, Tensor], path: PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy;
    tensors sharing memory are each written whole)."""
    bad = [f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in NAMES]
    if bad:
        raise ValueError(f"cannot store {bad[:3]} in safetensors; supported dtypes {sorted(map(str, NAMES))}")
    bad = [n for n in tensors if not isinstance(n, str) or n == "__metadata__"]
    if bad:
        raise ValueError(f"cannot store tensors named {bad[:3]} in safetensors; names are strings "
                         "other than '__metadata__'")
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # keeps alignment
    header, offset = {"__metadata__": metadata}, 0
    for n in names:
        t = tensors[n]
        header[n] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset = header[n]["data_offsets"][1]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            t = tensors[n].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy())
