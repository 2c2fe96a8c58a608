"""Odd input to the forward pass and the cache: accepted with the right result, or refused by
lens with what was wrong and what is valid; never a wrong number or an error from deep inside."""

import inspect

import numpy as np
import pytest
import torch

import lens.cache
from conftest import make_model, make_tokens


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tokens(model):
    return make_tokens(model)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_tokens_are_token_ids(model, tokens, dtype):
    torch.testing.assert_close(model(tokens.to(dtype)), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(0, 5, dtype=torch.long), ValueError, "batch of 0 rows"),
    (torch.zeros(2, 5, dtype=torch.long, device="meta"), ValueError, "meta device"),
    (torch.zeros(2, 5, dtype=torch.bool), TypeError, "integer tensor"),
])
def test_tokens_that_cannot_run(model, bad, error, match):
    with pytest.raises(error, match=match):
        model(bad)


def test_a_mask_as_a_list_or_numpy_array_equals_the_tensor(model, tokens):
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    ref = model(tokens, attention_mask=mask)
    for given in (mask.tolist(), mask.numpy(), mask.bool(), mask.float()):
        torch.testing.assert_close(model(tokens, attention_mask=given), ref, rtol=0, atol=0)
    loss = model(tokens, return_type="loss", attention_mask=mask)
    torch.testing.assert_close(model(tokens, return_type="loss", attention_mask=mask.tolist()), loss)


@pytest.mark.parametrize("value, match", [(float("nan"), r"\[nan\]"), (2, r"\[2\.0\]"), (-1, r"\[-1\.0\]"),
                                          (0.5, r"\[0\.5\]")])
def test_a_mask_with_values_other_than_0_and_1_is_refused(model, tokens, value, match):
    mask = torch.ones(tokens.shape)
    mask[1, 3] = value
    with pytest.raises(ValueError, match="only 0 .pad. and 1 .real token.; it holds " + match):
        model(tokens, attention_mask=mask)
    with pytest.raises(ValueError, match="only 0"):
        model.generate(tokens, max_new_tokens=1, attention_mask=mask, verbose=False)


def test_a_mask_of_strings_is_refused(model, tokens):
    with pytest.raises(TypeError, match="attention_mask must be"):
        model(tokens, attention_mask=[["a"] * 7] * 2)


@pytest.mark.parametrize("past_kv", [{}, [], "cache"])
def test_past_kv_must_be_a_kv_cache(model, tokens, past_kv):
    with pytest.raises(TypeError, match="past_kv"):  # the annotation, where types are checked
        model(tokens, past_kv=past_kv)
    with pytest.raises(TypeError, match="past_kv must be a lens KVCache"):  # lens's own check
        inspect.unwrap(type(model).forward)(model, tokens, past_kv=past_kv)


@pytest.mark.parametrize("dtype, match", [(torch.float64, r"float32 .the model's dtype., got torch\.float64.*\.to"),
                                          (torch.long, "got torch.int64; token ids go in without start_at_layer")])
def test_a_residual_stream_of_another_dtype_is_refused(model, tokens, dtype, match):
    resid = model(tokens, stop_at_layer=1)
    with pytest.raises(TypeError, match=match):
        model(resid.to(dtype), start_at_layer=1)


def test_an_empty_or_too_long_residual_stream_is_refused(model):
    with pytest.raises(ValueError, match="at least one sequence"):
        model(torch.zeros(0, 3, 16), start_at_layer=1)
    with pytest.raises(ValueError, match="exceeds n_ctx=12"):
        model(torch.zeros(1, 13, 16), start_at_layer=1)


@pytest.mark.parametrize("names_filter", [5, 2.5, object()])
def test_names_filter_of_the_wrong_type(model, tokens, names_filter):
    with pytest.raises(TypeError, match="names filter .* is not a hook name, a list of names or a predicate"):
        model.run_with_cache(tokens, names_filter=names_filter)


def test_incl_bwd_under_no_grad_says_why(model, tokens):
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), pytest.raises(RuntimeError, match=r"incl_bwd=True caches gradients.*no_grad"):
            model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("pos_slice, error, match", [
    (99, IndexError, r"pos_slice=\[99\] is out of range for the 7 positions of .*valid: -7 to 6"),
    ([0, 12], IndexError, r"pos_slice=\[0, 12\] is out of range"),
    ("last", TypeError, "position index must be an int.*got str"),
    (1.5, TypeError, "got float"),
])
def test_pos_slice_out_of_range_or_of_the_wrong_type(model, tokens, pos_slice, error, match):
    with pytest.raises(error, match=match):  # lens's own check, where annotations are not checked
        inspect.unwrap(lens.cache.run_with_cache)(model, tokens, names_filter="blocks.0.hook_resid_post",
                                                  pos_slice=pos_slice)
    with pytest.raises(error):
        model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", pos_slice=pos_slice)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_misspelt_short_name_suggests_the_nearest(model, tokens):
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match=r"'resid_psot'; did you mean \['resid_post'"):
        cache["resid_psot"]
    with pytest.raises(KeyError, match=r"did you mean \['resid_post'"):
        cache["resid_psot", 0]
    with pytest.raises(ValueError, match=r"tokens \[99\] outside \[0, d_vocab=37\)"):
        cache.logit_attrs(cache["resid_post", -1], 99)


@pytest.mark.parametrize("bad", [1.5, True, [1, 2.5], [True, 1], np.array([1.0]), torch.tensor([0.0])])
def test_answer_tokens_that_are_not_ids(model, tokens, bad):
    with pytest.raises(ValueError, match="token ids"):
        model.token_ids(bad)  # what logit_attrs, DLA and logit differences read answers through
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="token ids"):
        inspect.unwrap(type(cache).logit_attrs)(cache, cache["resid_post", -1], bad)


def test_answer_tokens_as_numpy_ints(model):
    assert model.token_ids(np.array([3, 4])).tolist() == [3, 4] and model.token_ids(np.int64(5)).item() == 5


def test_a_suffix_run_over_a_frozen_prefix_equals_the_full_run(model, tokens):
    """model(resid[:, p:], start_at_layer=l, past_kv=frozen prefix) is the full run's suffix, as
    patching per position uses it; an unfrozen cache is refused there."""
    from lens.generate import KVCache
    full_kv = KVCache(2)
    logits = model(tokens, past_kv=full_kv)
    resid = model(tokens, stop_at_layer=1)
    prefix = KVCache(2)
    for entry, base in zip(prefix.layers, full_kv.layers):
        entry.k, entry.v = base.k[:, :3], base.v[:, :3]
    with pytest.raises(ValueError, match="frozen KVCache"):
        model(resid[:, 3:], start_at_layer=1, past_kv=prefix)
    prefix.freeze()
    torch.testing.assert_close(model(resid[:, 3:], start_at_layer=1, past_kv=prefix), logits[:, 3:])
    assert len(prefix) == 3  # read, not added to
