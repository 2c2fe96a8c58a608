"""Direct logit attribution and the logit lens: how much each write to the residual stream moves
a logit difference through the final norm with its scale frozen, and what the unembedding
reads from the stream after each layer."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens import sites
from lens.cache import ActivationCache
from lens.components import softcap
from lens.patching import Prompts, as_tokens

Tokens = Union[int, str, Sequence, Tensor]
Pos = Union[int, Tensor]
PER = ("layer", "head", "neuron", "component")
_HALF = (torch.float16, torch.bfloat16)


def _token_ids(model, tokens: Tokens, what: str) -> Int[Tensor, "n"]:
    return model.token_ids(tokens, what).reshape(-1)


def logit_diff_direction(model, answer_tokens: Tokens,
                         wrong_tokens: Optional[Tokens] = None) -> Float[Tensor, "batch d_model"]:
    """W_U[:, answer] − W_U[:, wrong] for each prompt (just W_U[:, answer] without wrong tokens):
    the residual direction whose dot product with the final normalised stream is the logit
    difference, less the b_U difference."""
    ans = _token_ids(model, answer_tokens, "answer_tokens")
    if wrong_tokens is None:
        return model.logit_direction(ans)
    wrong = _token_ids(model, wrong_tokens, "wrong_tokens")
    if wrong.shape != ans.shape and 1 not in (wrong.numel(), ans.numel()):
        raise ValueError(f"{ans.numel()} answer tokens but {wrong.numel()} wrong tokens; "
                         "give one of each per prompt")
    return model.logit_direction(ans, wrong)


def _ints(x, what: str, device=None) -> Int[Tensor, "n"]:
    """An int, a list of ints or an integer tensor as a flat int64 tensor; floats and bools are
    refused rather than truncated."""
    try:
        t = None if isinstance(x, bool) else torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what}={x!r} must be an int, a list of ints or an integer tensor")
    return t.long().reshape(-1)


def _pos_index(pos, batch: int, n_pos: int, device) -> Int[Tensor, "batch"]:
    """One position per prompt: an int for all prompts or a [batch] tensor."""
    p = _ints(pos, "pos", device)
    if p.numel() == 1:
        p = p.expand(batch)
    if p.shape != (batch,):
        raise ValueError(f"pos has {p.numel()} entries; give an int or one position per prompt "
                         f"({batch})")
    if ((p < -n_pos) | (p >= n_pos)).any():
        raise ValueError(f"pos {p.tolist()} out of range for {n_pos} positions")
    return p % n_pos


def _at(t: Tensor, pidx: Tensor) -> Tensor:
    """[batch, pos, ...] -> [batch, ...] at one position per prompt."""
    return t[torch.arange(t.shape[0], device=t.device), pidx.to(t.device)]


def _final_stream(model, cache: ActivationCache) -> Float[Tensor, "batch pos d_model"]:
    if not cache.has_batch_dim:
        raise ValueError("this needs a cache with its batch axis (run_with_cache without "
                         "remove_batch_dim)")
    resid = cache[sites.name("resid_post", model.cfg.n_layers - 1)]
    if resid.ndim != 3 or getattr(cache, "pos_sliced", False):
        raise ValueError(f"the cached stream has shape {tuple(resid.shape)}; attribution needs "
                         "[batch, pos, d_model] (run_with_cache without pos_slice)")
    return resid


def _ln_final(model, x: Tensor) -> Tensor:
    """The real final norm of x [..., d_model] (identity when the model has none)."""
    return x if model.ln_final is None else model.ln_final.plain(x)


def _like(weight: Tensor, x: Tensor) -> Tensor:
    """A weight on x's device and dtype (the cache may live elsewhere than the model)."""
    return weight.detach().to(x.device, x.dtype)


@dataclass
class Attribution:
    """Each component's direct contribution to a logit difference, prompt by prompt.

    values.sum(0) + constant == logit_diff: the components through the frozen final LayerNorm,
    plus LN bias · direction + the b_U difference, give the model's logit difference. With a
    final soft-cap (final_softcap) the unembedding is linear only before the cap, so logit_diff
    and the values are the logit difference before the cap."""

    values: Float[Tensor, "component batch"]
    labels: list
    constant: Float[Tensor, "batch"]
    logit_diff: Float[Tensor, "batch"]
    per: str
    n_layers: int

    def mean(self) -> Float[Tensor, "component"]:
        return self.values.mean(-1)

    def top(self, k: int = 10) -> list:
        """The k components with the largest mean |contribution|, as (label, mean) pairs."""
        m = self.mean()
        order = m.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(m[i])) for i in order]

    def plot(self, path: Union[None, str, Path] = None, title: Optional[str] = None):
        """Mean over prompts: a layer × head (or layer × neuron) heat map, else one line."""
        from lens.plot import heatmap, lines
        title = title or f"direct logit attribution per {self.per}"
        m = self.mean()
        if self.per in ("head", "neuron"):
            grid = m[:-1].reshape(self.n_layers, -1)  # the remainder is left out
            unit = "H" if self.per == "head" else "N"
            cols = [f"{unit}{i}" for i in range(grid.shape[1])] if grid.shape[1] <= 64 else None
            return heatmap(grid, [f"L{l}" for l in range(self.n_layers)], cols, title=title,
                           xlabel=self.per, ylabel="layer", path=path,
                           annotate=None if self.per == "head" else False)
        return lines({"logit diff": m}, x=self.labels, title=title, xlabel="component",
                     ylabel="direct logit attribution", path=path)


