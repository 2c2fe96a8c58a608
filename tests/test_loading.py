"""Loading GPT-2 checkpoints: lens matches HF transformers on the same weights (log-probs, loss,
greedy continuations) from every checkpoint layout, refuses bad or unsafe files with clear
errors, and its own format round-trips processed models exactly."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens import GPTConfig, HookedGPT, io
from lens.loading import config_from_hf, convert_gpt2_state_dict, from_pretrained, save
from conftest import SMALL, random_hf, write
from test_io import refuse_opening

transformers = pytest.importorskip("transformers")
LAYOUTS = ["safetensors", "sharded", "bin", "bin_legacy"]


def tokens(batch: int = 3, pos: int = 24, d_vocab: int = 101, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def hf_log_probs(hf, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(toks).logits.log_softmax(-1)


def lens_log_probs(model: HookedGPT, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).log_softmax(-1)


def greedy(model: HookedGPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            prompt = torch.cat([prompt, model(prompt)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return prompt


# ---------------------------------------------------------------------- config
def test_config_from_hf_maps_gpt2_fields():
    cfg = config_from_hf({"model_type": "gpt2", "n_layer": 3, "n_embd": 48, "n_head": 6,
                          "vocab_size": 50257, "n_positions": 128, "n_inner": None,
                          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-6})
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.n_ctx) == \
        (3, 48, 6, 8, 50257, 128)
    assert (cfg.d_mlp, cfg.act_fn, cfg.eps, cfg.normalization) == (192, "gelu_new", 1e-6, "LN")
    assert cfg.tokenizer_name == "gpt2"
    cfg = config_from_hf(transformers.GPT2Config(**SMALL, n_inner=40, activation_function="relu"))
    assert (cfg.d_mlp, cfg.act_fn, cfg.tokenizer_name) == (40, "relu", None)


def test_unsupported_configs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='bert' is not supported; lens loads \["):
        config_from_hf({"model_type": "bert", "hidden_size": 64})
    with pytest.raises(ValueError, match=r"model_type='llama'\) lacks the fields \['num_attention_"
                                         r"heads', 'num_hidden_layers', 'intermediate_size', "
                                         r"'vocab_size'\]"):
        config_from_hf({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf({**transformers.GPT2Config(**SMALL).to_dict(),
                        "scale_attn_by_inverse_layer_idx": True})
    folder = write(random_hf(), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="gpt_neox"):
        from_pretrained(folder)


# ---------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("process", [False, True])
def test_log_probs_and_loss_match_hf(tmp_path, layout, process):
    hf = random_hf()
    model = from_pretrained(write(hf, tmp_path / "ckpt", layout), process=process)
    toks = tokens()
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    with torch.no_grad():
        hf_loss = hf(toks, labels=toks).loss
    assert abs(model(toks, return_type="loss") - hf_loss) <= 1e-4
    assert model.cfg.normalization == ("LNPre" if process else "LN")


@pytest.mark.parametrize("process", [False, True])
def test_greedy_continuation_matches_hf_generate(tmp_path, process):
    hf = random_hf(seed=3)
    model = from_pretrained(write(hf, tmp_path / "ckpt"), process=process)
    prompt = tokens(batch=1, pos=5, seed=4)
    with torch.no_grad():
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=10)
    assert torch.equal(greedy(model, prompt, 10), expected)


def test_untied_lm_head(tmp_path):
    hf = random_hf(tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    model = from_pretrained(write(hf, tmp_path / "ckpt"), process=False)
    assert torch.equal(model.W_U, hf.lm_head.weight.T)
    toks = tokens()
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4


def test_convert_gpt2_state_dict_and_layout(tmp_path):
    hf = random_hf()
    cfg = config_from_hf(hf.config)
    sd = convert_gpt2_state_dict(hf.state_dict(), cfg)
    model = HookedGPT(cfg)
    model.load_state_dict(sd)
    toks = tokens()
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    c_attn = hf.transformer.h[1].attn.c_attn.weight
    assert torch.equal(model.blocks[1].attn.W_K[2], c_attn[:, 32 + 16:32 + 24])
    loaded = from_pretrained(write(hf, tmp_path / "ckpt"))
    assert loaded.blocks[0].attn.W_Q.stride() == HookedGPT(cfg).blocks[0].attn.W_Q.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float64"])
def test_dtype_and_device(tmp_path, dtype):
    model = from_pretrained(write(random_hf(), tmp_path / "ckpt"), device="cpu", dtype=dtype)
    expected = torch.bfloat16 if dtype is torch.bfloat16 else torch.float64
    assert model.cfg.dtype == expected
    assert {p.dtype for p in model.parameters()} == {expected}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("process", [False, True])
def test_bfloat16_matches_hf_bfloat16(tmp_path, process):
    """lens in bf16 against HF in bf16 on the same weights, both against float32.

    Measured on 2-layer models over 4 seeds (|log p| up to ~8, where a bf16 ulp is 0.031):
    max |lens_bf16 - hf_bf16| is 0.031-0.062 (one or two ulps; processed or not), and each of
    lens and HF is 0.036-0.057 from float32, lens at most 1.1x as far as HF. Lens processes in
    float32 and rounds to bf16 once. Tolerances: 0.1 against HF, and lens no further from
    float32 than 1.5x HF. (In float32 lens is within 2.4e-6 of HF.)"""
    hf = random_hf()
    model = from_pretrained(write(hf, tmp_path / "ckpt"), dtype=torch.bfloat16, process=process)
    toks = tokens(batch=4, pos=48)
    ref = hf_log_probs(hf, toks)
    hf_bf16 = hf_log_probs(hf.to(torch.bfloat16), toks).float()
    ours = lens_log_probs(model, toks).float()
    assert (ours - hf_bf16).abs().max() <= 0.1
    assert (ours - ref).abs().max() <= 1.5 * (hf_bf16 - ref).abs().max()


# ---------------------------------------------------------------------- single files, hub cache
def test_single_safetensors_file(tmp_path):
    hf = random_hf()
    folder = write(hf, tmp_path / "ckpt")
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(folder / "model.safetensors", lone)
    with pytest.raises(ValueError, match="n_heads cannot be inferred.*n_layers': 2, 'd_model': 32"):
        from_pretrained(lone)
    toks = tokens()
    for config in ({"n_heads": 4}, hf.config.to_dict(), config_from_hf(hf.config)):
        model = from_pretrained(lone, config=config)
        assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    beside = from_pretrained(folder / "model.safetensors")  # config.json beside the file
    assert (lens_log_probs(beside, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4


def test_hub_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not in the HF hub cache.*local directory"):
        from_pretrained("someone/tiny-gpt2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    hf = random_hf()
    write(hf, repo / "snapshots" / commit)
    model = from_pretrained("someone/tiny-gpt2")
    toks = tokens()
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="no such file"):
        from_pretrained(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- bad checkpoints
def test_missing_extra_and_misshaped_tensors_are_all_named(tmp_path):
    hf = random_hf()
    folder = write(hf, tmp_path / "ckpt")
    sd = load_file(folder / "model.safetensors")
    del sd["transformer.h.1.ln_2.bias"]
    sd["transformer.h.0.attn.rotary.weight"] = torch.zeros(3, 4)
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(sd, folder / "model.safetensors")
    for load in (lambda: from_pretrained(folder),
                 lambda: convert_gpt2_state_dict(sd, config_from_hf(hf.config))):
        with pytest.raises(ValueError) as err:
            load()
        message = str(err.value)
        assert "missing tensors (1): transformer.h.1.ln_2.bias (32,)" in message
        assert "unexpected tensors (1): transformer.h.0.attn.rotary.weight (3, 4)" in message
        assert ("mis-shaped tensors (1): transformer.h.0.mlp.c_fc.weight: expected (32, 128), "
                "got (32, 100)") in message


def test_untied_checkpoint_without_lm_head_is_missing_it(tmp_path):
    hf = random_hf(tie_word_embeddings=False)
    folder = write(hf, tmp_path / "ckpt")
    sd = load_file(folder / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \(1\): lm_head.weight \(101, 32\)"):
        from_pretrained(folder)


class _Payload:
    """Unpickling this would create a file: the loader must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, how):
    folder = write(random_hf(), tmp_path / "ckpt", "bin")
    marker = tmp_path / "pwned"
    payload = {"transformer.wte.weight": _Payload(marker)}
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save(payload, f) if how == "torch.save" else pickle.dump(payload, f)
    with pytest.raises(ValueError, match="refusing to load"):
        from_pretrained(folder)
    assert not marker.exists()


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "empty"
    transformers.GPT2Config(**SMALL).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds no weights"):
        from_pretrained(folder)


