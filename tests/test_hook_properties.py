"""A property test of the hooks' bookkeeping: random sequences of add_hook, hooks() blocks
(entered and left, also by an exception), run_with_hooks, run_with_cache, generate, handle
removal and reset_hooks; after every step exactly the expected hooks are on each hook point,
and a forward pass runs exactly those."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import make_model, make_tokens

POINTS = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "ln_final.hook_normalized"]


class Boom(Exception):
    pass


OPS = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(POINTS), st.booleans()),
    st.tuples(st.just("enter"), st.sampled_from(POINTS), st.booleans()),
    st.tuples(st.just("exit"), st.booleans()),
    st.tuples(st.just("run_with_hooks"), st.sampled_from(POINTS), st.booleans()),
    st.tuples(st.just("run_with_cache"), st.sampled_from(POINTS), st.booleans()),
    st.tuples(st.just("generate"), st.sampled_from(POINTS), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 10), st.booleans()),
    st.tuples(st.just("reset"), st.booleans()),
)


@pytest.fixture(scope="module")
def setup():
    model = make_model(n_ctx=16)
    return model, make_tokens(model, batch=1, pos=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, max_size=18))
def test_exactly_the_expected_hooks_remain(setup, ops):
    model, tokens = setup
    tags = itertools.count()
    ran: list[int] = []
    expected: dict[int, dict] = {}  # tag -> {point, permanent, owner: None or context depth}
    handles: dict[int, object] = {}
    contexts: list = []  # open hooks() blocks: (context manager, its tags)

    def hook(tag):
        def fn(x, hook):
            ran.append(tag)
        return fn

    def check():
        for p in POINTS:
            on = sorted(h.fn.tag for h in model.hook_dict[p].fwd_hooks)
            assert on == sorted(t for t, e in expected.items() if e["point"] == p), (p, ops)
        others = [n for n, hp in model.hook_dict.items() if n not in POINTS and (hp.fwd_hooks or hp.bwd_hooks)]
        assert not others
        assert model.context_level == len(contexts)
        ran.clear()
        with torch.no_grad():
            model(tokens)
        assert sorted(ran) == sorted(expected), ops

    def new(point):
        tag = next(tags)
        fn = hook(tag)
        fn.tag = tag
        return tag, fn

    def failing(x, hook):
        raise Boom

    try:
        for op in ops:
            kind = op[0]
            if kind == "add":
                tag, fn = new(op[1])
                handles[tag], = model.add_hook(op[1], fn, is_permanent=op[2])
                expected[tag] = dict(point=op[1], permanent=op[2], owner=None)
            elif kind == "enter":
                tag, fn = new(op[1])
                cm = model.hooks(fwd_hooks=[(op[1], fn)], reset_hooks_end=op[2])
                cm.__enter__()
                contexts.append((cm, tag))
                expected[tag] = dict(point=op[1], permanent=False,
                                     owner=len(contexts) if op[2] else None)
            elif kind == "exit":
                if not contexts:
                    continue
                cm, _ = contexts.pop()
                depth = len(contexts) + 1
                if op[1]:
                    try:
                        raise Boom
                    except Boom as e:
                        assert not cm.__exit__(Boom, e, e.__traceback__)
                else:
                    cm.__exit__(None, None, None)
                for t in [t for t, e in expected.items() if e["owner"] == depth]:
                    del expected[t]
            elif kind in ("run_with_hooks", "run_with_cache", "generate"):
                tag, fn = new(op[1])
                fns = [(op[1], failing if op[2] else fn)]
                with torch.no_grad():
                    try:
                        if kind == "run_with_hooks":
                            model.run_with_hooks(tokens, fwd_hooks=fns)
                        elif kind == "run_with_cache":
                            with model.hooks(fwd_hooks=fns):
                                model.run_with_cache(tokens, names_filter=POINTS[op[2]:])
                        else:
                            model.generate(tokens, max_new_tokens=2, fwd_hooks=fns, verbose=False)
                    except Boom:
                        assert op[2]
            elif kind == "remove":
                live = sorted(t for t in handles if t in expected)
                if not live:
                    continue
                tag = live[op[1] % len(live)]
                handles[tag].remove()
                if op[2]:
                    handles[tag].remove()  # a second call changes nothing
                del expected[tag]
            elif kind == "reset":
                model.reset_hooks(including_permanent=op[1])
                for t in [t for t, e in expected.items() if op[1] or not e["permanent"]]:
                    del expected[t]
            check()
    finally:
        while contexts:
            contexts.pop()[0].__exit__(None, None, None)
        model.reset_hooks(including_permanent=True)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
