"""HookedTransformer and HookedTransformerConfig as TransformerLens names them, built on
HookedGPT and GPTConfig: a config from TransformerLens's field names, and a model that loads
with TransformerLens's keywords."""

import math
from typing import Any, Optional

import torch

from lens.config import GPTConfig
from lens.model import HookedGPT

# TransformerLens's fields lens has no use for, at their TransformerLens defaults; any other
# value is refused by name (lens never ignores an option).
_INERT = {
    "model_name": None, "original_architecture": None, "from_checkpoint": False,
    "checkpoint_index": None, "checkpoint_label_type": None, "checkpoint_value": None,
    "n_devices": 1, "init_mode": "gpt2", "n_params": None, "use_hook_tokens": False,
    "trust_remote_code": False, "load_in_4bit": False, "attention_dir": "causal",
    "scale_attn_by_inverse_layer_idx": False, "post_embedding_ln": False, "final_rms": False,
    "rotary_adjacent_pairs": False, "num_experts": None, "experts_per_token": None,
    "relative_attention_max_distance": None, "relative_attention_num_buckets": None,
    "decoder_start_token_id": None, "use_NTK_by_parts_rope": False, "rmsnorm_uses_offset": False,
    "use_attn_scale": True, "tokenizer_prepends_bos": None, "default_padding_side": "right",
    "use_split_qkv_input": False, "use_attn_result": False, "use_attn_in": False,
    "use_hook_mlp_in": False, "use_local_attn": False, "attn_types": None, "window_size": None,
    "NTK_by_parts_low_freq_factor": 1.0, "NTK_by_parts_high_freq_factor": 4.0,
    "NTK_by_parts_factor": 8.0, "NTK_original_ctx_len": 8192, "ungroup_grouped_query_attention": False,
    "dtype": torch.float32, "device": None, "default_prepend_bos": True, "seed": None,
    "initializer_range": -1.0, "init_weights": True, "tokenizer_name": None,
}
_POSITIONS = ("standard", "rotary")


def HookedTransformerConfig(d_model: int, d_head: int, n_layers: int, n_ctx: int,  # noqa: N802
                            n_heads: int = -1, d_mlp: Optional[int] = None, d_vocab: int = -1,
                            act_fn: Optional[str] = None, eps: float = 1e-5,
                            normalization_type: Optional[str] = "LN", attn_only: bool = False,
                            positional_embedding_type: str = "standard",
                            rotary_dim: Optional[int] = None, rotary_base: float = 10000,
                            n_key_value_heads: Optional[int] = None, gated_mlp: bool = False,
                            parallel_attn_mlp: bool = False, d_vocab_out: int = -1,
                            attn_scale: float = -1.0, tie_word_embeddings: bool = False,
                            use_normalization_before_and_after: bool = False,
                            attn_scores_soft_cap: float = -1.0, output_logits_soft_cap: float = -1.0,
                            use_qk_norm: bool = False, **options: Any) -> GPTConfig:
    """A GPTConfig from TransformerLens's HookedTransformerConfig field names, derived as there:
    n_heads = d_model // d_head when -1, d_mlp = 4 * d_model when None, attn_scale = √d_head
    when -1, d_vocab_out = d_vocab. The fields that only steer TransformerLens's machinery
    (device, dtype, seed, default_prepend_bos, use_attn_result & co., init_weights,
    initializer_range, tokenizer_name, model_name) are kept on the config for HookedTransformer
    (cfg.metadata["tl"]); a field lens does not implement, at a value other than its default,
    is refused by name."""
    problems = [f"unknown field {k}={v!r}" for k, v in options.items() if k not in _INERT]
    runtime = {**_INERT, **options}
    implemented = ("dtype", "device", "default_prepend_bos", "seed", "initializer_range",
                   "init_weights", "tokenizer_name", "model_name", "original_architecture",
                   "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in",
                   "default_padding_side", "use_local_attn", "window_size", "attn_types",
                   "tokenizer_prepends_bos", "use_attn_scale", "n_params")
    for key, value in options.items():
        if key in _INERT and key not in implemented and value != _INERT[key]:
            problems.append(f"{key}={value!r} (lens implements only {_INERT[key]!r})")
    if n_heads == -1:
        if d_model % d_head:
            problems.append(f"n_heads=-1 derives d_model // d_head, but d_model={d_model} is not "
                            f"a multiple of d_head={d_head}")
        n_heads = d_model // d_head
    if d_vocab == -1:
        problems.append("d_vocab=-1: give d_vocab (TransformerLens takes it from a tokenizer)")
    if d_vocab_out not in (-1, d_vocab):
        problems.append(f"d_vocab_out={d_vocab_out} differs from d_vocab={d_vocab} (lens unembeds "
                        "to the input vocabulary)")
    if positional_embedding_type not in _POSITIONS:
        problems.append(f"positional_embedding_type={positional_embedding_type!r} (lens implements "
                        f"{list(_POSITIONS)})")
    if runtime["use_attn_scale"] is False:
        problems.append("use_attn_scale=False (lens always scales scores; give attn_scale=1.0)")
    window, windowed = _local_attention(runtime, n_layers, problems)
    if not attn_only and act_fn is None:
        problems.append("act_fn is None; a model with MLPs needs one")
    if problems:
        raise ValueError("HookedTransformerConfig: " + "; ".join(problems))
    rotary = positional_embedding_type == "rotary"
    dtype = runtime["dtype"]
    cfg = GPTConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
        d_mlp=None if attn_only else (d_mlp if d_mlp is not None else 4 * d_model),
        d_vocab=d_vocab, n_ctx=n_ctx, act_fn=act_fn or "gelu_new",
        normalization=normalization_type, attn_only=attn_only, eps=eps, dtype=dtype,
        positional_embedding=not rotary, rotary_dim=(rotary_dim or d_head) if rotary else 0,
        rotary_base=float(rotary_base), n_kv_heads=n_key_value_heads, gated_mlp=gated_mlp,
        parallel_attn_mlp=parallel_attn_mlp, tokenizer_name=runtime["tokenizer_name"],
        attn_scale=None if attn_scale == -1 else float(attn_scale),
        tied_embeddings=tie_word_embeddings, post_norms=use_normalization_before_and_after,
        attn_softcap=None if attn_scores_soft_cap <= 0 else float(attn_scores_soft_cap),
        final_softcap=None if output_logits_soft_cap <= 0 else float(output_logits_soft_cap),
        qk_norm="head" if use_qk_norm else None, window=window, windowed_layers=windowed,
        metadata={"name": runtime["model_name"] or "custom"}
        | ({"architecture": runtime["original_architecture"]} if runtime["original_architecture"] else {}),
    )
    cfg._tl = {k: runtime[k] for k in ("device", "seed", "initializer_range", "init_weights",
                                       "default_prepend_bos", "default_padding_side",
                                       "use_attn_result", "use_split_qkv_input", "use_attn_in",
                                       "use_hook_mlp_in")}
    return cfg


