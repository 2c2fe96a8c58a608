"""Caching changes no bit: a forward pass gives the same logits and activations whatever is
cached or hooked, as long as the hooks only read. Hook points that need a slower path for
their hooks (hook_scale / hook_normalized, hook_attn_scores / hook_pattern, hook_result, the
per-head hook_q/k/v_input) hand on the fast path's value unless a hook changes it, as
TransformerLens's results do not depend on what is cached either. A hook that changes a value
still gets the slow path (its edit is used), and gradients still flow through the hook points."""

import pytest
import torch
from conftest import EVERY, make_model, make_tokens
from test_model import LLAMA_STYLE

from lens.components import Norm

GEMMA3_STYLE = dict(LLAMA_STYLE, norm_offset=1.0, post_norms=True, qk_norm="head",
                    act_fn="gelu_new", window=3, windowed_layers=(0,), local_rotary_base=7.0)
GEMMA2_STYLE = dict(LLAMA_STYLE, norm_offset=1.0, post_norms=True, act_fn="gelu_new",
                    attn_softcap=5.0, final_softcap=3.0)
FAMILIES = {"gpt2": {}, "llama": LLAMA_STYLE, "gemma3": GEMMA3_STYLE, "gemma2": GEMMA2_STYLE}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EXPENSIVE = ("hook_scale", "hook_normalized", "hook_attn_scores", "hook_pattern", "hook_result",
             "hook_q_input", "hook_k_input", "hook_v_input")
FILTERS = {
    "norms": lambda n: n.endswith(("hook_scale", "hook_normalized")),
    "per_head_inputs": lambda n: n.endswith(("hook_q_input", "hook_k_input", "hook_v_input")),
    "pattern": lambda n: n.endswith(("hook_attn_scores", "hook_pattern")),
    "result": lambda n: n.endswith("hook_result"),
    "stream": lambda n: "resid" in n,
}


@pytest.fixture(params=[(f, d) for f in FAMILIES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    family, dtype = request.param
    model = make_model(**FAMILIES[family], dtype=DTYPES[dtype])
    return model, make_tokens(model, batch=3, pos=model.cfg.n_ctx)


def expensive(model):
    return [n for n in model.hook_names if n.endswith(EXPENSIVE)]


@torch.no_grad()
def test_a_cached_run_equals_a_plain_forward(setup):
    model, tokens = setup
    plain = model(tokens)
    default_logits, default = model.run_with_cache(tokens)
    every_logits, every = model.run_with_cache(tokens, names_filter=EVERY)
    assert torch.equal(default_logits, plain) and torch.equal(every_logits, plain)
    for name, f in FILTERS.items():
        logits, cache = model.run_with_cache(tokens, names_filter=f)
        assert torch.equal(logits, plain), name
        for key in cache.keys():  # two caches of different filters agree on what both hold
            assert torch.equal(cache[key], every[key]), (name, key)
    for key in default.keys():
        assert torch.equal(default[key], every[key]), key


@torch.no_grad()
def test_hooks_that_only_read_leave_every_bit(setup):
    model, tokens = setup
    plain = model(tokens)
    keep = {"none": lambda x, hook: None, "same": lambda x, hook: x,
            "clone": lambda x, hook: x.clone(), "detach": lambda x, hook: x.detach()}
    for name in expensive(model):
        for how, fn in keep.items():
            assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(name, fn)]), plain), (name, how)
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(EVERY, keep["clone"])]), plain)


@torch.no_grad()
def test_cached_slices_and_partial_runs_match_the_full_cache(setup):
    """TransformerLens's test_cache_pos_slice / stop_at_layer / start_at_layer, exactly."""
    model, tokens = setup
    _, full = model.run_with_cache(tokens)
    for i in (0, 3, -1):
        _, sliced = model.run_with_cache(tokens, pos_slice=i)
        for key in sliced.keys():  # scores and pattern are sliced along the query axis
            at = (slice(None),) * (2 if key.endswith(("hook_attn_scores", "hook_pattern")) else 1)
            assert torch.equal(sliced[key][at + (0,)], full[key][at + (i,)]), key
    assert torch.equal(model(tokens, stop_at_layer=1), full["blocks.1.hook_resid_pre"])
    assert torch.equal(model(full["blocks.1.hook_resid_pre"], start_at_layer=1), model(tokens))


PATTERN = "blocks.0.attn.hook_pattern"


def test_inference_mode_keeps_the_bits_and_sees_in_place_edits(setup):
    model, tokens = setup
    with torch.no_grad():
        plain = model(tokens)
        scaled = model.run_with_hooks(tokens, fwd_hooks=[(PATTERN, lambda x, hook: x * 0.0)])
    with torch.inference_mode():
        logits, _ = model.run_with_cache(tokens, names_filter=EVERY)
        assert torch.equal(logits, plain)
        in_place = model.run_with_hooks(tokens, fwd_hooks=[(PATTERN, lambda x, hook: x.mul_(0.0))])
    assert torch.equal(in_place, scaled) and not torch.equal(in_place, plain)


