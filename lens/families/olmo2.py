"""OLMo-2: the Llama layout with the norms moved after each sublayer (post_attention and
post_feedforward; no norm before them) and QK-norm over the whole query and key projections."""

from lens.config import GPTConfig
from lens.families.common import Family, Plan, to
from lens.families.llama import REQUIRED, plan as llama_plan, spec


def config(d: dict) -> GPTConfig:
    cfg = spec(d, "OLMo-2", qk_norm="proj")
    cfg.pre_norms, cfg.post_norms = False, True
    return GPTConfig.from_dict(cfg.to_dict())


def plan(cfg: GPTConfig) -> Plan:
    base = llama_plan(cfg)
    D, HE, KE = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    for l in range(cfg.n_layers):
        h, b = f"model.layers.{l}.", f"blocks.{l}."
        del base.tensors[h + "input_layernorm.weight"]
        base.tensors[h + "post_attention_layernorm.weight"] = ((D,), to(b + "ln1_post.w"))
        base.tensors[h + "post_feedforward_layernorm.weight"] = ((D,), to(b + "ln2_post.w"))
        base.tensors[h + "self_attn.q_norm.weight"] = ((HE,), to(b + "attn.q_ln.w"))
        base.tensors[h + "self_attn.k_norm.weight"] = ((KE,), to(b + "attn.k_ln.w"))
    return base


FAMILY = Family("olmo2", "OLMo-2", config, plan, REQUIRED)
