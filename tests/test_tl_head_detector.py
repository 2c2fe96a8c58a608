"""lens.tl.head_detector gives transformer_lens.head_detector's numbers. The oracle is
TransformerLens's own detect_head, run on the same lens model (it needs only model.cfg,
to_tokens, run_with_cache and cache["pattern", l, "attn"]): given the same cache the scores are
bit-equal; with TransformerLens's own forward (which caches every hook point, so LayerNorm runs
unfused) they agree to float32 rounding."""

import logging
import runpy
from pathlib import Path

import pytest
import torch

import lens.tl as tl
from lens import circuits
from lens.tl import head_detector as hd

TL = pytest.importorskip("transformer_lens.head_detector")

PROMPT = "one two three one two three one two three, green ideas sleep furiously; green ideas"
PROMPTS = ["This is the first the test prompt.",
           "one two three one two three one two three",
           "1 2 3 4 5 1 2 3 4 1 2 3 1 2 3 4 5 6 7"]
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def model():
    return tl.HookedTransformer.from_pretrained("lens-tiny-attn2l")


def tl_cache(model, seq):
    """A cache of every layer's pattern without the batch axis, as TL's detect_head reads it."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    return model.run_with_cache(model.to_tokens(seq), names_filter=names, remove_batch_dim=True)[1]


def assert_tl_close(ours, theirs, error_measure):
    # "abs" rounds to 3 decimals, so a float32 difference in the pattern can move it by 0.001
    atol = 1e-3 + 1e-6 if error_measure == "abs" else 1e-5
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


@pytest.mark.parametrize("name", hd.HEAD_NAMES)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos,exclude_current_token", FLAGS)
def test_builtin_patterns_match_transformer_lens(model, name, error_measure, exclude_bos,
                                                 exclude_current_token):
    kw = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
              error_measure=error_measure)
    ours = hd.detect_head(model, PROMPT, name, **kw)
    assert ours.shape == (2, 4) and torch.isfinite(ours).all()
    cache = tl_cache(model, PROMPT)
    assert torch.equal(ours, TL.detect_head(model, PROMPT, name, cache=cache, **kw))
    assert torch.equal(hd.detect_head(model, PROMPT, name, cache=cache, **kw), ours)
    assert_tl_close(ours, TL.detect_head(model, PROMPT, name, **kw), error_measure)


@pytest.mark.parametrize("heads", [[(0, 1), (1, 3), (1, 0)], {1: [0, 2]}, {0: [3]}, []])
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_heads_subsets_score_minus_one_elsewhere(model, heads, error_measure):
    kw = dict(heads=heads, error_measure=error_measure)
    cache = tl_cache(model, PROMPT)
    ours = hd.detect_head(model, PROMPT, "induction_head", cache=cache, **kw)
    assert torch.equal(ours, TL.detect_head(model, PROMPT, "induction_head", cache=cache, **kw))
    # without a cache only the layers named run with a materialised pattern (the others through
    # the fused kernel), so the layers after them can differ by float32 rounding
    assert_tl_close(hd.detect_head(model, PROMPT, "induction_head", **kw), ours, error_measure)
    full = hd.detect_head(model, PROMPT, "induction_head", cache=cache, error_measure=error_measure)
    named = torch.zeros(2, 4, dtype=torch.bool)
    for l, h in (heads.items() if isinstance(heads, dict) else [(l, [h]) for l, h in heads]):
        named[l, h] = True
    assert torch.equal(ours[named], full[named]) and (ours[~named] == -1).all()
    # negative indices count from the end (TransformerLens fails on a negative layer)
    assert torch.equal(hd.detect_head(model, PROMPT, "induction_head", heads=[(-1, -1)]),
                       hd.detect_head(model, PROMPT, "induction_head", heads=[(1, 3)]))


def current_word_pattern(str_tokens):
    """The notebook's "current word head" pattern (int64): earlier tokens of the same word."""
    rows = [[0] * len(str_tokens) for _ in range(2)]
    for i in range(2, len(str_tokens)):
        j, n = i, 0
        while not str_tokens[j].startswith(" "):
            n, j = n + 1, j - 1
        rows.append([0] * (i - n) + [1] * n + [0] * (len(str_tokens) - i))
    return torch.as_tensor(rows)


