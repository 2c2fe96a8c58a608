"""Activation, attribution and path patching: batched, layer-skipping sweeps equal the naive loop
of one full forward per patch; attribution patching is exact where the model is linear in the
patched activation; path patching equals a hand-written three-step version."""

import inspect

import pytest
import torch
from conftest import EVERY, make_model, make_tokens

from lens.cache import act_name
from lens.patching import (PatchResult, activation_patch, attribution_patch, path_patch,
                           path_patch_senders)

# where the position and head axes of each site's activation [batch, ...] are
AXES = {**{s: (1, None) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pre", "post")},
        **{s: (1, 2) for s in ("z", "q", "k", "v", "result")}, "pattern": (2, 1)}
MLP_SITES = ("resid_mid", "mlp_out", "pre", "post")
CASES = [(site, per) for site, (_, head) in AXES.items()
         for per in (("layer", "layer_pos", "head", "head_pos") if head else ("layer", "layer_pos"))]


def logit_diff(logits):  # [batch]
    return logits[:, -1, 3] - logits[:, -1, 5]


def coupled(logits):  # a scalar that mixes the prompts of the batch: it must see the original batch
    return logits[0, -1].log_softmax(-1)[3] * logits[1, :, 5].mean()


def tokens_pair(model, batch=2, pos=5):
    clean = make_tokens(model, batch, pos, seed=1)
    corrupted = clean.clone()
    corrupted[:, 1] = make_tokens(model, batch, pos, seed=2)[:, 1]  # two prompts differing in
    corrupted[:, 3] = make_tokens(model, batch, pos, seed=3)[:, 3]  # two positions
    return clean, corrupted


def naive_patched_logits(model, clean, corrupted, site, per, direction):
    """One full forward per patch, copying the source activation into the base run with a hook:
    the logits of each patch, in the order layer, (head), (position)."""
    base, src = (corrupted, clean) if direction == "clean_to_corrupted" else (clean, corrupted)
    _, src_cache = model.run_with_cache(src, names_filter=EVERY)
    pos_axis, head_axis = AXES[site]
    heads = range(model.cfg.n_heads) if per.startswith("head") else [None]
    positions = range(base.shape[1]) if per.endswith("pos") else [None]
    logits = []
    for layer in range(model.cfg.n_layers):
        name = act_name(site, layer)
        for h in heads:
            for p in positions:
                idx = [slice(None)] * src_cache[name].ndim
                if p is not None:
                    idx[pos_axis] = p
                if h is not None:
                    idx[head_axis] = h

                def hook(act, hook, idx=tuple(idx)):
                    act = act.clone()
                    act[idx] = src_cache[hook.name][idx]
                    return act

                logits.append(model.run_with_hooks(base, fwd_hooks=[(name, hook)]))
    return logits


def naive_values(model, logits, metric, per, n_pos):
    values = [m.mean() if m.ndim else m for m in map(metric, logits)]
    shape = (model.cfg.n_heads,) * per.startswith("head") + (n_pos,) * per.endswith("pos")
    return torch.stack(values).view(model.cfg.n_layers, *shape)


MODELS = {
    "gpt2-like": dict(n_layers=2),
    "attn-only": dict(n_layers=2, attn_only=True),
    "no-LN": dict(n_layers=2, normalization=None),
}


# per-position sweeps compute only the positions from the patch on, over the base run's keys
# and values before it: held to the naive loop on rotary, grouped-query, windowed and
# soft-capped attention too
VARIANTS = {
    "rotary-gqa": dict(positional_embedding=False, rotary_dim=4, n_heads=4, d_head=4, n_kv_heads=2,
                       normalization="RMS", gated_mlp=True, act_fn="silu"),
    "windows": dict(positional_embedding=False, rotary_dim=8, window=2, windowed_layers=(0,),
                    local_rotary_base=100.0),
    "softcap-qknorm": dict(positional_embedding=False, rotary_dim=8, attn_softcap=5.0, qk_norm="head",
                           normalization="RMS", norm_offset=1.0, parallel_attn_mlp=True),
}


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("site,per", [("z", "head_pos"), ("resid_pre", "layer_pos"), ("pattern", "head_pos"),
                                      ("resid_post", "layer_pos"), ("q", "head_pos"), ("mlp_out", "layer_pos")])
def test_per_position_sweeps_equal_the_naive_loop_on_every_attention(kind, site, per):
    model = make_model(0, n_ctx=16, **VARIANTS[kind])
    clean, corrupted = tokens_pair(model, pos=6)
    logits = naive_patched_logits(model, clean, corrupted, site, per, "clean_to_corrupted")
    for metric, batch_size in ((logit_diff, 3), (coupled, None)):
        got = activation_patch(model, clean, corrupted, metric, site=site, per=per,
                               batch_size=batch_size, progress=False)
        torch.testing.assert_close(got.values, naive_values(model, logits, metric, per, clean.shape[1]),
                                   atol=2e-5, rtol=2e-5)
        every = activation_patch(model, clean, corrupted, metric, site=site, per=per,
                                 batch_size=batch_size, progress=False, skip_prefix=False)
        torch.testing.assert_close(got.values, every.values, atol=2e-5, rtol=2e-5)
    # the unembedding only where the metric reads (the last position; coupled reads them all)
    read = activation_patch(model, clean, corrupted, logit_diff, site=site, per=per, progress=False,
                            logit_positions=[-1])
    want = activation_patch(model, clean, corrupted, logit_diff, site=site, per=per, progress=False)
    torch.testing.assert_close(read.values, want.values, atol=2e-5, rtol=2e-5)
    read = activation_patch(model, clean, corrupted, coupled, site=site, per=per, progress=False,
                            logit_positions=range(clean.shape[1]))
    torch.testing.assert_close(read.values, got.values, atol=2e-5, rtol=2e-5)
    # and only the vocabulary entries it reads (the two of the logit difference)
    for positions in ([-1], None):
        cols = activation_patch(model, clean, corrupted, logit_diff, site=site, per=per, progress=False,
                                logit_positions=positions, logit_tokens=[3, 5])
        torch.testing.assert_close(cols.values, want.values, atol=2e-5, rtol=2e-5)


def test_a_metric_that_reads_other_positions_than_it_says_is_refused(model):
    clean, corrupted = tokens_pair(model)
    with pytest.raises(ValueError, match="reads logits at positions other than logit_positions=\\[0\\]"):
        activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos", progress=False,
                         logit_positions=[0])
    for bad in ([7], [], [-9]):
        with pytest.raises(ValueError, match="logit_positions"):
            activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos", progress=False,
                             logit_positions=bad)
    with pytest.raises(ValueError, match=r"reads logits other than logit_positions=\[-1\] and logit_tokens=\[3\]"):
        activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos", progress=False,
                         logit_positions=[-1], logit_tokens=[3])
    with pytest.raises(ValueError, match="logit_tokens"):  # log_softmax reads every token
        activation_patch(model, clean, corrupted, coupled, site="z", per="head", progress=False,
                         logit_tokens=[3, 5])
    for bad, error in (([37], ValueError), ([], ValueError), ([1.5], TypeError), (["a"], TypeError)):
        with pytest.raises(error, match="logit_tokens"):
            activation_patch(model, clean, corrupted, logit_diff, site="z", per="head", progress=False,
                             logit_tokens=bad)


