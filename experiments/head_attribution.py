"""Direct logit attribution of every head and layer for predicting a repeated identifier.

Reproduces the direct-path decomposition of "A Mathematical Framework for Transformer Circuits"
(Elhage et al., 2021): the final residual stream is a sum of what each head and layer wrote, so
with the final LayerNorm's scale frozen the logit difference between the correct next token and
a wrong one splits exactly into per-head (and per-layer) terms, the attribution that
"Interpretability in the Wild" (Wang et al., 2022) uses to find the heads doing a task.

The task: Python code in which an identifier appeared earlier and must be predicted again
("... total += item\\n    return" → " total", not " item"), the kind of copying induction heads
do. Writes report.md (per-head and per-layer tables, the check that the terms add up to the
model's logit difference) and dla_heads.png / dla_layers.png to --out:

    python experiments/head_attribution.py [--model lens-tiny-attn2l] [--out runs/head_attribution]

It runs on GPT-2 (--model gpt2) when its weights are in the Hugging Face hub cache, and exits
cleanly with a message when they are not.
"""

import argparse
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

import lens
from lens.attribution import direct_logit_attribution, dla_hook_names
from lens.plot import heatmap, lines

# (prompt, correct next token, plausible wrong token): the correct one is an identifier seen earlier
PROMPTS = [
    ("def compute_total(items):\n    total = 0\n    for item in items:\n        total += item\n    return",
     " total", " item"),
    ("def read_lines(path):\n    with open(path) as handle:\n        lines = handle.readlines()\n    return",
     " lines", " handle"),
    ("def count_words(text):\n    words = text.split()\n    count = len(words)\n    return", " count", " words"),
    ("class Node:\n    def __init__(self, value):\n        self.value = value\n\n    def get(self):\n"
     "        return self.", "value", "get"),
    ("def parse(data):\n    buffer = []\n    for line in data:\n        buffer.append(line)\n    return",
     " buffer", " line"),
    ("def area(width, height):\n    size = width * height\n    return", " size", " width"),
    ("def lookup(mapping, key):\n    value = mapping.get(key)\n    if value is None:\n"
     "        raise KeyError(key)\n    return", " value", " key"),
    ("def join(base, name):\n    path = base + '/' + name\n    print(path)\n    return", " path", " name"),
]


