"""GPT-2 (gpt2, -medium, -large, -xl, distilgpt2): LayerNorm, learned positions, HF's Conv1D
weights (x @ W, as lens), Q, K and V of all heads fused in c_attn, tied embeddings."""

import re

from lens.config import GPTConfig
from lens.families.common import Family, Plan, Problems, lm_head, refuse_unknown, split, to

ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_READ = {"n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_ctx", "n_inner",
         "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
         "scale_attn_by_inverse_layer_idx", "scale_attn_weights", "add_cross_attention",
         "reorder_and_upcast_attn"}


def config(d: dict) -> GPTConfig:
    act = d.get("activation_function", "gelu_new")
    p = Problems("GPT-2")
    p.check(act in ACT_FROM_HF, f"activation_function={act!r} (supported: {sorted(ACT_FROM_HF)})")
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                      ("add_cross_attention", True)):
        p.check(d.get(flag, not bad) != bad, f"{flag}={bad}")
    p.check(d["n_embd"] % d["n_head"] == 0,
            f"n_embd={d['n_embd']} is not divisible by n_head={d['n_head']}")
    refuse_unknown(d, _READ, p)
    p.raise_any()
    return GPTConfig(
        n_layers=d["n_layer"], d_model=d["n_embd"], n_heads=d["n_head"], d_vocab=d["vocab_size"],
        n_ctx=d["n_positions"], d_head=d["n_embd"] // d["n_head"],
        d_mlp=d.get("n_inner") or 4 * d["n_embd"], act_fn=ACT_FROM_HF[act], normalization="LN",
        eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tied_embeddings=bool(d.get("tie_word_embeddings", True)), unembed_bias=False,
        tokenizer_name="gpt2" if d["vocab_size"] == 50257 else None)


def infer_config(shapes: dict[str, tuple], overrides: dict, source: str) -> GPTConfig:
    """GPTConfig from a GPT-2 state dict's shapes; n_heads (not in any shape) must be given."""
    s = {k.removeprefix("transformer."): v for k, v in shapes.items()}
    layers = [int(m.group(1)) for k in s if (m := re.fullmatch(r"h\.(\d+)\.ln_1\.weight", k))]
    try:
        d_vocab, d_model = s["wte.weight"]
        inferred = dict(n_layers=max(layers) + 1, d_model=d_model, d_vocab=d_vocab,
                        n_ctx=s["wpe.weight"][0], d_mlp=s["h.0.mlp.c_fc.weight"][1])
    except (KeyError, ValueError):
        raise ValueError(f"{source}: cannot infer a GPT-2 config from its tensors (expected "
                         "wte.weight, wpe.weight, h.0.ln_1.weight, h.0.mlp.c_fc.weight); pass "
                         "config= or put the checkpoint's config.json beside it") from None
    if "n_heads" not in overrides:
        raise ValueError(f"{source}: n_heads cannot be inferred from tensor shapes (inferred "
                         f"{inferred}); pass config={{'n_heads': ...}}, a GPTConfig or an HF "
                         "config dict, or put the checkpoint's config.json beside the file")
    tied = "lm_head.weight" not in s
    return GPTConfig(**{**inferred, "tokenizer_name": "gpt2" if d_vocab == 50257 else None,
                        "tied_embeddings": tied, "unembed_bias": False, **overrides})


def plan(cfg: GPTConfig) -> Plan:
    """HF GPT-2 names (without "transformer.") → lens weights."""
    D, H, E, V, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.d_mlp
    qkv = tuple(f"attn.W_{x}" for x in "QKV")
    tensors = {"wte.weight": ((V, D), to("embed.W_E")),
               "wpe.weight": ((cfg.n_ctx, D), to("pos_embed.W_pos")),
               "ln_f.weight": ((D,), to("ln_final.w")), "ln_f.bias": ((D,), to("ln_final.b"))}
    ignored = {rf"h\.\d+\.attn\.(bias|masked_bias)"}  # causal-mask buffers, not weights
    lm_head(cfg, tensors, ignored)
    for l in range(cfg.n_layers):
        h, b = f"h.{l}.", f"blocks.{l}."
        tensors.update({
            h + "ln_1.weight": ((D,), to(b + "ln1.w")), h + "ln_1.bias": ((D,), to(b + "ln1.b")),
            h + "attn.c_attn.weight": ((D, 3 * H * E), split(
                "m (three h e) -> three h m e", tuple(b + n for n in qkv), three=3, h=H)),
            h + "attn.c_attn.bias": ((3 * H * E,), split(
                "(three h e) -> three h e", tuple(b + n.replace("W_", "b_") for n in qkv), three=3, h=H)),
            h + "attn.c_proj.weight": ((H * E, D), to(b + "attn.W_O", "(h e) m -> h e m", h=H)),
            h + "attn.c_proj.bias": ((D,), to(b + "attn.b_O")),
            h + "ln_2.weight": ((D,), to(b + "ln2.w")), h + "ln_2.bias": ((D,), to(b + "ln2.b")),
            h + "mlp.c_fc.weight": ((D, M), to(b + "mlp.W_in")),
            h + "mlp.c_fc.bias": ((M,), to(b + "mlp.b_in")),
            h + "mlp.c_proj.weight": ((M, D), to(b + "mlp.W_out")),
            h + "mlp.c_proj.bias": ((D,), to(b + "mlp.b_out")),
        })
    return Plan(tensors, ignored, strip="transformer.")


FAMILY = Family("gpt2", "GPT-2 and distilgpt2", config, plan,
                required=("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"))
