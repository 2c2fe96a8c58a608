"""lens.tl against TransformerLens 4.x (TransformerBridge in compatibility mode, processed as
TransformerLens's HookedTransformer.from_pretrained is) on one random GPT-2 checkpoint the
tests create: what TransformerLens scripts read and call gives TransformerLens's values."""

import pytest
import torch
from test_parity_bridge import word_tokenizer

import lens.tl as tl

TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(lens.tl model, bridge, tokens) on the same random GPT-2 (norm weights and biases away
    from 1 and 0), both with TransformerLens's default processing."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=101)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if ".ln" in n or n.startswith("transformer.ln_f"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if n.endswith("weight") else 0.2 * torch.randn_like(p))
    hf.save_pretrained(folder / "ckpt")
    bridge = TransformerBridge.boot_transformers(str(folder / "ckpt"), device="cpu", dtype=torch.float32,
                                                 tokenizer=word_tokenizer(folder / "tok"))
    bridge.enable_compatibility_mode(disable_warnings=True)
    model = tl.HookedTransformer.from_pretrained(folder / "ckpt")
    toks = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, bridge, toks


@pytest.fixture(scope="module")
def caches(pair):
    model, bridge, toks = pair
    with torch.no_grad():
        ours, theirs = model.run_with_cache(toks)[1], bridge.run_with_cache(toks)[1]
    return ours, theirs


def close(a, b, atol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------- layer=-1 is the final stream
@pytest.mark.parametrize("layer", [None, -1, 1])
@pytest.mark.parametrize("kwargs", [{}, {"incl_mid": True}, {"apply_ln": True, "pos_slice": -1},
                                    {"incl_mid": True, "apply_ln": True}])
def test_accumulated_resid_layers_as_transformer_lens(caches, layer, kwargs):
    ours, theirs = caches
    a, la = ours.accumulated_resid(layer=layer, return_labels=True, **kwargs)
    b, lb = theirs.accumulated_resid(layer=layer, return_labels=True, **kwargs)
    assert la == lb
    close(a, b)


@pytest.mark.parametrize("layer", [None, -1, 0, 1])
def test_decompositions_and_stacks_at_the_final_stream(caches, layer):
    ours, theirs = caches
    checks = [("decompose_resid", {}), ("decompose_resid", {"mode": "attn"}), ("stack_head_results", {})]
    if layer != 0:  # at layer 0 TransformerLens fails on neurons, and its head remainder reads
        # resid_post[-1], the final stream; lens's is the stream entering block 0 (below)
        checks += [("stack_head_results", {"incl_remainder": True}), ("stack_neuron_results", {}),
                   ("stack_neuron_results", {"incl_remainder": True})]
    for fn, kwargs in checks:
        a, la = getattr(ours, fn)(layer=layer, return_labels=True, **kwargs)
        b, lb = getattr(theirs, fn)(layer=layer, return_labels=True, **kwargs)
        assert la == lb, fn
        close(a, b)
    # the remainder is what the heads leave of the stream at `layer` (the final one for -1)
    stack = ours.stack_head_results(layer=layer, incl_remainder=True)
    final = ours.model.cfg.n_layers if layer in (None, -1) else layer
    target = ours["resid_post", final - 1] if final == ours.model.cfg.n_layers else ours["resid_pre", final]
    close(stack.sum(0), target)
    neurons = ours.stack_neuron_results(layer=layer, incl_remainder=True)
    close(neurons.sum(0), target)


def test_apply_ln_to_stack_at_minus_one_uses_ln_final(caches):
    ours, theirs = caches
    stack = ours.decompose_resid(layer=-1)
    close(ours.apply_ln_to_stack(stack, layer=-1), theirs.apply_ln_to_stack(stack, layer=-1))
    close(ours.apply_ln_to_stack(stack, layer=-1), ours.apply_ln_to_stack(stack, layer=None))
    # -2 counts back one more: the stream entering the last block, through its ln1
    last = ours.model.cfg.n_layers - 1
    close(ours.accumulated_resid(layer=-2), ours.accumulated_resid(layer=last))
    with pytest.raises(ValueError, match=r"layer=-4 must be an int in \[-3, 2\]"):
        ours.accumulated_resid(layer=-4)


def test_the_exploratory_analysis_dla_self_check(pair, caches):
    """TransformerLens's Exploratory Analysis demo checks that the logit-diff of the final
    stream, through ln_final with the cached scale, equals the model's logit difference."""
    model, bridge, toks = pair
    ours, theirs = caches
    answers = torch.tensor([[3, 7], [11, 5]])
    results = []
    for m, cache in ((model, ours), (bridge, theirs)):
        directions = m.tokens_to_residual_directions(answers)
        diff_dir = directions[:, 0] - directions[:, 1]
        final = cache["resid_post", -1][:, -1, :]
        scaled = cache.apply_ln_to_stack(final, layer=-1, pos_slice=-1)
        results.append((scaled * diff_dir).sum(-1).mean())
    close(results[0], results[1])
    with torch.no_grad():
        logits = model(toks)[:, -1]
    want = (logits.gather(1, answers[:, :1]) - logits.gather(1, answers[:, 1:])).mean()
    b_U = model.b_U  # the folded ln_final bias lives in b_U, which no stream component carries
    close(results[0] + (b_U[answers[:, 0]] - b_U[answers[:, 1]]).mean(), want, atol=1e-4)


# ---------------------------------------------------------------------- what the default cache holds
def test_the_default_cache_holds_what_transformer_lens_caches(pair, caches):
    model, _, toks = pair
    ours, _ = caches
    leaves = {k.rsplit(".", 1)[-1] for k in ours.keys()}
    assert not leaves & {"hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"}
    with pytest.raises(KeyError, match=r"set_use_attn_result\(True\)"):
        ours["result", 0]
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    try:
        assert model.cfg.use_attn_result and model.cfg.use_split_qkv_input
        with torch.no_grad():
            full = model.run_with_cache(toks)[1]
        assert "blocks.0.attn.hook_result" in full and "blocks.1.hook_q_input" in full
        close(full["result", 1].sum(-2) + model.b_O[1], full["attn_out", 1])
    finally:
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)
    named = model.run_with_cache(toks, names_filter="blocks.0.attn.hook_result")[1]
    assert list(named.keys()) == ["blocks.0.attn.hook_result"]


