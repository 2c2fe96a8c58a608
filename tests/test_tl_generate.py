"""TransformerLens's generate keywords and KV cache on lens: do_sample=False is greedy, draws
equal TransformerLens's own sample_logits under the same seed (frequency penalty included),
return_type and output_logits return what TransformerLens returns, and a frozen
HookedTransformerKeyValueCache is read but never grows."""

import pytest
import torch
from conftest import make_model, make_tokens

import lens.tl
from lens.generate import GenerateOutput, KVCache


@pytest.fixture(scope="module")
def model():
    return make_model(n_ctx=40)


@pytest.fixture(scope="module")
def text_model():
    return lens.tl.HookedTransformer.from_pretrained("lens-tiny-attn2l")


def padded(model):
    tokens = make_tokens(model, batch=3, pos=6, seed=2)
    mask = torch.ones_like(tokens)
    mask[0, :3] = mask[2, :1] = 0  # left padding
    return tokens, mask


def test_do_sample_false_is_greedy_whatever_the_temperature(model):
    tokens = make_tokens(model, batch=2, pos=5)
    greedy = model.generate(tokens, 10, temperature=0, stop_at_eos=False)
    for kw in (dict(), dict(temperature=1.7, top_k=3, seed=1), dict(temperature=0.5, freq_penalty=2.0)):
        assert torch.equal(model.generate(tokens, 10, do_sample=False, stop_at_eos=False, **kw), greedy)
    assert torch.equal(model.generate(tokens, 10, do_sample=True, temperature=0, stop_at_eos=False), greedy)
    assert not torch.equal(model.generate(tokens, 10, do_sample=True, seed=0, stop_at_eos=False), greedy)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, freq_penalty=1.5),
                                dict(temperature=0.6, top_k=8, freq_penalty=0.7)])
def test_draws_equal_transformerlens_sample_logits_under_the_same_seed(model, kw):
    """TransformerLens's generate loop (a full forward per step, utils.sample_logits on the last
    logits with the tokens so far) against lens's generate, both on torch's global generator."""
    from transformer_lens.utilities import sample_logits
    tokens = make_tokens(model, batch=3, pos=5)
    torch.manual_seed(0)
    theirs = tokens
    for _ in range(12):
        with torch.no_grad():
            logits = model(theirs)[:, -1]
        theirs = torch.cat([theirs, sample_logits(logits, tokens=theirs, **kw)[:, None]], 1)
    for use_past_kv_cache in (True, False):
        torch.manual_seed(0)
        ours = model.generate(tokens, 12, do_sample=True, stop_at_eos=False,
                              use_past_kv_cache=use_past_kv_cache, **kw)
        assert torch.equal(ours, theirs)


def test_freq_penalty_discourages_repeats(model):
    tokens = make_tokens(model, batch=4, pos=3)
    flat = [("hook_logits", lambda logits, hook: torch.zeros_like(logits))]
    out = model.generate(tokens, 30, seed=0, freq_penalty=50.0, fwd_hooks=flat, stop_at_eos=False)
    for row in out[:, 3:]:  # 30 draws from 37 tokens, every repeat penalised away
        assert len(set(row.tolist())) == 30
    with pytest.raises(ValueError, match=r"freq_penalty=-1 must be a number >= 0"):
        model.generate(tokens, 3, freq_penalty=-1)


def test_use_past_kv_cache_false_equals_true(model):
    tokens, mask = padded(model)
    for kw in (dict(do_sample=False), dict(do_sample=True, seed=3, top_p=0.9)):
        a = model.generate(tokens, 9, attention_mask=mask, use_past_kv_cache=True, output_logits=True, **kw)
        b = model.generate(tokens, 9, attention_mask=mask, use_past_kv_cache=False, output_logits=True, **kw)
        assert torch.equal(a.sequences, b.sequences)
        for la, lb in zip(a.logits, b.logits):
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same option"):
        model.generate(tokens, 2, use_kv_cache=True, use_past_kv_cache=False)