@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos,exclude_current_token", FLAGS)
def test_custom_patterns_match_transformer_lens(model, error_measure, exclude_bos,
                                                exclude_current_token):
    prompt = "The following lexical sequence has been optimised for loquaciously multitoken letters."
    n = len(model.to_str_tokens(prompt))
    g = torch.Generator().manual_seed(0)
    patterns = [current_word_pattern(model.to_str_tokens(prompt)),  # int64 0/1
                torch.ones(n, n).tril(),
                (torch.rand(n, n, generator=g) > 0.7).float().tril()]
    kw = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
              error_measure=error_measure)
    cache = tl_cache(model, prompt)
    for pattern in patterns:
        ours = hd.detect_head(model, prompt, pattern, **kw)
        assert torch.equal(ours, TL.detect_head(model, prompt, pattern, cache=cache, **kw))
    assert_tl_close(ours, TL.detect_head(model, prompt, pattern, **kw), error_measure)
    # a pattern of ones is the notebook's Goodhart example: "mul" gives every head 1
    ones = hd.detect_head(model, prompt, patterns[1], exclude_bos=True, exclude_current_token=True)
    torch.testing.assert_close(ones, torch.ones(2, 4))


def test_weighted_pattern_with_mul_warns_as_transformer_lens(model, caplog):
    n = len(model.to_str_tokens(PROMPT))
    pattern = 0.5 * torch.ones(n, n).tril()
    with caplog.at_level(logging.WARNING):
        ours = hd.detect_head(model, PROMPT, pattern)
    assert "values other than 0 or 1" in caplog.text
    assert torch.equal(ours, TL.detect_head(model, PROMPT, pattern, cache=tl_cache(model, PROMPT)))
    torch.testing.assert_close(ours, torch.full((2, 4), 0.5))


@pytest.mark.parametrize("name", hd.HEAD_NAMES)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_list_of_prompts_is_the_mean_over_prompts(model, name, error_measure):
    kw = dict(exclude_bos=True, error_measure=error_measure, heads=[(0, 0), (1, 1), (1, 2)])
    ours = hd.detect_head(model, PROMPTS, name, **kw)
    assert_tl_close(ours, TL.detect_head(model, PROMPTS, name, **kw), error_measure)
    each = torch.stack([hd.detect_head(model, p, name, **kw) for p in PROMPTS])
    assert torch.equal(ours, each.mean(0))


def test_a_cache_is_used_and_left_untouched(model):
    _, batched = model.run_with_cache(PROMPT)  # with its batch axis of 1: TL would fail here
    before = batched["pattern", 1, "attn"].clone()
    kw = dict(exclude_bos=True, exclude_current_token=True)
    assert torch.equal(hd.detect_head(model, PROMPT, "previous_token_head", cache=batched, **kw),
                       TL.detect_head(model, PROMPT, "previous_token_head", **kw))
    assert torch.equal(batched["pattern", 1, "attn"], before)
    _, other = model.run_with_cache("a different, longer prompt than the first one is")
    with pytest.raises(ValueError, match=r"cached pattern of layer 0 has shape .*needs \[n_heads"):
        hd.detect_head(model, PROMPT, "previous_token_head", cache=other)


def test_only_the_patterns_asked_for_are_cached(model, monkeypatch):
    calls = []
    run = type(model).run_with_cache

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "run_with_cache", spy)
    hd.detect_head(model, PROMPT, "induction_head", heads=[(0, 2)])
    hd.detect_head(model, PROMPT, "induction_head")
    assert calls[0]["names_filter"] == ["blocks.0.attn.hook_pattern"]
    assert calls[0]["stop_at_layer"] == "auto"
    assert calls[1]["names_filter"] == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]


