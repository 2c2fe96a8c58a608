"""Generation: sampling (greedy, temperature, top-k, top-p, frequency penalty) with a KV cache,
on strings, token tensors and padded batches, with hooks active at every step and seeing true
positions; also a streaming form that yields each step's new tokens. TransformerLens's keywords
(do_sample, return_type, output_logits, use_past_kv_cache, verbose) and its KV cache
(init_cache, freeze) are accepted as they are there."""

import operator
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens.components import KVCacheEntry, padding_mask

Input = Union[str, list[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
EosIds = Union[int, str, Sequence[Union[int, str]], Tensor, None]  # ids or one-token strings
Mask = Union[Tensor, np.ndarray, list, None]  # [batch, pos]: 1 or True at real tokens


class CacheEntry(KVCacheEntry):
    """One block's cached keys and values; a frozen entry is read but not appended to
    (TransformerLens's past_keys / past_values name what it holds)."""

    def __init__(self, empty_shape: Optional[tuple] = None, dtype=None, device=None):
        super().__init__()
        self.frozen = False
        self._empty = (empty_shape, dtype, device)  # what past_keys shows before any token

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not self.frozen:
            return super().append(k, v)
        if self.k is None:
            return k, v
        return torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)

    def _or_empty(self, t: Optional[Tensor]) -> Optional[Tensor]:
        shape, dtype, device = self._empty
        return t if t is not None or shape is None else torch.empty(shape, dtype=dtype, device=device)

    past_keys = property(lambda self: self._or_empty(self.k), doc="[batch, key_pos, n_kv_heads, d_head]")
    past_values = property(lambda self: self._or_empty(self.v), doc="[batch, key_pos, n_kv_heads, d_head]")


class KVCache:
    """Every block's keys and values for the tokens run so far, with their attention mask.

    ``model(tokens, past_kv=cache)`` (TransformerLens: ``past_kv_cache=cache``) runs only the
    new tokens: they attend to the cached ones, sit at the positions after them, and join the
    cache. ``attention_mask`` then covers either the new tokens only, [batch, pos], as in
    TransformerLens, or cached and new tokens, [batch, key_pos]; when omitted, the cache's own
    mask grows by ones. A frozen cache (``freeze()``) is read but neither its keys, values nor
    mask grow: run a shared prefix once, then many continuations of it. TransformerLens's
    ``HookedTransformerKeyValueCache.init_cache(cfg, device, batch_size)`` makes an empty one.
    """

    def __init__(self, n_layers: int, batch_size: Optional[int] = None):
        self.layers = [CacheEntry() for _ in range(n_layers)]
        self.attention_mask: Optional[Tensor] = None  # [batch, key_pos] bool; None: all real
        self.batch_size = batch_size
        self.frozen = False

    @classmethod
    def init_cache(cls, cfg, device=None, batch_size: int = 1) -> "KVCache":
        """An empty cache for a model of config `cfg` and `batch_size` prompts (TransformerLens's
        signature); device and dtype are where the model runs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        heads = getattr(cfg, "n_kv_heads", None) or getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        shape = (batch_size, 0, heads, cfg.d_head)
        dtype = getattr(cfg, "dtype", None)
        cache = cls(cfg.n_layers, batch_size)
        cache.layers = [CacheEntry(shape, dtype, device) for _ in range(cfg.n_layers)]
        return cache

    def freeze(self) -> None:
        """Read the cache without adding to it (until unfreeze())."""
        self.frozen = True
        for entry in self.layers:
            entry.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for entry in self.layers:
            entry.frozen = False

    @property
    def entries(self) -> list[CacheEntry]:
        """TransformerLens's name for the per-block entries."""
        return self.layers

    def __getitem__(self, layer: int) -> CacheEntry:
        return self.layers[layer]

    @property
    def previous_attention_mask(self) -> Tensor:
        """[batch, key_pos] int mask of the cached tokens (1: real), as TransformerLens keeps it."""
        if self.attention_mask is not None:
            return self.attention_mask.int()
        k = self.layers[0].k
        batch = k.shape[0] if k is not None else (self.batch_size or 1)
        device = k.device if k is not None else None
        return torch.ones(batch, len(self), dtype=torch.int, device=device)

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
        held = self.layers[0].k.shape[0] if past else self.batch_size
        if held is not None and held != batch:
            raise ValueError(f"the KV cache holds a batch of {held}, the new tokens a batch of {batch}")
        am = attention_mask
        if am is not None:
            am = am.to(device=device, dtype=torch.bool)
            if past and am.shape == (batch, n):  # the new tokens' mask, as TransformerLens
                before = (self.attention_mask if self.attention_mask is not None
                          else am.new_ones(batch, past))
                am = torch.cat([before.to(device), am], 1)
        elif self.attention_mask is not None:
            am = torch.cat([self.attention_mask, self.attention_mask.new_ones(batch, n)], 1)
        if am is None:
            return torch.arange(past, total, device=device).expand(batch, n), None
        if am.shape != (batch, total):
            raise ValueError(f"with a KV cache attention_mask covers the new tokens, {(batch, n)}, "
                             f"or cached and new tokens, {(batch, total)} ({past} cached + {n} new); "
                             f"got {tuple(am.shape)}")
        if not self.frozen:
            self.attention_mask = am
        return padding_mask(am, past)


def sample(logits: Tensor, temperature: Union[int, float] = 1.0,
           top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
           generator: Optional[torch.Generator] = None, freq_penalty: Union[int, float] = 0.0,
           counts: Optional[Float[Tensor, "batch d_vocab"]] = None) -> Int[Tensor, " batch"]:
    """One token per row of logits [batch, d_vocab]: argmax when temperature is 0, else a draw
    from softmax(logits / T − freq_penalty · counts) (counts: how often each token occurred so
    far, as TransformerLens's frequency penalty) restricted to the top_k most likely tokens and
    to the smallest set with mass >= top_p. A row holding NaN, +inf (when sampling) or only
    -inf has no next token and is refused."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [batch, d_vocab], one row per prompt, got {got} (for "
                         "a model's output [batch, pos, d_vocab] take a position: logits[:, -1])")
    _check_sampling(temperature, top_k, top_p, freq_penalty)
    if temperature == 0:
        _check_rows(logits, logits.isnan().any(-1) | logits.isneginf().all(-1), "chosen")
        return logits.argmax(-1)
    raw = logits
    logits = logits.float() / temperature
    if freq_penalty:
        if counts is None:
            raise ValueError("freq_penalty needs the counts of the tokens so far, [batch, d_vocab]")
        logits = logits - freq_penalty * counts
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already hold top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # NaN in a row of NaN, +inf or only -inf
    _check_rows(raw, probs.isnan().any(-1), "drawn", temperature)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_rows(logits: Float[Tensor, "batch d_vocab"], bad: Tensor, how: str,
                temperature=None) -> None:
    """Refuse the rows marked bad, saying what their logits hold (one host sync)."""
    if not bool(bad.any()):
        return
    rows = bad.nonzero()[:, 0].tolist()
    row = logits[rows[0]]
    if bool(row.isnan().any()):
        what = "NaN"
    elif bool(row.isposinf().any()):
        what = "+inf (softmax is undefined; to force a token set the others to -inf)"
    elif bool(row.isneginf().all()):
        what = "-inf at every token"
    else:
        what = f"values that overflow when divided by temperature={temperature!r}"
    raise ValueError(f"no next token can be {how} for row(s) {rows} of the batch: the logits of "
                     f"row {rows[0]} hold {what}. Check the hooks that edit the stream or "
                     "hook_logits; a masked token's logit is -inf, with at least one finite left")


def _check_sampling(temperature, top_k, top_p, freq_penalty=0.0) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an int >= 1 (or None for no top-k)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (or None for no top-p)")
    if isinstance(freq_penalty, bool) or not isinstance(freq_penalty, (int, float)) or not freq_penalty >= 0:
        raise ValueError(f"freq_penalty={freq_penalty!r} must be a number >= 0 (0: no penalty)")


def check_seed(seed, what: str = "seed", optional: bool = True) -> Optional[int]:
    """`seed` as an int in the range torch's generators take, [-2**63, 2**64 - 1] (None, where
    optional, for no seed: torch's global generator)."""
    if seed is None and optional:
        return None
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -2 ** 63 <= value < 2 ** 64:
        valid = "an int in [-2**63, 2**64 - 1]" + (" or None (no seed)" if optional else "")
        raise ValueError(f"{what}={seed!r} must be {valid}")
    return value


def _check_hooks(model, fwd_hooks) -> list:
    """fwd_hooks as a list of (names, fn) pairs, every name checked against the model's hook
    points now, before any step runs (also when none does)."""
    hooks = list(fwd_hooks)
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"fwd_hooks entry {entry!r} must be a (hook name, function) pair")
        name, fn = entry
        model.hook_names_matching(name)
        if not callable(fn):
            raise TypeError(f"hook function for {name!r} is not callable: {fn!r}")
    return hooks


