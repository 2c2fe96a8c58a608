"""lens.tl.utils against TransformerLens's own utilities (transformer_lens.utilities, which 4.x
names what 2.x called utils) on the same inputs: hook names, Slice, losses, masks, sampling,
tensors, tokenize_and_concatenate and test_prompt's printout."""

import io
import itertools
import shutil
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import lens.tl.utils as U
from conftest import make_model
from lens import sites
from lens.factored import FactoredMatrix
from lens.tokenizer import Tokenizer, gpt2_data_dir, to_tokens

TU = pytest.importorskip("transformer_lens.utilities")
EOT = 50256


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2_hf")
    shutil.copyfile(gpt2_data_dir() / "encoder.json", d / "vocab.json")
    shutil.copyfile(gpt2_data_dir() / "vocab.bpe", d / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(str(d))


# ---------------------------------------------------------------- get_act_name
NAMES = ["embed", "pos_embed", "logits", "resid_pre", "resid_mid", "resid_post", "attn_out",
         "mlp_out", "mlp_in", "q_input", "k_input", "v_input", "q", "k", "v", "z", "rot_q",
         "rot_k", "result", "pattern", "attn_scores", "attn", "attn_logits", "key", "query",
         "value", "pre", "post", "mid", "pre_linear", "mlp_pre", "mlp_mid", "mlp_post", "scale",
         "normalized", "attn_out_pre", "mlp_out_pre", "unknown"]
LAYER_TYPES = [None, "a", "m", "b", "block", "blocks", "attention", "attn", "mlp", "ln1", "ln2",
               "ln_final", ""]
COMPACT = ["k6a", "k6", "scale4ln1", "pre5", "normalized27ln2", "resid_pre5", "z0", "pattern11",
           "attn3", "v2a", "q10attn", "post0m", "scale0", "resid12b", "result1a", "embed0",
           "hook_embed", "blocks.0.attn.hook_z", "ln_final.hook_scale", "a1", "k6ab", "K6a"]


def test_get_act_name_grid_matches_transformer_lens():
    for name, layer, layer_type in itertools.product(NAMES, [None, 0, 5, "3"], LAYER_TYPES):
        args = (name, layer, layer_type)
        assert U.get_act_name(*args) == TU.get_act_name(*args), args
    for name in COMPACT:
        assert U.get_act_name(name) == TU.get_act_name(name), name
        for layer, layer_type in ((1, None), (None, "ln2"), (2, "a")):
            args = (name, layer, layer_type)
            assert U.get_act_name(*args) == TU.get_act_name(*args), args
    assert U.get_act_name("k6a") == U.get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"
    assert U.get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert U.get_act_name("pre5") == "blocks.5.mlp.hook_pre"
    assert U.get_act_name("attn", 2) == "blocks.2.attn.hook_pattern"
    assert U.get_act_name("embed") == "hook_embed"
    assert U.get_act_name("normalized") == "ln_final.hook_normalized"
    assert U.get_act_name("resid_post", np.int64(3)) == "blocks.3.hook_resid_post"


def test_get_act_name_agrees_with_lens_sites():
    """Every lens hook point's short name means the same hook under TransformerLens's rules."""
    for leaf, (owner, _) in sites.SITES.items():
        for layer in (None,) if owner is None else (None, 0, 3):  # lens drops a top one's layer
            if leaf in ("scale", "normalized") and layer is not None:
                for part in ("ln1", "ln2"):  # lens defaults a norm to ln1, TransformerLens not
                    assert U.get_act_name(leaf, layer, part) == sites.name(leaf, layer, part)
                continue
            try:
                full = sites.name(leaf, layer)
            except KeyError:  # a block hook point without a layer
                continue
            assert U.get_act_name(leaf, layer) == full, (leaf, layer)


# ---------------------------------------------------------------- Slice
SLICE_INPUTS = [None, 0, 3, -1, np.int64(2), torch.tensor(1), np.array(2), (2,), (1, 4), (0, 6, 2),
                (-3, None), (1, None, 2), slice(1, 5), slice(None), [0, 2, 5], [-1],
                torch.tensor([1, 3]), np.array([4, 0]), torch.tensor([True, False] * 3)]


@pytest.mark.parametrize("value", SLICE_INPUTS, ids=repr)
def test_slice_matches_transformer_lens(value):
    ours, theirs = U.Slice(value), TU.Slice(value)
    assert ours.mode == theirs.mode and repr(ours) == repr(theirs)
    if isinstance(theirs.slice, np.ndarray):
        assert np.array_equal(ours.slice, theirs.slice) and ours.slice.dtype == theirs.slice.dtype
    else:
        assert ours.slice == theirs.slice and type(ours.slice) is type(theirs.slice)
    x = torch.arange(6 * 6 * 2).reshape(6, 6, 2)
    is_mask = isinstance(value, torch.Tensor) and value.dtype == torch.bool
    dims = (1,) if is_mask else (0, 1, -2)
    for dim in dims:
        assert torch.equal(ours.apply(x, dim), theirs.apply(x, dim))
    assert np.array_equal(ours.indices(6), theirs.indices(6))
    if theirs.mode == "int":
        assert np.array_equal(ours.indices(), theirs.indices())
    else:
        with pytest.raises(ValueError, match="max_ctx must be specified"):
            ours.indices()
    ours_u, theirs_u = U.Slice.unwrap(value), TU.Slice.unwrap(value)
    assert ours_u.mode == theirs_u.mode and repr(ours_u) == repr(theirs_u)
    assert U.Slice.unwrap(ours) is ours


def test_slice_errors():
    for bad in ("a", 1.5, (1, 2, 3, 4), {1: 2}):
        with pytest.raises(ValueError, match="Invalid input_slice"):
            U.Slice(bad)


# ---------------------------------------------------------------- losses
def test_lm_cross_entropy_loss_matches_transformer_lens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    for m in (None, mask, mask.bool()):
        for per_token in (False, True):
            ours = U.lm_cross_entropy_loss(logits, tokens, m, per_token)
            assert torch.equal(ours, TU.lm_cross_entropy_loss(logits, tokens, m, per_token))
    for per_token in (False, True):
        assert torch.equal(U.lm_accuracy(logits, tokens, per_token),
                           TU.lm_accuracy(logits, tokens, per_token))
    with pytest.raises(ValueError, match=r"same shape as tokens, got \(3, 6\) and \(3, 7\)"):
        U.lm_cross_entropy_loss(logits, tokens, mask[:, :6])


# ---------------------------------------------------------------- masks and BOS
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_get_attention_mask_matches_transformer_lens(tok, hf_tok, side, prepend_bos):
    texts = ["Hello world, this is longer", "Hi", "🙂 two", "<|endoftext|>Hi"]
    tokens = to_tokens(tok, texts, prepend_bos=prepend_bos, padding_side=side)
    hf_tok.pad_token = hf_tok.eos_token
    hf_tok.padding_side = side
    theirs = TU.get_attention_mask(hf_tok, tokens, prepend_bos)
    assert torch.equal(U.get_attention_mask(tok, tokens, prepend_bos, side), theirs)
    tok.padding_side = side
    try:
        assert torch.equal(U.get_attention_mask(tok, tokens, prepend_bos), theirs)
        assert torch.equal(TU.get_attention_mask(tok, tokens, prepend_bos), theirs)
    finally:
        tok.padding_side = "right"
    if prepend_bos:
        ours = U.get_tokens_with_bos_removed(tok, tokens, side)
        assert torch.equal(ours, TU.get_tokens_with_bos_removed(tok, tokens, side))
    assert torch.equal(U.get_attention_mask(None, tokens, prepend_bos), torch.ones_like(tokens))


def test_get_attention_mask_pad_distinct_from_bos(tok):
    """Gemma-like: pad is its own token, so a BOS is never a pad."""
    tok = Tokenizer.gpt2()
    tok.pad_token = "!"
    for side in ("left", "right"):
        tokens = to_tokens(tok, ["Hello world", "Hi"], padding_side=side)
        for prepend_bos in (True, False):
            assert torch.equal(U.get_attention_mask(tok, tokens, prepend_bos, side),
                               TU.get_attention_mask(tok, tokens, prepend_bos, side))
        assert torch.equal(U.get_tokens_with_bos_removed(tok, tokens, side),
                           TU.get_tokens_with_bos_removed(tok, tokens, side))
    with pytest.raises(ValueError, match="padding_side='up'"):
        U.get_attention_mask(tok, tokens, True, "up")
    assert U.get_input_with_manually_prepended_bos("<s>", ["a", "b"]) == \
        TU.get_input_with_manually_prepended_bos("<s>", ["a", "b"]) == ["<s>a", "<s>b"]
    assert U.get_input_with_manually_prepended_bos(None, "a") == "a"


# ---------------------------------------------------------------- tensors
def test_tensor_helpers_match_transformer_lens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, generator=g)
    for value in (x, x.bfloat16(), [1, 2], (1.0, 2.0), np.ones(3), 3, 2.5, True, "s"):
        ours, theirs = U.to_numpy(value), TU.to_numpy(value)
        assert np.array_equal(ours, theirs) and ours.dtype == theirs.dtype
    with pytest.raises(ValueError, match="invalid type"):
        U.to_numpy({1: 2})
    assert torch.equal(U.get_corner(x, 2), TU.get_corner(x, 2))
    assert torch.equal(U.remove_batch_dim(x), TU.remove_batch_dim(x))
    assert U.remove_batch_dim(x[0]) is x[0] or torch.equal(U.remove_batch_dim(x[0]), x[0])
    assert torch.equal(U.transpose(x), TU.transpose(x))
    square, tri = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g).tril()
    for m in (square, tri, x[0], tri[None]):
        assert U.is_square(m) == TU.is_square(m)
        assert U.is_lower_triangular(m) == TU.is_lower_triangular(m)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    for offset in (0, 2):
        assert torch.equal(U.get_offset_position_ids(offset, mask),
                           TU.get_offset_position_ids(offset, mask))
    for dim, reverse in itertools.product((0, 1, -1), (False, True)):
        assert torch.equal(U.get_cumsum_along_dim(x, dim, reverse),
                           TU.get_cumsum_along_dim(x, dim, reverse))
    for clone in (True, False):
        assert torch.equal(U.repeat_along_head_dimension(x, 3, clone),
                           TU.repeat_along_head_dimension(x, 3, clone))
    d = {"a.b.c": 1, "a.d": 2, "ab.e": 3}
    assert U.filter_dict_by_prefix(d, "a") == TU.filter_dict_by_prefix(d, "a") == {"b.c": 1, "d": 2}
    model = make_model()
    assert U.get_nested_attr(model, "blocks.0.attn") is TU.get_nested_attr(model, "blocks.0.attn")
    for f in (U.gelu_new, U.gelu_fast, U.gelu_pytorch_tanh, U.solu):
        assert torch.equal(f(x), getattr(TU.activation_functions, f.__name__)(x))


