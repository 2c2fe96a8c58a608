"""lens.dissect: the report's numbers are the model's, its CLI runs, bad input fails clearly."""

import pytest
import torch

from lens.cli import main
from lens.dissect import dissect, load_model, sample, sample_loop, show_token
from lens.tokenizer import Tokenizer
from tests.conftest import make_model

TEXT = "Hello World"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture
def model(gpt2_tokenizer):
    m = make_model(d_vocab=50257, n_ctx=16, d_model=16, n_heads=2, d_mlp=24)
    m.tokenizer = gpt2_tokenizer
    return m


def table_rows(report: str, title: str, n: int) -> list[list[str]]:
    """The n body rows of the table printed under the line starting with `title`, as cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    return [[c.strip() for c in line.split("│")] for line in lines[start + 3:start + 3 + n]]


def test_report_shows_tokens_and_shapes(model):
    d = dissect(model, TEXT, max_new_tokens=2)
    report = str(d)
    assert d.str_tokens == ["<|endoftext|>", "Hello", " World"]
    assert d.tokens.tolist() == [50256, 15496, 2159]
    for s in d.str_tokens:
        assert show_token(s) in report
    assert "·World" in report and " World │" not in report
    for expected in ["W_E[tokens]: [1, 3, 16]", "W_pos[:3]:", "x0 = sum:", "[1, 3, 16]",
                     "q, k, v: [1, 2, 3, 8] each, as [batch, n_heads, tokens, d_head]",
                     "[batch, pos, n_heads, d_head] = [1, 3, 2, 8]", "[1, 2, 3, 3]",
                     "[1, 3, 24] [batch, tokens, d_mlp]", "logits [1, 3, 50257]",
                     "resid_pre", "resid_mid", "resid_post"]:
        assert expected in report, expected
    assert d.render() == report
    assert show_token("a\n b\t") == "a\\n·b\\t" and show_token("\\n") == "\\\\n"


def test_numbers_equal_the_cache(model):
    d = dissect(model, TEXT, top_k=4, max_new_tokens=0)
    tokens = model.to_tokens(TEXT)
    logits, cache = model.run_with_cache(tokens)
    for l, b in enumerate(d.blocks):
        torch.testing.assert_close(b.patterns, cache["pattern", l][0])
        torch.testing.assert_close(b.resid_pre_norm, cache["resid_pre", l][0].norm(dim=-1))
        torch.testing.assert_close(b.resid_mid_norm, cache["resid_mid", l][0].norm(dim=-1))
        torch.testing.assert_close(b.resid_post_norm, cache["resid_post", l][0].norm(dim=-1))
        post = cache["post", l][0, -1]
        assert [i for i, _ in b.top_neurons] == post.topk(4).indices.tolist()
    torch.testing.assert_close(d.x0_norm, (cache["embed"] + cache["pos_embed"])[0].norm(dim=-1))
    top = torch.topk(logits[0], 4)
    assert torch.equal(d.top_ids, top.indices)
    torch.testing.assert_close(d.top_probs, torch.softmax(logits[0], -1).gather(-1, top.indices))
    assert d.top_str[2] == [model.tokenizer.decode_single(i) for i in top.indices[2].tolist()]

    rows = table_rows(str(d), "head 1.1:", 3)  # rows = query, columns = key, in %
    pattern = cache["pattern", 1][0, 1]
    for q, row in enumerate(rows):
        assert row[0] == show_token(d.str_tokens[q])
        for k, cell in enumerate(row[1:]):
            if k > q:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(100 * float(pattern[q, k]), abs=0.051)


def test_layer_and_head_restrict_the_tables(model):
    d = dissect(model, TEXT, layer=-1, head=1, max_new_tokens=0)
    assert d.blocks[0].patterns is None and d.blocks[1].heads == [1]
    report = str(d)
    assert "head 1.1:" in report and "head 1.0:" not in report and "head 0." not in report
    assert "resid_post" in report.split("3.0 Block 0")[1]


def test_attention_only_model(gpt2_tokenizer):
    m = make_model(d_vocab=50257, n_ctx=16, attn_only=True)
    m.tokenizer = gpt2_tokenizer
    d = dissect(m, "a\nb", max_new_tokens=1)
    assert d.blocks[0].resid_mid_norm is None and d.blocks[0].mlp_shape is None
    report = str(d)
    assert "resid_mid" not in report and "MLP" not in report and "\\n" in report


def test_sampling_is_seeded(model):
    tokens = model.to_tokens(TEXT)
    d = dissect(model, TEXT, max_new_tokens=3, seed=3)
    assert len(d.continuation_ids) == 3 and d.continuation == model.tokenizer.decode(d.continuation_ids)
    assert d.continuation_ids == sample(model, tokens, 3, temperature=1.0, seed=3)
    greedy, seq = sample_loop(model, tokens, 2, temperature=0.0, seed=0), tokens
    for _ in range(2):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy == seq[0, 3:].tolist() == sample(model, tokens, 2, temperature=0.0, seed=0)
    assert sample_loop(model, tokens, 3, 1.0, seed=5) == sample_loop(model, tokens, 3, 1.0, seed=5)
    assert len(sample(model, tokens, 50, temperature=1.0, seed=0)) <= 16 - 3  # capped by n_ctx


def test_plot_writes_figures(model, tmp_path):
    pytest.importorskip("matplotlib")
    dissect(model, TEXT, max_new_tokens=0, plot_dir=tmp_path / "figs")
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["attention_L0.png", "attention_L1.png", "resid_norm.png"]
    assert all((tmp_path / "figs" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_cli_on_a_saved_model(model, tmp_path, capsys):
    model.save(tmp_path / "m")
    assert main(["dissect", TEXT, "--model", str(tmp_path / "m"), "--max-new-tokens", "3",
                 "--top-k", "2", "--head", "0", "--temperature", "0.5"]) == 0
    out = capsys.readouterr().out
    for expected in ["<|endoftext|>", "·World", "logits [1, 3, 50257]", "head 0.0:", "head 1.0:",
                     "Sampling 3 new tokens (temperature 0.5, seed 0)", "#2"]:
        assert expected in out, expected
    assert "head 0.1:" not in out
    assert main(["dissect", TEXT, "--model", str(tmp_path / "m"), "--head", "2"]) == 2
    assert "lens dissect: error: head=2 is out of range" in capsys.readouterr().err
    main(["demo"])  # the other subcommand still runs
    assert "hook points cached" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(text=""), "non-empty"),
    (dict(text=" ".join(["word"] * 20)), "21 tokens with BOS, longer than the model's context n_ctx=16"),
    (dict(layer=2), "layer=2 is out of range: the model has 2 layers"),
    (dict(head=-3), "head=-3 is out of range: the model has 2 heads"),
    (dict(top_k=0), "top_k=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
])
def test_bad_input(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        dissect(model, **{"text": TEXT, **kwargs})


def test_bad_model(model, tmp_path):
    with pytest.raises(ValueError, match="no such file.*\n.*lens-tiny-attn2l"):
        load_model(str(tmp_path / "missing"))
    model.tokenizer = None
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        dissect(model, TEXT)
    with pytest.raises(SystemExit):
        main(["dissect", TEXT, "--layer", "x"])
