"""lens.tl.patching gives TransformerLens's numbers: every sweep equals transformer_lens.patching's
own function run on the same lens model (TL 4.x's functions only need run_with_hooks, cfg and a
cache indexed by hook name, so they run on lens as the oracle: one full forward per patch), on
a GPT-2-style model and on a grouped-query rotary RMS-norm gated-MLP one; so do index_df sweeps,
custom setters, per-example results with their statistics, and direct path patching."""

import re

import pandas as pd
import pytest
import torch
from conftest import make_model, make_tokens

import lens.tl.patching as lp

tlp = pytest.importorskip("transformer_lens.patching")

ATOL = 1e-5
GQA = dict(n_heads=4, n_kv_heads=2, positional_embedding=False, rotary_dim=4, normalization="RMS",
           gated_mlp=True, act_fn="silu")
SWEEPS = sorted(n for n in dir(tlp) if n.startswith("get_act_patch_") and "direct_path" not in n)


def coupled(logits):
    """A scalar that reads two prompts of the batch: it must see one patch's logits alone."""
    assert logits.shape[0] == 2, logits.shape
    return logits[0, -1, 3] - logits[1, -1].log_softmax(-1)[5]


def per_example(logits):  # [batch]
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.fixture(scope="module", params=["gpt2", "gqa"])
def setup(request):
    model = make_model(**(GQA if request.param == "gqa" else {}))
    clean = make_tokens(model, 2, 4, seed=1)
    corrupted = make_tokens(model, 2, 4, seed=2)
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


@pytest.fixture(scope="module")
def small():
    model = make_model()
    clean, corrupted = make_tokens(model, 3, 4, seed=1), make_tokens(model, 3, 4, seed=2)
    return model, corrupted, model.run_with_cache(clean)[1]


def test_function_list_is_transformer_lens():
    public = {n for n in dir(tlp) if n.startswith(("get_act_patch", "layer_")) or n in (
        "generic_activation_patch", "make_df_from_ranges", "PatchingResult")}
    assert public <= set(dir(lp)), sorted(public - set(dir(lp)))


@pytest.mark.parametrize("fn", SWEEPS)
def test_sweep_equals_transformer_lens(setup, fn):
    model, corrupted, cache = setup
    want = getattr(tlp, fn)(model, corrupted, cache, coupled)
    got = getattr(lp, fn)(model, corrupted, cache, coupled, progress=False)
    assert got.shape == want.shape and got.device == want.device and got.dtype == want.dtype
    assert want.std() > 0  # the sweep moves the metric: the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_gqa_keys_and_values_are_patched_per_kv_head():
    model = make_model(**GQA)
    corrupted = make_tokens(model, 2, 5, seed=2)
    _, cache = model.run_with_cache(make_tokens(model, 2, 5, seed=1))
    keys = lp.get_act_patch_attn_head_k_by_pos(model, corrupted, cache, coupled, progress=False)
    assert keys.shape == (2, 5, 2)
    every = lp.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, coupled, progress=False)
    assert every.shape == (5, 2, 4) and (every[2:4, :, 2:] == 0).all()  # k, v zero-padded as in TL


