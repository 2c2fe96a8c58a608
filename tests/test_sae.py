"""Sparse dictionaries at hook points: the maths against a float64 by-hand reference, splicing
(the error term leaves the model unchanged; the new hook points cache, hook and go away),
loading and saving (lens, SAELens and Gemma Scope files), weight processing, bad input, and
parity with SAELens where it is installed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, make_model, make_tokens, random_hf, write

import lens
from lens.sae import SAE, evaluate, run_with_cache_with_saes, run_with_saes, saes

D = 16  # make_model's d_model
KINDS = [dict(activation="relu"), dict(activation="jumprelu"), dict(activation="topk", k=5),
         dict(activation="batchtopk", k=5), dict(activation="gated")]


def random_sae(d_in=D, d_sae=48, hook="blocks.0.hook_resid_post", seed=0, **kw) -> SAE:
    sae = SAE(d_in, d_sae, hook, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


def reference(sae: SAE, x: torch.Tensor):
    """(features, reconstruction) by hand in float64, from SAELens's definitions."""
    P = {n: p.detach().double() for n, p in sae.named_parameters()}
    x = x.double().reshape(*x.shape[:-2], -1) if x.shape[-1] != sae.d_in else x.double()
    raw, stats = x, None
    if sae.normalize_activations == "constant_norm_rescale":
        stats = sae.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
        x = x * stats
    elif sae.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x, stats = (x - mu) / (std + 1e-5), (mu, std)
    if sae.apply_b_dec_to_input:
        x = x - P["b_dec"]
    if sae.activation == "gated":
        f = torch.where(x @ P["W_enc"] + P["b_gate"] > 0,
                        torch.relu(x @ (P["W_enc"] * P["r_mag"].exp()) + P["b_mag"]), 0.0)
    else:
        pre = x @ P["W_enc"] + P["b_enc"]
        if sae.activation == "relu":
            f = torch.relu(pre)
        elif sae.activation == "jumprelu":
            f = torch.where(pre > P["threshold"], torch.relu(pre), 0.0)
        elif sae.activation == "topk":
            keep = pre >= pre.topk(sae.k, dim=-1).values[..., -1:]
            f = torch.where(keep, torch.relu(pre), 0.0)
        else:
            flat = pre.relu().flatten()
            cut = flat.topk(sae.k * pre.shape[:-1].numel()).values[-1]
            f = torch.where(pre.relu() >= cut, pre.relu(), 0.0)
    out = f @ P["W_dec"] + P["b_dec"]
    if sae.normalize_activations == "constant_norm_rescale" and not sae.transcoder:
        out = out / stats
    elif sae.normalize_activations == "layer_norm" and not sae.transcoder:
        out = out * stats[1] + stats[0]
    if sae.skip:
        out = out + raw @ P["W_skip"]
    return f, out


# ---------------------------------------------------------------- the maths
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k["activation"])
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("b_dec_in", [True, False])
def test_encode_decode_match_a_float64_reference(kind, norm, b_dec_in):
    sae = random_sae(normalize_activations=norm, apply_b_dec_to_input=b_dec_in, **kind)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(3))
    f_ref, out_ref = reference(sae, x)
    acts, stats = sae.encode(x, return_norm=True)
    torch.testing.assert_close(acts.double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts, stats).double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).double(), out_ref, atol=1e-5, rtol=1e-5)


def test_jumprelu_threshold_is_exact():
    sae = random_sae(activation="jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D, 48))
        sae.b_enc.zero_()
        sae.threshold.fill_(0.5)
    x = torch.zeros(1, D)
    x[0, :3] = torch.tensor([0.5, torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)), 0.49])
    acts = sae.encode(x)
    assert acts[0, 0] == 0 and acts[0, 2] == 0  # at or below the threshold: off
    assert acts[0, 1] == x[0, 1]  # just above: the pre-activation itself


def test_topk_l0_is_k_and_batchtopk_keeps_k_per_row_on_average():
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(0))
    sae = random_sae(activation="topk", k=7)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
    assert ((sae.encode(x) != 0).sum(-1) == 7).all()
    batch = random_sae(activation="batchtopk", k=3)
    with torch.no_grad():
        batch.b_enc.fill_(10.0)
    assert (batch.encode(x) != 0).sum() == 3 * 4 * 9


