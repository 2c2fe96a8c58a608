"""Generation: sampling (greedy, temperature, top-k, top-p) with a KV cache, on strings, token
tensors and padded batches, with hooks active at every step and seeing true positions; also
a streaming form that yields each step's new tokens."""

from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens.components import KVCacheEntry, padding_mask

Input = Union[str, list[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]


class KVCache:
    """Every block's keys and values for the tokens run so far, with their attention mask.

    ``model(tokens, past_kv=cache)`` runs only the new tokens: they attend to the cached ones,
    sit at the positions after them, and join the cache. ``attention_mask`` then covers cached
    and new tokens, [batch, key_pos]; when omitted, the cache's own mask grows by ones.
    """

    def __init__(self, n_layers: int):
        self.layers = [KVCacheEntry() for _ in range(n_layers)]
        self.attention_mask: Optional[Tensor] = None  # [batch, key_pos] bool; None: all real

    def __len__(self) -> int:
        return len(self.layers[0])

    def prepare(self, batch: int, n: int, attention_mask: Optional[Tensor], n_ctx: int, device
                ) -> tuple[Int[Tensor, "batch pos"], Optional[Tensor]]:
        """Absolute positions of the n new tokens and the [batch, 1, query_pos, key_pos] mask
        (None when every token is real: causal attention over the cache needs no mask)."""
        past = len(self)
        total = past + n
        if total > n_ctx:
            raise ValueError(f"{past} cached + {n} new tokens = {total} exceeds n_ctx={n_ctx}")
        if past and self.layers[0].k.shape[0] != batch:
            raise ValueError(f"the KV cache holds a batch of {self.layers[0].k.shape[0]}, "
                             f"the new tokens a batch of {batch}")
        am = attention_mask
        if am is None and self.attention_mask is not None:
            am = torch.cat([self.attention_mask, self.attention_mask.new_ones(batch, n)], 1)
        if am is None:
            return torch.arange(past, total, device=device).expand(batch, n), None
        am = am.to(device=device, dtype=torch.bool)
        if am.shape != (batch, total):
            raise ValueError(f"with a KV cache attention_mask covers cached and new tokens: "
                             f"expected {(batch, total)} ({past} cached + {n} new), got {tuple(am.shape)}")
        self.attention_mask = am
        return padding_mask(am, past)


def sample(logits: Float[Tensor, "batch d_vocab"], temperature: Union[int, float] = 1.0,
           top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
           generator: Optional[torch.Generator] = None) -> Int[Tensor, " batch"]:
    """One token per row: argmax when temperature is 0, else a draw from softmax(logits / T)
    restricted to the top_k most likely tokens and to the smallest set with mass >= top_p."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already hold top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an int >= 1 (or None for no top-k)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (or None for no top-p)")


def _prepare(model, input: Input, max_new_tokens: int, attention_mask: Optional[Tensor],
             prepend_bos: bool, padding_side: str):
    """Tokens [batch, pos], their mask (None when all real) and what kind of input came in."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; valid values are 'left' and 'right'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if isinstance(input, str):
        kind, tokens, am = "str", model.to_tokens(input, prepend_bos=prepend_bos), None
    elif isinstance(input, (list, tuple)):
        kind = "list"
        tokens, am = model.to_tokens_with_mask(list(input), prepend_bos=prepend_bos,
                                               padding_side=padding_side)
    else:
        kind = "tensor1d" if isinstance(input, Tensor) and input.ndim == 1 else "tensor"
        tokens, am = model.check_tokens(input), attention_mask
    batch, n = tokens.shape
    if n + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} = "
                         f"{n + max_new_tokens} exceeds n_ctx={model.cfg.n_ctx}; ask for at most "
                         f"{max(model.cfg.n_ctx - n, 0)} new tokens or shorten the prompt")
    if am is not None:
        am = am.to(device=tokens.device, dtype=torch.bool)
        if am.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(am.shape)}, expected {tuple(tokens.shape)}")
        if bool(am.all()):
            am = None
    return tokens, am, kind