# ---------------------------------------------------------------------- model.cfg and model methods
def test_cfg_answers_transformer_lens_field_names(pair):
    model, bridge, _ = pair
    cfg, theirs = model.cfg, bridge.cfg
    for name in ("positional_embedding_type", "d_vocab_out", "n_key_value_heads",
                 "default_prepend_bos", "act_fn", "d_head", "n_heads", "d_mlp", "eps", "n_ctx",
                 "use_attn_result", "use_split_qkv_input", "use_local_attn", "window_size"):
        assert getattr(cfg, name) == getattr(theirs, name), name
    assert cfg.normalization_type == "LNPre"  # folded, as HookedTransformer's cfg says
    assert str(cfg.device) == str(theirs.device) == "cpu"
    assert cfg.attn_scale == cfg.d_head ** 0.5
    assert torch.zeros(2, device=cfg.device).device == model.W_E.device


def test_hooked_transformer_config_builds_what_transformer_lens_builds():
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=64, d_head=16, d_mlp=256, d_vocab=300,
                                     n_ctx=50, act_fn="relu", normalization_type="LN", seed=3)
    assert (cfg.n_heads, cfg.d_mlp, cfg.attn_scale, cfg.d_vocab_out) == (4, 256, 4.0, 300)
    model = tl.HookedTransformer(cfg)
    assert model.W_pos.shape == (50, 64) and model.cfg.positional_embedding_type == "standard"
    assert abs(float(model.W_E.detach().std()) - 0.8 / 64 ** 0.5) < 0.01  # TransformerLens's initializer_range
    again = tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=2, d_model=64, d_head=16, d_mlp=256, d_vocab=300, n_ctx=50, act_fn="relu", seed=3))
    assert torch.equal(model.W_E, again.W_E)
    rotary = tl.HookedTransformerConfig(n_layers=1, d_model=32, d_head=8, d_vocab=20, n_ctx=16,
                                        act_fn="silu", positional_embedding_type="rotary",
                                        normalization_type="RMS", n_key_value_heads=2, gated_mlp=True)
    assert rotary.rotary_dim == 8 and rotary.n_kv_heads == 2 and not rotary.positional_embedding
    assert rotary.n_key_value_heads == 2 and rotary.positional_embedding_type == "rotary"


