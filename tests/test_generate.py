"""Generation: the KV cache changes nothing (greedy, sampled, hooked, padded), greedy matches HF
transformers, sampling is reproducible and top-k/top-p restrict the support, return_cache is
run_with_cache on the output, and bad arguments raise errors that name the valid range."""

import inspect
import re

import pytest
import torch
from conftest import make_model, random_hf, write

import lens
from lens.generate import KVCache, generate, sample, stream
from lens.tokenizer import Tokenizer

PROMPTS = ["Hello world", "The quick brown fox jumps over", "a"]


@pytest.fixture(scope="module")
def model():
    return make_model(n_ctx=40)


@pytest.fixture(scope="module")
def text_model():
    m = make_model(d_vocab=50257, n_ctx=40)
    m.tokenizer = Tokenizer.gpt2()
    return m


def ragged(model, lengths=(3, 7, 5), seed=1):
    """A left-padded batch of random prompts of the given lengths, its mask, and the prompts."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.cfg.d_vocab, (n,), generator=g) for n in lengths]
    n = max(lengths)
    tokens = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p):], mask[i, n - len(p):] = p, 1
    return tokens, mask, prompts


def steer(model):
    vec = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    return [("blocks.1.hook_resid_pre", lambda resid, hook: resid + vec)]


def edit_position(model, p):
    vec = 10 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    return [("blocks.0.hook_resid_mid",
             lambda resid, hook: resid + vec * (hook.positions == p)[..., None])]


def pattern_scaling(model):  # a hook on the pattern: attention runs materialised
    return [("blocks.0.attn.hook_pattern", lambda pattern, hook: pattern * 0.5)]


HOOKS = {"none": lambda m: (), "steer": steer, "pos4": lambda m: edit_position(m, 4),
         "pos9": lambda m: edit_position(m, 9), "pattern": pattern_scaling}
SAMPLING = {"greedy": dict(temperature=0), "sampled": dict(temperature=1.0, seed=3),
            "top": dict(temperature=0.8, top_k=10, top_p=0.9, seed=4)}


@pytest.mark.parametrize("hooks", HOOKS)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_kv_cache_equals_no_cache(model, hooks, sampling):
    tokens = ragged(model, (6,))[0]
    fwd = HOOKS[hooks](model)
    cached = model.generate(tokens, 12, fwd_hooks=fwd, **SAMPLING[sampling])
    uncached = model.generate(tokens, 12, fwd_hooks=fwd, use_kv_cache=False, **SAMPLING[sampling])
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    if hooks != "none":  # the hook does act on the sequence
        with torch.no_grad():
            assert not torch.allclose(model.run_with_hooks(cached, fwd_hooks=fwd), model(cached))


@pytest.mark.parametrize("hooks", HOOKS)
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_left_padded_batch_equals_each_prompt_alone(model, hooks, sampling):
    tokens, mask, prompts = ragged(model)
    fwd = HOOKS[hooks](model)
    kw = SAMPLING[sampling]
    batched = model.generate(tokens, 10, attention_mask=mask, fwd_hooks=fwd, **kw)
    uncached = model.generate(tokens, 10, attention_mask=mask, fwd_hooks=fwd, use_kv_cache=False, **kw)
    torch.testing.assert_close(batched, uncached, rtol=0, atol=0)
    if sampling == "greedy":  # draws differ with the batch size; greedy tokens do not
        n = tokens.shape[1]
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], 10, fwd_hooks=fwd, **kw)[0]
            torch.testing.assert_close(batched[i, n - len(p):], alone, rtol=0, atol=0)


def test_cached_forward_equals_full_forward(model):
    tokens, mask, _ = ragged(model, (4, 9))
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        for hooked in (False, True):
            cache = KVCache(model.cfg.n_layers)
            with model.hooks(pattern_scaling(model) if hooked else ()):
                ref = model(tokens, attention_mask=mask) if hooked else full
                parts = [model(tokens[:, :5], attention_mask=mask[:, :5], past_kv=cache),
                         model(tokens[:, 5:7], past_kv=cache),  # the cache's mask grows by ones
                         model(tokens[:, 7:], attention_mask=mask, past_kv=cache)]
            real = mask.bool()
            torch.testing.assert_close(torch.cat(parts, 1)[real], ref[real], atol=1e-5, rtol=1e-5)
    assert len(cache) == tokens.shape[1]


def test_hooks_see_each_position_once_under_the_cache(model):
    tokens = ragged(model, (5,))[0]
    seen = {True: [], False: []}
    logits_seen = {True: [], False: []}
    for use in (True, False):
        record = lambda x, hook, use=use: seen[use].append(hook.positions[0].tolist())
        record_logits = lambda x, hook, use=use: logits_seen[use].append(hook.positions[0].tolist())
        with model.hooks([("blocks.0.hook_resid_pre", record)]):  # the context manager form
            model.generate(tokens, 4, temperature=0, use_kv_cache=use,
                           fwd_hooks=[("hook_logits", record_logits)])
    assert seen[True] == [[0, 1, 2, 3, 4], [5], [6], [7]]
    assert seen[False] == [list(range(n)) for n in range(5, 9)]
    assert logits_seen[True] == logits_seen[False] == [[4], [5], [6], [7]]  # the last only


def test_greedy_matches_hf(tmp_path):
    hf = random_hf()
    model = lens.HookedGPT.from_pretrained_no_processing(write(hf, tmp_path))
    tokens = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :4] = mask[2, :2] = 0  # left padding
    for am in (torch.ones_like(tokens), mask):
        with torch.no_grad():
            theirs = hf.generate(tokens, attention_mask=am, max_new_tokens=15, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        ours = model.generate(tokens, 15, temperature=0, attention_mask=am, stop_at_eos=False)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_seeded_sampling_is_reproducible(model):
    tokens = ragged(model, (4, 4))[0]
    a = model.generate(tokens, 15, seed=7)
    assert torch.equal(a, model.generate(tokens, 15, seed=7))
    assert not torch.equal(a, model.generate(tokens, 15, seed=8))
    streamed = torch.stack(list(model.generate_stream(tokens, 15, seed=7)), 1)
    assert torch.equal(streamed, a[:, 4:])


PROBS = {5: 0.4, 9: 0.3, 2: 0.2}  # the remaining 0.1 spread over the other 34 tokens


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (None, None, None), (2, None, {5, 9}), (None, 0.65, {5, 9}), (None, 0.75, {2, 5, 9}),
    (3, 0.35, {5}), (1, None, {5})])
def test_top_k_and_top_p_restrict_the_support(model, top_k, top_p, allowed):
    probs = torch.full((model.cfg.d_vocab,), 0.1 / (model.cfg.d_vocab - 3))
    for t, p in PROBS.items():
        probs[t] = p
    fixed = lambda logits, hook: probs.log().expand_as(logits).clone()
    tokens = torch.zeros(64, 1, dtype=torch.long)
    out = model.generate(tokens, 12, top_k=top_k, top_p=top_p, seed=0,
                         fwd_hooks=[("hook_logits", fixed)])
    drawn = set(out[:, 1:].flatten().tolist())
    if allowed is None:  # no restriction: the unlikely tokens do show up in 768 draws
        assert drawn > set(PROBS)
    else:
        assert drawn == allowed


def test_return_cache_is_run_with_cache_on_the_output(model):
    tokens, mask, _ = ragged(model)
    for am, fwd in ((None, ()), (mask, steer(model))):
        out, cache = model.generate(tokens, 6, seed=1, attention_mask=am, fwd_hooks=fwd,
                                    return_cache=True)
        full_mask = None if am is None else torch.cat([am, torch.ones(3, 6, dtype=am.dtype)], 1)
        with torch.no_grad(), model.hooks(fwd):
            _, ref = model.run_with_cache(out, attention_mask=full_mask)
        assert set(cache) == set(ref)
        for k in ref:
            torch.testing.assert_close(cache[k], ref[k], rtol=0, atol=0)
        assert cache["resid_post", -1].shape[1] == tokens.shape[1] + 6


def test_strings_in_strings_out(text_model):
    one = text_model.generate("Hello world", 5, temperature=0)
    assert isinstance(one, str) and one.startswith("Hello world")
    many = text_model.generate(PROMPTS, 5, temperature=0)
    assert many == [text_model.generate(p, 5, temperature=0) for p in PROMPTS]
    assert text_model.generate(PROMPTS, 5, temperature=0, padding_side="right") == many
    out, cache = text_model.generate(PROMPTS, 4, temperature=0, return_cache=True)
    n = text_model.to_tokens(PROMPTS).shape[1]
    assert isinstance(out, list) and cache["embed"].shape[:2] == (3, n + 4)
    pieces = list(stream(text_model, "Hello world", 5, temperature=0, progress=True))
    assert len(pieces) == 5 and all(isinstance(p, str) for p in pieces)
    toks = text_model.generate(text_model.to_tokens("Hello world")[0], 5, temperature=0)
    assert toks.ndim == 1 and text_model.to_string(toks[1:]) == one


def test_stops_at_eos(model):
    tokens = ragged(model, (5, 5), seed=2)[0]
    free = model.generate(tokens, 10, temperature=0)
    eos = int(free[0, 8])  # row 0 makes it at its 4th new token
    stopped = model.generate(tokens, 10, temperature=0, eos_token_id=eos)
    first = [int((row[5:] == eos).nonzero()[0]) if (row[5:] == eos).any() else 10 for row in free]
    assert stopped.shape[1] == 5 + min(max(first) + 1, 10)
    for i, f in enumerate(first):
        assert torch.equal(stopped[i, :5 + f + 1], free[i, :5 + f + 1])
        assert (stopped[i, 5 + f + 1:] == eos).all()  # finished rows continue with EOS
    assert torch.equal(model.generate(tokens, 10, temperature=0, eos_token_id=eos,
                                      stop_at_eos=False), free)


def test_bad_arguments(model):
    tokens = ragged(model, (30,))[0]
    with pytest.raises(ValueError, match=r"prompt of 30 tokens \+ max_new_tokens=11 = 41 exceeds n_ctx=40"):
        model.generate(tokens, 11)
    model.generate(tokens, 10, temperature=0)  # exactly n_ctx is fine
    for kw, match in [(dict(temperature=-0.5), r"temperature=-0.5 must be a number >= 0"),
                      (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
                      (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
                      (dict(top_k=0), r"top_k=0 must be an int >= 1"),
                      (dict(padding_side="middle"), "valid values are 'left' and 'right'")]:
        with pytest.raises(ValueError, match=match):
            model.generate(tokens[:, :5], 3, **kw)
    with pytest.raises(ValueError, match="must then be None or n_layers=2"):
        model(tokens, past_kv=KVCache(2), stop_at_layer=1)


def plain(fn):
    """fn without the test run's runtime type checks: the errors a caller sees by default."""
    return inspect.unwrap(fn)