@pytest.mark.parametrize("masked", [False, True])
def test_output_logits_are_the_forward_logits(model, masked):
    tokens, mask = padded(model)
    am = mask if masked else None
    out = model.generate(tokens, 7, do_sample=False, attention_mask=am, output_logits=True,
                         stop_at_eos=False)
    assert isinstance(out, GenerateOutput) and out.sequences.shape == (3, 6 + 7)
    assert torch.equal(out.sequences, model.generate(tokens, 7, do_sample=False, attention_mask=am,
                                                     stop_at_eos=False))
    assert len(out.logits) == 7 and all(lg.shape == (3, model.cfg.d_vocab) for lg in out.logits)
    full_mask = None if am is None else torch.cat([am, torch.ones(3, 7, dtype=am.dtype)], 1)
    with torch.no_grad():
        forward = model(out.sequences, attention_mask=full_mask)
    for i, lg in enumerate(out.logits):
        torch.testing.assert_close(lg, forward[:, 5 + i], atol=1e-5, rtol=1e-5)
        assert torch.equal(lg.argmax(-1), out.sequences[:, 6 + i])
    assert out["logits"] is out.logits and out[0] is out.sequences and list(out.keys()) == ["sequences", "logits"]


def test_output_logits_stop_with_the_tokens(model):
    tokens = make_tokens(model, batch=1, pos=5, seed=2)
    free = model.generate(tokens, 10, do_sample=False, stop_at_eos=False)
    eos = int(free[0, 8])
    out = model.generate(tokens, 10, do_sample=False, eos_token_id=eos, output_logits=True)
    assert out.sequences.shape[1] == 5 + len(out.logits) and out.sequences[0, -1] == eos


def test_return_types(text_model):
    m = text_model
    text = m.generate("Hello world", 5, do_sample=False)
    assert isinstance(text, str) and text.startswith("Hello world")
    toks = m.generate("Hello world", 5, do_sample=False, return_type="tokens")
    assert toks.shape == (1, 3 + 5) and toks[0, 0] == m.tokenizer.bos_token_id
    assert m.to_string(toks[0, 1:]) == text
    assert torch.equal(m.generate(m.to_tokens("Hello world"), 5, do_sample=False), toks)
    assert m.generate(m.to_tokens("Hello world"), 5, do_sample=False, return_type="str") == text
    batch = ["Hello world", "The quick brown fox"]
    texts = m.generate(batch, 4, do_sample=False)
    assert texts == [m.generate(p, 4, do_sample=False) for p in batch]
    tokens = m.generate(batch, 4, do_sample=False, return_type="tokens")
    assert tokens.shape[0] == 2 and tokens[0, 0] == m.tokenizer.pad_token_id  # left-padded, as TL
    out = m.generate("Hello world", 5, do_sample=False, output_logits=True)  # tokens, as TL
    assert torch.equal(out.sequences, toks) and len(out.logits) == 5
    for bad in ("embeds", "list"):
        with pytest.raises(ValueError, match="return_type="):
            m.generate("Hello", 2, return_type=bad)
    with pytest.raises(TypeError):  # lens generates from tokens, not TL's embeds input
        m.generate(torch.zeros(1, 3, m.cfg.d_model), 2)


def test_prepend_bos_follows_the_model_default(text_model):
    m = text_model
    kw = dict(do_sample=False, return_type="tokens")
    assert m.generate("Hello", 2, **kw)[0, 0] == m.tokenizer.bos_token_id
    assert m.generate("Hello", 2, prepend_bos=False, **kw)[0, 0] != m.tokenizer.bos_token_id
    m.default_prepend_bos = False
    try:
        assert m.generate("Hello", 2, **kw)[0, 0] != m.tokenizer.bos_token_id
        assert m.generate("Hello", 2, do_sample=False).startswith("Hello")
    finally:
        m.default_prepend_bos = True


def test_verbose_shows_progress_and_stream_takes_the_same_keywords(model, capsys):
    tokens = make_tokens(model, batch=1, pos=4)
    model.generate(tokens, 3, do_sample=False, verbose=True)
    assert "generate" in capsys.readouterr().err
    model.generate(tokens, 3, do_sample=False)
    assert "generate" not in capsys.readouterr().err
    streamed = list(model.generate_stream(tokens, 6, do_sample=False, use_past_kv_cache=False,
                                          stop_at_eos=False))
    assert torch.equal(torch.stack(streamed, 1), model.generate(tokens, 6, do_sample=False)[:, 4:])


