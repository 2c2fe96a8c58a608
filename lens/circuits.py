"""Head-level circuit measures from "A Mathematical Framework for Transformer Circuits": Q-, K- and
V-composition scores between every pair of heads, head detectors scored on attention patterns
(previous-token, duplicate-token, induction, custom), and the OV circuit's copying score."""

from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens import sites
from lens.cache import ActivationCache
from lens.patterns import LazyPattern
from lens.factored import FactoredMatrix
from lens.generate import check_seed
from lens.patching import Prompts, as_tokens

KINDS = ("q", "k", "v")
Target = Union[Tensor, Callable]


def _float(x: Tensor) -> Tensor:
    return x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()


def _left_core(X: Tensor, Y: Tensor) -> Tensor:
    """C with ‖(X Y) M‖_F == ‖C M‖_F for every M: X = QR with orthonormal Q, so C = R Y."""
    return torch.linalg.qr(X)[1] @ Y


def _right_core(X: Tensor, Y: Tensor) -> Tensor:
    """C with ‖M (X Y)‖_F == ‖M C‖_F for every M: Yᵀ = QR with orthonormal Q, so C = X Rᵀ."""
    return X @ torch.linalg.qr(Y.mT)[1].mT


def _reader(W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """The later head's matrix W_B = X Y: QK = W_Q W_Kᵀ, QKᵀ = W_K W_Qᵀ or OV = W_V W_O."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; valid kinds are {KINDS} (Q-, K-, V-composition)")
    return {"q": (W_Q, W_K.mT), "k": (W_K, W_Q.mT), "v": (W_V, W_O)}[kind]


def _scores(left: Tensor, right: Tensor) -> Tensor:
    """‖left_a right_b‖ / (‖left_a‖ ‖right_b‖) for every a in left [A, m, d] and b in right
    [B, d, n], as [A, B], one row of a at a time (never more than [B, m, n] at once)."""
    n_left = left.flatten(-2).norm(dim=-1)
    n_right = right.flatten(-2).norm(dim=-1)
    num = torch.stack([(a @ right).flatten(-2).norm(dim=-1) for a in left])
    return num / (n_left[:, None] * n_right[None, :])


@torch.no_grad()
def composition_scores(model, kind: str = "q") -> Float[Tensor, "n_layers n_heads n_layers n_heads"]:
    """scores[l1, h1, l2, h2] = ‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F), with W_A = OV of head (l1, h1)
    and W_B the QK (kind "q"), QKᵀ ("k") or OV ("v") of the later head (l2, h2), in the
    row-vector convention of lens.factored.composition_score. NaN where l2 <= l1.

    Each d_model × d_model circuit is replaced by a thin core with the same products' norms
    (OV = Q R W_O with orthonormal Q, so ‖OV M‖ = ‖R W_O M‖), so no d_model × d_model matrix
    is formed. The weights are used as they are: load with LayerNorm folded for the paper's."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W = [_float(w) for w in (model.W_Q, model.W_K, model.W_V, model.W_O)]
    left = _left_core(W[2], W[3])  # [L, H, r, d_model]
    right = _right_core(*_reader(*W, kind))  # [L, H, d_model, r]
    out = torch.full((L, H, L, H), float("nan"), dtype=left.dtype, device=left.device)
    for l in range(L - 1):
        s = _scores(left[l], right[l + 1:].flatten(0, 1))
        out[l, :, l + 1:] = s.view(H, L - l - 1, H)
    return out


