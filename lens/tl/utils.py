"""TransformerLens's `utils` (in TransformerLens 4, `transformer_lens.utilities`) over lens: the
functions research scripts call, with TransformerLens's signatures and numbers, written here so
that lens does not need transformer_lens at run time. Where TransformerLens asserts, these raise
a ValueError that names what is wrong."""

import inspect
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import einops
import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from lens.factored import FactoredMatrix, composition_score

# ---------------------------------------------------------------------------------- tensors


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU; bfloat16 as float32), list, tuple,
    array or Python scalar."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}; give a tensor, "
                     "array, list, tuple or Python scalar")


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The first n entries of every dim (the top-left corner)."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: Tensor) -> Tensor:
    """The tensor without its first dim if that dim has size 1, else unchanged."""
    return tensor.squeeze(0) if tensor.ndim > 0 and tensor.shape[0] == 1 else tensor


def transpose(tensor: Float[Tensor, "... a b"]) -> Float[Tensor, "... b a"]:
    return tensor.transpose(-1, -2)


def is_square(x: Tensor) -> bool:
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: Tensor) -> bool:
    return is_square(x) and x.equal(x.tril())


def check_structure(t1: Tensor, t2: Tensor, *, verbose: bool = False) -> None:
    """Print whether two matrices order their neighbouring rows and columns alike (PASSED, or
    the first kind of mismatch and where), as TransformerLens's debugging helper."""
    if t1.ndim != 2 or t1.shape != t2.shape:
        raise ValueError(f"check_structure needs two matrices of one shape, got "
                         f"{tuple(t1.shape)} and {tuple(t2.shape)}")
    mismatches = []
    for axis, label in ((0, "rows"), (1, "columns")):
        if verbose:
            print(f"Checking {label}")
        found = []
        a, b = (t1, t2) if axis == 0 else (t1.T, t2.T)
        for i in range(a.shape[0] - 1):
            r1, r2 = a[i].ge(a[i + 1]), b[i].ge(b[i + 1])
            if any(r1 != r2):
                found.append(i)
                if verbose:
                    print(f"\trows {i}:{i + 1}")
                    print(f"\tt1: {r1.tolist()}")
                    print(f"\tt2: {r2.tolist()}")
        mismatches.append(found)
    rows, cols = mismatches
    if not rows and not cols:
        print("PASSED")
    elif rows:
        print(f"row mismatch: {rows}")
    else:
        print(f"column mismatch: {cols}")


def get_offset_position_ids(past_kv_pos_offset: int,
                            attention_mask: Int[Tensor, "batch offset_pos"]
                            ) -> Int[Tensor, "batch pos"]:
    """Positions counted from each row's first attended token (leading pads at 0), from
    past_kv_pos_offset on."""
    shifted = attention_mask.cumsum(dim=1) - 1
    return shifted.masked_fill(shifted < 0, 0)[:, past_kv_pos_offset:]


def get_cumsum_along_dim(tensor: Tensor, dim: int, reverse: bool = False) -> Tensor:
    if reverse:
        return tensor.flip(dims=(dim,)).cumsum(dim=dim).flip(dims=(dim,))
    return tensor.cumsum(dim=dim)