def test_check_structure_prints_as_transformer_lens():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    for b in (a * 2, a.flip(0), a.flip(1), -a):
        for verbose in (False, True):
            outputs = []
            for f in (U.check_structure, TU.check_structure):
                with redirect_stdout(io.StringIO()) as out:
                    f(a, b, verbose=verbose)
                outputs.append(out.getvalue())
            assert outputs[0] == outputs[1]
    with pytest.raises(ValueError, match=r"one shape, got \(4, 4\) and \(4, 3\)"):
        U.check_structure(a, a[:, :3])


def test_composition_scores_match_transformer_lens():
    from transformer_lens.FactoredMatrix import FactoredMatrix as TLFactoredMatrix
    g = torch.Generator().manual_seed(0)
    shapes = [((2, 3, 8, 4), (4, 8)), ((3, 8, 4), (2, 4, 8)), ((8, 4), (4, 8))]
    for (ls, ms), (rs, rm) in itertools.product(shapes, shapes):
        A, B, C, D = (torch.randn(*s, generator=g, dtype=torch.float64) for s in (ls, ms, rs, rm))
        for broadcast in (True, False):
            try:
                theirs = TU.composition_scores(TLFactoredMatrix(A, B), TLFactoredMatrix(C, D),
                                               broadcast_dims=broadcast)
            except RuntimeError:  # TransformerLens cannot broadcast these without broadcast_dims
                continue
            ours = U.composition_scores(FactoredMatrix(A, B), FactoredMatrix(C, D), broadcast)
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs)
    fm = FactoredMatrix(torch.randn(5, 5, 2, generator=g), torch.randn(5, 2, 5, generator=g))
    torch.testing.assert_close(U.get_matrix_corner(fm, 3), fm.AB[:3, :3, :3])
    with pytest.raises(ValueError, match="rdim == W_B.ldim"):
        U.composition_scores(FactoredMatrix(A, B),
                             FactoredMatrix(torch.ones(5, 2), torch.ones(2, 3)))


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("kw", [
    {}, {"temperature": 0.0}, {"temperature": 0.7}, {"top_k": 3}, {"top_k": 1000}, {"top_p": 0.5},
    {"top_p": 1.0}, {"freq_penalty": 0.5}, {"repetition_penalty": 1.3},
    {"temperature": 0.0, "repetition_penalty": 2.0}, {"top_k": 5, "freq_penalty": 1.0,
                                                      "repetition_penalty": 1.2},
])
def test_sample_logits_matches_transformer_lens(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    tokens = torch.randint(0, 50, (4, 9), generator=g)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = U.sample_logits(logits, tokens=tokens, **kw)
        torch.manual_seed(seed)
        assert torch.equal(ours, TU.sample_logits(logits, tokens=tokens, **kw))


def test_sample_logits_errors():
    logits = torch.zeros(2, 5)
    for kw, message in (({"top_k": 0}, "top_k has to be greater than 0"),
                        ({"top_p": 1.5}, r"top_p has to be in \(0, 1\]"),
                        ({"freq_penalty": -1.0}, "must be non-negative"),
                        ({"freq_penalty": 1.0}, "freq_penalty needs tokens")):
        with pytest.raises(ValueError, match=message):
            U.sample_logits(logits, **kw)


def test_logits_to_df_matches_transformer_lens(tok):
    pytest.importorskip("pandas")
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    for kw in ({"top_k": 5}, {"tokenizer": tok, "top_k": 7}):
        assert U.logits_to_df(logits, **kw).equals(TU.logits_to_df(logits, **kw))


# ---------------------------------------------------------------- tokenize_and_concatenate
DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world!", "",
        "def f(x):\n    return x ** 2\n", "日本語のテキスト and more text here to cut",
        "short"]


