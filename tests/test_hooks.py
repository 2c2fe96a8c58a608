"""The hooks API: adding, removing, replacing, backward hooks, and errors that leave nothing behind."""

import pytest
import torch

import lens


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_hook_names_and_layer(model):
    names = model.hook_names
    assert "blocks.1.attn.hook_pattern" in names and "hook_logits" in names
    assert model.hook_dict["blocks.1.attn.hook_pattern"].layer() == 1
    assert model.hook_dict["hook_embed"].layer() is None


def test_replace_and_observe(model, tokens):
    seen = {}

    def observe(x, hook):
        seen[hook.name] = x.clone()

    def zero(x, hook):
        return torch.zeros_like(x)

    base = model(tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", observe)])
    assert torch.equal(out, base) and seen["blocks.0.attn.hook_z"].shape == (2, 7, 2, 8)
    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero)])
    assert not torch.allclose(out, base)
    assert no_hooks_left(model)


def test_in_place_edit_of_one_head_equals_returning_a_copy(model, tokens):
    def in_place(z, hook):
        z[:, :, 1] = 0

    def copy(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    for name in ["blocks.1.attn.hook_z", "blocks.1.hook_q_input", "blocks.0.attn.hook_pattern"]:
        a = model.run_with_hooks(tokens, fwd_hooks=[(name, in_place)])
        b = model.run_with_hooks(tokens, fwd_hooks=[(name, copy)])
        assert torch.equal(a, b), name
        assert not torch.allclose(a, model(tokens)), name


def test_split_input_of_one_head_changes_only_that_head(model, tokens):
    def shift(x, hook):
        x = x.clone()
        x[:, :, 0] += torch.linspace(-1, 1, x.shape[-1])  # not a constant: LayerNorm would remove it
        return x

    _, clean = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")
    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", shift)]):
        _, patched = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")
    assert not torch.allclose(patched["q", 1][:, :, 0], clean["q", 1][:, :, 0])
    torch.testing.assert_close(patched["q", 1][:, :, 1], clean["q", 1][:, :, 1])


def test_names_as_list_and_predicate(model, tokens):
    calls = []
    model.run_with_hooks(tokens, fwd_hooks=[(["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
                                             lambda x, hook: calls.append(hook.name))])
    assert calls == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    calls.clear()
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                             lambda x, hook: calls.append(hook.layer()))])
    assert calls == [0, 1]


def test_context_manager_and_persistent_hooks(model, tokens):
    base = model(tokens)
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: x * 0)]):
        assert not torch.allclose(model(tokens), base)
    assert torch.equal(model(tokens), base)
    handles = model.add_hook("hook_embed", lambda x, hook: x * 0)
    assert not torch.allclose(model(tokens), base)
    handles[0].remove()
    assert torch.equal(model(tokens), base)
    model.add_hook("hook_embed", lambda x, hook: x * 0)
    model.reset_hooks()
    assert torch.equal(model(tokens), base) and no_hooks_left(model)


def test_backward_hooks_see_gradients(model, tokens):
    grads = {}

    def grab(g, hook):
        grads[hook.name] = g.clone()

    resid = {}

    def keep(x, hook):
        x.retain_grad()
        resid["x"] = x

    loss = model.run_with_hooks(tokens, return_type="loss",
                                fwd_hooks=[("blocks.1.hook_resid_pre", keep)],
                                bwd_hooks=[("blocks.1.hook_resid_pre", grab)])
    assert no_hooks_left(model)
    loss.backward()  # the tensor hook attached during the call still fires
    torch.testing.assert_close(grads["blocks.1.hook_resid_pre"], resid["x"].grad)

    def double(g, hook):
        return 2 * g

    model.zero_grad()
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", double)]):
        model(tokens, return_type="loss").backward()
    doubled = model.embed.W_E.grad.clone()
    model.zero_grad()
    model(tokens, return_type="loss").backward()
    torch.testing.assert_close(doubled, 2 * model.embed.W_E.grad)


def test_hook_sees_positions(model, tokens):
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(hook.positions))])
    assert torch.equal(seen[0], torch.arange(tokens.shape[1]).expand_as(tokens))


def test_unknown_name_suggests_the_nearest(model, tokens):
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    assert no_hooks_left(model)


def test_wrong_shape_names_hook_and_shapes(model, tokens):
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.hook_z'.*\(2, 7, 16\).*\(2, 7, 2, 8\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda x, hook: x.flatten(2))])
    assert no_hooks_left(model)
    with pytest.raises(TypeError, match="returned int"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: 3)])
    assert no_hooks_left(model)


