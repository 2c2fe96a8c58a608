"""Weight processing preserves what the model computes: each step alone, all of them together,
on models and on state dicts, and it matches TransformerLens's own processing."""

import dataclasses
import types

import pytest
import torch

from lens import GPTConfig, HookedGPT
from lens.processing import (STEPS, applied_steps, center_unembed, center_writing_weights,
                             fold_layer_norm, fold_value_biases, process_weights)

FUNCTIONS = {"fold_layer_norm": fold_layer_norm, "center_writing_weights": center_writing_weights,
             "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
LN_KEYS = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "ln_final.w", "ln_final.b")


def random_model(seed: int = 0, dtype=torch.float32, scale: float = 0.25, **overrides) -> HookedGPT:
    """A small model with every weight random, LayerNorm weights away from 1 and biases away
    from 0, so that no processing step is trivially a no-op."""
    cfg = GPTConfig(**{**dict(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=32,
                              dtype=dtype), **overrides})
    model = HookedGPT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1 + 0.3 * noise if name.endswith(".w") else scale * noise)
    return model


def tokens(seed: int = 1, batch: int = 3, pos: int = 12, d_vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def log_probs(model: HookedGPT, toks: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(toks, **kwargs).log_softmax(-1)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_each_step_preserves_log_probs(step, dtype, tol):
    model, toks = random_model(dtype=dtype), tokens()
    before = log_probs(model, toks)
    FUNCTIONS[step](model)
    assert (log_probs(model, toks) - before).abs().max() <= tol
    assert applied_steps(model) == [step]


@pytest.mark.parametrize("overrides", [{}, {"attn_only": True}, {"act_fn": "relu", "d_head": 6},
                                       {"positional_embedding": False}])
def test_process_weights_preserves_log_probs(overrides):
    model, toks = random_model(**overrides), tokens()
    mask = torch.ones_like(toks)
    mask[0, 8:] = 0  # a padded row: every query still attends somewhere
    before, before_masked = log_probs(model, toks), log_probs(model, toks, attention_mask=mask)
    before_loss = model(toks, return_type="loss")
    process_weights(model)
    assert (log_probs(model, toks) - before).abs().max() <= 1e-4
    assert (log_probs(model, toks, attention_mask=mask) - before_masked).abs().max() <= 1e-4
    assert abs(model(toks, return_type="loss") - before_loss) <= 1e-4
    assert applied_steps(model) == list(STEPS)


def test_fold_layer_norm_removes_layer_norm_weights_and_keeps_layout():
    model = random_model()
    old_cfg, stride = model.cfg, model.blocks[0].attn.W_Q.stride()
    fold_layer_norm(model)
    assert model.cfg.normalization == "LNPre" and old_cfg.normalization == "LN"
    assert all(m.cfg is model.cfg for m in model.modules() if hasattr(m, "cfg"))
    assert not [k for k in model.state_dict() if k.endswith(LN_KEYS)]
    assert model.blocks[0].ln1.w is None and model.ln_final.b is None
    assert model.blocks[0].attn.W_Q.stride() == stride  # copied in place, not replaced
    # A model built from the new config has exactly the same parameters.
    assert set(HookedGPT(model.cfg).state_dict()) == set(model.state_dict())
    # The reading weights are centred along d_model.
    assert model.blocks[1].attn.W_K.mean(-2).abs().max() < 1e-6
    assert model.W_U.mean(0).abs().max() < 1e-6


def test_hooks_see_the_same_stream_after_processing():
    """The by-hand LayerNorm path (taken when hook_scale or per-head inputs are hooked) works
    on folded weights and agrees with the fused path."""
    model, toks = random_model(), tokens()
    before = log_probs(model, toks)
    process_weights(model)
    names = ["blocks.0.ln1.hook_scale", "blocks.1.hook_q_input", "ln_final.hook_scale"]
    logits, cache = model.run_with_cache(toks, names_filter=names)
    assert (logits.log_softmax(-1) - before).abs().max() <= 1e-4
    assert cache["blocks.1.hook_q_input"].shape == (3, 12, 4, 32)


def test_center_writing_weights_centres_every_write():
    model = random_model()
    center_writing_weights(model)
    for w in (model.W_E, model.W_pos, model.W_O, model.b_O, model.W_out, model.b_out):
        assert w.mean(-1).abs().max() < 1e-6


def test_center_unembed_changes_logits_not_log_probs():
    model, toks = random_model(), tokens()
    with torch.no_grad():
        logits = model(toks)
    center_unembed(model)
    with torch.no_grad():
        new_logits = model(toks)
    assert (new_logits - logits).abs().max() > 1e-2
    assert (new_logits.log_softmax(-1) - logits.log_softmax(-1)).abs().max() <= 1e-4
    assert model.W_U.mean(-1).abs().max() < 1e-6 and abs(model.b_U.mean()) < 1e-6


def test_fold_value_biases_zeroes_b_V():
    model = random_model()
    b_O = model.b_O.clone()
    fold_value_biases(model)
    assert torch.count_nonzero(model.b_V) == 0
    assert (model.b_O - b_O).abs().max() > 1e-2


def test_process_weights_is_idempotent():
    model = random_model()
    process_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    process_weights(model)  # every step is recorded, so nothing happens
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_steps_that_do_not_apply_raise():
    with pytest.raises(ValueError, match="already"):
        fold_layer_norm(fold_layer_norm(random_model()))
    no_ln = random_model(normalization=None)
    with pytest.raises(ValueError, match="normalization=None"):
        fold_layer_norm(no_ln)
    with pytest.raises(ValueError, match="change the model's output"):
        center_writing_weights(no_ln)
    with pytest.raises(ValueError, match="normalization=None"):
        process_weights(no_ln)
    with pytest.raises(ValueError, match="cfg="):
        fold_layer_norm(random_model().state_dict())
    with pytest.raises(TypeError):
        fold_layer_norm([1, 2])


def test_non_strict_skips_steps_that_do_not_apply():
    model, toks = random_model(normalization=None, scale=0.1), tokens()
    before = log_probs(model, toks)
    process_weights(model, strict=False)
    assert applied_steps(model) == ["center_unembed", "fold_value_biases"]
    assert (log_probs(model, toks) - before).abs().max() <= 1e-4


def test_state_dict_processing_matches_model_processing():
    model = random_model()
    cfg, sd = model.cfg, {k: v.clone() for k, v in model.state_dict().items()}
    process_weights(sd, cfg)
    process_weights(model)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    rebuilt = HookedGPT(dataclasses.replace(cfg, normalization="LNPre"))
    rebuilt.load_state_dict(sd)
    toks = tokens()
    assert torch.equal(log_probs(rebuilt, toks), log_probs(model, toks))


def test_half_precision_is_processed_in_float32():
    ref = random_model(dtype=torch.float32)
    half = random_model(dtype=torch.bfloat16)
    process_weights(ref)
    process_weights(half)
    assert half.W_Q.dtype == torch.bfloat16
    # Processing in bf16 itself would drift by many bf16 ulps; float32 processing rounds once.
    assert (half.W_Q.float() - ref.W_Q.to(torch.bfloat16).float()).abs().max() <= 2e-2


def test_matches_transformer_lens_processing():
    weight_processing = pytest.importorskip("transformer_lens.weight_processing")
    model = random_model()
    c = model.cfg
    tl_cfg = types.SimpleNamespace(
        n_layers=c.n_layers, n_heads=c.n_heads, d_head=c.d_head, d_model=c.d_model,
        d_mlp=c.d_mlp, d_vocab=c.d_vocab, n_ctx=c.n_ctx, normalization_type="LN",
        attn_only=False, n_key_value_heads=None, final_rms=False, act_fn=c.act_fn,
        positional_embedding_type="standard", gated_mlp=False)
    theirs = weight_processing.ProcessWeights.process_weights(
        {k: v.clone() for k, v in model.state_dict().items()}, tl_cfg)
    process_weights(model)
    ours = model.state_dict()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-5), name
    # TransformerLens keeps LayerNorm weights as ones and zeros; lens removes them.
    for name in set(theirs) - set(ours):
        assert name.endswith(LN_KEYS) and torch.all(theirs[name] == name.endswith(".w"))