@pytest.mark.parametrize("max_length, add_bos", [(8, True), (5, False), (200, True), (2, True)])
def test_tokenize_and_concatenate_matches_transformer_lens(tok, hf_tok, max_length, add_bos):
    datasets = pytest.importorskip("datasets")
    hf_tok.pad_token = hf_tok.eos_token
    ds = datasets.Dataset.from_dict({"text": DOCS, "meta": list(range(len(DOCS)))})
    kw = dict(max_length=max_length, add_bos_token=add_bos, num_proc=None)
    theirs = TU.tokenize_and_concatenate(ds, hf_tok, **kw)
    ours = U.tokenize_and_concatenate(ds, tok, **kw)
    assert ours.column_names == theirs.column_names == ["tokens"]
    assert torch.equal(ours["tokens"][:], theirs["tokens"][:])
    from_list = U.tokenize_and_concatenate(DOCS, tok, **kw)
    assert torch.equal(from_list["tokens"][:], theirs["tokens"][:])
    rows = U.tokenize_and_concatenate([{"text": d, "meta": 0} for d in DOCS], tok, **kw)
    assert torch.equal(rows["tokens"][:], theirs["tokens"][:])


def test_tokenize_and_concatenate_batches_and_fallback(tok, hf_tok, monkeypatch):
    """Documents are joined 1000 at a time, as datasets' map batches them; without `datasets`
    a list gives a TokenDataset with the same rows."""
    datasets = pytest.importorskip("datasets")
    docs = [f"document number {i} says hello" for i in range(2100)]
    theirs = TU.tokenize_and_concatenate(datasets.Dataset.from_dict({"text": docs}), hf_tok,
                                         max_length=64, num_proc=None)["tokens"][:]
    monkeypatch.setattr(U, "_hf_dataset_types", lambda: ())
    ours = U.tokenize_and_concatenate(docs, tok, max_length=64)
    assert isinstance(ours, U.TokenDataset) and len(ours) == theirs.shape[0]
    assert torch.equal(ours["tokens"], theirs) and torch.equal(ours[3]["tokens"], theirs[3])
    assert next(iter(torch.utils.data.DataLoader(ours, batch_size=4)))["tokens"].shape == (4, 64)
    with pytest.raises(ValueError, match="row 1 of the dataset has no 'text'"):
        U.tokenize_and_concatenate([{"text": "a"}, {"body": "b"}], tok)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        U.tokenize_and_concatenate("just a string", tok)