def test_logit_tokens_on_tied_embeddings_and_under_a_logits_hook():
    model = make_model(2, tied_embeddings=True)
    clean, corrupted = tokens_pair(model)
    want = activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos", progress=False)
    got = activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos", progress=False,
                           logit_positions=[-1], logit_tokens=[5, 3])
    torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=2e-5)
    seen = []  # a hook on hook_logits sees whole rows of the vocabulary, as without logit_tokens
    with model.hooks(fwd_hooks=[("hook_logits", lambda x, hook: seen.append(x.shape[-1]))]):
        got = activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos",
                               progress=False, logit_positions=[-1], logit_tokens=[5, 3])
    torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=2e-5)
    assert seen and set(seen) == {model.cfg.d_vocab}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("site,per", CASES)
def test_activation_patch_equals_naive_loop(kind, site, per):
    model = make_model(0, **MODELS[kind])
    if model.cfg.attn_only and site in MLP_SITES:
        pytest.skip("no MLP in an attention-only model")
    clean, corrupted = tokens_pair(model)
    for direction in ("clean_to_corrupted", "corrupted_to_clean"):
        logits = naive_patched_logits(model, clean, corrupted, site, per, direction)
        # several patches per forward (a remainder chunk with batch_size=3) and the default
        for metric, batch_size in ((logit_diff, 3), (coupled, None)):
            got = activation_patch(model, clean, corrupted, metric, site=site, per=per,
                                   direction=direction, batch_size=batch_size, progress=False)
            want = naive_values(model, logits, metric, per, clean.shape[1])
            assert got.values.shape == want.shape
            torch.testing.assert_close(got.values, want, atol=2e-5, rtol=2e-5)
            assert (got.site, got.per, got.direction) == (site, per, direction)
            assert list(got.labels) == (["layer"] + ["head"] * per.startswith("head")
                                        + ["pos"] * per.endswith("pos"))


