"""Gemma (1): the Llama layout with RMSNorm weights applied as (1 + w), embeddings scaled by
√d_model, GeGLU (tanh GELU, also where old configs say hidden_act="gelu", as HF runs them),
tied embeddings and a head_dim of its own (Gemma-7B: 16 × 256 ≠ 3072). Gemma-2: + a norm after
attention and after the MLP, scores scaled by query_pre_attn_scalar^-1/2, soft-capped scores
and logits, sliding-window layers alternating with global ones."""

import math

from lens.config import GPTConfig
from lens.families.common import Family, Plan, Problems, to
from lens.families.llama import plan, spec


def _act(d: dict, p: Problems) -> str:
    act = d.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # HF's reading of the released configs
    legacy = d.get("hidden_activation")  # transformers 4's name, which took precedence there
    p.check(legacy in (None, act), f"hidden_activation={legacy!r} differs from hidden_act={act!r}")
    return act


def _gemma(d: dict, name: str, read: frozenset = frozenset(), window_rule: str = "none",
           **changes) -> GPTConfig:
    """The Llama spec with what every Gemma has, plus `changes`, validated again."""
    p = Problems(name)
    d = {**d, "hidden_act": _act(d, p), "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    p.raise_any()
    cfg = spec(d, name, read=read | {"hidden_activation"}, window_rule=window_rule)
    return GPTConfig.from_dict({**cfg.to_dict(), "norm_offset": 1.0,
                                "embed_scale": math.sqrt(cfg.d_model), **changes})


def config(d: dict) -> GPTConfig:
    return _gemma(d, "Gemma")


def config2(d: dict) -> GPTConfig:
    return _gemma(d, "Gemma-2", frozenset({"query_pre_attn_scalar", "attn_logit_softcapping",
                                           "final_logit_softcapping", "cache_implementation"}),
                  window_rule="alternate", post_norms=True, attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** 0.5,
                  attn_softcap=d.get("attn_logit_softcapping"),
                  final_softcap=d.get("final_logit_softcapping"))


def plan2(cfg: GPTConfig) -> Plan:
    """Llama's names, but post_attention_layernorm is the norm after attention, and the MLP has
    a norm before (pre_feedforward) and after (post_feedforward) it."""
    base = plan(cfg)
    D = cfg.d_model
    for l in range(cfg.n_layers):
        h, b = f"model.layers.{l}.", f"blocks.{l}."
        base.tensors[h + "post_attention_layernorm.weight"] = ((D,), to(b + "ln1_post.w"))
        base.tensors[h + "pre_feedforward_layernorm.weight"] = ((D,), to(b + "ln2.w"))
        base.tensors[h + "post_feedforward_layernorm.weight"] = ((D,), to(b + "ln2_post.w"))
    return base


FAMILY = Family("gemma", "Gemma", config, plan)
FAMILY2 = Family("gemma2", "Gemma-2", config2, plan2)
