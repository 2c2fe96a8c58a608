"""An SAE spliced into the forward pass (lens.sae.saes, error term on) against the same forward
pass plus the SAE's own encode and decode run separately on the activation: the splice should
cost no more than the SAE's arithmetic (goal ≤ 1.1×). Also the splice with the features cached.

    python bench/bench_sae.py [--threads 1] [--batch 8] [--seq 128] [--expansion 16]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table, timeit  # noqa: E402

import lens  # noqa: E402
from lens.sae import SAE, saes  # noqa: E402

CFG = dict(n_layers=4, d_model=256, n_heads=4, d_vocab=8192, n_ctx=128, act_fn="gelu_new")
HOOK = "blocks.1.hook_resid_post"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lens.HookedGPT(lens.GPTConfig(**CFG)).eval()
    d = CFG["d_model"]
    rows = []
    for activation, k in (("relu", None), ("topk", 32), ("jumprelu", None)):
        sae = SAE(d, args.expansion * d, HOOK, activation=activation, k=k)
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.05)
        tokens = torch.randint(0, CFG["d_vocab"], (args.batch, args.seq))
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        x = cache[HOOK]

        @torch.no_grad()
        def separate():
            model(tokens)
            sae.decode(sae.encode(x))

        @torch.no_grad()
        def spliced():
            with saes(model, sae, use_error_term=True):
                model(tokens)

        @torch.no_grad()
        def spliced_cached():
            with saes(model, sae, use_error_term=True):
                model.run_with_cache(tokens, names_filter=HOOK + ".hook_sae_acts_post")

        @torch.no_grad()
        def plain():
            model(tokens)

        t = timeit(dict(plain=plain, separate=separate, spliced=spliced, cached=spliced_cached),
                   repeats=args.repeats)
        rows.append([activation, f"{t['plain'] * 1e3:.1f}", f"{t['separate'] * 1e3:.1f}",
                     f"{t['spliced'] * 1e3:.1f}", f"{t['spliced'] / t['separate']:.2f}×",
                     f"{t['cached'] / t['separate']:.2f}×"])
    print(f"{CFG}, batch {args.batch} × {args.seq}, d_sae = {args.expansion} × {d}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(table(rows, ["SAE", "forward ms", "forward + encode/decode ms", "spliced ms",
                       "spliced / separate (goal ≤ 1.1×)", "spliced, features cached / separate"]))
    sweep(model, args)


def sweep(model, args, n_features: int = 32, pos: int = 8):
    """A feature × position patching sweep (lens.sae.feature_patch, batched, from the SAE's layer)
    against a naive loop of one run_with_hooks per patch, on `n_features` features."""
    import time
    from lens.sae import feature_patch
    d = CFG["d_model"]
    sae = SAE(d, args.expansion * d, HOOK, activation="topk", k=32)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, CFG["d_vocab"], (1, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, pos // 2] = (corrupted[:, pos // 2] + 1) % CFG["d_vocab"]
    metric = lambda logits: logits[:, -1, 0] - logits[:, -1, 1]  # noqa: E731
    feats = list(range(n_features))
    name = HOOK + ".hook_sae_acts_post"

    @torch.no_grad()
    def naive():
        out = []
        with saes(model, sae, use_error_term=True):
            _, cache = model.run_with_cache(clean, names_filter=name)
            for f in feats:
                for p in range(pos):
                    def put(a, hook, f=f, p=p):
                        a = a.clone()
                        a[:, p, f] = cache[name][:, p, f]
                        return a
                    out.append(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, put)])).mean())
        return torch.stack(out)

    t0 = time.perf_counter()
    got = feature_patch(model, sae, clean, corrupted, metric, per="feature_pos", features=feats,
                        progress=False).values.flatten()
    t_lens = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = naive()
    t_naive = time.perf_counter() - t0
    print(f"\nfeature × position patching, {n_features} features × {pos} positions = {n_features * pos} "
          f"patches at {HOOK}: lens.sae.feature_patch {t_lens:.2f} s, naive run_with_hooks loop "
          f"{t_naive:.2f} s, ratio {t_naive / t_lens:.1f}×, max |Δ| {(got - want).abs().max():.1e}")


if __name__ == "__main__":
    main()