def test_invariants_of_activation_patching(model):
    clean, corrupted = tokens_pair(model)
    # clean into clean changes nothing
    same = activation_patch(model, clean, clean, logit_diff, site="z", per="head_pos", progress=False)
    torch.testing.assert_close(same.values, torch.full_like(same.values, same.clean_metric), atol=1e-5, rtol=0)
    # the whole stream at layer 0 (or after the last layer) patched from clean is the clean run
    for site, layer in (("resid_pre", 0), ("resid_post", -1)):
        r = activation_patch(model, clean, corrupted, logit_diff, site=site, per="layer", progress=False)
        assert r.values[layer].item() == pytest.approx(r.clean_metric, abs=1e-5)
        assert r.baseline == r.corrupted_metric != r.clean_metric
    # a memory budget of one copy gives one patch per forward, with the same values
    one = activation_patch(model, clean, corrupted, logit_diff, site="pattern", per="head_pos",
                           memory_budget=1, progress=False)
    many = activation_patch(model, clean, corrupted, logit_diff, site="pattern", per="head_pos", progress=False)
    torch.testing.assert_close(one.values, many.values, atol=1e-5, rtol=1e-5)


def test_progress_bar_labels_and_plots(model, tmp_path, capsys):
    from lens.tokenizer import Tokenizer
    clean, corrupted = tokens_pair(model)
    r = activation_patch(model, clean, corrupted, logit_diff, site="z", per="head_pos")
    assert "patching z per head_pos" in capsys.readouterr().err
    assert r.labels == {"layer": [0, 1], "head": [0, 1], "pos": list(range(5))}
    for per in ("layer", "layer_pos", "head", "head_pos"):
        res = activation_patch(model, clean, corrupted, logit_diff, site="q", per=per, progress=False)
        res.plot(path=tmp_path / f"{per}.png")
        assert (tmp_path / f"{per}.png").stat().st_size > 0
    model.tokenizer = Tokenizer.gpt2()
    r = activation_patch(model, clean, corrupted, logit_diff, site="resid_pre", per="layer_pos", progress=False)
    assert r.labels["pos"] == [f"{t}_{i}" for i, t in enumerate(model.to_str_tokens(clean[0]))]


# runs skip the positions where the two prompts agree (before the first one that differs in any
# prompt of the batch, p0): a patch there scores the base run, and every other run computes only
# the positions from p0 on. Held to the naive loop where the prompts differ first at position 0,
# late, or nowhere.
FIRST = {"from 0": 0, "from 3 of 6": 3, "last only": 5, "identical": 6}
SKIP_CASES = [("z", "layer"), ("z", "head"), ("z", "head_pos"), ("resid_pre", "layer"),
              ("resid_pre", "layer_pos"), ("pattern", "head"), ("pattern", "head_pos"), ("k", "layer_pos"),
              ("k", "head"), ("mlp_out", "layer"), ("mlp_out", "layer_pos"), ("resid_post", "layer")]


