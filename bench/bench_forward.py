"""lens forward with no hooks vs a minimal nanoGPT-style GPT with the same weights, and
run_with_cache of every hook point vs the forward pass (time ratio and bytes cached).

    python bench/bench_forward.py            # GPT-2-small-sized random weights, CPU
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_small_sized, table, timeit  # noqa: E402


class NanoBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's forward pass, loaded from a lens model's weights."""

    def __init__(self, m):
        super().__init__()
        cfg = m.cfg
        d, h = cfg.d_model, cfg.n_heads
        self.wte, self.wpe = nn.Embedding(cfg.d_vocab, d), nn.Embedding(cfg.n_ctx, d)
        self.h = nn.ModuleList(NanoBlock(d, h) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.d_vocab)
        with torch.no_grad():
            self.wte.weight.copy_(m.W_E); self.wpe.weight.copy_(m.W_pos)
            for b, lb in zip(self.h, m.blocks):
                a = lb.attn
                W = torch.cat([w.permute(1, 0, 2).reshape(d, -1) for w in (a.W_Q, a.W_K, a.W_V)], 1)
                b.c_attn.weight.copy_(W.T); b.c_attn.bias.copy_(torch.cat([a.b_Q.flatten(), a.b_K.flatten(), a.b_V.flatten()]))
                b.c_proj.weight.copy_(a.W_O.reshape(-1, d).T); b.c_proj.bias.copy_(a.b_O)
                b.c_fc.weight.copy_(lb.mlp.W_in.T); b.c_fc.bias.copy_(lb.mlp.b_in)
                b.mlp_proj.weight.copy_(lb.mlp.W_out.T); b.mlp_proj.bias.copy_(lb.mlp.b_out)
                for ln, lln in ((b.ln_1, lb.ln1), (b.ln_2, lb.ln2)):
                    ln.weight.copy_(lln.w); ln.bias.copy_(lln.b)
            self.ln_f.weight.copy_(m.ln_final.w); self.ln_f.bias.copy_(m.ln_final.b)
            self.lm_head.weight.copy_(m.W_U.T); self.lm_head.bias.copy_(m.b_U)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = gpt2_small_sized(n_layers=args.layers)
    nano = NanoGPT(model).eval()
    rows = []
    for batch, pos in [(8, 128), (1, 32)]:
        tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos))
        err = (model(tokens) - nano(tokens)).abs().max().item()
        assert err < 1e-3, f"lens and the reference disagree by {err}"
        t = timeit({"lens": lambda: model(tokens), "nano": lambda: nano(tokens),
                    "cache": lambda: model.run_with_cache(tokens)}, repeats=args.repeats)
        _, cache = model.run_with_cache(tokens)
        rows.append([f"{batch}x{pos}", f"{t['lens'] * 1e3:.1f}", f"{t['nano'] * 1e3:.1f}",
                     f"{t['lens'] / t['nano']:.3f}", f"{t['cache'] / t['lens']:.2f}",
                     f"{cache.nbytes / 2**20:.0f}", f"{err:.1e}"])
        del cache
    print(f"GPT-2-small-sized ({args.layers} layers, 768 wide), CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    print(table(rows, ["batch x pos", "lens ms", "nanoGPT ms", "lens/nanoGPT (goal ≤1.03 / ≤1.10)",
                       "cache-all/forward", "MB cached (all hooks)", "max |Δlogit|"]))


if __name__ == "__main__":
    main()
