"""The offline GPT-2 tokenizer: known ids, round trips, agreement with HF's GPT-2 tokenizer on the
same vocab files, padding and masks, and the TransformerLens-style helpers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens.tokenizer import (
    ENDOFTEXT, Tokenizer, build_encoding, bytes_to_unicode, get_token_position, gpt2_data_dir,
    load_tokenizer, to_single_token, to_str_tokens, to_string, to_tokens, to_tokens_with_mask,
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


def _same_vocab(a: Tokenizer, b: Tokenizer) -> bool:
    ids = range(a.vocab_size)
    return a.vocab_size == b.vocab_size and \
        [a.encoding.decode_single_token_bytes(i) for i in ids] == \
        [b.encoding.decode_single_token_bytes(i) for i in ids]


def test_from_hf_dir_equals_gpt2(tok, hf_dir, hf_tok, tmp_path):
    from_dir = Tokenizer.from_hf_dir(hf_dir)
    assert _same_vocab(from_dir, tok)
    assert all(from_dir.encode(s) == tok.encode(s) for s in STRINGS)
    assert Tokenizer.gpt2().encoding is tok.encoding  # the built encoding is cached
    assert Tokenizer.from_hf_dir(hf_dir).encoding is from_dir.encoding
    hf_tok.save_pretrained(tmp_path)  # writes tokenizer.json only
    if not (tmp_path / "vocab.json").exists():
        assert _same_vocab(Tokenizer.from_hf_dir(tmp_path), tok)


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
