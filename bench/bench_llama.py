"""lens against HF transformers on the same Llama-shaped random checkpoint, in one process
(GPT-2-small-sized: 12 layers, 768 wide, 12 query / 4 key-value heads of 64, SwiGLU 2048,
vocab 32000, float32, written by LlamaForCausalLM.save_pretrained to a temporary folder):

1. forward with no hooks, logits of every position: lens as from_pretrained loads it
   (processed: RMSNorm weights folded, unembedding centred) and as
   from_pretrained_no_processing loads it, vs HF LlamaForCausalLM (attn_implementation="sdpa");
2. run_with_cache of every blocks.{l}.hook_resid_post, relative to the same model's forward;
3. greedy generation with the KV cache, tokens per second, lens generate vs HF generate
   (same prompt, same number of new tokens, and whether both produce the same tokens);
4. load time and peak memory of lens.from_pretrained(_no_processing) and HF
   AutoModelForCausalLM.from_pretrained, each in a fresh subprocess: peak RSS (VmHWM) above
   the RSS of the bare runtime (after `import torch, lens`, or torch + transformers' Llama
   code, in that subprocess), over the bytes of the checkpoint's safetensors files; for the
   untied checkpoint and for one with tie_word_embeddings=True.

GPT-2 itself is covered by bench_peers.py. Timings are medians of interleaved repeats.

    python bench/bench_llama.py [--layers 12] [--repeats 5] [--gen-repeats 3] [--new 32]
                                [--prompt 16] [--threads N] [--skip-load] [--skip-speed]
    python bench/bench_llama.py --threads 1      # on a busy machine
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table, timeit  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

LLAMA_SMALL = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                   intermediate_size=2048, vocab_size=32000, max_position_embeddings=1024)
RESID_POST = lambda name: name.endswith("hook_resid_post")  # noqa: E731


def make_checkpoint(folder: str, n_layers: int, tied: bool = False) -> int:
    """A random Llama checkpoint in `folder`; returns the bytes of its safetensors files."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=n_layers, tie_word_embeddings=tied, dtype="float32", **LLAMA_SMALL)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(folder)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors"))


LOAD_SNIPPET = """
import sys, time
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
import torch
if sys.argv[1] == "lens":
    import lens
else:
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # the model code, loaded
base = status("VmRSS:")
t0 = time.perf_counter()
if sys.argv[1] == "lens":
    m = lens.HookedGPT.from_pretrained(sys.argv[2], process=sys.argv[3] == "1")
else:
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
seconds, loaded = time.perf_counter() - t0, status("VmHWM:")
for p in m.parameters():  # HF maps the file and reads a page only when a weight is used
    p.sum()
print(seconds, base, loaded, status("VmHWM:"))
"""


def load_row(kind: str, folder: str, process: bool = False):
    """(seconds, bare runtime bytes, peak bytes above it: after the load, after every weight is read)."""
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, kind, folder, "1" if process else "0"],
                         capture_output=True, text=True, check=True).stdout.split()
    t_, base, loaded, used = float(out[-4]), int(out[-3]), int(out[-2]), int(out[-1])
    return t_, base, loaded - base, used - base


def load_table(checkpoints: list) -> str:
    rows = []
    mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    for label, folder, nbytes in checkpoints:
        hf = load_row("hf", folder)
        for name, kind, process in [("HF AutoModelForCausalLM", "hf", False),
                                    ("lens no_processing", "lens", False), ("lens processed", "lens", True)]:
            t_, base, loaded, used = hf if kind == "hf" else load_row(kind, folder, process)
            rows.append([label, name, mb(nbytes), f"{t_:.2f}", f"{t_ / hf[0]:.2f}", mb(base), mb(loaded),
                         f"{loaded / nbytes:.2f}", mb(used), f"{used / nbytes:.2f}", f"{used / hf[3]:.2f}"])
    return ("from_pretrained in a fresh process: peak RSS (VmHWM) above the bare runtime, after the load "
            "and after every weight has been read once\n(goal: lens no_processing, untied, ≤ 1.25× "
            "checkpoint bytes; HF maps the file, so its weights become resident only when read)\n"
            + table(rows, ["checkpoint", "loader", "checkpoint MB", "load s", "time / HF", "runtime MB",
                           "peak MB, load", "/ checkpoint", "peak MB, weights read", "/ checkpoint",
                           "/ HF"]))


def max_logprob_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