def _local_attention(runtime: dict, n_layers: int, problems: list) -> tuple:
    """window / windowed_layers from use_local_attn, window_size and attn_types."""
    if not runtime["use_local_attn"]:
        return None, None
    types, size = runtime["attn_types"], runtime["window_size"]
    if not isinstance(size, int) or size < 1:
        problems.append(f"use_local_attn=True needs a positive int window_size, got {size!r}")
    if types is None or len(types) != n_layers or set(types) - {"global", "local"}:
        problems.append(f"attn_types={types!r} must list 'global' or 'local' for each of the "
                        f"{n_layers} layers")
        return None, None
    local = tuple(i for i, t in enumerate(types) if t == "local")
    return (size if local else None), (None if len(local) == n_layers else local or None)


class HookedTransformer(HookedGPT):
    """HookedGPT under TransformerLens's name: built from a config (a HookedTransformerConfig
    goes to its device, with TransformerLens's initialisation: every matrix normal(0,
    initializer_range), 0.8 / √d_model by default), or loaded with TransformerLens's keywords."""

    def __init__(self, cfg, tokenizer=None, move_to_device: bool = True, default_padding_side=None):
        if isinstance(cfg, dict):
            cfg = HookedTransformerConfig(**cfg)
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a HookedTransformerConfig (GPTConfig) or a dict of its "
                            f"fields, got {type(cfg).__name__}")
        tl = getattr(cfg, "_tl", {})
        super().__init__(cfg, tokenizer=tokenizer, init=False)
        if tl.get("init_weights", True):
            std = tl.get("initializer_range", -1.0)
            self.init_weights(0.8 / math.sqrt(cfg.d_model) if std is None or std < 0 else std,
                              seed=tl.get("seed"), scale_writes=False)
        for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"):
            if tl.get(flag):
                getattr(self, "set_" + flag)(True)
        self.default_prepend_bos = tl.get("default_prepend_bos", True)
        if default_padding_side is not None:
            self.default_padding_side = default_padding_side
        elif tl.get("default_padding_side") not in (None, "right"):
            self.default_padding_side = tl["default_padding_side"]
        if move_to_device:  # TransformerLens's default device: a GPU when there is one
            self.to(tl.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_pretrained(cls, model_name, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True,
                        refactor_factored_attn_matrices: bool = False, device=None, dtype=None,
                        default_prepend_bos: Optional[bool] = None,
                        default_padding_side: Optional[str] = None, move_to_device: bool = True,
                        n_devices: int = 1, tokenizer=None, **kwargs) -> "HookedTransformer":
        """TransformerLens's from_pretrained: a local checkpoint, a hub name in the hub cache,
        or a bundled lens model, processed as TransformerLens does by default."""
        from lens.loading import from_pretrained
        if n_devices != 1:
            raise ValueError(f"n_devices={n_devices}: lens runs a model on one device")
        if default_padding_side not in (None, "left", "right"):
            raise ValueError(f"default_padding_side={default_padding_side!r}; valid values are "
                             "'left' and 'right'")
        model = from_pretrained(model_name, device=device if move_to_device else None, dtype=dtype,
                                fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                **kwargs)
        model.__class__ = cls
        if tokenizer is not None:
            model.tokenizer = tokenizer
        if refactor_factored_attn_matrices:
            model.refactor_factored_attn_matrices()
        if default_prepend_bos is not None:
            model.default_prepend_bos = bool(default_prepend_bos)
        if default_padding_side is not None:
            model.default_padding_side = default_padding_side
        return model

    @classmethod
    def from_pretrained_no_processing(cls, model_name, fold_ln: bool = False,
                                      center_writing_weights: bool = False,
                                      center_unembed: bool = False, fold_value_biases: bool = False,
                                      **kwargs) -> "HookedTransformer":
        return cls.from_pretrained(model_name, fold_ln=fold_ln,
                                   center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed,
                                   fold_value_biases=fold_value_biases, **kwargs)