def test_pattern_builders_match_transformer_lens():
    g = torch.Generator().manual_seed(3)
    for n in (2, 5, 17):
        tokens = torch.randint(0, 4, (1, n), generator=g)  # a small vocabulary: many repeats
        for name in hd.HEAD_NAMES:
            ours = getattr(hd, f"get_{name}_detection_pattern")(tokens)
            theirs = getattr(TL, f"get_{name}_detection_pattern")(tokens)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (name, n)
            assert torch.equal(getattr(hd, f"get_{name}_detection_pattern")(tokens[0]), theirs)
    with pytest.raises(ValueError, match=r"one prompt.*\(2, 3\)"):
        hd.get_duplicate_token_head_detection_pattern(torch.zeros(2, 3, dtype=torch.long))


def test_the_notebook_example_scores():
    # the 4 x 4 example of the demo notebook's "mul" and "abs" sections, with their numbers
    A = torch.tensor([[1, 0, 0, 0], [.5, .5, 0, 0], [.2, .3, .5, 0], [.1, .15, .5, .25]])
    D = hd.get_previous_token_head_detection_pattern(torch.zeros(1, 4, dtype=torch.long))
    expected = {("mul", False): 1.3 / 4, ("mul", True): 0.8 / 0.95,
                ("abs", False): -0.1, ("abs", True): 1 - round(0.3375, 3)}  # the text's 0.6625, rounded
    for (measure, exclude), value in expected.items():
        kw = dict(exclude_bos=exclude, exclude_current_token=exclude, error_measure=measure)
        ours = hd.compute_head_attention_similarity_score(A, D, **kw)
        assert ours == TL.compute_head_attention_similarity_score(A.clone(), D, **kw)
        assert ours == pytest.approx(value, abs=1e-6)
    assert torch.equal(A[:, 0], torch.tensor([1, .5, .2, .1]))  # not modified in place


def test_transformer_lens_mul_and_lens_circuits_differ_by_the_rows_without_a_target(model):
    tokens = model.to_tokens(PROMPT)
    n = tokens.shape[1]
    ours = hd.detect_head(model, PROMPT, "previous_token_head")
    rowwise = circuits.detect_head(model, tokens, circuits.previous_token_pattern(n))
    torch.testing.assert_close(ours, rowwise * (n - 1) / n, atol=1e-5, rtol=0)
    dup = hd.get_duplicate_token_head_detection_pattern(tokens)
    rows = int((dup.sum(-1) > 0).sum())
    torch.testing.assert_close(hd.detect_head(model, PROMPT, "duplicate_token_head"),
                               circuits.detect_head(model, tokens, dup) * rows / n, atol=1e-5, rtol=0)


def test_errors_name_what_is_wrong_and_what_is_valid(model):
    n = len(model.to_str_tokens(PROMPT))
    cases = [
        (dict(detection_pattern="induction"), r"one of head names.*'induction_head'.*got 'induction'"),
        (dict(error_measure="l2"), r"error_measure='l2'.*\('abs', 'mul'\)"),
        (dict(seq=PROMPTS, cache=tl_cache(model, PROMPT)), "cannot be reused across multiple prompts"),
        (dict(seq=PROMPTS, detection_pattern=torch.ones(n, n).tril()), "pass a head name"),
        (dict(seq=[]), "non-empty list of strings"),
        (dict(seq=""), r"1 < tokens < n_ctx=256"),
        (dict(seq=" a" * 300), r"301 tokens.*n_ctx=256"),
        (dict(detection_pattern=torch.ones(n - 1, n - 1).tril()), rf"sequence_length={n}.*\({n - 1}, {n - 1}\)"),
        (dict(detection_pattern=torch.ones(n, n)), "entries above the diagonal"),
        (dict(detection_pattern=torch.ones(1, n, n)), rf"\(1, {n}, {n}\)"),
        (dict(heads=[(2, 0), (0, 4)]), r"\[\(2, 0\), \(0, 4\)\] out of range.*layers 0..1.*heads 0..3"),
    ]
    for kw, match in cases:
        args = {"seq": PROMPT, "detection_pattern": "previous_token_head", **kw}
        with pytest.raises(ValueError, match=match):
            hd.detect_head(model, args.pop("seq"), args.pop("detection_pattern"), **args)
    with pytest.raises(ValueError, match=r"not square; got shape \(3, 4\)"):
        hd.compute_head_attention_similarity_score(torch.zeros(3, 4), torch.zeros(3, 4),
                                                   exclude_bos=False, exclude_current_token=False,
                                                   error_measure="mul")
    with pytest.raises(ValueError, match="lower triangular"):
        hd.compute_head_attention_similarity_score(torch.ones(3, 3), torch.zeros(3, 3),
                                                   exclude_bos=False, exclude_current_token=False,
                                                   error_measure="abs")