@pytest.mark.parametrize("batch_size", [1, 3])
def test_any_number_of_patches_per_forward(small, batch_size):
    model, corrupted, cache = small
    want = lp.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, per_example, reduce="mean",
                                                     progress=False)
    got = lp.get_act_patch_attn_head_pattern_by_pos(model, corrupted, cache, per_example, reduce="mean",
                                                    progress=False, batch_size=batch_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_clean_into_clean_is_the_clean_metric(small):
    model, _, cache = small
    clean = make_tokens(model, 3, 4, seed=1)
    metric = lambda logits: per_example(logits).mean()  # noqa: E731
    values = lp.get_act_patch_block_every(model, clean, cache, metric, progress=False)
    want = torch.full_like(values, float(metric(model(clean).detach())))
    torch.testing.assert_close(values, want, atol=ATOL, rtol=0)


def test_index_df_custom_setter_and_tl_setters(small):
    model, corrupted, cache = small
    metric = lambda logits: per_example(logits).mean()  # noqa: E731
    df = pd.DataFrame([[1, 3, 0], [0, 2, 1], [1, 0, 1], [0, -1, 0]], columns=["layer", "pos", "head"])
    want, want_df = tlp.generic_activation_patch(model, corrupted, cache, metric,
                                                 tlp.layer_pos_head_vector_patch_setter, "z", index_df=df,
                                                 return_index_df=True)
    for setter in (lp.layer_pos_head_vector_patch_setter, tlp.layer_pos_head_vector_patch_setter):
        got, got_df = lp.generic_activation_patch(model, corrupted, cache, metric, setter, "z", index_df=df,
                                                  return_index_df=True, progress=False)
        assert got.shape == (4,) and got_df is df
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    def halfway(act, index, clean):  # a user's setter, called once per patch on its copy
        act[:, index[1]] = 0.5 * (act[:, index[1]] + clean[:, index[1]])
        return act
    want = tlp.generic_activation_patch(model, corrupted, cache, metric, halfway, "resid_mid",
                                        index_axis_names=["layer", "pos"])
    got = lp.generic_activation_patch(model, corrupted, cache, metric, halfway, "resid_mid",
                                      index_axis_names=["layer", "pos"], progress=False, batch_size=3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _same_result(got, want):
    assert isinstance(got, lp.PatchingResult)
    for field in ("axis_names", "metric_names", "reduced", "has_metric_axis", "patch_type_names"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.index_df.equals(want.index_df)
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    if want.baseline is None:
        assert got.baseline is None
    else:
        torch.testing.assert_close(got.baseline, want.baseline, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(reduce="none", baseline=True), dict(reduce="mean", baseline=True),
                                dict(reduce="none")])
def test_per_example_results_and_statistics(small, kw):
    model, corrupted, cache = small
    metrics = {"diff": per_example, "prob": lambda logits: logits[:, -1].softmax(-1)[:, 7]}
    for metric in (per_example, metrics):
        want = tlp.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric, **kw)
        got = lp.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric, progress=False, **kw)
        _same_result(got, want)
    want, got = want["diff"], got["diff"]
    if not want.reduced:
        torch.testing.assert_close(got.stderr(), want.stderr(), atol=ATOL, rtol=0)
        ci = dict(n_resamples=200, seed=3)
        for g, w in zip(got.bootstrap_ci(**ci), want.bootstrap_ci(**ci)):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    if want.baseline is not None and not want.reduced:
        torch.testing.assert_close(got.permutation_pvalue(), want.permutation_pvalue())
        torch.testing.assert_close(got.normalized(torch.ones(3)), want.normalized(torch.ones(3)))
        pd.testing.assert_frame_equal(got.to_dataframe(), want.to_dataframe(), atol=ATOL)


@pytest.mark.parametrize("fn", ["get_act_patch_block_every", "get_act_patch_attn_head_by_pos_every"])
def test_every_helpers_with_baseline(small, fn):
    model, corrupted, cache = small
    want = getattr(tlp, fn)(model, corrupted, cache, per_example, reduce="none", baseline=True)
    _same_result(getattr(lp, fn)(model, corrupted, cache, per_example, reduce="none", baseline=True,
                                 progress=False), want)


class _TLView:
    """A lens model as TransformerLens's direct path patching addresses it (per-head inputs under
    attn, split-qkv switch), and as a non-lens model for lens.tl (which then runs TL's loop)."""

    def __init__(self, model):
        self.model, self.cfg, self.blocks, self.hook_dict = model, model.cfg, model.blocks, model.hook_dict

    def set_use_split_qkv_input(self, on):
        pass

    def run_with_hooks(self, tokens, fwd_hooks=()):
        rename = lambda n: re.sub(r"\.attn\.hook_([qkv])_input$", r".hook_\1_input", n)  # noqa: E731
        return self.model.run_with_hooks(tokens, fwd_hooks=[(rename(n), f) for n, f in fwd_hooks])


