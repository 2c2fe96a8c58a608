"""TransformerLens's hook API on lens: the same user module built on TransformerLens's
HookedRootModule / HookPoint and on lens.tl's behaves the same (permanent hooks, context levels,
prepend, has_hooks, ctx, reset_hooks_end, caching, backward hooks); on a lens model too. And
lens's own guarantees: a handle removes only itself, nested contexts keep each other's copies,
nothing is left behind on errors."""

import gc
import weakref

import pytest
import torch
from conftest import make_model, make_tokens
from torch import nn

import transformer_lens
from transformer_lens.hook_points import HookPoint as TLHookPoint

from lens.hooks import HookedRootModule, HookPoint

IMPLS = {"tl": (transformer_lens.HookedRootModule, TLHookPoint), "lens": (HookedRootModule, HookPoint)}


def tiny(impl: str, seed: int = 0):
    """The same small user model on either implementation: in → 2 blocks → out, a HookPoint
    after each step (names hook_in, blocks.{l}.hook_mid, blocks.{l}.hook_out, hook_out)."""
    Root, Point = IMPLS[impl]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.hook_mid = Point()
            self.hook_out = Point()

        def forward(self, x):
            return x + self.hook_out(torch.tanh(self.hook_mid(self.lin(x))))

    class Tiny(Root):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 6)
            self.hook_in = Point()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(6, 2)
            self.hook_out = Point()
            self.setup()

        def forward(self, x):
            x = self.hook_in(self.inp(x))
            for block in self.blocks:
                x = block(x)
            return self.hook_out(self.head(x))

    torch.manual_seed(seed)
    return Tiny()


X = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))


def both(scenario):
    """The scenario's record on TransformerLens's module and on lens's, which must agree."""
    records = {impl: scenario(tiny(impl)) for impl in IMPLS}
    return records["tl"], records["lens"]


def counts(m) -> dict:
    return {n: (len(hp.fwd_hooks), len(hp.bwd_hooks)) for n, hp in m.hook_dict.items()}


def tagger(log, tag):
    return lambda x, hook: log.append((tag, hook.name))


def test_names_and_dicts_match_transformerlens():
    tl, ours = tiny("tl"), tiny("lens")
    assert list(ours.hook_dict) == list(tl.hook_dict)
    assert list(ours.mod_dict) == list(tl.mod_dict)
    assert [hp.name for hp in ours.hook_points()] == [hp.name for hp in tl.hook_points()]
    assert ours.blocks[1].lin.name == tl.blocks[1].lin.name == "blocks.1.lin"
    assert ours.hook_dict["blocks.1.hook_mid"].layer() == tl.hook_dict["blocks.1.hook_mid"].layer() == 1
    torch.testing.assert_close(ours(X), tl(X))


def test_permanent_hooks_survive_reset_hooks():
    def scenario(m):
        log = []
        m.add_perma_hook("hook_in", tagger(log, "perma"))
        m.add_hook(lambda n: n.endswith("hook_mid"), tagger(log, "temp"))
        m(X)
        m.reset_hooks()
        after_reset = counts(m)
        m(X)
        m.run_with_hooks(X, fwd_hooks=[("hook_out", tagger(log, "call"))])
        after_call = counts(m)
        m.reset_hooks(including_permanent=True)
        m(X)
        return log, after_reset, after_call, counts(m)

    assert both(scenario)[0] == both(scenario)[1]


def test_level_based_removal():
    def scenario(m):
        log, out = [], []
        for level in (None, 1, 2):
            m.add_hook("hook_in", tagger(log, f"level{level}"), level=level)
            m.add_hook("hook_in", tagger(log, f"perma{level}"), is_permanent=True, level=level)
        hp = m.hook_dict["hook_in"]
        for kw in (dict(), dict(level=1), dict(level=2), dict(including_permanent=False),
                   dict(including_permanent=False, level=2), dict(dir="bwd")):
            out.append(hp.has_hooks(**kw))
        m.remove_all_hook_fns(level=1)
        out.append(len(hp.fwd_hooks))
        m(X)
        m.reset_hooks(level=2, including_permanent=True)
        out.append(len(hp.fwd_hooks))
        hp.remove_hooks("fwd")
        out.append(len(hp.fwd_hooks))
        m(X)
        return log, out

    tl, ours = both(scenario)
    assert ours == tl


