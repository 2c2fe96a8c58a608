"""The bundled SAE's top features on a prompt: which features fire at each token of the prompt
`make demo` dissects, how strongly, and the tokens each one's decoder direction promotes; with a
heat map of the top features' activations over the prompt.

    python experiments/sae_features.py "Hello World" --out runs/sae
"""

import argparse
from pathlib import Path

import torch

import lens
from lens.sae import feature_logit_effects


def top_features(model, sae, text: str, k: int = 3) -> tuple[list[str], torch.Tensor, list[list[tuple[int, float]]]]:
    """(the prompt's tokens, their features [pos, d_sae], the k strongest (feature, activation)
    at each position)."""
    tokens = model.to_tokens(text)
    name = sae.hook_name + ".hook_sae_acts_post"
    with torch.no_grad(), model.saes(sae, use_error_term=True):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    acts = cache[name][0]  # [pos, d_sae]
    vals, idx = acts.topk(k, dim=-1)
    top = [[(int(i), float(v)) for v, i in zip(vs, ix) if v > 0] for vs, ix in zip(vals, idx)]
    return model.to_str_tokens(tokens), acts, top


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", nargs="?", default="Hello World")
    ap.add_argument("--k", type=int, default=3, help="features shown per token")
    ap.add_argument("--out", default=None, help="folder for features.png")
    args = ap.parse_args(argv)
    sae = lens.SAE.load("lens-tiny-attn2l-sae")
    model = lens.HookedGPT.from_pretrained_no_processing("lens-tiny-attn2l")  # as the SAE was trained
    strs, acts, top = top_features(model, sae, args.text, args.k)
    print(f"{sae.hook_name}: {sae.d_sae} features, L0 {float((acts > 0).sum(-1).float().mean()):.1f} "
          f"on {args.text!r}")
    shown = sorted({f for row in top for f, _ in row})
    for s, row in zip(strs, top):
        print(f"  {s!r:>12}  " + "  ".join(f"#{f} {v:.2f}" for f, v in row))
    for f in shown:
        promoted = ", ".join(repr(t) for t, _ in feature_logit_effects(model, sae, f, k=5)["promoted"])
        print(f"  feature #{f} promotes {promoted}")
    if args.out:
        from lens.plot import heatmap
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        heatmap(acts[:, shown].T, row_labels=[f"#{f}" for f in shown], col_labels=strs, centered=False,
                title=f"top SAE features at\n{sae.hook_name}", xlabel="token", ylabel="feature",
                path=out / "features.png")
        print(f"wrote {out / 'features.png'}")
    return {"tokens": strs, "top": top, "shown": shown}


if __name__ == "__main__":
    main()
