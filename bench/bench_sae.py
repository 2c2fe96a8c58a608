"""An SAE spliced into the forward pass (lens.sae.saes, error term on) against the same forward
pass plus the SAE's own encode and decode run separately on the activation: the splice should
cost no more than the SAE's arithmetic (goal ≤ 1.1×). Also the splice with the features cached,
and a feature × position patching sweep: lens.sae.feature_patch against one run_with_hooks per
patch in lens and in SAELens + TransformerLens (the latter under .venv-sae, where sae_lens is).

    python bench/bench_sae.py [--threads 1] [--batch 8] [--seq 128] [--expansion 16]
"""

import argparse
import sys
import tempfile
import time
from importlib.metadata import version
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


def sweep(model, args, n_features: int = 32, pos: int = 8, n_saelens_features: int = 32):
    """A feature × position patching sweep from the SAE's layer: lens.sae.feature_patch (batched)
    against a naive loop of one run_with_hooks per patch in lens, and the same loop in SAELens +
    TransformerLens (a HookedSAETransformer with the same weights) where sae_lens is importable,
    on its first `n_saelens_features` features; times per patch are compared."""
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
    def naive(run_with_cache, run_with_hooks, feats):
        """One run_with_hooks per (feature, position), copying the clean activation in."""
        _, cache = run_with_cache(clean, names_filter=name)
        out = []
        for f in feats:
            for p in range(pos):
                def put(a, hook, f=f, p=p):
                    a = a.clone()
                    a[:, p, f] = cache[name][:, p, f]
                    return a
                out.append(metric(run_with_hooks(corrupted, fwd_hooks=[(name, put)])).mean())
        return torch.stack(out)

    def lens_naive():
        with saes(model, sae, use_error_term=True):
            return naive(model.run_with_cache, model.run_with_hooks, feats)

    runs = {}  # method -> (seconds, patches, results)
    t0 = time.perf_counter()
    got = feature_patch(model, sae, clean, corrupted, metric, per="feature_pos", features=feats,
                        progress=False).values.flatten()
    runs["lens feature_patch, batched"] = (time.perf_counter() - t0, n_features * pos, got)
    t0 = time.perf_counter()
    out = lens_naive()
    runs["lens run_with_hooks loop"] = (time.perf_counter() - t0, n_features * pos, out)
    tl = hooked_sae_transformer(model, sae, clean)
    if tl is None:
        note = ("SAELens + TransformerLens comparison skipped: sae_lens is not importable here; it "
                "needs .venv-sae (`make test` builds it): .venv-sae/bin/python bench/bench_sae.py")
    else:
        sl_feats = feats[:n_saelens_features]
        t0 = time.perf_counter()
        want = naive(tl.run_with_cache, tl.run_with_hooks, sl_feats)
        runs["SAELens + TL run_with_hooks loop"] = (time.perf_counter() - t0, len(sl_feats) * pos, want)
        note = (f"SAELens {version('sae_lens')} + TransformerLens {version('transformer_lens')}: a "
                "HookedSAETransformer with the lens model's weights, the lens SAE's attached"
                + ("" if len(sl_feats) == n_features else
                   f"; its loop runs the first {len(sl_feats)} features only, compared per patch"))
    t_batched = runs["lens feature_patch, batched"][0] / (n_features * pos)
    rows = [[m, f"{t:.2f}", n, f"{n / t:.0f}", f"{t / n / t_batched:.1f}×",
             f"{(r - got[:len(r)]).abs().max():.1e}"] for m, (t, n, r) in runs.items()]
    print(f"\nfeature × position patching at {HOOK}: {n_features} features × {pos} positions = "
          f"{n_features * pos} patches, TopK SAE (k={sae.k}, d_sae={sae.d_sae}), error term on, "
          f"largest |effect| {got.abs().max():.2f}\n{note}")
    print(table(rows, ["method", "seconds", "patches", "patches/s", "time per patch vs batched",
                       "max |Δ| vs batched"]))


def hooked_sae_transformer(model, sae, tokens):
    """SAELens's HookedSAETransformer holding `model`'s weights (lens's state dict uses
    TransformerLens's names and layout) with SAELens's copy of `sae` attached, error term on;
    checked against lens with the SAE off and on. None where sae_lens is not importable."""
    try:
        from sae_lens import SAE as SAELensSAE
        from sae_lens import HookedSAETransformer
    except ImportError:
        return None
    from transformer_lens import HookedTransformerConfig
    c = model.cfg
    tl = HookedSAETransformer(HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp,
        d_vocab=c.d_vocab, n_ctx=c.n_ctx, act_fn=c.act_fn, normalization_type=c.normalization,
        eps=c.eps, default_prepend_bos=False)).eval()
    missing, unexpected = tl.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.mask", ".attn.IGNORE"))]  # buffers
    if missing or unexpected:
        raise RuntimeError(f"lens → TransformerLens weights: missing {missing}, unexpected {unexpected}")
    with tempfile.TemporaryDirectory() as folder:
        theirs = SAELensSAE.load_from_disk(sae.save(folder, format="saelens"))
    ours_p, theirs_p = dict(sae.named_parameters()), dict(theirs.named_parameters())
    if ours_p.keys() != theirs_p.keys() or not all(torch.equal(p, theirs_p[n])
                                                    for n, p in ours_p.items()):
        raise RuntimeError(f"SAELens SAE's weights ({sorted(theirs_p)}) differ from lens's ({sorted(ours_p)})")
    with torch.no_grad():
        plain = (tl(tokens) - model(tokens)).abs().max()
        with saes(model, sae, use_error_term=False):
            ours = model(tokens)
        spliced = (tl.run_with_saes(tokens, saes=[theirs], use_error_term=False) - ours).abs().max()
    tl.add_sae(theirs, use_error_term=True)
    print(f"\nHookedSAETransformer vs lens.HookedGPT, logits max |Δ|: {plain:.1e} plain, "
          f"{spliced:.1e} with the SAE spliced in (error term off)")
    if max(plain, spliced) > 1e-4:
        raise RuntimeError("the HookedSAETransformer does not compute the lens model's function")
    return tl


if __name__ == "__main__":
    main()