def agreeing_until(model, first, batch=2, pos=6):
    """Prompts that agree before `first` and differ there in the last prompt only (the first
    prompt differs at the last position), identical when first == pos."""
    clean = make_tokens(model, batch, pos, seed=1)
    corrupted = clean.clone()
    if first < pos:
        for row, col in ((-1, first), (0, pos - 1)):
            corrupted[row, col] = (clean[row, col] + 1) % model.cfg.d_vocab
    return clean, corrupted


def assert_sweeps_equal_the_naive_loop(model, clean, corrupted, site, per):
    logits = naive_patched_logits(model, clean, corrupted, site, per, "clean_to_corrupted")
    for metric, batch_size, read, cols in ((logit_diff, 3, None, None), (coupled, None, None, None),
                                           (logit_diff, 2, [-1], None), (logit_diff, 2, [-1], [3, 5])):
        got = activation_patch(model, clean, corrupted, metric, site=site, per=per, batch_size=batch_size,
                               progress=False, logit_positions=read, logit_tokens=cols)
        torch.testing.assert_close(got.values, naive_values(model, logits, metric, per, clean.shape[1]),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("first", list(FIRST.values()), ids=list(FIRST))
@pytest.mark.parametrize("site,per", SKIP_CASES)
def test_sweeps_skip_the_positions_where_the_prompts_agree(first, site, per):
    model = make_model(8, n_ctx=16)
    assert_sweeps_equal_the_naive_loop(model, *agreeing_until(model, first), site, per)


@pytest.mark.parametrize("first", [0, 3, 6])
@pytest.mark.parametrize("site,per", [("z", "layer"), ("z", "head_pos"), ("resid_pre", "layer_pos"),
                                      ("pattern", "head"), ("mlp_out", "layer")])
def test_skipping_agreeing_positions_on_rotary_grouped_query_attention(first, site, per):
    model = make_model(0, n_ctx=16, **VARIANTS["rotary-gqa"])
    assert_sweeps_equal_the_naive_loop(model, *agreeing_until(model, first), site, per)


# ---------------------------------------------------------------------- attribution patching
LINEAR_SITES = {
    # No LayerNorm and no MLP: the logits are W_U (resid_pre + Σ heads' z W_O + b_O) + b_U after the
    # last layer, so a logit difference is linear in that layer's z, result, attn_out, resid_post,
    # in v (z = pattern · v, and the pattern does not depend on v) and in the pattern (v fixed).
    "attn-only": (dict(n_layers=2, attn_only=True, normalization=None),
                  ("z", "result", "v", "pattern", "attn_out", "resid_post")),
    # No LayerNorm: the last MLP's output W_out · post + b_out reaches the logits linearly.
    "mlp": (dict(n_layers=2, normalization=None), ("post", "mlp_out", "resid_post")),
}


@pytest.mark.parametrize("kind", list(LINEAR_SITES))
def test_attribution_is_exact_where_the_model_is_linear(kind):
    cfg, sites = LINEAR_SITES[kind]
    model = make_model(3, **cfg)
    clean, corrupted = tokens_pair(model)
    for site in sites:
        pers = ("layer", "layer_pos", "head", "head_pos") if AXES[site][1] else ("layer", "layer_pos")
        for per in pers:
            for direction in ("clean_to_corrupted", "corrupted_to_clean"):
                kw = dict(site=site, per=per, direction=direction, progress=False)
                act = activation_patch(model, clean, corrupted, logit_diff, **kw)
                attr = attribution_patch(model, clean, corrupted, logit_diff, **kw)
                assert attr.values.shape == act.values.shape
                torch.testing.assert_close(attr.values[-1], act.values[-1] - act.baseline, atol=1e-4, rtol=1e-4)
                if site == "z":  # the first layer reaches the logits through softmax: not exact there
                    assert not torch.allclose(attr.values[0], act.values[0] - act.baseline, atol=1e-3)


def test_attribution_correlates_with_activation_patching():
    model = make_model(4, n_layers=3)
    clean, corrupted = tokens_pair(model, batch=3, pos=8)
    for site, per in (("z", "head_pos"), ("resid_pre", "layer_pos"), ("mlp_out", "layer_pos")):
        act = activation_patch(model, clean, corrupted, logit_diff, site=site, per=per, progress=False)
        attr = attribution_patch(model, clean, corrupted, logit_diff, site=site, per=per)
        pair = torch.stack([(act.values - act.baseline).flatten(), attr.values.flatten()])
        r = torch.corrcoef(pair)[0, 1].item()
        print(f"attribution vs activation patching, {site} per {per}, random model: r = {r:.3f}")
        assert r > 0.3


def test_attribution_with_frozen_weights(model):
    clean, corrupted = tokens_pair(model)
    want = attribution_patch(model, clean, corrupted, logit_diff, site="z", per="head")
    model.requires_grad_(False)
    with torch.no_grad():
        got = attribution_patch(model, clean, corrupted, logit_diff, site="z", per="head")
    torch.testing.assert_close(got.values, want.values)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- path patching
def naive_path_patch(model, clean, corrupted, metric, senders, receivers, direction):
    """The IOI paper's three steps with full forward passes."""
    base, src = (corrupted, clean) if direction == "clean_to_corrupted" else (clean, corrupted)
    _, base_cache = model.run_with_cache(base, names_filter=EVERY)
    _, src_cache = model.run_with_cache(src, names_filter=EVERY)

    def freeze(z, hook):  # every head at its base value, the senders at their source value
        z = base_cache[hook.name].clone()
        for layer, head in senders:
            if layer == hook.layer():
                z[:, :, head] = src_cache[hook.name][:, :, head]
        return z

    recv = [(f"blocks.{r[0]}.hook_{r[2]}_input", r[1]) if len(r) == 3 else (r, None) for r in receivers]
    names = sorted({n for n, _ in recv})
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x.clone()

    model.run_with_hooks(base, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), freeze)]
                         + [(n, grab) for n in names])

    def put(x, hook):
        x = x.clone()
        for n, head in recv:
            if n == hook.name and head is None:
                x = seen[n]
            elif n == hook.name:
                x[:, :, head] = seen[n][:, :, head]
        return x

    m = metric(model.run_with_hooks(base, fwd_hooks=[(n, put) for n in names]))
    return float((m.mean() if m.ndim else m).detach())