@torch.no_grad()
def direct_logit_attribution(model, cache: ActivationCache, answer_tokens: Tokens,
                             wrong_tokens: Optional[Tokens] = None, per: str = "layer",
                             pos: Pos = -1) -> Attribution:
    """Direct logit attribution at `pos` (an int, or one position per prompt) of the logit
    difference answer − wrong (the answer logit when wrong_tokens is None).

    per: "component" (embed, pos_embed, each attn_out and mlp_out), "layer" (embeddings, then
    attn_out + mlp_out of each layer), "head" (each head's z·W_O, then a remainder holding the
    embeddings, MLPs and b_O), or "neuron" (post · W_out row, then a remainder). Where a
    post-norm follows the sublayer (post_norms), heads and neurons go through it with its cached
    scale frozen, as the final norm's is. The cache needs
    the final stream, ln_final.hook_scale and what `per` reads (see dla_hook_names)."""
    if per not in PER:
        raise ValueError(f"per={per!r}; valid values are {PER}")
    cfg = model.cfg
    resid = _final_stream(model, cache)
    batch, n_pos = resid.shape[:2]
    pidx = _pos_index(pos, batch, n_pos, resid.device)
    dtype = torch.float32 if resid.dtype in _HALF else resid.dtype  # 16-bit caches add up in float32
    direction = logit_diff_direction(model, answer_tokens, wrong_tokens).to(resid.device, dtype)
    if direction.shape[0] not in (1, batch):
        raise ValueError(f"{direction.shape[0]} answer tokens for a batch of {batch} prompts")
    direction = direction.expand(batch, -1)
    b_U = model.b_U.detach()
    constant = b_U[_token_ids(model, answer_tokens, "answer_tokens")].expand(batch).clone()
    if wrong_tokens is not None:
        constant = constant - b_U[_token_ids(model, wrong_tokens, "wrong_tokens")]
    constant = constant.to(resid.device, dtype)
    resid = _at(resid, pidx).to(dtype)
    logit_diff = (_ln_final(model, resid) * direction).sum(-1) + constant
    read = direction  # what a component's write is dotted with, the frozen final norm folded in
    if model.ln_final is not None:
        ln = model.ln_final
        constant = constant + ln.bias_along(direction)
        read = ln.read_through(direction, _at(cache["ln_final.hook_scale"], pidx).to(dtype))

    def at(name: str) -> Tensor:
        return _at(cache[name], pidx).to(dtype)

    def dot(name: str) -> Float[Tensor, "batch"]:
        return (at(name) * read).sum(-1)

    def through_post_norm(l: int, norm: str) -> Float[Tensor, "batch d_model"]:
        """What a head's or neuron's write is dotted with: `read`, through the block's post-norm
        with its scale frozen where one follows the sublayer (post_norms)."""
        if not model.blocks[l].post_norms:
            return read
        return getattr(model.blocks[l], norm).read_through(read, at(sites.name("scale", l, norm)))

    labels, values = [], []
    if per in ("head", "neuron"):
        for l in range(cfg.n_layers):
            if per == "head":
                z = at(sites.name("z", l))  # [batch, n_heads, d_head]
                W_O = _like(model.blocks[l].attn.W_O, z)
                values.append(torch.einsum("bhe,hed,bd->hb", z, W_O, through_post_norm(l, "ln1_post")))
                labels += [f"L{l}H{h}" for h in range(cfg.n_heads)]
            else:
                if cfg.attn_only:
                    raise ValueError("per='neuron' on an attention-only model: it has no neurons")
                post = at(sites.name("post", l))  # [batch, d_mlp]
                W_out = _like(model.blocks[l].mlp.W_out, post)
                values.append((post * (through_post_norm(l, "ln2_post") @ W_out.T)).T)
                labels += [f"L{l}N{n}" for n in range(cfg.d_mlp)]
        values = torch.cat(values)
        rest = (resid * read).sum(-1) - values.sum(0)
        values = torch.cat([values, rest[None]])
        labels.append("remainder")
    else:
        embed = dot("hook_embed")
        if cfg.positional_embedding:
            pos_embed = dot("hook_pos_embed")
            if per == "component":
                values += [embed, pos_embed]
                labels += ["embed", "pos_embed"]
            else:
                values.append(embed + pos_embed)
                labels.append("embed")
        else:
            values.append(embed)
            labels.append("embed")
        for l in range(cfg.n_layers):
            attn = dot(sites.name("attn_out", l))
            mlp = None if not cfg.has_mlp else dot(sites.name("mlp_out", l))
            if per == "layer":
                values.append(attn if mlp is None else attn + mlp)
                labels.append(f"L{l}")
            else:
                values.append(attn)
                labels.append(f"{l}_attn_out")
                if mlp is not None:
                    values.append(mlp)
                    labels.append(f"{l}_mlp_out")
        values = torch.stack(values)
    return Attribution(values, labels, constant, logit_diff, per, cfg.n_layers)