def speed_tables(folder: str, args) -> str:
    import transformers
    from transformers import LlamaForCausalLM

    import lens
    transformers.utils.logging.disable_progress_bar()
    processed = lens.HookedGPT.from_pretrained(folder).eval()
    plain = lens.HookedGPT.from_pretrained_no_processing(folder).eval()
    hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # both run exactly --new steps
    V = hf.config.vocab_size

    fwd_rows, cache_rows = [], []
    for batch, pos in [(8, 128), (1, 32)]:
        tokens = torch.randint(0, V, (batch, pos), generator=torch.Generator().manual_seed(1))
        ref = hf(tokens).logits
        err_p, err_n = max_logprob_err(processed(tokens), ref), max_logprob_err(plain(tokens), ref)
        fns = {"processed": lambda: processed(tokens), "plain": lambda: plain(tokens), "hf": lambda: hf(tokens)}
        if (batch, pos) == (8, 128):
            fns["cache"] = lambda: processed.run_with_cache(tokens, names_filter=RESID_POST)
        t = timeit(fns, repeats=args.repeats, warmup=1)
        size = f"{batch}x{pos}"
        fwd_rows.append([size, f"{t['processed'] * 1e3:.0f}", f"{t['plain'] * 1e3:.0f}", f"{t['hf'] * 1e3:.0f}",
                         f"{t['processed'] / t['hf']:.3f}", f"{t['plain'] / t['hf']:.3f}",
                         f"{err_p:.1e}", f"{err_n:.1e}"])
        if "cache" in t:
            cached = processed.run_with_cache(tokens, names_filter=RESID_POST)[1]
            cache_rows.append([size, f"resid_post of every layer ({len(cached)} tensors)",
                               f"{t['cache'] * 1e3:.0f}", f"{t['processed'] * 1e3:.0f}",
                               f"{t['cache'] / t['processed']:.3f}", f"{cached.nbytes / 2**20:.0f}"])
            del cached

    gen_rows = []
    for batch in args.batches:
        tokens = torch.randint(0, V, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(tokens)
        n = args.new

        def run_hf():
            return hf.generate(tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        fns = {"plain": lambda: plain.generate(tokens, n, temperature=0, stop_at_eos=False),
               "processed": lambda: processed.generate(tokens, n, temperature=0, stop_at_eos=False),
               "hf": run_hf}
        outs = {k: fn() for k, fn in fns.items()}  # also the warm-up
        t = timeit(fns, repeats=args.gen_repeats, warmup=0)
        tps = {k: batch * n / v for k, v in t.items()}
        for k, label in [("plain", "no_processing"), ("processed", "processed")]:
            gen_rows.append([batch, label, f"{tps[k]:.1f}", f"{tps['hf']:.1f}", f"{tps[k] / tps['hf']:.3f}",
                             "yes" if torch.equal(outs[k], outs["hf"]) else "NO"])

    return "\n".join([
        "Forward, no hooks, eval, no_grad (goal: lens/HF ≤ 1.00)",
        table(fwd_rows, ["batch x pos", "lens processed ms", "lens no_processing ms", "HF sdpa ms",
                         "processed/HF", "no_processing/HF", "max |Δ log-prob| processed",
                         "max |Δ log-prob| no_processing"]),
        "",
        "run_with_cache, names_filter = every hook_resid_post (lens processed; goal: ≤ 1.05× its forward)",
        table(cache_rows, ["batch x pos", "what is cached", "cache ms", "forward ms", "cache/forward", "MB cached"]),
        "",
        f"Greedy generate, KV cache, {args.prompt}-token prompt, {args.new} new tokens "
        f"(goal: lens/HF tok/s ≥ 1.0)",
        table(gen_rows, ["batch", "lens model", "lens tok/s", "HF tok/s", "lens/HF", "same tokens"]),
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5, help="forward / run_with_cache repeats")
    ap.add_argument("--gen-repeats", type=int, default=3, help="generate repeats")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="generate batch sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    untied, tied = tempfile.mkdtemp(), tempfile.mkdtemp()
    try:
        nbytes = make_checkpoint(untied, args.layers)
        loads = None
        if not args.skip_load:  # before this process grows
            checkpoints = [("untied", untied, nbytes)]
            checkpoints.append(("tied", tied, make_checkpoint(tied, args.layers, tied=True)))
            loads = load_table(checkpoints)
        speed = None if args.skip_speed else speed_tables(untied, args)
        print(f"Llama-shaped random weights ({args.layers} layers, 768 wide, 12 query / 4 kv heads of 64, "
              f"SwiGLU 2048, vocab 32000, float32), CPU, {torch.get_num_threads()} threads, median of "
              f"{args.repeats} (generate: {args.gen_repeats})\n")
        if speed:
            print(speed)
        if loads:
            print(("\n" if speed else "") + loads)
        print(f"\n({time.perf_counter() - start:.0f} s)")
    finally:
        shutil.rmtree(untied, ignore_errors=True)
        shutil.rmtree(tied, ignore_errors=True)


if __name__ == "__main__":
    main()
