"""lens against its peers on the same GPT-2-small-sized weights, in one process:

1. forward with no hooks vs HF GPT2LMHeadModel (eager and sdpa);
2. run_with_cache vs TransformerLens (TransformerBridge, compatibility mode) over the same
   hook names (TransformerLens's default set, and resid_post only), and vs nnsight saving
   every block output: time relative to each library's own forward, and bytes held;
3. load time and peak memory of lens.from_pretrained vs HF from_pretrained (subprocesses).

    python bench/bench_peers.py [--layers 12] [--repeats 5] [--skip-load]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table, timeit  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def make_checkpoint(folder: str, n_layers: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from lens.tokenizer import gpt2_data_dir
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layers)).save_pretrained(folder)
    shutil.copy(gpt2_data_dir() / "encoder.json", os.path.join(folder, "vocab.json"))
    shutil.copy(gpt2_data_dir() / "vocab.bpe", os.path.join(folder, "merges.txt"))


def nnsight_cache(nn_model, tokens, n_layers):
    outs = []
    with nn_model.trace(tokens):
        for i in range(n_layers):
            outs.append(nn_model.transformer.h[i].output.save())
    return outs


LOAD_SNIPPET = """
import sys, time, torch
t0 = time.perf_counter()
if sys.argv[1] == "lens":
    import lens
    m = lens.HookedGPT.from_pretrained(sys.argv[2], process=sys.argv[3] == "1")
else:
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(sys.argv[2])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t0, int(hwm) / 1024)
"""


def load_row(kind: str, folder: str, process: bool = False):
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, kind, folder, "1" if process else "0"],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def load_table(folder: str) -> str:
    rows = []
    hf_t, hf_m = load_row("hf", folder)
    for name, process in [("lens (no processing)", False), ("lens (processed)", True)]:
        t_, m_ = load_row("lens", folder, process)
        rows.append([name, f"{t_:.2f}", f"{m_:.0f}", f"{hf_t:.2f}", f"{hf_m:.0f}", f"{t_ / hf_t:.2f}", f"{m_ / hf_m:.2f}"])
    return ("from_pretrained, fresh process (peak RSS, VmHWM, includes the Python + torch runtime)\n"
            + table(rows, ["loader", "lens s", "lens peak MB", "HF s", "HF peak MB", "time ratio", "memory ratio"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    import nnsight
    from transformers import GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    import lens

    torch.set_grad_enabled(False)
    folder = tempfile.mkdtemp()
    make_checkpoint(folder, args.layers)
    loads = None if args.skip_load else load_table(folder)  # before this process grows
    ours = lens.HookedGPT.from_pretrained(folder).eval()
    hf_sdpa = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    hf_eager = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tl = TransformerBridge.boot_transformers(folder, device="cpu")
    tl.enable_compatibility_mode(disable_warnings=True)
    nn_model = nnsight.NNsight(hf_sdpa)
    print(f"GPT-2-small-sized random weights ({args.layers} layers, 768 wide, vocab 50257), CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")

    fwd_rows, cache_rows = [], []
    for batch, pos in [(8, 128), (1, 32)]:
        tokens = torch.randint(0, 50257, (batch, pos), generator=torch.Generator().manual_seed(1))
        err = (ours(tokens).log_softmax(-1) - hf_sdpa(tokens).logits.log_softmax(-1)).abs().max().item()
        tl_names = list(tl.run_with_cache(tokens)[1].keys())
        shared = [n for n in tl_names if n in ours.hook_dict]
        resid = [f"blocks.{l}.hook_resid_post" for l in range(args.layers)]
        t = timeit({
            "lens": lambda: ours(tokens),
            "hf_sdpa": lambda: hf_sdpa(tokens),
            "hf_eager": lambda: hf_eager(tokens),
            "tl": lambda: tl(tokens),
            "lens_cache_shared": lambda: ours.run_with_cache(tokens, names_filter=shared),
            "tl_cache_default": lambda: tl.run_with_cache(tokens),
            "tl_cache_shared": lambda: tl.run_with_cache(tokens, names_filter=shared),
            "lens_cache_resid": lambda: ours.run_with_cache(tokens, names_filter=resid),
            "tl_cache_resid": lambda: tl.run_with_cache(tokens, names_filter=resid),
            "nnsight_blocks": lambda: nnsight_cache(nn_model, tokens, args.layers),
        }, repeats=args.repeats, warmup=1)
        size = f"{batch}x{pos}"
        fwd_rows.append([size, f"{t['lens'] * 1e3:.0f}", f"{t['hf_sdpa'] * 1e3:.0f}", f"{t['hf_eager'] * 1e3:.0f}",
                         f"{t['lens'] / t['hf_sdpa']:.3f}", f"{t['lens'] / t['hf_eager']:.3f}", f"{err:.1e}"])
        lens_b = ours.run_with_cache(tokens, names_filter=shared)[1].nbytes
        tl_b = unique_bytes(tl.run_with_cache(tokens)[1].values())
        tl_sb = unique_bytes(tl.run_with_cache(tokens, names_filter=shared)[1].values())
        lens_rb = ours.run_with_cache(tokens, names_filter=resid)[1].nbytes
        tl_rb = unique_bytes(tl.run_with_cache(tokens, names_filter=resid)[1].values())
        nn_b = unique_bytes(nnsight_cache(nn_model, tokens, args.layers))
        mb = lambda b: f"{b / 2**20:.0f}"
        cache_rows += [
            [size, f"TL default set ({len(tl_names)} TL names; lens caches the {len(shared)} it has)",
             f"{t['lens_cache_shared'] / t['lens']:.2f}", f"{t['tl_cache_default'] / t['tl']:.2f}",
             f"{t['lens_cache_shared'] / t['tl_cache_default']:.2f}", mb(lens_b), mb(tl_b), f"{lens_b / tl_b:.2f}"],
            [size, f"the {len(shared)} names both have", f"{t['lens_cache_shared'] / t['lens']:.2f}",
             f"{t['tl_cache_shared'] / t['tl']:.2f}", f"{t['lens_cache_shared'] / t['tl_cache_shared']:.2f}",
             mb(lens_b), mb(tl_sb), f"{lens_b / tl_sb:.2f}"],
            [size, "resid_post of every layer", f"{t['lens_cache_resid'] / t['lens']:.2f}",
             f"{t['tl_cache_resid'] / t['tl']:.2f}", f"{t['lens_cache_resid'] / t['tl_cache_resid']:.2f}",
             mb(lens_rb), mb(tl_rb), f"{lens_rb / tl_rb:.2f}"],
            [size, "nnsight: every block output (vs its HF forward)", f"{t['lens_cache_resid'] / t['lens']:.2f}",
             f"{t['nnsight_blocks'] / t['hf_sdpa']:.2f}", f"{t['lens_cache_resid'] / t['nnsight_blocks']:.2f}",
             mb(lens_rb), mb(nn_b), f"{lens_rb / nn_b:.2f}"],
        ]
    print("Forward, no hooks (goal: lens/HF sdpa ≤ 1.00)")
    print(table(fwd_rows, ["batch x pos", "lens ms", "HF sdpa ms", "HF eager ms", "lens/HF sdpa",
                           "lens/HF eager", "max |Δ log-prob|"]))
    print("\nrun_with_cache (goal: lens ≤ 1.2× its forward, ≤ 0.75× peer time, ≤ 0.8× peer bytes)")
    print(table(cache_rows, ["batch x pos", "what is cached", "lens cache/fwd", "peer cache/fwd",
                             "lens/peer time", "lens MB", "peer MB", "lens/peer bytes"]))
    if loads:
        print("\n" + loads)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