def _eos_ids(model, stop_at_eos: bool, eos_token_id) -> list[int]:
    if not stop_at_eos:
        return []
    if eos_token_id is None:
        tok = getattr(model, "tokenizer", None)
        return [] if tok is None else [tok.eos_token_id]
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _next_token_logits(model, tokens: Int[Tensor, "batch pos"], mask: Optional[Tensor],
                       cache: Optional[KVCache], rows: Tensor, at: Tensor
                       ) -> Float[Tensor, "batch d_vocab"]:
    """Logits at position `at` of each row: the blocks run on every token, the model's final
    stage (norm, unembedding and their hooks, hook.positions saying where) on that position only."""
    resid = model(tokens, attention_mask=mask, past_kv=cache, stop_at_layer=model.cfg.n_layers)
    index = (len(cache) if cache is not None else tokens.shape[1]) - tokens.shape[1] + at
    position = index if mask is None else (mask.long().cumsum(-1)[rows, index] - 1).clamp(min=0)
    return model.unembed_stage(resid[rows, at][:, None], position[:, None])[:, 0]


def _steps(model, tokens: Int[Tensor, "batch pos"], am: Optional[Tensor], max_new_tokens: int,
           temperature, top_k, top_p, seed, eos: list[int], use_kv_cache: bool,
           fwd_hooks, progress: bool) -> Iterator[Int[Tensor, " batch"]]:
    """The loop: run the new tokens (all tokens without a cache), sample, yield, repeat."""
    batch = tokens.shape[0]
    device = tokens.device
    gen = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = KVCache(model.cfg.n_layers) if use_kv_cache else None
    rows = torch.arange(batch, device=device)
    last = None if am is None else am.long().cumsum(-1).argmax(-1)  # each row's last real token
    eos_t = torch.tensor(eos, device=device) if eos else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    step_in, mask = tokens, am
    for i in tqdm(range(max_new_tokens), disable=not progress, desc="generate"):
        at = last if i == 0 and last is not None else torch.full_like(rows, step_in.shape[1] - 1)
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            logits = _next_token_logits(model, step_in, mask, cache, rows, at)
        new = sample(logits, temperature, top_k, top_p, gen)
        if eos_t is not None:
            new = torch.where(finished, eos[0], new)  # finished rows continue with EOS
            finished |= torch.isin(new, eos_t)
        yield new
        if eos_t is not None and bool(finished.all()):
            return
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        step_in = new[:, None] if use_kv_cache else torch.cat([step_in, new[:, None]], 1)