# ---------------------------------------------------------------- test_prompt
@pytest.fixture(scope="module")
def gpt2_vocab_model():
    model = make_model(d_vocab=50257, n_ctx=32)
    model.tokenizer = Tokenizer.gpt2()
    return model


@pytest.mark.parametrize("answer, kw", [
    ("road", {}), ("road trip ahead", {"top_k": 3}), (["road", " tree", "car"], {}),
    (" road", {"prepend_space_to_answer": False, "prepend_bos": False}),
    ("road", {"print_details": False}),
])
def test_test_prompt_prints_as_transformer_lens(gpt2_vocab_model, monkeypatch, answer, kw):
    rich = pytest.importorskip("rich")
    import rich.console
    monkeypatch.setattr(rich, "_console", rich.console.Console(width=10_000))  # no wrapping
    outputs = []
    for f in (U.test_prompt, TU.test_prompt):
        with redirect_stdout(io.StringIO()) as out:
            # lens's to_tokens takes a bool, so TransformerLens's gets prepend_bos=True, the
            # default that lens's None stands for
            f("Why did the elephant cross the", answer, gpt2_vocab_model,
              **({"prepend_bos": True} if f is TU.test_prompt and "prepend_bos" not in kw else {}),
              **kw)
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert "Ranks of the answer tokens:" in outputs[0]


# ---------------------------------------------------------------- devices and the Hub
def test_devices_and_gpu_mem(capsys):
    assert U.get_device() == TU.get_device()
    U.print_gpu_mem("step")
    assert capsys.readouterr().out.startswith("step ~ ")


def test_hub_helpers_offline(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="could not download 'config.json'.*'no-one/nothing'"):
        U.download_file_from_hf("no-one/nothing", "config.json")
    with pytest.raises(ValueError, match="Dataset nope not supported; the datasets are"):
        U.get_dataset("nope")


def test_keep_single_column():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a"], "x": [1], "y": [2]})
    assert U.keep_single_column(ds, "text").column_names == \
        TU.keep_single_column(ds, "text").column_names == ["text"]
    assert U.keep_single_column([{"text": "a", "x": 1}], "text") == [{"text": "a"}]