def repeat_along_head_dimension(tensor: Float[Tensor, "batch pos d_model"], n_heads: int,
                                clone_tensor: bool = True
                                ) -> Float[Tensor, "batch pos n_heads d_model"]:
    repeated = einops.repeat(tensor, "batch pos d_model -> batch pos n_heads d_model",
                             n_heads=n_heads)
    return repeated.clone() if clone_tensor else repeated


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """The entries whose key starts with prefix + ".", with that stripped from the key."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(prefix):]: v for k, v in dictionary.items() if k.startswith(prefix)}


def get_nested_attr(obj: Any, attr_str: str) -> Any:
    for attr in attr_str.split("."):
        obj = getattr(obj, attr)
    return obj


def set_nested_attr(obj: Any, attr_str: str, value: Any) -> None:
    *path, last = attr_str.split(".")
    setattr(get_nested_attr(obj, ".".join(path)) if path else obj, last, value)


# ---------------------------------------------------------------------------------- hook names
# TransformerLens's tables, spelled as it spells them (not derived from lens.sites, so that a
# hook point lens adds cannot change what a TransformerLens name means).
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "",
                       "attention": "attn"}
_ACT_NAME_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q",
                     "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_ATTN_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")
_NORM_NAMES = ("scale", "normalized")


def get_act_name(name: str, layer: Optional[Union[int, np.integer, str]] = None,
                 layer_type: Optional[str] = None) -> str:
    """The full hook name of a short one, as TransformerLens spells it:
    get_act_name("k", 6, "a") == get_act_name("k6a") == "blocks.6.attn.hook_k",
    get_act_name("pre5") == "blocks.5.mlp.hook_pre", get_act_name("scale4ln1") ==
    "blocks.4.ln1.hook_scale", get_act_name("embed") == "hook_embed",
    get_act_name("normalized") == "ln_final.hook_normalized". A name with a "." or starting
    with "hook_" is returned as it is (without a layer or layer_type). The first run of digits
    in a compact name is the layer and what follows it the layer type ("a" attn, "m" mlp,
    "b" block); "attn" means the pattern."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_NAME_ALIASES.get(name, name)
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full = (f"blocks.{layer}." if layer is not None else "") + \
        (f"{layer_type}." if layer_type else "") + f"hook_{name}"
    return f"ln_final.{full}" if name in _NORM_NAMES and layer is None else full


# ---------------------------------------------------------------------------------- Slice
SliceInput = Optional[Union[int, np.integer, tuple, list, slice, Tensor, np.ndarray]]


def _python_int(value: Any) -> Optional[int]:
    """The int of a non-bool integer scalar (0D integer tensors and arrays too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype.is_floating_point \
            and not value.dtype.is_complex and value.dtype != torch.bool:
        return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value.item())
    return None


class Slice:
    """TransformerLens's index along one axis. None: everything (mode "identity"); an int: that
    position, dropping the axis ("int"); a tuple: slice(*tuple), so (k,) is :k, (a, b) is a:b and
    (a, b, s) is a:b:s, or a slice ("slice"); a list, tensor or array of indices ("array").
    The index itself is `.slice` (an int, a slice or a numpy array), which lens's pos_slice
    arguments read as well."""

    slice: Union[int, slice, np.ndarray]

    def __init__(self, input_slice: Any = None):  # SliceInput; others raise a ValueError
        as_int = _python_int(input_slice)
        if as_int is not None:
            self.slice, self.mode = as_int, "int"
        elif isinstance(input_slice, tuple):
            if not 1 <= len(input_slice) <= 3:
                raise ValueError(f"Invalid input_slice {input_slice!r}: a tuple is (stop,), "
                                 "(start, stop) or (start, stop, step)")
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            self.slice, self.mode = to_numpy(input_slice), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"Invalid input_slice {input_slice!r}: give None, an int, a tuple "
                             "(stop,) / (start, stop) / (start, stop, step), a slice, or a "
                             "list, tensor or array of indices")

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """The tensor indexed by this slice along dim (negative dims count from the end)."""
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: Optional[int] = None) -> np.ndarray:
        """The positions this slice keeps of an axis of size max_ctx (int64 array; an int slice
        gives array([i]) and needs no max_ctx)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError(f"max_ctx must be specified if slice is not an integer "
                             f"(this one is {self.mode}: {self.slice})")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Any) -> "Slice":
        """A Slice of slice_input; an int becomes [int], so that the axis is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        as_int = _python_int(slice_input)
        return cls([as_int] if as_int is not None else slice_input)


# ---------------------------------------------------------------------------------- devices


def get_device() -> str:
    """"cuda" if available, "mps" only with TRANSFORMERLENS_ALLOW_MPS=1, else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and torch.backends.mps.is_built():
        if os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1":
            return "mps"
        logging.info("MPS device available but not auto-selected; set "
                     "TRANSFORMERLENS_ALLOW_MPS=1 to use it")
    return "cpu"