def test_seeds_outside_torchs_range_are_refused(model):
    tokens = ragged(model, (3,))[0]
    for seed in (1.5, "a", 2 ** 70, -2 ** 63 - 1, True):
        match = rf"seed={re.escape(repr(seed))} must be an int in \[-2\*\*63, 2\*\*64 - 1\] or None"
        with pytest.raises(ValueError, match=match):
            plain(generate)(model, tokens, 2, seed=seed)
        with pytest.raises(ValueError, match=match):
            list(plain(stream)(model, tokens, 2, seed=seed))
    for seed in (2 ** 64 - 1, -2 ** 63):  # the ends of the range
        assert torch.equal(model.generate(tokens, 3, seed=seed), model.generate(tokens, 3, seed=seed))


def test_eos_token_id_may_be_a_one_token_string(text_model):
    tokens = text_model.to_tokens("Hello world")
    free = text_model.generate(tokens, 6, temperature=0, stop_at_eos=False)
    tok = text_model.tokenizer
    # a generated token whose text is that one token again
    eos = next(int(t) for t in free[0, tokens.shape[1] + 1:]
               if tok.encode(text_model.to_single_str_token(int(t))) == [int(t)])
    text = text_model.to_single_str_token(eos)
    assert torch.equal(text_model.generate(tokens, 6, temperature=0, eos_token_id=text),
                       text_model.generate(tokens, 6, temperature=0, eos_token_id=eos))
    assert torch.equal(text_model.generate(tokens, 6, temperature=0, eos_token_id=[text, 0]),
                       text_model.generate(tokens, 6, temperature=0, eos_token_id=[eos, 0]))
    assert text_model.generate(tokens, 2, eos_token_id="<|endoftext|>").shape[0] == 1
    with pytest.raises(ValueError, match=r"eos_token_id='hello world': .*is 2 tokens, not one"):
        text_model.generate(tokens, 2, eos_token_id="hello world")


