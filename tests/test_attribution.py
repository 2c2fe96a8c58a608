"""Direct logit attribution sums to the logit difference; the logit lens ends at the model's output."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import EVERY, make_model, make_tokens

from lens.attribution import (dla_hook_names, direct_logit_attribution, logit_diff_direction,
                              logit_lens)

CONFIGS = {
    "gpt2": {},
    "attn_only": dict(attn_only=True, n_layers=3),
    "lnpre": dict(normalization="LNPre"),
    "no_ln": dict(normalization=None),
    "no_pos": dict(positional_embedding=False, d_head=5),
}


def setup(cfg: dict, batch: int = 3):
    model = make_model(seed=4, dtype=torch.float64, **cfg)
    tokens = make_tokens(model, batch=batch, pos=6, seed=2)
    logits, cache = model.run_with_cache(tokens, names_filter=EVERY)
    g = torch.Generator().manual_seed(0)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=g)
    wrong = torch.randint(0, model.cfg.d_vocab, (batch,), generator=g)
    return model, tokens, logits, cache, answer, wrong


def logit_diff(logits, pos, answer, wrong):
    rows = torch.arange(logits.shape[0])
    at = logits[rows, pos]
    return at[rows, answer] - (0 if wrong is None else at[rows, wrong])


def test_direction_is_the_difference_of_unembedding_columns(model):
    d = logit_diff_direction(model, [3, 4], [5, 6])
    torch.testing.assert_close(d, (model.W_U[:, [3, 4]] - model.W_U[:, [5, 6]]).T)
    assert logit_diff_direction(model, 3).shape == (1, model.cfg.d_model)
    with pytest.raises(ValueError, match="outside"):
        logit_diff_direction(model, [3, 99])
    with pytest.raises(ValueError, match="2 answer tokens but 3 wrong"):
        logit_diff_direction(model, [1, 2], [1, 2, 3])


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("per", ["layer", "component", "head", "neuron"])
def test_dla_plus_constant_is_the_logit_difference(cfg, per):
    model, tokens, logits, cache, answer, wrong = setup(CONFIGS[cfg])
    if per == "neuron" and model.cfg.attn_only:
        with pytest.raises(ValueError, match="no neurons"):
            direct_logit_attribution(model, cache, answer, wrong, per=per)
        return
    for pos, w in ((-1, wrong), (torch.tensor([2, 5, 0]), wrong), (3, None)):
        dla = direct_logit_attribution(model, cache, answer, w, per=per, pos=pos)
        expected = logit_diff(logits, pos if isinstance(pos, int) else pos, answer, w)
        torch.testing.assert_close(dla.values.sum(0) + dla.constant, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(dla.logit_diff, expected, rtol=0, atol=1e-10)
        assert dla.values.shape == (len(dla.labels), 3)


def frozen_ln(model, cache, x, pos):
    """Components through the final LayerNorm with the cached scale, without its bias."""
    scale = cache["ln_final.hook_scale"][:, pos]
    return (x - x.mean(-1, keepdim=True)) / scale * model.ln_final.w


def test_per_head_values_and_the_remainder_by_hand():
    model, tokens, logits, cache, answer, wrong = setup({})
    dla = direct_logit_attribution(model, cache, answer, wrong, per="head", pos=-1)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert dla.labels == [f"L{l}H{h}" for l in range(L) for h in range(H)] + ["remainder"]
    direction = (model.W_U[:, answer] - model.W_U[:, wrong]).T
    for l in range(L):
        for h in range(H):
            write = cache["result", l][:, -1, h]
            expected = (frozen_ln(model, cache, write, -1) * direction).sum(-1)
            torch.testing.assert_close(dla.values[l * H + h], expected, rtol=0, atol=1e-12)
    # the remainder is everything that is not a head: embeddings, MLPs and the b_O biases
    rest = cache["embed"][:, -1] + cache["pos_embed"][:, -1]
    for l in range(L):
        rest = rest + cache["mlp_out", l][:, -1] + model.blocks[l].attn.b_O
    expected = (frozen_ln(model, cache, rest, -1) * direction).sum(-1)
    torch.testing.assert_close(dla.values[-1], expected, rtol=0, atol=1e-12)
    # heads + remainder + constant (LN bias · direction + b_U difference) = logit difference
    constant = direction @ model.ln_final.b + model.b_U[answer] - model.b_U[wrong]
    torch.testing.assert_close(dla.constant, constant)
    total = sum(dla.values[i] for i in range(len(dla.labels))) + constant
    torch.testing.assert_close(total, logit_diff(logits, -1, answer, wrong), rtol=0, atol=1e-10)


def test_per_layer_groups_components_and_neurons_split_mlps():
    model, tokens, logits, cache, answer, wrong = setup({})
    comp = direct_logit_attribution(model, cache, answer, wrong, per="component")
    layer = direct_logit_attribution(model, cache, answer, wrong, per="layer")
    assert comp.labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert layer.labels == ["embed", "L0", "L1"]
    torch.testing.assert_close(layer.values[1], comp.values[2] + comp.values[3])
    neuron = direct_logit_attribution(model, cache, answer, wrong, per="neuron")
    d_mlp = model.cfg.d_mlp
    mlp0 = comp.values[3]  # includes b_out, which no neuron owns
    direction = (model.W_U[:, answer] - model.W_U[:, wrong]).T
    b_out = (frozen_ln(model, cache, model.blocks[0].mlp.b_out.expand(3, -1), -1) * direction).sum(-1)
    torch.testing.assert_close(neuron.values[:d_mlp].sum(0) + b_out, mlp0)
    assert neuron.labels[d_mlp + 1] == "L1N1"


def test_dla_from_a_minimal_cache_and_in_float32(tmp_path):
    model = make_model(seed=1)
    tokens = make_tokens(model, batch=2)
    logits = model(tokens)
    for per in ("layer", "head", "neuron", "component"):
        _, cache = model.run_with_cache(tokens, names_filter=dla_hook_names(model, per))
        dla = direct_logit_attribution(model, cache, [1, 2], [3, 4], per=per)
        expected = logits[:, -1, [1, 2]].diagonal() - logits[:, -1, [3, 4]].diagonal()
        torch.testing.assert_close(dla.values.sum(0) + dla.constant, expected, rtol=1e-4, atol=1e-4)
        if per in ("head", "layer"):
            dla.plot(path=tmp_path / f"{per}.png")
            assert (tmp_path / f"{per}.png").stat().st_size > 0
        assert len(dla.top(3)) == 3
    with pytest.raises(ValueError, match="per="):
        direct_logit_attribution(model, cache, [1, 2], per="heads")
    with pytest.raises(ValueError, match="2 answer tokens for a batch of"):
        direct_logit_attribution(model, model.run_with_cache(tokens[:1])[1], [1, 2])
    _, sliced = model.run_with_cache(tokens, pos_slice=-1)
    with pytest.raises(ValueError, match="without pos_slice"):
        direct_logit_attribution(model, sliced, [1, 2])


@pytest.mark.parametrize("cfg", ["gpt2", "lnpre", "no_ln"])
@pytest.mark.parametrize("freeze_scale", [False, True])
def test_logit_lens_ends_at_the_models_log_probs(cfg, freeze_scale):
    model, tokens, logits, cache, answer, _ = setup(CONFIGS[cfg])
    lens_ = logit_lens(model, cache, pos=-1, freeze_scale=freeze_scale)
    L = model.cfg.n_layers
    assert lens_.log_probs.shape == (L + 1, 3, model.cfg.d_vocab)
    assert lens_.labels == [f"{l}_pre" for l in range(L)] + ["final_post"]
    torch.testing.assert_close(lens_.log_probs[-1], logits[:, -1].log_softmax(-1), rtol=0, atol=1e-10)
    # the first row reads the embeddings alone
    x0 = cache["resid_pre", 0][:, -1]
    if model.cfg.normalization is None or not freeze_scale:
        ln = model.ln_final if model.cfg.normalization else None
        normed = x0 if ln is None else F.layer_norm(x0, (model.cfg.d_model,), ln.w, ln.b, ln.eps)
    else:
        normed = (x0 - x0.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"][:, -1]
        if model.ln_final.w is not None:
            normed = normed * model.ln_final.w + model.ln_final.b
    expected = (normed @ model.W_U + model.b_U).log_softmax(-1)
    torch.testing.assert_close(lens_.log_probs[0], expected, rtol=0, atol=1e-10)


def test_logit_lens_answer_stats_tokens_and_plot(tmp_path):
    model = make_model(seed=2)
    tokens = make_tokens(model, batch=2)
    top = model(tokens)[:, -1].argmax(-1)
    result = logit_lens(model, tokens=tokens, pos=torch.tensor([6, 6]))
    rank, prob = result.answer_stats(top)
    assert rank.shape == prob.shape == (model.cfg.n_layers + 1, 2)
    assert (rank[-1] == 0).all()
    torch.testing.assert_close(prob[-1], model(tokens)[:, -1].softmax(-1).max(-1).values)
    manual = (result.log_probs > result.log_probs[..., [5]]).sum(-1)
    assert torch.equal(result.answer_stats(5)[0], manual)
    result.plot(path=tmp_path / "lens.png")
    assert (tmp_path / "lens.png").exists()
    with pytest.raises(ValueError, match="cache or tokens"):
        logit_lens(model)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, tokens=tokens, pos=7)


def test_logit_lens_takes_token_lists_and_refuses_float_positions():
    model = make_model(seed=2)
    tokens = make_tokens(model, batch=2)
    want = logit_lens(model, tokens=tokens).log_probs
    assert torch.equal(logit_lens(model, tokens=tokens.tolist()).log_probs, want)
    with pytest.raises(ValueError, match="tokens is a list but neither strings nor token ids"):
        logit_lens(model, tokens=[[1, 2, 3], [4]])
    for pos in (1.5, torch.tensor([1.0, 2.0]), True):
        with pytest.raises(ValueError, match=r"pos=.* must be an int, a list of ints or an integer tensor"):
            inspect.unwrap(logit_lens)(model, tokens=tokens, pos=pos)
    result = logit_lens(model, tokens=tokens)
    for answer in (1.5, [True, False]):
        with pytest.raises(ValueError, match=r"answer_tokens=.* must be an int"):
            inspect.unwrap(type(result).answer_stats)(result, answer)