PATHS = [
    ([(0, 1)], [(1, 0, "q")]),
    ([(0, 0), (1, 1)], [(2, 1, "k"), (2, 0, "v"), (1, 0, "q")]),
    ([(0, 1), (1, 0)], ["blocks.1.hook_resid_mid"]),
    ([(1, 1)], ["blocks.2.mlp.hook_post", (2, 0, "q")]),
    ([(2, 1)], ["blocks.2.hook_attn_out"]),  # a head reaches its own layer's output
]


@pytest.mark.parametrize("senders,receivers", PATHS)
@pytest.mark.parametrize("direction", ["clean_to_corrupted", "corrupted_to_clean"])
def test_path_patch_equals_naive(senders, receivers, direction):
    model = make_model(5, n_layers=3)
    clean, corrupted = tokens_pair(model)
    for metric in (logit_diff, coupled):
        got = path_patch(model, clean, corrupted, metric, [list(s) for s in senders], receivers,
                         direction=direction)
        want = naive_path_patch(model, clean, corrupted, metric, senders, receivers, direction)
        assert got == pytest.approx(want, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2-like", "attn-only"])
def test_path_patch_senders_equals_naive(kind):
    model = make_model(6, **{**MODELS[kind], "n_layers": 3})
    clean, corrupted = tokens_pair(model)
    receivers = [(2, 0, "q"), (2, 1, "k"), "blocks.1.hook_resid_post"]
    r = path_patch_senders(model, clean, corrupted, logit_diff, receivers, batch_size=4, progress=False)
    want = torch.tensor([[naive_path_patch(model, clean, corrupted, logit_diff, [(l, h)], receivers,
                                           "clean_to_corrupted") for h in range(2)] for l in range(3)])
    torch.testing.assert_close(r.values, want, atol=1e-5, rtol=1e-5)
    assert (r.site, r.per) == ("z", "head")
    torch.testing.assert_close(r.values[2], torch.full((2,), r.baseline))  # layer 2 reaches none


def test_path_patching_to_the_final_stream_from_the_last_layer_is_activation_patching():
    # A head in the last layer reaches the final stream only directly, and path patching leaves
    # the last MLP free to recompute (as activation patching does), so its path effect on
    # blocks.{L-1}.hook_resid_post is exactly activation patching of its z.
    model = make_model(7, n_layers=3)
    clean, corrupted = tokens_pair(model)
    for direction in ("clean_to_corrupted", "corrupted_to_clean"):
        act = activation_patch(model, clean, corrupted, logit_diff, site="z", per="head",
                               direction=direction, progress=False)
        for receiver in ("blocks.2.hook_resid_post", ("resid_post", -1)):
            paths = path_patch_senders(model, clean, corrupted, logit_diff, [receiver],
                                       direction=direction, progress=False)
            torch.testing.assert_close(paths.values[-1], act.values[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", list(FIRST.values()), ids=list(FIRST))
def test_path_patching_skips_the_positions_where_the_prompts_agree(first):
    model = make_model(5, n_layers=3, n_ctx=16)
    clean, corrupted = agreeing_until(model, first)
    for senders, receivers in PATHS[:4]:
        for direction in ("clean_to_corrupted", "corrupted_to_clean"):
            for metric in (logit_diff, coupled):
                got = path_patch(model, clean, corrupted, metric, senders, receivers, direction=direction)
                want = naive_path_patch(model, clean, corrupted, metric, senders, receivers, direction)
                assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    receivers = [(2, 0, "q"), (2, 1, "k"), "blocks.1.hook_resid_post"]
    r = path_patch_senders(model, clean, corrupted, logit_diff, receivers, batch_size=4, progress=False)
    want = torch.tensor([[naive_path_patch(model, clean, corrupted, logit_diff, [(l, h)], receivers,
                                           "clean_to_corrupted") for h in range(2)] for l in range(3)])
    torch.testing.assert_close(r.values, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", [0, 3, 6])
def test_positions_before_the_first_difference_are_not_computed(model, first):
    # the last layer runs in every patched run: count the positions it sees. The first two
    # forwards are the unpatched source and base runs, of every position.
    clean, corrupted = agreeing_until(model, first)
    n = clean.shape[1]

    def positions_seen(name, sweep):
        seen = []
        with model.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(x.shape[1]))]):
            sweep()
        assert seen[:2] == [n, n]
        return seen[2:]

    for per in ("layer", "head", "head_pos"):
        seen = positions_seen("blocks.1.attn.hook_z", lambda: activation_patch(
            model, clean, corrupted, logit_diff, site="z", per=per, progress=False))
        if first == n:  # identical prompts: no patched run
            assert seen == []
        elif per == "head_pos":  # runs of the patches at p >= first compute the positions from p on
            assert seen and max(seen) == n - first
        else:
            assert seen and set(seen) == {n - first}
        every = positions_seen("blocks.1.attn.hook_z", lambda: activation_patch(
            model, clean, corrupted, logit_diff, site="z", per=per, progress=False, skip_prefix=False))
        assert set(every) == {n}
    seen = positions_seen("blocks.1.hook_resid_post", lambda: path_patch_senders(
        model, clean, corrupted, logit_diff, [("resid_post", -1)], progress=False))
    assert set(seen) == (set() if first == n else {n - first}) and (seen or first == n)


# ---------------------------------------------------------------------- bad input
def test_bad_input_names_what_was_wrong(model):
    clean, corrupted = tokens_pair(model)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4\)"):
        activation_patch(model, clean, corrupted[:, :4], logit_diff, progress=False)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(1, 5\)"):
        attribution_patch(model, clean, corrupted[:1], logit_diff)
    with pytest.raises(ValueError, match=r"shape \(2, 5\); it must return a real scalar or a real \[batch=2\]"):
        activation_patch(model, clean, corrupted, lambda lg: lg[:, :, 0], progress=False)
    with pytest.raises(ValueError, match="returned str"):
        activation_patch(model, clean, corrupted, lambda lg: "good", progress=False)
    with pytest.raises(ValueError, match="differentiates the metric"):
        attribution_patch(model, clean, corrupted, lambda lg: lg[0, -1, 0].detach())
    with pytest.raises(ValueError, match="unknown site 'zz'; valid sites are .*'resid_pre'"):
        activation_patch(model, clean, corrupted, logit_diff, site="zz", progress=False)
    with pytest.raises(ValueError, match=r"per='head' is not valid for site 'attn_out'; valid values are \['layer', 'layer_pos'\]"):
        activation_patch(model, clean, corrupted, logit_diff, site="attn_out", per="head", progress=False)
    with pytest.raises(ValueError, match="per='pos'"):
        attribution_patch(model, clean, corrupted, logit_diff, site="z", per="pos")
    with pytest.raises(ValueError, match="attention-only"):
        activation_patch(make_model(attn_only=True), clean, corrupted, logit_diff, site="mlp_out", progress=False)
    with pytest.raises(ValueError, match="direction='backwards'"):
        activation_patch(model, clean, corrupted, logit_diff, direction="backwards", progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        activation_patch(model, clean, corrupted, logit_diff, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"receiver \(1, 5, 'q'\) is not valid"):
        path_patch(model, clean, corrupted, logit_diff, [(0, 0)], [(1, 5, "q")])
    with pytest.raises(ValueError, match="receiver 'blocks.1.attn.hook_z' is not valid"):
        path_patch(model, clean, corrupted, logit_diff, [(0, 0)], ["blocks.1.attn.hook_z"])
    with pytest.raises(ValueError, match=r"sender \(2, 0\)"):
        path_patch(model, clean, corrupted, logit_diff, [(2, 0)], [(1, 0, "q")])
    with pytest.raises(ValueError, match="receivers is empty"):
        path_patch_senders(model, clean, corrupted, logit_diff, [], progress=False)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_result_is_a_dataclass(model):
    clean, corrupted = tokens_pair(model)
    r = activation_patch(model, clean, corrupted, logit_diff, site="resid_mid", per="layer_pos", progress=False)
    assert isinstance(r, PatchResult) and r.values.shape == (2, 5) and r.labels["layer"] == [0, 1]


def plain(fn):
    """fn without the test run's runtime type checks: the errors a caller sees by default."""
    return inspect.unwrap(fn)


@pytest.fixture(scope="module")
def text_model():
    from lens.tokenizer import Tokenizer
    m = make_model(d_vocab=50257)
    m.tokenizer = Tokenizer.gpt2()
    return m


def test_prompts_may_be_strings_or_lists_of_ids(text_model):
    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 5]

    clean, corrupted = ["The cat sat", "A dog ran"], ["The dog sat", "A cat ran"]
    tokens = text_model.to_tokens(clean), text_model.to_tokens(corrupted)
    want = activation_patch(text_model, *tokens, metric, site="resid_pre", per="layer_pos", progress=False)
    for pair in ((clean, corrupted), (tokens[0].tolist(), tokens[1].tolist())):
        got = activation_patch(text_model, *pair, metric, site="resid_pre", per="layer_pos", progress=False)
        assert torch.equal(got.values, want.values)
        got = attribution_patch(text_model, *pair, metric, site="resid_pre", per="layer_pos")
        want_attr = attribution_patch(text_model, *tokens, metric, site="resid_pre", per="layer_pos")
        torch.testing.assert_close(got.values, want_attr.values)
    one = activation_patch(text_model, clean[0], corrupted[0], metric, per="layer", progress=False)
    assert one.values.shape == (2,) and one.labels["layer"] == [0, 1]
    assert path_patch(text_model, tokens[0][0].tolist(), tokens[1][0].tolist(), metric, [(0, 0)],
                      [(1, 0, "q")]) == path_patch(text_model, *(t[:1] for t in tokens), metric,
                                                   [(0, 0)], [(1, 0, "q")])
    with pytest.raises(ValueError, match=r"clean_tokens: the prompts are \[5, 3\] tokens long"):
        activation_patch(text_model, ["The cat sat down", "A dog"], corrupted, metric, progress=False)
    with pytest.raises(ValueError, match="corrupted_tokens is a list but neither strings nor token ids"):
        activation_patch(text_model, [[1, 2], [3, 4]], [[1, 2], [3]], metric, progress=False)
    with pytest.raises(TypeError, match="clean_tokens: tokens must be an integer tensor, got dtype"):
        activation_patch(text_model, [[1.5, 2.0]], [[1, 2]], metric, progress=False)
    with pytest.raises(ValueError, match=r"corrupted_tokens: token id 60000 is outside \[0, d_vocab=50257\)"):
        activation_patch(text_model, [[1, 2]], [[1, 60000]], metric, progress=False)
    with pytest.raises(ValueError, match="clean_tokens is empty"):
        activation_patch(text_model, [], [], metric, progress=False)