def test_eos_token_ids_that_are_not_ids_are_refused(model):
    tokens = ragged(model, (3,))[0]
    for eos in (1.0, [3, 1.0], True, [], torch.tensor([1.0])):
        with pytest.raises(ValueError, match=r"eos_token_id=.*: give a token id in \[0, d_vocab=37\), a string"):
            plain(generate)(model, tokens, 2, eos_token_id=eos)
    with pytest.raises(ValueError, match="eos_token_id='<.endoftext.>': .*no tokenizer"):
        model.generate(tokens, 2, eos_token_id="<|endoftext|>")


# (argmax of +inf logits is a choice, a hook forcing a token: greedy takes it)
@pytest.mark.parametrize("fill,what,temperature", [
    (float("nan"), "NaN", 1.0), (float("-inf"), "-inf at every token", 1.0),
    (float("inf"), r"\+inf", 1.0), (float("nan"), "NaN", 0), (float("-inf"), "-inf at every token", 0)])
def test_logits_no_token_can_come_from_are_refused(model, fill, what, temperature):
    tokens = ragged(model, (3, 3))[0]

    def spoil_row_1(logits, hook):
        logits = logits.clone()
        logits[1] = fill
        return logits

    how = "drawn" if temperature else "chosen"
    with pytest.raises(ValueError, match=rf"no next token can be {how} for row\(s\) \[1\] of the "
                                         rf"batch: the logits of row 1 hold {what}"):
        model.generate(tokens, 2, temperature=temperature, seed=0,
                       fwd_hooks=[("hook_logits", spoil_row_1)])