@pytest.mark.parametrize("fields,named", [
    ({"positional_embedding_type": "alibi"}, "positional_embedding_type='alibi'"),
    ({"d_vocab_out": 7}, "d_vocab_out=7 differs from d_vocab=20"),
    ({"final_rms": True}, "final_rms=True"),
    ({"attention_dir": "bidirectional"}, "attention_dir='bidirectional'"),
    ({"shortformer": True}, "unknown field shortformer=True"),
    ({"d_model": 30}, "d_model=30 is not a multiple of d_head=8"),
])
def test_hooked_transformer_config_refuses_what_lens_lacks_by_name(fields, named):
    base = dict(n_layers=1, d_model=32, d_head=8, d_vocab=20, n_ctx=16, act_fn="relu")
    with pytest.raises(ValueError, match="HookedTransformerConfig") as e:
        tl.HookedTransformerConfig(**{**base, **fields})
    assert named in str(e.value)


def test_model_helpers_give_transformer_lens_values(pair):
    model, bridge, toks = pair
    for tokens in (5, torch.tensor(5), torch.tensor([5, 6]), torch.tensor([[1, 2], [3, 4]])):
        close(model.tokens_to_residual_directions(tokens), bridge.tokens_to_residual_directions(tokens))
    with pytest.raises(ValueError, match="outside"):
        model.tokens_to_residual_directions(1000)
    resid, tokens, shortformer, mask = model.input_to_embed(toks)
    theirs = bridge.input_to_embed(toks)
    close(resid, theirs[0])
    assert torch.equal(tokens, toks) and shortformer is None and mask is None
    with torch.no_grad():
        close(model(resid, start_at_layer=0), model(toks))
        logits = model(toks)
    for per_token in (False, True):
        close(model.loss_fn(logits, toks, per_token=per_token),
              bridge.loss_fn(logits, toks, per_token=per_token))


def test_refactor_factored_attn_matrices_changes_no_output(pair):
    model, _, toks = pair
    import copy
    refactored = copy.deepcopy(model)
    refactored.refactor_factored_attn_matrices()
    with torch.no_grad():
        close(refactored(toks), model(toks), atol=1e-4)
    close(refactored.W_Q @ refactored.W_K.mT, model.W_Q @ model.W_K.mT, atol=1e-4)
    W_O = refactored.W_O  # a rotation: orthonormal rows
    eye = torch.eye(W_O.shape[-2]).expand_as(W_O @ W_O.mT)
    close(W_O @ W_O.mT, eye, atol=1e-4)
    assert float(refactored.b_V.abs().max()) == 0.0
    norms_q, norms_k = refactored.W_Q.norm(dim=-2), refactored.W_K.norm(dim=-2)
    assert torch.allclose(norms_q ** 2 + refactored.b_Q ** 2, norms_k ** 2 + refactored.b_K ** 2, atol=1e-4)
    rotary = tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=1, d_model=32, d_head=8, d_vocab=20, n_ctx=16, act_fn="relu",
        positional_embedding_type="rotary"))
    with pytest.raises(ValueError, match="rotary positions"):
        rotary.refactor_factored_attn_matrices()


# ---------------------------------------------------------------------- ActivationCache methods
@pytest.mark.parametrize("kwargs", [{}, {"layer": 1}, {"expand_neurons": False}, {"apply_ln": True},
                                    {"pos_slice": -1}, {"layer": 1, "mlp_input": True},
                                    {"project_output_onto": "direction"}])
