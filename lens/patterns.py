"""Attention patterns computed when read. Caching `hook_pattern` stores batch × heads × pos²
numbers per layer; a LazyPattern stores what the pattern is a function of (the queries and keys
after rotary and QK-norm, the mask, the scale and the soft-cap), O(pos · d_head) per layer, and
computes the rows asked for on access, in chunks. The forward pass stays on the fused kernel.

    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"),
                                    lazy_patterns=True)
    cache["pattern", 3][:, 5, -1]          # [batch, key_pos]: head 5's last query row
    cache.pattern(3, head=5, query=-1)     # the same
    cache["pattern", 3].tensor()           # every row (batch × heads × pos², as materialised)
"""

from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lens.components import _causal, attention_scores, per_query_head, softmax_rows

Index = Union[int, slice, list, Tensor, type(Ellipsis), None]



class LazyPattern:
    """One layer's attention pattern [batch, n_heads, query_pos, key_pos] (without the batch
    axis when cached with remove_batch_dim), computed from its queries and keys when indexed.

    Indexing the batch, head and query axes (ints, slices, lists or tensors of ints, `...`)
    computes only those rows, chunk by chunk; the key axis is indexed afterwards. Any other use
    (torch functions, arithmetic, `.sum()`, `.shape` is free) computes the whole pattern first,
    exactly as a materialised cache holds it.
    """

    def __init__(self, q: Float[Tensor, "batch query_pos n_heads d_head"],
                 k: Float[Tensor, "batch key_pos n_kv_heads d_head"], mask: Optional[Tensor],
                 scale: float, softcap: Optional[float], query_rows: Optional[Tensor] = None,
                 n_call_queries: Optional[int] = None, has_batch_dim: bool = True,
                 chunk_bytes: int = 2 ** 28):
        """q holds the queries of the cached rows only: row i is query `query_rows[i]` of the
        call's `n_call_queries` (all of them, in order, by default); mask is the call's
        [batch or 1, 1, n_call_queries, key_pos] boolean mask, or None for causal attention."""
        if mask is not None and mask.ndim == 2:  # [query_pos, key_pos], the same for every row
            mask = mask[None, None]
        self.q, self.k, self.mask = q, k, mask
        self.scale, self.softcap = scale, softcap
        self.query_rows = torch.arange(q.shape[1], device=q.device) if query_rows is None else query_rows
        self.n_call_queries = q.shape[1] if n_call_queries is None else n_call_queries
        self.has_batch_dim = has_batch_dim
        self.chunk_bytes = chunk_bytes
        self._shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])

    def _like(self, **changes) -> "LazyPattern":
        kw = dict(q=self.q, k=self.k, mask=self.mask, scale=self.scale, softcap=self.softcap,
                  query_rows=self.query_rows, n_call_queries=self.n_call_queries,
                  has_batch_dim=self.has_batch_dim, chunk_bytes=self.chunk_bytes)
        return LazyPattern(**{**kw, **changes})

    def batch_rows(self, index) -> "LazyPattern":
        """The pattern of some batch rows, still lazy (an int drops the batch axis)."""
        if not self.has_batch_dim:
            raise IndexError("this pattern has no batch axis")
        b = self._as_index(index, self._shape[0])
        mask = self.mask if self.mask is None or self.mask.shape[0] == 1 else self.mask.index_select(0, b)
        return self._like(q=self.q.index_select(0, b), k=self.k.index_select(0, b), mask=mask,
                          has_batch_dim=not isinstance(index, int))

    # ---------------------------------------------------------------- tensor-like facts
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape if self.has_batch_dim else self._shape[1:])

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyPattern(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @property
    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k))

    # ---------------------------------------------------------------- computing rows
    def _rows(self, b: Tensor, h: Tensor, rows: Tensor) -> Float[Tensor, "b h q key_pos"]:
        """The pattern of batch rows b, heads h and (cached) query rows `rows`."""
        q = self.q.index_select(0, b).index_select(2, h).index_select(1, rows)
        groups = self.q.shape[2] // self.k.shape[2]
        k = per_query_head(self.k.index_select(0, b), groups, 2).index_select(2, h)
        scores = attention_scores(q, k, self.scale, self.softcap)
        absolute = self.query_rows.index_select(0, rows)  # query rows within the call
        if self.mask is not None:
            m = self.mask if self.mask.shape[0] == 1 else self.mask.index_select(0, b)
            allowed = m.index_select(2, absolute)  # [b or 1, 1, q, k]
        else:
            allowed = _causal(self.n_call_queries, self.k.shape[1], q.device).index_select(0, absolute)
        return softmax_rows(scores.masked_fill(~allowed, float("-inf")), self.q.dtype)

    def rows(self, batch=None, head=None, query=None) -> Float[Tensor, "b h q key_pos"]:
        """The pattern at the given batch rows, heads and query positions (each None for all,
        an int, a slice, or a list / tensor of ints), every axis kept, computed in chunks of
        query rows."""
        b, h, r = (self._as_index(i, n) for i, n in zip((batch, head, query), self._shape[:3]))
        per_row = max(1, len(b) * len(h) * self._shape[3] * 4 * 3)  # scores, mask, softmax
        step = max(1, self.chunk_bytes // per_row)
        if not (len(b) and len(h) and len(r)):
            return self.q.new_zeros(len(b), len(h), len(r), self._shape[3])
        parts = [self._rows(b, h, r[i:i + step]) for i in range(0, len(r), step)]
        return torch.cat(parts, 2) if len(parts) != 1 else parts[0]

    def _as_index(self, i, n: int) -> Tensor:
        dev = self.q.device
        if i is None:
            return torch.arange(n, device=dev)
        if isinstance(i, slice):
            return torch.arange(n, device=dev)[i]
        if isinstance(i, bool) or isinstance(i, float):
            raise TypeError(f"a pattern index must be an int, a slice or ints, got {i!r}")
        t = torch.as_tensor(i, device=dev)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"a pattern index must be ints, got {t.dtype}")
        t = t.reshape(-1).long()
        if t.numel() and (t.min() < -n or t.max() >= n):
            raise IndexError(f"index {i!r} is out of range for an axis of {n}")
        return t % n

    def tensor(self) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
        """The whole pattern, as a materialised cache holds it."""
        full = self.rows()
        return full if self.has_batch_dim else full[0]

    materialise = tensor

    def __getitem__(self, index) -> Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if any(i is None for i in index):
            return self.tensor()[index]
        if sum(i is Ellipsis for i in index) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in [i for i in index if not isinstance(i, Tensor)]:
            at = next(j for j, i in enumerate(index) if i is Ellipsis)
            index = index[:at] + (slice(None),) * (self.ndim - len(index) + 1) + index[at + 1:]
        if len(index) > self.ndim:
            raise IndexError(f"too many indices for a pattern of {self.ndim} axes: {index!r}")
        index = index + (slice(None),) * (self.ndim - len(index))
        if not self.has_batch_dim:
            index = (0,) + index
        lead, key = index[:3], index[3]
        advanced = [not isinstance(i, (int, slice)) for i in lead]
        if sum(advanced) > 1:  # torch pairs several index lists; compute those rows in full
            return self.tensor()[index if self.has_batch_dim else index[1:]]
        out = self.rows(*lead)
        out = out[:, :, :, key] if not isinstance(key, int) else out[:, :, :, key]
        # drop the int axes, as indexing a tensor does (last first, so positions hold)
        for axis in reversed([a for a, i in enumerate(lead) if isinstance(i, int)]):
            out = out.squeeze(axis)
        return out

    # ---------------------------------------------------------------- everything else
    def __torch_function__(self, func, types, args=(), kwargs=None):
        def real(x):
            if isinstance(x, LazyPattern):
                return x.tensor()
            if isinstance(x, (list, tuple)):
                return type(x)(real(y) for y in x)
            return x
        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("q", "k", "mask"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    def __array__(self, dtype=None):
        a = self.tensor().detach().cpu().numpy()
        return a if dtype is None else a.astype(dtype)

    def to(self, *args, **kwargs) -> "LazyPattern":
        """The same pattern with its queries, keys and mask moved (dtype changes compute it)."""
        probe = torch.empty(0, dtype=self.q.dtype, device=self.q.device).to(*args, **kwargs)
        if probe.dtype != self.q.dtype:
            return self.tensor().to(*args, **kwargs)
        move = lambda t: None if t is None else t.to(probe.device)
        return self._like(q=move(self.q), k=move(self.k), mask=move(self.mask),
                          query_rows=move(self.query_rows))

    def cpu(self) -> "LazyPattern":
        return self.to("cpu")


def _binary(name):
    def op(self, other):
        return getattr(self.tensor(), name)(other.tensor() if isinstance(other, LazyPattern) else other)
    op.__name__ = name
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__pow__", "__matmul__", "__rmatmul__", "__eq__", "__ne__", "__lt__",
              "__le__", "__gt__", "__ge__"):
    setattr(LazyPattern, _name, _binary(_name))
LazyPattern.__neg__ = lambda self: -self.tensor()
LazyPattern.__hash__ = object.__hash__