# ---------------------------------------------------------------- splicing
SPLICES = [
    dict(kw={}, hook="blocks.0.hook_resid_post"),
    dict(kw=dict(activation="jumprelu"), hook="blocks.1.hook_mlp_out"),
    dict(kw=dict(activation="topk", k=4), hook="blocks.0.hook_resid_pre"),
    dict(kw=dict(activation="gated", normalize_activations="layer_norm"), hook="blocks.1.hook_attn_out"),
    dict(kw=dict(reshape_activations="hook_z"), hook="blocks.0.attn.hook_z"),
    dict(kw=dict(hook_head_index=1, d_in=8), hook="blocks.1.attn.hook_z"),
    dict(kw=dict(hook_name_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False),
         hook="blocks.0.ln2.hook_normalized"),
    dict(kw=dict(hook_name_out="blocks.1.hook_mlp_out", apply_b_dec_to_input=False, skip=True,
                 activation="jumprelu"), hook="blocks.1.hook_mlp_in"),
]


@pytest.mark.parametrize("case", SPLICES, ids=lambda c: c["hook"] + ":" + str(c["kw"].get("activation", "relu")))
def test_error_term_leaves_the_model_unchanged(case):
    model, kw = make_model(), dict(case["kw"])
    tokens = make_tokens(model)
    sae = random_sae(hook=case["hook"], d_in=kw.pop("d_in", D), **kw)
    plain = model(tokens)
    with saes(model, sae, use_error_term=True):
        assert torch.equal(model(tokens), plain)  # unhooked: the host's own bits
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_sae" in n)
    assert sorted(cache.keys()) == sorted(f"{case['hook']}.{h}" for h in lens.sae.HOOKS)
    assert cache[f"{case['hook']}.hook_sae_acts_post"].shape == (2, 7, 48)
    logits = run_with_saes(model, tokens, saes=sae, use_error_term=True)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=0)
    # hooked upstream (features cached), the error is recomputed clean and still sums back
    _, cache = run_with_cache_with_saes(model, tokens, saes=sae, use_error_term=True,
                                        names_filter=lambda n: n.endswith("acts_post") or n == "hook_logits")
    torch.testing.assert_close(cache["hook_logits"], plain, atol=1e-6, rtol=0)
    assert not [n for n in model.hook_dict if "hook_sae" in n]


def test_an_sae_in_another_dtype_than_the_model():
    model = make_model(dtype=torch.bfloat16)
    tokens = make_tokens(model)
    sae = random_sae(hook="blocks.1.hook_resid_pre")  # float32
    plain = model(tokens)
    _, cache = run_with_cache_with_saes(model, tokens, saes=sae, use_error_term=True,
                                        names_filter=lambda n: "acts_post" in n or n == "hook_logits")
    assert torch.equal(cache["hook_logits"], plain)
    assert cache["blocks.1.hook_resid_pre.hook_sae_acts_post"].dtype == torch.float32
    assert run_with_saes(model, tokens, saes=sae).dtype == torch.bfloat16


def test_splice_replaces_the_activation_by_the_reconstruction():
    model = make_model()
    tokens = make_tokens(model)
    sae = random_sae(hook="blocks.0.hook_resid_post", activation="topk", k=3)
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    x = clean["blocks.0.hook_resid_post"]
    seen = {}
    fwd = [("blocks.1.hook_resid_pre", lambda a, hook: seen.setdefault("next", a))]
    with saes(model, sae):
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    torch.testing.assert_close(seen["next"].double(), reference(sae, x)[1], atol=1e-5, rtol=1e-5)
    replaced = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post",
                                                        lambda a, hook: sae(a))])
    torch.testing.assert_close(logits, replaced, atol=1e-6, rtol=0)


def test_feature_hooks_edit_the_forward_and_the_error_stays_clean():
    model = make_model()
    tokens = make_tokens(model)
    sae = random_sae(hook="blocks.0.hook_resid_post")
    name = "blocks.0.hook_resid_post"
    _, clean = model.run_with_cache(tokens, names_filter=name)
    x = clean[name]
    f, recons = reference(sae, x)

    def ablate(acts, hook):
        acts = acts.clone()
        acts[..., 5] = 0
        return acts

    seen = {}
    with saes(model, sae, use_error_term=True):
        model.run_with_hooks(tokens, fwd_hooks=[(name + ".hook_sae_acts_post", ablate),
                                                ("blocks.1.hook_resid_pre",
                                                 lambda a, hook: seen.setdefault("x", a))])
    expected = x.double() - f[..., 5:6] * sae.W_dec[5].double()  # error from the clean run
    torch.testing.assert_close(seen["x"].double(), expected, atol=1e-5, rtol=1e-5)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_hooks_and_hook_points_are_gone_after_an_exception():
    model = make_model()
    tokens = make_tokens(model)
    sae = random_sae()
    names = set(model.hook_dict)
    with pytest.raises(RuntimeError, match="inside"):
        with saes(model, sae, use_error_term=True):
            model.add_hook("blocks.0.hook_resid_post.hook_sae_acts_post", lambda a, hook: None)
            raise RuntimeError("inside")
    assert set(model.hook_dict) == names
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())
    assert not sae.hook_sae_acts_post.fwd_hooks
    torch.testing.assert_close(model(tokens), make_model()(tokens), atol=0, rtol=0)


