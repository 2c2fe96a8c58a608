"""The model's shape: a small validated dataclass whose field names are the axis names used
everywhere else (`d_model`, `n_heads`, `d_head`, ...)."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

ACT_FNS = ("gelu", "gelu_new", "relu", "silu")
NORMALIZATIONS = ("LN", "LNPre", None)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass
class GPTConfig:
    """Shape and variant of a HookedGPT.

    normalization: "LN" (LayerNorm with weight and bias), "LNPre" (centre and scale only, what
    remains after the weights are folded into the next layer), or None (no normalization).
    attn_only: blocks have no MLP (the paper's attention-only transformers).
    d_head defaults to d_model // n_heads and d_mlp to 4 * d_model.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    d_head: Optional[int] = None
    d_mlp: Optional[int] = None
    act_fn: str = "gelu_new"
    normalization: Optional[str] = "LN"
    attn_only: bool = False
    eps: float = 1e-5
    dtype: Any = torch.float32
    positional_embedding: bool = True
    tokenizer_name: Optional[str] = "gpt2"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.dtype, str):
            if self.dtype.removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
            self.dtype = _DTYPES[self.dtype.removeprefix("torch.")]
        if self.d_head is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None and not self.attn_only:
            self.d_mlp = 4 * self.d_model
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        if self.d_head is None:
            problems.append(f"d_head is unset and d_model={self.d_model} is not divisible by "
                            f"n_heads={self.n_heads}; give d_head explicitly")
        elif not isinstance(self.d_head, int) or self.d_head < 1:
            problems.append(f"d_head={self.d_head!r} must be a positive int")
        if not self.attn_only and (not isinstance(self.d_mlp, int) or self.d_mlp < 1):
            problems.append(f"d_mlp={self.d_mlp!r} must be a positive int when attn_only=False")
        if self.act_fn not in ACT_FNS:
            problems.append(f"act_fn={self.act_fn!r} is not one of {ACT_FNS}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} is not one of {NORMALIZATIONS}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            problems.append(f"eps={self.eps!r} must be a positive float")
        if self.dtype not in _DTYPES.values():
            problems.append(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = self.dtype_name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
