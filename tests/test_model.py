"""HookedGPT against a forward pass computed by hand, and invariants of the forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import EVERY, make_model, make_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lens

EXPENSIVE = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result", "hook_q_input",
             "hook_k_input", "hook_v_input", "hook_scale", "hook_normalized")


def by_hand(model: lens.HookedGPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation of one sequence, written out with explicit loops over heads and
    positions in float64, straight from the equations of the paper."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    acts = {}

    def ln(x, prefix, name):
        mu = x.mean(-1, keepdim=True)
        scale = ((x - mu) ** 2).mean(-1, keepdim=True).add(cfg.eps).sqrt()
        acts[f"{name}.hook_scale"] = scale
        out = (x - mu) / scale
        acts[f"{name}.hook_normalized"] = out
        if f"{prefix}.w" in P:
            out = out * P[f"{prefix}.w"] + P[f"{prefix}.b"]
        return out

    n = tokens.shape[0]
    x = torch.stack([P["embed.W_E"][t] for t in tokens.tolist()])
    acts["hook_embed"] = x
    acts["hook_pos_embed"] = P["pos_embed.W_pos"][:n]
    x = x + P["pos_embed.W_pos"][:n]
    for l in range(cfg.n_layers):
        b = f"blocks.{l}"
        acts[f"{b}.hook_resid_pre"] = x
        xn = ln(x, f"{b}.ln1", f"{b}.ln1")
        q = torch.zeros(n, cfg.n_heads, cfg.d_head, dtype=torch.float64)
        k, v, z = q.clone(), q.clone(), q.clone()
        scores = torch.zeros(cfg.n_heads, n, n, dtype=torch.float64)
        pattern = torch.zeros_like(scores)
        result = torch.zeros(n, cfg.n_heads, cfg.d_model, dtype=torch.float64)
        for h in range(cfg.n_heads):
            for p in range(n):
                q[p, h] = xn[p] @ P[f"{b}.attn.W_Q"][h] + P[f"{b}.attn.b_Q"][h]
                k[p, h] = xn[p] @ P[f"{b}.attn.W_K"][h] + P[f"{b}.attn.b_K"][h]
                v[p, h] = xn[p] @ P[f"{b}.attn.W_V"][h] + P[f"{b}.attn.b_V"][h]
            for i in range(n):
                for j in range(n):
                    s = float(q[i, h] @ k[j, h]) / math.sqrt(cfg.d_head)
                    scores[h, i, j] = s if j <= i else -math.inf
                row = scores[h, i, : i + 1]
                e = torch.exp(row - row.max())
                pattern[h, i, : i + 1] = e / e.sum()
                z[i, h] = sum(pattern[h, i, j] * v[j, h] for j in range(i + 1))
                result[i, h] = z[i, h] @ P[f"{b}.attn.W_O"][h]
        attn_out = result.sum(1) + P[f"{b}.attn.b_O"]
        acts.update({f"{b}.attn.hook_q": q, f"{b}.attn.hook_k": k, f"{b}.attn.hook_v": v,
                     f"{b}.attn.hook_attn_scores": scores, f"{b}.attn.hook_pattern": pattern,
                     f"{b}.attn.hook_z": z, f"{b}.attn.hook_result": result,
                     f"{b}.hook_attn_out": attn_out})
        for s in "qkv":
            acts[f"{b}.hook_{s}_input"] = x[:, None, :].expand(n, cfg.n_heads, cfg.d_model)
        x = x + attn_out
        if not cfg.attn_only:
            acts[f"{b}.hook_resid_mid"] = acts[f"{b}.hook_mlp_in"] = x
            xn = ln(x, f"{b}.ln2", f"{b}.ln2")
            pre = xn @ P[f"{b}.mlp.W_in"] + P[f"{b}.mlp.b_in"]
            post = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
            mlp_out = post @ P[f"{b}.mlp.W_out"] + P[f"{b}.mlp.b_out"]
            acts.update({f"{b}.mlp.hook_pre": pre, f"{b}.mlp.hook_post": post,
                         f"{b}.hook_mlp_out": mlp_out})
            x = x + mlp_out
        acts[f"{b}.hook_resid_post"] = x
    x = ln(x, "ln_final", "ln_final")
    acts["hook_logits"] = x @ P["unembed.W_U"] + P["unembed.b_U"]
    return acts


@pytest.mark.parametrize("attn_only", [False, True])
def test_hand_computed_forward_at_every_hook_point(attn_only):
    # The sizes of the "Hello World" walk-through: d_model 8, 2 heads, 4 tokens.
    model = make_model(d_model=8, n_heads=2, d_vocab=11, n_ctx=8, attn_only=attn_only)
    assert_every_hook_point_matches(model, torch.tensor([[3, 1, 4, 1]]), by_hand)


def assert_every_hook_point_matches(model, tokens: torch.Tensor, by_hand_forward) -> None:
    """The cache of every hook point equals the by-hand forward's, name for name."""
    expected = by_hand_forward(model, tokens[0])
    logits, cache = model.run_with_cache(tokens, names_filter=EVERY)
    assert set(expected) == set(cache), set(expected) ^ set(cache)
    for name, want in expected.items():
        got = cache[name][0].double()
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits[0].double(), expected["hook_logits"], atol=1e-5, rtol=1e-5)