def test_gradients_reach_the_features_through_the_reconstruction():
    model = make_model()
    tokens = make_tokens(model)
    sae = random_sae()
    grads = {}
    with saes(model, sae, use_error_term=True):
        loss = model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[
            ("blocks.0.hook_resid_post.hook_sae_acts_post", lambda g, hook: grads.setdefault("f", g))])
        loss.backward()
    assert grads["f"].shape == (2, 7, 48) and grads["f"].abs().sum() > 0


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_by_name_and_leaves_nothing_attached(tmp_path):
    model = make_model()
    names = set(model.hook_dict)
    with pytest.raises(ValueError, match=r"d_in=12.*gives 16"):
        with saes(model, random_sae(d_in=12)):
            pass
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_psot.*not a hook point.*resid_post"):
        with saes(model, random_sae(hook="blocks.0.hook_resid_psot")):
            pass
    nan = random_sae()
    with torch.no_grad():
        nan.W_dec[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite weights in.*W_dec"):
        with saes(model, [random_sae(hook="blocks.1.hook_resid_post"), nan]):
            pass
    with pytest.raises(ValueError, match="more than one SAE"):
        with saes(model, [random_sae(), random_sae(seed=1)]):
            pass
    assert set(model.hook_dict) == names
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    good = random_sae().save(tmp_path / "good", format="saelens")
    for field, value, match in (("architecture", "matryoshka", "unknown SAE architecture 'matryoshka'"),
                                ("normalize_activations", "whiten_twice",
                                 "unknown normalize_activations.*'whiten_twice'")):
        cfg = json.loads((good / "cfg.json").read_text())
        cfg[field] = value
        (good / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            SAE.load(good)
        random_sae().save(good, format="saelens")
    nan.save(tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN or infinite weights in.*W_dec"):
        SAE.load(tmp_path / "nan")
    with pytest.raises(ValueError, match="unknown SAE activation 'softplus'"):
        SAE(D, 8, "blocks.0.hook_resid_post", activation="softplus")


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("kind", KINDS + [dict(activation="jumprelu", hook_name_out="blocks.0.hook_mlp_out",
                                               apply_b_dec_to_input=False, skip=True)],
                         ids=lambda k: k["activation"] + ("_skip_transcoder" if k.get("skip") else ""))
@pytest.mark.parametrize("fmt", ["lens", "saelens"])
def test_save_load_roundtrip(tmp_path, kind, fmt):
    hook = "blocks.0.ln2.hook_normalized" if kind.get("skip") else "blocks.0.hook_resid_post"
    sae = random_sae(hook=hook, normalize_activations="layer_norm" if fmt == "lens" else "none",
                     processing=["fold_layer_norm"] if fmt == "lens" else (), **kind)
    back = SAE.load(sae.save(tmp_path / "sae", format=fmt))
    assert back.config() == sae.config() or fmt == "saelens"
    assert (back.hook_name, back.hook_name_out, back.architecture) == (sae.hook_name, sae.hook_name_out,
                                                                       sae.architecture)
    for name, p in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    x = torch.randn(2, 3, D)
    assert torch.equal(back(x), sae(x))
    half = SAE.load(tmp_path / "sae", dtype=torch.float64)
    assert half.W_enc.dtype == torch.float64


def test_older_saelens_layout_loads(tmp_path):
    sae = random_sae(activation="topk", k=4)
    folder = sae.save(tmp_path / "old", format="saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    old = dict(d_in=cfg["d_in"], d_sae=cfg["d_sae"], hook_point="blocks.0.hook_resid_post",
               hook_point_head_index=None, activation_fn_str="topk",
               activation_fn_kwargs={"k": 4}, apply_b_dec_to_input=True, normalize_activations=False,
               model_from_pretrained_kwargs={"center_writing_weights": False})
    (folder / "cfg.json").write_text(json.dumps(old))
    back = SAE.load(folder)
    assert (back.activation, back.k, back.hook_name) == ("topk", 4, "blocks.0.hook_resid_post")
    assert back.processing == []  # SAELens: from_pretrained_no_processing(**those kwargs)
    assert torch.equal(back.encode(torch.ones(D)), sae.encode(torch.ones(D)))
    # TransformerLens's hook_normalized of an unfolded model is after the norm's weight: refused
    old.update(hook_point="blocks.0.ln2.hook_normalized", model_from_pretrained_kwargs={})
    (folder / "cfg.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="after its weight and bias.*no hook point"):
        SAE.load(folder)
    old["model_from_pretrained_kwargs"] = {"fold_ln": True}
    (folder / "cfg.json").write_text(json.dumps(old))
    assert SAE.load(folder).processing == ["fold_layer_norm"]


def test_gemma_scope_params_load(tmp_path):
    sae = random_sae(activation="jumprelu", apply_b_dec_to_input=False, hook="blocks.1.hook_resid_post")
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: p.detach().numpy() for n, p in sae.named_parameters()})
    back = SAE.load(folder)
    assert (back.hook_name, back.activation, back.apply_b_dec_to_input) == (
        "blocks.1.hook_resid_post", "jumprelu", False)
    x = torch.randn(4, D)
    assert torch.equal(back.encode(x), sae.encode(x))
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    lens.io.write({n: p.detach() for n, p in sae.named_parameters()}, elsewhere / "params.safetensors", {})
    with pytest.raises(ValueError, match="pass hook_name="):
        SAE.load(elsewhere)
    assert SAE.load(elsewhere, hook_name="blocks.0.hook_mlp_out").hook_name == "blocks.0.hook_mlp_out"
    objects = tmp_path / "pickled"
    objects.mkdir()
    np.savez(objects / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        SAE.load(objects, hook_name="blocks.0.hook_mlp_out")


# ---------------------------------------------------------------- weight processing
def test_processing_that_changes_the_hook_point_is_refused_or_transformed(tmp_path):
    folder = write(random_hf(), tmp_path / "ckpt")
    processed = lens.HookedGPT.from_pretrained(folder)
    raw = lens.HookedGPT.from_pretrained_no_processing(folder)
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    resid = random_sae(d_in=32, hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="center_writing_weights.*from_pretrained_no_processing"):
        with saes(processed, resid):
            pass
    with saes(raw, resid):
        raw(tokens)
    # the normalised input of ln2 is the same with or without folding and centring; a
    # transcoder's output at hook_mlp_out is centred to match the processed model
    tc = random_sae(d_in=32, hook="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out",
                    apply_b_dec_to_input=False)
    names = ["blocks.0.ln2.hook_normalized.hook_sae_acts_post", "blocks.0.ln2.hook_normalized.hook_sae_output"]
    _, a = run_with_cache_with_saes(raw, tokens, saes=tc, names_filter=names)
    _, b = run_with_cache_with_saes(processed, tokens, saes=tc, names_filter=names)
    torch.testing.assert_close(a[names[0]], b[names[0]], atol=1e-5, rtol=1e-5)
    out = a[names[1]]
    torch.testing.assert_close(out - out.mean(-1, keepdim=True), b[names[1]], atol=1e-5, rtol=1e-5)
    with saes(processed, tc, use_error_term=True):
        torch.testing.assert_close(processed(tokens), lens.HookedGPT.from_pretrained(folder)(tokens),
                                   atol=1e-5, rtol=0)
    trained_processed = random_sae(d_in=32, processing=["center_writing_weights"])
    with pytest.raises(ValueError, match="trained on a model processed with center_writing_weights"):
        with saes(raw, trained_processed):
            pass


# ---------------------------------------------------------------- the bundled SAE
def test_bundled_sae_reaches_its_recorded_figures():
    sae = SAE.load("lens-tiny-attn2l-sae")
    model = lens.HookedGPT.from_pretrained_no_processing("lens-tiny-attn2l")
    meta = sae.metadata
    assert meta["d_sae"] == 16 * model.cfg.d_model == sae.d_sae
    assert meta["variance_explained"] >= 0.8
    train = load_script("train_sae")
    tokens = train.held_out(model, meta["recipe"])
    figures = evaluate(model, sae, tokens)
    for key in ("l0", "variance_explained", "ce_loss_recovered"):
        assert figures[key] == pytest.approx(meta[key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    train = load_script("train_sae")
    short = ["--steps", "20", "--windows", "24", "--heldout-windows", "2", "--quiet"]
    a = train.main(short + ["--out", str(tmp_path / "a")])
    b = train.main(short + ["--out", str(tmp_path / "b")])
    assert a.metadata["variance_explained"] == b.metadata["variance_explained"]
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name


# ---------------------------------------------------------------- SAELens
def saelens_sae(arch: str, d_in: int = D, d_sae: int = 48, seed: int = 0, **cfg):
    sl = pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_class
    cls, cfg_cls = get_sae_class(arch)
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, **cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
            if name == "threshold":
                p.abs_()
    return sl, sae


SAELENS = [("standard", {}), ("standard", dict(normalize_activations="layer_norm")),
           ("standard", dict(normalize_activations="constant_norm_rescale", apply_b_dec_to_input=False)),
           ("jumprelu", {}), ("topk", dict(k=6)), ("topk", dict(k=6, rescale_acts_by_decoder_norm=True)),
           ("gated", {}), ("transcoder", dict(d_out=D, apply_b_dec_to_input=False)),
           ("skip_transcoder", dict(d_out=D, apply_b_dec_to_input=False)),
           ("jumprelu_transcoder", dict(d_out=D, apply_b_dec_to_input=False))]


@pytest.mark.parametrize("arch,cfg", SAELENS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_saelens_files_give_the_same_features(tmp_path, arch, cfg):
    _, theirs = saelens_sae(arch, **cfg)
    theirs.cfg.metadata.hook_name = "blocks.0.hook_mlp_in" if "transcoder" in arch else "blocks.0.hook_resid_post"
    if "transcoder" in arch:
        theirs.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    theirs.save_model(tmp_path / "sl")
    ours = SAE.load(tmp_path / "sl")
    assert ours.architecture == arch
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        dec_theirs = theirs.decode(f_theirs) if "skip" not in arch else None  # uses encode's norm
        out_theirs = theirs(x)
        f_ours, stats = ours.encode(x, return_norm=True)
        torch.testing.assert_close(f_ours, f_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), out_theirs, atol=1e-5, rtol=1e-5)
        if "skip" not in arch:
            torch.testing.assert_close(ours.decode(f_ours, stats), dec_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x - ours(x), x - out_theirs, atol=1e-5, rtol=1e-5)
    # and back: lens's SAELens files load in SAELens
    again = type(theirs).load_from_disk(ours.save(tmp_path / "back", format="saelens"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), out_theirs, atol=1e-6, rtol=1e-6)


def hooked_sae_transformer(hf_folder):
    """SAELens's HookedSAETransformer holding the checkpoint in `hf_folder`, unprocessed."""
    pytest.importorskip("sae_lens")
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head,
                                  n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size,
                                  n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN",
                                  eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
                                  default_prepend_bos=False)
    tl = HookedSAETransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval()


@pytest.mark.parametrize("arch,cfg,hook", [("standard", {}, "blocks.0.hook_resid_post"),
                                           ("jumprelu", {}, "blocks.1.hook_mlp_out"),
                                           ("topk", dict(k=8), "blocks.1.hook_resid_pre"),
                                           ("standard", dict(reshape_activations="hook_z"), "blocks.0.attn.hook_z")])
def test_hooked_sae_transformer_gives_the_same_logits(tmp_path, arch, cfg, hook):
    folder = write(random_hf(), tmp_path / "ckpt")
    tl = hooked_sae_transformer(folder)
    ours_model = lens.HookedGPT.from_pretrained_no_processing(folder)
    _, theirs = saelens_sae(arch, d_in=32, d_sae=96, **cfg)
    theirs.cfg.metadata.hook_name = hook
    if cfg.get("reshape_activations") == "hook_z":
        theirs.turn_on_forward_pass_hook_z_reshaping()
    theirs.save_model(tmp_path / "sl")
    ours = SAE.load(tmp_path / "sl")
    tokens = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for error in (False, True):
            expected = tl.run_with_saes(tokens, saes=[theirs], use_error_term=error)
            got = run_with_saes(ours_model, tokens, saes=ours, use_error_term=error)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        _, tl_cache = tl.run_with_cache_with_saes(tokens, saes=[theirs])
        _, cache = run_with_cache_with_saes(ours_model, tokens, saes=ours,
                                            names_filter=lambda n: "hook_sae_acts" in n)
    for name in cache:
        torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- features and logits
def test_direct_feature_attribution_sums_to_the_logit_difference():
    """With the SAE on the final stream and the error term on, the logit difference is the
    features' attributions plus b_dec and the error through the frozen final norm, plus the
    norm's bias and b_U, exactly."""
    from lens.sae import feature_attribution
    model = make_model()
    tokens = make_tokens(model)
    sae = random_sae(hook="blocks.1.hook_resid_post")
    logits, cache = run_with_cache_with_saes(model, tokens, saes=sae, use_error_term=True)
    a, w = 3, 5
    attr = feature_attribution(model, sae, cache, a, w)
    assert attr.shape == (2, 48)
    ln = model.ln_final
    scale = cache["ln_final.hook_scale"][:, -1]
    direction = model.W_U[:, a] - model.W_U[:, w]
    rest = cache["blocks.1.hook_resid_post.hook_sae_error"][:, -1] + sae.b_dec
    total = attr.sum(-1) + ln.frozen(rest, scale) @ direction + ln.b @ direction + model.b_U[a] - model.b_U[w]
    torch.testing.assert_close(total, logits[:, -1, a] - logits[:, -1, w], atol=1e-5, rtol=1e-5)
    # one feature by hand, in float64
    f = int(attr[0].abs().argmax())
    d = sae.W_dec[f].double()
    by_hand = cache["blocks.1.hook_resid_post.hook_sae_acts_post"][0, -1, f].double() * (
        ((d - d.mean()) / scale[0].double()) * ln.w.double()) @ direction.double()
    torch.testing.assert_close(attr[0, f].double(), by_hand, atol=1e-6, rtol=1e-6)


def test_feature_logit_effects_and_bad_input():
    from lens.sae import feature_attribution, feature_logit_effects
    model = make_model()
    sae = random_sae(hook="blocks.0.hook_mlp_out")
    eff = feature_logit_effects(model, sae, 7, k=4)
    d = sae.W_dec[7].double()
    want = ((d - d.mean()) * model.ln_final.w.double()) @ model.W_U.double()
    torch.testing.assert_close(eff["values"].double(), want, atol=1e-5, rtol=1e-5)
    assert [t for t, _ in eff["promoted"]] == want.topk(4).indices.tolist()
    assert [t for t, _ in eff["suppressed"]] == want.topk(4, largest=False).indices.tolist()
    with pytest.raises(ValueError, match=r"feature=48 must be an int in \[0, d_sae=48\)"):
        feature_logit_effects(model, sae, 48)
    z_sae = random_sae(d_in=16, hook="blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="does not write into the residual stream directly"):
        feature_logit_effects(model, z_sae, 0)
    tokens = make_tokens(model)
    _, cache = run_with_cache_with_saes(model, tokens, saes=sae, use_error_term=True)
    with pytest.raises(ValueError, match=r"pos=9 must be an int position"):
        feature_attribution(model, sae, cache, 3, 5, pos=9)


def _naive_feature_patch(model, sae, clean, corrupted, metric, per):
    """One full forward per patch, the SAE spliced, copying the clean feature in with a hook."""
    name = f"{sae.hook_name}.hook_sae_acts_post"
    with saes(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(clean, names_filter=[name])
        out = []
        for f in range(sae.d_sae):
            for p in (range(clean.shape[1]) if per == "feature_pos" else [slice(None)]):
                def put(a, hook, f=f, p=p):
                    a = a.clone()
                    a[:, p, f] = cache[name][:, p, f]
                    return a
                m = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, put)]))
                out.append(m.mean() if m.ndim else m)
    return torch.stack(out).detach()


@pytest.mark.parametrize("per", ["feature", "feature_pos"])
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_feature_patching_equals_the_naive_loop(per, hook):
    from lens.sae import feature_patch
    model = make_model()
    clean = make_tokens(model, pos=5, seed=1)
    corrupted = clean.clone()
    corrupted[:, 2] = make_tokens(model, pos=5, seed=2)[:, 2]
    sae = random_sae(hook=hook, d_sae=12)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    got = feature_patch(model, sae, clean, corrupted, metric, per=per, batch_size=5, progress=False)
    want = _naive_feature_patch(model, sae, clean, corrupted, metric, per)
    assert got.values.shape == ((12, 5) if per == "feature_pos" else (12,))
    torch.testing.assert_close(got.values.flatten(), want, atol=2e-5, rtol=2e-5)
    assert not [n for n in model.hook_dict if "hook_sae" in n]


def test_feature_attribution_patching_equals_patching_where_linear():
    """No final norm and the SAE on the final stream: the logits are linear in each feature,
    so attribution patching is exact."""
    from lens.sae import feature_attribution_patch, feature_patch
    model = make_model(normalization=None)
    clean = make_tokens(model, pos=5, seed=1)
    corrupted = clean.clone()
    corrupted[:, 2] = make_tokens(model, pos=5, seed=2)[:, 2]
    sae = random_sae(hook="blocks.1.hook_resid_post", d_sae=12)
    metric = lambda logits: (logits[:, -1, 3] - logits[:, -1, 5]).mean()  # noqa: E731
    for per in ("feature", "feature_pos"):
        act = feature_patch(model, sae, clean, corrupted, metric, per=per, progress=False)
        attr = feature_attribution_patch(model, sae, clean, corrupted, metric, per=per)
        assert attr.values.shape == act.values.shape
        torch.testing.assert_close(attr.values, act.values - act.baseline, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="per='head'"):
        feature_patch(model, sae, clean, corrupted, metric, per="head")
    with pytest.raises(ValueError, match=r"features must be ints in \[0, d_sae=12\)"):
        feature_patch(model, sae, clean, corrupted, metric, features=[12])


def test_feature_card_of_the_bundled_sae(tmp_path, capsys):
    from lens import io
    from lens.cli import main
    from lens.sae import feature_card
    sae = SAE.load("lens-tiny-attn2l-sae")
    model = lens.HookedGPT.from_pretrained_no_processing("lens-tiny-attn2l")
    tokens = io.SafetensorsFile(Path(lens.__file__).parent / "models/lens-tiny-attn2l-sae/heldout.safetensors").get("tokens")[:2]
    card = feature_card(model, sae, 295, tokens, k=4, context=3)
    # the activations, and each context's value, equal those of a spliced run read directly
    name = sae.hook_name + ".hook_sae_acts_post"
    _, cache = run_with_cache_with_saes(model, tokens, saes=sae, use_error_term=True, names_filter=[name])
    acts = cache[name][..., 295].flatten()
    torch.testing.assert_close(card.activations, acts)
    values = [v for _, _, v in card.contexts]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(float(acts.max()))
    assert card.frequency == pytest.approx(float((acts > 0).float().mean()))
    for toks, at, _ in card.contexts:
        assert 0 <= at < len(toks) <= 7
    assert f"feature #295 of the SAE at {sae.hook_name}" in str(card) and "[[" in str(card)
    card.plot(tmp_path / "card.png")
    assert (tmp_path / "card.png").stat().st_size > 0
    assert main(["feature", "lens-tiny-attn2l-sae", "295", "--k", "2", "--plot", str(tmp_path / "c.png")]) == 0
    assert "top contexts:" in capsys.readouterr().out and (tmp_path / "c.png").exists()
    assert main(["feature", "lens-tiny-attn2l-sae", "5000"]) == 2
    assert "feature=5000 must be an int in [0, d_sae=1024)" in capsys.readouterr().err


def test_features_are_ablated_with_the_ablation_builders():
    from lens.ablation import mean_ablate, zero_ablate
    model, tokens = make_model(), make_tokens(make_model(), pos=5)
    sae = random_sae(d_sae=12)
    name = sae.hook_name + ".hook_sae_acts_post"
    with saes(model, sae):
        _, cache = model.run_with_cache(tokens, names_filter=[name])
        acts = cache[name]

        def by_hand(fn):  # the reconstruction from edited features, then the rest of the model
            recons = fn(acts.clone()) @ sae.W_dec + sae.b_dec
            return model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, lambda x, hook: recons)])

        def zero(a):
            a[:, 1:3, [2, 5]] = 0
            return a
        got = model.run_with_hooks(tokens, fwd_hooks=[zero_ablate(name, features=[2, 5], positions=[1, 2])])
    torch.testing.assert_close(got, by_hand(zero))
    means = acts.mean(0)
    with saes(model, sae):
        got = model.run_with_hooks(tokens, fwd_hooks=[mean_ablate(name, means=means, features=slice(0, 4))])

    def mean(a):
        a[..., :4] = means[..., :4]
        return a
    torch.testing.assert_close(got, by_hand(mean))
    with pytest.raises(ValueError, match="features= given for 'blocks.0.hook_resid_post', which has no d_sae"):
        zero_ablate("blocks.0.hook_resid_post", features=[1])
    with saes(model, sae), pytest.raises(ValueError, match="feature \\[12\\] out of range .* 12 features"):
        model.run_with_hooks(tokens, fwd_hooks=[zero_ablate(name, features=[12])])
    assert "features=[2]" in repr(zero_ablate(name, features=[2])[1])


