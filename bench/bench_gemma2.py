"""lens against HF transformers on the same Gemma-2-shaped random checkpoint, in one process
(8 layers, 1024 wide, 8 query / 4 key-value heads of 128, GeGLU 4096, float32; vocab 32000
rather than Gemma's 256k, which would make the unembedding dominate; Gemma-2's alternating
local (sliding window 64) / global layers, query_pre_attn_scalar 128, attention logits
soft-capped at 50 and final logits at 30; norm weights randomised; written by
Gemma2ForCausalLM.save_pretrained to a temporary folder):

1. forward with no hooks, logits of every position: lens as lens.loading.from_pretrained
   loads it (processed: norm weights folded) and with process=False (no_processing, as
   HookedGPT.from_pretrained_no_processing loads it), vs HF Gemma2ForCausalLM, with the
   max |Δ log-prob| of each lens model against HF;
2. run_with_cache of every blocks.{l}.hook_resid_post, relative to the same lens model's forward.

HF's attention implementations are tried first: "eager" materialises the soft-capped scores;
"sdpa" cannot soft-cap, and transformers refuses it for Gemma-2 (Gemma2PreTrainedModel has
_supports_sdpa = False, so from_pretrained raises; forced onto a loaded model,
sdpa_attention_forward raises on softcap). The fastest one that runs and matches eager's
logits is the denominator. Timings are medians of interleaved repeats.

    python bench/bench_gemma2.py [--layers 8] [--repeats 3] [--pos 256] [--threads N]
    python bench/bench_gemma2.py --threads 1      # on a busy machine
"""

import argparse
import os
import shutil
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

GEMMA2_SMALL = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                    intermediate_size=4096, vocab_size=32000, max_position_embeddings=1024,
                    sliding_window=64, query_pre_attn_scalar=128, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0)
RESID_POST = lambda name: name.endswith("hook_resid_post")  # noqa: E731


def make_checkpoint(folder: str, n_layers: int) -> None:
    """A random Gemma-2 checkpoint in `folder`, its (1 + w) norm weights w ~ N(0, 0.3²)
    (HF initialises w to 0)."""
    import transformers
    from transformers import Gemma2Config, Gemma2ForCausalLM
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=n_layers, dtype="float32", **GEMMA2_SMALL)
    model = Gemma2ForCausalLM(cfg).to(torch.float32)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)


def max_logprob_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


def hf_models(folder: str, tokens: torch.Tensor):
    """{implementation: model} of the HF implementations that run and match eager, and a
    line per implementation saying what happened."""
    from transformers import Gemma2ForCausalLM
    load = lambda impl: Gemma2ForCausalLM.from_pretrained(  # noqa: E731
        folder, attn_implementation=impl, dtype=torch.float32).eval()
    eager = load("eager")
    ref = eager(tokens).logits
    models, notes = {"eager": eager}, ["eager: runs (materialised, soft-capped scores)"]
    try:
        sdpa = load("sdpa")
    except Exception as e:  # transformers refuses sdpa for Gemma-2
        note = f"sdpa: from_pretrained raises {type(e).__name__}: {str(e).split('. ')[0]}"
        sdpa = load("eager")
        sdpa.config._attn_implementation = "sdpa"  # forced, past the check
        try:
            sdpa(tokens)
            note += "; forced onto a loaded model it runs"
        except Exception as e:
            notes.append(note + f"; forced onto a loaded model, the forward raises "
                                f"{type(e).__name__}: {str(e).split('. ')[0]}")
            return models, notes
        notes.append(note)
    err = max_logprob_err(sdpa(tokens).logits, ref)
    if err < 1e-4:
        models["sdpa"] = sdpa
        notes.append(f"sdpa: runs, max |Δ log-prob| vs eager {err:.1e}")
    else:
        notes.append(f"sdpa: runs but gives other logits (max |Δ log-prob| vs eager {err:.1e}): not used")
    return models, notes


def speed_tables(folder: str, args) -> str:
    import transformers

    from lens.loading import from_pretrained
    transformers.utils.logging.disable_progress_bar()
    processed = from_pretrained(folder).eval()
    plain = from_pretrained(folder, process=False).eval()
    V = processed.cfg.d_vocab
    probe = torch.randint(0, V, (1, args.pos), generator=torch.Generator().manual_seed(0))
    hfs, notes = hf_models(folder, probe)

    fwd_rows, cache_rows, hf_used = [], [], set()
    for batch in (1, 4):
        tokens = torch.randint(0, V, (batch, args.pos), generator=torch.Generator().manual_seed(batch))
        ref = hfs["eager"](tokens).logits
        errs = {"processed": max_logprob_err(processed(tokens), ref), "plain": max_logprob_err(plain(tokens), ref)}
        del ref
        fns = {"processed": lambda: processed(tokens), "plain": lambda: plain(tokens)}
        fns.update({f"hf {k}": (lambda m=m: m(tokens)) for k, m in hfs.items()})
        fns["cache processed"] = lambda: processed.run_with_cache(tokens, names_filter=RESID_POST)
        fns["cache plain"] = lambda: plain.run_with_cache(tokens, names_filter=RESID_POST)
        t = timeit(fns, repeats=args.repeats, warmup=1)
        hf_name = min((k for k in t if k.startswith("hf ")), key=t.get)
        hf_used.add(hf_name[3:])
        size = f"{batch}x{args.pos}"
        for key, label in [("processed", "processed"), ("plain", "no_processing")]:
            ratio = t[key] / t[hf_name]
            fwd_rows.append([size, label, f"{t[key] * 1e3:.0f}", f"{t[hf_name] * 1e3:.0f} ({hf_name[3:]})",
                             f"{ratio:.3f}", "≤ 1.00", "yes" if ratio <= 1.0 else "NO", f"{errs[key]:.1e}"])
            cached = (processed if key == "processed" else plain).run_with_cache(tokens, names_filter=RESID_POST)[1]
            ratio = t[f"cache {key}"] / t[key]
            cache_rows.append([size, label, f"resid_post of every layer ({len(cached)} tensors)",
                               f"{t[f'cache {key}'] * 1e3:.0f}", f"{t[key] * 1e3:.0f}", f"{ratio:.3f}",
                               "≤ 1.05", "yes" if ratio <= 1.05 else "NO"])
            del cached

    return "\n".join([
        "HF attention implementations (attn_logit_softcapping = 50):",
        *[f"  {n}" for n in notes],
        f"  denominator: HF {', '.join(sorted(hf_used))} (the fastest that matches eager)",
        "",
        "Forward, no hooks, eval, no_grad (goal: lens/HF ≤ 1.00)",
        table(fwd_rows, ["batch x pos", "lens model", "lens ms", "HF ms", "lens/HF", "goal", "met",
                         "max |Δ log-prob| vs HF"]),
        "",
        "run_with_cache, names_filter = every hook_resid_post (goal: ≤ 1.05× the same model's forward)",
        table(cache_rows, ["batch x pos", "lens model", "what is cached", "cache ms", "forward ms",
                           "cache/forward", "goal", "met"]),
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="forward / run_with_cache repeats")
    ap.add_argument("--pos", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    folder = tempfile.mkdtemp()
    try:
        make_checkpoint(folder, args.layers)
        speed = speed_tables(folder, args)
        print(f"Gemma-2-shaped random weights ({args.layers} layers, 1024 wide, 8 query / 4 kv heads of 128, "
              f"GeGLU 4096, vocab 32000, window 64 on alternate layers, soft-caps 50 / 30, float32), CPU, "
              f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
        print(speed)
        print(f"\n({time.perf_counter() - start:.0f} s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