LLAMA_STYLE = dict(d_model=12, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=10, d_vocab=11, n_ctx=8,
                   normalization="RMS", positional_embedding=False, rotary_dim=4, rotary_base=100.0,
                   gated_mlp=True, act_fn="silu", attn_bias=False, attn_out_bias=False,
                   mlp_bias=False, eps=1e-6)


def by_hand_llama(model: lens.HookedGPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation of one sequence of a Llama-style model (RMSNorm, rotary positions,
    grouped-query attention, a SwiGLU MLP), in float64 with explicit loops, from the equations:
    rms(x) = sqrt(mean(x²) + eps); rotary turns dims (i, i + r/2) of each head by p·base^(-2i/r);
    query head h reads key/value head h // (n_heads / n_kv_heads); a windowed layer's query i
    sees keys i - window + 1 .. i, rotated with that layer's own base where it has one."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    acts = {}
    n, H, KV, E, r = tokens.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.rotary_dim

    def rms(x, name):
        scale = (x ** 2).mean(-1, keepdim=True).add(cfg.eps).sqrt()
        acts[f"{name}.hook_scale"], acts[f"{name}.hook_normalized"] = scale, x / scale
        return x / scale * P[f"{name}.w"]

    def rotate(vec, p, base):
        out = vec.clone()
        for i in range(r // 2):
            angle = p * base ** (-2 * i / r)
            a, b = vec[i], vec[i + r // 2]
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + r // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x = torch.stack([P["embed.W_E"][t] for t in tokens.tolist()])
    acts["hook_embed"] = x
    for l in range(cfg.n_layers):
        b = f"blocks.{l}"
        window = cfg.window_of(l) or n
        base = cfg.local_rotary_base if cfg.window_of(l) and cfg.local_rotary_base else cfg.rotary_base
        acts[f"{b}.hook_resid_pre"] = x
        xn = rms(x, f"{b}.ln1")
        q = torch.zeros(n, H, E, dtype=torch.float64)
        k, v = torch.zeros(n, KV, E, dtype=torch.float64), torch.zeros(n, KV, E, dtype=torch.float64)
        rq, rk, z = q.clone(), k.clone(), q.clone()
        for p in range(n):
            for h in range(H):
                q[p, h] = xn[p] @ P[f"{b}.attn.W_Q"][h]
                rq[p, h] = rotate(q[p, h], p, base)
            for g in range(KV):
                k[p, g] = xn[p] @ P[f"{b}.attn.W_K"][g]
                v[p, g] = xn[p] @ P[f"{b}.attn.W_V"][g]
                rk[p, g] = rotate(k[p, g], p, base)
        scores = torch.full((H, n, n), -math.inf, dtype=torch.float64)
        pattern = torch.zeros(H, n, n, dtype=torch.float64)
        result = torch.zeros(n, H, cfg.d_model, dtype=torch.float64)
        for h in range(H):
            g = h // (H // KV)
            for i in range(n):
                seen = range(max(0, i - window + 1), i + 1)
                for j in seen:
                    scores[h, i, j] = float(rq[i, h] @ rk[j, g]) / math.sqrt(E)
                e = torch.exp(scores[h, i, seen] - scores[h, i, seen].max())
                pattern[h, i, seen] = e / e.sum()
                z[i, h] = sum(pattern[h, i, j] * v[j, g] for j in seen)
                result[i, h] = z[i, h] @ P[f"{b}.attn.W_O"][h]
        attn_out = result.sum(1)
        acts.update({f"{b}.attn.hook_q": q, f"{b}.attn.hook_k": k, f"{b}.attn.hook_v": v,
                     f"{b}.attn.hook_rot_q": rq, f"{b}.attn.hook_rot_k": rk,
                     f"{b}.attn.hook_attn_scores": scores, f"{b}.attn.hook_pattern": pattern,
                     f"{b}.attn.hook_z": z, f"{b}.attn.hook_result": result,
                     f"{b}.hook_attn_out": attn_out,
                     f"{b}.hook_q_input": x[:, None, :].expand(n, H, cfg.d_model),
                     f"{b}.hook_k_input": x[:, None, :].expand(n, KV, cfg.d_model),
                     f"{b}.hook_v_input": x[:, None, :].expand(n, KV, cfg.d_model)})
        x = x + attn_out
        acts[f"{b}.hook_resid_mid"] = acts[f"{b}.hook_mlp_in"] = x
        xn = rms(x, f"{b}.ln2")
        gate = xn @ P[f"{b}.mlp.W_gate"]
        up = xn @ P[f"{b}.mlp.W_in"]
        post = gate / (1 + torch.exp(-gate)) * up
        mlp_out = post @ P[f"{b}.mlp.W_out"]
        acts.update({f"{b}.mlp.hook_pre": gate, f"{b}.mlp.hook_pre_linear": up,
                     f"{b}.mlp.hook_post": post, f"{b}.hook_mlp_out": mlp_out})
        x = x + mlp_out
        acts[f"{b}.hook_resid_post"] = x
    x = rms(x, "ln_final")
    acts["hook_logits"] = x @ P["unembed.W_U"] + P["unembed.b_U"]
    return acts


def test_hand_computed_llama_style_forward_at_every_hook_point():
    assert_every_hook_point_matches(make_model(**LLAMA_STYLE), torch.tensor([[3, 1, 4, 1, 5, 9]]),
                                    by_hand_llama)


def test_hand_computed_local_layers_with_their_own_window_and_rotary_base():
    """Gemma-3's choice: windowed layers rotate with local_rotary_base, the others with
    rotary_base (and its scaling)."""
    cfg = dict(LLAMA_STYLE, window=3, windowed_layers=(0,), local_rotary_base=7.0)
    model = make_model(**cfg)
    assert model.cfg.rope_of(0) == (7.0, None) and model.cfg.rope_of(1) == (100.0, None)
    assert_every_hook_point_matches(model, torch.tensor([[3, 1, 4, 1, 5, 9]]), by_hand_llama)


def test_weight_shapes_follow_the_paper(model):
    cfg = model.cfg
    a = model.blocks[0].attn
    assert a.W_Q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    assert a.W_O.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab)
    assert isinstance(a.W_Q, torch.nn.Parameter)
    torch.testing.assert_close(model.QK.AB, model.W_Q @ model.W_K.transpose(-1, -2))
    torch.testing.assert_close(model.OV.AB, model.W_V @ model.W_O)


def test_return_types_and_loss(model, tokens):
    logits = model(tokens)
    loss = model(tokens, return_type="loss")
    both = model(tokens, return_type="both")
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(both[1], want)
    assert model(tokens, return_type=None) is None
    per_tok = model(tokens, return_type="loss", loss_per_token=True)
    assert per_tok.shape == (tokens.shape[0], tokens.shape[1] - 1)


def test_unhooked_forward_uses_the_fused_kernel(model, tokens, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(tokens)
    assert len(calls) == model.cfg.n_layers
    calls.clear()
    # a hook that only reads the pattern leaves the fused kernel's output in the stream (the
    # materialised pattern is computed for the hook), so a cached run is bit-identical
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)])
    assert len(calls) == model.cfg.n_layers
    calls.clear()
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x * 0.5)])
    assert len(calls) == model.cfg.n_layers - 1