# ---------------------------------------------------------------------- lens format
@pytest.mark.parametrize("process", [True, False])
def test_saved_model_round_trips_bit_exactly(tmp_path, process):
    model = from_pretrained(write(random_hf(), tmp_path / "ckpt"), process=process)
    assert model.save(tmp_path / "lens") == tmp_path / "lens"
    assert sorted(os.listdir(tmp_path / "lens")) == ["lens_config.json", "model.safetensors"]
    # Steps recorded in the checkpoint are not repeated, so a processed model loads as saved.
    loaders = [HookedGPT.from_pretrained_no_processing] + [HookedGPT.from_pretrained] * process
    for load in loaders:
        loaded = load(tmp_path / "lens")
        assert loaded.cfg == model.cfg
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        assert loaded.blocks[0].attn.W_Q.stride() == model.blocks[0].attn.W_Q.stride()
        toks = tokens()
        assert torch.equal(lens_log_probs(loaded, toks), lens_log_probs(model, toks))
    if process:
        assert loaded.cfg.normalization == "LNPre"
        saved = load_file(tmp_path / "lens" / "model.safetensors")
        assert not any(k.endswith((".w", ".b")) for k in saved)


def test_lens_checkpoint_mismatch_is_named(tmp_path):
    model = HookedGPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=11, n_ctx=8))
    save(model, tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "lens_config.json").read_text())
    (tmp_path / "lens" / "lens_config.json").write_text(json.dumps({**cfg, "d_vocab": 12}))
    with pytest.raises(ValueError, match=r"embed.W_E: expected \(12, 16\), got \(11, 16\)"):
        from_pretrained(tmp_path / "lens")


