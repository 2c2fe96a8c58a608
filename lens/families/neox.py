"""GPT-NeoX and Pythia: LayerNorm, attention and MLP in parallel on the block's input
(use_parallel_residual), rotary on a fraction of each head (rotary_pct), Q, K and V fused per
head in query_key_value, biases everywhere, an untied unembedding (embed_out)."""

from lens.config import GPTConfig
from lens.families.common import Family, Plan, Problems, refuse_unknown, rope, split, to, transposed

ACTS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
        "relu": "relu", "silu": "silu"}
_READ = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "intermediate_size", "hidden_act", "rotary_pct", "rotary_emb_base", "rope_parameters",
         "rope_scaling", "rope_theta", "partial_rotary_factor", "max_position_embeddings",
         "layer_norm_eps", "use_parallel_residual", "tie_word_embeddings", "attention_bias"}


def config(d: dict) -> GPTConfig:
    p = Problems("GPT-NeoX")
    D, H = d["hidden_size"], d["num_attention_heads"]
    act = d.get("hidden_act", "gelu")
    p.check(act in ACTS, f"hidden_act={act!r} (supported: {sorted(ACTS)})")
    p.check(D % H == 0, f"hidden_size={D} is not divisible by num_attention_heads={H}")
    p.check(not d.get("tie_word_embeddings", False), "tie_word_embeddings=True")
    refuse_unknown(d, _READ, p)
    positions = rope(d, D // H, p)
    p.raise_any()
    bias = bool(d.get("attention_bias", True))
    return GPTConfig(
        n_layers=d["num_hidden_layers"], d_model=D, n_heads=H, d_head=D // H,
        d_mlp=d.get("intermediate_size") or 4 * D, d_vocab=d["vocab_size"],
        n_ctx=d.get("max_position_embeddings", 2048), act_fn=ACTS.get(act, "gelu"),
        normalization="LN", eps=float(d.get("layer_norm_eps", 1e-5)), positional_embedding=False,
        **positions, attn_bias=bias, attn_out_bias=bias,
        parallel_attn_mlp=bool(d.get("use_parallel_residual", True)), unembed_bias=False,
        tokenizer_name=None)


def plan(cfg: GPTConfig) -> Plan:
    D, H, E, V, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.d_mlp
    tensors = {"gpt_neox.embed_in.weight": ((V, D), to("embed.W_E")),
               "gpt_neox.final_layer_norm.weight": ((D,), to("ln_final.w")),
               "gpt_neox.final_layer_norm.bias": ((D,), to("ln_final.b")),
               "embed_out.weight": ((V, D), transposed("unembed.W_U"))}
    ignored = {r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
               r"gpt_neox\.rotary_emb\.inv_freq"}
    for l in range(cfg.n_layers):
        h, b = f"gpt_neox.layers.{l}.", f"blocks.{l}."
        W = tuple(f"{b}attn.W_{x}" for x in "QKV")
        B = tuple(f"{b}attn.b_{x}" for x in "QKV")
        tensors.update({
            h + "input_layernorm.weight": ((D,), to(b + "ln1.w")),
            h + "input_layernorm.bias": ((D,), to(b + "ln1.b")),
            h + "post_attention_layernorm.weight": ((D,), to(b + "ln2.w")),
            h + "post_attention_layernorm.bias": ((D,), to(b + "ln2.b")),
            # rows of query_key_value are (head, q|k|v, d_head)
            h + "attention.query_key_value.weight": ((3 * H * E, D), split(
                "(h three e) d -> three h d e", W, h=H, three=3)),
            h + "attention.dense.weight": ((D, H * E), to(b + "attn.W_O", "d (h e) -> h e d", h=H)),
            h + "mlp.dense_h_to_4h.weight": ((M, D), transposed(b + "mlp.W_in")),
            h + "mlp.dense_h_to_4h.bias": ((M,), to(b + "mlp.b_in")),
            h + "mlp.dense_4h_to_h.weight": ((D, M), transposed(b + "mlp.W_out")),
            h + "mlp.dense_4h_to_h.bias": ((D,), to(b + "mlp.b_out")),
        })
        if cfg.attn_bias:
            tensors[h + "attention.query_key_value.bias"] = ((3 * H * E,), split(
                "(h three e) -> three h e", B, h=H, three=3))
            tensors[h + "attention.dense.bias"] = ((D,), to(b + "attn.b_O"))
    return Plan(tensors, ignored)


FAMILY = Family("gpt_neox", "GPT-NeoX, Pythia", config, plan,
                required=("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"))