configs = st.fixed_dictionaries({
    "n_layers": st.integers(1, 3),
    "n_heads": st.integers(1, 3),
    "d_head": st.integers(2, 6),
    "d_model": st.sampled_from([6, 8, 12]),
    "act_fn": st.sampled_from(["gelu", "gelu_new", "relu", "silu"]),
    "normalization": st.sampled_from(["LN", "LNPre", None]),
    "attn_only": st.booleans(),
    "seed": st.integers(0, 2**16),
    "batch": st.integers(1, 3),
    "pos": st.integers(1, 9),
})
hyp = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def _model_and_tokens(c):
    c = dict(c)
    batch, pos, seed = c.pop("batch"), c.pop("pos"), c.pop("seed")
    model = make_model(seed=seed, d_vocab=23, n_ctx=10, **c)
    return model, make_tokens(model, batch, pos, seed=seed + 1)


@hyp
@given(configs)
def test_identity_hooks(c):
    model, tokens = _model_and_tokens(c)
    with torch.no_grad():
        ref = model(tokens)
        for name in model.hook_names:
            out = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x)])
            if any(name.endswith(e) for e in EXPENSIVE):
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)
            else:
                assert torch.equal(out, ref), name


@hyp
@given(configs)
def test_stream_identities(c):
    model, tokens = _model_and_tokens(c)
    with torch.no_grad():
        fused = model(tokens)
        logits, cache = model.run_with_cache(tokens, names_filter=EVERY)  # caching everything: the materialised path
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=1e-5)
    cfg = model.cfg
    for l in range(cfg.n_layers):
        pre, post = cache["resid_pre", l], cache["resid_post", l]
        pattern = cache["pattern", l]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert torch.all(pattern.triu(1) == 0)
        torch.testing.assert_close(cache["result", l].sum(2) + model.blocks[l].attn.b_O, cache["attn_out", l])
        if cfg.attn_only:
            torch.testing.assert_close(post, pre + cache["attn_out", l])
        else:
            torch.testing.assert_close(cache["resid_mid", l], pre + cache["attn_out", l])
            torch.testing.assert_close(post, cache["resid_mid", l] + cache["mlp_out", l])
    torch.testing.assert_close(cache.decompose_resid().sum(0), cache["resid_post", -1], atol=1e-5, rtol=1e-5)
    for layer in range(cfg.n_layers + 1):
        resid = model(tokens, stop_at_layer=layer)
        torch.testing.assert_close(model(resid, start_at_layer=layer), fused, atol=1e-5, rtol=1e-5)


