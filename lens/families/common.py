"""What every family file uses: the Family record, weight plans and their converters, and the
readers of config.json fields that several families share (rotary, sliding windows), written
for both layouts on the hub: transformers 5 (`rope_parameters`, `layer_types`) and 4
(top-level `rope_theta` / `rope_scaling`, Pythia's `rotary_pct` / `rotary_emb_base`)."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import einops
from torch import Tensor

from lens.config import GPTConfig
from lens.io import brief

Converter = Callable[[Tensor], dict[str, Tensor]]

# config.json fields that describe no computation (metadata, training-only settings, ids)
HARMLESS = {
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "chunk_size_feed_forward",
    "dtype", "torch_dtype", "eos_token_id", "pad_token_id", "id2label", "label2id",
    "initializer_range", "is_encoder_decoder", "is_decoder", "model_type", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "transformers_version", "use_cache",
    "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "hidden_dropout",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
    "tie_encoder_decoder", "pretraining_tp", "task_specific_params", "max_length", "min_length",
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "prefix", "sep_token_id", "decoder_start_token_id", "finetuning_task",
    "tokenizer_class", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "cross_attention_hidden_size", "add_cross_attention", "early_stopping", "diversity_penalty",
    "num_beam_groups", "typical_p", "encoder_no_repeat_ngram_size", "begin_suppress_tokens",
    "suppress_tokens", "exponential_decay_length_penalty", "chunk_size", "output_router_logits",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "layer_norm_eps_for_classifier", "max_window_layers",
}


# ---------------------------------------------------------------------- the values lens reads
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS: dict[str, Callable[[object], bool]] = {
    "a positive int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "an int >= 0": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "a positive number": lambda v: _number(v) and v > 0,
    "a number in [0, 1]": lambda v: _number(v) and 0 <= v <= 1,
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "an object": lambda v: isinstance(v, dict),
}
# every config.json field a family reads: (what it must be, whether null is allowed); the
# fields of rope_scaling / rope_parameters (and of a rope_parameters per layer type) too
FIELDS: dict[str, tuple[str, bool]] = {
    **{k: ("a positive int", False) for k in (
        "n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_ctx", "hidden_size",
        "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
        "original_max_position_embeddings", "sliding_window_pattern", "_sliding_window_pattern")},
    **{k: ("a positive int", True) for k in (
        "n_inner", "intermediate_size", "num_key_value_heads", "head_dim")},
    **{k: ("an int >= 0", True) for k in ("sliding_window", "max_window_layers")},
    **{k: ("a positive number", False) for k in (
        "layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps", "rope_theta", "rotary_emb_base",
        "factor", "low_freq_factor", "high_freq_factor", "query_pre_attn_scalar")},
    **{k: ("a positive number", True) for k in (
        "rope_local_base_freq", "attn_logit_softcapping", "final_logit_softcapping")},
    **{k: ("a number in [0, 1]", False) for k in ("rotary_pct", "partial_rotary_factor")},
    **{k: ("true or false", False) for k in (
        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_parallel_residual",
        "use_sliding_window", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "add_cross_attention", "reorder_and_upcast_attn")},
    **{k: ("a string", False) for k in ("model_type", "activation_function", "rope_type", "type")},
    **{k: ("a string", True) for k in ("hidden_act", "hidden_activation")},
    "layer_types": ("a list of strings", True),
    **{k: ("an object", True) for k in ("rope_scaling", "rope_parameters")},
}
_NESTED = ("rope_scaling", "rope_parameters")  # objects whose fields are checked as well


def field_problems(d: dict, prefix: str = "") -> list[str]:
    """Every field of an HF config dict that lens reads and that is not what FIELDS says it
    must be, as "name=value must be ..."; fields lens does not read are left to refuse_unknown."""
    problems = []
    for key, value in d.items():
        if key in FIELDS:
            kind, nullable = FIELDS[key]
            if not (value is None and nullable or _KINDS[kind](value)):
                problems.append(f"{prefix}{key}={brief(value)} must be {kind}{' or null' * nullable}")
                continue
        if isinstance(value, dict) and (key in _NESTED or prefix.startswith("rope_parameters")):
            problems += field_problems(value, f"{prefix}{key}.")
    return problems


@dataclass
class Plan:
    """How a checkpoint's tensors become lens weights. tensors: HF name → (shape, converter
    returning {lens name: tensor}); ignored: HF names that are not weights (buffers) or that
    repeat another tensor (a tied lm_head); strip: a prefix that names may carry or lack."""

    tensors: dict[str, tuple[tuple, Converter]]
    ignored: set = field(default_factory=set)
    strip: str = ""


@dataclass(frozen=True)
class Family:
    """A checkpoint family: its HF model_type, what checkpoints it covers, config.json → spec,
    spec → weight plan, and the config.json fields it cannot do without."""

    model_type: str
    examples: str
    config: Callable[[dict], GPTConfig]
    plan: Callable[[GPTConfig], Plan]
    required: tuple[str, ...] = ()


# ---------------------------------------------------------------------- converters
def to(name: str, pattern: Optional[str] = None, **axes) -> Converter:
    """The tensor as lens weight `name`, rearranged by an einops `pattern` when given."""
    if pattern is None:
        return lambda t: {name: t}
    return lambda t: {name: einops.rearrange(t, pattern, **axes)}


def transposed(name: str) -> Converter:
    """An nn.Linear weight [out, in] as the right-multiplying [in, out]."""
    return lambda t: {name: t.T}


def split(pattern: str, names: tuple[str, ...], **axes) -> Converter:
    """A fused tensor split by an einops pattern whose first axis enumerates `names`."""
    return lambda t: dict(zip(names, einops.rearrange(t, pattern, **axes)))


def chunks(sizes: tuple[int, ...], converters: tuple[Converter, ...]) -> Converter:
    """A tensor fused along its first axis (e.g. [q; k; v] rows) converted piece by piece."""
    def convert(t: Tensor) -> dict[str, Tensor]:
        out = {}
        for piece, c in zip(t.split(list(sizes)), converters):
            out.update(c(piece))
        return out
    return convert


def attention_plan(hf: str, lens: str, cfg: GPTConfig, names=("q_proj", "k_proj", "v_proj", "o_proj"),
                   bias: bool = False, out_bias: bool = False) -> dict:
    """nn.Linear q/k/v/o projections (Llama's layout) → per-head W_Q, W_K, W_V, W_O."""
    H, KV, D, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    plan = {}
    for x, proj, heads in zip("QKV", names[:3], (H, KV, KV)):
        plan[f"{hf}.{proj}.weight"] = ((heads * E, D), to(f"{lens}.W_{x}", "(h e) d -> h d e", h=heads))
        if bias:
            plan[f"{hf}.{proj}.bias"] = ((heads * E,), to(f"{lens}.b_{x}", "(h e) -> h e", h=heads))
    plan[f"{hf}.{names[3]}.weight"] = ((D, H * E), to(f"{lens}.W_O", "d (h e) -> h e d", h=H))
    if out_bias:
        plan[f"{hf}.{names[3]}.bias"] = ((D,), to(f"{lens}.b_O"))
    return plan


def lm_head(cfg: GPTConfig, tensors: dict, ignored: set, key: str = "lm_head.weight") -> None:
    """The unembedding [d_vocab, d_model] as W_U, or, with tied embeddings, ignored (W_U is W_Eᵀ;
    some checkpoints store the tied copy anyway)."""
    if cfg.tied_embeddings:
        ignored.add(key)
    else:
        tensors[key] = ((cfg.d_vocab, cfg.d_model), transposed("unembed.W_U"))


# ---------------------------------------------------------------------- refusing what lens lacks
class Problems:
    """HF options lens does not implement, collected so that one error names all of them."""

    def __init__(self, family: str):
        self.family, self.items = family, []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.items.append(what)

    def raise_any(self) -> None:
        if self.items:
            raise ValueError(f"this {self.family} checkpoint uses options lens does not implement: "
                             + "; ".join(self.items))


def refuse_unknown(d: dict, consumed: set, problems: Problems) -> None:
    """Fields neither read by the family nor known to be harmless, at a value that is not
    empty/false, are refused by name: lens never ignores an option it does not know."""
    for key in sorted(set(d) - consumed - HARMLESS):
        value = d[key]
        if value not in (None, False, 0, "", [], {}):
            problems.check(False, f"{key}={value!r} (a field lens does not read)")


def rope(d: dict, head_dim: int, problems: Problems, local: bool = False) -> dict:
    """GPTConfig's rotary fields from either config.json layout. A `rope_parameters` per layer
    type (transformers 5's Gemma-3) is read where `local` says windowed layers may have rotary
    embeddings of their own (local_rotary_base / local_rope_scaling); elsewhere it is refused."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        known = {"full_attention", "sliding_attention"}
        ok = local and set(params) <= known and all(isinstance(v, dict) for v in params.values())
        problems.check(ok, f"rope_parameters per layer type {sorted(params)}"
                           + (f" (lens reads {sorted(known)})" if local else ""))
        if not ok:
            return dict(rotary_dim=head_dim, rotary_base=10000.0, rope_scaling=None)
        out = _rope_fields(params.get("full_attention", {}), d, head_dim, problems,
                           "rope_parameters['full_attention']")
        sliding = _rope_fields(params.get("sliding_attention", {}), d, head_dim, problems,
                               "rope_parameters['sliding_attention']")
        problems.check(sliding["rotary_dim"] == out["rotary_dim"],
                       "rope_parameters with a partial_rotary_factor per layer type")
        return {**out, "local_rotary_base": sliding["rotary_base"],
                "local_rope_scaling": sliding["rope_scaling"]}
    if isinstance(params, dict):
        return _rope_fields(params, d, head_dim, problems, "rope_parameters")
    theta = d.get("rope_theta", d.get("rotary_emb_base", 10000.0))
    scaling = {**(d.get("rope_scaling") or {}), "rope_theta": theta}
    if "partial_rotary_factor" not in d and "rotary_pct" in d:
        scaling["partial_rotary_factor"] = d["rotary_pct"]
    out = _rope_fields(scaling, d, head_dim, problems, "rope_scaling")
    if local and d.get("rope_local_base_freq") is not None:  # transformers 4's Gemma-3
        out.update(local_rotary_base=float(d["rope_local_base_freq"]), local_rope_scaling=None)
    return out


def _rope_fields(scaling: dict, d: dict, head_dim: int, problems: Problems, field_name: str) -> dict:
    """rotary_dim / rotary_base / rope_scaling from one set of rope parameters (HF's rope_type
    names, the theta and the partial rotary factor in it or at the top of config.json)."""
    theta = scaling.get("rope_theta", d.get("rope_theta", 10000.0))
    fraction = scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = dict(rotary_dim=int(head_dim * fraction), rotary_base=float(theta), rope_scaling=None)
    if kind == "linear":
        out["rope_scaling"] = {"type": "linear", "factor": float(scaling["factor"])}
    elif kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        problems.check(not missing, f"{field_name} of type 'llama3' lacks {missing}")
        if not missing:
            out["rope_scaling"] = {"type": "llama3", **{k: scaling[k] for k in keys}}
    else:
        problems.check(kind == "default", f"{field_name} type {kind!r} (lens implements "
                                          "'default', 'linear' and 'llama3')")
    if kind in ("default", "linear"):
        extra = sorted(set(scaling) - {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor"})
        problems.check(not extra, f"{field_name} fields {extra}")
    return out


def windows(d: dict, n_layers: int, problems: Problems, rule: str) -> dict:
    """GPTConfig's window fields: from `layer_types` (transformers 5), else from
    `sliding_window` on every layer (rule "all": Mistral and Phi-3), on every other layer from
    layer 0 (rule "alternate": Gemma-2), on layers >=
    max_window_layers when use_sliding_window is set (rule "qwen": Qwen's transformers 4
    configs), on all but every sliding_window_pattern-th layer (rule "pattern": Gemma-3's
    transformers 4 configs, default 6), or nowhere (rule "none": a window there is refused)."""
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if types is not None:
        known = ("full_attention", "sliding_attention")
        bad = sorted({t for t in types if t not in known})
        problems.check(not bad, f"layer_types {bad} (lens implements {list(known)})")
        problems.check(len(types) == n_layers, f"layer_types has {len(types)} entries for "
                                               f"{n_layers} layers")
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif rule == "all":
        layers = list(range(n_layers)) if window else []
    elif rule == "alternate":  # Gemma-2's transformers 4 configs: even layers are local
        layers = [i for i in range(n_layers) if i % 2 == 0] if window else []
    elif rule == "pattern":
        every = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
        problems.check(isinstance(every, int) and every > 0, f"sliding_window_pattern={every!r}")
        every = every if isinstance(every, int) and every > 0 else 1
        layers = [i for i in range(n_layers) if (i + 1) % every] if window else []
    elif rule == "qwen":
        start = d.get("max_window_layers", 0) or 0
        layers = [i for i in range(n_layers) if i >= start] if d.get("use_sliding_window") else []
    else:
        problems.check(not window, f"sliding_window={window!r}")
        layers = []
    if not layers:
        return dict(window=None, windowed_layers=None)
    problems.check(isinstance(window, int) and window > 0,
                   f"sliding layers {layers} with sliding_window={window!r}")
    return dict(window=window if isinstance(window, int) else None,
                windowed_layers=None if len(layers) == n_layers else tuple(layers))