def test_errors_inside_a_call_leave_no_hook_behind(model, tokens):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: x), ("blocks.0.hook_resid_post", boom)])
    assert no_hooks_left(model)
    with pytest.raises(KeyboardInterrupt):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: x)]):
            raise KeyboardInterrupt
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="token id"):
        model.run_with_hooks(torch.tensor([[99]]), fwd_hooks=[("hook_embed", lambda x, hook: x)])
    with pytest.raises(ValueError, match="sequence of"):
        model.run_with_cache(torch.zeros(1, 50, dtype=torch.long))
    with pytest.raises(ValueError, match="matched no hook point"):
        model.run_with_cache(tokens, names_filter=lambda n: "nonexistent" in n)
    with pytest.raises(ValueError, match="dir="):
        model.add_hook("hook_embed", lambda x, hook: x, dir="backward")
    assert no_hooks_left(model)


def test_attention_only_and_no_layernorm_hook_points():
    m = lens.HookedGPT(lens.GPTConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=9, n_ctx=5,
                                      attn_only=True, normalization=None))
    names = set(m.hook_names)
    assert "blocks.0.hook_resid_mid" not in names and "blocks.0.mlp.hook_post" not in names
    assert not any("ln" in n for n in names)
    assert "blocks.0.attn.hook_pattern" in names


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern",
                                  "blocks.0.mlp.hook_post", "blocks.1.ln2.hook_normalized",
                                  "blocks.1.hook_resid_mid"])
def test_in_place_edit_then_backward_equals_returning_a_copy(model, tokens, name):
    """An in-place edit under autograd (the README's zero_head) backpropagates, with the
    gradients of the same edit made on a copy."""
    def in_place(x, hook):
        x[..., 0] = 0

    def copy(x, hook):
        x = x.clone()
        x[..., 0] = 0
        return x

    grads = []
    for fn in (in_place, copy):
        model.zero_grad()
        loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, fn)])
        loss.backward()
        grads.append(model.blocks[0].attn.W_Q.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert no_hooks_left(model)


def test_a_replacement_of_another_dtype_or_device_names_the_hook(model, tokens):
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_resid_post'.*torch\.float64.*torch\.float32"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.double())])
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_resid_post'.*meta.*cpu"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.to("meta"))])
    loss = model.run_with_hooks(tokens, return_type="loss",
                                bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: g.half())])
    with pytest.raises(ValueError, match=r"backward hook on 'blocks\.0\.hook_resid_post'.*float16"):
        loss.backward()
    assert no_hooks_left(model)


@pytest.mark.parametrize("fwd_hooks, match", [
    (("blocks.0.hook_resid_pre", lambda x, hook: None), "one pair.*wrap it in a list"),
    ([("blocks.0.hook_resid_pre", lambda x, hook: None, 3)], "has the entry"),
    ([(5, lambda x, hook: None)], "hook name 5 .int."),
    ([("blocks.0.hook_resid_pre", "not a function")], "not callable"),
    ("blocks.0.hook_resid_pre", "fwd_hooks='blocks"),
    (7, "fwd_hooks=7"),
])
def test_malformed_fwd_hooks_say_what_is_valid(model, tokens, fwd_hooks, match):
    with pytest.raises(TypeError, match=match):
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    with pytest.raises(TypeError, match=match):
        with model.hooks(fwd_hooks=fwd_hooks):
            pass
    assert no_hooks_left(model) and model.context_level == 0


def test_fwd_hooks_as_a_dict(model, tokens):
    seen = []
    model.run_with_hooks(tokens, fwd_hooks={"blocks.0.hook_resid_pre": lambda x, hook: seen.append(hook.name)})
    assert seen == ["blocks.0.hook_resid_pre"] and no_hooks_left(model)


def test_a_hook_without_the_hook_argument_is_named(model, tokens):
    def f(x):
        return x

    with pytest.raises(TypeError, match=r"'f' on 'blocks\.0\.hook_resid_pre' cannot be called as fn\(activation, hook=hook_point\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", f)])

    def raises_type_error(x, hook):
        raise TypeError("its own")

    with pytest.raises(TypeError, match="^its own$"):  # a TypeError from inside is the hook's own
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", raises_type_error)])
    assert no_hooks_left(model)


def test_fwd_hooks_is_read_only_but_assignable(model, tokens):
    """hp.fwd_hooks is built for each read (model-wide and this thread's hooks), so an in-place
    edit, which TransformerLens's list would take, is refused instead of changing nothing."""
    hp = model.hook_dict["blocks.0.hook_resid_pre"]
    handle, = model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: None)
    for edit in (lambda l: l.append(handle), lambda l: l.pop(), lambda l: l.clear(),
                 lambda l: l.__setitem__(0, handle)):
        with pytest.raises(TypeError, match="read-only"):
            edit(hp.fwd_hooks)
    assert hp.fwd_hooks == [handle]
    hp.fwd_hooks = []
    assert no_hooks_left(model)
