"""Induction heads in a two-layer attention-only transformer.

Reproduces the induction-head results of "A Mathematical Framework for Transformer Circuits"
(Elhage et al., 2021) on lens's bundled 2-layer attention-only model (lens-tiny-attn2l):

  (a) on a random token sequence repeated twice, the loss on the second repeat is much lower
      than on the first (the model copies what followed the previous occurrence);
  (b) a layer-0 head attends to the previous token and a layer-1 head is an induction head
      (it attends to the token after the previous occurrence of the current token); for the
      top two, how that attention varies with where the target sits in the context;
  (c) the induction head's keys read the previous-token head's output: its K-composition with
      that head is well above the score of random matrices of the same shapes;
  (d) zero- or mean-ablating the induction heads destroys the second repeat's advantage;
  (e) the induction head's OV circuit copies: its copying score Σλ / Σ|λ| is positive.

Each finding is checked and reported as PASS or FAIL in report.md (with PNG plots) under --out:

    python experiments/induction_heads.py [--model lens-tiny-attn2l] [--out runs/induction]
                                          [--seq-len 100] [--batch 8] [--seed 0]
"""

import argparse
import math
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

import lens
from lens import ablation, circuits
from lens.plot import lines

Head = tuple[int, int]


def predictable_ids(model, top: Optional[int] = None) -> Int[Tensor, "n"]:
    """Token ids to draw random sequences from: those the model was trained to predict.

    The bundled models give out-of-corpus ids a far lower unembedding bias than the rest (a gap
    of ~20 nats in sorted b_U); when such a gap exists the ids above it are kept, otherwise
    (e.g. GPT-2) the common ids below 20000. With `top`, only the `top` ids of highest
    unembedding bias among those (the unigram prior: the most frequent tokens). The BOS id is
    never drawn."""
    b = model.b_U.detach().float().cpu()
    values, order = b.sort()
    gaps = values[1:] - values[:-1]
    i = int(gaps.argmax()) if len(gaps) else 0
    if len(gaps) and gaps[i] > 10.0 and i + 1 >= 0.05 * len(b):
        ids = order[i + 1:].sort().values
    else:
        ids = torch.arange(min(20000, model.cfg.d_vocab))
    ids = ids[ids != bos_id(model)]
    if top is not None and top < len(ids):
        ids = ids[b[ids].argsort(descending=True)[:top]].sort().values
    return ids


def bos_id(model) -> int:
    """The tokenizer's BOS id when it is in the model's vocabulary, else 0."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    return bos if bos is not None and 0 <= bos < model.cfg.d_vocab else 0


def repeated_random_tokens(model, seq_len: int, batch: int, seed: int,
                           top: Optional[int] = None) -> Int[Tensor, "batch pos"]:
    """BOS, then `seq_len` random predictable tokens, then the same tokens again: 1 + 2·seq_len."""
    if not 2 <= seq_len <= (model.cfg.n_ctx - 1) // 2:
        raise ValueError(f"--seq-len {seq_len}: BOS + 2 × seq_len must fit n_ctx={model.cfg.n_ctx}")
    ids = predictable_ids(model, top)
    g = torch.Generator().manual_seed(seed)
    half = ids[torch.randint(0, len(ids), (batch, seq_len), generator=g)]
    bos = torch.full((batch, 1), bos_id(model), dtype=torch.long)
    return torch.cat([bos, half, half], dim=1).to(model.W_E.device)


def induction_target(seq_len: int) -> Float[Tensor, "pos pos"]:
    """circuits.induction_pattern shifted by the BOS: query p in the second repeat attends to
    key p − seq_len + 1, the token after the previous occurrence of its own token."""
    target = torch.zeros(2 * seq_len + 1, 2 * seq_len + 1)
    target[1:, 1:] = circuits.induction_pattern(seq_len)
    return target


def loss_per_position(model, tokens: Int[Tensor, "batch pos"], hooks=(), chunk: int = 8,
                      desc: str = "loss") -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token loss at every position (nll[:, i] is the loss on token i + 1), under `hooks`."""
    out = []
    with model.hooks(fwd_hooks=list(hooks)):
        for part in tqdm(tokens.split(chunk), desc=desc, leave=False):
            out.append(model(part, return_type="loss", loss_per_token=True).float().cpu())
    return torch.cat(out)


