"""Greedy generation with the KV cache, tokens per second: lens generate vs HF transformers'
generate on the same GPT-2-small-sized random checkpoint, batch 1 and batch 8.

    python bench/bench_generate.py                  # CPU; --device cuda on a GPU
    python bench/bench_generate.py --threads 1      # on a busy machine
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table, timeit  # noqa: E402

import lens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = lens.HookedGPT.from_pretrained_no_processing(tmp, device=args.device)
    hf = hf.to(args.device)
    hf.generation_config.eos_token_id = None  # both run exactly --new steps

    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, 50257, (batch, args.prompt), generator=g).to(args.device)
        mask = torch.ones_like(tokens)

        def run_lens():
            return model.generate(tokens, args.new, temperature=0, stop_at_eos=False)

        def run_hf():
            with torch.no_grad():
                return hf.generate(tokens, attention_mask=mask, max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, pad_token_id=0)

        same = torch.equal(run_lens(), run_hf())
        t = timeit({"lens": run_lens, "hf": run_hf}, repeats=args.repeats, warmup=1)
        tps = {k: batch * args.new / v for k, v in t.items()}
        rows.append([batch, f"{tps['lens']:.1f}", f"{tps['hf']:.1f}",
                     f"{tps['lens'] / tps['hf']:.2f}x", "yes" if same else "NO"])
    print(f"greedy, KV cache, {args.prompt}-token prompt, {args.new} new tokens, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows, ["batch", "lens tok/s", "HF tok/s", "lens / HF", "same tokens"]))


if __name__ == "__main__":
    main()