def test_metrics_return_real_values(model):
    clean, corrupted = tokens_pair(model)
    for metric, got in ((lambda lg: torch.complex(lg[:, -1, 3], lg[:, -1, 5]), "a torch.complex64 tensor"),
                        (lambda lg: 1 + 2j, r"the complex number \(1\+2j\)")):
        with pytest.raises(ValueError, match=rf"metric\(logits\) returned {got}; it must return a real scalar"):
            activation_patch(model, clean, corrupted, metric, per="layer", progress=False)
    # a [batch] of booleans (is the answer on top?) is a fraction of the batch
    r = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, 3] > lg[:, -1, 5],
                         site="resid_pre", per="layer", progress=False)
    assert r.values.dtype == torch.float32 and set(r.values.tolist()) <= {0.0, 0.5, 1.0}


def test_memory_budget_and_batch_size_are_positive_numbers(model):
    clean, corrupted = tokens_pair(model)
    for budget in ("1GB", -1, 0, float("nan"), True):
        for fn, kw in ((activation_patch, dict(progress=False)), (attribution_patch, {}),
                       (path_patch_senders, dict(progress=False))):
            args = ([(1, 0, "q")],) if fn is path_patch_senders else ()
            with pytest.raises(ValueError, match=rf"memory_budget={budget!r} must be a positive number of bytes"):
                plain(fn)(model, clean, corrupted, logit_diff, *args, memory_budget=budget, **kw)
    with pytest.raises(ValueError, match="batch_size=True must be a positive int"):
        activation_patch(model, clean, corrupted, logit_diff, batch_size=True, progress=False)


