"""One prepared script of GPU checks and timings (under 5 minutes on one GPU); it also runs on
the CPU with smaller sizes (`--device cpu`), so CI and the tests exercise it.

It prints one table:
  - parity of logits and loss: CPU float32 vs DEVICE float32 and bfloat16 (GPT-2-small size,
    random weights);
  - no-hook forward vs HF GPT2LMHeadModel (sdpa) on the same weights (batch 8 × 1024 on a GPU);
  - run_with_cache of every resid_post with device="cpu" vs forward;
  - host-device synchronisations during a hooked, cached forward (torch.cuda sync debug mode):
    the goal is zero per hook (the token range check makes one per forward);
  - the head × position patching sweep, lens vs TransformerLens on the same weights;
  - peak GPU memory of each.

    python bench/gpu_check.py                 # cuda if available
    python bench/gpu_check.py --device cpu    # small sizes, for CI
"""

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

import lens  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mb(fn, device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"


def count_syncs(fn, device) -> str:
    """Synchronising CUDA calls made by fn, counted with the sync debug mode's warnings."""
    if device.type != "cuda":
        return "n/a (CPU)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return str(sum("synchroniz" in str(w.message) for w in caught))


def main(argv=None) -> list[list[str]]:
    with torch.no_grad():
        return _main(argv)


def _main(argv) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="default 12 on a GPU, 2 on the CPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true", help="skip HF and TransformerLens")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    L = args.layers or (12 if gpu else 2)
    repeats = args.repeats or (10 if gpu else 2)
    batch, pos = (8, 1024) if gpu else (2, 64)
    torch.manual_seed(0)
    cfg = lens.GPTConfig(n_layers=L, d_model=768, n_heads=12, d_vocab=50257, n_ctx=1024)
    cpu_model = lens.HookedGPT(cfg).eval()
    tokens = torch.randint(0, cfg.d_vocab, (batch, pos))
    rows = []

    # parity: small batch, so the CPU reference is quick
    small = tokens[:2, :128]
    ref_logits, ref_loss = cpu_model(small, return_type="both")
    for dtype in (torch.float32, torch.bfloat16):
        m = lens.HookedGPT(cfg).eval()
        m.load_state_dict(cpu_model.state_dict())
        m = m.to(device=device, dtype=dtype)
        logits, loss = m(small.to(device), return_type="both")
        dlp = (logits.float().cpu().log_softmax(-1) - ref_logits.log_softmax(-1)).abs().max().item()
        rows.append([f"parity CPU fp32 vs {device.type} {str(dtype)[6:]}", f"max |Δ log-prob| {dlp:.1e}",
                     f"|Δ loss| {abs(loss.item() - ref_loss.item()):.1e}", ""])
        del m

    model = cpu_model.to(device)
    x = tokens.to(device)
    fwd = timed(lambda: model(x), device, repeats)
    if not args.no_peers:
        from transformers import GPT2Config, GPT2LMHeadModel
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(n_layer=L)).save_pretrained(d)
            hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(device).eval()
            ours = lens.HookedGPT.from_pretrained_no_processing(d, device=device).eval()
        t_ours = timed(lambda: ours(x), device, repeats)
        t_hf = timed(lambda: hf(x), device, repeats)
        rows.append([f"forward {batch}x{pos}, no hooks", f"lens {t_ours * 1e3:.1f} ms",
                     f"HF sdpa {t_hf * 1e3:.1f} ms", f"ratio {t_ours / t_hf:.3f} (goal ≤ 1.00)"])
        rows.append(["peak memory, forward", f"lens {peak_mb(lambda: ours(x), device)}",
                     f"HF {peak_mb(lambda: hf(x), device)}", ""])
        del hf, ours

    resid = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    cache_to_cpu = lambda: model.run_with_cache(x, names_filter=resid, device="cpu")
    t_cache = timed(cache_to_cpu, device, repeats)
    rows.append(["run_with_cache(resid_post, device='cpu')", f"{t_cache * 1e3:.1f} ms",
                 f"forward {fwd * 1e3:.1f} ms", f"ratio {t_cache / fwd:.2f}"])
    rows.append(["peak memory, cache to CPU", peak_mb(cache_to_cpu, device), "", ""])
    n_hooks = len(resid)
    rows.append([f"host syncs: forward with {n_hooks} cache hooks to CPU", count_syncs(cache_to_cpu, device),
                 f"plain forward: {count_syncs(lambda: model(x), device)}", "goal: none per hook"])

    from lens.patching import activation_patch
    pl = min(L, 4)
    pmodel = lens.HookedGPT(lens.GPTConfig(**{**cfg.to_dict(), "n_layers": pl})).to(device).eval()
    clean = torch.randint(0, cfg.d_vocab, (1, 12 if gpu else 6), generator=torch.Generator().manual_seed(1)).to(device)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % cfg.d_vocab
    answer = int(clean[0, -1])
    metric = lambda logits: logits[:, -1, answer]
    sweep = lambda: activation_patch(pmodel, clean, corrupted, metric, site="z", per="head_pos",
                                     progress=False, logit_positions=[-1], logit_tokens=[answer])
    t_lens = timed(sweep, device, 1)
    t_every = timed(lambda: activation_patch(pmodel, clean, corrupted, metric, site="z", per="head_pos",
                                             progress=False, skip_prefix=False), device, 1)
    peer = ""
    if not args.no_peers:
        try:
            from bench_patching import tl_bridge
            from transformer_lens.patching import get_act_patch_attn_head_out_by_pos
            bridge = tl_bridge(pmodel.cpu()).to(device)
            pmodel.to(device)
            t_tl = timed(lambda: get_act_patch_attn_head_out_by_pos(
                bridge, corrupted, bridge.run_with_cache(clean)[1], lambda lg: metric(lg).mean()), device, 1)
            peer = f"TransformerLens {t_tl:.2f} s, ratio {t_lens / t_tl:.2f}"
        except Exception as e:  # report, do not hide, a peer that cannot run
            peer = f"TransformerLens unavailable: {type(e).__name__}: {str(e)[:60]}"
    rows.append([f"patching sweep z × head × pos ({pl} layers, {clean.shape[1]} pos)", f"lens {t_lens:.2f} s", peer,
                 f"peak {peak_mb(sweep, device)}; every position, all logits {t_every / t_lens:.2f}x (goal TL ≥ 50x)"])

    # every layer's pattern at long context: lazy (queries and keys kept) vs materialised
    n_long = 4096 if gpu else 256
    lcfg = lens.GPTConfig(**{**cfg.to_dict(), "n_ctx": n_long})
    lmodel = lens.HookedGPT(lcfg).to(device).eval()
    long = torch.randint(0, cfg.d_vocab, (1, n_long)).to(device)
    pats = lambda n: n.endswith("hook_pattern")
    t_plain = timed(lambda: lmodel(long), device, 2)
    lazy = lambda: lmodel.run_with_cache(long, names_filter=pats, lazy_patterns=True)
    full = lambda: lmodel.run_with_cache(long, names_filter=pats)
    t_lazy, t_full = timed(lazy, device, 2), timed(full, device, 1)
    rows.append([f"cache every hook_pattern, 1x{n_long}", f"lazy {t_lazy / t_plain:.2f}x forward, peak {peak_mb(lazy, device)}",
                 f"materialised {t_full / t_plain:.2f}x, peak {peak_mb(full, device)}", "goal lazy ≤ 1.1x forward"])
    del lmodel
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPU check on {name}; GPT-2-small-sized random weights, {L} layers\n")
    print(table(rows, ["check", "lens", "peer / reference", "ratio / note"]))
    return rows


if __name__ == "__main__":
    main()
