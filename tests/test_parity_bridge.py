"""Parity with TransformerLens 4.x's TransformerBridge on a Llama and a Pythia (GPT-NeoX)
checkpoint the tests create: the logits, and every hook point the two libraries share, with no
weight processing on either side (lens's from_pretrained_no_processing, the bridge in
compatibility mode with no_processing=True), so both carry HF's raw activations.

The bridge boots offline from the checkpoint folder itself (boot_transformers takes a local path
as its model name). Every hook name of either side is accounted for: compared (same name, or one
of the renamings in `lens_name`), or listed in BRIDGE_ONLY / LENS_ONLY with the reason."""

import re

import pytest
import torch
from test_families import SIZE, random_hf, tokens

from lens import HookedGPT

TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

ATOL = 1e-4  # float32 throughout
# what the comparison must include for every layer, so that it cannot pass vacuously
REQUIRED = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_q",
            "attn.hook_k", "attn.hook_z", "attn.hook_pattern", "mlp.hook_post"]

# Bridge hook names that lens has no hook for (a regex each, with the reason).
BRIDGE_ONLY = {
    # The bridge's native hooks on the input and output of each wrapped HF submodule
    # (blocks.L.attn.q.hook_out, blocks.L.ln1.hook_out, blocks.L.mlp.gate.hook_in, embed.hook_in,
    # ...). Those that carry a TransformerLens quantity are aliased by the bridge to the TL name
    # (blocks.L.hook_in is hook_resid_pre, blocks.L.mlp.out.hook_out is hook_mlp_out,
    # unembed.hook_out is hook_unembed, ...), which is what is compared; the rest (a norm's output
    # after its weight, q before the split into heads, ...) lens does not hook.
    r"\.hook_(in|out)$": "native HF-submodule hook; its TL alias, if any, is compared",
    # The rotary embedding's cos / sin tables: lens applies rotary without hooking its tables.
    r"(^|\.)hook_(cos|sin)$": "rotary cos/sin tables, not hooked by lens",
}
# lens hook names that the bridge has no hook for, per family (with the reason).
LENS_ONLY = {
    "llama": {},
    # The bridge's GPT-NeoX attention (JointQKVPositionEmbeddingsAttentionBridge) has no hooks on
    # the rotated q / k; only its Llama attention does, so hook_rot_q/k are compared for Llama.
    "pythia": {f"blocks.{l}.attn.hook_rot_{x}": "no post-rotary q/k hooks on the bridge's NeoX attention"
               for l in range(SIZE["num_hidden_layers"]) for x in "qk"},
}


def lens_name(bridge_name: str) -> str:
    """The lens hook a bridge hook corresponds to: the same name, except for three renamings."""
    if bridge_name == "hook_unembed":  # the unembedding's output: the logits
        return "hook_logits"
    # The bridge exposes the per-head query/key/value inputs (split-qkv mode) both on the block
    # and on its attention module (the same tensors); lens only on the block.
    name = re.sub(r"\.attn\.hook_([qkv])_input$", r".hook_\1_input", bridge_name)
    # The first output of HF's attention module, which includes the output projection
    # (GPTNeoXAttention.dense, LlamaAttention.o_proj): the attention sublayer's write, attn_out.
    return re.sub(r"\.attn\.hook_hidden_states$", ".hook_attn_out", name)


def word_tokenizer(folder):
    """A word-level tokenizer over the test vocabulary, saved to `folder` and loaded back (the
    bridge needs one; its add-BOS step reloads it from its name_or_path, which a tokenizer built
    in memory lacks). Kept out of the checkpoint folder, so that lens loads without it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SIZE["vocab_size"])}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def boot_bridge(folder, tokenizer_folder):
    """The bridge on the local checkpoint, unprocessed, with the optional hooks lens's
    run_with_cache also fills in (per-head results, split q/k/v inputs, mlp_in) switched on."""
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32,
                                                 tokenizer=word_tokenizer(tokenizer_folder))
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    return bridge


def masked(x: torch.Tensor) -> torch.Tensor:
    """Entries a causal mask removed (-inf, or a huge negative number in attention scores)."""
    return ~torch.isfinite(x) | (x <= -1e30)


@pytest.mark.parametrize("family", ["llama", "pythia"])
def test_every_shared_hook_point_matches_transformer_bridge(tmp_path, monkeypatch, family):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = random_hf(family)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = HookedGPT.from_pretrained_no_processing(tmp_path / "ckpt")
    ours.set_use_attn_result(True)  # the bridge's flags, boot_bridge, on both sides
    ours.set_use_split_qkv_input(True)
    ours.set_use_hook_mlp_in(True)
    theirs = boot_bridge(tmp_path / "ckpt", tmp_path / "tokenizer")
    toks = tokens()
    with torch.no_grad():
        logits, cache = ours.run_with_cache(toks)
        tl_logits, tl_cache = theirs.run_with_cache(toks)
    cache, tl_cache = dict(cache.items()), dict(tl_cache.items())

    # every name of either side is compared or a documented exclusion
    pairs = [(b, lens_name(b)) for b in sorted(tl_cache) if lens_name(b) in cache]
    compared = {ln for _, ln in pairs}
    unaccounted = [b for b in tl_cache if lens_name(b) not in cache
                   and not any(re.search(p, b) for p in BRIDGE_ONLY)]
    assert not unaccounted, f"bridge hooks neither compared nor in BRIDGE_ONLY: {unaccounted}"
    assert set(cache) - compared == set(LENS_ONLY[family]), \
        "lens hooks neither compared nor in LENS_ONLY (compare them, or list them with a reason)"
    n_layers = ours.cfg.n_layers
    missing = [f"blocks.{l}.{h}" for l in range(n_layers) for h in REQUIRED
               if f"blocks.{l}.{h}" not in compared]
    assert not missing, f"not compared: {missing}"
    assert {"hook_embed", "hook_logits", "ln_final.hook_normalized"} <= compared

    # GQA (Llama: 2 key/value heads for 4 query heads): both sides give k, v (rotated or not) and
    # the split k/v inputs one entry per key/value head, not repeated per query head, so they
    # compare as they are; the shape check below holds them to that.
    n_kv = hf.config.num_key_value_heads if family == "llama" else hf.config.num_attention_heads
    assert cache["blocks.0.attn.hook_k"].shape[2] == n_kv
    # hook_normalized is TransformerLens's on both sides: the normalized stream before the norm's
    # weight (and bias), as hook_scale is the divisor; no mapping needed.
    failures = []
    for bridge_name, name in pairs:
        a, b = cache[name], tl_cache[bridge_name]
        if a.shape != b.shape:
            failures.append(f"{name} (bridge {bridge_name}): shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if not torch.equal(masked(a), masked(b)):
            failures.append(f"{name} (bridge {bridge_name}): different entries masked")
            continue
        keep = ~masked(a)
        diff = (a[keep] - b[keep]).abs().max().item() if keep.any() else 0.0
        if not diff <= ATOL:
            failures.append(f"{name} (bridge {bridge_name}): shape {tuple(a.shape)}, max |diff| {diff:.3g}")
    assert not failures, "\n".join(failures)
    assert len(pairs) >= n_layers * 20
    assert logits.shape == tl_logits.shape
    torch.testing.assert_close(logits, tl_logits, atol=ATOL, rtol=0)
