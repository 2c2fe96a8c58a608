"""lens.check and `lens check`: random Llama and GPT-2 checkpoints pass against transformers, a
corrupted or mismatched lens model fails the log-prob check, a hook that breaks the stream fails
the identities, the CLI exits 0 / 1 / 2, and without transformers only the identities run."""

import sys

import pytest
import torch
import transformers as T

import lens
from lens import cli
from lens.check import DECOMPOSE, HEADS, RESID_MID, RESID_POST

CONFIGS = {
    "llama": lambda: T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, vocab_size=101,
                                   max_position_embeddings=64),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64),
    # GPT-2's own vocabulary, so the model gets the GPT-2 tokenizer and the built-in prompts
    "gpt2_vocab": lambda: T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50257,
                                       n_positions=64),
}
_BUILT: dict = {}


def random_hf(name: str, seed: int = 0):
    """A random HF model, norm weights away from 1 and biases away from 0 so that folding
    mistakes show."""
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "ln" in n or "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_((0.2 if n.endswith("bias") else 0.15) * torch.randn_like(p))
    return hf


def checkpoint(name: str, tmp_path_factory, seed: int = 0):
    """The folder of a saved random checkpoint, built once per session."""
    if (name, seed) not in _BUILT:
        folder = tmp_path_factory.mktemp(f"{name}_{seed}")
        random_hf(name, seed).save_pretrained(folder)
        _BUILT[name, seed] = folder
    return _BUILT[name, seed]


@pytest.mark.parametrize("name, process", [("llama", True), ("llama", False), ("gpt2", True),
                                           ("gpt2", False), ("gpt2_vocab", True)])
def test_random_checkpoints_pass(tmp_path_factory, name, process):
    folder = checkpoint(name, tmp_path_factory)
    model = lens.HookedGPT.from_pretrained(folder, process=process)
    report = lens.check(model, folder)
    assert report.ok and report.log_prob_ok
    assert report.log_prob_diff is not None and report.log_prob_diff < 1e-4
    assert set(report.identity_errors) == {RESID_POST, RESID_MID, HEADS, DECOMPOSE}
    assert max(report.identity_errors.values()) <= report.identity_tol == 1e-5
    text = str(report)
    assert "FAIL" not in text and text.rstrip().endswith("PASS") and str(folder) in text
    # only a GPT-2 vocabulary gets a tokenizer (GPT-2's), and with it the built-in prompts
    assert (name == "gpt2_vocab") == ("built-in prompts" in report.inputs)


def test_perturbed_weight_fails_the_log_prob_check(tmp_path_factory):
    folder = checkpoint("llama", tmp_path_factory)
    model = lens.HookedGPT.from_pretrained(folder)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 5] += 5.0
    report = lens.check(model, folder)
    assert report.log_prob_ok is False and not report.ok
    assert report.log_prob_diff > 1e-2
    assert report.identities_ok  # the model is still self-consistent
    assert "log-probs vs HF: max |diff|" in str(report) and str(report).rstrip().endswith("FAIL")


def test_model_of_another_checkpoint_fails(tmp_path_factory):
    other = lens.HookedGPT.from_pretrained(checkpoint("gpt2", tmp_path_factory, seed=1))
    report = lens.check(other, checkpoint("gpt2", tmp_path_factory))
    assert not report.ok and report.log_prob_diff > 0.1


def test_a_hook_that_breaks_the_stream_fails_the_identities(tmp_path_factory):
    folder = checkpoint("llama", tmp_path_factory)
    model = lens.HookedGPT.from_pretrained_no_processing(folder)
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: x + 1.0)
    report = lens.check(model, folder)
    assert report.identity_errors[RESID_POST] > 1e-2 and report.identity_errors[DECOMPOSE] > 1e-2
    assert report.identity_errors[HEADS] <= report.identity_tol
    assert not report.identities_ok and not report.ok
    assert "worst: layer 0" in str(report)


def test_given_prompts(tmp_path_factory):
    folder = checkpoint("gpt2_vocab", tmp_path_factory)
    model = lens.HookedGPT.from_pretrained(folder)
    report = lens.check(model, folder, prompts=["Hello there", [1, 2, 3, 50256]])
    assert report.ok and report.inputs.startswith("2 given prompts")
    llama = lens.HookedGPT.from_pretrained(checkpoint("llama", tmp_path_factory))
    with pytest.raises(ValueError, match="no tokenizer"):
        lens.check(llama, checkpoint("llama", tmp_path_factory), prompts=["text"])
    with pytest.raises(ValueError, match=r"d_vocab=101\), got \[1, 500\]"):
        lens.check(llama, checkpoint("llama", tmp_path_factory), prompts=[[1, 500]])


def test_without_transformers_only_identities(tmp_path_factory, monkeypatch):
    folder = checkpoint("llama", tmp_path_factory)
    model = lens.HookedGPT.from_pretrained(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    report = lens.check(model, folder)
    assert report.log_prob_diff is None and report.log_prob_ok is None and report.ok
    assert "transformers is not installed" in str(report) and "SKIPPED" in str(report)


def test_lens_format_checkpoint_checks_identities():
    model = lens.HookedGPT.from_pretrained("lens-tiny-attn2l")
    report = lens.check(model, "lens-tiny-attn2l")
    assert report.ok and report.log_prob_diff is None and "lens-format" in report.hf_note
    assert RESID_MID not in report.identity_errors  # attention-only blocks


# ---------------------------------------------------------------------- CLI
def test_cli_passes(tmp_path_factory, capsys):
    folder = checkpoint("llama", tmp_path_factory)
    assert cli.main(["check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"lens check {folder}" in out and "llama: 2 layers" in out
    assert out.rstrip().endswith("PASS") and "FAIL" not in out
    assert cli.main(["check", str(folder), "--no-processing", "--dtype", "float32"]) == 0
    assert "processing  none" in capsys.readouterr().out


def test_cli_mismatch_exits_1(tmp_path_factory, capsys, monkeypatch):
    folder = checkpoint("gpt2", tmp_path_factory)
    load = lens.HookedGPT.from_pretrained

    def corrupted(path, **kwargs):
        model = load(path, **kwargs)
        with torch.no_grad():
            model.blocks[0].attn.W_V.mul_(-1.0)
        return model

    monkeypatch.setattr(lens.HookedGPT, "from_pretrained", corrupted)
    assert cli.main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "log-probs vs HF" in out and out.rstrip().endswith("FAIL")


def test_cli_bad_path_exits_2(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert "no such file or directory" in captured.err and captured.out == ""
    assert cli.main(["check", str(tmp_path)]) == 2  # a directory without weights
    assert "holds no weights" in capsys.readouterr().err