@hyp
@given(configs)
def test_patching_whole_stream_at_layer_0_reproduces_the_other_prompt(c):
    model, tokens = _model_and_tokens(c)
    other = (tokens + 5) % model.cfg.d_vocab
    with torch.no_grad():
        _, cache = model.run_with_cache(other, names_filter="blocks.0.hook_resid_pre")
        patched = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: cache["resid_pre", 0])])
        assert torch.equal(patched, model(other))


@hyp
@given(configs)
def test_cached_gradients_equal_autograd(c):
    model, tokens = _model_and_tokens(c)
    if tokens.shape[1] < 2:
        tokens = torch.cat([tokens, tokens], 1)
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, return_type="loss")
    kept = {}

    def keep(x, hook):
        x.retain_grad()
        kept[hook.name] = x

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(names, keep)])
    loss.backward()
    for n in names:
        torch.testing.assert_close(cache[n + "_grad"], kept[n].grad, atol=1e-6, rtol=1e-5)


def test_bad_input_gets_clear_errors(model, tokens):
    with pytest.raises(ValueError, match=r"token id 37 is outside \[0, d_vocab=37\)"):
        model(torch.tensor([[1, 37]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence of 13 tokens exceeds n_ctx=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="probs")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=5)
    with pytest.raises(ValueError, match="residual stream"):
        model(tokens, start_at_layer=1)


def test_config_validation_names_the_fields():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        lens.GPTConfig(n_layers=1, d_model=10, n_heads=3, d_vocab=5, n_ctx=4)
    with pytest.raises(ValueError, match="act_fn='tanh'"):
        lens.GPTConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, act_fn="tanh")
    with pytest.raises(ValueError, match="normalization='BatchNorm'"):
        lens.GPTConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, normalization="BatchNorm")
    with pytest.raises(ValueError, match="n_layers=0"):
        lens.GPTConfig(n_layers=0, d_model=8, n_heads=2, d_vocab=5, n_ctx=4)
    cfg = lens.GPTConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, dtype="bfloat16")
    assert cfg.dtype is torch.bfloat16 and cfg.d_head == 4 and cfg.d_mlp == 32
    assert lens.GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        lens.GPTConfig.from_dict({**cfg.to_dict(), "rotary": True})
    rotary = dict(n_layers=2, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, positional_embedding=False,
                  rotary_dim=4)
    with pytest.raises(ValueError, match="local_rotary_base is the rotary base of windowed layers"):
        lens.GPTConfig(**rotary, local_rotary_base=10.0)
    with pytest.raises(ValueError, match="local_rope_scaling needs local_rotary_base"):
        lens.GPTConfig(**rotary, window=2, local_rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="local_rope_scaling of type 'linear' needs exactly"):
        lens.GPTConfig(**rotary, window=2, local_rotary_base=10.0, local_rope_scaling={"type": "linear"})
    local = lens.GPTConfig(**rotary, window=2, windowed_layers=(1,), local_rotary_base=10.0,
                           rope_scaling={"type": "linear", "factor": 8.0})
    assert lens.GPTConfig.from_dict(local.to_dict()) == local and local.rope_of(1) == (10.0, None)