def generate(model, input: Input, max_new_tokens: int = 10, temperature: Union[int, float] = 1.0,
             top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
             seed: Optional[int] = None, stop_at_eos: bool = True,
             eos_token_id: Union[int, Sequence[int], None] = None, use_kv_cache: bool = True,
             return_cache: bool = False, fwd_hooks=(), progress: bool = False,
             prepend_bos: bool = True, padding_side: str = "left",
             attention_mask: Optional[Tensor] = None):
    """Continue `input` by up to `max_new_tokens` tokens; returns what came in, continued.

    input: a string (→ string), a list of strings (→ list; padded on `padding_side` and
    masked, so each prompt continues as it would alone), or tokens [batch, pos] or [pos]
    (→ tokens [batch, pos + new] or [pos + new]; `attention_mask` marks real tokens of a
    padded batch). Strings come back without the BOS, the padding, or anything from the first
    generated EOS on; tokens come back whole, rows that stopped early continued with EOS.

    temperature=0 is greedy; otherwise tokens are drawn from softmax(logits / temperature),
    restricted by top_k and top_p; `seed` makes the draws reproducible. Generation stops when
    every row has produced an EOS (`eos_token_id`, by default the tokenizer's; with
    stop_at_eos=False or no EOS known it runs max_new_tokens steps). The KV cache runs each
    token through the model once; use_kv_cache=False reruns the whole sequence at each step
    and gives the same tokens. return_cache=True returns (output, ActivationCache) of a
    run_with_cache on the final tokens (and mask), under the same hooks. At each step the
    final LayerNorm and the unembedding run on the last position only, so their hooks
    (ln_final.*, hook_logits) see one position.

    Hooks run at every step, from `fwd_hooks=` or an enclosing ``with model.hooks(...)``.
    ``hook.positions`` [batch, pos] gives the absolute positions that the activation's pos
    axis covers (under the cache, only the new token's), so a hook that edits position p
    edits the token at p, once, with or without the cache. Steering, for example:

        steer = cache_a["resid_pre", 6][0, -1] - cache_b["resid_pre", 6][0, -1]

        def add_steer(resid, hook):                   # every position, every step
            return resid + 4.0 * steer

        def add_steer_at_3(resid, hook):              # only the token at position 3
            return resid + 4.0 * steer * (hook.positions == 3)[..., None]

        model.generate("I think that", 20, temperature=0.7, seed=0,
                       fwd_hooks=[("blocks.6.hook_resid_pre", add_steer)])
    """
    _check_sampling(temperature, top_k, top_p)
    tokens, am, kind = _prepare(model, input, max_new_tokens, attention_mask, prepend_bos,
                                padding_side)
    eos = _eos_ids(model, stop_at_eos, eos_token_id)
    new = list(_steps(model, tokens, am, max_new_tokens, temperature, top_k, top_p, seed, eos,
                      use_kv_cache, fwd_hooks, progress))
    out = torch.cat([tokens, torch.stack(new, 1)], 1) if new else tokens
    full_mask = None if am is None else torch.cat([am, am.new_ones(am.shape[0], len(new))], 1)
    result = _as_input_kind(model, out, full_mask, tokens.shape[1], kind, prepend_bos, eos)
    if not return_cache:
        return result
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(out, attention_mask=full_mask)
    return result, cache


def stream(model, input: Input, max_new_tokens: int = 10, temperature: Union[int, float] = 1.0,
           top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
           seed: Optional[int] = None, stop_at_eos: bool = True,
           eos_token_id: Union[int, Sequence[int], None] = None, use_kv_cache: bool = True,
           fwd_hooks=(), progress: bool = False, prepend_bos: bool = True,
           padding_side: str = "left", attention_mask: Optional[Tensor] = None,
           ) -> Iterator[Union[str, list[str], Int[Tensor, " batch"]]]:
    """generate, one step at a time: yields each step's new tokens, [batch] (the text of the
    token for a string input, a list of texts for a list). Arguments as in generate; the
    same seed gives the same tokens. A character split across tokens shows as U+FFFD."""
    _check_sampling(temperature, top_k, top_p)
    tokens, am, kind = _prepare(model, input, max_new_tokens, attention_mask, prepend_bos,
                                padding_side)
    eos = _eos_ids(model, stop_at_eos, eos_token_id)
    for new in _steps(model, tokens, am, max_new_tokens, temperature, top_k, top_p, seed, eos,
                      use_kv_cache, fwd_hooks, progress):
        if kind == "str":
            yield model.to_string(new[:1])
        elif kind == "list":
            yield [model.to_string(t[None]) for t in new]
        else:
            yield new


def _as_input_kind(model, out: Int[Tensor, "batch pos"], mask: Optional[Tensor], n_prompt: int,
                   kind: str, prepend_bos: bool, eos: list[int]):
    """The output in the input's form; strings keep only the prompt and its real continuation."""
    if kind == "tensor":
        return out
    if kind == "tensor1d":
        return out[0]
    texts = []
    for i, row in enumerate(out.tolist()):
        keep = range(len(row)) if mask is None else mask[i].nonzero()[:, 0].tolist()
        prompt = [row[j] for j in keep if j < n_prompt][1 if prepend_bos else 0:]
        cont = row[n_prompt:]
        stop = next((j for j, t in enumerate(cont) if t in eos), len(cont))
        texts.append(model.to_string(prompt + cont[:stop]))
    return texts[0] if kind == "str" else texts