@pytest.mark.parametrize("via", ["point", "model", "context"])
def test_prepend_order(via):
    def scenario(m):
        log = []
        if via == "point":
            hp = m.hook_dict["blocks.0.hook_mid"]
            hp.add_hook(tagger(log, "a"))
            hp.add_hook(tagger(log, "b"))
            hp.add_hook(tagger(log, "c"), prepend=True)
        elif via == "model":
            m.add_hook("blocks.0.hook_mid", tagger(log, "a"))
            m.add_hook("blocks.0.hook_mid", tagger(log, "b"), prepend=True)
            m.add_hook("blocks.0.hook_mid", tagger(log, "c"), is_permanent=True, prepend=True)
        else:
            m.add_hook("blocks.0.hook_mid", tagger(log, "a"))
            with m.hooks(fwd_hooks=[("blocks.0.hook_mid", tagger(log, "b"))]):
                m.add_hook("blocks.0.hook_mid", tagger(log, "c"), prepend=True)
                m(X)
        m(X)
        return log

    tl, ours = both(scenario)
    assert ours == tl and len(ours) >= 3


def test_has_hooks_in_every_direction():
    def scenario(m):
        hp = m.hook_dict["blocks.1.hook_out"]
        out = []
        for step in range(3):
            if step == 1:
                hp.add_hook(lambda x, hook: None, dir="bwd")
            if step == 2:
                hp.add_perma_hook(lambda x, hook: None)
            out += [hp.has_hooks(d, p) for d in ("fwd", "bwd", "both") for p in (True, False)]
        hp.remove_hooks("both")
        out.append(hp.has_hooks())
        hp.remove_hooks("both", including_permanent=True)
        out.append(hp.has_hooks())
        return out

    tl, ours = both(scenario)
    assert ours == tl