def test_soft_capped_scores_and_logits_and_the_attention_scale():
    """attn_softcap / final_softcap / attn_scale (Gemma-2's choices) against the equations."""
    from lens.attribution import direct_logit_attribution, dla_hook_names, logit_lens
    from lens.processing import applied_steps, process_weights
    cap, final, scale = 2.0, 3.0, 0.7
    model = make_model(n_heads=2, attn_softcap=cap, final_softcap=final, attn_scale=1 / scale).double()
    tokens = make_tokens(model)
    logits, cache = model.run_with_cache(tokens, names_filter=EVERY)
    q, k = cache["q", 1], cache["k", 1]
    raw = torch.einsum("bqhe,bkhe->bhqk", q, k) * scale
    n = tokens.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    want = (cap * torch.tanh(raw / cap)).masked_fill(~causal, -math.inf)
    torch.testing.assert_close(cache["attn_scores", 1], want)
    assert float(cache["attn_scores", 1].max()) < cap
    resid = cache["resid_post", 1]
    before_cap = model.ln_final(resid) @ model.W_U + model.b_U
    torch.testing.assert_close(logits, final * torch.tanh(before_cap / final))
    assert float(logits.detach().abs().max()) < final
    # DLA is linear only before the cap: it adds up to the logit difference before the cap
    _, dla_cache = model.run_with_cache(tokens, names_filter=dla_hook_names(model, "head"))
    attr = direct_logit_attribution(model, dla_cache, [3, 4], [5, 6], per="head")
    want_diff = before_cap[:, -1, [3, 4]].diagonal() - before_cap[:, -1, [5, 6]].diagonal()
    torch.testing.assert_close(attr.values.sum(0) + attr.constant, want_diff)
    torch.testing.assert_close(logit_lens(model, tokens=tokens).log_probs[-1], logits[:, -1].log_softmax(-1))
    # centring the unembedding is not exact before a soft-cap: skipped, and refused when asked
    with pytest.raises(ValueError, match="soft-cap"):
        process_weights(model, fold_ln=False, center_writing_weights=False, fold_value_biases=False)
    before = model(tokens).log_softmax(-1)
    process_weights(model, strict=False)
    assert "center_unembed" not in applied_steps(model)
    torch.testing.assert_close(model(tokens).log_softmax(-1), before)


def test_left_padded_loss_equals_the_unpadded_loss():
    """A left pad's prediction of the first real token is not a real prediction."""
    model = make_model()
    real = torch.tensor([[5, 6, 7, 8]])
    alone = model(real, return_type="loss")
    padded = model(torch.tensor([[0, 0, 5, 6, 7, 8]]), return_type="loss",
                   attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(padded, alone)
    right = model(torch.tensor([[5, 6, 7, 8, 0, 0]]), return_type="loss",
                  attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(right, alone)


def test_layer_ranges_that_run_nothing_or_skip_blocks_are_refused(tmp_path):
    from lens.generate import KVCache
    model = make_model()
    tokens = make_tokens(model)
    resid = model(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match="stop_at_layer=1 comes before start_at_layer=2"):
        model(resid, start_at_layer=2, stop_at_layer=1)
    for flag in ("stop_at_layer", "start_at_layer"):
        with pytest.raises(ValueError, match=f"{flag}=True must be an int"):
            model(resid if flag == "start_at_layer" else tokens, **{flag: True})
    with pytest.raises(ValueError, match="past_kv holds 1 layers; this model has 2"):
        model(tokens, past_kv=KVCache(1))
    with pytest.raises(ValueError, match="storage_dtype=torch.int8 would truncate"):
        model.save(tmp_path / "m", storage_dtype=torch.int8)
    assert not (tmp_path / "m").exists()


def test_float_positions_and_out_of_vocab_eos_are_refused():
    from lens.cache import pos_index
    model = make_model()
    tokens = make_tokens(model)
    with pytest.raises(TypeError, match="positions must be ints"):
        model.run_with_cache(tokens, pos_slice=torch.tensor([1.5]))
    with pytest.raises(TypeError, match="positions must be ints"):
        pos_index(torch.tensor([0.0, 1.5]))
    assert pos_index([2, 3]).tolist() == [2, 3]
    for eos in (10 ** 6, -1, [3, 99]):
        with pytest.raises(ValueError, match=r"eos_token_id=.*\[0, d_vocab=37\)"):
            model.generate(tokens[:1, :3], 2, eos_token_id=eos)