@pytest.mark.parametrize("senders,receivers,match", [
    ([(1, 0)], [(0, 0, "q")], r"sender \(1, 0\) reaches none of the receivers \[\(0, 0, 'q'\)\]"),
    ([(1, 0)], [(1, 1, "k")], r"sender \(1, 0\) reaches none of the receivers \[\(1, 1, 'k'\)\]"),
    ([(1, 0)], ["blocks.1.hook_resid_pre"], r"sender \(1, 0\) reaches none .*'blocks.1.hook_resid_pre'"),
    ([(1, 0)], [(0, 0, "q"), "blocks.1.hook_resid_post"],
     r"receiver \(0, 0, 'q'\) reads the stream before any sender \[\(1, 0\)\] writes to it"),
])
def test_paths_that_do_not_exist_are_refused(model, senders, receivers, match):
    clean, corrupted = tokens_pair(model)
    with pytest.raises(ValueError, match=match + ".*receivers must be in a later layer than the senders"):
        path_patch(model, clean, corrupted, logit_diff, senders, receivers)


def test_in_a_parallel_block_the_mlp_reads_before_the_heads_write():
    model = make_model(3, parallel_attn_mlp=True)
    clean, corrupted = tokens_pair(model)
    with pytest.raises(ValueError, match="reaches none of the receivers"):
        path_patch(model, clean, corrupted, logit_diff, [(1, 0)], ["blocks.1.hook_mlp_out"])
    got = path_patch(model, clean, corrupted, logit_diff, [(1, 0)], ["blocks.1.hook_resid_post"])
    want = naive_path_patch(model, clean, corrupted, logit_diff, [(1, 0)], ["blocks.1.hook_resid_post"],
                            "clean_to_corrupted")
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