def halves(nll: Tensor, seq_len: int) -> tuple[float, float]:
    """Mean loss over the first and the second repeat, leaving out each repeat's first token
    (neither can be predicted from earlier in the sequence)."""
    return float(nll[:, 1:seq_len].mean()), float(nll[:, seq_len + 1:2 * seq_len].mean())


def patterns(model, tokens: Int[Tensor, "batch pos"]) -> list[Float[Tensor, "batch head query key"]]:
    """Every layer's attention pattern on `tokens`, one forward pass."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache["pattern", layer].float().cpu() for layer in range(model.cfg.n_layers)]


def top_key_offsets(pattern: list[Tensor], seq_len: int) -> Int[Tensor, "n_layers n_heads"]:
    """Where each head looks from the second repeat: the most common (top key − query) over its
    queries there. -1 is a previous-token head, -(seq_len - 1) an induction head (the token after
    the previous occurrence), -seq_len a duplicate-token head (the previous occurrence itself)."""
    queries = torch.arange(seq_len + 2, 2 * seq_len + 1)
    out = []
    for p in pattern:
        top = p[:, :, queries].argmax(-1)  # [batch, head, query]
        out.append((top - queries).transpose(0, 1).flatten(1).mode(-1).values)
    return torch.stack(out)


def attention_by_key(pattern: Float[Tensor, "batch query key"],
                     target: Float[Tensor, "pos pos"]) -> Float[Tensor, "pos"]:
    """Where in the context a head does its job: the head's attention `pattern` (mean over the
    batch) from each query that `target` marks to its marked key, indexed by that key's position;
    NaN at keys no query targets. A previous-token head that works only early in the context
    shows here as a curve that falls to zero, while its score (the mean) only looks weak."""
    target = target.cpu()
    queries = (target.sum(-1) > 0).nonzero().squeeze(-1)
    keys = target[queries].argmax(-1)
    out = torch.full((target.shape[0],), float("nan"))
    out[keys] = pattern[:, queries, keys].float().mean(0)
    return out


def top_head(scores: Tensor, layers: range) -> Head:
    sub = scores[layers.start:layers.stop]
    i = int(sub.nan_to_num(float("-inf")).flatten().argmax())
    return layers.start + i // scores.shape[1], i % scores.shape[1]


def name(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def check(ok: bool, text: str) -> str:
    return f"- {text}: {'PASS' if ok else 'FAIL'}"


def parse_args(argv: Optional[list[str]]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lens-tiny-attn2l")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "checkpoint"],
                    help="dtype to run in (checkpoint: as stored in the model's config)")
    ap.add_argument("--out", type=Path, default=Path("runs/induction"))
    ap.add_argument("--seq-len", type=int, default=100, help="length of the repeated random sequence")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=200,
                    help="draw the random tokens from this many most likely ids (0: all trained ids)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.4,
                    help="score a head needs to count as an induction / previous-token head")
    ap.add_argument("--n-random", type=int, default=1000, help="random pairs for the composition baseline")
    return ap.parse_args(argv)


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    kw = {} if args.dtype == "checkpoint" else {"dtype": getattr(torch, args.dtype)}
    model = lens.HookedGPT.from_pretrained(args.model, **kw).eval()
    L, H, N = model.cfg.n_layers, model.cfg.n_heads, args.seq_len
    if L < 2:
        raise ValueError(f"{args.model} has {L} layer; induction heads need at least 2")
    tokens = repeated_random_tokens(model, N, args.batch, args.seed, args.vocab or None)
    report = [f"# Induction heads in {args.model}",
              "Reproduces *A Mathematical Framework for Transformer Circuits* (Elhage et al. 2021). "
              f"{args.batch} sequences of BOS + {N} random tokens + the same {N} tokens again "
              f"(seed {args.seed}; tokens drawn from "
              f"{f'the {args.vocab} most likely ids' if args.vocab else 'every trained id'}); "
              f"{L} layers × {H} heads."]

    # (a) loss per position, first vs second repeat
    nll = loss_per_position(model, tokens)
    first, second = halves(nll, N)
    mean_nll = nll.mean(0)
    lines({"mean loss": mean_nll}, x=list(range(1, 2 * N + 1)), xlabel="token position",
          ylabel="next-token loss (nats)", title=f"loss on a repeated random sequence (repeat starts at {N + 1})",
          path=args.out / "loss_per_position.png")
    report += ["## (a) Loss on repeated random tokens",
               table(["span", "mean loss (nats)"], [["first repeat", first], ["second repeat", second],
                                                     ["uniform guess ln(d_vocab)", math.log(model.cfg.d_vocab)]]),
               "![loss per position](loss_per_position.png)"]

    # (b) previous-token and induction scores of every head
    prev = circuits.previous_token_scores(model, tokens).float().cpu()
    ind = circuits.detect_head(model, tokens, induction_target(N)).float().cpu()
    ind_uniform = circuits.induction_scores(model, seq_len=N, batch=args.batch, seed=args.seed).float().cpu()
    pattern = patterns(model, tokens)
    offsets = top_key_offsets(pattern, N)
    circuits.plot_head_scores(prev, args.out / "previous_token_scores.png", "previous-token score")
    circuits.plot_head_scores(ind, args.out / "induction_scores.png", "induction score")
    heads = [(l, h) for l in range(L) for h in range(H)]
    report += ["## (b) Previous-token and induction scores",
               "Mean attention to the previous token, and (second repeat) to the token after the "
               "previous occurrence of the current token. `induction (uniform ids)` is "
               "`circuits.induction_scores` (uniform ids over the whole vocabulary, no BOS). "
               f"`top key − query` is where the head looks most often from the second repeat: -1 is "
               f"the previous token, {-(N - 1)} the induction target, {-N} the previous occurrence itself.",
               table(["head", "previous-token", "induction", "induction (uniform ids)", "top key − query"],
                     [[name(k), float(prev[k]), float(ind[k]), float(ind_uniform[k]), int(offsets[k])]
                      for k in heads]),
               "![previous-token scores](previous_token_scores.png) ![induction scores](induction_scores.png)"]
    top_ind = top_head(ind, range(1, L))
    top_prev = top_head(prev, range(0, top_ind[0]))
    n_pos = tokens.shape[1]
    by_key = {f"{name(top_prev)} → previous token": attention_by_key(pattern[top_prev[0]][:, top_prev[1]],
                                                                      circuits.previous_token_pattern(n_pos)),
              f"{name(top_ind)} → induction target": attention_by_key(pattern[top_ind[0]][:, top_ind[1]],
                                                                     induction_target(N))}
    lines(by_key, x=list(range(n_pos)), xlabel="key position", ylabel="attention",
          title="attention to the head's target, by where the target sits", path=args.out / "attention_by_position.png")
    edges = [round(i * n_pos / 4) for i in range(5)]
    cell = lambda v: "–" if math.isnan(v) else f"{v:.3f}"
    report += [f"Where the top previous-token head and the top induction head do their job: their attention "
               f"to their target, by the target's position (mean over positions in each range).",
               table(["key positions"] + list(by_key),
                     [[f"{a}–{b - 1}"] + [cell(float(v[a:b].nanmean())) for v in by_key.values()]
                      for a, b in zip(edges, edges[1:])]),
               "![attention by position](attention_by_position.png)"]

    # (c) K-composition of the earlier heads into the induction head's layer
    li, hi = top_ind
    comp = circuits.composition_scores(model, "k").float().cpu()
    base = circuits.random_composition_baseline(model, "k", n_samples=args.n_random, seed=args.seed).float().cpu()
    b_mean, b_std, b_99 = float(base.mean()), float(base.std()), float(base.quantile(0.99))
    # the earlier head whose output the induction head's keys read most: its K-composition partner
    partner = top_head(comp[:li, :, li, hi], range(0, li))
    k_top = float(comp[partner + top_ind])
    circuits.plot_head_scores(comp, args.out / "k_composition.png", "K-composition scores")
    report += ["## (c) K-composition",
               f"K-composition score of each earlier head (row) into each layer-{li} head (column); "
               f"random matrices of the same shapes score {b_mean:.3f} ± {b_std:.3f}, 99th percentile "
               f"{b_99:.3f} ({args.n_random} samples). The top partner of {name(top_ind)} is "
               f"{name(partner)}.",
               table(["earlier head"] + [f"→ {name((li, h))}" for h in range(H)],
                     [[name((l, h1))] + [float(comp[l, h1, li, h2]) for h2 in range(H)]
                      for l in range(li) for h1 in range(H)]),
               "![K-composition](k_composition.png)"]

    # (d) ablating the induction heads
    ind_heads = [k for k in heads if k[0] >= 1 and float(ind[k]) >= args.threshold] or [top_ind]
    z_names = [ablation.hook_name("z", l) for l in sorted({l for l, _ in ind_heads})]
    means = ablation.mean_activations(model, tokens, z_names)
    runs = {"none": [],
            "zero-ablate induction heads": ablation.ablate_heads(ind_heads, "zero"),
            "mean-ablate induction heads": ablation.ablate_heads(ind_heads, "mean", means=means),
            f"zero-ablate previous-token head {name(top_prev)}": ablation.ablate_heads([top_prev], "zero")}
    abl = {k: halves(loss_per_position(model, tokens, hooks, desc=k), N) for k, hooks in runs.items()}
    report += ["## (d) Ablating the induction heads",
               f"Induction heads (layer ≥ 1, score ≥ {args.threshold}, else the top one): "
               f"{', '.join(name(k) for k in ind_heads)}; ablated at hook_z.",
               table(["ablation", "first-repeat loss", "second-repeat loss"],
                     [[k, v[0], v[1]] for k, v in abl.items()])]

    # (e) OV copying scores
    ov = circuits.ov_copying_scores(model).float().cpu()
    report += ["## (e) OV copying scores",
               "Σλ / Σ|λ| over the eigenvalues of W_E W_V W_O W_U: +1 copies, −1 suppresses.",
               table(["head", "copying score"], [[name(k), float(ov[k])] for k in heads])]

    # what the paper finds, checked
    gap = first - second
    zero2, mean2 = abl["zero-ablate induction heads"][1], abl["mean-ablate induction heads"][1]
    checks = {
        "repeat_loss": gap >= 2.0,
        "induction_head": float(ind[top_ind]) >= args.threshold,
        "previous_token_head": float(prev[top_prev]) >= args.threshold,
        "k_composition": float(prev[partner]) >= args.threshold and k_top > b_99,
        "zero_ablation": zero2 - second >= 1.0,
        "mean_ablation": mean2 - second >= 1.0,
        "ov_copying": float(ov[top_ind]) > 0,
    }
    lines_ = [
        check(checks["repeat_loss"], f"second-repeat loss {second:.2f} is {gap:.2f} nats below the first-repeat "
              f"loss {first:.2f} (needs ≥ 2)"),
        check(checks["induction_head"], f"top induction head {name(top_ind)} score {float(ind[top_ind]):.2f} ≥ {args.threshold}"),
        check(checks["previous_token_head"], f"top previous-token head {name(top_prev)} score {float(prev[top_prev]):.2f} ≥ {args.threshold}"),
        check(checks["k_composition"], f"{name(top_ind)}'s top K-composition partner {name(partner)} "
              f"(previous-token score {float(prev[partner]):.2f}, needs ≥ {args.threshold}) scores {k_top:.3f} "
              f"vs the random baseline's 99th percentile {b_99:.3f}"),
        check(checks["zero_ablation"], f"zero-ablating the induction heads raises second-repeat loss from {second:.2f} "
              f"to {zero2:.2f} (needs a rise ≥ 1 nat)"),
        check(checks["mean_ablation"], f"mean-ablating them raises it from {second:.2f} to {mean2:.2f} (needs ≥ 1 nat)"),
        check(checks["ov_copying"], f"induction head {name(top_ind)} OV copying score {float(ov[top_ind]):.2f} > 0"),
    ]
    report += ["## Summary", f"{sum(checks.values())}/{len(checks)} findings reproduced.", *lines_]
    text = "\n\n".join(report[:-len(lines_)]) + "\n" + "\n".join(lines_) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    return {
        "first_repeat_loss": first, "second_repeat_loss": second, "loss_per_position": mean_nll.tolist(),
        "previous_token_scores": prev.tolist(), "induction_scores": ind.tolist(),
        "induction_scores_uniform": ind_uniform.tolist(),
        "top_key_offsets": offsets.tolist(), "ov_copying_scores": ov.tolist(),
        "attention_by_position": {k: v.tolist() for k, v in by_key.items()},
        "k_composition": comp.tolist(), "baseline_mean": b_mean, "baseline_std": b_std,
        "baseline_99": b_99, "k_composition_partner": partner,
        "top_induction_head": top_ind, "top_previous_token_head": top_prev, "k_composition_top": k_top,
        "induction_heads": ind_heads, "ablation": {k: {"first": v[0], "second": v[1]} for k, v in abl.items()},
        "checks": checks, "report": str(args.out / "report.md"),
    }


if __name__ == "__main__":
    main()
