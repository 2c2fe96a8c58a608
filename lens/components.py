"""The parts of a block, in the order data flows: norm, rotary positions, attention, MLP, block.

Weights right-multiply (``x @ W``) and carry the paper's per-head shapes: ``W_Q[n_heads,
d_model, d_head]``, ``W_K[n_kv_heads, d_model, d_head]``, ``W_O[n_heads, d_head, d_model]``,
``W_in[d_model, d_mlp]``. In memory each matrix is [out, in], as torch.nn.Linear keeps it, so
the fused path reads it without a copy. Parts a spec does not ask for are not built; expensive
hook points are computed only when someone hooks them, and hooks that only read change no bit
of the forward pass. Per-call facts (positions, masks, rotary angles) arrive in a `Run`, never
through state on the model."""

import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
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


def _bias(built: bool, size, dtype) -> Optional[nn.Parameter]:
    return nn.Parameter(torch.zeros(size, dtype=dtype)) if built else None


# ---------------------------------------------------------------------- per-call facts
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


@dataclass
class Run:
    """What one forward pass passes down to every block: the absolute positions of the pos
    axis [batch, pos], the padding mask [batch, 1, query_pos, key_pos] (None when every token
    is real), the rotary angles (cos, sin) [batch, pos, rotary_dim] on rotary models, and those
    of windowed layers where they have a rotary base of their own (rope_local). Masks for
    sliding windows are derived once per call and kept here."""

    positions: Int[Tensor, "batch pos"]
    mask: Optional[Tensor] = None
    rope: Optional[tuple[Tensor, Tensor]] = None
    rope_local: Optional[tuple[Tensor, Tensor]] = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask_for(self, n_q: int, n_k: int, window: Optional[int], device) -> Optional[Tensor]:
        """The boolean mask of queries (the last n_q of n_k positions) over keys, or None for
        plain causal attention starting at the first key (what SDPA's is_causal does)."""
        if window is None and (self.mask is not None or n_q in (1, n_k)):
            return self.mask
        key = (n_q, n_k, window)
        if key not in self._masks:
            allowed = _causal(n_q, n_k, device)
            if window is not None:  # each query sees itself and the window - 1 keys before it
                q = torch.arange(n_k - n_q, n_k, device=device)[:, None]
                allowed &= torch.arange(n_k, device=device) > q - window
            self._masks[key] = allowed if self.mask is None else self.mask & allowed
        return self._masks[key]


# ---------------------------------------------------------------------- the fast path's bits
# A hooked hook point may need a slower path than a plain forward (a norm step by step, a
# materialised pattern, per-head projections). When its hooks only read, the value handed on
# is still the fast path's, so that caching changes no bit of the forward pass; the slow path,
# already computed for the hooks, lends its gradient, so backward hooks there still fire.
def _observe(hp: HookPoint, x: Tensor) -> tuple[Tensor, bool]:
    """hp's hooks run on x: (what they leave, whether it is still x's value). A hook that
    returns None or x without editing x in place keeps it; so does one returning an equal
    tensor (e.g. a patch of a value with itself)."""
    if not hp.fwd_hooks:
        return hp.run(x), True
    inference = x.is_inference()  # inference tensors keep no version counter: compare a copy
    before, version = (x.clone(), None) if inference else (x, x._version)
    y = hp.run(x)
    if not inference and x._version != version:
        return y, False  # edited in place
    if y is before:
        return y, True
    return y, y.dtype == before.dtype and y.device == before.device and torch.equal(y, before)


def _choose(kept: bool, fast: Callable[[], Tensor], slow: Callable[[], Tensor], grad: bool) -> Tensor:
    """slow() when the hooks changed a value, else fast()'s bits, with slow()'s gradient when
    one is wanted (fast - fast.detach() would double it; slow - slow.detach() is exactly 0)."""
    if not kept:
        return slow()
    if not grad:
        return fast()
    s = slow()
    return fast().detach() + (s - s.detach())


