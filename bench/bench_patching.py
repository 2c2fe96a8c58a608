"""Head × position activation patching sweep (site z, per head_pos) on a GPT-2-small-sized random
model: lens (patches stacked along the batch, each run starting at the patched layer) vs lens with
one patch per forward, vs lens's naive loop (one full forward per patch), vs TransformerLens's
get_act_patch_attn_head_out_by_pos on a TL-native TransformerBridge holding the same weights.
A second table times resid_pre per layer × position (lens vs TransformerLens's
get_act_patch_resid_pre) and path patching from every head to the final stream (lens only).
The prompts agree before --corrupt-at (default pos // 2), where lens's runs compute nothing;
--corrupt-at 0 gives prompts that differ from the first position, where that saving is nil.

    python bench/bench_patching.py                     # 4 layers, 6 positions, CPU
    python bench/bench_patching.py --layers 12 --pos 10
    python bench/bench_patching.py --corrupt-at 0
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_small_sized, table  # noqa: E402

from lens.cache import act_name  # noqa: E402
from lens.patching import activation_patch, path_patch_senders  # noqa: E402


FIRST = "lens, logit_positions=[-1], logit_tokens=[0, 1] (only the logits the metric reads)"


def naive_sweep(model, clean, corrupted, metric):
    """One full forward of the corrupted run per (layer, head, position) patch."""
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    out = torch.empty(L, H, n)
    for layer in range(L):
        name = act_name("z", layer)
        for h in range(H):
            for p in range(n):
                def hook(z, hook, h=h, p=p):
                    z = z.clone()
                    z[:, p, h] = clean_cache[name][:, p, h]
                    return z
                out[layer, h, p] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
    return out


def tl_bridge(model):
    """A TL-native TransformerBridge with the lens model's weights (the state-dict keys are TL's)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    c = model.cfg
    cfg = TransformerBridgeConfig(d_model=c.d_model, n_layers=c.n_layers, d_mlp=c.d_mlp, d_head=c.d_head,
                                  n_heads=c.n_heads, n_ctx=c.n_ctx, d_vocab=c.d_vocab, act_fn=c.act_fn,
                                  normalization_type="LN", positional_embedding_type="standard", eps=c.eps)
    bridge = TransformerBridge.boot_native(cfg, device="cpu")
    bridge.load_state_dict(convert_tl_checkpoint(model.state_dict(), bridge.cfg), strict=True)
    return bridge.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pos", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--corrupt-at", type=int, default=None,
                    help="the position where the corrupted prompt differs (default: pos // 2)")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    args = ap.parse_args()
    at = args.pos // 2 if args.corrupt_at is None else args.corrupt_at
    if not 0 <= at < args.pos:
        ap.error(f"--corrupt-at {at} must be a position in [0, {args.pos})")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = gpt2_small_sized(n_layers=args.layers)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, at] = (clean[:, at] + 1 + torch.randint(0, model.cfg.d_vocab - 1, (args.batch,),
                                                          generator=g)) % model.cfg.d_vocab
    metric = lambda logits: (logits[:, -1, 0] - logits[:, -1, 1]).mean()  # noqa: E731
    n_patches = args.layers * model.cfg.n_heads * args.pos
    fns = {
        FIRST: lambda: activation_patch(
            model, clean, corrupted, metric, site="z", per="head_pos", progress=False,
            logit_positions=[-1], logit_tokens=[0, 1]).values,
        "lens, logit_positions=[-1] (skips layers, earlier positions, unread logits)": lambda: activation_patch(
            model, clean, corrupted, metric, site="z", per="head_pos", progress=False,
            logit_positions=[-1]).values,
        "lens (batched, skips layers and earlier positions)": lambda: activation_patch(
            model, clean, corrupted, metric, site="z", per="head_pos", progress=False).values,
        "lens (batched, layer-skipping, every position)": lambda: activation_patch(
            model, clean, corrupted, metric, site="z", per="head_pos", progress=False,
            skip_prefix=False).values,
        "lens (layer-skipping, 1 patch/forward)": lambda: activation_patch(
            model, clean, corrupted, metric, site="z", per="head_pos", batch_size=1, progress=False).values,
        "lens naive loop (full forward per patch)": lambda: naive_sweep(model, clean, corrupted, metric),
    }
    # the second table: (sweep, method) -> (patches, fn); rows of a sweep compare with its first
    n_resid, n_path = args.layers * args.pos, args.layers * model.cfg.n_heads
    final = [("resid_post", -1)]
    more = {
        ("resid_pre per layer_pos", "lens (skips layers, earlier and agreeing positions)"): (
            n_resid, lambda: activation_patch(model, clean, corrupted, metric, site="resid_pre",
                                              per="layer_pos", progress=False).values),
        ("resid_pre per layer_pos", "lens, skip_prefix=False (every position)"): (
            n_resid, lambda: activation_patch(model, clean, corrupted, metric, site="resid_pre",
                                              per="layer_pos", progress=False, skip_prefix=False).values),
        ("path patching, every head -> resid_post[-1]", f"lens, prompts differ from position {at}"): (
            n_path, lambda: path_patch_senders(model, clean, corrupted, metric, final, progress=False).values),
    }
    if at:  # the same sweep over prompts that differ from position 0 too: no agreeing positions
        from_0 = corrupted.clone()
        from_0[:, 0] = (clean[:, 0] + 1) % model.cfg.d_vocab
        more["path patching, every head -> resid_post[-1]", "lens, prompts differ from position 0 (other values)"] = (
            n_path, lambda: path_patch_senders(model, clean, from_0, metric, final, progress=False).values)
    note = ""
    if not args.no_tl:
        try:
            from transformer_lens import patching as tlp
            bridge = tl_bridge(model)
            _, tl_cache = bridge.run_with_cache(clean)
            fns["TransformerLens get_act_patch_attn_head_out_by_pos"] = lambda: _quiet(
                lambda: tlp.get_act_patch_attn_head_out_by_pos(bridge, corrupted, tl_cache, metric)
            ).permute(0, 2, 1)  # [layer, pos, head] -> [layer, head, pos]
            more["resid_pre per layer_pos", "TransformerLens get_act_patch_resid_pre"] = (
                n_resid, lambda: _quiet(lambda: tlp.get_act_patch_resid_pre(bridge, corrupted, tl_cache, metric)))
        except Exception as e:  # say why the peer could not run
            note = f"\nTransformerLens not run: {type(e).__name__}: {e}"
    model(clean)  # warm up
    t0 = time.perf_counter()
    med, outs = interleaved(fns, args.repeats)
    ref_name = FIRST
    rows = [[name, f"{t:.2f}", f"{n_patches / t:.0f}", f"{t / med[ref_name]:.2f}",
             f"{(outs[name] - outs[ref_name]).abs().max().item():.1e}"] for name, t in med.items()]
    print(f"z × head × position patching, GPT-2-small-sized random model ({args.layers} layers, 768 wide, "
          f"12 heads, d_vocab 50257), batch {args.batch} × {args.pos} positions = {n_patches} patches, "
          f"prompts differing from position {at}; CPU, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} (all runs {time.perf_counter() - t0:.0f} s)\n")
    print(table(rows, ["method", "seconds", "patches/s", "time / lens first row", "max |Δ| vs lens first row"]) + note)

    t0 = time.perf_counter()
    med, outs = interleaved({key: fn for key, (_, fn) in more.items()}, args.repeats)
    first = {}  # each sweep's first row
    for key in more:
        first.setdefault(key[0], key)
    rows = []
    for key in sorted(more, key=lambda key: list(first).index(key[0])):  # grouped by sweep
        count, ref = more[key][0], first[key[0]]
        delta = "—" if "other values" in key[1] else f"{(outs[key] - outs[ref]).abs().max().item():.1e}"
        rows.append([*key, str(count), f"{med[key]:.2f}", f"{count / med[key]:.0f}",
                     f"{med[key] / med[ref]:.2f}", delta])
    print(f"\nother sweeps, the same model and prompts (median of {args.repeats}, all runs "
          f"{time.perf_counter() - t0:.0f} s)\n")
    print(table(rows, ["sweep", "method", "patches", "seconds", "patches/s", "time / sweep's first row",
                       "max |Δ| vs sweep's first row"]))


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds and last output of each callable, run interleaved so drift hits all alike."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def _quiet(fn):
    """Run fn with stderr (TransformerLens's progress bar) silenced."""
    with open(os.devnull, "w") as devnull:
        stderr, sys.stderr = sys.stderr, devnull
        try:
            return fn()
        finally:
            sys.stderr = stderr


if __name__ == "__main__":
    main()
