"""Harvesting activations: run a model over a token dataset and write chosen hook points to
disk as sharded safetensors with a manifest and running statistics; resumable, data parallel
under torchrun, and read back memory-mapped (Harvest, ShardedActivations, HarvestDataset).
SAE features are written sparsely (indices and values per token) with each feature's top
activating tokens (SparseFeatures)."""

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import queue
import socket
import threading
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from lens import io, sites
from lens.cache import run_with_cache

FORMAT = "lens-harvest/1"
MANIFEST = "manifest.json"
STATS = "stats.safetensors"
LOCK = "harvest.lock"  # held (flock) by the process writing the folder; removed when it is done
FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
_STAT_CHUNK = 2**18  # elements per float64 chunk when summing a shard


# ---------------------------------------------------------------------- arguments
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def _float_dtype(dtype) -> Optional[torch.dtype]:
    """None, a floating-point torch dtype, or its name ("float16", "torch.float16")."""
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype is None or dtype in FLOAT_DTYPES.values():
        return dtype
    raise ValueError(f"dtype={dtype!r} cannot hold activations; valid: None (the model's dtype) "
                     f"or one of {list(FLOAT_DTYPES)}, as torch dtypes or names")


def _folder(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is a file; give a folder (new, or holding "
                         "a harvest to resume)")
    return out_dir


# ---------------------------------------------------------------------- the token dataset
class _Sequences:
    """Fixed-length token sequences by index, over a tensor, a numpy array/memmap or a file."""

    def __init__(self, data, seq_len: Optional[int], n_ctx: int):
        arr = data.cpu().numpy() if isinstance(data, Tensor) else data
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            what = getattr(arr, "dtype", type(arr).__name__)
            raise TypeError(f"tokens must be an integer tensor or array, [n_seq, seq_len] or 1-D, "
                            f"or a path to a .npy or text file; got {what} of shape "
                            f"{tuple(getattr(arr, 'shape', ()))}")
        if arr.ndim == 2:
            if seq_len is not None and seq_len != arr.shape[1]:
                raise ValueError(f"seq_len={seq_len} but the tokens are rows of {arr.shape[1]}")
            if arr.shape[1] > n_ctx:
                raise ValueError(f"the token rows hold {arr.shape[1]} tokens, more than the "
                                 f"model's n_ctx={n_ctx}")
            self.seq_len = arr.shape[1]
        else:
            if seq_len is not None and seq_len > n_ctx:
                raise ValueError(f"seq_len={seq_len} exceeds the model's n_ctx={n_ctx}; valid: "
                                 f"1 to {n_ctx}, or None for n_ctx")
            self.seq_len = L = seq_len or n_ctx
            arr = arr[: len(arr) // L * L].reshape(-1, L)  # drops the remainder
        self.arr, self.n_seq = arr, arr.shape[0]
        if self.n_seq == 0:
            raise ValueError(f"the dataset holds no full sequence of seq_len={self.seq_len}")

    def get(self, start: int, stop: int) -> Int[Tensor, "batch pos"]:
        return torch.from_numpy(np.array(self.arr[start:stop], dtype=np.int64))

    def fingerprint(self) -> str:
        h, step = hashlib.sha256(f"{self.n_seq}x{self.seq_len}".encode()), max(1, 2**20 // self.seq_len)
        for s in range(0, self.n_seq, step):
            h.update(self.get(s, s + step).numpy().tobytes())
        return h.hexdigest()


def _dataset(data, model, seq_len: Optional[int], out_dir: Path, rank: int) -> _Sequences:
    """A text file is encoded once (blocks of whole lines, ~1 MiB each, no BOS) into an int32
    token file in out_dir, named by the text's hash, and read memory-mapped like a .npy file."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no token or text file at {path}")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise ValueError(f"{path} is not a readable .npy file: {e}") from None
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
                raise ValueError(f"{path} holds {getattr(arr, 'dtype', type(arr).__name__)} values; "
                                 "a token file holds integer token ids")
            return _Sequences(arr, seq_len, model.cfg.n_ctx)
        if path.stat().st_size == 0:
            raise ValueError(f"the text file {path} is empty")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(2**24):
                h.update(block)
        cache = out_dir / f"tokens-{h.hexdigest()[:16]}.int32"
        if rank == 0 and not cache.exists():
            if model.tokenizer is None:
                raise ValueError(f"{path} is a text file, but the model has no tokenizer to encode it")
            def encode(tmp: str) -> None:
                with open(path, encoding="utf-8") as src, open(tmp, "wb") as dst:
                    while block := "".join(src.readlines(2**20)):
                        dst.write(np.asarray(model.tokenizer.encode(block), dtype=np.int32).tobytes())
            try:
                _atomic(cache, encode)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason}: byte "
                                 f"0x{e.object[e.start]:02x}); give UTF-8 text or a .npy token "
                                 "file") from None
        _barrier()
        if cache.stat().st_size == 0:
            raise ValueError(f"the text file {path} encodes to no tokens")
        data = np.memmap(cache, dtype=np.int32, mode="r")
    return _Sequences(data, seq_len, model.cfg.n_ctx)


# ---------------------------------------------------------------------- hashing and files
def _hash(config: str, module) -> str:
    """sha256 of a config string and every tensor of a module's state dict (names, shapes,
    dtypes and bytes)."""
    h = hashlib.sha256(config.encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_hash(model) -> str:
    """sha256 of the config and every weight."""
    return _hash(model.cfg.to_json(), model)


def _lens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lens")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then fsync and rename over path; the temp file never outlives a failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True)))


_write_safetensors = io.write  # one name in this module, so tests can make the disk fill up


def _mmap_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of the memory-mapped file."""
    return io.SafetensorsFile(path).mmap()


def _read_manifest(path: Path) -> dict:
    """A manifest (manifest.json or a rank's), checked enough that reading it cannot crash."""
    try:
        m = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"not JSON ({e})"
    else:
        shards = m.get("shards") if isinstance(m, dict) else None
        problem = (
            "not a JSON object" if not isinstance(m, dict)
            else f"format {m.get('format')!r}, not {FORMAT!r}" if m.get("format") != FORMAT
            else "no list of shards" if not isinstance(shards, list)
            else "a malformed shard entry" if not all(
                isinstance(e, dict) and isinstance(e.get("file"), str)
                and isinstance(e.get("tokens"), list) and len(e["tokens"]) == 2 for e in shards)
            else "no hooks" if not isinstance(m.get("hooks"), dict) else None)
        if problem is None:
            return m
    raise ValueError(f"{path} is not a lens harvest manifest: {problem}; delete it (or the "
                     "folder) to harvest again from the start")


def _expected(manifest: dict, n: int, nnz: dict[str, int]) -> dict[str, tuple[list, str]]:
    """{entry: (shape, dtype)} of a shard of n tokens, nnz[name] values stored per SAE."""
    want = {name: ([n, *h["shape"]], h["dtype"]) for name, h in manifest["hooks"].items()}
    features = manifest.get("features") or {}
    if features:
        want["tokens"] = ([n], "int32")
    for name, f in features.items():
        k, d, m = f["top_k"], f["d_sae"], nnz.get(name, -1)
        want.update({f"{name}:indptr": ([n + 1], "int64"), f"{name}:indices": ([m], "int32"),
                     f"{name}:values": ([m], f["dtype"]), f"{name}:top_values": ([d, k], "float32"),
                     f"{name}:top_tokens": ([d, k], "int64")})
    return want


def _shard_problem(out_dir: Path, shard: dict, manifest: dict) -> Optional[str]:
    """Why a recorded shard's file is not what its manifest entry says (None when it is):
    missing, cut short, or holding other hooks, shapes or dtypes."""
    path = out_dir / shard["file"]
    try:
        f = io.SafetensorsFile(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except ValueError as e:
        return str(e)
    n = shard["tokens"][1] - shard["tokens"][0]
    nnz = {name: f.entries[f"{name}:indices"][1][0] for name in manifest.get("features") or {}
           if f"{name}:indices" in f.entries and len(f.entries[f"{name}:indices"][1]) == 1}
    want = _expected(manifest, n, nnz)
    if set(f.keys()) != set(want):
        return f"{path} holds {sorted(f.keys())}, not {sorted(want)}"
    for name, (shape, dtype) in want.items():
        got_dtype, got_shape = f.entries[name][:2]
        if list(got_shape) != shape or str(got_dtype).removeprefix("torch.") != dtype:
            return f"{path} holds {name} as {list(got_shape)} {got_dtype}, not {shape} {dtype}"
    return None


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold out_dir's lock file for the body, or raise naming the process that holds it. The
    lock is an flock, which the system releases when its holder dies, so a killed harvest
    leaves nothing that blocks the next one; the file is removed on a normal exit."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: unlocked
        yield
        return
    path = out_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise type(e)(e.errno, f"cannot write into out_dir {out_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BlockingIOError(errno.EWOULDBLOCK, f"{out_dir} is being written by another "
                                  f"harvest ({holder}, lock {path}); wait for it to finish or "
                                  "use another out_dir") from None
        try:  # the file we locked may have been removed by a holder that just finished
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _flat(name: str, act: Tensor) -> Tensor:
    """[batch, pos, ...] → [batch*pos, ...]; patterns [batch, n_heads, query_pos, key_pos] →
    [batch*query_pos, n_heads, key_pos]."""
    if sites.pos_axis(name) != 1:
        act = act.transpose(1, sites.pos_axis(name))
    return act.reshape(-1, *act.shape[2:])


def _sums(x: Tensor, work: dict) -> Float[Tensor, "n"]:
    """float64 [sum (per-token size), sum of squares (same), sum of L2 norms, count], in chunks
    through float64 buffers kept in `work`, so that no large temporary is allocated per shard."""
    d = x[0].numel()
    step, x = max(1, _STAT_CHUNK // d), x.reshape(len(x), d)
    if work.get("d") != d:
        work.update(d=d, c=torch.empty(step, d, dtype=torch.float64),
                    sq=torch.empty(step, d, dtype=torch.float64))
    acc = torch.zeros(2 * d + 2, dtype=torch.float64)
    for s in range(0, len(x), step):
        c, sq = work["c"][:len(x) - s], work["sq"][:len(x) - s]
        c.copy_(x[s:s + step])
        acc[:d] += c.sum(0)
        acc[d:2 * d] += torch.mul(c, c, out=sq).sum(0)
        acc[2 * d] += sq.sum(1).sqrt_().sum()
    acc[-1] = len(x)
    return acc


# ---------------------------------------------------------------------- SAE features, sparsely
# A shard holds each SAE's features of its n tokens as CSR rows: "{name}:indptr" [n + 1] (int64),
# "{name}:indices" [nnz] (int32 feature ids, ascending within a token) and "{name}:values" [nnz],
# plus the shard's top_k activations of every feature, "{name}:top_values" [d_sae, top_k] (-inf
# where fewer tokens fired) and "{name}:top_tokens" [d_sae, top_k] (global token index, -1 there),
# and "tokens" [n] (int32), so that contexts can be shown without the dataset.
_SPARSE = ("indptr", "indices", "values", "top_values", "top_tokens")


class _Features:
    """How one SAE's features are computed from a cached activation during a harvest."""

    def __init__(self, model, sae):
        from lens.sae import SAE, _check_processing, _Splice
        if not isinstance(sae, SAE):
            raise TypeError(f"saes must hold lens.sae.SAE dictionaries, got {type(sae).__name__}")
        device = next(model.parameters()).device
        if sae.W_enc.device != device:
            raise ValueError(f"the SAE at {sae.hook_name!r} is on {sae.W_enc.device}, the model on "
                             f"{device}; move it with sae.to({str(device)!r})")
        self.sae = _check_processing(model, sae)
        self.splice = _Splice(model, self.sae, use_error_term=False)  # checks hook name and d_in
        self.name, self.d_sae = sae.features_name, sae.d_sae

    def __call__(self, cache, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(active features per token [tokens], feature ids [nnz] int32, values [nnz]) on the CPU."""
        x = self.splice._read(cache[self.sae.hook_name], self.splice.how)
        x = x.reshape(-1, x.shape[-1])
        rows, feats, values = self.sae._encode(x, hooked=False, sparse=True)[0]
        counts = torch.bincount(rows, minlength=len(x))
        return counts.cpu(), feats.to(torch.int32).cpu(), values.to(dtype or values.dtype).cpu()


def sae_hash(sae) -> str:
    """sha256 of an SAE's config and weights."""
    return _hash(json.dumps(sae.config(), sort_keys=True, default=str), sae)


def _csr_rows(indptr: Tensor) -> Tensor:
    """The token (row) of every stored value of a CSR shard."""
    return torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr.diff())


def _shard_top(indptr: Tensor, indices: Tensor, values: Tensor, d_sae: int, k: int,
               offset: int) -> tuple[Tensor, Tensor]:
    """Each feature's k largest activations in a shard ([d_sae, k] values, -inf past the
    feature's count, and global token indices, -1 there); ties go to the earlier token."""
    order = torch.argsort(values.float(), descending=True, stable=True)
    order = order[torch.argsort(indices[order], stable=True)]  # by feature, each by value
    feats = indices[order].long()
    count = torch.bincount(feats, minlength=d_sae)
    rank = torch.arange(len(order)) - (count.cumsum(0) - count)[feats]
    keep = rank < k
    top_v = torch.full((d_sae, k), -math.inf)
    top_t = torch.full((d_sae, k), -1, dtype=torch.int64)
    f, r, o = feats[keep], rank[keep], order[keep]
    top_v[f, r] = values[o].float()
    top_t[f, r] = _csr_rows(indptr)[o] + offset
    return top_v, top_t


def _merge_top(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The k largest of two [d_sae, k] top lists; on ties a's (the earlier tokens') first."""
    v, t = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    order = torch.argsort(v, dim=1, descending=True, stable=True)[:, :a[0].shape[1]]
    return v.gather(1, order), t.gather(1, order)


def _feature_sums(indices: Tensor, values: Tensor, d_sae: int) -> Float[Tensor, "n"]:
    """float64 [tokens each feature fired on (d_sae), sum of its activations (d_sae)]."""
    acc = torch.zeros(2 * d_sae, dtype=torch.float64)
    acc[:d_sae] = torch.bincount(indices.long(), minlength=d_sae).double()
    acc[d_sae:].index_add_(0, indices.long(), values.double())
    return acc


# ---------------------------------------------------------------------- distributed
def _rank_world() -> tuple[int, int]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def _over_ranks(t: Tensor) -> Tensor:
    """The sum of `t` over the ranks (itself on one rank)."""
    if _rank_world()[1] == 1:
        return t
    t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu()


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


# ---------------------------------------------------------------------- the writer
class _Writer(threading.Thread):
    """Writes shards, and the manifest that records them, in the background so that the next
    forward pass overlaps serialisation and IO; `depth` bounds the shards waiting in the queue."""

    def __init__(self, out_dir: Path, manifest: Path, header: dict, shards: dict, depth: int):
        super().__init__(daemon=True)
        self.features = header.get("features") or {}
        self.out_dir, self.manifest, self.header, self.shards = out_dir, manifest, header, shards
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.sums: dict[int, dict[str, Tensor]] = {}
        self.work: dict[str, dict] = {}
        self.free: list[dict[str, Tensor]] = []  # written shard buffers, for reuse
        self.error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                self.error or self.write(*item)
            except BaseException as e:  # re-raised in the caller's thread by check()
                self.error = e
            del item  # hold no shard while waiting for the next

    def write(self, i: int, lo: int, hi: int, tensors: dict[str, Tensor]) -> None:
        name = f"shard-{i:05d}.safetensors"
        dense = {n: t for n, t in tensors.items() if n in self.header["hooks"]}
        self.sums[i] = {n: _sums(t, self.work.setdefault(n, {})) for n, t in dense.items()}
        for n, f in self.features.items():  # each feature's top tokens in the shard
            csr = [tensors[f"{n}:{part}"] for part in _SPARSE[:3]]
            tensors[f"{n}:top_values"], tensors[f"{n}:top_tokens"] = _shard_top(
                *csr, f["d_sae"], f["top_k"], lo)
        self.sums[i].update(_shard_feature_sums(tensors, self.features))
        meta = {"tokens": f"{lo}:{hi}"}
        _atomic(self.out_dir / name, lambda tmp: _write_safetensors(tensors, tmp, meta))
        self.shards[i] = {"file": name, "tokens": [lo, hi]}
        _write_json(self.manifest, {**self.header, "shards": _ordered(self.shards)})
        self.free.append(dense)

    def put(self, item) -> None:
        while True:
            self.check()
            try:
                return self.q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def check(self) -> None:
        e = self.error
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device writing to {self.out_dir}: "
                          f"{len(self.shards)} shards are complete and recorded in "
                          f"{self.manifest.name}; free space and call harvest again with the same "
                          "arguments to resume") from e
        if e is not None:
            raise e

    def close(self) -> None:
        self.q.put(None)
        self.join()
        self.check()


def _shard_feature_sums(tensors: dict[str, Tensor], features: dict) -> dict[str, Tensor]:
    return {n: _feature_sums(tensors[f"{n}:indices"], tensors[f"{n}:values"], f["d_sae"])
            for n, f in features.items()}


def _ordered(shards: dict) -> list:
    return [shards[i] for i in sorted(shards)]


# ---------------------------------------------------------------------- harvest
@torch.no_grad()
def harvest(model, tokens, hook_names, out_dir, batch_size: int = 32,
            dtype: Union[None, torch.dtype, str] = None, shard_tokens: int = 2**15,
            seq_len: Optional[int] = None, progress: bool = True, queue_depth: int = 1,
            saes=None, top_k: int = 16) -> "Harvest":
    """Run `model` over `tokens` and write the activations of `hook_names` to `out_dir`.

    tokens: [n_seq, seq_len] tensor or array (rows are sequences), a 1-D tensor/array/memmap
    (cut into windows of seq_len, n_ctx by default; a remainder is dropped), or a path to a
    .npy file or a text file (encoded once with model.tokenizer into a token file in out_dir).
    Each shard holds whole sequences, shard_tokens // seq_len of them, as safetensors
    [tokens, ...] per hook (batch×pos flattened; patterns become [tokens, n_heads, key_pos]),
    cast to `dtype` if given (a floating-point torch dtype or its name, e.g. "float16"). The
    forward stops after the last block the hooks need.

    saes: lens.sae.SAE dictionaries whose features to write, sparsely, under
    "{sae.hook_name}.hook_sae_acts_post" (hook_names may then be []): each token's active
    features and their values, with every feature's `top_k` top activating tokens and its
    firing count (Harvest.features). The features are the SAE's encoding of the model's own
    activation at its hook point (nothing is spliced in, so several SAEs read one clean run).

    Resumable: shards and manifest.json are replaced atomically, so calling harvest again with
    the same arguments after a crash or a full disk finishes the job, byte-identical to an
    uninterrupted run. Under torchrun each rank writes shards i with i % world_size == rank and
    rank 0 writes the merged manifest and stats.safetensors (mean, variance, mean L2 norm).
    Memory: one batch plus at most 2 + queue_depth shards, whatever the dataset size.
    """
    batch_size = _positive_int("batch_size", batch_size)
    shard_tokens = _positive_int("shard_tokens", shard_tokens)
    queue_depth = _positive_int("queue_depth", queue_depth)
    seq_len = None if seq_len is None else _positive_int("seq_len", seq_len)
    top_k = _positive_int("top_k", top_k)
    dtype = _float_dtype(dtype)
    out_dir = _folder(out_dir)
    features = _feature_specs(model, saes)
    no_hooks = features and (hook_names is None or (not isinstance(hook_names, str)
                                                     and not callable(hook_names) and not list(hook_names)))
    names = [] if no_hooks else model.hook_names_matching(hook_names)
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:  # launched by torchrun: join its group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # one lock per job: the other ranks write into the folder that rank 0 holds
        with _locked(out_dir) if _rank_world()[0] == 0 else contextlib.nullcontext():
            return _harvest(model, tokens, names, out_dir, batch_size, dtype, shard_tokens,
                            seq_len, progress, queue_depth, features, top_k)
    finally:
        if own_group:
            dist.destroy_process_group()


def _feature_specs(model, saes) -> dict[str, _Features]:
    """{feature site name: _Features} for `saes` (None, one SAE or several), checked."""
    if saes is None:
        return {}
    from lens.sae import SAE
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    specs: dict[str, _Features] = {}
    for sae in saes:
        f = _Features(model, sae)
        if f.name in specs:
            raise ValueError(f"two SAEs write {f.name!r}; harvest one SAE per hook point (run "
                             "harvest again into another out_dir for the other)")
        specs[f.name] = f
    return specs


def _harvest(model, tokens, names, out_dir, batch_size, dtype, shard_tokens, seq_len,
             progress, queue_depth, features, top_k) -> "Harvest":
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    seqs = _dataset(tokens, model, seq_len, out_dir, rank)
    L, per_shard = seqs.seq_len, shard_tokens // seqs.seq_len
    if per_shard < 1:
        raise ValueError(f"shard_tokens={shard_tokens} is less than one sequence of {L} tokens")
    device = next(model.parameters()).device
    reads = list(dict.fromkeys(names + [f.sae.hook_name for f in features.values()]))

    def forward(lo: int, hi: int) -> dict[str, Tensor]:
        toks = seqs.get(lo, hi)
        _, cache = run_with_cache(model, toks.to(device), names_filter=reads,
                                  stop_at_layer="auto", return_type=None)
        out = {n: _flat(n, cache[n]).to("cpu", dtype or cache[n].dtype) for n in names}
        for n, f in features.items():
            out[f"{n}:counts"], out[f"{n}:indices"], out[f"{n}:values"] = f(cache, dtype)
        if features:
            out["tokens"] = toks.reshape(-1).to(torch.int32)
        return out

    probe = forward(0, 1)
    header = {
        "format": FORMAT, "lens_version": _lens_version(), "model_hash": model_hash(model),
        "dataset": {"fingerprint": seqs.fingerprint(), "n_seq": seqs.n_seq, "seq_len": L,
                    "n_tokens": seqs.n_seq * L},
        "hooks": {n: {"shape": list(probe[n].shape[1:]),
                      "dtype": str(probe[n].dtype).removeprefix("torch.")} for n in names},
        "batch_size": batch_size, "shard_tokens": per_shard * L,
        "n_shards": -(-seqs.n_seq // per_shard), "stats": STATS, "complete": False,
    }
    if features:
        header["features"] = {n: {
            "d_sae": f.d_sae, "top_k": top_k, "sae_hash": sae_hash(f.sae),
            "architecture": f.sae.architecture, "sae": f.sae.config(),
            "dtype": str(probe[f"{n}:values"].dtype).removeprefix("torch.")}
            for n, f in features.items()}
    shards, complete = _existing(out_dir, header)
    for i, shard in sorted(shards.items()):  # a recorded shard damaged since is computed again
        if (problem := _shard_problem(out_dir, shard, header)) is not None:
            warnings.warn(f"{problem}; computing shard {i} again", stacklevel=3)
            del shards[i]
            complete = False
    _barrier()
    if complete:
        return Harvest.open(out_dir)
    if rank == 0:
        for tmp in out_dir.glob("*.tmp"):
            tmp.unlink()
        _write_json(out_dir / MANIFEST, {**header, "shards": _ordered(shards)})
    _barrier()

    mine = range(rank, header["n_shards"], world)
    span = lambda i: (i * per_shard, min((i + 1) * per_shard, seqs.n_seq))
    size = lambda i: (span(i)[1] - span(i)[0]) * L
    writer = _Writer(out_dir, out_dir / (MANIFEST if world == 1 else f"manifest.rank{rank}.json"),
                     header, {i: shards[i] for i in mine if i in shards}, queue_depth)
    bar = tqdm(total=sum(map(size, mine)), initial=sum(size(i) for i in mine if i in shards),
               unit="tok", unit_scale=True, disable=not progress or rank != 0, desc="harvest")
    sums, work = {}, {}
    try:
        for i in mine:
            if i in shards:  # done before: its statistics are read back from the file
                acts = _mmap_tensors(out_dir / shards[i]["file"])
                sums[i] = {n: _sums(acts[n], work.setdefault(n, {})) for n in names}
                sums[i].update(_shard_feature_sums(acts, header.get("features") or {}))
                continue
            lo, hi = span(i)
            buf = writer.free.pop() if writer.free else {
                n: torch.empty((size(0), *probe[n].shape[1:]), dtype=probe[n].dtype) for n in names}
            buf = {n: b[:size(i)] for n, b in buf.items()}  # the last shard may be shorter
            sparse: dict[str, list[Tensor]] = {}
            for s in range(lo, hi, batch_size):
                e = min(s + batch_size, hi)
                for n, act in forward(s, e).items():
                    if n in buf:
                        buf[n][(s - lo) * L:(e - lo) * L] = act
                    else:
                        sparse.setdefault(n, []).append(act)
                bar.update((e - s) * L)
            if features:
                buf["tokens"] = torch.cat(sparse.pop("tokens"))
            for n in features:
                counts = torch.cat(sparse.pop(f"{n}:counts"))
                buf[f"{n}:indptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
                buf[f"{n}:indices"] = torch.cat(sparse.pop(f"{n}:indices"))
                buf[f"{n}:values"] = torch.cat(sparse.pop(f"{n}:values"))
            writer.put((i, lo * L, hi * L, buf))
            del buf, sparse
    finally:
        writer.close() if writer.error is None else writer.q.put(None)
        bar.close()
    _finish(out_dir, header, names, {**sums, **writer.sums}, rank, world)
    return Harvest.open(out_dir)


def _existing(out_dir: Path, header: dict) -> tuple[dict, bool]:
    """The shards already recorded for this exact job (manifest.json and per-rank manifests)."""
    path = out_dir / MANIFEST
    if not path.exists():
        return {}, False
    old = _read_manifest(path)
    if old.get("model_hash") != header["model_hash"]:
        raise ValueError(f"{out_dir} holds activations of another model (model hash "
                         f"{old.get('model_hash')}), but this model's hash is "
                         f"{header['model_hash']}; use another out_dir or delete it")
    keys = ("format", "dataset", "hooks", "features", "batch_size", "shard_tokens")
    diff = [f"{k}: {old.get(k)} there, {header.get(k)} now" for k in keys
            if old.get(k) != header.get(k)]
    if diff:
        raise ValueError(f"{out_dir} holds a harvest of other data or settings ({'; '.join(diff)}); "
                         "pass the same arguments to resume it, or use another out_dir")
    files = [path, *out_dir.glob("manifest.rank*.json")]
    shards = {s["tokens"][0] // header["shard_tokens"]: s
              for m in files for s in _read_manifest(m)["shards"]}
    return shards, bool(old.get("complete"))


def _finish(out_dir, header, names, sums, rank, world) -> None:
    """Sum the statistics over shards (in shard order), then over ranks (all_reduce, which also
    waits for every rank's shards); rank 0 writes them and the final manifest."""
    stats = {}
    for n in names:
        shape = header["hooks"][n]["shape"]
        d = int(np.prod(shape))
        t = _over_ranks(sum((sums[i][n] for i in sorted(sums)), torch.zeros(2 * d + 2, dtype=torch.float64)))
        stats.update({f"{n}:sum": t[:d].reshape(shape), f"{n}:sumsq": t[d:2 * d].reshape(shape),
                      f"{n}:norm_sum": t[2 * d].clone(), f"{n}:count": t[-1].to(torch.int64)})
    for n, f in (header.get("features") or {}).items():
        d = f["d_sae"]
        t = _over_ranks(sum((sums[i][n] for i in sorted(sums)), torch.zeros(2 * d, dtype=torch.float64)))
        stats.update({f"{n}:active": t[:d].to(torch.int64), f"{n}:sum": t[d:].clone(),
                      f"{n}:count": torch.tensor(header["dataset"]["n_tokens"])})
    if rank == 0 and header.get("features"):  # every shard is on disk now: merge their tops
        shards, _ = _existing(out_dir, header)
        for n in header["features"]:
            top = None
            for i in sorted(shards):
                part = _mmap_tensors(out_dir / shards[i]["file"])
                part = (part[f"{n}:top_values"], part[f"{n}:top_tokens"])
                top = part if top is None else _merge_top(top, part)
            stats[f"{n}:top_values"], stats[f"{n}:top_tokens"] = (t.contiguous() for t in top)
    if rank == 0:
        _atomic(out_dir / STATS, lambda tmp: _write_safetensors(stats, tmp, {}))
        shards, _ = _existing(out_dir, header)
        _write_json(out_dir / MANIFEST, {**header, "complete": True, "shards": _ordered(shards)})
        for m in out_dir.glob("manifest.rank*.json"):
            m.unlink()
    _barrier()


# ---------------------------------------------------------------------- reading back
class _TokenIndexed:
    """Indexing by token of a [tokens, ...] store over shards (`self.offsets`: each shard's first
    token): an int, a slice, a list/array/tensor of ints or a boolean mask of one entry per
    token. Subclasses give `_span(start, stop)` (rows start:stop, 0 <= start <= stop <= n) and
    `_gather(flat)` (rows at in-range indices [k])."""

    shape: torch.Size

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> Tensor:
        n = len(self)
        if _is_int(idx):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"token {i} is out of range for {n} tokens")
            return self._span(i % n, i % n + 1)[0]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self[torch.arange(start, stop, step)]
            return self._span(start, max(start, stop))
        idx = self._positions(idx)
        flat = torch.where(idx < 0, idx + n, idx).reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"token index out of range for {n} tokens")
        return self._gather(flat).reshape(*idx.shape, *self.shape[1:])

    def _shard_of(self, flat: Tensor) -> Tensor:
        """The shard holding each token index."""
        return torch.from_numpy(np.searchsorted(self.offsets, flat.numpy(), side="right") - 1)

    def _positions(self, idx) -> Tensor:
        """A list, array or tensor of token indices, or a boolean mask over the tokens, as a
        long tensor of indices."""
        n, valid = len(self), (f"valid: an int, a slice, a list/array/tensor of ints, or a "
                               f"boolean mask of {len(self)} entries (one per token)")
        if not isinstance(idx, (list, range, np.ndarray, Tensor)):  # floats, strings, bools, None
            raise IndexError(f"{idx!r} ({type(idx).__name__}) is not a token index; {valid}")
        try:
            t = idx.detach().cpu() if isinstance(idx, Tensor) else torch.as_tensor(np.asarray(idx))
        except (TypeError, ValueError, RuntimeError):  # strings, objects, ragged lists
            raise IndexError(f"{idx!r} is not a token index; {valid}") from None
        if t.numel() == 0:
            return t.long().reshape(t.shape)
        if t.dtype == torch.bool:
            if t.shape != (n,):
                raise IndexError(f"a boolean mask of shape {tuple(t.shape)} cannot select among "
                                 f"{n} tokens; {valid}")
            return t.nonzero().reshape(-1)
        if t.is_floating_point() or t.is_complex():
            raise IndexError(f"token indices of dtype {t.dtype} are not indices; {valid}")
        if t.dtype == torch.uint8 and isinstance(idx, Tensor):
            raise IndexError(f"a uint8 tensor is ambiguous (torch reads it as a mask); {valid}")
        return t.long()


class ShardedActivations(_TokenIndexed):
    """One hook's [tokens, ...] activations over memory-mapped shards, indexed like a tensor.

    `acts[i]`, `acts[a:b]` and `acts[a:b, ...]` inside one shard are zero-copy views of the
    mapped file; across shards, and for index tensors/lists (gathers) and boolean masks of one
    entry per token, they are new tensors.
    `acts.shards` are the per-shard views; `acts.tensor()` concatenates everything in memory.
    """

    def __init__(self, shards: list[Tensor]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.shape = torch.Size((int(self.offsets[-1]), *shards[0].shape[1:]))
        self.dtype = shards[0].dtype

    def __repr__(self) -> str:
        return f"ShardedActivations({tuple(self.shape)}, {self.dtype}, {len(self.shards)} shards)"

    def tensor(self) -> Tensor:
        return torch.cat(self.shards)

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, tuple):
            if not idx or idx[0] is Ellipsis:
                return self[:][idx]
            head = self[idx[0]]  # then the rest indexes each token's axes
            return head[(slice(None),) * (head.ndim - len(self.shape) + 1) + idx[1:]]
        return super().__getitem__(idx)

    def _span(self, start: int, stop: int) -> Tensor:
        parts = [sh[max(start - o, 0):max(min(stop - o, len(sh)), 0)]
                 for sh, o in zip(self.shards, self.offsets)]
        parts = [p for p in parts if len(p)] or [self.shards[0][:0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, flat: Tensor) -> Tensor:
        which = self._shard_of(flat)
        out = torch.empty((len(flat), *self.shape[1:]), dtype=self.dtype)
        for s in which.unique().tolist():
            m = which == s
            out[m] = self.shards[s][flat[m] - int(self.offsets[s])]
        return out


def _is_int(idx) -> bool:
    """An int (not a bool), a numpy integer, or a 0-d integer tensor."""
    if isinstance(idx, Tensor):
        return idx.ndim == 0 and not idx.is_floating_point() and not idx.is_complex() \
            and idx.dtype != torch.bool
    return isinstance(idx, (int, np.integer)) and not isinstance(idx, bool)


class HarvestDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over harvested tokens: item i is {hook name: [*per-token shape]}."""

    def __init__(self, harvest: "Harvest", hook_names=None):
        names = [hook_names] if isinstance(hook_names, str) else hook_names or harvest.hook_names
        self.acts = {n: harvest.read(n) for n in names}

    def __len__(self) -> int:
        return len(next(iter(self.acts.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {n: a[i] for n, a in self.acts.items()}


class SparseFeatures(_TokenIndexed):
    """One SAE's feature activations over a harvest's tokens, [n_tokens, d_sae] stored sparsely
    (per shard, CSR rows of memory-mapped indices and values).

    `feats[i]` is token i's dense [d_sae] activations and `feats[a:b]` (or a list of token
    indices) dense [n, d_sae]; `feats.feature(f)` is feature f's activation at every token
    [n_tokens]; `feats.top(f)` its top activating tokens (values and token indices, at most
    the harvest's top_k); `feats.frequency` the fraction of tokens each feature fires on;
    `feats.context(t, before, after)` the (sequence, position) of a token and the token index
    window around it inside its sequence."""

    def __init__(self, name: str, info: dict, seq_len: int, shards: list[dict[str, Tensor]],
                 top_values: Tensor, top_tokens: Tensor, active: Tensor, total: Tensor):
        self.name, self.info, self.seq_len, self.shards = name, info, seq_len, shards
        self.d_sae, self.top_k = info["d_sae"], info["top_k"]
        self.offsets = np.cumsum([0] + [len(s["indptr"]) - 1 for s in shards])
        self.shape = torch.Size((int(self.offsets[-1]), self.d_sae))
        self.dtype = shards[0]["values"].dtype
        self._top, self._active, self._total = (top_values, top_tokens), active, total

    def __repr__(self) -> str:
        return (f"SparseFeatures({self.name!r}, {tuple(self.shape)}, {self.dtype}, "
                f"mean L0 {self.nnz / max(1, len(self)):.2f}, {len(self.shards)} shards)")

    @property
    def nnz(self) -> int:
        return sum(len(s["indices"]) for s in self.shards)

    @property
    def frequency(self) -> Float[Tensor, "d_sae"]:
        return self._active.double().div(len(self)).float()

    def stats(self) -> dict:
        """frequency (fraction of tokens fired on), mean (over every token) and mean_active
        (over the tokens it fired on) per feature [d_sae], as float32, and count (tokens)."""
        n, active = len(self), self._active.double()
        return dict(frequency=self.frequency, mean=(self._total / n).float(),
                    mean_active=(self._total / active.clamp(min=1)).float(), count=n)

    def _feature_index(self, f) -> int:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < self.d_sae:
            raise IndexError(f"feature {f!r} is not one of the {self.d_sae} features (an int in "
                             f"[0, {self.d_sae}))")
        return int(f)

    def _dense(self, s: int, rows: Tensor) -> Tensor:
        """Dense [len(rows), d_sae] activations of local rows `rows` of shard s."""
        sh = self.shards[s]
        starts, counts = sh["indptr"][rows], sh["indptr"][rows + 1] - sh["indptr"][rows]
        out = torch.zeros(len(rows), self.d_sae, dtype=self.dtype)
        row = torch.repeat_interleave(torch.arange(len(rows)), counts)
        at = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts) + torch.arange(len(row))
        out[row, sh["indices"][at].long()] = sh["values"][at]
        return out

    def _span(self, start: int, stop: int) -> Tensor:
        return self._gather(torch.arange(start, stop))

    def _gather(self, flat: Tensor) -> Tensor:
        out = torch.zeros(len(flat), self.d_sae, dtype=self.dtype)
        which = self._shard_of(flat)
        for s in which.unique().tolist():
            m = which == s
            out[m] = self._dense(s, flat[m] - int(self.offsets[s]))
        return out

    def feature(self, f: int) -> Float[Tensor, "n_tokens"]:
        """Feature f's activation at every token (zeros where it is not active), float32."""
        f = self._feature_index(f)
        out = torch.zeros(len(self))
        for sh, o in zip(self.shards, self.offsets.tolist()):
            at = (sh["indices"] == f).nonzero().reshape(-1)
            rows = torch.searchsorted(sh["indptr"], at, right=True) - 1
            out[rows + o] = sh["values"][at].float()
        return out

    def top(self, f: int, k: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Feature f's k (default top_k) largest activations [k'] and their token indices [k']
        (k' ≤ k where it fired on fewer tokens), largest first, the earlier token on ties."""
        f = self._feature_index(f)
        k = self.top_k if k is None else _positive_int("k", k)
        if k > self.top_k:
            raise ValueError(f"k={k}, but this harvest kept the top {self.top_k} tokens per "
                             "feature; harvest again with a larger top_k")
        v, t = self._top[0][f, :k], self._top[1][f, :k]
        keep = t >= 0
        return v[keep].clone(), t[keep].clone()

    def context(self, token: int, before: int, after: int) -> tuple[int, int, range]:
        """(sequence, position, token indices of the window) of a harvested token: `before`
        tokens before it and `after` after it, inside its own sequence."""
        seq, pos = divmod(int(token), self.seq_len)
        lo, hi = max(0, pos - before), min(self.seq_len, pos + after + 1)
        return seq, pos, range(seq * self.seq_len + lo, seq * self.seq_len + hi)


class Harvest:
    """A finished harvest on disk: the manifest, memory-mapped activations and statistics."""

    def __init__(self, out_dir: Path, manifest: dict):
        self.out_dir, self.manifest = out_dir, manifest
        self.hook_names = list(manifest["hooks"])
        self.feature_names = list(manifest.get("features") or {})
        self.n_tokens = sum(b - a for a, b in (s["tokens"] for s in manifest["shards"]))
        self._stats: Optional[dict] = None

    @classmethod
    def open(cls, out_dir) -> "Harvest":
        out_dir = Path(out_dir)
        if not (out_dir / MANIFEST).exists():
            raise FileNotFoundError(f"{out_dir} holds no {MANIFEST}; is it a harvest folder?")
        manifest = _read_manifest(out_dir / MANIFEST)
        if not manifest.get("complete"):
            raise ValueError(f"the harvest in {out_dir} is incomplete ({len(manifest['shards'])} of "
                             f"{manifest.get('n_shards')} shards); run harvest again to finish it")
        for shard in manifest["shards"]:
            if (problem := _shard_problem(out_dir, shard, manifest)) is not None:
                raise ValueError(f"damaged harvest: {problem}; run harvest again with the same "
                                 "arguments to compute the shard again")
        return cls(out_dir, manifest)

    def __repr__(self) -> str:
        feats = f", features={self.feature_names}" if self.feature_names else ""
        return f"Harvest({str(self.out_dir)!r}, {self.n_tokens} tokens, hooks={self.hook_names}{feats})"

    def _name(self, hook_name: str, features: bool = False) -> str:
        held = self.feature_names if features else self.hook_names
        if hook_name not in held:
            if hook_name in (self.hook_names if features else self.feature_names):
                raise KeyError(f"{hook_name!r} holds " + (
                    "dense activations: read them with harvest.read(name)" if features else
                    "SAE features, stored sparsely: read them with harvest.features(name)"))
            import difflib
            near = difflib.get_close_matches(hook_name, held, n=3, cutoff=0.5)
            what = "SAE features" if features else "hooks"
            raise KeyError(f"{hook_name!r} was not harvested; this harvest holds {what} {held}"
                           + (f" (nearest: {near})" if near else ""))
        return hook_name

    def _stat(self, key: str) -> Tensor:
        if self._stats is None:
            self._stats = _mmap_tensors(self.out_dir / STATS)
        return self._stats[key]

    def features(self, name: Optional[str] = None) -> "SparseFeatures":
        """One SAE's harvested features (name: "{hook}.hook_sae_acts_post"; may be left out
        when the harvest holds one SAE), memory-mapped; see SparseFeatures."""
        if name is None and len(self.feature_names) == 1:
            name = self.feature_names[0]
        if name is None:
            raise KeyError(f"give the SAE features to read: this harvest holds {self.feature_names}")
        name = self._name(name, features=True)
        shards = [_mmap_tensors(self.out_dir / s["file"]) for s in self.manifest["shards"]]
        return SparseFeatures(name, self.manifest["features"][name], self.manifest["dataset"]["seq_len"],
                              [{part: sh[f"{name}:{part}"] for part in _SPARSE[:3]} for sh in shards],
                              self._stat(f"{name}:top_values"), self._stat(f"{name}:top_tokens"),
                              self._stat(f"{name}:active"), self._stat(f"{name}:sum"))

    def tokens(self) -> ShardedActivations:
        """The token ids [tokens] (int32) of a harvest that holds SAE features."""
        if not self.feature_names:
            raise KeyError("this harvest holds no token ids: they are written with SAE features "
                           "(harvest(..., saes=...)); the dataset gives them otherwise")
        return ShardedActivations([_mmap_tensors(self.out_dir / s["file"])["tokens"]
                                   for s in self.manifest["shards"]])

    def read(self, hook_name: str) -> ShardedActivations:
        """The [tokens, ...] activations of one hook, memory-mapped (see ShardedActivations)."""
        name = self._name(hook_name)
        return ShardedActivations([_mmap_tensors(self.out_dir / s["file"])[name]
                                   for s in self.manifest["shards"]])

    def stats(self, hook_name: str) -> dict:
        """mean and var (population) per element [*per-token shape], norm (mean L2 norm of a
        token's activation), as float32, and count (tokens), from float64 sums over every token.
        For [batch, pos, ...] sites, mean is what lens.ablation.mean_ablate(h, means=) takes."""
        if hook_name in self.feature_names:
            return self.features(hook_name).stats()
        name = self._name(hook_name)
        n = self._stat(f"{name}:count")
        mean = self._stat(f"{name}:sum") / n
        var = (self._stat(f"{name}:sumsq") / n - mean ** 2).clamp(min=0)
        return dict(mean=mean.float(), var=var.float(),
                    norm=(self._stat(f"{name}:norm_sum") / n).float(), count=int(n))

    def means(self, hook_names=None) -> dict[str, Tensor]:
        """{hook name: mean activation [*per-token shape]}, as mean_ablate(means=...) takes it."""
        return {n: self.stats(n)["mean"] for n in (hook_names or self.hook_names)}

    def dataset(self, hook_names=None) -> HarvestDataset:
        return HarvestDataset(self, hook_names)

    def loader(self, hook_names=None, batch_size: int = 1024, shuffle: bool = False, seed: int = 0):
        """Yield {hook name: [batch_size, ...]} batches over all tokens, in order or shuffled
        (a permutation from `seed`; pass a new seed per epoch). The last batch may be smaller."""
        acts = HarvestDataset(self, hook_names).acts
        n = self.n_tokens
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for s in range(0, n, batch_size):
            idx = slice(s, s + batch_size) if order is None else order[s:s + batch_size]
            yield {name: a[idx] for name, a in acts.items()}


# ---------------------------------------------------------------------- command line
def cli_main(argv=None) -> int:
    """`lens harvest MODEL DATA --hooks ... --out DIR`: harvest from the command line; bad input
    is one line on stderr and exit code 2 (see lens.cli.run_command)."""
    from lens.cli import run_command
    return run_command("lens harvest", _command, argv)


def _command(argv) -> int:
    p = argparse.ArgumentParser(prog="lens harvest", description=harvest.__doc__.split("\n")[0])
    p.add_argument("model", help="bundled model name or checkpoint path")
    p.add_argument("data", help="a .npy token file ([n_seq, seq_len] or 1-D) or a text file")
    p.add_argument("--hooks", nargs="+", default=[], help="hook names (space or comma separated)")
    p.add_argument("--sae", nargs="+", default=[], metavar="SAE",
                   help="SAEs whose features to write sparsely (bundled names or paths)")
    p.add_argument("--top-k", type=int, default=16, help="top activating tokens kept per feature")
    p.add_argument("--no-processing", action="store_true",
                   help="load the weights as stored (the default when every SAE was trained so)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds this job)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, help="window length for 1-D tokens and text (n_ctx)")
    p.add_argument("--shard-tokens", type=int, default=2**15)
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), help="storage dtype")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from lens.cli import checked_device
    from lens.dissect import load_model

    gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = checked_device(args.device) or gpu
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    hooks = [h for arg in args.hooks for h in arg.split(",") if h]
    if not hooks and not args.sae:
        raise ValueError("nothing to harvest: give --hooks, --sae or both")
    from lens.sae import SAE
    saes = [SAE.load(s, device=device) for s in args.sae] or None
    if args.no_processing or (saes and not any(s.processing for s in saes)):
        import lens  # the SAEs read the activations they were trained on: unprocessed ones
        model = lens.HookedGPT.from_pretrained_no_processing(args.model)
    else:
        model = load_model(args.model)
    model = model.to(device).eval()
    result = harvest(model, args.data, hooks, args.out, batch_size=args.batch_size,
                     dtype=args.dtype, shard_tokens=args.shard_tokens, seq_len=args.seq_len,
                     progress=not args.no_progress, saes=saes, top_k=args.top_k)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result)
    return 0
