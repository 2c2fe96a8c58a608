"""The sites table: every hook point's axes, stated once. Caching, patching, ablation and
harvest ask it where a hook's position, head and neuron axes are, and short names
("pattern", 0) become full ones ("blocks.0.attn.hook_pattern") here."""

import difflib
from typing import Optional

B, P, QP, KP = "batch", "pos", "query_pos", "key_pos"
# hook points run_with_cache() with no filter leaves out, as TransformerLens does (per-head
# copies of the stream and of each head's write), each with the TransformerLens flag
# (model.set_<flag>(True), model.cfg.<flag>) that puts it back
OPTIONAL_CACHE: dict[str, str] = {
    "hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
    "hook_mlp_in": "use_hook_mlp_in",
}
# leaf name -> (the module under blocks.{l} that owns it, axes of its activation)
SITES: dict[str, tuple[Optional[str], tuple[str, ...]]] = {
    "embed": (None, (B, P, "d_model")),
    "pos_embed": (None, (B, P, "d_model")),
    "logits": (None, (B, P, "d_vocab")),
    "resid_pre": ("", (B, P, "d_model")),
    "resid_mid": ("", (B, P, "d_model")),
    "resid_post": ("", (B, P, "d_model")),
    "attn_out": ("", (B, P, "d_model")),
    "attn_out_pre": ("", (B, P, "d_model")),
    "mlp_out_pre": ("", (B, P, "d_model")),
    "mlp_in": ("", (B, P, "d_model")),
    "mlp_out": ("", (B, P, "d_model")),
    "q_input": ("", (B, P, "head", "d_model")),
    "k_input": ("", (B, P, "kv_head", "d_model")),
    "v_input": ("", (B, P, "kv_head", "d_model")),
    "q": ("attn", (B, P, "head", "d_head")),
    "k": ("attn", (B, P, "kv_head", "d_head")),
    "v": ("attn", (B, P, "kv_head", "d_head")),
    "rot_q": ("attn", (B, P, "head", "d_head")),
    "rot_k": ("attn", (B, P, "kv_head", "d_head")),
    "attn_scores": ("attn", (B, "head", QP, KP)),
    "pattern": ("attn", (B, "head", QP, KP)),
    "z": ("attn", (B, P, "head", "d_head")),
    "result": ("attn", (B, P, "head", "d_model")),
    "pre": ("mlp", (B, P, "d_mlp")),
    "pre_linear": ("mlp", (B, P, "d_mlp")),
    "post": ("mlp", (B, P, "d_mlp")),
    "scale": ("ln1", (B, P, "1")),
    "normalized": ("ln1", (B, P, "d_model")),
}
ALIASES = {"scores": "attn_scores", "attn": "pattern", "mlp_pre": "pre", "mlp_post": "post"}
_TOP = {"embed", "pos_embed", "logits"}
_NORMS = {"scale", "normalized"}


def name(short: str, layer: Optional[int] = None, part: Optional[str] = None,
         n_layers: Optional[int] = None) -> str:
    """The full hook name of a short one: name("pattern", 0) == "blocks.0.attn.hook_pattern";
    norms take part="ln1" / "ln2" (default ln1; the final norm without a layer). Full names are
    returned as they are."""
    if "." in short or short.startswith("hook_"):
        return short
    short = ALIASES.get(short, short)
    if short not in SITES:
        near = difflib.get_close_matches(short, list(SITES) + list(ALIASES), n=3, cutoff=0.6)
        raise KeyError(f"unknown short name {short!r}{'; did you mean ' + str(near) + '?' if near else ''} "
                       f"(valid short names are {sorted(SITES)})")
    if short in _TOP:
        return f"hook_{short}"
    if layer is None:
        if short in _NORMS:
            return f"ln_final.hook_{short}"
        raise KeyError(f"short name {short!r} needs a layer, e.g. cache[{short!r}, 0]")
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise KeyError(f"layer {layer} is out of range for a model with n_layers={n_layers}")
        layer %= n_layers
    owner = part or SITES[short][0]
    return f"blocks.{layer}.{owner + '.' if owner else ''}hook_{short}"


# The hook points an SAE or transcoder adds under its host's name while it is spliced in
# ({host}.hook_sae_input, ...; lens.sae): d_out is d_in but for transcoders, and the hook points
# of an SAE on hook_z are flat (heads × d_head).
SAE_SITES: dict[str, tuple[str, ...]] = {
    "sae_input": (B, P, "d_in"), "sae_acts_pre": (B, P, "d_sae"), "sae_acts_post": (B, P, "d_sae"),
    "sae_recons": (B, P, "d_out"), "sae_error": (B, P, "d_out"), "sae_output": (B, P, "d_out"),
}


def axes(hook: str) -> tuple[str, ...]:
    """The axes of a hook point's activation, by its full name."""
    module, _, leaf = hook.rpartition(".")
    short = leaf.removeprefix("hook_")
    if short in SAE_SITES and module.rpartition(".")[2].startswith("hook_"):
        return SAE_SITES[short]
    if short not in SITES:
        raise KeyError(f"{hook!r} is not a hook point lens knows (leaf {leaf!r})")
    found = SITES[short][1]
    if short in _NORMS and module.endswith(("q_norm", "k_norm")):  # per-head QK-norm
        head = "head" if module.endswith("q_norm") else "kv_head"
        return (B, P, head, "1" if short == "scale" else "d_head")
    return found


def pos_axis(hook: str) -> int:
    """The position axis (the query position for patterns and scores)."""
    a = axes(hook)
    return a.index(P) if P in a else a.index(QP)


def head_axis(hook: str) -> Optional[int]:
    """The axis of query heads (or key/value heads under GQA), or None."""
    a = axes(hook)
    for h in ("head", "kv_head"):
        if h in a:
            return a.index(h)
    return None


def neuron_axis(hook: str) -> Optional[int]:
    a = axes(hook)
    return a.index("d_mlp") if "d_mlp" in a else None
