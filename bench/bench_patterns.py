"""Caching every layer's attention pattern at long context: run_with_cache(names_filter=
hook_pattern of every layer) on a GPT-2-small-sized random model with n_ctx raised, 1 × 4096
tokens: lens with lazy patterns (queries and keys kept, rows computed when read) vs lens
materialised vs TransformerLens (a TL-native TransformerBridge with the same weights), and a
plain lens forward as the time reference. Each mode runs in a child process of its own so that
its peak resident memory (sampled, above what it held before the call) is its own. A read of one head's last
query row from the lazy cache is checked against the materialised one.

    python bench/bench_patterns.py                 # 1 x 4096, 12 layers
    python bench/bench_patterns.py --pos 2048      # shorter, when time or memory is short
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_small_sized, table  # noqa: E402

PATTERNS = lambda n: n.endswith("hook_pattern")  # noqa: E731
MODES = ["forward", "lazy", "materialised", "transformerlens"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """The highest resident memory above the start, sampled every 2 ms while the block runs."""

    def __enter__(self):
        self.base = self.peak = _rss_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_mib())
        self.mib = self.peak - self.base


def child(mode: str, pos: int, layers: int) -> dict:
    torch.set_grad_enabled(False)
    model = gpt2_small_sized(n_layers=layers, n_ctx=pos)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, pos), generator=torch.Generator().manual_seed(0))
    if mode == "transformerlens":
        from bench_patching import tl_bridge
        peer = tl_bridge(model)
        del model
        run = lambda: peer.run_with_cache(tokens, names_filter=PATTERNS)  # noqa: E731
        warm = lambda: peer(tokens[:, :8])  # noqa: E731
    else:
        run = {"forward": lambda: (model(tokens), None),
               "lazy": lambda: model.run_with_cache(tokens, names_filter=PATTERNS, lazy_patterns=True),
               "materialised": lambda: model.run_with_cache(tokens, names_filter=PATTERNS)}[mode]
        warm = lambda: model(tokens[:, :8])  # noqa: E731
    warm()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
    peak = mem.mib
    row, cache_mib = None, 0.0
    if out[1] is not None:
        cache = out[1]
        held = [t for v in cache.values() for t in ((v.q, v.k) if hasattr(v, "q") else (v,))]
        cache_mib = sum(t.numel() * t.element_size() for t in held) / 2 ** 20
        key = "blocks.5.attn.hook_pattern" if layers > 5 else f"blocks.{layers - 1}.attn.hook_pattern"
        row = cache[key][0, 3, -1].float()[-16:].tolist()  # a row read: lazy computes just it
    return dict(seconds=seconds, peak_mib=peak, cache_mib=cache_mib, row=row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pos", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.pos, args.layers)))
        return
    results = {}
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--pos", str(args.pos),
                              "--layers", str(args.layers)], capture_output=True, text=True)
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    fwd = results.get("forward", {}).get("seconds")
    rows = []
    for mode, r in results.items():
        rows.append([mode, f"{r['seconds']:.2f}", f"{r['seconds'] / fwd:.2f}" if fwd else "-",
                     f"{r['peak_mib']:.0f}", f"{r['cache_mib']:.0f}"])
    print(f"run_with_cache(every hook_pattern), 1 x {args.pos} tokens, {args.layers} layers, "
          f"d_model 768, float32, {torch.get_num_threads()} threads")
    print(table(rows, ["mode", "seconds", "time / forward", "peak MiB during the call", "MiB cached"]))
    if "lazy" in results and "transformerlens" in results:
        tl, lz = results["transformerlens"], results["lazy"]
        print(f"memory, TransformerLens / lens lazy: cached {tl['cache_mib'] / max(lz['cache_mib'], 1e-9):.1f}x, "
              f"peak of the call {tl['peak_mib'] / max(lz['peak_mib'], 1):.1f}x (the logits, "
              f"{args.pos * 50257 * 4 / 2 ** 20:.0f} MiB, are in both peaks)")
    if "lazy" in results and "materialised" in results:
        a, b = torch.tensor(results["lazy"]["row"]), torch.tensor(results["materialised"]["row"])
        print(f"max |lazy - materialised| on a read row: {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
