"""TransformerLens's head detector (transformer_lens.head_detector) on lens models: the same
names, signature and numbers, with ValueErrors where TransformerLens asserts.

detect_head scores every head (or the heads asked for; the others are -1) by how its attention
pattern on `seq` matches a detection pattern, a [pos, pos] lower-triangular tensor or one of
HEAD_NAMES. Two error measures, as in TransformerLens:

- "mul": Σ(A ⊙ D) / ΣA. Each query row of A sums to 1, so ΣA is the number of rows: every row
  counts, including those where D is empty (row 0 of a previous-token pattern; every row
  without an earlier copy of its token for duplicate / induction patterns). With exclude_bos /
  exclude_current_token those entries of A are zeroed first, so the denominator shrinks.
- "abs": 1 − round(n_rows · mean|A − D|, 3), after zeroing the excluded entries of |A − D|.

lens.circuits.detect_head is lens's own measure and differs on purpose from "mul": it averages
the attention mass on the target over the rows that have a target only, so a perfect
previous-token head scores 1.0 there and (n − 1) / n here (TL = lens · rows_with_target / n
without exclusions). Use this module for TransformerLens's numbers, lens.circuits for
batched, row-normalised scores.

Beyond TransformerLens: only the hook_pattern of the layers asked for is cached, and the
forward stops after the last of them; a cache with a batch axis of 1 is accepted (TL needs
remove_batch_dim); a tensor pattern with a list of prompts is refused by name (TL fails in
remove_batch_dim); the pattern builders run on any device (TL's go through NumPy on CPU)."""

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Literal, Optional, Union, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens import sites
from lens.circuits import duplicate_token_pattern, previous_token_pattern
from lens.patterns import LazyPattern

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES: tuple = get_args(HeadName)  # a tuple, as TransformerLens's (typed there as a list)
ErrorMeasure = Literal["abs", "mul"]
ERROR_MEASURES: tuple = get_args(ErrorMeasure)

LayerHeadTuple = tuple[int, int]
LayerToHead = dict[int, list[int]]

INVALID_HEAD_NAME_ERR = (
    f"detection_pattern must be a Tensor or one of head names: {HEAD_NAMES}; got %s"
)
CACHE_WITH_SEQ_LIST_ERR = (
    "A single cache cannot be reused across multiple prompts, so `cache` is not\n"
    "supported when `seq` is a list. Pass one prompt at a time, or omit `cache`\n"
    "and let each prompt be run separately."
)
SEQ_LEN_ERR = "The sequence must be non-empty and must fit within the model's context window."
DET_PAT_NOT_SQUARE_ERR = ("The detection pattern must be a lower triangular matrix of shape "
                          "(sequence_length, sequence_length); sequence_length=%d; got detection "
                          "pattern of shape %s")


