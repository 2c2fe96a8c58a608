"""The parts of a block, in the order data flows: LayerNorm, attention, MLP, block.

Weights right-multiply (``x @ W``) and carry the paper's per-head shapes: ``W_Q[n_heads,
d_model, d_head]``, ``W_O[n_heads, d_head, d_model]``, ``W_in[d_model, d_mlp]``. In
memory each matrix is [out, in], as torch.nn.Linear keeps it, so the fused path reads it
without a copy. Expensive hook points are computed only when someone hooks them."""

import math
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from lens.config import GPTConfig
from lens.hooks import HookPoint

_ACT = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_HALF = (torch.float16, torch.bfloat16)


def weight(shape: tuple[int, ...], memory_order: tuple[int, ...], dtype) -> nn.Parameter:
    """A parameter of the paper's `shape` whose memory holds the axes in `memory_order`.

    Matrices are kept in memory as [out, in] (torch.nn.Linear's layout, the fastest for
    F.linear) while users see the right-multiplying shape: W_in is [d_model, d_mlp] but its
    memory is [d_mlp, d_model]; W_Q is [n_heads, d_model, d_head] over [n_heads, d_head, d_model].
    """
    memory = torch.empty([shape[i] for i in memory_order], dtype=dtype)
    inverse = sorted(range(len(memory_order)), key=memory_order.__getitem__)
    return nn.Parameter(memory.permute(*inverse))


def _causal(n_q: int, n_k: int, device) -> Tensor:
    """[n_q, n_k] causal mask for queries that are the last n_q of n_k positions."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


def padding_mask(attention_mask: Tensor, past: int = 0) -> tuple[Tensor, Tensor]:
    """For a padded batch (attention_mask [batch, key_pos], True at real tokens, the first
    `past` of them already cached): the absolute positions of the new tokens, counting real
    tokens only, and the [batch, 1, query_pos, key_pos] mask, causal, over real keys; pads
    attend to themselves so that no row is empty."""
    total = attention_mask.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    q = torch.arange(past, total, device=attention_mask.device)[:, None]
    k = torch.arange(total, device=attention_mask.device)
    mask = ((k <= q) & attention_mask[:, None, None, :]) | (k == q)
    return positions, mask


class KVCacheEntry:
    """One block's keys and values so far, [batch, key_pos, n_heads, d_head], as hook_k and
    hook_v returned them; new queries attend to these and to the new keys."""

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: Float[Tensor, "batch pos n_heads d_head"], v: Float[Tensor, "batch pos n_heads d_head"]
               ) -> tuple[Float[Tensor, "batch key_pos n_heads d_head"], Float[Tensor, "batch key_pos n_heads d_head"]]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        self.k, self.v = k, v
        return k, v


class LayerNorm(nn.Module):
    """LayerNorm ("LN") or its weightless form ("LNPre", what folding leaves behind).

    hook_scale is the per-position standard deviation, hook_normalized the centred stream
    divided by it (before the weight and bias, as in TransformerLens). Hooking either computes
    the norm by hand; otherwise one fused kernel runs.
    """

    def __init__(self, cfg: GPTConfig, affine: bool):
        super().__init__()
        self.eps, self.d_model = cfg.eps, cfg.d_model
        if affine:
            self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
            self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        else:
            self.w = self.b = None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos *heads d_model"]) -> Float[Tensor, "batch pos *heads d_model"]:
        if self.hook_scale.active or self.hook_normalized.active:
            return self.by_hand(x)
        return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)

    def by_hand(self, x: Tensor, hooked: bool = True) -> Tensor:
        """The same norm step by step, in float32 under half precision, running the hooks."""
        dtype = x.dtype
        if dtype in _HALF:
            x = x.float()
        x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if hooked:
            scale = self.hook_scale.run(scale)
        x = x / scale
        if hooked:
            x = self.hook_normalized.run(x)
        if self.w is not None:
            x = x * self.w + self.b
        return x.to(dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention; each head reads the stream and writes back through W_O.

    With no hook on hook_attn_scores/hook_pattern it runs scaled_dot_product_attention; with one
    it materialises the pattern. hook_result (per-head writes) is computed only when hooked.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = weight((h, d, e), (0, 2, 1), cfg.dtype)
        self.W_K = weight((h, d, e), (0, 2, 1), cfg.dtype)
        self.W_V = weight((h, d, e), (0, 2, 1), cfg.dtype)
        self.W_O = weight((h, e, d), (2, 0, 1), cfg.dtype)
        self.b_Q = nn.Parameter(torch.zeros(h, e, dtype=cfg.dtype))
        self.b_K = nn.Parameter(torch.zeros(h, e, dtype=cfg.dtype))
        self.b_V = nn.Parameter(torch.zeros(h, e, dtype=cfg.dtype))
        self.b_O = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        for name in ("q", "k", "v", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    def project(self, x: Tensor, W: Tensor, b: Tensor) -> Float[Tensor, "batch pos n_heads d_head"]:
        """x @ W + b per head; x is the shared stream [b, p, d] or per-head reads [b, p, h, d]."""
        if x.ndim == 4:
            return torch.einsum("bphd,hde->bphe", x, W) + b
        flat = W.transpose(1, 2).reshape(-1, W.shape[1])  # [h*e, d]: a view of the memory
        out = F.linear(x, flat, b.reshape(-1))
        return out.view(*x.shape[:2], *b.shape)

    def forward(self, q_in: Tensor, k_in: Tensor, v_in: Tensor, mask: Optional[Tensor] = None,
                past_kv: Optional[KVCacheEntry] = None) -> Float[Tensor, "batch pos d_model"]:
        """With `past_kv`, the new keys and values join the cached ones and the queries (the
        last positions) attend to all of them; `mask` is then [batch, 1, query_pos, key_pos]."""
        q = self.hook_q.run(self.project(q_in, self.W_Q, self.b_Q))
        k = self.hook_k.run(self.project(k_in, self.W_K, self.b_K))
        v = self.hook_v.run(self.project(v_in, self.W_V, self.b_V))
        if past_kv is not None:
            k, v = past_kv.append(k, v)
            n_q, n_k = q.shape[1], k.shape[1]
            if mask is None and 1 < n_q < n_k:  # SDPA's is_causal aligns to the first key
                mask = _causal(n_q, n_k, q.device)
        scale = 1.0 / math.sqrt(self.cfg.d_head)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self.materialised(q, k, v, mask, scale)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=scale,
            ).transpose(1, 2)
        z = self.hook_z.run(z)
        if self.hook_result.active:
            result = self.hook_result.run(torch.einsum("bphe,hed->bphd", z, self.W_O))
            return result.sum(2) + self.b_O
        W_O = self.W_O.permute(2, 0, 1).reshape(self.cfg.d_model, -1)  # [d, h*e]: a view
        return F.linear(z.reshape(*z.shape[:2], -1), W_O, self.b_O)

    def materialised(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                     scale: float) -> Float[Tensor, "batch query_pos n_heads d_head"]:
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * scale
        if mask is None:
            mask = _causal(*scores.shape[-2:], q.device)
        scores = self.hook_attn_scores.run(scores.masked_fill(~mask, float("-inf")))
        pattern = torch.softmax(scores.float() if scores.dtype in _HALF else scores, dim=-1)
        pattern = self.hook_pattern.run(pattern.to(v.dtype))
        return torch.einsum("bhqk,bkhe->bqhe", pattern, v)


class MLP(nn.Module):
    """act(x W_in + b_in) W_out + b_out; hook_pre and hook_post are the neurons."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.W_in = weight((cfg.d_model, cfg.d_mlp), (1, 0), cfg.dtype)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        self.W_out = weight((cfg.d_mlp, cfg.d_model), (1, 0), cfg.dtype)
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.act = _ACT[cfg.act_fn]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre.run(F.linear(x, self.W_in.T, self.b_in))
        post = self.hook_post.run(self.act(pre))
        return F.linear(post, self.W_out.T, self.b_out)