def test_tokenizer_files_in_the_checkpoint_are_used(tmp_path):
    tok = pytest.importorskip("lens.tokenizer")
    folder = write(random_hf(vocab_size=257), tmp_path / "ckpt")
    byte_order = list(tok.bytes_to_unicode())  # a byte-level vocab with no merges
    vocab = {c: i for i, c in enumerate(tok.bytes_to_unicode().values())}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 256}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    model = from_pretrained(folder)
    assert model.tokenizer is not None
    toks = model.to_tokens("hi")
    assert toks.tolist() == [[256, byte_order.index(ord("h")), byte_order.index(ord("i"))]]
    assert model.to_string(toks[0, 1:]) == "hi"
    assert from_pretrained(write(random_hf(), tmp_path / "small")).tokenizer is None


# ---------------------------------------------------------------------- GPT-2 small size
@pytest.mark.slow
def test_gpt2_small_sized_random_model_matches_hf(tmp_path):
    hf = random_hf(std=None, n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = from_pretrained(write(hf, tmp_path / "ckpt"))
    assert model.cfg.n_layers == 12 and model.cfg.normalization == "LNPre"
    toks = tokens(batch=1, pos=16, d_vocab=50257)
    assert (lens_log_probs(model, toks) - hf_log_probs(hf, toks)).abs().max() <= 1e-4


def test_truncated_or_garbage_safetensors_are_refused(tmp_path):
    folder = write(random_hf(), tmp_path / "ok")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.SafetensorsError, match=r"model.safetensors: invalid safetensors header: "
                                                  r"\d+ of its \d+ tensors end past the file's \d+ "
                                                  r"bytes \(.*\): the file is cut short"):
        from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(io.SafetensorsError, match="model.safetensors is not a safetensors file"):
        from_pretrained(folder)


