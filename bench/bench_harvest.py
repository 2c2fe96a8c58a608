"""lens.harvest on CPU: throughput against plain forward passes over the same batches, peak
memory (VmHWM, one subprocess per dataset size) to show it does not grow with the dataset, and
SAE features written sparsely against the dense hook point they read (and against the dense
features, written through a splice).

    python bench/bench_harvest.py [--tokens 16384] [--mem-tokens 8192] [--threads 1] [--features-only]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table, timeit  # noqa: E402

import lens  # noqa: E402
from lens.harvest import harvest  # noqa: E402

CFG = dict(n_layers=4, d_model=256, n_heads=4, d_vocab=8192, n_ctx=128, act_fn="gelu_new")
HOOKS = ["blocks.1.mlp.hook_post", "blocks.3.hook_resid_post"]
SEQ, BATCH, SHARD = 128, 16, 2048


def model() -> lens.HookedGPT:
    torch.manual_seed(0)
    return lens.HookedGPT(lens.GPTConfig(**CFG)).eval()


def tokens_file(folder: Path, n_tokens: int) -> Path:
    path = folder / f"tokens-{n_tokens}.npy"
    g = np.random.default_rng(0)
    np.save(path, g.integers(0, CFG["d_vocab"], (n_tokens // SEQ, SEQ), dtype=np.int32))
    return path


def vm(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in MiB."""
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) // 1024


def child(path: str, threads: int) -> None:
    """Run in a fresh process: harvest `path` and print the peak resident memory."""
    torch.set_num_threads(threads)
    m = model()
    with torch.no_grad():  # warm up, so that the baseline holds the allocator's pools
        m.run_with_cache(torch.zeros(BATCH, SEQ, dtype=torch.long), names_filter=HOOKS, stop_at_layer="auto")
    base = vm("VmHWM")
    with tempfile.TemporaryDirectory() as out:
        harvest(m, path, HOOKS, out, batch_size=BATCH, shard_tokens=SHARD, progress=False)
    print(base, vm("VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the writer thread runs beside them)")
    p.add_argument("--mem-tokens", type=int, default=8192, help="smallest size in the memory table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--features-only", action="store_true", help="only the SAE features table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.threads)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    try:
        m, path = model(), tokens_file(tmp, args.tokens)
        if args.features_only:
            return features(m, path, tmp, args)
        data = torch.from_numpy(np.load(path)).long()
        last = 1 + max(int(h.split(".")[1]) for h in HOOKS)

        @torch.no_grad()
        def forward(stop=None):
            for s in range(0, len(data), BATCH):
                m(data[s:s + BATCH], stop_at_layer=stop)

        def run_harvest():
            shutil.rmtree(tmp / "out", ignore_errors=True)
            harvest(m, path, HOOKS, tmp / "out", batch_size=BATCH, shard_tokens=SHARD, progress=False)

        t = timeit({"forward (logits)": forward, f"forward (stop_at_layer={last})": lambda: forward(last),
                    "harvest": run_harvest}, repeats=args.repeats, warmup=1)
        stopped = t[f"forward (stop_at_layer={last})"]
        rows = [[k, f"{args.tokens / v:,.0f}", f"{v:.2f}", f"{stopped / v:.2f}x"] for k, v in t.items()]
        mb = sum(p.stat().st_size for p in (tmp / "out").glob("shard-*")) / 2**20
        print(f"model {CFG}, hooks {HOOKS}\n{args.tokens} tokens, batch {BATCH}x{SEQ}, shards of "
              f"{SHARD} tokens, {mb:.0f} MiB written, {args.threads} torch thread(s)\n")
        print(table(rows, ["run", "tokens/s", "seconds", "vs stopped forward"]))

        rows = []
        for n in (args.mem_tokens, 4 * args.mem_tokens, 16 * args.mem_tokens):
            f = tokens_file(tmp, n)
            out = subprocess.run([sys.executable, __file__, "--child", str(f), "--threads",
                                  str(args.threads)], capture_output=True, text=True, check=True)
            base, peak = map(int, out.stdout.split()[-2:])
            act = n * sum(4 * (4 * CFG["d_model"] if "mlp" in h else CFG["d_model"]) for h in HOOKS)
            rows.append([n, f"{act / 2**20:.0f}", base, peak, peak - base])
        print("\npeak memory (VmHWM, MiB; one process per size):\n")
        print(table(rows, ["tokens", "activations MiB", "before harvest", "peak", "harvest's extra"]))
        features(m, path, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def features(m, path: Path, tmp: Path, args) -> None:
    """Sparse SAE features (TopK, 16x expansion) against the dense hook point they read."""
    from lens.sae import SAE, saes
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(1)
    sae = SAE(CFG["d_model"], 16 * CFG["d_model"], hook, activation="topk", k=32)
    with torch.no_grad():
        for q in sae.parameters():
            q.normal_(0, 0.05)
    kw = dict(batch_size=BATCH, shard_tokens=SHARD, progress=False)

    def run(name, **extra):
        shutil.rmtree(tmp / name, ignore_errors=True)
        harvest(m, path, extra.pop("hooks", []), tmp / name, **kw, **extra)

    def dense_features():
        with saes(m, sae, use_error_term=True):
            run("dense_features", hooks=[hook + ".hook_sae_acts_post"])

    data = torch.from_numpy(np.load(path)).long()

    @torch.no_grad()
    def forward_and_encode():  # the arithmetic a sparse harvest cannot avoid, nothing written
        for s in range(0, len(data), BATCH):
            _, cache = m.run_with_cache(data[s:s + BATCH], names_filter=[hook], stop_at_layer="auto")
            sae._encode(cache[hook].reshape(-1, CFG["d_model"]), hooked=False, sparse=True)

    t = timeit({"dense hook point": lambda: run("dense", hooks=[hook]),
                "(no harvest: the forward and the SAE's encode)": forward_and_encode,
                "sparse features (top_k=16)": lambda: run("sparse", saes=sae, top_k=16),
                "dense features (spliced)": dense_features}, repeats=args.repeats, warmup=1)
    ref = t["dense hook point"]
    size = {"dense hook point": "dense", "sparse features (top_k=16)": "sparse",
            "dense features (spliced)": "dense_features"}
    written = lambda k: (f"{sum(p.stat().st_size for p in (tmp / size[k]).glob('shard-*')) / 2**20:.1f}"  # noqa: E731
                         if k in size else "")
    rows = [[k, f"{args.tokens / v:,.0f}", f"{v:.2f}", f"{ref / v:.2f}x", written(k)] for k, v in t.items()]
    print(f"\nSAE features: TopK k=32, {sae.d_sae} features at {hook}, {args.tokens} tokens\n")
    print(table(rows, ["harvest of", "tokens/s", "seconds", "throughput vs dense hook point", "MiB written"]))


if __name__ == "__main__":
    main()
