"""The offline GPT-2 tokenizer: known ids, round trips, agreement with HF's GPT-2 tokenizer on the
same vocab files, padding and masks, and the TransformerLens-style helpers; then tokenizer.json
tokenizers of the Llama, GPT-NeoX and Qwen kinds, trained here, against transformers and
TransformerLens."""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, \
    processors, trainers
from tokenizers import Tokenizer as Backend

from lens.tokenizer import (
    ENDOFTEXT, HFTokenizer, Tokenizer, build_encoding, bytes_to_unicode, get_token_position,
    gpt2_data_dir, load_tokenizer, to_single_token, to_str_tokens, to_string, to_tokens,
    to_tokens_with_mask,
)

EOT = 50256
STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", " \t \n ", "a  b", "a   \n  b", "hello   ", "   hello",
    "Hello world", "Hello, world!", "don't I'M we'll they've she'd it's 'S", "12345 3.14 1e-9",
    "héllo wörld", "naïve café", "日本語のテキスト", "Привет, мир", "مرحبا", "🙂👍🏽 🇬🇧",
    "a\r\nb\rc", "\x00\x01\x7f", "tabs\tand\u00a0nbsp\u2003em", "<|endoftext|>",
    "a<|endoftext|>b", "x" * 300, "def f(x):\n    return x ** 2  # square\n",
    "The quick brown fox jumps over the lazy dog.",
]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A HF-style checkpoint directory holding GPT-2's vocab.json and merges.txt."""
    d = tmp_path_factory.mktemp("gpt2_hf")
    shutil.copyfile(gpt2_data_dir() / "encoder.json", d / "vocab.json")
    shutil.copyfile(gpt2_data_dir() / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(hf_dir))


def corpus() -> list[str]:
    source = Path(__file__).read_text(encoding="utf-8")
    return STRINGS + source.splitlines() + [source]


