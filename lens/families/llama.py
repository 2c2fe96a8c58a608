"""The Llama layout and the families stated as a diff over it: Llama 1/2/3.x (RMSNorm, rotary
with "llama3" scaling, grouped-query attention, SwiGLU), Mistral (+ sliding window), Qwen2/2.5
(+ q/k/v biases), Qwen3 (+ per-head QK-norm, head_dim × n_heads ≠ d_model)."""

from lens.config import GPTConfig
from lens.families.common import (Family, Plan, Problems, attention_plan, lm_head, refuse_unknown,
                                  rope, to, transposed, windows)

ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new",
        "gelu_new": "gelu_new", "relu": "relu"}
_READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
         "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
         "rope_scaling", "rope_parameters", "partial_rotary_factor", "attention_bias", "mlp_bias",
         "sliding_window", "use_sliding_window", "layer_types", "max_window_layers"}
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
            "vocab_size")  # what spec cannot do without


def spec(d: dict, name: str, qkv_bias: bool = False, qk_norm=None, window_rule: str = "none",
         read: frozenset = frozenset(), local_rope: bool = False) -> GPTConfig:
    """A Llama-layout config.json → GPTConfig; `qkv_bias`, `qk_norm`, the window rule and
    whether windowed layers have a rotary base of their own are what the families built on
    Llama change."""
    p = Problems(name)
    D, H = d["hidden_size"], d["num_attention_heads"]
    E = d.get("head_dim") or D // H
    act = d.get("hidden_act", "silu")
    p.check(act in ACTS, f"hidden_act={act!r} (supported: {sorted(ACTS)})")
    attention_bias = bool(d.get("attention_bias", False))
    mlp_bias = bool(d.get("mlp_bias", False))
    refuse_unknown(d, _READ | read, p)
    positions = rope(d, E, p, local=local_rope)
    window = windows(d, d["num_hidden_layers"], p, window_rule)
    p.raise_any()
    return GPTConfig(
        n_layers=d["num_hidden_layers"], d_model=D, n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, d_head=E, d_mlp=d["intermediate_size"],
        d_vocab=d["vocab_size"], n_ctx=d.get("max_position_embeddings", 2048),
        act_fn=ACTS.get(act, "silu"), normalization="RMS", eps=float(d.get("rms_norm_eps", 1e-6)),
        positional_embedding=False, **positions, **window,
        attn_bias=qkv_bias or attention_bias, attn_out_bias=attention_bias, mlp_bias=mlp_bias,
        gated_mlp=True, qk_norm=qk_norm, tied_embeddings=bool(d.get("tie_word_embeddings", False)),
        unembed_bias=False,
        tokenizer_name=None)


def plan(cfg: GPTConfig) -> Plan:
    """HF names (model.layers.{l}.self_attn.q_proj, mlp.gate_proj, ...) → lens weights."""
    D, V, M = cfg.d_model, cfg.d_vocab, cfg.d_mlp
    tensors = {"model.embed_tokens.weight": ((V, D), to("embed.W_E")),
               "model.norm.weight": ((D,), to("ln_final.w"))}
    ignored = {r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"}
    lm_head(cfg, tensors, ignored)
    for l in range(cfg.n_layers):
        h, b = f"model.layers.{l}.", f"blocks.{l}."
        tensors.update(attention_plan(h + "self_attn", b + "attn", cfg, bias=cfg.attn_bias,
                                      out_bias=cfg.attn_out_bias))
        tensors.update({
            h + "input_layernorm.weight": ((D,), to(b + "ln1.w")),
            h + "post_attention_layernorm.weight": ((D,), to(b + "ln2.w")),
            h + "mlp.gate_proj.weight": ((M, D), transposed(b + "mlp.W_gate")),
            h + "mlp.up_proj.weight": ((M, D), transposed(b + "mlp.W_in")),
            h + "mlp.down_proj.weight": ((D, M), transposed(b + "mlp.W_out")),
        })
        if cfg.mlp_bias:
            tensors.update({h + "mlp.up_proj.bias": ((M,), to(b + "mlp.b_in")),
                            h + "mlp.down_proj.bias": ((D,), to(b + "mlp.b_out"))})
            tensors[h + "mlp.gate_proj.bias"] = ((M,), to(b + "mlp.b_gate"))
        if cfg.qk_norm == "head":
            E = cfg.d_head
            tensors.update({h + "self_attn.q_norm.weight": ((E,), to(b + "attn.q_norm.w")),
                            h + "self_attn.k_norm.weight": ((E,), to(b + "attn.k_norm.w"))})
    return Plan(tensors, ignored)


def _family(model_type: str, examples: str, **diff) -> Family:
    return Family(model_type, examples, lambda d: spec(d, examples, **diff), plan, REQUIRED)


FAMILIES = (
    _family("llama", "Llama 1, 2, 3.x"),
    _family("mistral", "Mistral", window_rule="all"),
    _family("qwen2", "Qwen2, Qwen2.5", qkv_bias=True, window_rule="qwen"),
    _family("qwen3", "Qwen3", qk_norm="head", window_rule="qwen"),
)
