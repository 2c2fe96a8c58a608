"""Families of HF checkpoints, one small file each: an HF config.json → a lens spec, and HF
tensor names → lens weights (a plan). Every HF option lens does not implement is refused by
name; nothing here is read by the forward pass."""

from lens.families.common import Family, Plan, field_problems, refuse_unknown
from lens.families import gemma, gpt2, llama, neox, olmo2, phi3

FAMILIES: dict[str, Family] = {f.model_type: f for f in
                               (gpt2.FAMILY, *llama.FAMILIES, neox.FAMILY, phi3.FAMILY, gemma.FAMILY,
                                gemma.FAMILY2, gemma.FAMILY3, olmo2.FAMILY)}


def family(hf: dict) -> Family:
    """The family of an HF config dict (config.json), by its model_type."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        hint = {"gemma3": "; this is a multimodal Gemma-3 checkpoint (text and vision): lens loads "
                          "Gemma-3's text models (model_type gemma3_text, e.g. gemma-3-1b, gemma-3-270m)"}
        raise ValueError(f"model_type={kind!r} is not supported; lens loads {sorted(FAMILIES)} "
                         f"({', '.join(f.examples for f in FAMILIES.values())}){hint.get(kind, '')}")
    return FAMILIES[kind]


__all__ = ["FAMILIES", "Family", "Plan", "family", "field_problems", "refuse_unknown"]