def test_known_ids(tok):
    assert tok.vocab_size == 50257
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == EOT
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert to_tokens(tok, "Hello world").tolist() == [[EOT, 15496, 995]]
    assert to_tokens(tok, "Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    assert to_tokens(tok, "Hello world").dtype == torch.long
    assert tok.encode("a<|endoftext|>b") == [64, EOT, 65]
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"
    assert tok.decode_single(995) == " world"


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip_fixed(tok, text):
    assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(text=st.text(max_size=80))
def test_round_trip_hypothesis(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_matches_hf_on_corpus(tok, hf_tok):
    for text in corpus():
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert tok.decode(ids) == hf_tok.decode(ids, clean_up_tokenization_spaces=False)


@SETTINGS
@given(text=st.text(max_size=80))
def test_matches_hf_hypothesis(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)


def test_str_tokens_match_hf_per_token_decode(tok, hf_tok):
    ids = tok.encode("🙂 héllo 日本")
    assert to_str_tokens(tok, ids) == [hf_tok.decode([i]) for i in ids]
    assert "\ufffd" in to_str_tokens(tok, ids)[0]  # a split emoji decodes to U+FFFD


def _vocab_bytes(t) -> list[bytes]:
    """Every token's bytes, by id: tiktoken's own, or a byte-level tokenizer.json's token strings
    mapped back through GPT-2's byte-to-character table."""
    if isinstance(t, Tokenizer):
        return [t.encoding.decode_single_token_bytes(i) for i in range(t.vocab_size)]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return [bytes(byte_of[c] for c in t.backend.id_to_token(i)) for i in range(t.vocab_size)]


def _same_vocab(a, b) -> bool:
    return a.vocab_size == b.vocab_size and _vocab_bytes(a) == _vocab_bytes(b)


def test_from_hf_dir_equals_gpt2(tok, hf_dir, hf_tok, tmp_path):
    from_dir = Tokenizer.from_hf_dir(hf_dir)
    assert _same_vocab(from_dir, tok)
    assert all(from_dir.encode(s) == tok.encode(s) for s in STRINGS)
    assert Tokenizer.gpt2().encoding is tok.encoding  # the built encoding is cached
    assert Tokenizer.from_hf_dir(hf_dir).encoding is from_dir.encoding
    hf_tok.save_pretrained(tmp_path)  # writes tokenizer.json only
    if not (tmp_path / "vocab.json").exists():
        from_json = Tokenizer.from_hf_dir(tmp_path)
        assert isinstance(from_json, HFTokenizer)
        assert _same_vocab(from_json, tok)
        assert all(from_json.encode(s) == tok.encode(s) for s in STRINGS)
        assert from_json.bos_token_id == from_json.eos_token_id == from_json.pad_token_id == EOT
        assert not from_json.tokenizer_prepends_bos


def test_load_tokenizer(tok, hf_dir, tmp_path):
    assert load_tokenizer().encoding is tok.encoding
    assert load_tokenizer("gpt2").encoding is tok.encoding
    assert load_tokenizer(hf_dir).encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'.*directory"):
        load_tokenizer("nope")
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


def test_padding_and_mask(tok):
    texts = ["Hello world", "Hi"]
    right, right_mask = to_tokens_with_mask(tok, texts)
    assert right.tolist() == [[EOT, 15496, 995], [EOT, 17250, EOT]]
    assert right_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    left, left_mask = to_tokens_with_mask(tok, texts, padding_side="left")
    assert left.tolist() == [[EOT, 15496, 995], [EOT, EOT, 17250]]
    assert left_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    no_bos, no_bos_mask = to_tokens_with_mask(tok, texts, prepend_bos=False, padding_side="left")
    assert no_bos.tolist() == [[15496, 995], [EOT, 17250]]
    assert no_bos_mask.tolist() == [[1, 1], [0, 1]]
    assert torch.equal(to_tokens(tok, texts, padding_side="left"), left)
    assert to_tokens(tok, "Hello world", move_to_device="cpu").device.type == "cpu"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_hf(tok, hf_tok, side):
    texts = ["Hello world, this is longer", "Hi", "", "🙂 two"]
    hf_tok.pad_token = hf_tok.eos_token
    hf_tok.padding_side = side
    hf = hf_tok([ENDOFTEXT + t for t in texts], padding=True, return_tensors="pt")
    tokens, mask = to_tokens_with_mask(tok, texts, padding_side=side)
    assert torch.equal(tokens, hf["input_ids"])
    assert torch.equal(mask, hf["attention_mask"].long())


def test_truncation(tok):
    tokens = to_tokens(tok, ["Hello world, again", "Hi"], truncate=True, n_ctx=3)
    assert tokens.tolist() == [[EOT, 15496, 995], [EOT, 17250, EOT]]
    assert to_tokens(tok, "Hello world, again").shape == (1, 5)
    with pytest.raises(ValueError, match="n_ctx"):
        to_tokens(tok, "Hello", truncate=True)


def test_to_tokens_invalid_inputs(tok):
    with pytest.raises(ValueError, match=r"padding_side='middle'.*\('left', 'right'\)"):
        to_tokens(tok, "Hello", padding_side="middle")
    # Under the test suite's runtime type checking the hint may fire first; both name the input.
    for bad in (5, [], ["a", 3], None):
        with pytest.raises(TypeError, match="input"):
            to_tokens(tok, bad)
    with pytest.raises(TypeError, match="move_to_device takes a device"):
        to_tokens(tok, "Hello", move_to_device=True)
    with pytest.raises(TypeError, match="takes a str|'text'"):
        tok.encode(b"bytes")


def test_to_str_tokens(tok):
    assert to_str_tokens(tok, "Hello world") == [ENDOFTEXT, "Hello", " world"]
    assert to_str_tokens(tok, "Hello world", prepend_bos=False) == ["Hello", " world"]
    assert to_str_tokens(tok, [15496, 995]) == ["Hello", " world"]
    assert to_str_tokens(tok, torch.tensor([15496, 995])) == ["Hello", " world"]
    assert to_str_tokens(tok, np.array([15496, 995])) == ["Hello", " world"]
    assert to_str_tokens(tok, torch.tensor([[EOT, 15496, 995]])) == [ENDOFTEXT, "Hello", " world"]
    batch = to_tokens(tok, ["Hello world", "Hi"])
    assert to_str_tokens(tok, batch) == [[ENDOFTEXT, "Hello", " world"],
                                         [ENDOFTEXT, "Hi", ENDOFTEXT]]
    assert to_str_tokens(tok, ["Hi", "Hello"], prepend_bos=False) == [["Hi"], ["Hello"]]
    assert to_str_tokens(tok, torch.tensor(995)) == [" world"]
    with pytest.raises(TypeError, match="integer tensor"):
        to_str_tokens(tok, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="outside the vocab"):
        to_str_tokens(tok, [50257])


def test_to_string(tok):
    assert to_string(tok, torch.tensor([15496, 995])) == "Hello world"
    assert to_string(tok, [15496, 11, 995, 0]) == "Hello, world!"
    assert to_string(tok, torch.tensor([[15496, 995], [17250, EOT]])) == \
        ["Hello world", "Hi" + ENDOFTEXT]
    assert to_string(tok, [[15496], [995]]) == ["Hello", " world"]
    with pytest.raises(TypeError, match="list of ints or a tensor|'tokens'"):
        to_string(tok, "Hello")


def test_to_single_token(tok):
    assert to_single_token(tok, " world") == 995
    assert to_single_token(tok, ENDOFTEXT) == EOT
    with pytest.raises(ValueError, match=r"'Hello world' is 2 tokens.*'Hello', ' world'"):
        to_single_token(tok, "Hello world")
    with pytest.raises(ValueError, match="is 0 tokens"):
        to_single_token(tok, "")


def test_get_token_position(tok):
    text = "Hello world world"
    assert get_token_position(tok, " world", text) == 2
    assert get_token_position(tok, " world", text, mode="last") == 3
    assert get_token_position(tok, " world", text, prepend_bos=False) == 1
    assert get_token_position(tok, 995, to_tokens(tok, text), mode="last") == 3
    assert get_token_position(tok, torch.tensor(995), [15496, 995]) == 1
    assert get_token_position(tok, ENDOFTEXT, text) == 0
    with pytest.raises(ValueError, match="' Hi' \\(15902\\) does not occur"):
        get_token_position(tok, " Hi", text)
    with pytest.raises(ValueError, match=r"mode='middle'.*\('first', 'last'\)"):
        get_token_position(tok, " world", text, mode="middle")
    with pytest.raises(ValueError, match="batch size 2"):
        get_token_position(tok, " world", to_tokens(tok, [text, text]))
    with pytest.raises(ValueError, match="2 tokens"):
        get_token_position(tok, "Hello world", text)


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """256 byte tokens, merges "h e" and "l l", then <|endoftext|>."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"he": 256, "ll": 257, ENDOFTEXT: 258})
    return vocab, ["#version: 0.2", "h e", "l l", ""]


def test_build_encoding_small_vocab():
    vocab, merges = _tiny_vocab()
    enc = build_encoding(vocab, merges, {ENDOFTEXT: 258}, "tiny")
    tok = Tokenizer(enc, "tiny")
    assert tok.vocab_size == 259 and tok.bos_token_id == 258
    assert tok.encode("hello") == [256, 257, vocab["o"]]
    assert tok.decode(tok.encode("hello there")) == "hello there"


@pytest.mark.parametrize("mutate, message", [
    (lambda v, m: v.update({"he": 257, "ll": 256}), "ids must equal ranks"),
    (lambda v, m: m.pop(2), "non-special tokens but the merges imply 257"),
    (lambda v, m: m.append("a b c"), "each merge must be two"),
    (lambda v, m: m.append("h h"), "not a GPT-2 byte-level|ids must equal ranks|merges imply"),
    (lambda v, m: v.update({"he\n": 300}), "not a GPT-2 byte-level character"),
    (lambda v, m: v.update({"he": "256"}), "token -> int id"),
    (lambda v, m: m.append("h e"), "already exists"),
])
def test_build_encoding_rejects_malformed(mutate, message):
    vocab, merges = _tiny_vocab()
    mutate(vocab, merges)
    with pytest.raises(ValueError, match=message):
        build_encoding(vocab, merges, {ENDOFTEXT: vocab[ENDOFTEXT]}, "tiny")


def test_malformed_vocab_file(hf_dir, tmp_path):
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copyfile(hf_dir / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match=r"vocab.json: token '(Hello|Ġworld)' has id .* ranks"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json is not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="containing '<\\|endoftext\\|>'"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------- tokenizer.json families

TRAIN_TEXT = [
    "Hello world, hello there! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n", "naïve café, héllo wörld", "12345 3.14 1e-9",
    "don't I'M we'll they've", "    indented\tline\n\nnext line",
] * 20
FAMILY_STRINGS = [
    "Hello world", "Hello, world!", "  two  spaces ", " leading", "trailing ", "a\nb\n\n\tc",
    "héllo wörld", "naïve café", "日本語のテキスト", "Привет, мир", "🙂👍🏽 🇬🇧", "don't stop",
    "x" * 40, "", "def f(x):\n    return x ** 2\n",
]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def _train(tok: Backend, vocab_size: int, specials: list[str], **kw) -> Backend:
    tok.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(vocab_size=vocab_size,
                                                            special_tokens=specials, **kw))
    return tok


def _llama_backend(metaspace: bool) -> Backend:
    """SentencePiece-style BPE: <unk> <s> </s>, the 256 <0xNN> byte-fallback tokens, then the
    trained pieces; spaces become ▁ by a Metaspace pre-tokenizer (Mistral, and transformers 5's
    LlamaTokenizer) or by Llama-2's Prepend + Replace normalizer."""
    trained = Backend(models.BPE(unk_token="<unk>"))
    if metaspace:
        trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    else:
        trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
    model = json.loads(_train(trained, 300, LLAMA_SPECIALS).to_str())["model"]
    vocab = {t: i for i, t in enumerate(LLAMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({t: i + 256 for t, i in model["vocab"].items() if i >= 3})
    tok = Backend(models.BPE(vocab, [tuple(m) for m in model["merges"]], unk_token="<unk>",
                             byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    return tok


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def _gemma_backend() -> Backend:
    """Gemma's SentencePiece-style BPE: <pad> <eos> <bos> <unk> <mask> and the turn markers,
    the 256 <0xNN> byte-fallback tokens, then the trained pieces; every space becomes ▁ by a
    Replace normalizer, with no prefix space added and none stripped when decoding."""
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    model = json.loads(_train(trained, 320, GEMMA_SPECIALS).to_str())["model"]
    n = len(GEMMA_SPECIALS)
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": n + b for b in range(256)})
    vocab.update({t: i + 256 for t, i in model["vocab"].items() if i >= n})
    tok = Backend(models.BPE(vocab, [tuple(m) for m in model["merges"]], unk_token="<unk>",
                             byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIALS])
    return tok


def _byte_level_backend(specials: list[str], pattern: Optional[str] = None) -> Backend:
    """GPT-NeoX-style byte-level BPE (NFC, ByteLevel), or Qwen's with its split pattern first."""
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    tok.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _train(tok, 400, specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


@dataclass(frozen=True)
class Family:
    backend: Callable[[], Backend]
    files: dict  # file name -> JSON content, written next to tokenizer.json
    bos: str  # the tokens lens (and TransformerLens) should end up with
    eos: str
    pad: str
    prepends_bos: bool
    keeps_leading_space: bool = True  # Metaspace "first" drops one leading space, in HF too


BOS_ADDED_TOKEN = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False}
FAMILIES = {
    "llama": Family(lambda: _llama_backend(metaspace=True), {"tokenizer_config.json": {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": BOS_ADDED_TOKEN, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "legacy": False}},
        bos="<s>", eos="</s>", pad="</s>", prepends_bos=True, keeps_leading_space=False),
    "llama2": Family(lambda: _llama_backend(metaspace=False), {"tokenizer_config.json": {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}},
        bos="<s>", eos="</s>", pad="</s>", prepends_bos=True),
    "gemma": Family(_gemma_backend, {"tokenizer_config.json": {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>"}},
        bos="<bos>", eos="<eos>", pad="<pad>", prepends_bos=True),
    "neox": Family(lambda: _byte_level_backend([ENDOFTEXT, "<|padding|>"]), {
        "tokenizer_config.json": {"tokenizer_class": "GPTNeoXTokenizer",
                                  "add_prefix_space": False, "pad_token": None},
        "special_tokens_map.json": {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                                    "unk_token": ENDOFTEXT}},
        bos=ENDOFTEXT, eos=ENDOFTEXT, pad=ENDOFTEXT, prepends_bos=False),
    "qwen": Family(lambda: _byte_level_backend([ENDOFTEXT, "<|im_start|>", "<|im_end|>"],
                                               QWEN_PATTERN), {
        "tokenizer_config.json": {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                                  "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
                                  "add_prefix_space": False, "errors": "replace"},
        "config.json": {"bos_token_id": 1, "eos_token_id": 0}},  # the explicit null bos wins
        bos=ENDOFTEXT, eos=ENDOFTEXT, pad=ENDOFTEXT, prepends_bos=False),
}


def _write(folder: Path, backend: Backend, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


@dataclass(frozen=True)
class Built:
    spec: Family
    folder: Path
    lens: HFTokenizer
    hf: object  # transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Built:
    transformers = pytest.importorskip("transformers")
    spec = FAMILIES[request.param]
    folder = _write(tmp_path_factory.mktemp(request.param), spec.backend(), spec.files)
    return Built(spec, folder, load_tokenizer(folder),
                 transformers.AutoTokenizer.from_pretrained(str(folder)))


def test_family_ids_match_transformers(family):
    lens, hf = family.lens, family.hf
    for text in FAMILY_STRINGS + [f"a{family.spec.eos}b", f"{family.spec.bos}a"]:
        ids = lens.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert lens.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False), text
    for text in FAMILY_STRINGS:  # Llama-2's "</s>b" decodes as "</s> b", in HF too
        if family.spec.keeps_leading_space or not text.startswith(" "):
            assert lens.decode(lens.encode(text)) == text, text
    ids = lens.encode("日本 🙂 héllo")
    assert to_str_tokens(lens, ids) == [hf.decode([i]) for i in ids]


def test_family_special_tokens(family):
    lens, spec, hf = family.lens, family.spec, family.hf
    assert isinstance(lens, HFTokenizer) and lens.name == str(family.folder.resolve())
    assert (lens.bos_token, lens.eos_token, lens.pad_token) == (spec.bos, spec.eos, spec.pad)
    assert [lens.bos_token_id, lens.eos_token_id, lens.pad_token_id] == \
        hf.convert_tokens_to_ids([spec.bos, spec.eos, spec.pad])
    assert lens.tokenizer_prepends_bos == spec.prepends_bos
    assert lens.vocab_size == len(hf)
    ids = lens.encode("Hello world")
    tokens = to_tokens(lens, "Hello world")
    assert tokens[0, 0] == lens.bos_token_id and tokens[0, 1:].tolist() == ids
    assert to_tokens(lens, "Hello world", prepend_bos=False)[0].tolist() == ids
    assert to_str_tokens(lens, "Hello")[0] == spec.bos
    assert to_single_token(lens, spec.eos) == lens.eos_token_id
    text = f"Hello{spec.eos} world"
    assert get_token_position(lens, spec.eos, text, mode="last") == 1 + len(lens.encode("Hello"))
    assert repr(lens).startswith(f"HFTokenizer({lens.name!r}, vocab_size={lens.vocab_size}")


def test_family_special_tokens_match_transformer_lens(family):
    transformers = pytest.importorskip("transformers")
    hf_format = pytest.importorskip("transformer_lens.model_bridge.sources._hf_format")
    builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")
    shipped = transformers.AutoTokenizer.from_pretrained(str(family.folder))
    assert builder.detect_tokenizer_bos_eos(shipped)[0] == family.lens.tokenizer_prepends_bos
    tl = hf_format.setup_tokenizer(shipped)
    assert (tl.bos_token_id, tl.eos_token_id, tl.pad_token_id) == \
        (family.lens.bos_token_id, family.lens.eos_token_id, family.lens.pad_token_id)


@pytest.mark.parametrize("side", ["left", "right"])
def test_family_mask_from_lengths(family, side):
    lens = family.lens
    texts = ["Hello world, hello there", "Hi", ""]
    tokens, mask = to_tokens_with_mask(lens, texts, padding_side=side)
    rows = [[lens.bos_token_id] + lens.encode(t) for t in texts]
    width = max(map(len, rows))
    assert tokens.shape == mask.shape == (3, width)
    for row, tok_row, mask_row in zip(rows, tokens.tolist(), mask.tolist()):
        pad = [lens.pad_token_id] * (width - len(row))
        ones, zeros = [1] * len(row), [0] * (width - len(row))
        assert tok_row == (row + pad if side == "right" else pad + row)
        assert mask_row == (ones + zeros if side == "right" else zeros + ones)


def test_hf_tokenizer_decode_errors(family):
    lens = family.lens
    with pytest.raises(ValueError, match=rf"outside the vocab \[0, {lens.vocab_size}\)"):
        lens.decode([0, lens.vocab_size])
    with pytest.raises(ValueError, match="outside the vocab"):
        lens.decode_single(-1)
    with pytest.raises(TypeError, match="takes a str|'text'"):
        lens.encode(b"bytes")
    assert lens.decode_single(torch.tensor(lens.eos_token_id)) == lens.eos_token


@pytest.fixture(scope="module")
def neox_backend() -> Backend:
    return FAMILIES["neox"].backend()


def test_config_json_fallback_and_defaults(neox_backend, tmp_path):
    padding = neox_backend.token_to_id("<|padding|>")
    only_json = HFTokenizer.from_dir(_write(tmp_path / "bare", neox_backend, {}))
    assert only_json.bos_token == only_json.eos_token == only_json.pad_token == ENDOFTEXT
    assert not only_json.tokenizer_prepends_bos
    folder = _write(tmp_path / "config", neox_backend,
                    {"config.json": {"bos_token_id": padding, "eos_token_id": [0, padding]}})
    from_config = HFTokenizer.from_dir(folder)
    assert (from_config.bos_token_id, from_config.eos_token_id, from_config.pad_token_id) == \
        (padding, 0, 0)
    overridden = HFTokenizer.from_dir(_write(tmp_path / "both", neox_backend, {
        "config.json": {"bos_token_id": padding},
        "tokenizer_config.json": {"bos_token": ENDOFTEXT, "pad_token": "<|padding|>",
                                  "added_tokens_decoder": {}},
        "special_tokens_map.json": {"bos_token": "<|padding|>"}}))  # ignored: added_tokens_decoder
    assert (overridden.bos_token_id, overridden.pad_token_id) == (0, padding)


@pytest.mark.parametrize("add_bos_token, prepends", [(None, True), (False, False), (True, True)])
def test_prepends_bos_from_config_else_post_processor(tmp_path, add_bos_token, prepends):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    folder = _write(tmp_path, _llama_backend(metaspace=True), {"tokenizer_config.json": config})
    lens = HFTokenizer.from_dir(folder)
    assert lens.tokenizer_prepends_bos is prepends
    assert lens.encode("a") == lens.backend.encode("a", add_special_tokens=False).ids
    assert to_tokens(lens, "a")[0, 0] == lens.bos_token_id == 1


def test_tokenizer_json_truncation_and_padding_are_ignored(neox_backend, tmp_path):
    backend = Backend.from_str(neox_backend.to_str())
    backend.enable_truncation(3)
    backend.enable_padding(length=50)
    lens = HFTokenizer.from_dir(_write(tmp_path, backend, {}))
    text = "Hello world, hello there"
    assert lens.encode(text) == neox_backend.encode(text, add_special_tokens=False).ids
    assert len(lens.encode(text)) > 3


@pytest.mark.parametrize("content", ['{"model": ', "[1, 2]", '{"model": {"type": "BPE"}}', ""])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    message = re.escape(str((tmp_path / "tokenizer.json").resolve())) + " is not a valid"
    with pytest.raises(ValueError, match=message):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_hf_dir(tmp_path)


@pytest.mark.parametrize("files, message", [
    ({"tokenizer_config.json": {"bos_token": "<nope>"}}, r"bos_token '<nope>' is not in the vocab"),
    ({"tokenizer_config.json": {"eos_token": 5}}, r"tokenizer_config.json: eos_token is 5; "
                                                  "expected a string, an AddedToken"),
    ({"tokenizer_config.json": {"add_bos_token": "yes"}}, "add_bos_token is 'yes'; expected true"),
    ({"special_tokens_map.json": ["<s>"]}, "special_tokens_map.json: expected a JSON object"),
    ({"config.json": {"eos_token_id": 10 ** 6}}, r"config.json: eos_token_id 1000000 is not in"),
    ({"config.json": {"bos_token_id": "1"}}, r"config.json: bos_token_id is '1'; expected an int"),
])
def test_bad_special_token_files(neox_backend, tmp_path, files, message):
    with pytest.raises(ValueError, match=message):
        HFTokenizer.from_dir(_write(tmp_path, neox_backend, files))


def test_bad_tokenizer_files(neox_backend, tmp_path):
    _write(tmp_path, neox_backend, {})
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer.from_dir(tmp_path)
    no_eos = _write(tmp_path / "llama", _llama_backend(metaspace=True), {})
    with pytest.raises(ValueError, match="no eos_token is named.*'<\\|endoftext\\|>'"):
        HFTokenizer.from_dir(no_eos)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        HFTokenizer.from_dir(tmp_path / "missing")
