"""Lazy attention patterns: rows computed from the cached queries and keys equal the
materialised pattern, on every attention variant, with padding and under the KV cache."""

import pytest
import torch

from conftest import make_model, make_tokens
from lens.generate import KVCache
from lens.patterns import LazyPattern

PATTERNS = lambda n: n.endswith("hook_pattern")
VARIANTS = {
    "gpt2": dict(),
    "rotary_gqa": dict(positional_embedding=False, rotary_dim=4, n_heads=4, d_head=4, n_kv_heads=2,
                       normalization="RMS", gated_mlp=True, act_fn="silu"),
    "windows": dict(positional_embedding=False, rotary_dim=8, window=3, windowed_layers=(0,),
                    local_rotary_base=100.0),
    "softcap_qknorm": dict(positional_embedding=False, rotary_dim=8, attn_softcap=5.0,
                           qk_norm="head", normalization="RMS", norm_offset=1.0),
}


def _both(model, *args, **kwargs):
    _, full = model.run_with_cache(*args, names_filter=PATTERNS, **kwargs)
    _, lazy = model.run_with_cache(*args, names_filter=PATTERNS, lazy_patterns=True, **kwargs)
    return full, lazy


def _same(full, lazy, L):
    for l in range(L):
        a, b = full["pattern", l], lazy["pattern", l]
        assert isinstance(b, LazyPattern) and b.shape == a.shape
        torch.testing.assert_close(b.tensor(), a, rtol=1e-6, atol=1e-7)
        nq = a.shape[-2]
        for index in [(slice(None), 1, -1), (0, slice(None), [nq - 1, 0]), (..., nq - 1, slice(1, 4)),
                      (1,), (slice(None), torch.tensor([1, 0]), slice(2, None))]:
            torch.testing.assert_close(b[index], a[index], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lazy.pattern(l, head=1, query=-1), a[:, 1, -1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lazy_rows_equal_the_materialised_pattern(variant):
    model = make_model(n_ctx=16, **VARIANTS[variant])
    tokens = make_tokens(model, batch=2, pos=10)
    full, lazy = _both(model, tokens)
    _same(full, lazy, model.cfg.n_layers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lazy_rows_with_padding_and_under_the_kv_cache(variant):
    model = make_model(n_ctx=16, **VARIANTS[variant])
    tokens = make_tokens(model, batch=2, pos=10)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    _same(*_both(model, tokens, attention_mask=mask), model.cfg.n_layers)
    for new in (1, 3):  # one token, then a block of new tokens after cached ones
        caches = [KVCache(model.cfg.n_layers), KVCache(model.cfg.n_layers)]
        for c in caches:
            model(tokens[:, :6], past_kv=c, attention_mask=mask[:, :6])
        _, full = model.run_with_cache(tokens[:, 6:6 + new], names_filter=PATTERNS, past_kv=caches[0],
                                       attention_mask=mask[:, :6 + new])
        _, lazy = model.run_with_cache(tokens[:, 6:6 + new], names_filter=PATTERNS, past_kv=caches[1],
                                       attention_mask=mask[:, :6 + new], lazy_patterns=True)
        assert lazy["pattern", 0].shape == (2, model.cfg.n_heads, new, 6 + new)
        _same(full, lazy, model.cfg.n_layers)


def test_pos_slice_batch_slices_device_and_remove_batch_dim():
    model = make_model(n_ctx=16)
    tokens = make_tokens(model, batch=2, pos=10)
    full, lazy = _both(model, tokens, pos_slice=[-1, 4])
    _same(full, lazy, 2)
    full, lazy = _both(model, tokens[:1], remove_batch_dim=True, device="cpu")
    assert lazy["pattern", 0].shape == full["pattern", 0].shape == (2, 10, 10)
    torch.testing.assert_close(lazy["pattern", 1][0, -1], full["pattern", 1][0, -1])
    full, lazy = _both(model, tokens)
    one = lazy.apply_slice_to_batch_dim(1)
    assert isinstance(one["pattern", 0], LazyPattern)
    torch.testing.assert_close(one["pattern", 0][0], full["pattern", 0][1, 0])
    torch.testing.assert_close(lazy.to("cpu")["pattern", 1].tensor(), full["pattern", 1])


def test_a_hook_that_edits_the_pattern_is_cached_as_it_left_it():
    model = make_model(n_ctx=16)
    tokens = make_tokens(model)

    def uniform(p, hook):
        return torch.tril(torch.ones_like(p)) / torch.tril(torch.ones_like(p)).sum(-1, keepdim=True)

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
        full, lazy = _both(model, tokens)
    assert not isinstance(lazy["pattern", 0], LazyPattern)
    torch.testing.assert_close(lazy["pattern", 0], full["pattern", 0])
    torch.testing.assert_close(lazy["pattern", 1].tensor(), full["pattern", 1])


def test_lazy_patterns_leave_the_forward_unchanged_and_as_a_tensor_they_behave_as_one():
    model = make_model(n_ctx=16)
    tokens = make_tokens(model)
    logits = model(tokens)
    out, lazy = model.run_with_cache(tokens, names_filter=PATTERNS, lazy_patterns=True)
    assert torch.equal(out, logits)
    p, ref = lazy["pattern", 1], lazy["pattern", 1].tensor()
    torch.testing.assert_close(p.sum(-1), ref.sum(-1))
    torch.testing.assert_close(torch.diagonal(p, dim1=-2, dim2=-1), torch.diagonal(ref, dim1=-2, dim2=-1))
    torch.testing.assert_close(p * 2, ref * 2)
    assert p.ndim == 4 and p.dtype == ref.dtype and len(p) == 2
    with pytest.raises(IndexError, match="out of range"):
        p[:, 5]
