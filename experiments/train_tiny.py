"""Train the bundled tiny GPTs on the Python standard library's own source, offline.

The corpus is every .py file of the running interpreter's standard library (tests excluded),
tokenised with GPT-2's BPE: real text, full of repeated identifiers. Training runs in phases:

  1. copy, short (--copy-steps): BOS, then random tokens in which a sequence of 10 to 30 tokens
     is followed, after a gap of random length, by a copy of itself. Each row draws its tokens
     from its own alphabet of the corpus's 200 most frequent tokens, about as many as the
     sequence is long (--alphabet 0; at least 20), so every token recurs with different
     successors. With it, the layer-1 heads come to attend to the induction target (the token
     after the previous occurrence). Without it, the model learns to copy with a positional trick
     or with duplicate-token heads instead, and the induction score stays near zero. The softmax
     runs over those 200 tokens, so these steps are cheap.
  2. copy, short, anywhere (--copy-anywhere-steps): the same tasks at random offsets in the
     whole context, the rest filled with tokens outside the row's alphabet. W_pos is learned one
     row per position, so a previous-token head works only where it was trained: after phase 1,
     at positions below about 20, where the first copies sat. The rows after them were shaped
     by phase 1 for other jobs and hardly learn it later (at positions 26-75 the head still gave
     the previous token 0.1-0.2 after 3,000 steps of this phase, while untouched rows further on
     reached 0.9). So the phase starts by re-initialising W_pos from --fresh-pos (20) on. The
     previous-token head then forms at every position, and the induction heads that read it
     follow.
  3. copy, long (--copy-long-steps): sequences of 10 to 120 tokens, also anywhere
     (--no-long-anywhere: from the start of the context), with alphabets drawn from the 2,000
     most frequent tokens (--long-vocab). A fixed alphabet of 20 would repeat each token about
     six times in a 120-token sequence and leave the heads diffuse. The wider pool makes the
     heads copy every common token, not just the 200 of phases 1-2: after the corpus phase
     reshapes the embeddings, a circuit trained on 200 tokens no longer matches the others.
  4. corpus (--steps): windows of n_ctx corpus tokens; in three quarters of them a span (random
     length, random offset) is followed by a copy of itself, in two thirds of those a span of
     random frequent tokens (the 2,000 most frequent, --random-vocab), which keeps the circuit
     paying. The softmax runs over the tokens that occur in the corpus (the others get a large
     negative unembedding bias), which keeps CPU training affordable.

    python experiments/train_tiny.py --model attn2l --out runs/attn2l [--steps N] [--seed S]
    python experiments/train_tiny.py --model mlp2l  --out runs/mlp2l --copy-steps 0 --copy-anywhere-steps 0 \
        --copy-long-steps 0 --random-vocab 200 --steps 700

(The bundled lens-tiny-mlp2l was trained on the corpus alone, before the copy phases existed;
its exact recipe is in its metadata.)
    python experiments/train_tiny.py --model attn2l --out runs/attn2l --device cuda --batch 64 --steps 50000

Resumable: a checkpoint (weights, optimiser, step, RNG) is written every --save-every steps and
picked up on restart. Deterministic given --seed on the same corpus and thread count. The final
model is written in the lens save format, float16, with the recipe, tokens seen and final loss
recorded in its config's metadata.
"""

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lens
from lens.tokenizer import Tokenizer

MODELS = {
    "attn2l": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=256, attn_only=True),
    "mlp2l": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=256, act_fn="gelu_new"),
}


