"""The model as a spec: a small validated dataclass of build-time choices. Its shape fields are
the axis names used everywhere else (`d_model`, `n_heads`, `d_head`, ...); its other fields
decide which parts are built. The forward pass never reads a family name."""

import dataclasses
import math
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

ACT_FNS = ("gelu", "gelu_new", "relu", "silu")
NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)
QK_NORMS = (None, "head", "proj")
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _type_ok(value, annotation) -> bool:
    """Whether `value` has a field's annotated type: an int is no bool, a float any finite
    real number, Optional[X] also None, Any anything."""
    if annotation is Any:
        return True
    if typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(annotation) or annotation)


def _type_problems(values: dict) -> list[str]:
    """Every GPTConfig field in `values` whose value is not of the field's annotated type."""
    problems = []
    for f in dataclasses.fields(GPTConfig):
        value = values.get(f.name)
        if f.name in values and not _type_ok(value, f.type):
            kinds = typing.get_args(f.type) if typing.get_origin(f.type) is typing.Union else (f.type,)
            kind = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
            problems.append(f"{f.name}={shown} must be {kind}")
    return problems


def _scaling_problems(name: str, scaling) -> list[str]:
    if scaling is None:
        return []
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        return [f"{name}={scaling!r}: type must be one of {sorted(ROPE_SCALINGS)}"]
    missing = [k for k in ROPE_SCALINGS[kind] if k not in scaling]
    extra = sorted(set(scaling) - {"type", *ROPE_SCALINGS[kind]})
    if missing or extra:
        return [f"{name} of type {kind!r} needs exactly {list(ROPE_SCALINGS[kind])}; "
                f"missing {missing}, unknown {extra}"]
    return []