def dla_hook_names(model, per: str = "layer") -> list[str]:
    """The hook points direct_logit_attribution(per=...) reads: pass as names_filter."""
    if per not in PER:
        raise ValueError(f"per={per!r}; valid values are {PER}")
    cfg, L = model.cfg, model.cfg.n_layers
    names = [sites.name("resid_post", L - 1)]
    if cfg.normalization is not None:
        names.append("ln_final.hook_scale")
    if per == "head":
        names += [sites.name("z", l) for l in range(L)]
    elif per == "neuron":
        names += [sites.name("post", l) for l in range(L)]
    if per in ("head", "neuron") and cfg.post_norms and cfg.normalization is not None:
        norm = "ln1_post" if per == "head" else "ln2_post"
        names += [sites.name("scale", l, norm) for l in range(L)]
    else:
        names += ["hook_embed"] + (["hook_pos_embed"] if cfg.positional_embedding else [])
        for l in range(L):
            names.append(sites.name("attn_out", l))
            if not cfg.attn_only:
                names.append(sites.name("mlp_out", l))
    return names


@dataclass
class LogitLens:
    """Log-probabilities read from the stream entering each block and from the final stream."""

    log_probs: Float[Tensor, "layer batch d_vocab"]
    labels: list

    def answer_stats(self, answer_tokens: Union[int, Sequence[int], Tensor]
                     ) -> tuple[Int[Tensor, "layer batch"], Float[Tensor, "layer batch"]]:
        """(rank, probability) of each prompt's answer token after each layer; rank 0 = top."""
        n_layer, batch, d_vocab = self.log_probs.shape
        ids = _ints(answer_tokens, "answer_tokens", self.log_probs.device)
        if ids.numel() not in (1, batch) or ((ids < 0) | (ids >= d_vocab)).any():
            raise ValueError(f"answer_tokens {ids.tolist()} must be one id in [0, {d_vocab}) "
                             f"or one per prompt ({batch})")
        lp = self.log_probs.gather(-1, ids.expand(batch)[None, :, None].expand(n_layer, batch, 1))
        rank = (self.log_probs > lp).sum(-1)
        return rank, lp[..., 0].exp()

    def plot(self, answer_tokens=None, path: Union[None, str, Path] = None,
             title: str = "logit lens"):
        """Probability of each prompt's answer (default: the final top-1 token) after each layer."""
        from lens.plot import lines
        if answer_tokens is None:
            answer_tokens = self.log_probs[-1].argmax(-1)
        _, prob = self.answer_stats(answer_tokens)
        series = {"mean": prob.mean(-1)}
        if prob.shape[1] <= 8:
            series.update({f"prompt {b}": prob[:, b] for b in range(prob.shape[1])})
        return lines(series, x=self.labels, title=title, xlabel="stream",
                     ylabel="p(answer)", path=path)


@torch.no_grad()
def logit_lens(model, cache: Optional[ActivationCache] = None, pos: Pos = -1,
               tokens: Optional[Prompts] = None,
               freeze_scale: bool = False) -> LogitLens:
    """Unembed the stream entering each block and the final stream at `pos`: log-probs
    [n_layers + 1, batch, d_vocab]. By default each stream goes through the real final
    LayerNorm (its own scale); freeze_scale=True divides by the final stream's cached scale
    instead. The last row equals the model's own log-probs. Give a cache, or tokens to run
    (whatever lens.patching.as_tokens takes: a tensor, lists of ids, strings of one length)."""
    cfg, L = model.cfg, model.cfg.n_layers
    names = [sites.name("resid_pre", l) for l in range(L)] + [sites.name("resid_post", L - 1)]
    if cache is None:
        if tokens is None:
            raise ValueError("logit_lens needs a cache or tokens=")
        need = names + (["ln_final.hook_scale"] if freeze_scale and cfg.normalization else [])
        tokens = as_tokens(model, tokens)
        _, cache = model.run_with_cache(tokens, names_filter=need, stop_at_layer="auto")
    resid = _final_stream(model, cache)
    pidx = _pos_index(pos, resid.shape[0], resid.shape[1], resid.device)
    stack = torch.stack([_at(cache[n], pidx) for n in names])  # [layer, batch, d_model]
    stack = stack.float() if stack.dtype in _HALF else stack
    if cfg.normalization is None:
        normed = stack
    elif freeze_scale:
        ln = model.ln_final
        normed = ln.frozen(stack, _at(cache["ln_final.hook_scale"], pidx).to(stack.dtype))
        if ln.b is not None:
            normed = normed + _like(ln.b, normed)
    else:
        normed = _ln_final(model, stack)
    logits = normed @ _like(model.W_U, normed) + _like(model.b_U, normed)
    if cfg.final_softcap is not None:  # read as the model reads its own final stream
        logits = softcap(logits, cfg.final_softcap)
    labels = [f"{l}_pre" for l in range(L)] + ["final_post"]
    return LogitLens(torch.log_softmax(logits, dim=-1), labels)