def corpus_tokens(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token arrays of the standard library's source; every 20th file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    key = hashlib.sha256("\n".join(str(p.relative_to(root)) for p in files).encode()).hexdigest()[:12]
    path = cache_dir / f"stdlib-{key}.npz"
    if path.is_file():
        data = np.load(path)
        return data["train"], data["val"]
    tok = Tokenizer.gpt2()
    train, val = [], []
    for i, p in enumerate(tqdm(files, desc="tokenising the standard library", unit="file")):
        ids = tok.encoding.encode_ordinary(p.read_text(encoding="utf-8", errors="replace"))
        (val if i % 20 == 0 else train).extend(ids + [tok.eos_token_id])
    cache_dir.mkdir(parents=True, exist_ok=True)
    train, val = np.array(train, dtype=np.uint16), np.array(val, dtype=np.uint16)
    np.savez(path, train=train, val=val)
    return train, val


def batch(data: np.ndarray, n: int, n_ctx: int, gen: torch.Generator, repeat_frac: float,
          random_frac: float = 0.0, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n windows of n_ctx tokens. In the first repeat_frac of them a span of random length
    (8 to n_ctx/2) at a random offset is followed by a copy of itself, so that only a head that
    looks back for the previous occurrence (not a fixed offset) can predict the copy. In the
    first random_frac of the windows the span is random tokens drawn from `vocab`, which only
    copying predicts."""
    starts = torch.randint(0, len(data) - n_ctx - 1, (n,), generator=gen).tolist()
    rows = [torch.from_numpy(data[s:s + n_ctx].astype(np.int64)) for s in starts]
    for i in range(int(n * repeat_frac)):
        length = int(torch.randint(8, n_ctx // 2 + 1, (1,), generator=gen))
        at = int(torch.randint(0, n_ctx - 2 * length + 1, (1,), generator=gen))
        if i < int(n * random_frac):
            rows[i][at:at + length] = vocab[torch.randint(0, len(vocab), (length,), generator=gen)]
        rows[i][at + length:at + 2 * length] = rows[i][at:at + length]
    return torch.stack(rows)


def copy_batch(pool: torch.Tensor, lengths: tuple[int, int], tokens: int, n_ctx: int, bos: int,
               gen: torch.Generator, alphabet: Optional[int] = None, min_alphabet: int = 20,
               anywhere: bool = False) -> torch.Tensor:
    """Rows of BOS + random tokens in which a sequence x (len(x) drawn from `lengths`, the same for
    the batch) appears, then after a gap a copy of it ends the row; about `tokens` tokens per batch
    (at most 32 rows). Each row draws its tokens from its own random alphabet of `alphabet` ids of
    `pool`; by default the alphabet has as many ids as x is long (at least `min_alphabet`), so a
    token recurs about once per sequence, each time with a different successor.

    With `anywhere`, each row is n_ctx long and the task (everything after BOS) sits at a random
    offset in it, the rest filled with ids of `pool` outside the row's alphabet: the copies then
    occur at every position of the context, not only at the start."""
    length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
    gap = int(torch.randint(0, min(length, n_ctx - 1 - 2 * length) + 1, (1,), generator=gen))
    n = max(4, min(32, tokens // (2 * length + 1)))
    size = min(len(pool), alphabet or max(min_alphabet, length))
    alphabets = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:size]] for _ in range(n)])
    rows = alphabets.gather(1, torch.randint(0, size, (n, 1 + 2 * length + gap), generator=gen))
    rows[:, 0] = bos
    for i in range(n):
        at = 1 + int(torch.randint(0, gap + 1, (1,), generator=gen))
        rows[i, 1 + gap + length:] = rows[i, at:at + length]
    if not anywhere:
        return rows
    task = rows.shape[1] - 1
    out = torch.empty(n, n_ctx, dtype=rows.dtype)
    for i in range(n):
        others = pool[~torch.isin(pool, alphabets[i])]
        others = others if len(others) else pool
        out[i] = others[torch.randint(0, len(others), (n_ctx,), generator=gen)]
        at = 1 + int(torch.randint(0, n_ctx - task, (1,), generator=gen))
        out[i, at:at + task] = rows[i, 1:]
    out[:, 0] = bos
    return out


def fresh_positions(model: lens.HookedGPT, opt: torch.optim.Optimizer, start: int, seed: int) -> None:
    """Re-initialise W_pos[start:] (normal, std 0.02) and clear its optimiser state there."""
    W = model.pos_embed.W_pos
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        W[start:] = (torch.randn(W[start:].shape, generator=g) * 0.02).to(W)
    for buf in opt.state.get(W, {}).values():
        if buf.dim() == 2:
            buf[start:] = 0


def loss_fn(model: lens.HookedGPT, tokens: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Next-token loss with the softmax restricted to the corpus vocabulary `vocab` (sorted ids)."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    resid = model.ln_final(resid)
    logits = resid @ model.W_U[:, vocab] + model.b_U[vocab]
    target = torch.searchsorted(vocab, tokens[:, 1:].contiguous())
    return F.cross_entropy(logits[:, :-1].reshape(-1, len(vocab)), target.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=800, help="corpus steps (phase 4)")
    ap.add_argument("--copy-steps", type=int, default=5000, help="phase 1 steps")
    ap.add_argument("--copy-anywhere-steps", type=int, default=2000, help="phase 2 steps")
    ap.add_argument("--copy-long-steps", type=int, default=1000, help="phase 3 steps")
    ap.add_argument("--long-anywhere", action=argparse.BooleanOptionalAction, default=True,
                    help="place the long copies anywhere in the context too")
    ap.add_argument("--fresh-pos", type=int, default=20,
                    help="at the start of phase 2, re-initialise W_pos rows from this position on (0: keep them)")
    ap.add_argument("--copy-tokens", type=int, default=2600,
                    help="tokens per copy batch (at most 32 rows), before anywhere-rows are padded to n_ctx")
    ap.add_argument("--alphabet", type=int, default=0,
                    help="tokens per copy row's alphabet; 0: as many as the copied sequence is long (at least 20)")
    ap.add_argument("--batch", type=int, default=8, help="corpus windows per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat-frac", type=float, default=0.75)
    ap.add_argument("--random-frac", type=float, default=0.5)
    ap.add_argument("--copy-vocab", type=int, default=200,
                    help="phases 1-2 draw their alphabets from this many of the corpus's most frequent tokens")
    ap.add_argument("--long-vocab", type=int, default=2000, help="the same for phase 3")
    ap.add_argument("--random-vocab", type=int, default=2000,
                    help="phase 4's random spans draw from this many of the corpus's most frequent tokens")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--cache-dir", type=Path, default=Path("runs/corpus"))
    ap.add_argument("--device", default="cpu", help="e.g. cuda; batches are drawn on the CPU either way")
    args = ap.parse_args()
    n_ctx = MODELS[args.model]["n_ctx"]
    if not 0 <= args.fresh_pos < n_ctx:
        ap.error(f"--fresh-pos {args.fresh_pos}: must be a position in [0, {n_ctx}) (0: keep W_pos)")

    torch.manual_seed(args.seed)
    train, val = corpus_tokens(args.cache_dir)
    vocab = torch.from_numpy(np.unique(np.concatenate([train, val])).astype(np.int64))
    counts = np.bincount(train, minlength=50257)
    by_count = torch.from_numpy(np.argsort(-counts).astype(np.int64))
    n_distinct = int((counts > 0).sum())
    for flag in ("copy_vocab", "long_vocab", "random_vocab"):
        if not 1 <= getattr(args, flag) <= n_distinct:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be between 1 and the "
                     f"{n_distinct} distinct tokens of the training corpus")
    cfg = lens.GPTConfig(d_vocab=50257, **MODELS[args.model])
    model = lens.HookedGPT(cfg)
    model.init_weights(seed=args.seed)
    model.to(args.device)
    vocab_dev = vocab.to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    step, tokens_seen, losses = 0, 0, []
    ckpt = args.out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location=args.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        step, tokens_seen, losses = int(state["step"]), int(state["tokens_seen"]), state["losses"].tolist()
        print(f"resuming at step {step}")
    # (name, steps, copied-sequence lengths (None: corpus), copy tasks anywhere in the context,
    #  how many of the most frequent tokens the copies / random spans draw from)
    phases = [("copy, short", args.copy_steps, (10, 30), False, args.copy_vocab),
              ("copy, short, anywhere", args.copy_anywhere_steps, (10, 30), True, args.copy_vocab),
              ("copy, long", args.copy_long_steps, (10, 120), args.long_anywhere, args.long_vocab),
              ("corpus", args.steps, None, False, args.random_vocab)]
    ends = np.cumsum([n for _, n, *_ in phases]).tolist()
    total = ends[-1]
    pools = [by_count[:n_frequent] for *_, n_frequent in phases]
    pools_sorted = [pool.sort().values.to(args.device) for pool in pools]  # the copy phases' softmax
    bos = Tokenizer.gpt2().eos_token_id
    warmup = max(1, min(100, args.steps // 10))
    bar = tqdm(total=total, initial=step, desc=f"training {args.model}", unit="step")
    t0, start = time.time(), step
    while step < total:
        phase = next(i for i, end in enumerate(ends) if step < end)
        name, n_steps, lengths, anywhere, _ = phases[phase]
        frequent = pools[phase]
        s_ = step - (ends[phase] - n_steps)  # steps into this phase
        if lengths:  # copy phases: a short warm-up, then a constant rate
            lr = args.lr * min(1.0, (s_ + 1) / 30)
            tokens = copy_batch(frequent, lengths, args.copy_tokens, n_ctx, bos, gen, args.alphabet or None,
                                anywhere=anywhere)
            vocab_now = pools_sorted[phase]
        else:  # corpus: warm-up, then cosine decay
            lr = args.lr * min(1.0, (s_ + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s_ / args.steps))
            tokens = batch(train, args.batch, n_ctx, gen, args.repeat_frac, args.random_frac, frequent)
            vocab_now = vocab_dev
        for g in opt.param_groups:
            g["lr"] = lr
        if phase == 1 and s_ == 0 and args.fresh_pos:
            fresh_positions(model, opt, args.fresh_pos, args.seed)
        tokens = tokens.to(args.device, non_blocking=True)
        loss = loss_fn(model, tokens, vocab_now)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        tokens_seen += tokens.numel()
        bar.set_postfix(phase=name, loss=f"{np.mean(losses[-50:]):.3f}",
                        steps_s=f"{(step - start) / (time.time() - t0 + 1e-9):.1f}")
        if step % args.save_every == 0 or step == total:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": step, "tokens_seen": tokens_seen, "losses": torch.tensor(losses)},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    bar.close()

    model.eval()
    with torch.no_grad():
        unused = torch.ones(cfg.d_vocab, dtype=torch.bool, device=args.device)
        unused[vocab_dev] = False
        model.b_U[unused] = model.b_U[vocab_dev].min() - 20.0  # never predicted: not in the corpus
        vgen = torch.Generator().manual_seed(1234)
        val_loss = float(np.mean([model(batch(val, 8, n_ctx, vgen, 0.0).to(args.device), return_type="loss").item()
                                  for _ in range(10)]))
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recipe["phases"] = [f"{name}: {n} steps" + (f", sequences of {lengths[0]}-{lengths[1]} tokens" if lengths else "")
                        for name, n, lengths, *_ in phases if n]
    model.cfg.metadata.update({
        "name": f"lens-tiny-{args.model}", "corpus": "Python standard library source (tests excluded)",
        "recipe": recipe, "tokens_seen": tokens_seen, "final_train_loss": float(np.mean(losses[-100:])),
        "val_loss": val_loss, "corpus_vocab": int(len(vocab)),
    })
    model.save(args.out / "final", storage_dtype=torch.float16)
    print(json.dumps(model.cfg.metadata, indent=1))


if __name__ == "__main__":
    main()