@torch.no_grad()
def random_composition_baseline(model, kind: str = "q", n_samples: int = 1000,
                                seed: int = 0) -> Float[Tensor, "n_samples"]:
    """Composition scores of `n_samples` pairs of random Gaussian heads with this model's
    shapes (W_V, W_Q, W_K: [d_model, d_head]; W_O: [d_head, d_model]): the baseline a score
    is compared with (the paper subtracts its mean)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; valid kinds are {KINDS} (Q-, K-, V-composition)")
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    d, e = model.cfg.d_model, model.cfg.d_head
    g = torch.Generator().manual_seed(check_seed(seed, optional=False))
    dtype = _float(model.W_E[:1]).dtype
    out = []
    for start in range(0, n_samples, 64):
        n = min(64, n_samples - start)
        W_V, W_Q, W_K = (torch.randn(n, d, e, generator=g, dtype=dtype) for _ in range(3))
        W_O, W_O2 = (torch.randn(n, e, d, generator=g, dtype=dtype) for _ in range(2))
        W_V2 = torch.randn(n, d, e, generator=g, dtype=dtype)
        X, Y = _reader(W_Q, W_K, W_V2, W_O2, kind)
        left, right = _left_core(W_V, W_O), _right_core(X, Y)
        num = (left @ right).flatten(-2).norm(dim=-1)
        out.append(num / (left.flatten(-2).norm(dim=-1) * right.flatten(-2).norm(dim=-1)))
    return torch.cat(out).to(model.W_E.device)


# ---------------------------------------------------------------------- head detectors
def _pattern_names(model) -> list[str]:
    return [sites.name("pattern", l) for l in range(model.cfg.n_layers)]


def _check_target(target: Tensor, batch: int, n_pos: int) -> Tensor:
    if target.ndim == 2:
        target = target[None]
    if target.ndim != 3 or target.shape[1:] != (n_pos, n_pos) or target.shape[0] not in (1, batch):
        raise ValueError(f"a target pattern must be [query_pos, key_pos] = {(n_pos, n_pos)} or "
                         f"[batch, query_pos, key_pos] = {(batch, n_pos, n_pos)}, got "
                         f"{tuple(target.shape)}")
    return target.expand(batch, -1, -1)


def _add_scores(patterns: list, target: Tensor, total: Tensor) -> int:
    """Add each head's attention mass on `target` summed over the rows that have a target
    (any nonzero entry); return the number of such rows."""
    target = target.to(patterns[0].device, total.dtype)
    rows = target.sum(-1) > 0  # [batch, query_pos]
    for l, p in enumerate(patterns):
        p = p.tensor() if isinstance(p, LazyPattern) else p  # one layer's pattern at a time
        mass = torch.einsum("bhqk,bqk->bhq", p.to(total.dtype), target)
        total[l] += (mass * rows[:, None]).sum((0, 2))
    return int(rows.sum())


@torch.no_grad()
def detect_head(model, tokens: Union[Prompts, ActivationCache], pattern: Target,
                batch_size: int = 32) -> Float[Tensor, "n_layers n_heads"]:
    """How closely each head attends as `pattern` says: its attention mass on the target
    entries, averaged over the query rows that have a target (1.0: all of the mass, always).

    pattern: a [query_pos, key_pos] or [batch, query_pos, key_pos] mask (0/1, or weights in
    [0, 1]), or a function tokens [b, pos] -> such a mask. `tokens` may instead be a cache
    holding every layer's hook_pattern (then pattern must be a tensor); tokens are whatever
    lens.patching.as_tokens takes (a tensor, lists of ids, strings of one token length). Only
    the patterns are cached, `batch_size` prompts at a time, lazily (each layer's queries and
    keys; the patterns are computed one layer at a time as they are scored)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    total = torch.zeros(L, H, dtype=torch.float64)
    names = _pattern_names(model)
    if isinstance(tokens, ActivationCache):
        if not isinstance(pattern, Tensor):
            raise ValueError("a pattern function needs tokens; with a cache give a target tensor")
        pats = [tokens[n] for n in names]
        if pats[0].ndim != 4:
            raise ValueError(f"cached patterns have shape {tuple(pats[0].shape)}; detectors need "
                             "[batch, n_heads, query_pos, key_pos] (no pos_slice/remove_batch_dim)")
        batch, n_pos = pats[0].shape[0], pats[0].shape[-1]
        total = total.to(pats[0].device)
        rows = _add_scores(pats, _check_target(pattern, batch, n_pos), total)
    else:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        tokens = as_tokens(model, tokens)
        n_pos, rows, start = tokens.shape[1], 0, 0
        total = total.to(tokens.device)
        full = None if callable(pattern) else _check_target(pattern, tokens.shape[0], n_pos)
        for chunk in tokens.split(batch_size):
            _, cache = model.run_with_cache(chunk, names_filter=names, stop_at_layer="auto",
                                            lazy_patterns=True)
            b = chunk.shape[0]
            target = (_check_target(pattern(chunk), b, n_pos) if full is None
                      else full[start:start + b])
            rows += _add_scores([cache[n] for n in names], target, total)
            start += b
    if rows == 0:
        raise ValueError("the target pattern has no nonzero entry in any query row, so no head "
                         "can be scored; check the pattern and the tokens")
    return (total / rows).to(_float(model.W_E[:1]).dtype)


def previous_token_pattern(n_pos: int) -> Float[Tensor, "n_pos n_pos"]:
    """The target of a previous-token head: query q attends to key q − 1 (rows q >= 1)."""
    return torch.diag(torch.ones(n_pos - 1), diagonal=-1)


def duplicate_token_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos pos"]:
    """The target of a duplicate-token head: earlier positions holding the same token."""
    same = tokens[:, :, None] == tokens[:, None, :]
    return (same & torch.ones_like(same[0]).tril(-1)).float()


