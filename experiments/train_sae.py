"""Train the bundled sparse autoencoder: a TopK SAE (16× expansion) on the residual stream of the
bundled lens-tiny-attn2l, on the same offline corpus it was trained on (the standard library's
source, experiments/train_tiny.py), on CPU in a few minutes. The recipe of Gao et al. (2024),
"Scaling and evaluating sparse autoencoders", small: a TopK activation, the decoder's rows kept
at unit norm, b_dec started at the activations' mean, W_enc started as W_decᵀ.

    python experiments/train_sae.py --out lens/models/lens-tiny-attn2l-sae [--steps N] [--seed S]

Activations come from the model loaded without weight processing (from_pretrained_no_processing;
--processed: as from_pretrained loads it), and the SAE records which, so that splicing it into a
model whose processing changes the residual stream is refused. The output
(lens's SAE format, float32) records the recipe, tokens seen, and L0, fraction of variance
explained and CE loss recovered on a held-out slice of the corpus's validation files, whose
tokens are saved next to it (heldout.safetensors). Deterministic given --seed on the same corpus
and thread count.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lens
from lens import io
from lens.processing import applied_steps
from lens.sae import SAE, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import corpus_tokens  # noqa: E402  (a sibling script: the same corpus)

HELD_OUT = "heldout.safetensors"


def windows(data: np.ndarray, n: int, n_ctx: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - n_ctx - 1, (n,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(data[s:s + n_ctx].astype(np.int64)) for s in starts])


@torch.no_grad()
def harvest(model, hook: str, tokens: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[rows, d_model] activations at `hook` for every position of `tokens`."""
    out = []
    for i in range(0, len(tokens), batch):
        _, cache = model.run_with_cache(tokens[i:i + batch], names_filter=hook, stop_at_layer="auto")
        out.append(cache[hook].reshape(-1, cache[hook].shape[-1]))
    return torch.cat(out)


def held_out(model, recipe: dict) -> torch.Tensor:
    """The held-out token windows the bundled SAE's figures were measured on."""
    folder = Path(lens.__file__).parent / "models" / recipe["name"]
    return io.SafetensorsFile(folder / HELD_OUT).read_all()["tokens"].long()


def train(model, acts: torch.Tensor, args, quiet: bool = False) -> SAE:
    d = acts.shape[-1]
    gen = torch.Generator().manual_seed(args.seed)
    sae = SAE(d, args.expansion * d, args.hook, activation="topk", k=args.k)
    with torch.no_grad():
        W = torch.randn(sae.d_sae, d, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scale = acts.var(0).sum()  # normalised MSE: 1 - variance explained on the batch
    bar = tqdm(range(args.steps), desc="training the SAE", unit="step", disable=quiet, mininterval=2)
    for step in bar:
        lr = args.lr * min(1.0, (args.steps - step) / (0.2 * args.steps))  # linear decay at the end
        for group in opt.param_groups:
            group["lr"] = lr
        x = acts[torch.randint(0, len(acts), (args.batch,), generator=gen)]
        loss = (sae(x) - x).pow(2).sum(-1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep the rows unit norm: remove the gradient along them first
            g = sae.W_dec.grad
            g -= (g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if step % 50 == 0:
            bar.set_postfix(fvu=f"{loss.item():.3f}")
    return sae.requires_grad_(False)


def main(argv=None) -> SAE:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lens-tiny-attn2l")
    ap.add_argument("--hook", default="blocks.1.hook_resid_pre")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=2048, help="activations per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--windows", type=int, default=800, help="corpus windows harvested (n_ctx tokens each)")
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--processed", action="store_true",
                    help="train on the model as from_pretrained processes it (the SAE records the steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path("runs/corpus"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()
    load = lens.HookedGPT.from_pretrained if args.processed else lens.HookedGPT.from_pretrained_no_processing
    model = load(args.model)
    train_data, val_data = corpus_tokens(args.cache_dir)
    gen = torch.Generator().manual_seed(args.seed)
    n_ctx = model.cfg.n_ctx
    acts = harvest(model, args.hook, windows(train_data, args.windows, n_ctx, gen))
    heldout = windows(val_data, args.heldout_windows, n_ctx, torch.Generator().manual_seed(args.seed + 1))
    sae = train(model, acts, args, quiet=args.quiet)
    sae.processing = applied_steps(model)
    figures = evaluate(model, sae, heldout)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "quiet"}
    recipe["name"] = args.out.name
    sae.metadata.update(
        name=args.out.name, model=args.model, recipe=recipe, d_sae=sae.d_sae,
        corpus="Python standard library source (tests excluded), as experiments/train_tiny.py",
        activations_harvested=len(acts), tokens_seen=args.steps * args.batch,
        heldout=f"{args.heldout_windows} windows of {n_ctx} tokens of the validation files ({HELD_OUT})",
        seconds=round(time.time() - start, 1), torch_threads=torch.get_num_threads(),
        **{k: float(v) for k, v in figures.items()})
    sae.save(args.out)
    io.write({"tokens": heldout.to(torch.int32).contiguous()}, args.out / HELD_OUT, {})
    if not args.quiet:
        print(json.dumps({k: v for k, v in sae.metadata.items() if k != "recipe"}, indent=1))
    return sae


if __name__ == "__main__":
    main()