# ---------------------------------------------------------------------- norms
class Norm(nn.Module):
    """LayerNorm (kind "LN") or RMSNorm ("RMS") over the last axis, with its weight (and, for
    LayerNorm, bias) or without them (what folding leaves behind).

    hook_scale is the per-position scale (standard deviation, or root mean square for RMSNorm)
    and hook_normalized the (centred) input divided by it, before the weight and bias, as in
    TransformerLens. Unhooked, one fused kernel runs. Hooked, the norm is also computed step by
    step for the hooks; if they only read (return None or their input, or an equal tensor,
    editing nothing in place), the output is still the fused kernel's, bit for bit, so a cached
    run equals a plain forward. Then hook_normalized · w + b agrees with the output only to
    rounding (float32: a few ulp, ≲ 1e-6 relative; 16-bit: that dtype's rounding), where
    TransformerLens's output is that product exactly. A hook that changes either value (an
    in-place edit counts, even one that keeps the numbers) gets the step-by-step norm of its
    value, which differs from the fused one by the same rounding.
    """

    def __init__(self, kind: str, length: int, eps: float, affine: bool, dtype, offset: float = 0.0):
        super().__init__()
        self.kind, self.eps, self.length, self.offset = kind, eps, length, float(offset)
        self.w = nn.Parameter(torch.ones(length, dtype=dtype)) if affine else None
        self.b = nn.Parameter(torch.zeros(length, dtype=dtype)) if affine and kind == "LN" else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def centres(self) -> bool:
        return self.kind == "LN"

    def weight(self, like: Tensor) -> Optional[Tensor]:
        """The weight the normalised input is multiplied by (offset + w), on like's device and
        dtype; None for a weightless norm."""
        if self.w is None:
            return None
        w = self.w.to(like.device, like.dtype)
        return w + self.offset if self.offset else w

    def forward(self, x: Float[Tensor, "batch pos *heads d"]) -> Float[Tensor, "batch pos *heads d"]:
        if not (self.hook_scale.active or self.hook_normalized.active):
            return self.fused(x, self.w, self.b)
        normalized, kept = self.normalize(x, hooked=True)
        return _choose(kept, lambda: self.fused(x, self.w, self.b),
                       lambda: self.weigh(normalized, x.dtype), normalized.requires_grad)

    def fused(self, x: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
        """The norm in one kernel, with weight w (before the offset) and bias b."""
        if self.kind == "LN":
            if w is not None:
                w = w.to(x.device, x.dtype)
                w = w + self.offset if self.offset else w
            return F.layer_norm(x, (self.length,), w, b, self.eps)
        if self.offset and w is not None:  # as Gemma: weigh (offset + w) in float32, then cast
            wide = x.float() if x.dtype in _HALF else x
            out = F.rms_norm(wide, (self.length,), None, self.eps) * (w.to(wide.dtype) + self.offset)
            return out.to(x.dtype)
        if x.dtype in _HALF:  # as HF: normalise in float32, cast, then weigh
            out = F.rms_norm(x.float(), (self.length,), None, self.eps).to(x.dtype)
            return out if w is None else out * w
        return F.rms_norm(x, (self.length,), w, self.eps)

    def by_hand(self, x: Tensor, hooked: bool = True) -> Tensor:
        """The same norm step by step, in float32 under half precision, running the hooks."""
        return self.weigh(self.normalize(x, hooked)[0], x.dtype)

    def normalize(self, x: Tensor, hooked: bool) -> tuple[Tensor, bool]:
        """(x centred and divided by its scale, whether the hooks kept both values)."""
        if x.dtype in _HALF:
            x = x.float()
        if self.centres:
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if not hooked:
            return x / scale, True
        scale, kept_scale = _observe(self.hook_scale, scale)
        x, kept = _observe(self.hook_normalized, x / scale)
        return x, kept_scale and kept

    def weigh(self, x: Tensor, dtype) -> Tensor:
        """The weight and bias applied to a normalised x (float32 under half precision), cast
        to dtype."""
        if self.kind == "RMS" and not self.offset:  # Llama casts before the weight, Gemma after
            x = x.to(dtype)
        if self.w is not None:
            x = x * self.weight(x)  # (offset + w) in x's dtype: float32 for Gemma, as HF
        if self.b is not None:
            x = x + self.b
        return x.to(dtype)

    def plain(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """The norm of x without running its hooks, as the forward pass computes it (the same
        bits), its weights moved to x's device and dtype (for analysis on caches that live
        elsewhere than the model)."""
        w = None if self.w is None else self.w.detach().to(x.device, x.dtype)
        b = None if self.b is None else self.b.detach().to(x.device, x.dtype)
        return self.fused(x, w, b)

    def read_through(self, u: Float[Tensor, "... d"], scale: Tensor) -> Float[Tensor, "... d"]:
        """The direction a write must be dotted with so that write · read_through(u) equals
        frozen(write) · u: the adjoint of the frozen norm (weight, then centring, over scale)."""
        if self.w is not None:
            u = u * self.weight(u).detach()
        if self.centres:
            u = u - u.mean(-1, keepdim=True)
        return u / scale.to(u.device, u.dtype)

    def bias_along(self, u: Float[Tensor, "... d"]) -> Tensor:
        """b · u: what the norm's bias adds along u (0 without a bias)."""
        if self.b is None:
            return torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        return u @ self.b.detach().to(u.device, u.dtype)

    def frozen(self, x: Float[Tensor, "... d"], scale: Tensor) -> Float[Tensor, "... d"]:
        """The norm as a linear map, with the scale frozen (from a cache): centre (LayerNorm),
        divide by `scale`, multiply by the weight. The bias belongs to no component and is left
        out, so applied to the parts of a stream it sums to norm(stream) - b."""
        if self.centres:
            x = x - x.mean(-1, keepdim=True)
        x = x / scale.to(x.device)
        return x if self.w is None else x * self.weight(x)


LayerNorm = Norm  # the name lens used when LayerNorm was the only norm


def make_norm(cfg: GPTConfig, length: Optional[int] = None, post: bool = False) -> Optional[Norm]:
    """A norm of the spec's kind; a post-norm keeps its weight whatever folding did to the rest
    (nothing linear follows it to take the weight)."""
    if cfg.normalization is None:
        return None
    affine = post or not cfg.normalization.endswith("Pre")
    return Norm(cfg.norm_kind, length or cfg.d_model, cfg.eps, affine=affine, dtype=cfg.dtype,
                offset=cfg.norm_offset)


# ---------------------------------------------------------------------- rotary positions
def rotary_frequencies(dim: int, base: float, scaling: Optional[dict]) -> Float[Tensor, " half_rotary_dim"]:
    """Inverse frequencies base^(-2i/dim), with a spec's rope scaling applied."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = scaling
    if s is None:
        return inv
    if s["type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary:
    """Rotary angles for the positions of a call; applied to the first rotary_dim dims of each
    query and key head, the two halves of those dims rotated as pairs (GPT-NeoX's layout, which
    Llama's HF checkpoints use too). Kept out of the state dict and of dtype casts. `local` gives
    the frequencies of windowed layers with a base of their own (Gemma-3), else the model's."""

    def __init__(self, cfg: GPTConfig, local: bool = False):
        base, scaling = (cfg.local_rotary_base, cfg.local_rope_scaling) if local else \
            (cfg.rotary_base, cfg.rope_scaling)
        self.inv_freq = rotary_frequencies(cfg.rotary_dim, float(base), scaling)
        self._on: dict = {}

    def angles(self, positions: Int[Tensor, "batch pos"], dtype) -> tuple[Tensor, Tensor]:
        dev = positions.device
        if dev not in self._on:
            self._on[dev] = self.inv_freq.to(dev)
        freqs = positions[..., None].float() * self._on[dev]
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Float[Tensor, "batch pos heads d_head"], cos: Tensor, sin: Tensor
                 ) -> Float[Tensor, "batch pos heads d_head"]:
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    rot = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return torch.cat([rot, rest], -1) if rest.shape[-1] else rot


# ---------------------------------------------------------------------- attention
def softcap(x: Tensor, cap: float) -> Tensor:
    """cap · tanh(x / cap): x squashed into (-cap, cap), nearly unchanged where |x| ≪ cap."""
    return cap * torch.tanh(x / cap)


def attention_scores(q: Float[Tensor, "batch query_pos n_heads d_head"],
                     k: Float[Tensor, "batch key_pos n_heads d_head"], scale: float,
                     cap: Optional[float]) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
    """q · k × scale per head (k one per query head), soft-capped when there is a cap: the
    scores before the mask, as attention and lazy patterns (lens.patterns) compute them."""
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * scale
    return scores if cap is None else softcap(scores, cap)


def softmax_rows(scores: Tensor, dtype: torch.dtype) -> Tensor:
    """The pattern from masked scores, as attention computes it (16-bit scores in float32)."""
    return torch.softmax(scores.float() if scores.dtype in _HALF else scores, dim=-1).to(dtype)


# {Attention module: fn(q, k, mask, pattern)} for the call running in this thread: the
# attention layers whose pattern a lazy cache records (the pattern itself where hooks changed
# it, else None).
RECORDERS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("pattern_recorders", default=None)


def per_query_head(t: Tensor, groups: int, axis: int) -> Tensor:
    """Key/value heads repeated along `axis` so that there is one per query head: under
    grouped-query attention query head h reads key/value head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=axis)


class KVCacheEntry:
    """One block's keys and values so far, [batch, key_pos, n_kv_heads, d_head], as the hooks
    (hook_rot_k on rotary models, else hook_k; hook_v) returned them; new queries attend to
    these and to the new keys."""

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: Float[Tensor, "batch pos n_kv_heads d_head"], v: Float[Tensor, "batch pos n_kv_heads d_head"]
               ) -> tuple[Float[Tensor, "batch key_pos n_kv_heads d_head"], Float[Tensor, "batch key_pos n_kv_heads d_head"]]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        self.k, self.v = k, v
        return k, v


# What attention reads for queries, keys or values: the shared stream [batch, pos, d_model],
# per-head reads [batch, pos, heads, d_model], or a pair of the two with equal values.
AttnInput = Union[Tensor, tuple[Tensor, Tensor]]


class Attention(nn.Module):
    """Multi-head causal self-attention; each head reads the stream and writes back through W_O.
    Under grouped-query attention query head h reads key/value head h // (n_heads / n_kv_heads).

    Without a soft-cap on the scores it runs scaled_dot_product_attention; hooks on
    hook_attn_scores/hook_pattern also materialise the pattern for them, and hook_result
    (per-head writes) is computed only when hooked. If those hooks only read (return None or
    their input, or an equal tensor, editing nothing in place), z and the output are still the
    fused kernels' bits, so a cached run equals a plain forward; cached z then agrees with
    pattern @ v, and attn_out with the sum of hook_result (+ b_O), only to rounding (float32:
    ≲ 1e-6 relative; 16-bit: that dtype's rounding). A hook that changes a value (an in-place
    edit counts) gets the materialised attention (or the per-head sum) of its value, which
    differs from the fused kernels by the same rounding. With a soft-cap attention is always
    materialised, hooked or not.
    """

    def __init__(self, cfg: GPTConfig, window: Optional[int] = None):
        super().__init__()
        h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.n_kv_heads, self.d_head, self.d_model = h, kv, e, d
        self.window = window
        self.scale = 1.0 / (cfg.attn_scale if cfg.attn_scale is not None else math.sqrt(e))
        self.softcap = cfg.attn_softcap
        self.W_Q = weight((h, d, e), (0, 2, 1), cfg.dtype)
        self.W_K = weight((kv, d, e), (0, 2, 1), cfg.dtype)
        self.W_V = weight((kv, d, e), (0, 2, 1), cfg.dtype)
        self.W_O = weight((h, e, d), (2, 0, 1), cfg.dtype)
        self.b_Q = _bias(cfg.attn_bias, (h, e), cfg.dtype)
        self.b_K = _bias(cfg.attn_bias, (kv, e), cfg.dtype)
        self.b_V = _bias(cfg.attn_bias, (kv, e), cfg.dtype)
        self.b_O = _bias(cfg.attn_out_bias, d, cfg.dtype)
        def qk_norm(length: int) -> Norm:
            return Norm("RMS", length, cfg.eps, affine=True, dtype=cfg.dtype, offset=cfg.norm_offset)

        self.q_norm = self.k_norm = self.q_ln = self.k_ln = None
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = qk_norm(e), qk_norm(e)
        elif cfg.qk_norm == "proj":  # one norm over every head's query (key), [batch, pos, heads * d_head]
            self.q_ln, self.k_ln = qk_norm(h * e), qk_norm(kv * e)
        self.rotary = cfg.rotary_dim > 0
        self.local_rope = window is not None and cfg.local_rotary_base is not None
        names = ["q", "k", "v"] + (["rot_q", "rot_k"] if self.rotary else [])
        for name in names + ["attn_scores", "pattern", "z", "result"]:
            setattr(self, f"hook_{name}", HookPoint())

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def project(self, x: AttnInput, W: Tensor, b: Optional[Tensor]
                ) -> Float[Tensor, "batch pos heads d_head"]:
        """x @ W + b per head; x is the shared stream [b, p, d], per-head reads [b, p, h, d], or
        a pair (shared, per-head) of equal values: the shared one's bits, the per-head one's
        gradient."""
        if isinstance(x, tuple):
            shared, per_head = x
            return _choose(True, lambda: self.project(shared, W, b),
                           lambda: self.project(per_head, W, b), True)
        if x.ndim == 4:
            out = torch.einsum("bphd,hde->bphe", x, W)
            return out if b is None else out + b
        flat = W.transpose(1, 2).reshape(-1, W.shape[1])  # [h*e, d]: a view of the memory
        out = F.linear(x, flat, None if b is None else b.reshape(-1))
        return out.view(*x.shape[:2], W.shape[0], W.shape[2])

    def forward(self, q_in: AttnInput, k_in: AttnInput, v_in: AttnInput, run: Run,
                past_kv: Optional[KVCacheEntry] = None) -> Float[Tensor, "batch pos d_model"]:
        """Each input is what `project` takes. With `past_kv`, the new keys and values join the
        cached ones and the queries (the last positions) attend to all of them."""
        q = self.hook_q.run(self.project(q_in, self.W_Q, self.b_Q))
        k = self.hook_k.run(self.project(k_in, self.W_K, self.b_K))
        v = self.hook_v.run(self.project(v_in, self.W_V, self.b_V))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_ln is not None:
            q, k = self.q_ln(q.flatten(-2)).view_as(q), self.k_ln(k.flatten(-2)).view_as(k)
        if self.rotary:
            cos, sin = run.rope_local if self.local_rope else run.rope
            q = self.hook_rot_q.run(apply_rotary(q, cos, sin))
            k = self.hook_rot_k.run(apply_rotary(k, cos, sin))
        if past_kv is not None:
            k, v = past_kv.append(k, v)
        mask = run.mask_for(q.shape[1], k.shape[1], self.window, q.device)
        recorders = RECORDERS.get()
        record = recorders.get(self) if recorders else None
        if self.softcap is not None or self.hook_attn_scores.active or self.hook_pattern.active:
            pattern, kept = self.hooked_pattern(q, k, mask)
            if self.softcap is not None:
                z = self.mix(pattern, v)
            else:
                z = _choose(kept, lambda: self.fused(q, k, v, mask), lambda: self.mix(pattern, v),
                            pattern.requires_grad)
            if record is not None:  # what a lazy cache reads: the queries and keys, or the
                record(q, k, mask, None if kept else pattern)  # pattern hooks changed
        else:
            z = self.fused(q, k, v, mask)
            if record is not None:
                record(q, k, mask, None)
        z = self.hook_z.run(z)
        if not self.hook_result.active:
            return self.out(z)
        result, kept = _observe(self.hook_result, torch.einsum("bphe,hed->bphd", z, self.W_O))
        return _choose(kept, lambda: self.out(z), lambda: self.summed(result), result.requires_grad)

    def fused(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]
              ) -> Float[Tensor, "batch query_pos n_heads d_head"]:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=self.scale,
            enable_gqa=self.groups > 1,
        ).transpose(1, 2)

    def out(self, z: Float[Tensor, "batch pos n_heads d_head"]) -> Float[Tensor, "batch pos d_model"]:
        W_O = self.W_O.permute(2, 0, 1).reshape(self.d_model, -1)  # [d, h*e]: a view
        return F.linear(z.reshape(*z.shape[:2], -1), W_O, self.b_O)

    def summed(self, result: Float[Tensor, "batch pos n_heads d_model"]
               ) -> Float[Tensor, "batch pos d_model"]:
        out = result.sum(2)
        return out if self.b_O is None else out + self.b_O

    def hooked_pattern(self, q: Tensor, k: Tensor, mask: Optional[Tensor]
                       ) -> tuple[Float[Tensor, "batch n_heads query_pos key_pos"], bool]:
        """(the pattern as the hooks leave it, whether they kept the scores and the pattern)."""
        # hook_attn_scores sees the capped scores
        scores = attention_scores(q, per_query_head(k, self.groups, 2), self.scale, self.softcap)
        if mask is None:
            mask = _causal(*scores.shape[-2:], q.device)
        scores, kept_scores = _observe(self.hook_attn_scores, scores.masked_fill(~mask, float("-inf")))
        pattern, kept = _observe(self.hook_pattern, softmax_rows(scores, q.dtype))
        return pattern, kept_scores and kept

    def mix(self, pattern: Tensor, v: Tensor) -> Float[Tensor, "batch query_pos n_heads d_head"]:
        """z: each query's pattern-weighted sum of the values."""
        return torch.einsum("bhqk,bkhe->bqhe", pattern, per_query_head(v, self.groups, 2))


# ---------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """act(x W_in + b_in) W_out + b_out; or gated: (act(x W_gate + b_gate) * (x W_in + b_in))
    W_out + b_out. hook_pre (the gate's pre-activation when gated), hook_pre_linear (the up projection
    of a gated MLP) and hook_post are the neurons."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.gated = cfg.gated_mlp
        self.W_in = weight((d, m), (1, 0), cfg.dtype)
        self.b_in = _bias(cfg.mlp_bias, m, cfg.dtype)
        self.W_gate = weight((d, m), (1, 0), cfg.dtype) if self.gated else None
        self.b_gate = _bias(cfg.mlp_bias and self.gated, m, cfg.dtype)
        self.W_out = weight((m, d), (1, 0), cfg.dtype)
        self.b_out = _bias(cfg.mlp_bias, d, cfg.dtype)
        self.act = _ACT[cfg.act_fn]
        self.hook_pre = HookPoint()
        if self.gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.gated:
            pre = self.hook_pre.run(F.linear(x, self.W_gate.T, self.b_gate))
            linear = self.hook_pre_linear.run(F.linear(x, self.W_in.T, self.b_in))
            post = self.hook_post.run(self.act(pre) * linear)
        else:
            pre = self.hook_pre.run(F.linear(x, self.W_in.T, self.b_in))
            post = self.hook_post.run(self.act(pre))
        return F.linear(post, self.W_out.T, self.b_out)


# ---------------------------------------------------------------------- block
class Block(nn.Module):
    """Sequential: x += attn(ln1(x)); x += mlp(ln2(x)). Parallel (parallel_attn_mlp): x +=
    attn(ln1(x)) + mlp(ln2(x)), both reading the block's input. With post_norms each sublayer's
    output (hook_attn_out_pre / hook_mlp_out_pre) passes through ln1_post / ln2_post before it is
    added; hook_attn_out / hook_mlp_out are always what is added to the stream. Attention-only
    blocks have no second half; parallel ones no hook_resid_mid."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.parallel = cfg.parallel_attn_mlp and cfg.has_mlp
        self.ln1 = make_norm(cfg) if cfg.pre_norms else None
        self.attn = Attention(cfg, cfg.window_of(layer))
        self.hook_resid_pre = HookPoint()
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.hook_attn_out = HookPoint()
        self.post_norms = cfg.post_norms and cfg.normalization is not None
        if self.post_norms:
            self.hook_attn_out_pre = HookPoint()
            self.ln1_post = make_norm(cfg, post=True)
        self.has_mlp = cfg.has_mlp
        if self.has_mlp:
            self.ln2 = make_norm(cfg) if cfg.pre_norms else None
            self.mlp = MLP(cfg)
            if not self.parallel:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint()
            if self.post_norms:
                self.hook_mlp_out_pre = HookPoint()
                self.ln2_post = make_norm(cfg, post=True)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def attn_inputs(self, resid: Tensor) -> tuple[AttnInput, AttnInput, AttnInput]:
        """ln1 of the stream; where q/k/v_input are hooked, per-head copies of the stream (one
        per key/value head for k and v) run through the hooks. Copies the hooks leave as they
        were are read as the shared stream (the same bits as unhooked; paired with the per-head
        copy when a gradient is wanted, which then flows through the hook point); changed ones
        are normalised per head. ln1's own hooks run once, on the shared stream: a per-head
        input a hook changes is normalised without them."""
        ln = self.ln1
        normed = resid if ln is None else ln(resid)
        out: list[AttnInput] = []
        for hp, h in ((self.hook_q_input, self.n_heads), (self.hook_k_input, self.n_kv_heads),
                      (self.hook_v_input, self.n_kv_heads)):
            if not hp.active:
                out.append(normed)
                continue
            per_head = einops.repeat(resid, "b p d -> b p h d", h=h).clone()
            per_head, kept = _observe(hp, per_head)  # a copy: hooks may edit one head in place
            if kept and not per_head.requires_grad:
                out.append(normed)
                continue
            per_head = per_head if ln is None else ln.by_hand(per_head, hooked=False)
            out.append((normed, per_head) if kept else per_head)
        return out[0], out[1], out[2]

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: Run,
                past_kv: Optional[KVCacheEntry] = None) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre.run(resid)
        attn_out = self.attn(*self.attn_inputs(resid), run=run, past_kv=past_kv)
        if self.post_norms:
            attn_out = self.ln1_post(self.hook_attn_out_pre.run(attn_out))
        attn_out = self.hook_attn_out.run(attn_out)
        if not self.has_mlp:
            return self.hook_resid_post.run(resid + attn_out)
        if self.parallel:
            mlp_in = self.hook_mlp_in.run(resid)
        else:
            resid = self.hook_resid_mid.run(resid + attn_out)
            mlp_in = self.hook_mlp_in.run(resid)
        mlp_out = self.mlp(mlp_in if self.ln2 is None else self.ln2(mlp_in))
        if self.post_norms:
            mlp_out = self.ln2_post(self.hook_mlp_out_pre.run(mlp_out))
        mlp_out = self.hook_mlp_out.run(mlp_out)
        if self.parallel:
            return self.hook_resid_post.run(resid + attn_out + mlp_out)
        return self.hook_resid_post.run(resid + mlp_out)