def test_models_other_than_lens_run_transformer_lens_loop(small):
    model, corrupted, cache = small
    metric = lambda logits: per_example(logits).mean()  # noqa: E731
    want = tlp.get_act_patch_attn_head_v_all_pos(model, corrupted, cache, metric)
    got = lp.get_act_patch_attn_head_v_all_pos(_TLView(model), corrupted, cache, metric, progress=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_direct_path_equals_transformer_lens(component):
    model = make_model(n_layers=3, n_heads=4)
    clean, corrupted = make_tokens(model, 2, 5, seed=1), make_tokens(model, 2, 5, seed=2)
    clean_cache, corrupted_cache = model.run_with_cache(clean)[1], model.run_with_cache(corrupted)[1]
    args = (corrupted, clean_cache, corrupted_cache, coupled)
    want = tlp.get_act_patch_direct_path(_TLView(model), *args, 0, 1, component, verbose=False)
    got = lp.get_act_patch_direct_path(model, *args, 0, 1, component, verbose=False, batch_size=3)
    assert want[1:].std() > 0 and (got[0] == 0).all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if component == "k":
        want = tlp.get_act_patch_direct_path_all_sources(_TLView(model), *args, component, verbose=False)
        got = lp.get_act_patch_direct_path_all_sources(model, *args, component, verbose=False)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_bad_input_says_what_is_wrong(small):
    model, corrupted, cache = small
    metric = lambda logits: per_example(logits).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"activation_name='zz'.*valid activation names are \[.*'z'"):
        lp.generic_activation_patch(model, corrupted, cache, metric, lp.layer_pos_patch_setter, "zz",
                                    index_axis_names=["layer", "pos"])
    attn_only = make_model(attn_only=True)
    with pytest.raises(ValueError, match="attention-only"):
        lp.get_act_patch_mlp_out(attn_only, corrupted, attn_only.run_with_cache(corrupted)[1], metric)
    _, partial_cache = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(ValueError, match=r"no 'blocks.0.hook_resid_pre'.*names_filter"):
        lp.get_act_patch_resid_pre(model, corrupted, partial_cache, metric)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 2, 8\).*corrupted_tokens of shape \(3, 6\)"):
        lp.get_act_patch_attn_head_out_by_pos(model, make_tokens(model, 3, 6), cache, metric)
    with pytest.raises(ValueError, match=r"must return a scalar under reduce='scalar', got shape \(3,\)"):
        lp.get_act_patch_attn_out(model, corrupted, cache, per_example, progress=False)
    with pytest.raises(ValueError, match=r"must return a \[batch\] tensor of length 3"):
        lp.get_act_patch_attn_out(model, corrupted, cache, metric, reduce="none", progress=False)
    with pytest.raises(ValueError, match="reduce must be one of"):
        lp.get_act_patch_attn_out(model, corrupted, cache, metric, reduce="sum")
    with pytest.raises(ValueError, match=r"index_axis_names \['heads'\] unknown"):
        lp.generic_activation_patch(model, corrupted, cache, metric, lp.layer_head_vector_patch_setter, "z",
                                    index_axis_names=["layer", "heads"])
    with pytest.raises(ValueError, match="out of range for axis 1"):
        lp.generic_activation_patch(model, corrupted, cache, metric, lp.layer_pos_patch_setter, "z",
                                    index_df=pd.DataFrame({"layer": [0], "pos": [9]}), progress=False)
    want = lp.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    try:  # lens models have nothing that training mode changes: they patch in it too
        torch.testing.assert_close(lp.get_act_patch_resid_pre(model.train(), corrupted, cache, metric,
                                                               progress=False), want)
    finally:
        model.eval()
    gqa = make_model(**GQA)
    with pytest.raises(ValueError, match="GQA"):
        lp.get_act_patch_direct_path(gqa, corrupted, cache, cache, metric, 0, 0, "k")
