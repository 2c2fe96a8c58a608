"""A ported TransformerLens sweep: get_act_patch_attn_head_out_by_pos (z patched per layer ×
position × head, clean into corrupted) on a GPT-2-small-sized random model, through lens.tl.patching
(TransformerLens's function and signature, run on lens's batched, layer-skipping engine) vs
TransformerLens's own transformer_lens.patching function on a TL-native TransformerBridge holding
the same weights (TL's model: the fair peer). --tl-on-lens adds TL's function running on the
lens model itself (TL's one-full-forward-per-patch loop over lens's forward), which separates
the engine's gain from the model's. Both get a clean cache computed beforehand by their own model;
the values are checked equal.

    python bench/bench_tl_patching.py                       # 12 layers, 8 positions, CPU
    python bench/bench_tl_patching.py --layers 3            # fewer layers when time is short

TransformerLens's loop runs one full forward per patch (1152 at the defaults): about 2 minutes on
two idle cores, far more on a busy machine (9 minutes on a loaded one, where --layers 3 took 2).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_patching import _quiet, tl_bridge  # noqa: E402
from common import gpt2_small_sized, table  # noqa: E402

import lens.tl.patching as lens_tlp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="n_layers (default 12, GPT-2 small)")
    ap.add_argument("--pos", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tl-on-lens", action="store_true", help="also time TL's function on the lens model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = gpt2_small_sized(n_layers=args.layers)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, args.pos // 2] = torch.randint(0, model.cfg.d_vocab, (args.batch,), generator=g)
    metric = lambda logits: (logits[:, -1, 0] - logits[:, -1, 1]).mean()  # noqa: E731
    n_patches = args.layers * model.cfg.n_heads * args.pos

    from transformer_lens import patching as tlp
    bridge = tl_bridge(model)
    with torch.no_grad():
        _, lens_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
        _, tl_cache = bridge.run_with_cache(clean)
    ours = "lens.tl.patching (batched, layer-skipping), lens model"
    peer = "transformer_lens.patching, TL TransformerBridge"
    fns = {ours: lambda: lens_tlp.get_act_patch_attn_head_out_by_pos(
               model, corrupted, lens_cache, metric, progress=False),
           peer: lambda: _quiet(lambda: tlp.get_act_patch_attn_head_out_by_pos(
               bridge, corrupted, tl_cache, metric))}
    if args.tl_on_lens:
        fns["transformer_lens.patching, lens model (TL's loop)"] = lambda: _quiet(
            lambda: tlp.get_act_patch_attn_head_out_by_pos(model, corrupted, lens_cache, metric))
    with torch.no_grad():
        model(clean), bridge(clean)  # warm up
    times, outs = {k: [] for k in fns}, {}
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn().cpu()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[name, f"{t:.2f}", f"{n_patches / t:.0f}", f"{t / med[ours]:.1f}",
             f"{(outs[name] - outs[peer]).abs().max().item():.1e}"] for name, t in med.items()]
    print(f"get_act_patch_attn_head_out_by_pos ([n_layers, pos, n_heads] = {list(outs[ours].shape)}), "
          f"GPT-2-small-sized random model ({args.layers} layers, 768 wide, 12 heads, d_vocab "
          f"{model.cfg.d_vocab}), batch {args.batch} × {args.pos} positions = {n_patches} patches; "
          f"CPU, {torch.get_num_threads()} threads, median of {args.repeats} "
          f"(whole script {time.perf_counter() - t_start:.0f} s)\n")
    print(table(rows, ["method", "seconds", "patches/s", "time / lens.tl", "max |Δ| vs TL on bridge"]))
    print(f"\nspeed-up of lens.tl over TransformerLens on its own model: {med[peer] / med[ours]:.1f}×")


if __name__ == "__main__":
    main()