def print_gpu_mem(step_name: str = "") -> None:
    """Print the GPU memory allocated, in GiB (TransformerLens divides by 2e30 and so always
    prints 0.0; this divides by 2**30)."""
    print(f"{step_name} ~ {np.round(torch.cuda.memory_allocated() / 2**30, 2)} GiB allocated "
          "on GPU.")


# ---------------------------------------------------------------------------------- losses


def lm_cross_entropy_loss(logits: Float[Tensor, "batch pos d_vocab"],
                          tokens: Int[Tensor, "batch pos"],
                          attention_mask: Optional[Tensor] = None, per_token: bool = False
                          ) -> Union[Float[Tensor, ""], Float[Tensor, "batch pos_minus_1"]]:
    """Next-token cross-entropy: the mean over predictions, or per_token the [batch, pos-1]
    losses. With an attention_mask, a prediction counts only where it and the token it
    predicts are both attended (masked ones are 0 per token), as in TransformerLens."""
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask must have the same shape as tokens, got "
                             f"{tuple(attention_mask.shape)} and {tuple(tokens.shape)}")
        keep = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:])
        predicted = predicted.masked_fill(~keep, 0.0)
        n_tokens = keep.sum().item()
    else:
        n_tokens = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                per_token: bool = False) -> Tensor:
    """Top-1 next-token accuracy: the fraction, or per_token the [batch, pos-1] booleans."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


# ---------------------------------------------------------------------------------- activations


def gelu_new(input: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """GPT-2's tanh GELU, with TransformerLens's constants."""
    return 0.5 * input * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi)
                                           * (input + 0.044715 * torch.pow(input, 3.0))))


def gelu_fast(input: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


def gelu_pytorch_tanh(input: Tensor) -> Tensor:
    return F.gelu(input, approximate="tanh")


def solu(input: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """SoLU, x * softmax(x) over the last dim (its LayerNorm is the MLP's)."""
    return input * F.softmax(input, dim=-1)


# ---------------------------------------------------------------------------------- sampling


def _repetition_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    logits = logits.clone()
    for b in range(logits.shape[0]):
        seen = tokens[b].unique()
        score = logits[b, seen]
        logits[b, seen] = torch.where(score > 0, score / penalty, score * penalty)
    return logits


def sample_logits(final_logits: Float[Tensor, "batch d_vocab"], top_k: Optional[int] = None,
                  top_p: Optional[float] = None, temperature: float = 1.0,
                  freq_penalty: float = 0.0, repetition_penalty: float = 1.0,
                  tokens: Optional[Int[Tensor, "batch pos"]] = None) -> Int[Tensor, "batch"]:
    """One token per row, as TransformerLens samples (same draws under the same seed):
    temperature 0 is greedy; HF's repetition penalty first, then temperature, a frequency
    penalty (needs tokens), and top_k (clamped to the vocab) or else top_p filtering."""
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be non-negative, got {freq_penalty}.")
    if repetition_penalty != 1.0 and tokens is not None:
        final_logits = _repetition_penalty(final_logits, tokens, repetition_penalty)
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    final_logits = final_logits / temperature
    if freq_penalty > 0:
        if tokens is None or tokens.ndim != 2:
            raise ValueError("freq_penalty needs tokens as a [batch, pos] tensor of the ids "
                             f"so far, got {None if tokens is None else tuple(tokens.shape)}")
        for b in range(final_logits.shape[0]):
            final_logits[b] = final_logits[b] - freq_penalty * torch.bincount(
                tokens[b], minlength=final_logits.shape[-1])
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k has to be greater than 0, got {top_k}")
        top_k = min(top_k, final_logits.shape[-1])
        top_logits, _ = final_logits.topk(top_k, dim=-1)
        final_logits = final_logits.masked_fill(final_logits < top_logits[..., -1:], -float("inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p has to be in (0, 1], got {top_p}")
        sorted_logits, sorted_indices = torch.sort(final_logits, descending=True)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        final_logits = final_logits.masked_fill(remove.scatter(-1, sorted_indices, remove),
                                                -float("inf"))
    return torch.distributions.categorical.Categorical(logits=final_logits.float()).sample()


def logits_to_df(logits: Float[Tensor, "d_vocab"], tokenizer: Any = None,
                 top_k: Optional[int] = None) -> Any:
    """A pandas DataFrame of one position's logits by descending probability: token_index,
    token_string (with a tokenizer), logit, log_prob, probability."""
    import pandas as pd

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    order = torch.argsort(probs, descending=True)
    order = order[:top_k] if top_k is not None else order
    indices = order.cpu().tolist()
    data: dict = {"token_index": indices}
    if tokenizer is not None:
        data["token_string"] = [tokenizer.decode([i]) for i in indices]
    for key, values in (("logit", logits), ("log_prob", log_probs), ("probability", probs)):
        data[key] = values[order].detach().cpu().tolist()
    return pd.DataFrame(data)


# ---------------------------------------------------------------------------------- circuits


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True
                       ) -> Float[Tensor, "..."]:
    """‖left right‖_F / (‖left‖_F ‖right‖_F) without forming the products; with
    broadcast_dims every left matrix is scored against every right one (left's leading dims
    first)."""
    return composition_score(left, right, broadcast_dims=broadcast_dims)


def get_matrix_corner(matrix: FactoredMatrix, n: int = 3) -> Tensor:
    return matrix.get_corner(n)


# ---------------------------------------------------------------------------------- prompts


def test_prompt(prompt: str, answer: Union[str, list[str]], model: Any,
                prepend_space_to_answer: bool = True, print_details: bool = True,
                prepend_bos: Optional[bool] = None, top_k: int = 10) -> None:
    """Print how the model does on answer after prompt: the tokens, the answer tokens' rank,
    logit and probability, and the top_k tokens at each answer position, in TransformerLens's
    words (without rich's bold). A list of answers scores each one's first token as the next
    token. Prints; returns None."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    multiple = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    bos = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    prompt_tokens = model.to_tokens(prompt, **bos)
    if multiple:
        answer_tokens = torch.cat([model.to_tokens(a, prepend_bos=False)[:, :1] for a in answers])
    else:
        answer_tokens = model.to_tokens(answers, prepend_bos=False)
    prompt_tokens = prompt_tokens.repeat(answer_tokens.shape[0], 1)
    tokens = torch.cat((prompt_tokens, answer_tokens), dim=1)
    prompt_str_tokens = model.to_str_tokens(prompt, **bos)
    answer_str_tokens_list = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if multiple else len(answer_str_tokens_list[0])
    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if multiple:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks = []
    for index in range(prompt_length, prompt_length + answer_length):
        answer_ids = tokens[:, index]
        answer_strs = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]
        sorted_probs, sorted_positions = token_probs.sort(descending=True)
        ranks = sorted_positions.argsort(-1)[range(n_answers), answer_ids.cpu()].tolist()
        answer_ranks.append(list(zip(answer_strs, ranks)))
        if print_details:
            print(f"Performance on answer token{'s' if n_answers > 1 else ''}:\n" + "\n".join(
                f"Rank: {ranks[i]: <8} Logit: {logits[i, index - 1, answer_ids[i]].item():5.2f} "
                f"Prob: {token_probs[i, answer_ids[i]].item():6.2%} Token: |{answer_strs[i]}|"
                for i in range(n_answers)))
            for i in range(top_k):
                print(f"Top {i}th token. Logit: "
                      f"{logits[0, index - 1, sorted_positions[0, i]].item():5.2f} Prob: "
                      f"{sorted_probs[0, i].item():6.2%} Token: "
                      f"|{model.to_string(sorted_positions[0, i])}|")
    ranks_shown = answer_ranks if multiple else [r[0] for r in answer_ranks]
    print(f"Ranks of the answer tokens: {ranks_shown}")


test_prompt.__test__ = False  # a TransformerLens name, not a pytest test


# ---------------------------------------------------------------------------------- tokenizing


def get_attention_mask(tokenizer: Any, tokens: Tensor, prepend_bos: bool,
                       padding_side: Optional[str] = None) -> Tensor:
    """1 at attended tokens, 0 at padding: the trailing pads (right padding) or the leading pads
    (left padding) of pad_token_id; a leading pad that is the BOS (pad == bos, prepend_bos)
    is attended. padding_side None is the tokenizer's."""
    mask = torch.ones_like(tokens)
    if tokenizer is None:
        return mask
    side = tokenizer.padding_side if padding_side is None else padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side={side!r} is not one of ('left', 'right')")
    not_pad = tokens.ne(tokenizer.pad_token_id)
    if side == "right":
        mask[get_cumsum_along_dim(not_pad, -1, reverse=True) == 0] = 0
    else:
        leading = get_cumsum_along_dim(not_pad, -1, reverse=False) == 0
        mask[leading] = 0
        if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
            mask[torch.arange(mask.shape[0]), leading.sum(-1) - 1] = 1
    return mask


def get_input_with_manually_prepended_bos(bos_token: Optional[str], input: Union[str, list[str]]
                                          ) -> Union[str, list[str]]:
    if bos_token is None:
        return input
    return bos_token + input if isinstance(input, str) else [bos_token + s for s in input]


def get_tokens_with_bos_removed(tokenizer: Any, tokens: Tensor,
                                padding_side: Optional[str] = None) -> Tensor:
    """tokens without the BOS that starts each row (after its padding, when left-padded)."""
    if tokenizer.bos_token_id is None:
        return tokens
    side = tokenizer.padding_side if padding_side is None else padding_side
    if side == "right":
        return tokens[..., 1:]
    shape = list(tokens.shape)
    shape[-1] -= 1
    if tokenizer.pad_token_id is None:
        n_pads = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    else:
        leading = get_cumsum_along_dim(tokens.ne(tokenizer.pad_token_id), -1) == 0
        n_pads = leading.sum(-1)
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        bos_at, has_bos = n_pads - 1, n_pads > 0
    else:
        starts = [tokenizer.bos_token_id]
        cls_id = getattr(tokenizer, "cls_token_id", None)
        if isinstance(cls_id, int):
            starts.append(cls_id)
        bos_at, has_bos = n_pads, n_pads < tokens.shape[-1]
        if tokens.shape[-1] > 0:
            first = tokens.gather(-1, n_pads.clamp(max=tokens.shape[-1] - 1)[..., None])[..., 0]
            has_bos &= torch.isin(first, torch.tensor(starts, device=tokens.device))
    if not bool(has_bos.all()):
        raise ValueError(f"Cannot remove BOS: {int((~has_bos).sum())} left-padded row(s) do not "
                         f"start with the BOS token (id {tokenizer.bos_token_id}) after their "
                         "padding")
    tokens = tokens.scatter(dim=-1, index=bos_at[..., None], value=-100)
    return tokens[tokens != -100].view(*shape)


def _hf_dataset_types() -> tuple:
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:
        return ()
    return Dataset, IterableDataset


class TokenDataset:
    """What tokenize_and_concatenate returns without the `datasets` package: rows of
    {"tokens": int64 [max_length]}; ds["tokens"] is the whole [n, max_length] tensor, and a
    torch DataLoader batches it as it does a datasets.Dataset in torch format."""

    def __init__(self, tokens: Int[Tensor, "n max_length"]):
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key: Union[int, slice, str]) -> Any:
        if key == "tokens":
            return self.tokens
        if isinstance(key, str):
            raise KeyError(f"{key!r}: the only column is 'tokens'")
        return {"tokens": self.tokens[key]}

    def __iter__(self):
        return ({"tokens": row} for row in self.tokens)

    @property
    def column_names(self) -> list[str]:
        return ["tokens"]

    def __repr__(self) -> str:
        return f"TokenDataset(num_rows={len(self)}, tokens={tuple(self.tokens.shape)})"


