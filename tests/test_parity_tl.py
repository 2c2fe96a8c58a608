"""Parity with TransformerLens (4.x TransformerBridge in compatibility mode) on every hook point
the two libraries share, on checkpoints the tests create, with and without weight processing."""

import shutil

import pytest
import torch
from conftest import random_hf, write

from lens import HookedGPT
from lens.tokenizer import gpt2_data_dir

TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge
CORE = ["hook_embed", "hook_pos_embed", "resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
        "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "mlp.hook_pre",
        "mlp.hook_post", "hook_mlp_out", "hook_resid_post", "ln_final.hook_scale"]


def checkpoint(tmp_path, **config):
    folder = write(random_hf(vocab_size=50257, **config), tmp_path / "ckpt")
    data = gpt2_data_dir()  # TransformerBridge loads a tokenizer from the folder, offline
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


def bridge(folder, process: bool):
    br = TransformerBridge.boot_transformers(str(folder), device="cpu")
    br.enable_compatibility_mode(disable_warnings=True, no_processing=not process)
    return br


def compare_caches(ours, theirs, atol):
    shared = [n for n in ours if n in theirs and ours[n].shape == theirs[n].shape]
    for core in CORE:
        assert any(n.endswith(core) for n in shared), f"{core} not compared"
    for name in shared:
        a, b = ours[name], theirs[name]
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b) & (b > -1e30)), name  # both mask the same keys
        torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=1e-4, msg=name)
    return shared


@pytest.mark.parametrize("process", [False, True])
def test_every_shared_hook_point_matches_transformer_lens(tmp_path, monkeypatch, process):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = checkpoint(tmp_path, n_layer=2, n_embd=32, n_head=4, n_positions=32)
    ours = HookedGPT.from_pretrained(folder) if process else HookedGPT.from_pretrained_no_processing(folder)
    theirs = bridge(folder, process)
    tokens = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        tl_logits, tl_cache = theirs.run_with_cache(tokens)
    torch.testing.assert_close(logits.log_softmax(-1), tl_logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
    shared = compare_caches(dict(cache.items()), dict(tl_cache.items()), atol=1e-4)
    assert len(shared) >= 2 * 15


@pytest.mark.slow
def test_gpt2_small_sized_matches_transformer_lens(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = checkpoint(tmp_path, n_layer=12, n_embd=768, n_head=12, n_positions=1024, std=0.02)
    ours = HookedGPT.from_pretrained(folder)
    theirs = bridge(folder, process=True)
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    names = lambda n: n.endswith(("hook_resid_post", "hook_pattern", "hook_z", "mlp.hook_post"))
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens, names_filter=names)
        tl_logits, tl_cache = theirs.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits.log_softmax(-1), tl_logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
    for name, a in cache.items():
        torch.testing.assert_close(a, tl_cache[name], atol=2e-4, rtol=1e-4, msg=name)