def test_ctx_and_clear_contexts():
    def count(x, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1

    def scenario(m):
        hp, seen = m.hook_dict["hook_in"], []
        m.run_with_hooks(X, fwd_hooks=[("hook_in", count)])
        m.run_with_hooks(X, fwd_hooks=[("hook_in", count)], clear_contexts=False)
        seen.append(dict(hp.ctx))
        m.run_with_hooks(X, fwd_hooks=[("hook_in", count)], clear_contexts=True)
        seen.append(dict(hp.ctx))
        with m.hooks(fwd_hooks=[("hook_in", count)]):
            m(X)
        seen.append(dict(hp.ctx))
        m.reset_hooks(clear_contexts=False)
        seen.append(dict(hp.ctx))
        m.reset_hooks()
        seen.append(dict(hp.ctx))
        hp.ctx["k"] = 1
        hp.clear_context()
        seen.append(dict(hp.ctx))
        return seen

    tl, ours = both(scenario)
    assert ours == tl == [{"n": 2}, {}, {"n": 1}, {"n": 1}, {}, {}]


def test_reset_hooks_end_false_leaves_the_hooks_on():
    def scenario(m):
        log = []
        m.run_with_hooks(X, fwd_hooks=[("hook_out", tagger(log, "kept"))], reset_hooks_end=False)
        left, level = counts(m), m.context_level
        m(X)
        with m.hooks(fwd_hooks=[("hook_in", tagger(log, "ctx"))], reset_hooks_end=False):
            pass
        m(X)
        m.reset_hooks()
        m(X)
        return log, left, level, counts(m)

    tl, ours = both(scenario)
    assert ours == tl


def test_nested_contexts_and_failure():
    def fail(x, hook):
        raise ValueError("fail")

    def scenario(m):
        log, sizes = [], []
        hp = m.hook_dict["hook_in"]
        with m.hooks(fwd_hooks=[("hook_in", tagger(log, "outer"))]):
            with m.hooks(fwd_hooks=[("hook_in", tagger(log, "inner"))]):
                sizes.append(len(hp.fwd_hooks))
                m(X)
            sizes.append(len(hp.fwd_hooks))
            with pytest.raises(ValueError, match="fail"):
                with m.hooks(fwd_hooks=[("hook_in", fail)]):
                    m(X)
            sizes.append(len(hp.fwd_hooks))
            m(X)
            m.reset_hooks()  # inside a context: removes its hooks too, as TransformerLens
            sizes.append(len(hp.fwd_hooks))
        sizes.append((len(hp.fwd_hooks), m.context_level))
        return log, sizes

    tl, ours = both(scenario)
    assert ours == tl


@pytest.mark.parametrize("names_filter", [None, "blocks.0.hook_mid", ["hook_in", "hook_out"],
                                          lambda n: n.endswith("hook_out")])
def test_run_with_cache_matches_transformerlens(names_filter):
    (tl_out, tl_cache), (out, cache) = both(lambda m: m.run_with_cache(X, names_filter=names_filter))
    torch.testing.assert_close(out, tl_out)
    assert list(cache) == list(tl_cache)
    for k in tl_cache:
        torch.testing.assert_close(cache[k], tl_cache[k])


@pytest.mark.parametrize("pos_slice", [-1, "Slice(-1)", [0, 2], (1, 4)])
def test_run_with_cache_gradients_and_pos_slice(pos_slice):
    if pos_slice == "Slice(-1)":  # TransformerLens's own Slice: an int one drops the axis
        from transformer_lens.utilities import Slice
        pos_slice = Slice(-1)

    def scenario(m):
        cache, fwd, bwd = m.get_caching_hooks(["hook_in", "blocks.1.hook_mid"], incl_bwd=True)
        with m.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            m(X).pow(2).sum().backward()
        _, sliced = m.run_with_cache(X, pos_slice=pos_slice)
        return cache, sliced

    (tl_cache, tl_sliced), (cache, sliced) = both(scenario)
    assert sorted(cache) == sorted(tl_cache) and "hook_in_grad" in cache
    for k in tl_cache:
        torch.testing.assert_close(cache[k], tl_cache[k])
    assert list(sliced) == list(tl_sliced)
    for k in tl_sliced:
        torch.testing.assert_close(sliced[k], tl_sliced[k])


def test_backward_hooks_scale_the_gradient_as_transformerlens():
    def halve_tuple(g, hook):
        return (g / 2,)  # torch module-hook style: a 1-tuple

    def scenario(m):
        with m.hooks(bwd_hooks=[("blocks.0.hook_out", halve_tuple),
                                ("hook_in", lambda g, hook: 3 * g)]):
            m(X).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    tl, ours = both(scenario)
    plain = tiny("lens")
    plain(X).pow(2).sum().backward()
    assert not torch.allclose(ours["inp.weight"], plain.inp.weight.grad)
    for n in tl:
        torch.testing.assert_close(ours[n], tl[n], msg=n)


def test_forward_replacement_matches_transformerlens():
    def scenario(m):
        return m.run_with_hooks(X, fwd_hooks=[("blocks.1.hook_mid", lambda x, hook: x * 0.5),
                                              (lambda n: n == "hook_in", lambda x, hook: x + 1)])

    tl, ours = both(scenario)
    torch.testing.assert_close(ours, tl)


# ---------------------------------------------------------------- lens's own guarantees
def test_a_handle_removes_only_itself():
    m = tiny("lens")
    hp = m.hook_dict["hook_in"]
    fn = lambda x, hook: None
    first, = m.add_hook("hook_in", fn)
    second, = m.add_hook("hook_in", fn)
    first.remove()
    first.remove()  # a second call must not take the other copy
    assert hp.fwd_hooks == [second] and second.active and not first.active
    second.hook.remove()  # TransformerLens's handle.hook.remove()
    assert hp.fwd_hooks == [] and second.user_hook is fn


def test_removed_hooks_are_not_kept_anywhere():
    m = tiny("lens")
    holder = type("Fn", (), {"__call__": lambda self, x, hook: None})()
    ref = weakref.ref(holder)
    for _ in range(3):
        m.run_with_hooks(X, fwd_hooks=[("hook_in", holder)])
        with m.hooks(fwd_hooks=[(lambda n: True, holder)]):
            m(X)
        m.add_hook("hook_out", holder)[0].remove()
    del holder
    gc.collect()
    assert ref() is None and all(c == (0, 0) for c in counts(m).values())


def test_nested_contexts_keep_each_others_copy_of_a_function():
    m = tiny("lens")
    log = []
    fn = tagger(log, "f")
    hp = m.hook_dict["hook_in"]
    with m.hooks(fwd_hooks=[("hook_in", fn)]):
        with m.hooks(fwd_hooks=[("hook_in", fn)]):
            assert len(hp.fwd_hooks) == 2
        assert len(hp.fwd_hooks) == 1 and hp.fwd_hooks[0].context_level == 1
        m(X)
    assert log == [("f", "hook_in")] and not hp.fwd_hooks


def test_reset_hooks_inside_a_context_keeps_a_permanent_hook():
    m = tiny("lens")
    fn = lambda x, hook: None
    hp = m.hook_dict["hook_in"]
    with m.hooks(fwd_hooks=[("hook_in", fn)]):
        m.add_perma_hook("hook_in", fn)  # the same function, permanent
        m.reset_hooks()
        assert [h.is_permanent for h in hp.fwd_hooks] == [True]
    assert [h.is_permanent for h in hp.fwd_hooks] == [True]
    m.add_perma_hook("hook_in", fn)
    with m.hooks(fwd_hooks=[("hook_in", fn)]):
        pass
    assert [h.is_permanent for h in hp.fwd_hooks] == [True, True]


def test_errors_leave_nothing_behind():
    m = tiny("lens")
    with pytest.raises(KeyError, match=r"did you mean \['blocks\.0\.hook_mid'"):
        m.run_with_hooks(X, fwd_hooks=[("hook_in", lambda x, hook: None), ("blocks.0.hook_mdi", print)])
    with pytest.raises(KeyboardInterrupt):
        with m.hooks(fwd_hooks=[("hook_in", lambda x, hook: None)]):
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_mid'.*\(2, 5, 3\).*\(2, 5, 6\)"):
        m.run_with_hooks(X, fwd_hooks=[("blocks.0.hook_mid", lambda x, hook: x[..., :3])])
    with pytest.raises(ValueError, match="dir="):
        m.hook_dict["hook_in"].add_hook(print, dir="backward")
    with pytest.raises(ValueError, match="dir="):
        m.hook_dict["hook_in"].remove_hooks("sideways")
    assert all(c == (0, 0) for c in counts(m).values()) and m.context_level == 0


def test_a_module_without_setup_says_so():
    class NoSetup(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_x = HookPoint()

    with pytest.raises(KeyError, match=r"call self\.setup\(\)"):
        NoSetup().run_with_hooks(torch.zeros(1), fwd_hooks=[("hook_x", print)])


# ---------------------------------------------------------------- on a lens model
def test_perma_hooks_and_levels_on_a_lens_model():
    model = make_model()
    tokens = make_tokens(model)
    base = model(tokens)
    model.add_perma_hook("hook_embed", lambda x, hook: x * 0)
    zeroed = model(tokens)
    assert not torch.allclose(zeroed, base)
    model.reset_hooks()
    torch.testing.assert_close(model(tokens), zeroed)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x + 1)],
                         reset_hooks_end=False)
    assert model.hook_dict["blocks.0.hook_resid_pre"].has_hooks(level=1)
    model.reset_hooks(level=1)
    assert not model.hook_dict["blocks.0.hook_resid_pre"].has_hooks()
    model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)
    assert "blocks.0.attn" in model.mod_dict and model.mod_dict["blocks.0.attn.hook_z"] is \
        model.hook_dict["blocks.0.attn.hook_z"]
    assert model.list_hooks() == {}


def test_tl_surface_exposes_the_hook_api():
    import lens.tl
    model = lens.tl.HookedTransformer.from_pretrained("lens-tiny-attn2l")
    log = []
    model.add_hook("blocks.0.attn.hook_pattern", tagger(log, "p"), is_permanent=True, prepend=True)
    model.run_with_hooks("Hello world", fwd_hooks=[("blocks.0.attn.hook_pattern", tagger(log, "q"))])
    model.reset_hooks()
    model("Hello world")
    assert [t for t, _ in log] == ["p", "q", "p"]
    model.reset_hooks(including_permanent=True)