def _rows_of_texts(dataset: Any, column_name: str) -> list[str]:
    if isinstance(dataset, str) or not isinstance(dataset, Sequence):
        raise TypeError(f"dataset must be a datasets.Dataset / IterableDataset, or a list of "
                        f"str or of dicts with a {column_name!r} key; got {type(dataset).__name__}")
    texts = []
    for i, row in enumerate(dataset):
        text = row.get(column_name) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise ValueError(f"row {i} of the dataset has no {column_name!r} text: {row!r:.80}")
        texts.append(text)
    return texts


def tokenize_and_concatenate(dataset: Any, tokenizer: Any, streaming: bool = False,
                             max_length: int = 1024, column_name: str = "text",
                             add_bos_token: bool = True, num_proc: Optional[int] = 10,
                             set_format: bool = True) -> Any:
    """Tokenize each document, join them with an EOS between documents, and cut the stream into
    rows of max_length tokens (each starting with BOS when add_bos_token), as TransformerLens:
    documents are joined 1000 at a time (datasets' batches), the remainder of each batch is
    dropped, and a batch shorter than a row is padded to one row.

    dataset: a datasets.Dataset or IterableDataset (returned as the same kind, with one
    "tokens" column, in torch format where set_format), or a list of str or of dicts with a
    column_name key (a datasets.Dataset when `datasets` is installed, else a TokenDataset).
    tokenizer: lens's (model.tokenizer) or a transformers tokenizer."""
    hf_types = _hf_dataset_types()
    has_pad = tokenizer.pad_token is not None  # else rows are padded with EOS, as in TL
    if not (hf_types and isinstance(dataset, hf_types)):
        texts = _rows_of_texts(dataset, column_name)
        if not hf_types:
            rows = [_concatenate_and_cut(texts[i:i + 1000], tokenizer, max_length,
                                         add_bos_token, has_pad)
                    for i in range(0, len(texts), 1000)]
            rows = [r for r in rows if r.size]
            tokens = np.concatenate(rows) if rows else np.zeros((0, max_length), dtype=np.int64)
            return TokenDataset(torch.from_numpy(tokens.astype(np.int64)))
        dataset = hf_types[0].from_dict({column_name: texts})
    dataset = keep_single_column(dataset, column_name)
    if not has_pad:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # a transformers tokenizer's
    saved = getattr(tokenizer, "deprecation_warnings", None)
    saved = dict(saved) if saved is not None else None
    if saved is not None:  # transformers: long documents are meant to exceed model_max_length
        key = "sequence-length-is-longer-than-the-specified-maximum"
        tokenizer.deprecation_warnings[key] = False

    def tokenize_function(examples: Any) -> dict:  # datasets' LazyBatch
        return {"tokens": _concatenate_and_cut(examples[column_name], tokenizer, max_length,
                                               add_bos_token, has_pad)}

    try:
        tokenized = dataset.map(tokenize_function, batched=True, remove_columns=[column_name],
                                **({} if streaming else {"num_proc": num_proc}))
    finally:
        if saved is not None:
            tokenizer.deprecation_warnings.clear()
            tokenizer.deprecation_warnings.update(saved)
    if set_format:
        tokenized.set_format(type="torch", columns=["tokens"])
    return tokenized