def test_the_public_names_of_transformer_lens_module(capsys):
    public = {n for n in vars(TL) if n.isupper() or n.endswith("_detection_pattern") or n in (
        "detect_head", "get_supported_heads", "compute_head_attention_similarity_score",
        "HeadName", "ErrorMeasure", "LayerHeadTuple", "LayerToHead")}
    assert public <= set(hd.__all__) and all(hasattr(hd, n) for n in hd.__all__)
    for n in ("HEAD_NAMES", "INVALID_HEAD_NAME_ERR", "CACHE_WITH_SEQ_LIST_ERR", "SEQ_LEN_ERR"):
        assert getattr(hd, n) == getattr(TL, n), n
    hd.get_supported_heads()
    ours = capsys.readouterr().out
    TL.get_supported_heads()
    assert ours == capsys.readouterr().out
    assert tl.head_detector is hd


DEMO = Path(__file__).resolve().parents[1] / "experiments" / "head_detector_demo.py"


@pytest.mark.slow
def test_head_detector_demo_runs_and_its_copy_of_detect_head_agrees(model, capsys):
    pytest.importorskip("plotly")
    pytest.importorskip("circuitsvis")
    g = runpy.run_path(str(DEMO), run_name="__main__")
    out = capsys.readouterr().out
    assert "Supported heads: ('previous_token_head', 'duplicate_token_head', 'induction_head')" in out
    assert "Layer 1 Attention Heads:" in out
    demo_model, prompt = g["model"], g["prompt"]
    assert isinstance(demo_model, tl.HookedTransformer)
    assert "AttentionHeads" in str(g["plot_attn_pattern_from_cache"](g["cache"], 1))
    # cell 49: the mean of 100 identical "abs" scores of the current-word pattern
    cw = dict(exclude_bos=False, exclude_current_token=True, error_measure="abs")
    lexical = "The following lexical sequence has been optimised for the maximisation of loquaciously multitoken letter combinations."
    assert_tl_close(g["scores"], hd.detect_head(model, lexical, g["detection_pattern"], **cw), "abs")
    # cell 68: no head matches a pattern of ones under "abs"
    assert (g["ones_head_scores"] < 0).all()
    # the notebook's copy of detect_head (cell 15) against the library's, on single prompts
    for pattern in ("previous_token_head", g["ones_detection_pattern"]):
        for kw in [dict(), dict(exclude_bos=True, exclude_current_token=True, error_measure="abs")]:
            assert_tl_close(g["detect_head"](demo_model, prompt, pattern, **kw),
                            hd.detect_head(model, prompt, pattern, **kw), kw.get("error_measure", "mul"))
    # for a list of prompts the copy drops the keywords: cell 61 asked for "abs", got "mul"
    assert_tl_close(g["head_scores"], hd.detect_head(model, g["prompts"], "induction_head"), "mul")
