"""lens's tokenizers through the HF interface TransformerLens scripts use on model.tokenizer
(calling it, encode / decode, the vocab, token <-> id conversion, special tokens, padding_side),
against transformers' tokenizers on the same files: GPT-2's vocab.json + merges.txt, and the
tokenizer.json families that tests/test_tokenizer.py trains."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lens.tokenizer import (
    ENDOFTEXT, BatchEncoding, Tokenizer, gpt2_data_dir, load_tokenizer, to_str_tokens, to_tokens,
    to_tokens_with_mask,
)
from test_tokenizer import FAMILIES, FAMILY_STRINGS, _write

transformers = pytest.importorskip("transformers")
EOT = 50256
TEXTS = ["Hello world, this is longer", "Hi", "", "🙂 two <|endoftext|> three"]
CALLS = [
    {}, {"padding": True}, {"padding": "longest"}, {"padding": True, "return_tensors": "pt"},
    {"padding": True, "return_tensors": "np"}, {"padding": "max_length", "max_length": 12},
    {"truncation": True, "max_length": 3}, {"max_length": 3},
    {"truncation": False, "max_length": 3},
    {"padding": True, "truncation": True, "max_length": 4, "return_tensors": "pt"},
    {"padding": "max_length", "truncation": True, "max_length": 4}, {"add_special_tokens": False},
    {"padding": True, "padding_side": "left"}, {"padding": True, "return_attention_mask": False},
]


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.gpt2()  # a fresh one per test: tests set padding_side and special tokens


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2_hf")
    shutil.copyfile(gpt2_data_dir() / "encoder.json", d / "vocab.json")
    shutil.copyfile(gpt2_data_dir() / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture
def hf(hf_dir):
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(hf_dir))
    hf.pad_token = hf.eos_token  # as TransformerLens sets it
    return hf


def plain(encoding) -> dict:  # HF's BatchEncoding is a UserDict, lens's a dict
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in encoding.items()}


def same_call(lens_tok, hf_tok, text, **kw) -> None:
    ours, theirs = lens_tok(text, **kw), hf_tok(text, **kw)
    assert plain(ours) == plain(theirs), (text, kw)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), (key, kw)
        if hasattr(value, "dtype"):
            assert ours[key].dtype == value.dtype, (key, kw)


@pytest.mark.parametrize("kw", CALLS)
def test_call_matches_hf(tok, hf, kw):
    for side in ("right", "left"):
        tok.padding_side = hf.padding_side = side
        same_call(tok, hf, TEXTS, **kw)
        if not kw.get("padding") and "max_length" not in kw or kw.get("return_tensors"):
            same_call(tok, hf, TEXTS[0], **kw)


def test_call_errors_and_batch_encoding(tok):
    with pytest.raises(ValueError, match=r"input_ids rows have lengths \[0, 1, 6\].*padding=True"):
        tok(TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match="padding='longer' is not one of"):
        tok(TEXTS, padding="longer")
    with pytest.raises(ValueError, match="return_tensors='tf' is not one of"):
        tok("Hi", return_tensors="tf")
    with pytest.raises(TypeError, match="a str or a list of str|'text'"):  # or the type hint
        tok(["a", 3])
    enc = tok(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert isinstance(enc, BatchEncoding) and torch.equal(enc.input_ids, enc["input_ids"])
    assert enc.to("cpu").attention_mask.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(AttributeError, match="holds \\['input_ids', 'attention_mask'\\]"):
        enc.token_type_ids


def test_encode_decode_match_hf(tok, hf):
    for text in TEXTS + ["don't stop", " leading space"]:
        assert tok.encode(text) == hf.encode(text)
        assert torch.equal(tok.encode(text, return_tensors="pt"),
                           hf.encode(text, return_tensors="pt"))
        assert tok.encode(text, max_length=2) == hf.encode(text, max_length=2, truncation=True)
        ids = tok.encode(text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(995) == hf.decode(995) == " world"
    assert tok.decode(torch.tensor(995)) == " world"
    assert tok.decode(np.array([15496, 995])) == "Hello world"
    batch = torch.tensor([[15496, 995, EOT], [EOT, 17250, EOT]])
    for skip in (False, True):
        assert tok.batch_decode(batch, skip_special_tokens=skip) == \
            hf.batch_decode(batch, skip_special_tokens=skip)
        assert tok.batch_decode(batch.tolist(), skip_special_tokens=skip) == \
            hf.batch_decode(batch.tolist(), skip_special_tokens=skip)
    # transformers 5 ignores clean-up for BPE tokenizers; so does lens
    assert tok.decode(hf.encode("a , b ."), clean_up_tokenization_spaces=True) == "a , b ."
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.decode(50257)


def test_vocab_and_conversions_match_hf(tok, hf):
    vocab = tok.get_vocab()
    assert vocab == hf.get_vocab() and tok.vocab == vocab and len(tok) == len(hf) == 50257
    vocab["not-a-token!!"] = 1  # a copy
    assert "not-a-token!!" not in tok.get_vocab()
    ids = hf.encode("Hello wörld 🙂 <|endoftext|>")
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(995) == hf.convert_ids_to_tokens(995) == "Ġworld"
    tokens = ["Ġworld", "Hello", "not-a-token!!", ENDOFTEXT, "", "日本"]
    assert tok.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert tok.convert_tokens_to_ids("Ġworld") == 995
    for text in ("Hello world é", " don't", ""):
        assert tok.tokenize(text) == hf.tokenize(text)
    assert tok.convert_tokens_to_string(["Hello", "Ġworld"]) == \
        hf.convert_tokens_to_string(["Hello", "Ġworld"])


def test_special_tokens_match_hf(tok, hf):
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, key) == getattr(hf, key) == ENDOFTEXT
        assert getattr(tok, key + "_id") == getattr(hf, key + "_id") == EOT
    assert tok.all_special_tokens == hf.all_special_tokens
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.special_tokens_map == dict(hf.special_tokens_map)
    assert tok.name_or_path == "gpt2" and tok.model_max_length == 1024
    assert Tokenizer.from_hf_dir(hf.name_or_path).model_max_length == hf.model_max_length
    assert tok.padding_side == hf.padding_side == "right"
    assert tok.truncation_side == hf.truncation_side == "right"


def test_setting_special_tokens(tok):
    tok.pad_token = "Ġworld"
    assert tok.pad_token_id == 995
    assert to_tokens(tok, ["Hello world", "Hi"], prepend_bos=False).tolist() == \
        [[15496, 995], [17250, 995]]
    tok.pad_token_id = EOT
    assert tok.pad_token == ENDOFTEXT
    with pytest.raises(ValueError, match="pad_token 'nope' is not in the vocab"):
        tok.pad_token = "nope"
    with pytest.raises(ValueError, match="pad_token_id 50257 is not an id of the vocab"):
        tok.pad_token_id = 50257
    with pytest.raises(ValueError, match="always have a bos, eos and pad"):
        tok.bos_token = None
    with pytest.raises(ValueError, match=r"padding_side='middle' is not one of \('left', 'righ"):
        tok.padding_side = "middle"
    assert Tokenizer.gpt2().pad_token_id == EOT  # the setting stays on that one instance


def test_padding_side_is_the_default_for_to_tokens(tok):
    texts = ["Hello world", "Hi"]
    assert to_tokens(tok, texts).tolist() == [[EOT, 15496, 995], [EOT, 17250, EOT]]
    tok.padding_side = "left"
    tokens, mask = to_tokens_with_mask(tok, texts)
    assert tokens.tolist() == [[EOT, 15496, 995], [EOT, EOT, 17250]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert torch.equal(to_tokens(tok, texts), tokens)
    assert to_tokens(tok, texts, padding_side="right").tolist() == \
        [[EOT, 15496, 995], [EOT, 17250, EOT]]  # an explicit side wins
    assert tok(texts, padding=True)["input_ids"] == [[15496, 995], [EOT, 17250]]


def test_prepend_bos_none_is_true(tok):
    assert to_tokens(tok, "Hi", prepend_bos=None).tolist() == [[EOT, 17250]]
    assert to_str_tokens(tok, "Hi", prepend_bos=None) == [ENDOFTEXT, "Hi"]


def test_model_tokenizer_is_callable_like_hf():
    """The bundled model's tokenizer answers the calls TransformerLens scripts make."""
    from lens.loading import from_pretrained
    model = from_pretrained("lens-tiny-attn2l")
    enc = model.tokenizer(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == [[15496, 995], [17250, EOT]]
    assert model.tokenizer.decode(enc["input_ids"][0]) == "Hello world"
    assert model.to_tokens(["Hello world", "Hi"])[1].tolist() == [EOT, 17250, EOT]
    model.tokenizer.padding_side = "left"  # as TransformerLens scripts set it
    assert model.to_tokens(["Hello world", "Hi"])[1].tolist() == [EOT, EOT, 17250]
    assert model.to_tokens_with_mask(["Hello world", "Hi"])[1].tolist() == [[1, 1, 1], [0, 1, 1]]


# ---------------------------------------------------------------- tokenizer.json families
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    spec = FAMILIES[request.param]
    folder = _write(tmp_path_factory.mktemp(request.param), spec.backend(), spec.files)
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_family_call_matches_hf(family):
    lens_tok, hf_tok = family
    hf_tok.pad_token = lens_tok.pad_token  # as TransformerLens sets it
    texts = ["Hello world, hello there", "Hi", "", f"a{lens_tok.eos_token}b"]
    for side in ("right", "left"):
        lens_tok.padding_side = hf_tok.padding_side = side
        for kw in ({}, {"padding": True, "return_tensors": "pt"}, {"add_special_tokens": False},
                   {"truncation": True, "max_length": 3},
                   {"padding": "max_length", "max_length": 9}):
            same_call(lens_tok, hf_tok, texts, **kw)
        same_call(lens_tok, hf_tok, "Hello world", return_tensors="pt")
    lens_tok.padding_side = "right"


def test_family_encode_decode_vocab_match_hf(family):
    lens_tok, hf_tok = family
    assert lens_tok.get_vocab() == hf_tok.get_vocab() and len(lens_tok) == len(hf_tok)
    for text in FAMILY_STRINGS:
        assert lens_tok.encode(text, add_special_tokens=True) == hf_tok.encode(text)
        ids = hf_tok.encode(text)
        for skip in (False, True):
            assert lens_tok.decode(ids, skip_special_tokens=skip) == \
                hf_tok.decode(ids, skip_special_tokens=skip), text
        assert lens_tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
        assert lens_tok.tokenize(text) == hf_tok.tokenize(text)
    tokens = list(hf_tok.get_vocab())[:50] + ["not-a-token!!"]
    assert lens_tok.convert_tokens_to_ids(tokens) == hf_tok.convert_tokens_to_ids(tokens)
    assert (lens_tok.unk_token, lens_tok.unk_token_id) == (hf_tok.unk_token, hf_tok.unk_token_id)
    assert lens_tok.name_or_path == str(Path(hf_tok.name_or_path).resolve())
    assert lens_tok.model_max_length == hf_tok.model_max_length


def test_pickles_small_and_whole(tok, family):
    """datasets hashes a tokenizer on every map and sends it to each worker: GPT-2's pickles as
    its file paths (with its settings), a tokenizer.json one with its backend."""
    import pickle
    tok.padding_side, tok.pad_token = "left", "Ġworld"
    back = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 5000 and back.encoding is tok.encoding
    assert (back.padding_side, back.pad_token_id, back.encode("Hi there")) == \
        ("left", 995, tok.encode("Hi there"))
    lens_tok = family[0]
    back = pickle.loads(pickle.dumps(lens_tok))
    assert back.encode("Hello world") == lens_tok.encode("Hello world")
    assert (back.bos_token_id, back.tokenizer_prepends_bos) == \
        (lens_tok.bos_token_id, lens_tok.tokenizer_prepends_bos)