def _naive_feature_edit(model, sae, tokens, metric, per, value):
    """One full forward per (feature, position), the SAE spliced, feature f set to value[..., f]."""
    name = f"{sae.hook_name}.hook_sae_acts_post"
    out = []
    with saes(model, sae, use_error_term=True):
        for f in range(sae.d_sae):
            for p in (range(tokens.shape[1]) if per == "feature_pos" else [slice(None)]):
                def put(a, hook, f=f, p=p):
                    a = a.clone()
                    a[:, p, f] = value.expand_as(a)[:, p, f]
                    return a
                m = metric(model.run_with_hooks(tokens, fwd_hooks=[(name, put)]))
                out.append(m.mean() if m.ndim else m)
    return torch.stack(out).detach()


@pytest.mark.parametrize("per", ["feature", "feature_pos"])
@pytest.mark.parametrize("differ", [[0], [3], [3, 4], []])
@pytest.mark.parametrize("kind", [dict(activation="relu"), dict(activation="batchtopk", k=3)])
def test_feature_patching_skips_only_what_cannot_change(per, differ, kind):
    """Runs compute the positions from the patch on, and from the first position where the
    prompts differ; a BatchTopK SAE, whose features depend on the whole batch, runs each patch
    alone at every position. All held to the naive loop."""
    from lens.sae import feature_patch
    model = make_model(n_layers=3)
    clean = make_tokens(model, pos=5, seed=1)
    corrupted = clean.clone()
    for p in differ:
        corrupted[:, p] = make_tokens(model, pos=5, seed=2 + p)[:, p]
    sae = random_sae(hook="blocks.1.hook_resid_pre", d_sae=10, **kind)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    name = f"{sae.hook_name}.hook_sae_acts_post"
    with saes(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(clean, names_filter=[name])
    want = _naive_feature_edit(model, sae, corrupted, metric, per, cache[name])
    seen = []
    probe = ("blocks.2.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))
    with model.hooks(fwd_hooks=[probe]):
        got = feature_patch(model, sae, clean, corrupted, metric, per=per, batch_size=4, progress=False)
    torch.testing.assert_close(got.values.flatten(), want, atol=2e-5, rtol=2e-5)
    p0 = differ[0] if differ else 5
    patched = seen[2:]  # after the source and base runs
    if kind["activation"] == "batchtopk":
        assert patched == [5] * len(want)  # one patch per pass, every position
    elif per == "feature":
        assert set(patched) <= {5 - p0}
    else:
        assert patched and min(patched) >= 1 and max(patched) <= 5 - p0 if differ else patched == []


@pytest.mark.parametrize("per", ["feature", "feature_pos"])
def test_feature_ablation_equals_the_naive_loop(per):
    from lens.sae import feature_ablate
    model = make_model()
    tokens = make_tokens(model, pos=5, seed=1)
    sae = random_sae(hook="blocks.1.hook_resid_pre", d_sae=10)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    got = feature_ablate(model, sae, tokens, metric, per=per, batch_size=3, progress=False)
    want = _naive_feature_edit(model, sae, tokens, metric, per, torch.zeros(sae.d_sae))
    torch.testing.assert_close(got.values.flatten(), want, atol=2e-5, rtol=2e-5)
    assert got.direction == "zero_ablation" and got.baseline == pytest.approx(float(metric(model(tokens)).mean().detach()), abs=1e-5)
    means = torch.rand(sae.d_sae)
    got = feature_ablate(model, sae, tokens, metric, per=per, means=means, progress=False)
    torch.testing.assert_close(got.values.flatten(), _naive_feature_edit(model, sae, tokens, metric, per, means),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"means of shape \(3,\); give \[d_sae\] = \[10\]"):
        feature_ablate(model, sae, tokens, metric, means=torch.zeros(3))
    assert got.plot() is not None
