"""run_with_cache and ActivationCache: filters, short keys, structure-aware helpers, save/load."""

import pytest
import torch
from conftest import make_model, make_tokens

import lens


def test_only_filtered_names_are_kept(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert set(cache) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    assert list(cache) == ["blocks.1.hook_resid_post"]


def test_short_keys(model, tokens):
    _, cache = model.run_with_cache(tokens)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.1.hook_resid_post"]
    assert cache["z", 1, "attn"] is cache["blocks.1.attn.hook_z"]
    assert cache["scale", 0, "ln2"] is cache["blocks.0.ln2.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert cache["post", 0] is cache["blocks.0.mlp.hook_post"]
    with pytest.raises(KeyError, match="out of range"):
        cache["pattern", 2]
    with pytest.raises(KeyError, match="unknown short name"):
        cache["patern", 0]


def test_stop_at_layer_auto_stops_early(model, tokens):
    seen = []
    with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: seen.append(hook.name))]):
        logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z", stop_at_layer="auto")
    assert logits is None and "blocks.1.hook_resid_pre" not in seen and "blocks.0.hook_resid_post" in seen
    full, cache_full = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    assert full is not None
    torch.testing.assert_close(cache["z", 0], cache_full["z", 0])
    logits, _ = model.run_with_cache(tokens, names_filter="ln_final.hook_scale", stop_at_layer="auto")
    assert logits is not None


def test_pos_slice_and_remove_batch_dim(model, tokens):
    _, full = model.run_with_cache(tokens)
    _, last = model.run_with_cache(tokens, pos_slice=-1)  # an int keeps a size-1 axis, as in TL
    assert torch.equal(last["resid_post", 0], full["resid_post", 0][:, -1:])
    assert torch.equal(last["pattern", 0], full["pattern", 0][:, :, -1:])
    _, one = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert one["resid_pre", 1].shape == (tokens.shape[1], model.cfg.d_model)
    with pytest.raises(ValueError, match="batch size 1"):
        model.run_with_cache(tokens, remove_batch_dim=True)


def test_accumulated_and_decomposed_resid(model, tokens):
    _, cache = model.run_with_cache(tokens)
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert torch.equal(acc[1], cache["resid_pre", 1])
    acc, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    parts, labels = cache.decompose_resid(layer=1, return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_pre", 1])
    parts = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(parts.sum(0), cache["resid_mid", 1])


def test_head_and_neuron_stacks_sum_to_their_outputs(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_z", "hook_post", "hook_attn_out",
                                                                                "hook_mlp_out", "resid_post")))
    heads, labels = cache.stack_head_results(return_labels=True)
    assert labels == ["L0H0", "L0H1", "L1H0", "L1H1"]
    b_O = model.b_O
    torch.testing.assert_close(heads[:2].sum(0) + b_O[0], cache["attn_out", 0])
    heads_rem = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(heads_rem.sum(0), cache["resid_post", -1], atol=1e-5, rtol=1e-5)
    neurons, labels = cache.stack_neuron_results(layer=1, return_labels=True)
    assert neurons.shape[0] == model.cfg.d_mlp and labels[3] == "L0N3"
    torch.testing.assert_close(neurons.sum(0) + model.blocks[0].mlp.b_out, cache["mlp_out", 0], atol=1e-5, rtol=1e-5)
    some = cache.stack_neuron_results(layer=1, neuron_slice=[1, 5], pos_slice=-1)
    torch.testing.assert_close(some, neurons[[1, 5]][:, :, -1])


def test_direct_logit_attribution_sums_to_the_logit_difference(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    parts = cache.decompose_resid(apply_ln=True, pos_slice=-1)
    right, wrong = tokens[:, 0], tokens[:, 1]
    attrs = cache.logit_attrs(parts, right, wrong)  # [component, batch]
    ln_b = model.ln_final.b
    W_U = model.W_U
    const = ln_b @ (W_U[:, right] - W_U[:, wrong]) + model.b_U[right] - model.b_U[wrong]
    want = logits[torch.arange(2), -1, right] - logits[torch.arange(2), -1, wrong]
    torch.testing.assert_close(attrs.sum(0) + const, want, atol=1e-5, rtol=1e-5)


def test_save_load_and_to(model, tokens, tmp_path):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    cache.save(tmp_path / "c.safetensors")
    back = lens.ActivationCache.load(tmp_path / "c.safetensors", model)
    assert set(back) == set(cache) and all(torch.equal(back[k], cache[k]) for k in cache)
    other = make_model(n_layers=1)
    with pytest.raises(ValueError, match="not hook points of this model"):
        lens.ActivationCache.load(tmp_path / "c.safetensors", other)
    assert cache.to("cpu")["resid_pre", 0].device.type == "cpu"
    # six activations, five storages: block 1's resid_pre is block 0's resid_post
    assert len(cache) == 6 and cache.nbytes == 5 * tokens.numel() * model.cfg.d_model * 4


def test_missing_key_says_how_to_get_it(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 0]
    with pytest.raises(KeyError, match="blocks.0.ln1.hook_scale"):
        cache.accumulated_resid(layer=0, apply_ln=True)