def is_square(x: Tensor) -> bool:
    """Whether `x` is a square matrix."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: Tensor) -> bool:
    """Whether `x` is a square, lower-triangular matrix."""
    return is_square(x) and x.equal(x.tril())


def detect_head(
    model,
    seq: Union[str, list[str]],
    detection_pattern: Union[Tensor, str],
    heads: Optional[Union[list[LayerHeadTuple], LayerToHead]] = None,
    cache=None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> Float[Tensor, "n_layers n_heads"]:
    """Score each head's attention on `seq` against `detection_pattern` (see the module
    docstring for the two error measures), as TransformerLens's detect_head.

    seq: a prompt, or a list of prompts (then detection_pattern must be a head name, and the
    score is the mean of the per-prompt scores). detection_pattern: a [pos, pos]
    lower-triangular tensor for the tokenized prompt (BOS included), or one of HEAD_NAMES.
    heads: a list of (layer, head) or a dict {layer: [head, ...]}; the heads not named score -1.
    cache: a cache of this prompt's patterns, to skip the forward pass."""
    cfg = model.cfg
    if error_measure not in ERROR_MEASURES:
        raise ValueError(f"Invalid error_measure={error_measure!r}; valid values are {ERROR_MEASURES}")
    if isinstance(detection_pattern, str):
        if detection_pattern not in HEAD_NAMES:
            raise ValueError(INVALID_HEAD_NAME_ERR % repr(detection_pattern))
    elif not isinstance(detection_pattern, Tensor):
        raise ValueError(INVALID_HEAD_NAME_ERR % type(detection_pattern).__name__)
    layer2heads = _layer_to_heads(heads, cfg.n_layers, cfg.n_heads)

    if isinstance(seq, list):
        if not seq or not all(isinstance(s, str) for s in seq):
            raise ValueError(f"seq must be a string or a non-empty list of strings, got {seq!r}")
        if cache is not None:
            raise ValueError(CACHE_WITH_SEQ_LIST_ERR)
        if isinstance(detection_pattern, Tensor):
            raise ValueError("a detection pattern tensor is for one prompt's tokens; with a list of "
                             f"prompts pass a head name ({HEAD_NAMES}) or call detect_head per prompt")
        scores = [detect_head(model, s, detection_pattern, heads=heads, exclude_bos=exclude_bos,
                              exclude_current_token=exclude_current_token,
                              error_measure=error_measure) for s in seq]
        return torch.stack(scores).mean(0)
    if not isinstance(seq, str):
        raise ValueError(f"seq must be a string or a list of strings, got {type(seq).__name__}")

    tokens = model.to_tokens(seq, truncate=False)
    seq_len = tokens.shape[-1]
    if isinstance(detection_pattern, str):
        detection_pattern = _BUILDERS[detection_pattern](tokens)
    if error_measure == "mul" and not set(detection_pattern.unique().tolist()).issubset({0, 1}):
        logging.warning("Using detection pattern with values other than 0 or 1 with error_measure 'mul'")
    if not 1 < seq_len < cfg.n_ctx:
        raise ValueError(f"{SEQ_LEN_ERR} seq is {seq_len} tokens (BOS included); detect_head needs "
                         f"1 < tokens < n_ctx={cfg.n_ctx}")
    if not (is_lower_triangular(detection_pattern) and detection_pattern.shape[0] == seq_len):
        why = ("it has entries above the diagonal" if is_square(detection_pattern)
               and detection_pattern.shape[0] == seq_len else
               f"seq is {seq_len} tokens with BOS: {model.to_str_tokens(seq)}")
        raise ValueError(DET_PAT_NOT_SQUARE_ERR % (seq_len, tuple(detection_pattern.shape)) + f" ({why})")

    matches = -torch.ones(cfg.n_layers, cfg.n_heads, dtype=cfg.dtype)
    if not layer2heads:
        return matches
    if cache is None:
        names = [sites.name("pattern", l) for l in layer2heads]
        _, cache = model.run_with_cache(tokens, names_filter=names, remove_batch_dim=True,
                                        stop_at_layer="auto", lazy_patterns=True)
    for layer, layer_heads in layer2heads.items():
        patterns = _layer_patterns(cache, layer, seq_len)  # [n_heads, q_pos, k_pos]
        target = detection_pattern.to(patterns.device)
        for head in layer_heads:
            matches[layer, head] = compute_head_attention_similarity_score(
                patterns[head], target, exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure=error_measure)
    return matches