# ---------------------------------------------------------------------- bad config files
def _edit_config(folder: Path, name: str = "config.json", **changes) -> Path:
    d = json.loads((folder / name).read_text())
    d = {k: v for k, v in {**d, **changes}.items() if v is not _DROP}
    (folder / name).write_text(json.dumps(d))
    return folder / name


_DROP = object()


@pytest.mark.parametrize("changes,named", [
    ({"n_head": 0}, "n_head=0 must be a positive int"),
    ({"n_head": "4"}, "n_head='4' must be a positive int"),
    ({"n_embd": 32.0}, "n_embd=32.0 must be a positive int"),
    ({"n_layer": -1, "n_positions": None}, "n_layer=-1 must be a positive int; n_positions=None must"),
    ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon='abc' must be a positive number"),
    ({"layer_norm_epsilon": None}, "layer_norm_epsilon=None must be a positive number"),
    ({"n_inner": 0}, "n_inner=0 must be a positive int or null"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' must be true or false"),
    ({"activation_function": ["gelu"]}, "activation_function=['gelu'] must be a string"),
    ({"model_type": ["gpt2"]}, "model_type=['gpt2'] must be a string"),
    ({"n_head": _DROP, "n_embd": _DROP}, "(model_type='gpt2') lacks the fields ['n_embd', 'n_head']"),
])
def test_config_json_fields_of_the_wrong_type_or_range_are_refused_by_name(tmp_path, changes, named):
    folder = write(random_hf(), tmp_path / "ckpt")
    path = _edit_config(folder, **changes)
    with pytest.raises(ValueError) as e:
        from_pretrained(folder)
    assert str(e.value).startswith(str(path)) and named in str(e.value)


@pytest.mark.parametrize("changes,named", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive int"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps='abc' must be a positive number"),
    ({"rope_parameters": [1]}, "rope_parameters=[1] must be an object or null"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "x", "rope_theta": 1e4}},
     "rope_parameters.factor='x' must be a positive number"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": -1}}},
     "rope_parameters.full_attention.rope_theta=-1 must be a positive number"),
    ({"layer_types": [1, 2]}, "layer_types=[1, 2] must be a list of strings or null"),
    ({"hidden_act": ["silu"]}, "hidden_act=['silu'] must be a string or null"),
])
def test_llama_config_fields_of_the_wrong_type_are_refused_by_name(changes, named):
    d = {**transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                    intermediate_size=48, vocab_size=50).to_dict(), **changes}
    with pytest.raises(ValueError, match="the HF config: invalid fields") as e:
        config_from_hf(d)
    assert named in str(e.value)


@pytest.mark.parametrize("content,named", [
    ("[]", "holds a JSON array ([]); it must hold a JSON object"),
    ("null", "holds a JSON null"),
    ('"gpt2"', "holds a JSON string"),
    ("{", "is not valid UTF-8 JSON"),
    ("", "is not valid UTF-8 JSON"),
    ("[" * 100_000, "nests JSON deeper than can be parsed|is not valid UTF-8 JSON"),
])
@pytest.mark.parametrize("which", ["config.json", "lens_config.json"])
def test_a_config_file_that_is_not_a_json_object_is_refused_naming_it(tmp_path, content, named, which):
    if which == "config.json":
        folder = write(random_hf(), tmp_path / "ckpt")
    else:
        folder = save(HookedGPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=11, n_ctx=8)),
                      tmp_path / "lens")
    (folder / which).write_bytes(content.encode() if content else b"\xff")
    with pytest.raises(ValueError) as e:
        from_pretrained(folder)
    assert str(e.value).startswith(str(folder / which)), str(e.value)
    assert any(n in str(e.value) for n in named.split("|")), str(e.value)