def _norm(cfg: GPTConfig) -> Optional[LayerNorm]:
    return None if cfg.normalization is None else LayerNorm(cfg, affine=cfg.normalization == "LN")


class Block(nn.Module):
    """x += attn(ln1(x)); x += mlp(ln2(x)). Attention-only blocks skip the second half."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.ln2 = _norm(cfg)
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def attn_inputs(self, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ln1 of the stream; per-head copies of it where q/k/v_input are hooked."""
        ln = self.ln1
        normed = resid if ln is None else ln(resid)
        out = []
        for hp in (self.hook_q_input, self.hook_k_input, self.hook_v_input):
            if not hp.active:
                out.append(normed)
                continue
            per_head = einops.repeat(resid, "b p d -> b p h d", h=self.cfg.n_heads).clone()
            per_head = hp.run(per_head)  # a copy: hooks may edit one head in place
            out.append(per_head if ln is None else ln.by_hand(per_head, hooked=False))
        return out[0], out[1], out[2]

    def forward(self, resid: Float[Tensor, "batch pos d_model"], mask: Optional[Tensor] = None,
                past_kv: Optional[KVCacheEntry] = None) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre.run(resid)
        attn_out = self.attn(*self.attn_inputs(resid), mask=mask, past_kv=past_kv)
        attn_out = self.hook_attn_out.run(attn_out)
        if self.cfg.attn_only:
            return self.hook_resid_post.run(resid + attn_out)
        resid = self.hook_resid_mid.run(resid + attn_out)
        mlp_in = self.hook_mlp_in.run(resid)
        mlp_out = self.mlp(mlp_in if self.ln2 is None else self.ln2(mlp_in))
        return self.hook_resid_post.run(resid + self.hook_mlp_out.run(mlp_out))
