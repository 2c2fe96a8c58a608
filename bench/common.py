"""Shared helpers for the benchmarks: a GPT-2-small-sized random model and interleaved timing."""

import statistics
import time

import torch

import lens

GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024, act_fn="gelu_new")


def gpt2_small_sized(seed: int = 0, **overrides) -> lens.HookedGPT:
    torch.manual_seed(seed)
    model = lens.HookedGPT(lens.GPTConfig(**{**GPT2_SMALL, **overrides}))
    return model.eval()


def timeit(fns: dict, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds of each callable, run interleaved so drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cols[1:]])
