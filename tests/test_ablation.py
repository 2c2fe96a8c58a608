"""Ablation hooks: zero, mean and resample ablation narrowed to heads, neurons and positions."""

import inspect

import numpy as np
import pytest
import torch
from conftest import EVERY, make_model, make_tokens

from lens.ablation import (ablate_heads, hook_name, mean_activations, mean_ablate,
                           resample_ablate, resample_indices, zero_ablate)


def test_hook_names():
    assert hook_name("z", 1) == "blocks.1.attn.hook_z"
    assert hook_name("blocks.0.mlp.hook_post") == "blocks.0.mlp.hook_post"
    assert zero_ablate("pattern", 0)[0] == "blocks.0.attn.hook_pattern"
    with pytest.raises(ValueError, match="full hook name"):
        hook_name("blocks.0.attn.hook_z", 0)
    with pytest.raises(ValueError, match="layer >= 0"):
        hook_name("z", -1)


@pytest.mark.parametrize("head", [0, 1])
def test_zero_ablating_z_removes_that_heads_term(model, tokens, head):
    _, clean = model.run_with_cache(tokens, names_filter=EVERY)
    with model.hooks(fwd_hooks=[zero_ablate("z", 0, heads=head)]):
        _, ablated = model.run_with_cache(tokens, names_filter=EVERY)
    # attn_out loses exactly the head's z @ W_O term; the other head's write is untouched
    removed = clean["result", 0][:, :, head]
    torch.testing.assert_close(ablated["attn_out", 0], clean["attn_out", 0] - removed)
    assert (ablated["result", 0][:, :, head] == 0).all()
    assert torch.equal(ablated["result", 0][:, :, 1 - head], clean["result", 0][:, :, 1 - head])
    # in a later layer the same holds against that layer's own (changed) per-head writes
    with model.hooks(fwd_hooks=[zero_ablate("z", 1, heads=head)]):
        _, late = model.run_with_cache(tokens, names_filter=EVERY)
    manual = late["result", 1].sum(2) + model.blocks[1].attn.b_O
    torch.testing.assert_close(late["attn_out", 1], manual)
    torch.testing.assert_close(late["attn_out", 1], clean["attn_out", 1] - clean["result", 1][:, :, head])


def test_zero_ablating_every_head_leaves_only_the_bias(model, tokens):
    with model.hooks(fwd_hooks=[zero_ablate("z", 0)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_attn_out")
    expected = model.blocks[0].attn.b_O.detach().expand_as(cache["attn_out", 0])
    torch.testing.assert_close(cache["attn_out", 0], expected)


def test_zero_pattern_of_a_head_equals_zero_z(model, tokens):
    a = model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("pattern", 1, heads=[0])])
    b = model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("z", 1, heads=[0])])
    torch.testing.assert_close(a, b)


