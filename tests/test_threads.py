"""One model shared by threads: the hooks, caches and positions of a call belong to the
thread that made it; model-wide hooks (add_hook) are seen by all."""

import threading

import torch

from conftest import make_model, make_tokens


def _in_threads(*jobs, timeout: float = 120.0) -> list:
    """Run each job in its own thread, all started together; their results (errors re-raised)."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i, job):
        start.wait()
        try:
            results[i] = job()
        except BaseException as e:  # handed to the main thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_each_thread_gets_exactly_its_own_hooks_and_caches():
    model = make_model(n_ctx=16)
    tokens = make_tokens(model, batch=2, pos=9)
    name = "blocks.0.hook_resid_mid"

    def double(x, hook):
        return 2 * x

    with torch.no_grad():
        clean = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(name, double)])
        _, ref_cache = model.run_with_cache(tokens[:1, :5], names_filter=lambda n: "resid" in n)
    assert not torch.allclose(clean, hooked)

    def hooking():
        bad = 0
        for _ in range(100):
            with torch.no_grad():
                bad += not torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(name, double)]), hooked)
        return bad

    def plain():
        bad = 0
        for _ in range(100):
            with torch.no_grad():
                bad += not torch.equal(model(tokens), clean)
        return bad

    def caching():
        bad = 0
        for _ in range(100):
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens[:1, :5], names_filter=lambda n: "resid" in n)
            bad += sorted(cache) != sorted(ref_cache) or any(
                not torch.equal(cache[k], ref_cache[k]) for k in ref_cache)
        return bad

    assert _in_threads(hooking, plain, caching) == [0, 0, 0]
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_a_hooks_block_open_in_one_thread_is_invisible_to_another():
    model = make_model()
    tokens = make_tokens(model)
    seen: list[str] = []
    entered, checked = threading.Event(), threading.Event()

    def mark(x, hook):
        seen.append(threading.current_thread().name)

    def holder():
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", mark)]):
            entered.set()
            checked.wait(60)
            with torch.no_grad():
                model(tokens)
            return [len(model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks), model.context_level]

    def other():
        entered.wait(60)
        with torch.no_grad():
            model(tokens)
        state = [len(model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks), model.context_level]
        checked.set()
        return state

    inside, outside = _in_threads(holder, other)
    assert inside == [1, 1] and outside == [0, 0]
    assert len(seen) == 1  # only the holder's own forward ran its hook


def test_model_wide_hooks_are_seen_by_every_thread():
    model = make_model()
    tokens = make_tokens(model)
    calls = []
    handle, = model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))

    def run():
        with torch.no_grad():
            for _ in range(10):
                model(tokens)

    _in_threads(run, run)
    handle.remove()
    assert len(calls) == 20


def test_generation_and_positions_in_two_threads():
    """generate (KV cache, its own positions each step) beside forwards of other lengths whose
    hooks read hook.positions."""
    model = make_model(n_ctx=24)
    prompt = make_tokens(model, batch=1, pos=4)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=8, temperature=0.0, verbose=False)

    def gen():
        outs = [model.generate(prompt, max_new_tokens=8, temperature=0.0, verbose=False)
                for _ in range(10)]
        return all(torch.equal(o, ref) for o in outs)

    def positions():
        bad = 0
        for n in range(3, 13):
            got = []
            toks = make_tokens(model, batch=2, pos=n)
            with torch.no_grad():
                model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_pre",
                                                       lambda x, hook: got.append(hook.positions))])
            bad += not torch.equal(got[0], torch.arange(n).expand(2, n))
        return bad

    assert _in_threads(gen, positions) == [True, 0]