EDITS = {  # hook point -> an edit that changes the value (norms ignore a rescaled input)
    "blocks.0.ln2.hook_scale": lambda x: x * 2.0,
    "blocks.1.ln1.hook_normalized": lambda x: x + 0.5,
    "blocks.0.attn.hook_attn_scores": lambda x: x * 0.5,
    "blocks.0.attn.hook_pattern": lambda x: x * 0.0,
    "blocks.0.attn.hook_result": lambda x: x * 0.0,
    "blocks.0.hook_q_input": lambda x: x.flip(-1),
    "blocks.1.hook_k_input": lambda x: x.flip(-1),
    "blocks.1.hook_v_input": lambda x: x.flip(-1),
}


@torch.no_grad()
def test_edits_are_used_whether_returned_or_made_in_place(setup):
    model, tokens = setup
    plain = model(tokens)
    for name, edit in EDITS.items():
        returned = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: edit(x))])
        in_place = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.copy_(edit(x)))])
        assert not torch.equal(returned, plain), name
        assert torch.equal(returned, in_place), name


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@torch.no_grad()
def test_an_edit_by_one_leaves_the_slow_path_within_rounding(family):
    """x.mul_(1.0) edits in place without changing a value: the slow path runs, and differs
    from the fast one by float32 rounding only (the tolerance the docstrings state)."""
    model = make_model(**FAMILIES[family])
    tokens = make_tokens(model, batch=3, pos=model.cfg.n_ctx)
    plain = model(tokens)
    for name in expensive(model):
        out = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.mul_(1.0))])
        torch.testing.assert_close(out, plain, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_through_hook_points_that_only_read(family):
    """In float32: the loss keeps its bits, parameter gradients agree with a plain backward to
    rounding, and each read hook point sees its gradient (checked against its neighbours')."""
    model = make_model(**FAMILIES[family])
    tokens = make_tokens(model, batch=3, pos=model.cfg.n_ctx)
    loss = model(tokens, return_type="loss")
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cached_loss, cache = model.run_with_cache(tokens, names_filter=EVERY, return_type="loss",
                                              incl_bwd=True)
    assert torch.equal(cached_loss, loss.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()
    g = lambda name, l: cache[f"blocks.{l}.{name}_grad"]
    for l in range(model.cfg.n_layers):
        a = model.blocks[l].attn
        v = cache[f"blocks.{l}.attn.hook_v"].repeat_interleave(a.groups, 2)
        # d loss / d pattern[b, h, q, k] = d loss / d z[b, q, h] · v[b, k, h]
        torch.testing.assert_close(g("attn.hook_pattern", l),
                                   torch.einsum("bqhe,bkhe->bhqk", g("attn.hook_z", l), v),
                                   atol=1e-6, rtol=1e-4)
        out = "hook_attn_out_pre" if model.cfg.post_norms else "hook_attn_out"
        result = g("attn.hook_result", l)
        assert torch.equal(result, g(out, l)[:, :, None].expand_as(result))
        # the stream entering a block is read by the per-head inputs and passed on
        mid = "hook_resid_mid"
        reads = sum(g(f"hook_{x}_input", l).sum(2) for x in "qkv")
        torch.testing.assert_close(g("hook_resid_pre", l), g(mid, l) + reads, atol=1e-6, rtol=1e-4)
    # ln1's hooks read the shared stream, which no head reads when all three per-head inputs
    # are hooked (so they see no gradient then); without those, they see it
    model.zero_grad()
    cached_loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert torch.equal(cached_loss, loss.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    for l in range(model.cfg.n_layers):
        assert g("ln1.hook_scale", l).abs().sum() > 0 and g("ln1.hook_normalized", l).abs().sum() > 0


def test_retain_grad_on_a_read_hook_point_gets_its_gradient():
    model = make_model()
    tokens = make_tokens(model)
    seen = {}

    def keep(x, hook):
        x.retain_grad()
        seen[hook.name] = x

    names = ["blocks.0.attn.hook_pattern", "blocks.0.ln1.hook_scale", "blocks.1.hook_q_input",
             "blocks.1.attn.hook_result"]
    model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names], return_type="loss").backward()
    for n in names:
        assert seen[n].grad is not None and seen[n].grad.abs().sum() > 0, n


def test_a_replacement_with_equal_values_passes_the_gradient_to_what_it_came_from():
    """A hook returning alpha * x with alpha = 1 keeps the value (so the fast path's bits), and
    the gradient reaches alpha, as it would through the slow path."""
    model = make_model()
    tokens = make_tokens(model)
    alpha = torch.ones((), requires_grad=True)
    loss = model.run_with_hooks(tokens, return_type="loss",
                                fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: alpha * x)])
    with torch.no_grad():
        assert torch.equal(loss, model(tokens, return_type="loss"))
    loss.backward()
    assert alpha.grad is not None and alpha.grad != 0


@pytest.mark.parametrize("kind,offset", [("LN", 0.0), ("RMS", 0.0), ("RMS", 1.0)])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@torch.no_grad()
def test_plain_is_the_forward_norm(kind, offset, dtype):
    norm = Norm(kind, 16, 1e-5, affine=True, dtype=dtype, offset=offset)
    g = torch.Generator().manual_seed(0)
    norm.w.copy_(1 + 0.2 * torch.randn(16, generator=g))
    if norm.b is not None:
        norm.b.copy_(0.3 * torch.randn(16, generator=g))
    x = (3 * torch.randn(2, 5, 16, generator=g)).to(dtype)
    assert torch.equal(norm.plain(x), norm(x))
    assert torch.equal(norm.plain(x.double()), norm.double()(x.double()))