def test_ablating_a_position_only_changes_later_positions(model, tokens):
    clean = model(tokens)
    ablated = model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("resid_pre", 1, positions=3)])
    assert torch.equal(ablated[:, :3], clean[:, :3])
    assert not torch.allclose(ablated[:, 3:], clean[:, 3:])
    with model.hooks(fwd_hooks=[zero_ablate("resid_pre", 1, positions=[3, -1])]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    r = cache["resid_pre", 1]
    assert r[:, 3].abs().sum() == 0 and r[:, -1].abs().sum() == 0 and r[:, 2].abs().sum() > 0


def test_heads_and_positions_combine_as_a_product(model, tokens):
    with model.hooks(fwd_hooks=[zero_ablate("z", 0, heads=1, positions=slice(2, 4))]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z, z0 = cache["z", 0], clean["z", 0]
    zeroed = torch.zeros_like(z, dtype=torch.bool)
    zeroed[:, 2:4, 1] = True
    assert (z[zeroed] == 0).all() and torch.equal(z[~zeroed], z0[~zeroed])


def test_pattern_positions_are_query_positions_and_per_prompt_masks(model, tokens):
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 5] = True
    with model.hooks(fwd_hooks=[zero_ablate("pattern", 0, heads=0, positions=mask)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    p = cache["pattern", 0]
    assert p[0, 0, 5].abs().sum() == 0
    torch.testing.assert_close(p[0, 0, 4].sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[1, 0, 5].sum(), torch.tensor(1.0))


def test_neurons(model, tokens):
    with model.hooks(fwd_hooks=[zero_ablate("post", 0, neurons=[0, 5, -1])]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    post = cache["post", 0]
    assert post[..., [0, 5, -1]].abs().sum() == 0 and post[..., 1].abs().sum() > 0


def test_attn_scores_ablation_keeps_the_causal_mask(model, tokens):
    with model.hooks(fwd_hooks=[zero_ablate("attn_scores", 0, heads=0)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    n = tokens.shape[1]
    uniform = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]
    torch.testing.assert_close(cache["pattern", 0][:, 0], uniform.expand(tokens.shape[0], n, n))


def test_mean_ablation_with_means_of_the_same_prompt_is_a_no_op(model, tokens):
    one = tokens[:1]
    clean = model(one)
    names = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_pre", "blocks.1.hook_resid_pre"]
    means = mean_activations(model, one, names)
    hooks = [mean_ablate(n, means=means) for n in names]
    assert torch.equal(model.run_with_hooks(one, fwd_hooks=hooks), clean)
    _, cache = model.run_with_cache(one, names_filter="blocks.0.attn.hook_pattern")
    out = model.run_with_hooks(one, fwd_hooks=[mean_ablate("pattern", 0, means=cache)])
    torch.testing.assert_close(out, clean)


def test_mean_activations_batches_and_averages(model):
    tokens = make_tokens(model, batch=5, pos=6, seed=3)
    names = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    means = mean_activations(model, tokens, names, batch_size=2)
    for n in names:
        torch.testing.assert_close(means[n], cache[n].mean(0))
    flat = mean_activations(model, tokens, names, batch_size=3, over_positions=True)
    torch.testing.assert_close(flat["blocks.0.attn.hook_z"], cache["z", 0].mean((0, 1)))
    with pytest.raises(ValueError, match="over_positions"):
        mean_activations(model, tokens, "blocks.0.attn.hook_pattern", over_positions=True)


def test_position_averaged_means_replace_every_position(model, tokens):
    means = mean_activations(model, tokens, "blocks.0.hook_mlp_out", over_positions=True)
    with model.hooks(fwd_hooks=[mean_ablate("mlp_out", 0, means=means, positions=[1, 2])]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_mlp_out")
    out = cache["mlp_out", 0]
    m = means["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(out[:, 1:3], m.expand_as(out[:, 1:3]))


def test_resample_takes_other_prompts(model):
    tokens = make_tokens(model, batch=4, pos=6, seed=5)
    idx = resample_indices(4, 4, seed=7)
    assert sorted(idx.tolist()) == [0, 1, 2, 3] and (idx != torch.arange(4)).all()
    assert torch.equal(idx, resample_indices(4, 4, seed=7))
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    with model.hooks(fwd_hooks=[resample_ablate("z", 0, source=clean, seed=7, heads=1)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z, z0 = cache["z", 0], clean["z", 0]
    assert torch.equal(z[:, :, 1], z0[idx, :, 1]) and torch.equal(z[:, :, 0], z0[:, :, 0])
    # source tokens run once through the model give the same activations
    name, fn = resample_ablate("z", 0, source=tokens, model=model, seed=7, heads=1)
    with model.hooks(fwd_hooks=[(name, fn)]):
        _, again = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    torch.testing.assert_close(again["z", 0], z)


def test_resampling_identical_prompts_is_a_no_op(model):
    tokens = make_tokens(model, batch=1, pos=6).repeat(3, 1)
    clean = model(tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=[resample_ablate("resid_mid", 0, source=tokens, model=model)])
    torch.testing.assert_close(out, clean)


def test_ablate_heads_groups_by_layer(model, tokens):
    hooks = ablate_heads([(0, 1), (1, 0), (0, 0)])
    assert [h[0] for h in hooks] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    same = [zero_ablate("z", 0, heads=[1, 0]), zero_ablate("z", 1, heads=[0])]
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=hooks),
                       model.run_with_hooks(tokens, fwd_hooks=same))
    means = mean_activations(model, tokens, lambda n: n.endswith("hook_z"))
    assert len(ablate_heads([(0, 1), (1, 1)], "mean", means=means)) == 2
    hooks = ablate_heads([(0, 1), (1, 1)], "resample", source=tokens, model=model)
    assert model.run_with_hooks(tokens, fwd_hooks=hooks).shape == (*tokens.shape, model.cfg.d_vocab)
    with pytest.raises(ValueError, match="how="):
        ablate_heads([(0, 1)], "mena")


def test_errors_name_the_problem(model, tokens):
    with pytest.raises(ValueError, match="no n_heads axis"):
        zero_ablate("resid_pre", 0, heads=0)
    with pytest.raises(ValueError, match="no d_mlp axis"):
        zero_ablate("z", 0, neurons=0)
    with pytest.raises(ValueError, match=r"head \[2\] out of range .*2 heads"):
        model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("z", 0, heads=2)])
    with pytest.raises(ValueError, match=r"neuron \[64\] out of range"):
        model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("pre", 0, neurons=[1, 64])])
    with pytest.raises(ValueError, match=r"position \[7\] out of range"):
        model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("pattern", 0, positions=7)])
    with pytest.raises(ValueError, match="means for 'blocks.0.attn.hook_z' has shape"):
        model.run_with_hooks(tokens, fwd_hooks=[mean_ablate("z", 0, means=torch.zeros(3, 2, 8))])
    means = mean_activations(model, make_tokens(model, pos=9), "blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="per position"):
        model.run_with_hooks(tokens, fwd_hooks=[mean_ablate("z", 0, means=means)])
    with pytest.raises(ValueError, match="no entry for 'blocks.1.attn.hook_z'"):
        mean_ablate("z", 1, means=means)
    with pytest.raises(ValueError, match="model="):
        resample_ablate("z", 0, source=tokens)
    src = make_model().run_with_cache(make_tokens(model, pos=5), names_filter="blocks.0.attn.hook_z")[1]
    with pytest.raises(ValueError, match="same sequence length"):
        model.run_with_hooks(tokens, fwd_hooks=[resample_ablate("z", 0, source=src)])


def plain(fn):
    """fn without the test run's runtime type checks: the errors a caller sees by default."""
    return inspect.unwrap(fn)


def test_layer_head_pairs_must_be_pairs_of_ints(model, tokens):
    for bad in ([(0,)], [(0, 1, 2)], [(True, 0)], [(0, 0.5)], [(0.5, 1)], (0, 1), ["ab"]):
        with pytest.raises(ValueError, match=r"layer_heads entry .* is not a \(layer, head\) pair of ints"):
            plain(ablate_heads)(bad)
    want = model.run_with_hooks(tokens, fwd_hooks=ablate_heads([(0, 1), (1, 0)]))
    for pairs in (torch.tensor([[0, 1], [1, 0]]), [(np.int64(0), np.int64(1)), [1, 0]]):
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=plain(ablate_heads)(pairs)), want)
    # out of range: the layer when the hooks are added, the head when the activation is seen
    with pytest.raises(KeyError, match="'blocks.5.attn.hook_z' is not a hook point of this model: the model has 2 blocks"):
        model.run_with_hooks(tokens, fwd_hooks=ablate_heads([(5, 0)]))
    with pytest.raises(ValueError, match=r"head \[9\] out of range for 'blocks.0.attn.hook_z', which has 2 heads"):
        model.run_with_hooks(tokens, fwd_hooks=ablate_heads([(0, 9)]))
    with pytest.raises(ValueError, match="layer=-1: ablation builders do not know n_layers"):
        ablate_heads([(-1, 0)])