def test_full_resid_decomposition_as_transformer_lens(caches, kwargs):
    ours, theirs = caches
    if kwargs.get("project_output_onto") == "direction":
        kwargs = {"project_output_onto": torch.randn(64, generator=torch.Generator().manual_seed(0))}
    a, la = ours.get_full_resid_decomposition(return_labels=True, **kwargs)
    b, lb = theirs.get_full_resid_decomposition(return_labels=True, **kwargs)
    assert la == lb
    close(a, b, atol=1e-4)
    if not kwargs:  # every row, summed, is the final stream
        close(a.sum(0), ours["resid_post", -1], atol=1e-4)


def test_full_resid_decomposition_adds_up_through_post_norms():
    from conftest import make_model, make_tokens
    model = make_model(normalization="RMS", post_norms=True, norm_offset=1.0, attn_out_bias=True)
    _, cache = model.run_with_cache(make_tokens(model))
    for layer in (None, 1):
        stack = cache.get_full_resid_decomposition(layer=layer)
        target = cache["resid_post", 1] if layer is None else cache["resid_pre", 1]
        close(stack.sum(0), target, atol=1e-5)


def test_stack_activation_neuron_results_and_head_results(pair, caches):
    model, _, toks = pair
    ours, theirs = caches
    for layer in (-1, None, 1):
        close(ours.stack_activation("pattern", layer=layer), theirs.stack_activation("pattern", layer=layer))
    close(ours.stack_activation("scale", 2, "ln2"), theirs.stack_activation("scale", 2, "ln2"))
    Slice, TLSlice = tl.utils.Slice, pytest.importorskip("transformer_lens.utilities.slice").Slice
    for neurons, pos in (([1, 5], -1), ((0, 10), [2, 4]), (None, None)):
        close(ours.get_neuron_results(1, neuron_slice=Slice(neurons), pos_slice=Slice(pos)),
              theirs.get_neuron_results(1, neuron_slice=TLSlice(neurons), pos_slice=TLSlice(pos)))
        close(ours.get_neuron_results(1, neuron_slice=neurons, pos_slice=pos),
              theirs.get_neuron_results(1, neuron_slice=neurons, pos_slice=pos))
    d = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    close(ours.get_neuron_results(0, project_output_onto=d), theirs.get_neuron_results(0, project_output_onto=d))
    with torch.no_grad():
        fresh = model.run_with_cache(toks)[1]
    assert "blocks.1.attn.hook_result" not in fresh
    fresh.compute_head_results()
    close(fresh["result", 1], theirs["result", 1])
    close(ours.stack_head_results(pos_slice=Slice(-1)), theirs.stack_head_results(pos_slice=-1))


def test_batch_slicing_removing_the_batch_dim_and_autodiff(pair, caches):
    model, bridge, toks = pair
    ours, theirs = caches
    one = ours.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim
    close(one["resid_post", 1], theirs.apply_slice_to_batch_dim(1)["resid_post", 1])
    kept = ours.apply_slice_to_batch_dim([1])
    assert kept.has_batch_dim and kept["resid_post", 1].shape[0] == 1
    same = kept.remove_batch_dim()
    assert same is kept and not kept.has_batch_dim and kept["resid_post", 1].shape == (9, 64)
    with pytest.raises(ValueError, match="batch size 2"):
        model.run_with_cache(toks)[1].remove_batch_dim()
    with pytest.warns(UserWarning, match="global state"):
        ours.toggle_autodiff(False)
    try:
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("pos_slice", [-1, 3, [2, 5], (1, 4), "slice"])
def test_run_with_cache_pos_slice_as_transformer_lens(pair, pos_slice):
    model, bridge, toks = pair
    theirs_slice = pos_slice
    if pos_slice == "slice":
        pos_slice = tl.utils.Slice(-2)
        theirs_slice = pytest.importorskip("transformer_lens.utilities.slice").Slice(-2)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        ours = model.run_with_cache(toks, names_filter=names, pos_slice=pos_slice)[1]
        theirs = bridge.run_with_cache(toks, names_filter=names, pos_slice=theirs_slice)[1]
    for name in names:
        close(ours[name], theirs[name])
    if isinstance(pos_slice, int):  # one position keeps a size-1 axis
        assert ours["blocks.0.hook_resid_pre"].shape == (2, 1, 64)