def _alias(lens_value, lens_name: str, tl_value, tl_name: str, default):
    """One option under its lens name and its TransformerLens name: None means not given."""
    if lens_value is not None and tl_value is not None and bool(lens_value) != bool(tl_value):
        raise ValueError(f"{lens_name}={lens_value!r} and {tl_name}={tl_value!r} are the same "
                         "option (lens's and TransformerLens's names); give one")
    given = lens_value if lens_value is not None else tl_value
    return default if given is None else bool(given)


def _options(model, temperature, top_k, top_p, do_sample, freq_penalty, use_kv_cache,
             use_past_kv_cache, progress, verbose, prepend_bos, padding_side) -> dict:
    """The options both generate and stream take, resolved: do_sample=False is greedy whatever
    the temperature; the TransformerLens names alias lens's; None takes the model's default."""
    _check_sampling(temperature, top_k, top_p, freq_penalty)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r} must be True, False or None")
    if prepend_bos is None:
        prepend_bos = getattr(model, "default_prepend_bos", True)
    return dict(temperature=0 if do_sample is False else temperature, top_k=top_k, top_p=top_p,
                freq_penalty=freq_penalty,
                use_kv_cache=_alias(use_kv_cache, "use_kv_cache", use_past_kv_cache,
                                    "use_past_kv_cache", True),
                progress=_alias(progress, "progress", verbose, "verbose", False),
                prepend_bos=bool(prepend_bos), padding_side="left" if padding_side is None else padding_side)