@dataclass
class GPTConfig:
    """Shape and build-time choices of a HookedGPT. The defaults describe GPT-2.

    Shape: n_layers, d_model, n_heads, d_head (default d_model // n_heads), n_kv_heads (keys and
    values shared by groups of query heads; default n_heads), d_mlp (default 4 * d_model),
    d_vocab, n_ctx.

    Norm (before each sublayer and at the end): normalization "LN" (LayerNorm with weight and
    bias), "RMS" (RMSNorm with weight), their weightless forms "LNPre" / "RMSPre" (what folding
    the weights into the next layer leaves), or None. eps is the norms' epsilon; norm_offset is
    added to every norm weight (Gemma's 1 + w, applied in float32 as HF does).
    Embedding: token embeddings are multiplied by embed_scale (Gemma's √d_model).
    Positions: positional_embedding (a learned W_pos added to the stream) or rotary_dim > 0
    (rotary embeddings on the first rotary_dim dims of each query and key head, frequencies
    rotary_base^(-2i/rotary_dim), rope_scaling {"type": "linear" | "llama3", ...}), or neither.
    local_rotary_base, when set, is the base of the windowed layers' rotary embeddings, which
    then take local_rope_scaling instead of rope_scaling (Gemma-3: 10k on local layers, 1M and
    linear scaling on global ones).
    Attention: attn_bias (b_Q, b_K, b_V), attn_out_bias (b_O), qk_norm "head" (an RMSNorm over
    each head's query and key, before rotary; attn.q_norm / k_norm) or "proj" (over all heads'
    queries, and all keys, at once, as OLMo-2; attn.q_ln / k_ln), window (keys more than window - 1 positions back
    are masked) on windowed_layers (default every layer), attn_scale (what scores are divided
    by, as TransformerLens's attn_scale; default √d_head), attn_softcap (scores become c·tanh(scores / c), which needs the
    materialised pattern instead of SDPA).
    Logits: final_softcap (logits become c·tanh(logits / c)).
    MLP: none when attn_only, else act(x W_in + b_in) W_out + b_out, or gated_mlp:
    (act(x W_gate) * (x W_in)) W_out; mlp_bias says whether b_in, b_out exist.
    Block: parallel_attn_mlp (attention and MLP both read the block's input, as in GPT-NeoX);
    post_norms (a norm with its own weight after the attention and after the MLP, before each
    is added to the stream, as in Gemma-2; never folded); pre_norms=False builds no ln1 / ln2
    (OLMo-2: the sublayers read the stream itself and only their outputs are normalised).
    Unembedding: tied_embeddings (W_U is W_Eᵀ, one tensor), unembed_bias (b_U; checkpoints
    without one load without it, and processing adds it when folding a norm's bias needs it;
    model.b_U reads as zeros where there is none).
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
    n_kv_heads: Optional[int] = None
    rotary_dim: int = 0
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    local_rotary_base: Optional[float] = None
    local_rope_scaling: Optional[dict] = None
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    qk_norm: Optional[str] = None
    window: Optional[int] = None
    windowed_layers: Optional[tuple] = None
    tied_embeddings: bool = False
    unembed_bias: bool = True
    norm_offset: float = 0.0
    embed_scale: float = 1.0
    attn_scale: Optional[float] = None
    post_norms: bool = False
    pre_norms: bool = True
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.dtype, str):
            if self.dtype.removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
            self.dtype = _DTYPES[self.dtype.removeprefix("torch.")]
        if isinstance(self.windowed_layers, list):  # JSON has no tuples
            self.windowed_layers = tuple(self.windowed_layers)
        problems = _type_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:  # before anything below computes with a value of the wrong type
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))
        if self.d_head is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None and not self.attn_only:
            self.d_mlp = 4 * self.d_model
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.attn_scale is None and isinstance(self.d_head, int) and self.d_head > 0:
            self.attn_scale = math.sqrt(self.d_head)  # TransformerLens's default, stated
        self._model = None  # the model built on this config (see HookedGPT), for cfg.device
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx", "n_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        if self.d_head is None:
            problems.append(f"d_head is unset and d_model={self.d_model} is not divisible by "
                            f"n_heads={self.n_heads}; give d_head explicitly")
        elif not isinstance(self.d_head, int) or self.d_head < 1:
            problems.append(f"d_head={self.d_head!r} must be a positive int")
        if isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if not self.attn_only and (not isinstance(self.d_mlp, int) or self.d_mlp < 1):
            problems.append(f"d_mlp={self.d_mlp!r} must be a positive int when attn_only=False")
        if self.act_fn not in ACT_FNS:
            problems.append(f"act_fn={self.act_fn!r} is not one of {ACT_FNS}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                problems.append(f"{name}={v!r} must be a positive number or None")
        for name in ("norm_offset", "embed_scale"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                problems.append(f"{name}={getattr(self, name)!r} must be a number")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            problems.append(f"eps={self.eps!r} must be a positive float")
        if self.dtype not in _DTYPES.values():
            problems.append(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
        problems += self._position_problems()
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            problems.append(f"window={self.window!r} must be a positive int or None")
        if self.windowed_layers is not None and not all(
                isinstance(l, int) and 0 <= l < self.n_layers for l in self.windowed_layers):
            problems.append(f"windowed_layers={self.windowed_layers!r} must list layers in "
                            f"[0, n_layers={self.n_layers})")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    def _position_problems(self) -> list[str]:
        problems = []
        if not isinstance(self.rotary_dim, int) or self.rotary_dim < 0 or self.rotary_dim % 2:
            return [f"rotary_dim={self.rotary_dim!r} must be an even int >= 0"]
        if self.rotary_dim and isinstance(self.d_head, int) and self.rotary_dim > self.d_head:
            problems.append(f"rotary_dim={self.rotary_dim} exceeds d_head={self.d_head}")
        if self.rotary_dim and self.positional_embedding:
            problems.append("rotary_dim > 0 and positional_embedding=True: a model has learned "
                            "or rotary positions, not both")
        for name in ("rope_scaling", "local_rope_scaling"):
            problems += _scaling_problems(name, getattr(self, name))
        base = self.local_rotary_base
        if base is not None:
            if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
                problems.append(f"local_rotary_base={base!r} must be a positive number or None")
            if not self.rotary_dim or self.window is None:
                problems.append("local_rotary_base is the rotary base of windowed layers: it needs "
                                "rotary_dim > 0 and a window")
        elif self.local_rope_scaling is not None:
            problems.append("local_rope_scaling needs local_rotary_base (the windowed layers' own "
                            "rotary base)")
        return problems

    def rope_of(self, layer: int) -> tuple[float, Optional[dict]]:
        """(rotary base, rope scaling) of `layer`'s attention."""
        if self.local_rotary_base is not None and self.window_of(layer) is not None:
            return float(self.local_rotary_base), self.local_rope_scaling
        return float(self.rotary_base), self.rope_scaling

    # ------------------------------------------------------------------ TransformerLens's names
    # Read-only views under the names TransformerLens's HookedTransformerConfig uses, so that
    # scripts reading model.cfg.<field> get what they mean there.
    @property
    def device(self) -> torch.device:
        """The device of the model built on this config (its embedding's), else cpu."""
        model = self._model() if self._model is not None else None
        return model.W_E.device if model is not None else torch.device("cpu")

    @property
    def normalization_type(self) -> Optional[str]:
        return self.normalization

    @property
    def positional_embedding_type(self) -> str:
        """"standard" (learned W_pos), "rotary", or "none" (a lens model with neither)."""
        return "standard" if self.positional_embedding else "rotary" if self.rotary_dim else "none"

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_key_value_heads(self) -> Optional[int]:
        """Key/value heads under grouped-query attention, None otherwise (TransformerLens's
        convention)."""
        return self.n_kv_heads if self.n_kv_heads != self.n_heads else None

    @property
    def use_local_attn(self) -> bool:
        return self.window is not None

    @property
    def window_size(self) -> Optional[int]:
        return self.window

    @property
    def tie_word_embeddings(self) -> bool:
        return self.tied_embeddings

    @property
    def use_normalization_before_and_after(self) -> bool:
        return self.post_norms

    @property
    def attn_scores_soft_cap(self) -> float:
        return -1.0 if self.attn_softcap is None else float(self.attn_softcap)

    @property
    def output_logits_soft_cap(self) -> float:
        return -1.0 if self.final_softcap is None else float(self.final_softcap)

    @property
    def use_qk_norm(self) -> bool:
        return self.qk_norm is not None

    @property
    def use_attn_scale(self) -> bool:
        return True

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("name", "custom"))

    @property
    def original_architecture(self) -> Optional[str]:
        return self.metadata.get("architecture")

    @property
    def n_params(self) -> int:
        """Weights in the attention and MLP matrices, as TransformerLens counts them."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 0 if self.attn_only else self.d_model * self.d_mlp * (3 if self.gated_mlp else 2)
        return self.n_layers * (attn + mlp)

    def _runtime(self, name: str, default):
        model = self._model() if self._model is not None else None
        return getattr(model, name, default) if model is not None else default

    @property
    def default_prepend_bos(self) -> bool:
        return self._runtime("default_prepend_bos", True)

    @property
    def tokenizer_prepends_bos(self) -> Optional[bool]:
        tok = self._runtime("tokenizer", None)
        return getattr(tok, "tokenizer_prepends_bos", None) if tok is not None else None

    @property
    def default_padding_side(self) -> str:
        return self._runtime("default_padding_side", "right")

    use_attn_result = property(lambda self: self._runtime("_use_attn_result", False),
                               doc="Whether run_with_cache() with no filter caches hook_result.")
    use_split_qkv_input = property(lambda self: self._runtime("_use_split_qkv_input", False),
                                   doc="Whether run_with_cache() with no filter caches hook_q/k/v_input.")
    use_attn_in = property(lambda self: self._runtime("_use_attn_in", False),
                           doc="Whether run_with_cache() with no filter caches hook_attn_in.")
    use_hook_mlp_in = property(lambda self: self._runtime("_use_hook_mlp_in", False),
                               doc="Whether run_with_cache() with no filter caches hook_mlp_in.")

    # ------------------------------------------------------------------ derived facts
    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def norm_kind(self) -> Optional[str]:
        """"LN", "RMS" or None: what the norms compute, whether or not they keep weights."""
        return None if self.normalization is None else self.normalization.removesuffix("Pre")

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only

    @property
    def has_resid_mid(self) -> bool:
        return not self.attn_only and not self.parallel_attn_mlp

    def window_of(self, layer: int) -> Optional[int]:
        """The sliding window of `layer`'s attention, or None for full causal attention."""
        if self.window is None or (self.windowed_layers is not None and layer not in self.windowed_layers):
            return None
        return self.window

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = self.dtype_name
        if d["windowed_layers"] is not None:
            d["windowed_layers"] = list(d["windowed_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a GPTConfig is read from a dict (a JSON object) of its fields, not "
                             f"a {type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; valid fields are {sorted(known)}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"GPTConfig fields {missing} are missing")
        if isinstance(d.get("windowed_layers"), list):  # JSON has no tuples
            d = {**d, "windowed_layers": tuple(d["windowed_layers"])}
        problems = _type_problems(d)
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