# ---------------------------------------------------------------- the KV cache, TL's way
def test_frozen_cache_is_read_but_not_appended_to(model):
    tokens = make_tokens(model, batch=2, pos=12, seed=4)
    prefix, cont_a, cont_b = tokens[:, :5], tokens[:, 5:8], tokens[:, 8:12]
    cache = KVCache.init_cache(model.cfg, model.cfg.device, batch_size=2)
    assert len(cache) == 0 and cache[0].past_keys.shape == (2, 0, model.cfg.n_heads, model.cfg.d_head)
    with torch.no_grad():
        torch.testing.assert_close(model(prefix, past_kv_cache=cache), model(prefix))
        cache.freeze()
        keys = [e.past_keys.clone() for e in cache.entries]
        for cont in (cont_a, cont_b, cont_a):
            full = model(torch.cat([prefix, cont], 1))
            torch.testing.assert_close(model(cont, past_kv_cache=cache), full[:, 5:], atol=1e-5, rtol=1e-5)
            assert len(cache) == 5 and all(torch.equal(e.past_keys, k) for e, k in zip(cache.entries, keys))
        cache.unfreeze()
        model(cont_a, past_kv_cache=cache)
        assert len(cache) == 8 and cache[1].past_values.shape[1] == 8
        torch.testing.assert_close(model(cont_b[:, :1], past_kv_cache=cache),
                                   model(torch.cat([prefix, cont_a, cont_b[:, :1]], 1))[:, -1:],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds a batch of 2"):
        model(prefix[:1], past_kv_cache=KVCache.init_cache(model.cfg, None, batch_size=2))


def test_frozen_cache_under_padding_and_a_new_tokens_mask(model):
    """A padded prefix keeps its mask while frozen; a mask of the new tokens only (TL's form)
    equals one over cached and new tokens (lens's)."""
    tokens, mask = padded(model)
    cont = make_tokens(model, batch=3, pos=3, seed=7)
    cont_mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
    full_mask = torch.cat([mask, cont_mask], 1)
    with torch.no_grad():
        ref = model(torch.cat([tokens, cont], 1), attention_mask=full_mask)[:, 6:]
        cache = KVCache.init_cache(model.cfg, None, batch_size=3)
        model(tokens, attention_mask=mask, past_kv_cache=cache)
        cache.freeze()
        tl_form = model(cont, attention_mask=cont_mask, past_kv_cache=cache)
        lens_form = model(cont, attention_mask=full_mask, past_kv_cache=cache)
        implicit = model(cont, past_kv_cache=cache)  # the cached mask, the new tokens real
    real = cont_mask.bool()
    torch.testing.assert_close(tl_form[real], ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens_form, tl_form, atol=1e-6, rtol=1e-6)
    ref_real = model(torch.cat([tokens, cont], 1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1))
    torch.testing.assert_close(implicit, ref_real[:, 6:].detach(), atol=1e-5, rtol=1e-5)
    assert len(cache) == 6 and torch.equal(cache.previous_attention_mask, mask.int())


def test_tl_surface_runs_generate_with_tl_keywords(text_model):
    out = text_model.generate("Hello world", max_new_tokens=4, stop_at_eos=True, do_sample=True,
                              top_k=5, temperature=0.8, freq_penalty=0.5, use_past_kv_cache=True,
                              prepend_bos=True, padding_side="left", return_type="str", verbose=False)
    assert isinstance(out, str) and out.startswith("Hello world")
    cache = KVCache.init_cache(text_model.cfg, text_model.cfg.device, 1)
    text_model(text_model.to_tokens("Hello"), past_kv_cache=cache)
    cache.freeze()
    logits = text_model(text_model.to_tokens(" world", prepend_bos=False), past_kv_cache=cache)
    torch.testing.assert_close(logits[:, -1], text_model("Hello world")[:, -1], atol=1e-4, rtol=1e-4)
    assert len(cache) == len(text_model.to_tokens("Hello")[0])