def _prepare(model, input: Input, max_new_tokens: int, attention_mask: Mask,
             prepend_bos: bool, padding_side: str):
    """Tokens [batch, pos], their mask (None when all real) and what kind of input came in."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; valid values are 'left' and 'right'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if isinstance(input, (str, list, tuple)) and attention_mask is not None:
        raise ValueError("attention_mask is for token input: lens tokenizes a string or a list "
                         "of strings itself and masks the padding it adds; pass the tokens "
                         "(model.to_tokens_with_mask) to give your own mask")
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
        from lens.model import check_mask
        am = check_mask(am, tokens.device)
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
        return [] if tok is None or tok.eos_token_id is None else [tok.eos_token_id]
    valid = (f"eos_token_id={eos_token_id!r}: give a token id in [0, d_vocab={model.cfg.d_vocab}), "
             "a string that is one token of the model's tokenizer, or a list of them")
    items = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if any(isinstance(i, bool) or not isinstance(i, (int, str, Tensor)) for i in items):
        raise ValueError(valid)  # model.token_ids checks the ids, tensors and strings
    try:
        return model.token_ids(eos_token_id, "eos_token_id").reshape(-1).tolist()
    except ValueError as e:
        raise ValueError(f"{valid} ({e})") from None


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
           fwd_hooks, progress: bool, freq_penalty=0.0
           ) -> Iterator[tuple[Int[Tensor, " batch"], Float[Tensor, "batch d_vocab"]]]:
    """The loop: run the new tokens (all tokens without a cache), sample, yield the new tokens
    and the logits they were drawn from, repeat."""
    batch = tokens.shape[0]
    device = tokens.device
    gen = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = KVCache(model.cfg.n_layers) if use_kv_cache else None
    rows = torch.arange(batch, device=device)
    last = None if am is None else am.long().cumsum(-1).argmax(-1)  # each row's last real token
    eos_t = torch.tensor(eos, device=device) if eos else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    counts = None
    if freq_penalty and temperature:  # how often each token occurs in each row (real tokens)
        counts = torch.zeros(batch, model.cfg.d_vocab, device=device)
        counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype) if am is None
                            else am.to(counts.dtype))
    step_in, mask = tokens, am
    for i in tqdm(range(max_new_tokens), disable=not progress, desc="generate"):
        at = last if i == 0 and last is not None else torch.full_like(rows, step_in.shape[1] - 1)
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            logits = _next_token_logits(model, step_in, mask, cache, rows, at)
        new = sample(logits, temperature, top_k, top_p, gen, freq_penalty, counts)
        if eos_t is not None:
            new = torch.where(finished, eos[0], new)  # finished rows continue with EOS
            finished |= torch.isin(new, eos_t)
        if counts is not None:
            counts[rows, new] += 1
        yield new, logits
        if eos_t is not None and bool(finished.all()):
            return
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        step_in = new[:, None] if use_kv_cache else torch.cat([step_in, new[:, None]], 1)


class GenerateOutput(NamedTuple):
    """generate(..., output_logits=True): the tokens, prompt and continuation, [batch, pos +
    new], and the logits each new token was drawn from, one [batch, d_vocab] per step (as
    TransformerLens returns them, in HF's GenerateDecoderOnlyOutput form: out.sequences,
    out.logits, out["logits"], out[0])."""

    sequences: Int[Tensor, "batch pos"]
    logits: tuple[Float[Tensor, "batch d_vocab"], ...]

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        return self._fields

    def to_tuple(self) -> tuple:
        return tuple(self)


RETURN_TYPES = ("input", "str", "tokens", "tensor")


def generate(model, input: Input, max_new_tokens: int = 10, temperature: Union[int, float] = 1.0,
             top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
             seed: Optional[int] = None, stop_at_eos: bool = True,
             eos_token_id: EosIds = None, use_kv_cache: Optional[bool] = None,
             return_cache: bool = False, fwd_hooks=(), progress: Optional[bool] = None,
             prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
             attention_mask: Mask = None, do_sample: Optional[bool] = None,
             freq_penalty: Union[int, float] = 0.0, return_type: str = "input",
             output_logits: bool = False, use_past_kv_cache: Optional[bool] = None,
             verbose: Optional[bool] = None):
    """Continue `input` by up to `max_new_tokens` tokens; returns what came in, continued.

    input: a string (→ string), a list of strings (→ list; padded on `padding_side`, left by
    default, and masked, so each prompt continues as it would alone), or tokens [batch, pos]
    or [pos] (→ tokens [batch, pos + new] or [pos + new]; `attention_mask` marks real tokens of
    a padded batch, and is refused with strings, whose mask lens makes). Strings come back
    without the BOS, the padding, or anything from the first generated EOS on; tokens come
    back whole, rows that stopped early continued with EOS.
    return_type="str" or "tokens" asks for the other form, as TransformerLens ("tokens" of a
    string are [1, pos + new]; "str" of tokens is one text per row, special tokens skipped, a
    str for a single row). prepend_bos=None is model.default_prepend_bos.

    temperature=0 is greedy; otherwise tokens are drawn from softmax(logits / temperature),
    restricted by top_k and top_p; `seed` makes the draws reproducible (without it they come
    from torch's global generator). do_sample=False is greedy whatever the temperature;
    freq_penalty subtracts freq_penalty × (count of the token so far in the row) from the
    scaled logits when sampling, as TransformerLens. Generation stops when every row has
    produced an EOS (`eos_token_id`: an id, a string that is one token, or a list of them; by
    default the tokenizer's; with stop_at_eos=False or no EOS known it runs max_new_tokens
    steps). A step whose logits hold NaN, or only -inf, is refused, as sampling from +inf is.
    The KV cache runs each token through the model once; use_kv_cache=False reruns the whole
    sequence at each step and gives the same tokens.
    return_cache=True returns (output, ActivationCache) of a run_with_cache on the final
    tokens (and mask), under the same hooks. output_logits=True returns a GenerateOutput
    (.sequences, the tokens [batch, pos + new]; .logits, one [batch, d_vocab] per step) in
    place of the output, as TransformerLens. At each step the final LayerNorm and the
    unembedding run on the last position only, so their hooks (ln_final.*, hook_logits) see
    one position. TransformerLens's names work too: use_past_kv_cache (use_kv_cache), verbose
    (progress, a tqdm bar).

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
    opt = _options(model, temperature, top_k, top_p, do_sample, freq_penalty, use_kv_cache,
                   use_past_kv_cache, progress, verbose, prepend_bos, padding_side)
    if return_type not in RETURN_TYPES:
        hint = " (lens generates from tokens, not embeddings)" if return_type == "embeds" else ""
        raise ValueError(f"return_type={return_type!r}; valid values are {RETURN_TYPES}{hint}")
    tokens, am, kind = _prepare(model, input, max_new_tokens, attention_mask, opt["prepend_bos"],
                                opt["padding_side"])
    eos = _eos_ids(model, stop_at_eos, eos_token_id)
    seed, fwd_hooks = check_seed(seed), _check_hooks(model, fwd_hooks)
    steps = list(_steps(model, tokens, am, max_new_tokens, opt["temperature"], top_k, top_p,
                        seed, eos, opt["use_kv_cache"], fwd_hooks, opt["progress"], freq_penalty))
    new = [t for t, _ in steps]
    out = torch.cat([tokens, torch.stack(new, 1)], 1) if new else tokens
    full_mask = None if am is None else torch.cat([am, am.new_ones(am.shape[0], len(new))], 1)
    if output_logits:
        result = GenerateOutput(out, tuple(logits for _, logits in steps))
    else:
        result = _as_kind(model, out, full_mask, tokens.shape[1], kind, return_type,
                          opt["prepend_bos"], eos)
    if not return_cache:
        return result
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(out, attention_mask=full_mask)
    return result, cache


def stream(model, input: Input, max_new_tokens: int = 10, temperature: Union[int, float] = 1.0,
           top_k: Optional[int] = None, top_p: Union[int, float, None] = None,
           seed: Optional[int] = None, stop_at_eos: bool = True,
           eos_token_id: EosIds = None, use_kv_cache: Optional[bool] = None,
           fwd_hooks=(), progress: Optional[bool] = None, prepend_bos: Optional[bool] = None,
           padding_side: Optional[str] = None, attention_mask: Mask = None,
           do_sample: Optional[bool] = None, freq_penalty: Union[int, float] = 0.0,
           use_past_kv_cache: Optional[bool] = None, verbose: Optional[bool] = None,
           ) -> Iterator[Union[str, list[str], Int[Tensor, " batch"]]]:
    """generate, one step at a time: yields each step's new tokens, [batch] (the text of the
    token for a string input, a list of texts for a list). Arguments as in generate; the
    same seed gives the same tokens. A character split across tokens shows as U+FFFD."""
    opt = _options(model, temperature, top_k, top_p, do_sample, freq_penalty, use_kv_cache,
                   use_past_kv_cache, progress, verbose, prepend_bos, padding_side)
    tokens, am, kind = _prepare(model, input, max_new_tokens, attention_mask, opt["prepend_bos"],
                                opt["padding_side"])
    eos = _eos_ids(model, stop_at_eos, eos_token_id)
    seed, fwd_hooks = check_seed(seed), _check_hooks(model, fwd_hooks)
    for new, _ in _steps(model, tokens, am, max_new_tokens, opt["temperature"], top_k, top_p,
                         seed, eos, opt["use_kv_cache"], fwd_hooks, opt["progress"], freq_penalty):
        if kind == "str":
            yield model.to_string(new[:1])
        elif kind == "list":
            yield [model.to_string(t[None]) for t in new]
        else:
            yield new


def _as_kind(model, out: Int[Tensor, "batch pos"], mask: Optional[Tensor], n_prompt: int,
             kind: str, return_type: str, prepend_bos: bool, eos: list[int]):
    """The output in the input's form, or the one return_type asks for."""
    if return_type in ("tokens", "tensor"):
        return out[0] if kind == "tensor1d" else out
    if return_type == "input" and kind in ("tensor", "tensor1d"):
        return out[0] if kind == "tensor1d" else out
    from_text = kind in ("str", "list")
    texts = _texts(model, out, mask, n_prompt, eos, drop_bos=from_text and prepend_bos,
                   skip_special=not from_text)
    if kind == "list":
        return texts
    return texts[0] if len(texts) == 1 else texts


def _texts(model, out: Int[Tensor, "batch pos"], mask: Optional[Tensor], n_prompt: int,
           eos: list[int], drop_bos: bool, skip_special: bool) -> list[str]:
    """Each row's real prompt tokens (less the BOS lens put there) and its continuation up to
    the first EOS, as text; special tokens skipped where asked (TransformerLens's decoding)."""
    texts = []
    for i, row in enumerate(out.tolist()):
        keep = range(len(row)) if mask is None else mask[i].nonzero()[:, 0].tolist()
        prompt = [row[j] for j in keep if j < n_prompt][1 if drop_bos else 0:]
        cont = row[n_prompt:]
        stop = next((j for j, t in enumerate(cont) if t in eos), len(cont))
        ids = prompt + cont[:stop]
        if skip_special:
            texts.append(model._tok().decode(ids, skip_special_tokens=True))
        else:
            texts.append(model.to_string(ids))
    return texts