@pytest.mark.parametrize("changes,named", [
    ({"n_layers": "1"}, "invalid GPTConfig: n_layers='1' must be int"),
    ({"attn_only": "no"}, "attn_only='no' must be bool"),
    ({"eps": True, "rotary_base": "x"}, "eps=True must be float; rotary_base='x' must be float"),
    ({"windowed_layers": 3}, "windowed_layers=3 must be tuple or None"),
    ({"metadata": []}, "metadata=[] must be dict"),
    ({"n_heads": _DROP}, "GPTConfig fields ['n_heads'] are missing"),
])
def test_lens_config_fields_of_the_wrong_type_are_refused_naming_the_file(tmp_path, changes, named):
    folder = save(HookedGPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=11, n_ctx=8)),
                  tmp_path / "lens")
    path = _edit_config(folder, "lens_config.json", **changes)
    with pytest.raises(ValueError) as e:
        from_pretrained(folder)
    assert str(e.value).startswith(f"{path}: ") and named in str(e.value), str(e.value)


def test_lens_weights_missing_beside_their_config_are_named(tmp_path):
    folder = save(HookedGPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=11, n_ctx=8)),
                  tmp_path / "lens")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds lens_config.json but not its weights, model.safetensors"):
        from_pretrained(folder)


def test_a_config_override_with_an_unknown_field_is_refused(tmp_path):
    folder = write(random_hf(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"has fields \['n_head'\] that GPTConfig lacks"):
        from_pretrained(folder / "model.safetensors", config={"n_head": 4})


# ---------------------------------------------------------------------- bad weight files
@pytest.mark.parametrize("layout", ["bin", "bin_legacy"])
@pytest.mark.parametrize("cut", [0, 10, 0.5, -3])
def test_a_truncated_pytorch_model_bin_is_refused_naming_it(tmp_path, layout, cut):
    folder = write(random_hf(), tmp_path / "ckpt", layout)
    if layout == "bin_legacy":  # the pre-zip format torch.save also writes
        sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
        torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint; it may be truncated") as e:
        from_pretrained(folder)
    assert str(folder / "pytorch_model.bin") in str(e.value)


@pytest.mark.parametrize("index,named", [
    ("{", "is not valid UTF-8 JSON"),
    ("[]", "holds a JSON array"),
    ('{"metadata": {}}', "weight_map=None must be a non-empty object mapping tensor names to shard"),
    ('{"weight_map": ["model.safetensors"]}', "weight_map=['model.safetensors'] must be"),
    ('{"weight_map": {"a": 1}}', "weight_map={'a': 1} must be"),
    ('{"weight_map": {"a": "../model.safetensors"}}',
     "names shards ['../model.safetensors'], which are not file names"),
    ('{"weight_map": {"a": "gone.safetensors"}}', "names shards that"),
])
def test_a_bad_index_file_is_refused_naming_it(tmp_path, index, named):
    folder = write(random_hf(), tmp_path / "ckpt", "sharded")
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError) as e:
        from_pretrained(folder)
    assert str(e.value).startswith(str(folder / "model.safetensors.index.json")) and named in str(e.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    folder = write(random_hf(), tmp_path / "ckpt", "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = load_file(folder / shards[0])
    second = load_file(folder / shards[1])
    save_file({**second, **{k: v for k, v in list(first.items())[:1]}}, folder / shards[1])
    with pytest.raises(ValueError, match=r"tensors \[.*\] are both in .* and in .*; each tensor of a "
                                         r"checkpoint must be in one file"):
        from_pretrained(folder)


@pytest.mark.parametrize("what", ["x.safetensors", "x.bin", "model.safetensors", "shard", "config.json"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_is_refused_before_it_is_opened(tmp_path, monkeypatch, what, kind):
    """A FIFO would block the load forever: it is refused by its stat, never opened."""
    if what.startswith("x."):
        folder, target = tmp_path, tmp_path / what
    else:
        folder = write(random_hf(), tmp_path / "ckpt", "sharded" if what == "shard" else "safetensors")
        shard = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())
                           ["weight_map"].values()))[0] if what == "shard" else None
        target = folder / (shard or what)
        target.unlink()
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    refuse_opening(monkeypatch, target)
    with pytest.raises(ValueError, match=r"is a FIFO \(named pipe\), not a regular file" if kind == "fifo"
                       else "is a directory, not a regular file|holds no weights") as e:
        from_pretrained(target if what.startswith("x.") else folder,
                        config={"n_heads": 4} if what.startswith("x.") else None)
    assert str(target) in str(e.value)