def parse_args(argv: Optional[list[str]]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lens-tiny-attn2l")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "checkpoint"],
                    help="dtype to run in (checkpoint: as stored in the model's config)")
    ap.add_argument("--out", type=Path, default=Path("runs/head_attribution"))
    ap.add_argument("--n-prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    return ap.parse_args(argv)


def load(model_name: str, dtype: str):
    """The model, or None (with the reason printed) when its weights are not available here."""
    try:
        kw = {} if dtype == "checkpoint" else {"dtype": getattr(torch, dtype)}
        return lens.HookedGPT.from_pretrained(model_name, **kw).eval()
    except (ValueError, OSError) as e:
        where = ("gpt2 weights are not in the Hugging Face hub cache" if "gpt2" in model_name
                 else f"the weights of {model_name!r} are not available locally")
        print(f"skipping: {where} (download them where there is network, e.g. `hf download "
              f"{model_name}`).\n  reason: {e}")
        return None


def fmt_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:+.3f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def check(ok: bool, text: str) -> str:
    return f"- {text}: {'PASS' if ok else 'FAIL'}"


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    model = load(args.model, args.dtype)
    if model is None:
        return {"skipped": True, "model": args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    prompts = PROMPTS[:args.n_prompts]
    texts = [p for p, _, _ in prompts]
    answers = [model.to_single_token(a) for _, a, _ in prompts]
    wrongs = [model.to_single_token(w) for _, _, w in prompts]
    for (text, a, _), ans in zip(prompts, answers):  # the answer must be the next token as written
        full, alone = model.to_tokens(text + a)[0], model.to_tokens(text)[0]
        if full[-1] != ans or not torch.equal(full[:-1], alone):
            raise ValueError(f"{a!r} is not the next token of {text!r} as tokenised")
    tokens, mask = model.to_tokens_with_mask(texts)
    pos = mask.sum(-1) - 1  # the last real token of each (right-padded) prompt
    names = sorted(set(dla_hook_names(model, "head") + dla_hook_names(model, "layer")))
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    rows = torch.arange(len(prompts), device=logits.device)
    final = logits[rows, pos].float()
    logit_diff: Float[Tensor, "batch"] = (final[rows, torch.tensor(answers)] - final[rows, torch.tensor(wrongs)]).cpu()

    per_head = direct_logit_attribution(model, cache, answers, wrongs, per="head", pos=pos)
    per_layer = direct_logit_attribution(model, cache, answers, wrongs, per="layer", pos=pos)
    head_sum = (per_head.values.sum(0) + per_head.constant).float().cpu()
    layer_sum = (per_layer.values.sum(0) + per_layer.constant).float().cpu()
    err = max(float((head_sum - logit_diff).abs().max()), float((layer_sum - logit_diff).abs().max()))
    # the model's own logits are rounded to its dtype; the attribution adds up in float32
    tol = max(1e-3, 8 * torch.finfo(model.cfg.dtype).eps * float(final.abs().max()))

    head_mean = per_head.mean().float().cpu()
    grid = head_mean[:-1].reshape(L, H)  # the last entry is the remainder (embeddings, b_O)
    heatmap(grid, [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)],
            title="direct logit attribution per head (correct − wrong)", xlabel="head", ylabel="layer",
            path=args.out / "dla_heads.png")
    layer_mean = per_layer.mean().float().cpu()
    lines({"mean over prompts": layer_mean}, x=per_layer.labels, title="direct logit attribution per layer",
          xlabel="component", ylabel="logit difference", path=args.out / "dla_layers.png")
    top = per_head.top(5)
    top_layer, top_h = divmod(int(grid.flatten().argmax()), H)
    top_head = f"L{top_layer}H{top_h}"

    report = [f"# Direct logit attribution in {args.model}",
              "Reproduces the direct-path decomposition of *A Mathematical Framework for Transformer "
              "Circuits* (Elhage et al. 2021): the logit difference correct − wrong at the last token, "
              f"split into what each head and layer wrote (final LayerNorm scale frozen), over "
              f"{len(prompts)} code prompts that must repeat an earlier identifier.",
              "## Prompts",
              fmt_table(["#", "prompt (end)", "correct", "wrong", "logit diff", "Σ head terms"],
                        [[i, "`" + repr(t[-40:]) + "`", repr(a), repr(w), float(logit_diff[i]),
                          float(head_sum[i])] for i, (t, a, w) in enumerate(prompts)]),
              "## Per-head attribution",
              "Mean over prompts; rows are layers, columns heads. The remainder holds the "
              "embeddings, the MLPs (if any) and the attention output biases.",
              fmt_table(["layer"] + [f"H{h}" for h in range(H)],
                        [[f"L{l}"] + [float(v) for v in grid[l]] for l in range(L)]),
              f"remainder {float(head_mean[-1]):+.3f}; constant (b_U difference + final LN bias) "
              f"{float(per_head.constant.mean()):+.3f}. Largest: "
              + ", ".join(f"{k} {v:+.3f}" for k, v in top) + ".",
              "![per-head attribution](dla_heads.png)",
              "## Per-layer attribution",
              fmt_table(["component", "mean attribution"],
                        [[k, float(v)] for k, v in zip(per_layer.labels, layer_mean)]
                        + [["constant", float(per_layer.constant.mean())],
                           ["total", float(layer_sum.mean())], ["model logit diff", float(logit_diff.mean())]]),
              "![per-layer attribution](dla_layers.png)"]
    checks = {"sums_to_logit_diff": err <= tol,
              "prefers_correct": float(logit_diff.mean()) > 0,
              "top_head_composed": top_layer >= 1}
    summary = [
        check(checks["sums_to_logit_diff"], f"per-head and per-layer attributions sum to the logit "
              f"difference (max error {err:.2e} ≤ {tol:.1e})"),
        check(checks["prefers_correct"], f"mean logit difference {float(logit_diff.mean()):+.2f} > 0 "
              f"(the model predicts the repeated identifier; {int((logit_diff > 0).sum())}/{len(prompts)} prompts)"),
        check(checks["top_head_composed"], f"the head pushing hardest toward the correct token, {top_head} "
              f"({float(grid[top_layer, top_h]):+.3f}), is in layer ≥ 1 (copying an earlier identifier needs a composed head)"),
    ]
    text = "\n\n".join(report + ["## Summary"]) + "\n" + "\n".join(summary) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    return {
        "logit_diff": logit_diff.tolist(), "head_sum": head_sum.tolist(), "layer_sum": layer_sum.tolist(),
        "per_head": grid.tolist(), "remainder": float(head_mean[-1]), "per_layer": dict(zip(per_layer.labels, layer_mean.tolist())),
        "constant": float(per_head.constant.mean()), "max_error": err, "tolerance": tol, "top_head": top_head,
        "checks": checks, "report": str(args.out / "report.md"),
    }


if __name__ == "__main__":
    main()