def test_selections_are_ints_slices_or_masks(model, tokens):
    for kw in (dict(positions=[1.5]), dict(positions=torch.tensor([1.0])), dict(heads=True),
               dict(heads=[0.5]), dict(positions="ab"), dict(heads=[[0], [1, 2]])):
        what = next(iter(kw))
        with pytest.raises(ValueError, match=rf"{what}=.*: give an int, a list or 1-D tensor of ints, a slice"):
            plain(zero_ablate)("z", 0, **kw)  # when the hook is built, not when it runs
    with pytest.raises(ValueError, match=r"positions=\[1.5\]: give an int"):
        plain(ablate_heads)([(0, 1)], positions=[1.5])
    # a list of booleans is a mask, as a boolean tensor is
    want = model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("z", 0, heads=[0])])
    for heads in ([True, False], torch.tensor([True, False])):
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[zero_ablate("z", 0, heads=heads)]), want)


def test_seeds_and_token_lists(model, tokens):
    for seed in (1.5, "a", 2 ** 70, None, True):
        with pytest.raises(ValueError, match=r"seed=.* must be an int in \[-2\*\*63, 2\*\*64 - 1\]$"):
            plain(resample_indices)(4, 4, seed=seed)
        with pytest.raises(ValueError, match="seed=.* must be an int"):
            plain(resample_ablate)("z", 0, source=tokens, model=model, seed=seed)
    assert torch.equal(plain(resample_indices)(4, 4, seed=np.int64(3)), resample_indices(4, 4, seed=3))
    want = mean_activations(model, tokens, "blocks.0.attn.hook_z")
    got = mean_activations(model, tokens.tolist(), "blocks.0.attn.hook_z")
    assert torch.equal(got["blocks.0.attn.hook_z"], want["blocks.0.attn.hook_z"])
    with pytest.raises(ValueError, match="tokens is a list but neither strings nor token ids"):
        mean_activations(model, [[1, 2], [3]], "blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="batch_size=2.5 must be an int >= 1"):
        plain(mean_activations)(model, tokens, "blocks.0.attn.hook_z", batch_size=2.5)