# ---------------------------------------------------------------------- loading and tokens
def test_from_pretrained_takes_transformer_lens_keywords():
    plain = tl.HookedTransformer.from_pretrained("lens-tiny-attn2l")
    model = tl.HookedTransformer.from_pretrained("lens-tiny-attn2l", default_prepend_bos=False,
                                                 default_padding_side="left",
                                                 refactor_factored_attn_matrices=True)
    assert isinstance(model, tl.HookedTransformer) and not model.cfg.default_prepend_bos
    text = ["def f(x):", "import os, sys, re"]
    assert torch.equal(model.to_tokens(text[0]), plain.to_tokens(text[0])[:, 1:])
    tokens = model.to_tokens(text)
    assert tokens[0, 0] == model.tokenizer.pad_token_id and tokens[1, 0] != model.tokenizer.pad_token_id
    assert "refactor_factored_attn_matrices" in model.cfg.metadata["processing"]
    ids = plain.to_tokens("import os")
    with torch.no_grad():  # the same function after refactoring
        close(model(ids), plain(ids), atol=1e-4)
        close(plain("import os", prepend_bos=False), plain(ids[:, 1:]))
    with pytest.raises(ValueError, match="n_devices=2"):
        tl.HookedTransformer.from_pretrained("lens-tiny-attn2l", n_devices=2)


def test_to_tokens_truncates_to_n_ctx_with_a_warning():
    model = tl.HookedTransformer.from_pretrained("lens-tiny-attn2l")
    long = "x = 1\n" * model.cfg.n_ctx
    with pytest.warns(UserWarning, match=f"truncated to n_ctx={model.cfg.n_ctx}"):
        assert model.to_tokens(long).shape[1] == model.cfg.n_ctx
    with pytest.raises(ValueError, match="n_ctx"):
        model(model.to_tokens(long, truncate=False))
    assert model.to_single_str_token(model.to_single_token(" x")) == " x"


def test_load_and_process_state_dict_into_a_weightless_model():
    """The No_Position_Experiment's analysis model: a trained LN model's state dict folded into
    a model built with normalization_type="LNPre"."""
    fields = dict(n_layers=2, d_model=32, d_head=16, d_mlp=64, d_vocab=50, n_ctx=12, act_fn="relu")
    trained = tl.HookedTransformer(tl.HookedTransformerConfig(**fields, seed=1))
    with torch.no_grad():  # norm weights and biases away from 1 and 0
        for name, p in trained.named_parameters():
            if ".ln" in name or name.startswith("ln_final"):
                p.add_(0.3 * torch.randn_like(p))
    analysis = tl.HookedTransformer(tl.HookedTransformerConfig(**fields, normalization_type="LNPre",
                                                               init_weights=False))
    analysis.load_and_process_state_dict(trained.state_dict(), fold_ln=True,
                                         center_writing_weights=True, center_unembed=True)
    toks = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(analysis(toks).log_softmax(-1), trained(toks).log_softmax(-1), atol=1e-5)
        in_place = tl.HookedTransformer(tl.HookedTransformerConfig(**fields, seed=1))
        in_place.load_state_dict(trained.state_dict())
        in_place.load_and_process_state_dict(trained.state_dict())
        close(in_place(toks), analysis(toks))
    assert in_place.cfg.normalization == "LNPre"
    with pytest.raises(ValueError, match="does not fit this model"):
        analysis.load_and_process_state_dict({k: v for k, v in trained.state_dict().items()
                                              if "W_pos" not in k})


def test_initialisation_is_transformer_lens_gpt2_init():
    cfg = tl.HookedTransformerConfig(n_layers=4, d_model=64, d_head=16, d_mlp=256, d_vocab=500,
                                     n_ctx=64, act_fn="gelu", initializer_range=0.05, seed=0)
    model = tl.HookedTransformer(cfg)
    for W in (model.W_E, model.W_O, model.W_out, model.W_U):  # W_O and W_out not rescaled
        assert abs(float(W.detach().std()) - 0.05) < 0.003
    assert float(model.b_in.detach().abs().max()) == 0 and float(model.blocks[0].ln1.w.detach().min()) == 1
