"""Gemma (1): the Llama layout with RMSNorm weights applied as (1 + w), embeddings scaled by
√d_model, GeGLU (tanh GELU, also where old configs say hidden_act="gelu", as HF runs them),
tied embeddings and a head_dim of its own (Gemma-7B: 16 × 256 ≠ 3072). Gemma-2: + a norm after
attention and after the MLP, scores scaled by query_pre_attn_scalar^-1/2, soft-capped scores
and logits, sliding-window layers alternating with global ones. Gemma-3 (text): + per-head QK-norm (also
(1 + w)), five local layers to each global one, local layers with a rotary base of their own and
rope scaling on global layers only, no soft-caps by default."""

import math

from lens.config import GPTConfig
from lens.families.common import Family, Plan, Problems, to
from lens.families.llama import REQUIRED, plan, spec


def _act(d: dict, p: Problems, runs: str = "hidden_act") -> str:
    """The activation HF runs: Gemma 1 runs hidden_act (read "gelu" as tanh GELU, as HF does);
    Gemma-2 and -3 run hidden_activation. The other name, where present, must agree."""
    other = "hidden_activation" if runs == "hidden_act" else "hidden_act"
    act = d.get(runs) or "gelu_pytorch_tanh"
    if runs == "hidden_act" and act == "gelu":  # HF's reading of the released Gemma 1 configs
        act = "gelu_pytorch_tanh"
    p.check(d.get(other) in (None, act), f"{other}={d.get(other)!r} differs from {runs}={act!r}, "
                                         f"which HF runs")
    return act


def _gemma(d: dict, name: str, read: frozenset = frozenset(), window_rule: str = "none",
           act: str = "hidden_act", qk_norm=None, local_rope: bool = False, **changes) -> GPTConfig:
    """The Llama spec with what every Gemma has, plus `changes`, validated again."""
    p = Problems(name)
    d = {**d, "hidden_act": _act(d, p, act), "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    p.raise_any()
    cfg = spec(d, name, read=read | {"hidden_activation"}, window_rule=window_rule,
               qk_norm=qk_norm, local_rope=local_rope)
    return GPTConfig.from_dict({**cfg.to_dict(), "norm_offset": 1.0,
                                "embed_scale": math.sqrt(cfg.d_model), **changes})


def config(d: dict) -> GPTConfig:
    return _gemma(d, "Gemma")


_GEMMA2_READ = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping",
                          "final_logit_softcapping", "cache_implementation"})


def _gemma2_changes(d: dict) -> dict:
    """What Gemma-2 and -3 add to Gemma's spec: post-norms, the score scale and soft-caps."""
    return dict(post_norms=True, attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** 0.5,
                attn_softcap=d.get("attn_logit_softcapping"),
                final_softcap=d.get("final_logit_softcapping"))


def config2(d: dict) -> GPTConfig:
    return _gemma(d, "Gemma-2", _GEMMA2_READ, window_rule="alternate", act="hidden_activation",
                  **_gemma2_changes(d))


def config3(d: dict) -> GPTConfig:
    """Gemma-3's text models (model_type gemma3_text). `use_bidirectional_attention` (the
    embedding models) is refused by name, since lens's attention is causal."""
    read = _GEMMA2_READ | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"}
    return _gemma(d, "Gemma-3", read, window_rule="pattern", act="hidden_activation",
                  qk_norm="head", local_rope=True, **_gemma2_changes(d))


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


FAMILY = Family("gemma", "Gemma", config, plan, REQUIRED)
FAMILY2 = Family("gemma2", "Gemma-2", config2, plan2, REQUIRED)
FAMILY3 = Family("gemma3_text", "Gemma-3 (text)", config3, plan2, REQUIRED)
