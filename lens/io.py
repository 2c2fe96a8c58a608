"""The one safetensors reader and writer of lens, used for checkpoints, caches and harvests:
headers are validated before any tensor is read (offsets inside the file, after the header,
one tensor per byte range), tensors are read with plain file reads or memory-mapped, and
written straight from their memory."""

import json
import math
import struct
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
PathLike = Union[str, Path]


class SafetensorsFile:
    """A safetensors file's header, checked; tensors come one at a time (`get`, plain reads
    into fresh memory: the file's pages never count toward the process) or all at once as
    views of a memory map (`mmap`). entries: name -> (dtype, shape, absolute offset, count)."""

    def __init__(self, path: PathLike):
        self.path = path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: malformed safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        self.entries: dict[str, tuple] = {}
        spans = []
        for k, e in header.items():
            try:
                start, stop = e["data_offsets"]
                dtype, shape = DTYPES.get(e["dtype"]), tuple(int(s) for s in e["shape"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {k!r} has a malformed header entry {e!r}") from None
            if dtype is None:
                raise ValueError(f"{path}: tensor {k!r} has unsupported dtype {e['dtype']!r} "
                                 f"(supported: {sorted(DTYPES)})")
            count = math.prod(shape)
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop) \
                    or stop - start != count * dtype.itemsize or 8 + n + stop > size:
                raise ValueError(f"{path}: tensor {k!r} has inconsistent offsets {e['data_offsets']} "
                                 f"for {count} {e['dtype']} values in a file of {size} bytes")
            self.entries[k] = (dtype, shape, 8 + n + start, count)
            spans.append((start, stop, k))
        spans.sort()
        for (_, stop, a), (start, _, b) in zip(spans, spans[1:]):
            if start < stop:
                raise ValueError(f"{path}: tensors {a!r} and {b!r} share bytes; each tensor must "
                                 "have its own range")
        self.header_len = n

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple:
        return self.entries[key][1]

    def get(self, key: str) -> Tensor:
        dtype, shape, offset, count = self.entries[key]
        out = torch.empty(count, dtype=dtype)
        if count:
            with open(self.path, "rb") as f:
                f.seek(offset)
                got = f.readinto(out.view(torch.uint8).numpy())
            if got != count * dtype.itemsize:
                raise ValueError(f"{self.path}: tensor {key!r} is cut short ({got} of "
                                 f"{count * dtype.itemsize} bytes; the file changed while read?)")
        return out.view(shape)

    def read_all(self) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self.entries}

    def mmap(self) -> dict[str, Tensor]:
        """Every tensor as a zero-copy view of the memory-mapped file."""
        storage = torch.UntypedStorage.from_file(str(self.path), False, self.path.stat().st_size)
        out = {}
        for name, (dtype, shape, start, _) in self.entries.items():
            if start % dtype.itemsize:
                raise ValueError(f"{self.path}: {name!r} is not aligned for a view")
            out[name] = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
        return out


def write(tensors: dict[str, Tensor], path: PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy;
    tensors sharing memory are each written whole)."""
    bad = [f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in NAMES]
    if bad:
        raise ValueError(f"cannot store {bad[:3]} in safetensors; supported dtypes {sorted(map(str, NAMES))}")
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