def _layer_to_heads(heads, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """{layer: [head, ...]} from None (every head), a dict, or a sequence of (layer, head)."""
    if heads is None:
        return {l: list(range(n_heads)) for l in range(n_layers)}
    pairs = ([(l, h) for l, hs in heads.items() for h in hs] if isinstance(heads, Mapping)
             else list(heads))
    out: dict[int, list[int]] = defaultdict(list)
    bad = []
    for pair in pairs:
        try:
            l, h = (int(i) for i in pair)
        except (TypeError, ValueError):
            raise ValueError(f"heads must be a list of (layer, head) pairs or a dict "
                             f"{{layer: [head, ...]}}; got the entry {pair!r}") from None
        if -n_layers <= l < n_layers and -n_heads <= h < n_heads:
            out[l % n_layers].append(h % n_heads)
        else:
            bad.append((l, h))
    if bad:
        raise ValueError(f"heads {bad} out of range: the model has layers 0..{n_layers - 1} and "
                         f"heads 0..{n_heads - 1}")
    return dict(out)


def _layer_patterns(cache, layer: int, seq_len: int) -> Union[Float[Tensor, "n_heads query_pos key_pos"], LazyPattern]:
    """One layer's [n_heads, pos, pos] attention patterns from a cache with or without a batch
    axis of 1 (lazy ones compute each head's rows when it is read)."""
    p = cache["pattern", layer, "attn"]
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 3 or p.shape[-2:] != (seq_len, seq_len):
        raise ValueError(f"the cached pattern of layer {layer} has shape {tuple(p.shape)}; detect_head "
                         f"needs [n_heads, {seq_len}, {seq_len}] (or a batch axis of 1) for this seq "
                         f"of {seq_len} tokens: cache one prompt, run_with_cache(prompt)")
    return p


def _one_prompt(tokens: Tensor) -> Tensor:
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        return tokens
    if tokens.ndim == 1:
        return tokens[None]
    raise ValueError(f"tokens must be [pos] or [1, pos] (one prompt), got {tuple(tokens.shape)}")


def get_previous_token_head_detection_pattern(tokens: Int[Tensor, "*batch pos"]
                                              ) -> Float[Tensor, "pos pos"]:
    """Ones just below the diagonal: each token attends to the one before it."""
    return previous_token_pattern(_one_prompt(tokens).shape[-1]).to(tokens.device)


def get_duplicate_token_head_detection_pattern(tokens: Int[Tensor, "*batch pos"]
                                               ) -> Float[Tensor, "pos pos"]:
    """Ones where an earlier position holds the same token as the current one."""
    return duplicate_token_pattern(_one_prompt(tokens))[0]


def get_induction_head_detection_pattern(tokens: Int[Tensor, "*batch pos"]
                                         ) -> Float[Tensor, "pos pos"]:
    """The duplicate-token pattern shifted one key to the right: each token attends to the
    token after an earlier copy of itself (column 0 is empty)."""
    duplicate = get_duplicate_token_head_detection_pattern(tokens)
    induction = torch.zeros_like(duplicate)
    induction[:, 1:] = duplicate[:, :-1]
    return induction.tril()


_BUILDERS = {
    "previous_token_head": get_previous_token_head_detection_pattern,
    "duplicate_token_head": get_duplicate_token_head_detection_pattern,
    "induction_head": get_induction_head_detection_pattern,
}


def get_supported_heads() -> None:
    """Print the supported head names."""
    print(f"Supported heads: {HEAD_NAMES}")


def compute_head_attention_similarity_score(
    attention_pattern: Float[Tensor, "query_pos key_pos"],
    detection_pattern: Tensor,
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: str,
) -> float:
    """One head's score: "mul" Σ(A ⊙ D) / ΣA, "abs" 1 − round(n_rows · mean|A − D|, 3), with
    column 0 (BOS) and / or the diagonal (current token) zeroed first when excluded. The
    attention pattern given is not modified."""
    if error_measure not in ERROR_MEASURES:
        raise ValueError(f"Invalid error_measure={error_measure!r}; valid values are {ERROR_MEASURES}")
    if not is_square(attention_pattern):
        raise ValueError(f"Attention pattern is not square; got shape {tuple(attention_pattern.shape)}")
    if detection_pattern.shape != attention_pattern.shape:
        raise ValueError(f"the detection pattern {tuple(detection_pattern.shape)} and the attention "
                         f"pattern {tuple(attention_pattern.shape)} must have the same shape")
    if error_measure == "mul":
        if exclude_bos or exclude_current_token:
            attention_pattern = attention_pattern.clone()
        if exclude_bos:
            attention_pattern[:, 0] = 0
        if exclude_current_token:
            attention_pattern.fill_diagonal_(0)
        score = attention_pattern * detection_pattern
        return (score.sum() / attention_pattern.sum()).item()

    abs_diff = (attention_pattern - detection_pattern).abs()
    if not torch.equal(abs_diff, abs_diff.tril()):
        raise ValueError("with error_measure='abs' both patterns must be lower triangular (causal); "
                         "|attention - detection| has nonzero entries above the diagonal")
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        abs_diff.fill_diagonal_(0)
    return 1 - round((abs_diff.mean() * size).item(), 3)


__all__ = [
    "HeadName", "HEAD_NAMES", "ErrorMeasure", "LayerHeadTuple", "LayerToHead",
    "INVALID_HEAD_NAME_ERR", "CACHE_WITH_SEQ_LIST_ERR", "SEQ_LEN_ERR", "DET_PAT_NOT_SQUARE_ERR",
    "detect_head", "get_previous_token_head_detection_pattern",
    "get_duplicate_token_head_detection_pattern", "get_induction_head_detection_pattern",
    "get_supported_heads", "compute_head_attention_similarity_score", "is_square",
    "is_lower_triangular",
]
