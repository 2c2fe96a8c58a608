"""Every HF family against transformers on random checkpoints the tests create: log-probs
(processed and not, both config.json layouts), bfloat16, greedy generation, a zeroed head; and
the residual stream's identities, DLA, the KV cache and each analysis module on every family."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T

import lens
from lens.attribution import direct_logit_attribution, dla_hook_names
from lens.loading import config_from_hf, from_pretrained

EVERY = lambda name: True  # noqa: E731 (run_with_cache of every hook point, per-head copies included)

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            vocab_size=101, max_position_embeddings=64)
# family -> (config class, model class, options), each with what makes it that family; windows
# are shorter than the test sequences
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "llama3": (T.LlamaConfig, T.LlamaForCausalLM, dict(
        num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=5,
                                                            head_dim=16)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=24)),
    "pythia": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(rotary_pct=0.25)),
    "neox_sequential": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(use_parallel_residual=False,
                                                                    rotary_pct=0.5)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(num_key_value_heads=2, sliding_window=6,
                                                   partial_rotary_factor=0.5, pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=2)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=24)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
        attn_logit_softcapping=2.0, final_logit_softcapping=4.0)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0,
                                                     eos_token_id=1)),
}
NAMES = list(FAMILIES)
_BUILT: dict = {}


def random_hf(name: str, seed: int = 0):
    """A random HF model of the family in eval mode, norm weights away from 1 and biases away
    from 0 (HF initialises them to 1 and 0, which would hide folding mistakes)."""
    config_cls, model_cls, options = FAMILIES[name]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**SIZE, **options})).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "layernorm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return hf


def transformers4_layout(folder: Path) -> None:
    """Rewrite config.json as transformers 4 wrote it (and as checkpoints on the hub carry it):
    top-level rope_theta / rope_scaling, Pythia's rotary_pct / rotary_emb_base, no layer_types."""
    d = json.loads((folder / "config.json").read_text())
    params = d.pop("rope_parameters", None) or {}
    types = d.pop("layer_types", None)
    if d["model_type"] == "gemma3_text":  # a rope per layer type; every n-th layer global
        d["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
        d.pop("_sliding_window_pattern")
        d["sliding_window_pattern"] = types.index("full_attention") + 1
    theta = params.get("rope_theta", 10000.0)
    fraction = params.get("partial_rotary_factor")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if d["model_type"] == "gpt_neox":
        d["rotary_emb_base"], d["rotary_pct"] = theta, fraction
    else:
        d["rope_theta"] = theta
        if fraction is not None:
            d["partial_rotary_factor"] = fraction
    d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else \
        {**{k: v for k, v in scaling.items() if k != "rope_type"}, "rope_type": scaling["rope_type"]}
    d["torch_dtype"] = d.pop("dtype", "float32")
    if d["model_type"] == "gemma":  # the released Gemma configs say "gelu" and mean tanh GELU
        d["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(d))


def checkpoint(name: str, tmp_path_factory, layout: str = "v5"):
    """(hf model, folder) for a family, built once per test session."""
    key = (name, layout)
    if key not in _BUILT:
        hf = random_hf(name)
        folder = tmp_path_factory.mktemp(f"{name}_{layout}")
        hf.save_pretrained(folder)
        if layout == "v4":
            transformers4_layout(folder)
        _BUILT[key] = (hf, folder)
    return _BUILT[key]


def tokens(batch: int = 2, pos: int = 14, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SIZE["vocab_size"], (batch, pos), generator=torch.Generator().manual_seed(seed))


def hf_log_probs(hf, toks, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(toks, **kwargs).logits.float().log_softmax(-1)


def lens_log_probs(model, toks, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.run_with_hooks(toks, **kwargs).float().log_softmax(-1)


# ---------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("process", [False, True])
@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_log_probs_match_hf(tmp_path_factory, name, process, layout):
    hf, folder = checkpoint(name, tmp_path_factory, layout)
    model = from_pretrained(folder, process=process)
    toks = tokens()
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    assert model.cfg.normalization.endswith("Pre") == process
    if not process:  # no processing: HF's activations exactly, the residual stream included
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("resid_post"))
        with torch.no_grad():
            states = hf(toks, output_hidden_states=True).hidden_states
        torch.testing.assert_close(cache["resid_post", 0], states[1], atol=1e-5, rtol=1e-5)


def test_config_layouts_give_the_same_spec(tmp_path_factory):
    for name in NAMES:
        v5 = from_pretrained(checkpoint(name, tmp_path_factory, "v5")[1], process=False).cfg
        v4 = from_pretrained(checkpoint(name, tmp_path_factory, "v4")[1], process=False).cfg
        assert v5 == v4, name


def test_specs_state_what_each_family_is(tmp_path_factory):
    spec = {n: from_pretrained(checkpoint(n, tmp_path_factory)[1], process=False).cfg for n in NAMES}
    assert spec["llama"].n_kv_heads == 2 and spec["llama"].gated_mlp and spec["llama"].normalization == "RMS"
    assert spec["llama3"].rope_scaling["type"] == "llama3" and spec["llama3"].tied_embeddings
    assert spec["mistral"].window == 5 and spec["mistral"].windowed_layers is None
    assert spec["qwen2"].attn_bias and not spec["qwen2"].attn_out_bias
    assert spec["qwen3"].qk_norm == "head" and spec["qwen3"].d_head * 4 != 64
    assert spec["pythia"].parallel_attn_mlp and spec["pythia"].rotary_dim == 4
    assert not spec["neox_sequential"].parallel_attn_mlp and spec["neox_sequential"].rotary_dim == 8
    assert spec["phi3"].rotary_dim == 8 and spec["phi3"].window == 6
    assert spec["gemma"].norm_offset == 1.0 and spec["gemma"].embed_scale == 8.0
    assert spec["gemma"].tied_embeddings and spec["gemma"].act_fn == "gelu_new" and spec["gemma"].d_head == 24
    g2 = spec["gemma2"]
    assert g2.post_norms and g2.window == 5 and g2.windowed_layers == (0,)  # local, then global
    assert (g2.attn_softcap, g2.final_softcap) == (2.0, 4.0) and abs(g2.attn_scale - 20 ** 0.5) < 1e-12
    g3 = spec["gemma3"]  # local layer 0 rotates with base 10, global layer 1 with 1000 scaled by 4
    assert g3.post_norms and g3.qk_norm == "head" and g3.norm_offset == 1.0 and g3.windowed_layers == (0,)
    assert (g3.rotary_base, g3.rope_scaling) == (1000.0, {"type": "linear", "factor": 4.0})
    assert (g3.local_rotary_base, g3.local_rope_scaling) == (10.0, None)
    assert g3.rope_of(0) == (10.0, None) and g3.rope_of(1) == (1000.0, g3.rope_scaling)
    assert g3.attn_softcap is None and g3.final_softcap is None
    olmo = spec["olmo2"]
    assert olmo.post_norms and not olmo.pre_norms and olmo.qk_norm == "proj"
    assert all(not s.positional_embedding for s in spec.values())


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_within_hf_bfloat16_deviation(tmp_path_factory, name):
    """lens in bf16 no further from float32 than HF's own bf16 run is (1.5x, or two bf16 ulps
    of a log-prob of ~8)."""
    hf, folder = checkpoint(name, tmp_path_factory)
    toks = tokens()
    exact = hf_log_probs(hf, toks)
    hf16 = random_hf(name).to(torch.bfloat16)
    hf_dev = (hf_log_probs(hf16, toks) - exact).abs().max()
    model = from_pretrained(folder, dtype=torch.bfloat16, process=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    lens_dev = (lens_log_probs(model, toks) - exact).abs().max()
    assert lens_dev <= max(1.5 * hf_dev, 0.0625), (float(lens_dev), float(hf_dev))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_with_kv_cache_matches_hf(tmp_path_factory, name):
    hf, folder = checkpoint(name, tmp_path_factory)
    model = from_pretrained(folder)
    prompt = tokens(batch=1, pos=4, seed=5)
    with torch.no_grad():
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               pad_token_id=0)
    got = model.generate(prompt, 12, temperature=0, stop_at_eos=False)
    assert torch.equal(got, expected)


def _o_proj(hf, layer: int):
    if hasattr(hf, "gpt_neox"):
        return hf.gpt_neox.layers[layer].attention.dense
    return hf.model.layers[layer].self_attn.o_proj


@pytest.mark.parametrize("name", NAMES)
def test_zeroed_head_matches_hf_with_its_output_slice_zeroed(tmp_path_factory, name):
    hf, folder = checkpoint(name, tmp_path_factory)
    model = from_pretrained(folder, process=False)
    toks, layer, head, E = tokens(), 1, 2, model.cfg.d_head

    def zero(z, hook):
        z[:, :, head] = 0

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * E:(head + 1) * E] = 0
        return (x,)

    handle = _o_proj(hf, layer).register_forward_pre_hook(zero_slice)
    try:
        expected = hf_log_probs(hf, toks)
    finally:
        handle.remove()
    got = lens_log_probs(model, toks, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
    assert (got - expected).abs().max() <= 1e-4
    assert (expected - hf_log_probs(hf, toks)).abs().max() > 1e-3  # the head mattered


# ---------------------------------------------------------------------- the residual stream
@pytest.fixture(params=NAMES)
def family_model(request, tmp_path_factory):
    """A float64 lens model of each family, unprocessed."""
    return from_pretrained(checkpoint(request.param, tmp_path_factory)[1], process=False,
                           dtype=torch.float64), request.param


def test_residual_identities(family_model):
    model, name = family_model
    toks = tokens()
    _, cache = model.run_with_cache(toks, names_filter=EVERY)
    cfg = model.cfg
    for l in range(cfg.n_layers):
        pre, attn, mlp = cache["resid_pre", l], cache["attn_out", l], cache["mlp_out", l]
        torch.testing.assert_close(cache["resid_post", l], pre + attn + mlp, atol=1e-12, rtol=0)
        if cfg.has_resid_mid:
            torch.testing.assert_close(cache["resid_mid", l], pre + attn, atol=1e-12, rtol=0)
        else:
            assert f"blocks.{l}.hook_resid_mid" not in model.hook_dict
        b_O = model.b_O[l]
        if cfg.post_norms:  # the heads' writes add up through the post-norm, its scale frozen
            post = model.blocks[l].ln1_post
            b_O = post.frozen(b_O, cache[f"blocks.{l}.ln1_post.hook_scale"])
            torch.testing.assert_close(post(cache[f"blocks.{l}.hook_attn_out_pre"]), attn)
        else:
            torch.testing.assert_close(cache["result", l].sum(-2) + b_O, attn, atol=1e-12, rtol=0)
        torch.testing.assert_close(cache.head_results(l).sum(-2) + b_O, attn, atol=1e-12, rtol=0)
        assert cache["k", l].shape[-2] == cfg.n_kv_heads and cache["q", l].shape[-2] == cfg.n_heads
    final = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(cache.decompose_resid(layer=None).sum(0), final, atol=1e-12, rtol=0)
    torch.testing.assert_close(cache.accumulated_resid(layer=None)[-1], final)
    # stop_at_layer / start_at_layer round-trip
    mid = model(toks, stop_at_layer=1)
    torch.testing.assert_close(mid, cache["resid_pre", 1])
    torch.testing.assert_close(model(mid, start_at_layer=1), cache["hook_logits"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("process", [False, True])
@pytest.mark.parametrize("per", ["layer", "head", "neuron"])
def test_dla_plus_its_constants_is_the_logit_difference(tmp_path_factory, process, per):
    for name in NAMES:
        model = from_pretrained(checkpoint(name, tmp_path_factory)[1], process=process,
                                dtype=torch.float64)
        toks = tokens()
        logits, cache = model.run_with_cache(toks, names_filter=dla_hook_names(model, per))
        if model.cfg.final_softcap is not None:  # DLA is linear, and so reported, before the cap
            final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
            logits = model.ln_final.plain(final) @ model.W_U + model.b_U
        attr = direct_logit_attribution(model, cache, answer_tokens=[3, 4], wrong_tokens=[5, 6], per=per)
        expected = logits[:, -1, [3, 4]].diagonal() - logits[:, -1, [5, 6]].diagonal()
        torch.testing.assert_close(attr.logit_diff, expected, atol=1e-9, rtol=0, msg=name)
        torch.testing.assert_close(attr.values.sum(0) + attr.constant, expected, atol=1e-9, rtol=0,
                                   msg=name)


def test_apply_ln_to_stack_sums_to_the_normalised_stream(family_model):
    model, _ = family_model
    _, cache = model.run_with_cache(tokens(), names_filter=EVERY)
    stack = cache.decompose_resid(layer=None, apply_ln=True)
    ln = model.ln_final
    want = ln.plain(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    if ln.b is not None:
        want = want - ln.b
    torch.testing.assert_close(stack.sum(0), want, atol=1e-10, rtol=0)


def test_kv_cache_generation_equals_no_cache_with_hooks(family_model):
    model, _ = family_model
    steer = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def add(resid, hook):
        return resid + 0.5 * steer * (hook.positions == 3)[..., None]

    prompt = tokens(batch=2, pos=5, seed=7)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding in the second row
    runs = [model.generate(prompt, 9, temperature=0, stop_at_eos=False, attention_mask=mask,
                           use_kv_cache=kv, fwd_hooks=[("blocks.1.hook_resid_pre", add)])
            for kv in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_sliding_window_pattern_is_zero_outside_the_window(tmp_path_factory):
    for name in ("mistral", "phi3", "gemma2", "gemma3"):
        model = from_pretrained(checkpoint(name, tmp_path_factory)[1])
        _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.endswith("hook_pattern"))
        q, k = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
        for l in range(model.cfg.n_layers):
            w = model.cfg.window_of(l) or 10 ** 6  # global layers: every earlier key
            outside = (k > q) | (k <= q - w)
            p = cache["pattern", l]
            assert float(p[..., outside].abs().max()) == 0.0
            assert float(p[..., ~outside].min()) > 0
        # generation with the KV cache sees the same window
        prompt = tokens(batch=1, pos=3, seed=2)
        assert torch.equal(model.generate(prompt, 11, temperature=0, stop_at_eos=False),
                           model.generate(prompt, 11, temperature=0, stop_at_eos=False, use_kv_cache=False))


def test_gqa_hooks_and_circuits(tmp_path_factory):
    model = from_pretrained(checkpoint("llama", tmp_path_factory)[1], process=False)
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens(), names_filter=lambda n: "blocks.0." in n)
    assert cache["blocks.0.hook_k_input"].shape[-2] == cfg.n_kv_heads
    assert cache["blocks.0.hook_q_input"].shape[-2] == cfg.n_heads
    assert cache["rot_k", 0].shape == cache["k", 0].shape
    assert cache["pre_linear", 0].shape == cache["pre", 0].shape if "pre_linear" in cache else True
    assert "blocks.0.mlp.hook_pre_linear" in model.hook_dict
    OV = model.OV
    assert OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    # query heads 0 and 1 share key/value head 0
    torch.testing.assert_close(OV.A[0, 0], OV.A[0, 1])
    assert not torch.equal(OV.A[0, 0], OV.A[0, 2])


# ---------------------------------------------------------------------- analysis on every family
WORDS = ["<s>", "</s>", "<unk>", "the", "stream", "reads", "heads", "writes", "a", "model"]
WORDS += [f"w{i}" for i in range(SIZE["vocab_size"] - len(WORDS))]  # one word per id


def word_tokenizer(folder: Path):
    """A word-level tokenizer.json with one word for each id of the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from lens.tokenizer import HFTokenizer
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return HFTokenizer.from_dir(folder)

def test_analysis_modules_run_on_every_family(family_model, tmp_path):
    from lens import ablation, patching
    from lens.attribution import logit_lens
    from lens.harvest import harvest
    model, name = family_model
    clean, corrupted = tokens(seed=3), tokens(seed=4)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    result = patching.activation_patch(model, clean, corrupted, metric, site="z", per="head",
                                       progress=False)
    assert result.values.shape == (model.cfg.n_layers, model.cfg.n_heads)
    naive = []
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            def put(z, hook, h=h, l=l):
                z[:, :, h] = clean_cache["z", l][:, :, h]
            naive.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.attn.hook_z", put)])).mean())
    torch.testing.assert_close(result.values.flatten().double(), torch.stack(naive).detach(),
                               atol=1e-5, rtol=0)
    estimate = patching.attribution_patch(model, clean, corrupted, metric, site="resid_pre",
                                          per="layer_pos", progress=False)
    assert estimate.values.shape == (model.cfg.n_layers, clean.shape[1])
    hooks = ablation.ablate_heads([(0, 1), (1, 3)])
    assert not torch.equal(model.run_with_hooks(clean, fwd_hooks=hooks), model(clean))
    lens_result = logit_lens(model, tokens=clean)
    torch.testing.assert_close(lens_result.log_probs[-1], model(clean)[:, -1].log_softmax(-1))
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    h = harvest(model, clean, names, tmp_path / "h", batch_size=1, progress=False)
    torch.testing.assert_close(h.read(names[1]).tensor().reshape(-1, model.cfg.d_mlp).double(),
                               model.run_with_cache(clean)[1]["post", 1].reshape(-1, model.cfg.d_mlp))
    from lens.dissect import dissect
    model.tokenizer = word_tokenizer(tmp_path / "tok")
    d = dissect(model, "the stream reads the heads", max_new_tokens=3, temperature=0.0)
    assert len(d.blocks) == model.cfg.n_layers
    assert (d.blocks[0].resid_mid_norm is None) == (not model.cfg.has_resid_mid)
    assert "the stream reads the heads" in str(d)


# ---------------------------------------------------------------------- bad input
def _llama_config(**changes) -> dict:
    return {**T.LlamaConfig(**SIZE).to_dict(), **changes}


@pytest.mark.parametrize("changes,named", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters type 'yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"hidden_act": "gelu_fast_new"}, "hidden_act='gelu_fast_new'"),
    ({"sliding_window": 8}, "sliding_window=8"),
    ({"quantization_config": {"bits": 4}}, "quantization_config={'bits': 4}"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types ['chunked_attention']"),
])
def test_unimplemented_options_are_refused_by_name(changes, named):
    with pytest.raises(ValueError, match="options lens does not implement") as e:
        config_from_hf(_llama_config(**changes))
    assert named in str(e.value)


def _gemma3_config(**changes) -> dict:
    return {**FAMILIES["gemma3"][0](**SIZE, **FAMILIES["gemma3"][2]).to_dict(), **changes}


@pytest.mark.parametrize("changes,named", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                          "chunked_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters per layer type ['chunked_attention', 'full_attention']"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters['full_attention'] type 'yarn'"),
    ({"hidden_act": "relu"}, "hidden_act='relu' differs from hidden_activation='gelu_pytorch_tanh'"),
])
def test_gemma3_options_lens_lacks_are_refused_by_name(changes, named):
    with pytest.raises(ValueError, match="options lens does not implement") as e:
        config_from_hf(_gemma3_config(**changes))
    assert named in str(e.value)


def test_a_rope_per_layer_type_is_refused_where_the_family_has_none():
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}
    with pytest.raises(ValueError, match=r"rope_parameters per layer type \['full_attention'"):
        config_from_hf(_llama_config(rope_parameters=rope))


def test_mismatched_checkpoint_lists_every_problem(tmp_path_factory):
    from safetensors.torch import load_file, save_file
    hf, folder = checkpoint("qwen2", tmp_path_factory)
    bad = tmp_path_factory.mktemp("bad_qwen2")
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.bias"]
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:90]
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError) as e:
        from_pretrained(bad)
    msg = str(e.value)
    assert "missing tensors (1): model.layers.1.self_attn.k_proj.bias (32,)" in msg
    assert "unexpected tensors (1): model.layers.0.extra.weight (3,)" in msg
    assert "mis-shaped tensors (1): model.layers.0.mlp.up_proj.weight: expected (96, 64), got (90, 64)" in msg


def test_tied_unembedding_stays_tied_until_processing(tmp_path_factory):
    folder = checkpoint("llama3", tmp_path_factory)[1]
    model = from_pretrained(folder, process=False)
    assert model.cfg.tied_embeddings and "unembed.W_U" not in dict(model.named_parameters())
    assert model.W_U.data_ptr() == model.W_E.data_ptr()
    processed = from_pretrained(folder)
    assert not processed.cfg.tied_embeddings and "unembed.W_U" in dict(processed.named_parameters())


# ---------------------------------------------------------------------- where checkpoints come from
@pytest.mark.parametrize("name", ["qwen3", "pythia"])
def test_sharded_checkpoint_and_hub_cache(tmp_path, monkeypatch, name):
    constants = pytest.importorskip("huggingface_hub.constants")
    hf = random_hf(name)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    toks = tokens()
    model = from_pretrained(sharded)
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--someone--tiny-{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    hf.save_pretrained(repo / "snapshots" / commit)
    cached = lens.HookedGPT.from_pretrained_no_processing(f"someone/tiny-{name}")
    assert (lens_log_probs(cached, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4


def test_weights_load_in_the_checkpoint_dtype_unless_asked(tmp_path):
    hf = random_hf("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = from_pretrained(tmp_path / "bf16", process=False)
    assert model.cfg.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.W_E, hf.model.embed_tokens.weight)  # bit for bit, no round trip
    assert from_pretrained(tmp_path / "bf16", dtype=torch.float32).cfg.dtype == torch.float32


def test_the_checkpoints_tokenizer_is_used(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=101, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the residual stream"] * 20, trainer)
    hf = random_hf("llama")
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    model = from_pretrained(tmp_path / "ckpt")
    ids = model.to_tokens("hello world")
    assert ids[0, 0] == tok.token_to_id("<s>")
    assert ids[0, 1:].tolist() == tok.encode("hello world").ids
    assert model.to_string(ids[0, 1:]) == "hello world"


def test_processing_applied_to_each_family_is_what_the_docs_say(tmp_path_factory):
    from lens.processing import applied_steps
    rms = ["fold_layer_norm", "center_unembed"]
    ln = ["fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases"]
    expected = {"llama": rms, "llama3": rms, "mistral": rms, "qwen2": rms, "qwen3": rms,
                "phi3": rms, "gemma": rms, "gemma2": ["fold_layer_norm"], "gemma3": rms, "olmo2": rms, "pythia": ln,
                "neox_sequential": ln}
    for name, steps in expected.items():
        model = from_pretrained(checkpoint(name, tmp_path_factory)[1])
        assert applied_steps(model) == steps, name
        assert model.cfg.normalization == ("LNPre" if steps is ln else "RMSPre")


def test_gqa_and_windowed_attention_stay_on_the_fused_kernel_until_the_pattern_is_hooked(
        tmp_path_factory, monkeypatch):
    import torch.nn.functional as F
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("llama", "mistral"):
        model = from_pretrained(checkpoint(name, tmp_path_factory)[1])
        calls.clear()
        model(tokens())
        assert len(calls) == model.cfg.n_layers, name
        calls.clear()  # caching the pattern materialises it for the cache; the fused output flows on
        model.run_with_cache(tokens(), names_filter=lambda n: n.endswith("hook_pattern"))
        assert len(calls) == model.cfg.n_layers, name
        calls.clear()  # a hook that edits the pattern takes the materialised path
        model.run_with_hooks(tokens(), fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: x * 0.5)])
        assert not calls, name


@pytest.mark.parametrize("name,hook,why", [
    ("pythia", "blocks.0.hook_resid_mid", "run in parallel"),
    ("llama", "hook_pos_embed", "its positions are rotary"),
    ("pythia", "blocks.0.mlp.hook_pre_linear", "not gated"),
    ("llama", "blocks.0.attn.q_norm.hook_scale", "no QK-norm"),
    ("llama", "blocks.5.hook_resid_pre", "the model has 2 blocks"),
])
def test_a_hook_point_this_architecture_lacks_says_why(tmp_path_factory, name, hook, why):
    model = from_pretrained(checkpoint(name, tmp_path_factory)[1])
    with pytest.raises(KeyError, match=why):
        model.run_with_hooks(tokens(), fwd_hooks=[(hook, lambda x, hook: x)])


def test_no_unembedding_bias_is_built_unless_processing_needs_one(tmp_path_factory):
    llama = from_pretrained(checkpoint("llama", tmp_path_factory)[1])
    assert llama.unembed.b_U is None and torch.equal(llama.b_U, torch.zeros(SIZE["vocab_size"]))
    pythia = checkpoint("pythia", tmp_path_factory)[1]
    assert from_pretrained(pythia, process=False).unembed.b_U is None
    processed = from_pretrained(pythia)  # ln_final's bias folded into a new b_U
    assert processed.cfg.unembed_bias and float(processed.unembed.b_U.abs().max()) > 0


def test_stacked_key_value_weights_are_per_query_head_as_in_transformer_lens(tmp_path_factory):
    from lens.circuits import composition_scores, ov_copying_scores
    model = from_pretrained(checkpoint("llama", tmp_path_factory)[1], process=False)
    cfg = model.cfg
    assert model.blocks[0].attn.W_K.shape == (cfg.n_kv_heads, cfg.d_model, cfg.d_head)
    assert model.W_K.shape == model.W_V.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.b_V.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head)
    torch.testing.assert_close(model.W_V[1, 3], model.blocks[1].attn.W_V[1])  # head 3 reads kv head 1
    # V-composition of L0H1 into L1H3, by hand from the parameters: head h uses kv head h // 2
    a, b = model.blocks[0].attn, model.blocks[1].attn
    ov_a = (a.W_V[0] @ a.W_O[1]).double()
    ov_b = (b.W_V[1] @ b.W_O[3]).double()
    want = (ov_a @ ov_b).norm() / (ov_a.norm() * ov_b.norm())
    scores = composition_scores(model, "v")
    assert scores.shape == (cfg.n_layers, cfg.n_heads) * 2
    torch.testing.assert_close(scores[0, 1, 1, 3].double(), want, atol=1e-5, rtol=1e-4)
    assert ov_copying_scores(model).shape == (cfg.n_layers, cfg.n_heads)


def test_patching_keys_per_head_under_gqa_patches_key_value_heads(tmp_path_factory):
    from lens import patching
    model = from_pretrained(checkpoint("llama", tmp_path_factory)[1], process=False, dtype=torch.float64)
    clean, corrupted = tokens(seed=3), tokens(seed=4)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    result = patching.activation_patch(model, clean, corrupted, metric, site="k", per="head", progress=False)
    assert result.values.shape == (model.cfg.n_layers, model.cfg.n_kv_heads)
    assert result.labels["head"] == list(range(model.cfg.n_kv_heads))
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("attn.hook_k"))
    for l in range(model.cfg.n_layers):
        for g in range(model.cfg.n_kv_heads):
            def put(k, hook, g=g, l=l):
                k[:, :, g] = clean_cache["k", l][:, :, g]
            naive = metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.attn.hook_k", put)])).mean()
            assert abs(float(result.values[l, g]) - float(naive)) < 1e-5
    estimate = patching.attribution_patch(model, clean, corrupted, metric, site="v", per="head_pos",
                                          progress=False)
    assert estimate.values.shape == (model.cfg.n_layers, model.cfg.n_kv_heads, clean.shape[1])


@pytest.mark.parametrize("process", [False, True])
def test_gemma_offset_embedding_scale_and_tying_survive_save_and_load(tmp_path_factory, tmp_path, process):
    hf, folder = checkpoint("gemma", tmp_path_factory)
    model = from_pretrained(folder, process=process)
    assert model.cfg.tied_embeddings != process  # processing unties (it centres W_U)
    model.save(tmp_path / "saved")
    again = lens.HookedGPT.from_pretrained(tmp_path / "saved", process=process)
    assert again.cfg == model.cfg
    toks = tokens()
    assert (lens_log_probs(again, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    assert torch.equal(lens_log_probs(again, toks), lens_log_probs(model, toks))


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "olmo2", "qwen3"])
def test_lens_check_passes_where_norms_follow_the_sublayers(tmp_path_factory, name):
    folder = checkpoint(name, tmp_path_factory)[1]
    report = lens.check(from_pretrained(folder), folder)
    assert report.ok, str(report)
    assert report.log_prob_diff is not None and report.log_prob_diff < 1e-4


def test_a_multimodal_gemma3_checkpoint_is_refused_with_what_loads():
    with pytest.raises(ValueError, match="multimodal Gemma-3 checkpoint.*gemma3_text"):
        config_from_hf({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