def test_sample_takes_batch_by_vocab_logits():
    for shape in [(37,), (2, 3, 37)]:
        with pytest.raises(ValueError, match=rf"logits must be \[batch, d_vocab\].*got shape {re.escape(str(shape))}"):
            sample(torch.randn(shape))
    assert sample(torch.randn(2, 37), temperature=0).shape == (2,)


def test_a_mask_may_be_a_list_and_holds_only_0_and_1(model):
    tokens, mask, _ = ragged(model)
    want = model.generate(tokens, 3, temperature=0, attention_mask=mask)
    assert torch.equal(plain(generate)(model, tokens, 3, temperature=0, attention_mask=mask.tolist()), want)
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(pad\) and 1"):
        model.generate(tokens, 3, attention_mask=mask * 2)


def test_strings_take_no_attention_mask(text_model):
    for prompt, mask in (("Hello world", torch.ones(1, 3)), (PROMPTS, torch.ones(3, 8))):
        with pytest.raises(ValueError, match="attention_mask is for token input"):
            text_model.generate(prompt, 2, attention_mask=mask)
        with pytest.raises(ValueError, match="attention_mask is for token input"):
            list(stream(text_model, prompt, 2, attention_mask=mask))


def test_hook_names_are_checked_before_any_step(model):
    tokens = ragged(model, (3,))[0]
    for n in (0, 2):
        with pytest.raises(KeyError, match="unknown hook point 'nope'"):
            model.generate(tokens, n, fwd_hooks=[("nope", lambda x, hook: x)])
        with pytest.raises(KeyError, match="unknown hook point 'nope'"):
            list(stream(model, tokens, n, fwd_hooks=[("nope", lambda x, hook: x)]))
    with pytest.raises(ValueError, match=r"fwd_hooks entry 'hook_embed' must be a \(hook name, function\) pair"):
        model.generate(tokens, 0, fwd_hooks=["hook_embed"])
    with pytest.raises(TypeError, match="hook function for 'hook_embed' is not callable"):
        model.generate(tokens, 0, fwd_hooks=[("hook_embed", None)])
    calls = []
    hooks = ((n, lambda x, hook: calls.append(1)) for n in ["hook_embed"])  # a generator
    model.generate(tokens, 3, fwd_hooks=hooks, temperature=0)
    assert len(calls) == 3  # at every step, not only the first
