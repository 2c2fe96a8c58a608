"""Gemma (1): the Llama layout with RMSNorm weights applied as (1 + w), embeddings scaled by
√d_model, GeGLU (tanh GELU, also where old configs say hidden_act="gelu", as HF runs them),
tied embeddings and a head_dim of its own (Gemma-7B: 16 × 256 ≠ 3072)."""

import math

from lens.config import GPTConfig
from lens.families.common import Family, Problems
from lens.families.llama import plan, spec


def config(d: dict) -> GPTConfig:
    act = d.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # HF's reading of the released configs
    legacy = d.get("hidden_activation")  # transformers 4's name, which took precedence there
    p = Problems("Gemma")
    p.check(legacy in (None, act), f"hidden_activation={legacy!r} differs from hidden_act={act!r}")
    p.raise_any()
    d = {**d, "hidden_act": act, "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    cfg = spec(d, "Gemma", read=frozenset({"hidden_activation"}))
    cfg.norm_offset, cfg.embed_scale = 1.0, math.sqrt(cfg.d_model)
    return GPTConfig.from_dict(cfg.to_dict())  # validated again with the Gemma fields


FAMILY = Family("gemma", "Gemma", config, plan)