def induction_pattern(seq_len: int) -> Float[Tensor, "n_pos n_pos"]:
    """For a random sequence of seq_len tokens repeated twice: query q >= seq_len attends to the
    token after the previous occurrence of its token, q − seq_len + 1."""
    target = torch.zeros(2 * seq_len, 2 * seq_len)
    q = torch.arange(seq_len, 2 * seq_len)
    target[q, q - seq_len + 1] = 1.0
    return target


def repeated_tokens(model, seq_len: Optional[int] = None, batch: int = 8,
                    seed: int = 0) -> Int[Tensor, "batch pos"]:
    """`batch` random sequences of `seq_len` tokens (default n_ctx // 2), each repeated twice."""
    seq_len = model.cfg.n_ctx // 2 if seq_len is None else seq_len
    if not 2 <= seq_len <= model.cfg.n_ctx // 2:
        raise ValueError(f"seq_len={seq_len}: the repeated sequence (2 × seq_len) must fit "
                         f"n_ctx={model.cfg.n_ctx}, and seq_len must be >= 2")
    g = torch.Generator().manual_seed(check_seed(seed, optional=False))
    half = torch.randint(0, model.cfg.d_vocab, (batch, seq_len), generator=g)
    return half.repeat(1, 2).to(model.W_E.device)


def previous_token_scores(model, tokens: Union[Prompts, ActivationCache],
                          batch_size: int = 32) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention from each position to the one before it (tokens, or a cache of patterns)."""
    if isinstance(tokens, ActivationCache):
        n_pos = tokens[_pattern_names(model)[0]].shape[-1]
    else:
        tokens = as_tokens(model, tokens)
        n_pos = tokens.shape[-1]
    return detect_head(model, tokens, previous_token_pattern(n_pos), batch_size)


def duplicate_token_scores(model, tokens: Prompts,
                           cache: Optional[ActivationCache] = None,
                           batch_size: int = 32) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention to earlier copies of the current token, over rows that have one (the
    tokens are needed to find the copies; a cache of their patterns saves the forward)."""
    tokens = as_tokens(model, tokens)
    if cache is not None:
        return detect_head(model, cache, duplicate_token_pattern(tokens), batch_size)
    return detect_head(model, tokens, duplicate_token_pattern, batch_size)


def induction_scores(model, seq_len: Optional[int] = None, batch: int = 8, seed: int = 0,
                     batch_size: int = 32) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention, over the second copy of repeated random tokens, to the token after the
    previous occurrence of the current token (see repeated_tokens, induction_pattern)."""
    tokens = repeated_tokens(model, seq_len, batch, check_seed(seed, optional=False))
    return detect_head(model, tokens, induction_pattern(tokens.shape[1] // 2), batch_size)


@torch.no_grad()
def ov_copying_scores(model) -> Float[Tensor, "n_layers n_heads"]:
    """The paper's copying score Σλ / Σ|λ| of each head's full OV circuit W_E W_V W_O W_U
    (d_vocab × d_vocab): +1 when all eigenvalues are positive (copying), −1 when all are
    negative. Its nonzero eigenvalues are those of the factored W_V · (W_O W_U W_E), whose
    eigenvalues FactoredMatrix computes from the d_head × d_head product."""
    W_UE = _float(model.W_U) @ _float(model.W_E)  # [d_model, d_model], shared by every head
    circuit = FactoredMatrix(_float(model.W_V), _float(model.W_O) @ W_UE)
    lam = circuit.eigenvalues
    return lam.sum(-1).real / lam.abs().sum(-1)


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]


def plot_head_scores(scores: Tensor, path: Union[None, str, Path] = None, title: str = ""):
    """Heat map of [n_layers, n_heads] head scores, or of [n_layers, n_heads, n_layers, n_heads]
    composition scores as (earlier head) × (later head), labelled "L{l}H{h}"."""
    from lens.plot import heatmap
    if scores.ndim == 2:
        L, H = scores.shape
        return heatmap(scores, [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)],
                       title=title, xlabel="head", ylabel="layer", path=path, centered=False)
    if scores.ndim != 4 or scores.shape[:2] != scores.shape[2:]:
        raise ValueError(f"scores must be [n_layers, n_heads] or [n_layers, n_heads, n_layers, "
                         f"n_heads], got {tuple(scores.shape)}")
    L, H = scores.shape[:2]
    labels = head_labels(L, H)
    grid = scores.reshape(L * H, L * H).nan_to_num(0.0)
    return heatmap(grid, labels, labels, title=title, xlabel="later head", ylabel="earlier head",
                   path=path, centered=False, annotate=False)
