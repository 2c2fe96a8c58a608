"""Phi-3: the Llama layout with Q, K and V fused in qkv_proj ([q; k; v] rows), gate and up
fused in gate_up_proj ([gate; up] rows), partial rotary and a sliding window on every layer."""

from lens.config import GPTConfig
from lens.families.common import Family, Plan, chunks, to, transposed
from lens.families.llama import REQUIRED, plan as llama_plan, spec


def config(d: dict) -> GPTConfig:
    return spec(d, "Phi-3", window_rule="all", read=frozenset({"original_max_position_embeddings"}))


def plan(cfg: GPTConfig) -> Plan:
    base = llama_plan(cfg)
    H, KV, E, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    tensors = {}
    for l in range(cfg.n_layers):
        h, b = f"model.layers.{l}.", f"blocks.{l}."
        for part in ("q_proj", "k_proj", "v_proj"):
            del base.tensors[f"{h}self_attn.{part}.weight"]
        for part in ("gate_proj", "up_proj"):
            del base.tensors[f"{h}mlp.{part}.weight"]
        heads = to(b + "attn.W_Q", "(h e) d -> h d e", h=H), \
            to(b + "attn.W_K", "(h e) d -> h d e", h=KV), to(b + "attn.W_V", "(h e) d -> h d e", h=KV)
        tensors[h + "self_attn.qkv_proj.weight"] = (((H + 2 * KV) * E, D),
                                                    chunks((H * E, KV * E, KV * E), heads))
        tensors[h + "mlp.gate_up_proj.weight"] = ((2 * M, D), chunks(
            (M, M), (transposed(b + "mlp.W_gate"), transposed(b + "mlp.W_in"))))
    base.tensors.update(tensors)
    return base


FAMILY = Family("phi3", "Phi-3", config, plan, REQUIRED)