def _concatenate_and_cut(texts: list, tokenizer: Any, max_length: int, add_bos_token: bool,
                         has_pad: bool) -> np.ndarray:
    """One batch of documents as [n, max_length] rows (TransformerLens's tokenize_function)."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenize_and_concatenate needs a tokenizer with an EOS token")
    seq_len = max_length - 1 if add_bos_token else max_length
    if seq_len <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for tokens"
                         + (" after the BOS" if add_bos_token else ""))
    if not texts:
        return np.array([], dtype=np.int64)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pieces: list[np.ndarray] = []
    for i, row in enumerate(encoded):
        pieces.append(np.asarray(row, dtype=np.int64))
        if i < len(encoded) - 1:
            pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int64))
    tokens = np.concatenate(pieces)
    if len(tokens) < seq_len:
        pad = tokenizer.pad_token_id if has_pad else tokenizer.eos_token_id
        tokens = np.concatenate([tokens, np.full(seq_len - len(tokens), pad)])
        n_rows = 1
    else:
        n_rows = len(tokens) // seq_len
        tokens = tokens[:seq_len * n_rows]
    tokens = tokens.reshape(n_rows, seq_len)
    if add_bos_token:
        tokens = np.concatenate([np.full((n_rows, 1), tokenizer.bos_token_id), tokens], axis=1)
    return tokens


# ---------------------------------------------------------------------------------- the Hub


def keep_single_column(dataset: Any, col_name: str) -> Any:
    """The dataset with every column but col_name removed (a list of dicts: each dict)."""
    if isinstance(dataset, list):
        return [{col_name: row[col_name]} for row in dataset]
    for key in dataset.features:
        if key != col_name:
            dataset = dataset.remove_columns(key)
    return dataset


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("downloading from the Hugging Face Hub needs huggingface_hub: "
                          "`pip install huggingface-hub` (or lens[hub])") from None
    return huggingface_hub


def download_file_from_hf(repo_name: str, file_name: str, subfolder: str = ".",
                          cache_dir: Optional[str] = None, force_is_torch: bool = False,
                          **kwargs: Any) -> Any:
    """repo_name's subfolder/file_name from the Hub (or its cache): loaded if a .pth (or
    force_is_torch) or .json file, else its local path. Offline and not cached, an OSError
    says so."""
    hub = _hub()
    accepted = inspect.signature(hub.hf_hub_download).parameters
    try:
        path = hub.hf_hub_download(repo_id=repo_name, filename=file_name, subfolder=subfolder,
                                   cache_dir=cache_dir,
                                   **{k: v for k, v in kwargs.items() if k in accepted})
    except Exception as e:  # the hub raises several kinds for offline / missing / forbidden
        raise OSError(f"could not download {file_name!r} (subfolder {subfolder!r}) of "
                      f"{repo_name!r} from the Hugging Face Hub, nor find it in the cache "
                      f"({type(e).__name__}: {e}). Offline, copy the file into the HF cache "
                      "(HF_HUB_CACHE) or load it from a local path") from e
    if path.endswith(".pth") or force_is_torch:
        return torch.load(path, map_location="cpu", weights_only=False)
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    print("File type not supported:", path.split(".")[-1])
    return path


DATASET_ALIASES = {
    "openwebtext": "stas/openwebtext-10k", "owt": "stas/openwebtext-10k",
    "pile": "NeelNanda/pile-10k", "c4": "NeelNanda/c4-10k", "code": "NeelNanda/code-10k",
    "python": "NeelNanda/code-10k", "c4_code": "NeelNanda/c4-code-20k",
    "c4-code": "NeelNanda/c4-code-20k", "wiki": "NeelNanda/wiki-10k",
}


def get_dataset(dataset_name: str, **kwargs: Any) -> Any:
    """One of TransformerLens's 10k-document datasets from the Hub, by its short name
    (DATASET_ALIASES), as a datasets.Dataset (the train split)."""
    if dataset_name not in DATASET_ALIASES:
        raise ValueError(f"Dataset {dataset_name} not supported; the datasets are "
                         f"{sorted(DATASET_ALIASES)}")
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("get_dataset needs the `datasets` package: `pip install datasets`") \
            from None
    repo = DATASET_ALIASES[dataset_name]
    try:
        return load_dataset(repo, split="train", **kwargs)
    except Exception as e:  # offline, or not cached: datasets raises several kinds
        raise OSError(f"could not load {repo!r} ({dataset_name}) from the Hugging Face Hub "
                      f"or its cache ({type(e).__name__}: {e})") from e


__all__ = [
    "DATASET_ALIASES", "Slice", "SliceInput", "TokenDataset", "check_structure",
    "composition_scores", "download_file_from_hf", "filter_dict_by_prefix", "gelu_fast",
    "gelu_new", "gelu_pytorch_tanh", "get_act_name", "get_attention_mask", "get_corner",
    "get_cumsum_along_dim", "get_dataset", "get_device", "get_input_with_manually_prepended_bos",
    "get_matrix_corner", "get_nested_attr", "get_offset_position_ids",
    "get_tokens_with_bos_removed", "is_lower_triangular", "is_square", "keep_single_column",
    "lm_accuracy", "lm_cross_entropy_loss", "logits_to_df", "print_gpu_mem",
    "remove_batch_dim", "repeat_along_head_dimension", "sample_logits", "set_nested_attr",
    "solu", "test_prompt", "to_numpy", "tokenize_and_concatenate", "transpose",
]
