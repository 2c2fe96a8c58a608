"""Harvesting SAE features sparsely: the stored indices and values are the SAE's encoding of
run_with_cache's activation, each feature's top tokens and firing counts equal a brute-force
pass over the dense features, a resumed or two-rank harvest writes what one run writes, and
feature cards read from a harvest equal cards computed from the tokens."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokens
from lens.harvest import Harvest, cli_main, harvest
from lens.sae import SAE, feature_card

H = sys.modules["lens.harvest"]
TESTS = Path(__file__).parent
RESID = "blocks.1.hook_resid_pre"
KINDS = {"relu": dict(activation="relu"), "topk": dict(activation="topk", k=5),
         "jumprelu": dict(activation="jumprelu")}


def make_sae(model, kind="topk", hook=RESID, d_sae=96, seed=0, **kw) -> SAE:
    torch.manual_seed(seed)
    d_in = kw.pop("d_in", model.cfg.d_model)
    sae = SAE(d_in, d_sae, hook, **{**KINDS[kind], **kw})
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.normal_(0, 0.2) if name != "threshold" else p.uniform_(0.1, 0.4)
        sae.b_enc -= 0.15  # a ReLU SAE fires on some tokens, not on every one
    return sae


def dense_features(model, sae, tokens) -> torch.Tensor:
    """[tokens, d_sae]: the SAE's encoding of the model's activation, batch by batch."""
    _, cache = model.run_with_cache(tokens, names_filter=[sae.hook_name])
    x = cache[sae.hook_name]
    if sae.hook_head_index is not None:
        x = x[..., sae.hook_head_index, :]
    elif x.ndim == 4:
        x = x.flatten(-2)
    return sae.encode(x).detach().reshape(-1, sae.d_sae)


def brute_top(col: torch.Tensor, k: int):
    """The k largest nonzero values of a column, largest first, the earlier token on ties."""
    live = col.nonzero().reshape(-1)
    order = torch.argsort(col[live], descending=True, stable=True)[:k]
    return col[live][order], live[order]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sparse_features_equal_the_dense_encoding(kind, tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=9, pos=8)
    sae = make_sae(model, kind)
    want = dense_features(model, sae, tokens)
    assert 0 < (want > 0).float().mean() < 0.5  # sparse, and not empty
    h = harvest(model, tokens, ["hook_embed"], tmp_path, batch_size=3, shard_tokens=24, top_k=4,
                saes=sae, progress=False)
    assert h.hook_names == ["hook_embed"] and h.feature_names == [f"{RESID}.hook_sae_acts_post"]
    f = h.features()
    assert f.shape == want.shape and len(f.shards) == 3 and f.nnz == int((want != 0).sum())
    assert torch.equal(f[:], want) and torch.equal(f[17], want[17]) and torch.equal(f[20:30], want[20:30])
    assert torch.equal(f[[70, 0, 33]], want[[70, 0, 33]]) and torch.equal(f[-1], want[-1])
    mask = torch.rand(72, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(f[mask], want[mask]) and torch.equal(f[::7], want[::7]) and torch.equal(f[-5:], want[-5:])
    assert f[5:2].shape == f[[]].shape == (0, sae.d_sae)
    assert torch.equal(f[torch.tensor([[1, 2], [40, 3]])], want[torch.tensor([[1, 2], [40, 3]])])
    for bad in (1.5, "a", 72, [72], torch.zeros(5, dtype=torch.bool)):
        with pytest.raises(IndexError):
            f[bad]
    for feat in range(sae.d_sae):
        assert torch.equal(f.feature(feat), want[:, feat])
        values, where = f.top(feat)
        bv, bw = brute_top(want[:, feat], 4)
        assert torch.equal(values, bv) and torch.equal(where, bw), feat
    st = h.stats(f.name)
    torch.testing.assert_close(st["frequency"], (want > 0).float().mean(0))
    torch.testing.assert_close(st["mean"], want.double().mean(0).float())
    assert st["count"] == 72
    assert torch.equal(h.tokens()[:], tokens.reshape(-1).int())
    # the dense hook beside the features is as a plain harvest writes it
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    assert torch.equal(h.read("hook_embed")[:], cache["hook_embed"].reshape(72, -1))


def test_ties_go_to_the_earlier_token_across_shards(tmp_path):
    # a feature that fires with one value everywhere: its top tokens are the first ones
    model = make_model()
    tokens = make_tokens(model, batch=6, pos=4)
    sae = make_sae(model, "relu", d_sae=8)
    with torch.no_grad():
        sae.W_enc[:, 3] = 0
        sae.b_enc[3] = 0.5
    f = harvest(model, tokens, [], tmp_path, batch_size=2, shard_tokens=8, top_k=5, saes=sae,
                progress=False).features()
    values, where = f.top(3)
    assert torch.equal(where, torch.arange(5)) and torch.equal(values, torch.full((5,), 0.5))
    assert f.top(3, k=2)[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="kept the top 5 tokens per feature"):
        f.top(3, k=6)


def test_several_saes_a_transcoder_and_a_head_sae_in_one_run(tmp_path):
    model = make_model(n_layers=3)
    tokens = make_tokens(model, batch=4, pos=6)
    saes = [make_sae(model, "topk", "blocks.0.hook_resid_post", seed=1),
            make_sae(model, "relu", "blocks.2.ln2.hook_normalized", seed=2,
                     hook_name_out="blocks.2.hook_mlp_out", apply_b_dec_to_input=False),
            make_sae(model, "jumprelu", "blocks.1.attn.hook_z", seed=3, d_in=model.cfg.d_head,
                     hook_head_index=1)]
    h = harvest(model, tokens, [], tmp_path, batch_size=2, shard_tokens=12, saes=saes, progress=False,
                dtype="float16")
    assert len(h.feature_names) == 3
    for sae in saes:
        f = h.features(f"{sae.hook_name}.hook_sae_acts_post")
        assert f.dtype == torch.float16
        torch.testing.assert_close(f[:].float(), dense_features(model, sae, tokens).half().float())
    with pytest.raises(KeyError, match="give the SAE features to read"):
        h.features()


def test_resumes_byte_identical_after_a_full_disk(tmp_path, monkeypatch):
    model = make_model()
    tokens = make_tokens(model, batch=12, pos=8)
    sae = make_sae(model, "topk")
    calls, real = [], H._write_safetensors

    def full_disk(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(H, "_write_safetensors", full_disk)
    kw = dict(batch_size=2, shard_tokens=16, saes=sae, top_k=3, progress=False)
    with pytest.raises(OSError, match="no space left"):
        harvest(model, tokens, ["hook_embed"], tmp_path / "out", **kw)
    monkeypatch.undo()
    harvest(model, tokens, ["hook_embed"], tmp_path / "out", **kw)
    harvest(model, tokens, ["hook_embed"], tmp_path / "whole", **kw)
    assert files(tmp_path / "out") == files(tmp_path / "whole")
    # a damaged shard is computed again, byte-identically
    shard = tmp_path / "out" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.warns(UserWarning, match="computing shard 1 again"):
        harvest(model, tokens, ["hook_embed"], tmp_path / "out", **kw)
    assert files(tmp_path / "out") == files(tmp_path / "whole")


RANKS = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import make_model
from test_harvest_features import make_sae
from lens.harvest import harvest
model = make_model()
harvest(model, np.load({npy!r}), [], {out!r}, batch_size=2, shard_tokens=16, top_k=3,
        saes=make_sae(model), progress=False)
"""


def test_two_gloo_ranks_match_one(tmp_path):
    from test_harvest import free_port
    model = make_model()
    tokens = make_tokens(model, batch=11, pos=8)
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(tests=str(TESTS), npy=str(tmp_path / "tokens.npy"),
                                   out=str(tmp_path / "two")))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(script)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    one = harvest(model, tokens, [], tmp_path / "one", batch_size=2, shard_tokens=16, top_k=3,
                  saes=make_sae(model), progress=False)
    two = Harvest.open(tmp_path / "two")
    f1, f2 = one.features(), two.features()
    assert torch.equal(f1[:], f2[:])
    for feat in range(f1.d_sae):
        assert all(torch.equal(a, b) for a, b in zip(f1.top(feat), f2.top(feat)))
    assert torch.equal(f1.frequency, f2.frequency)


def test_bad_input_is_named(tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=4, pos=6)
    with pytest.raises(ValueError, match=r"d_in=12.*gives 16"):
        harvest(model, tokens, [], tmp_path / "a", saes=make_sae(model, d_in=12), progress=False)
    with pytest.raises(KeyError, match="blocks.7.hook_resid_pre.*not a hook point"):
        harvest(model, tokens, [], tmp_path / "a", saes=make_sae(model, hook="blocks.7.hook_resid_pre"),
                progress=False)
    with pytest.raises(ValueError, match="two SAEs write"):
        harvest(model, tokens, [], tmp_path / "a", saes=[make_sae(model), make_sae(model, seed=1)],
                progress=False)
    with pytest.raises(TypeError, match="lens.sae.SAE"):
        harvest(model, tokens, [], tmp_path / "a", saes=[torch.nn.Linear(16, 4)], progress=False)
    with pytest.raises(ValueError, match="is on meta, the model on cpu"):
        harvest(model, tokens, [], tmp_path / "a", saes=make_sae(model).to("meta"), progress=False)
    with pytest.raises(ValueError, match="top_k=0 must be a positive int"):
        harvest(model, tokens, [], tmp_path / "a", saes=make_sae(model), top_k=0, progress=False)
    with pytest.raises(ValueError, match="empty list"):  # no SAE: hooks are needed
        harvest(model, tokens, [], tmp_path / "a", progress=False)
    h = harvest(model, tokens, ["hook_embed"], tmp_path / "b", saes=make_sae(model), progress=False)
    name = h.feature_names[0]
    with pytest.raises(KeyError, match="stored sparsely: read them with harvest.features"):
        h.read(name)
    with pytest.raises(KeyError, match="dense activations: read them with harvest.read"):
        h.features("hook_embed")
    with pytest.raises(IndexError, match="feature 96 is not one of the 96 features"):
        h.features().feature(96)
    # another SAE into the same folder is another job
    with pytest.raises(ValueError, match="other data or settings .*features"):
        harvest(model, tokens, ["hook_embed"], tmp_path / "b", saes=make_sae(model, seed=4), progress=False)
    plain = harvest(model, tokens, ["hook_embed"], tmp_path / "c", progress=False)
    with pytest.raises(KeyError, match="holds no token ids"):
        plain.tokens()


def test_a_card_from_a_harvest_equals_the_card_from_its_tokens(tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=6, pos=8)
    sae = make_sae(model, "topk")
    h = harvest(model, tokens, [], tmp_path, batch_size=2, shard_tokens=16, top_k=6, saes=sae,
                progress=False)
    feat = int(h.features().frequency.argmax())
    want = feature_card(model, sae, feat, tokens, k=5, context=3)
    got = feature_card(model, sae, feat, h, k=5, context=3)
    assert got.contexts == want.contexts and len(got.contexts) == 5
    torch.testing.assert_close(got.activations, want.activations.flatten())
    assert got.promoted == want.promoted and got.suppressed == want.suppressed
    with pytest.raises(ValueError, match="kept the top 6"):
        feature_card(model, sae, feat, h, k=7)
    with pytest.raises(ValueError, match="another model"):
        feature_card(make_model(seed=3), sae, feat, h)
    with pytest.raises(ValueError, match="holds no features of this SAE"):
        feature_card(model, make_sae(model, seed=9), feat, h)


def test_cli_harvests_features_and_draws_cards_from_them(tmp_path, capsys):
    from lens.cli import main
    model = make_model()
    model.save(tmp_path / "model")
    sae = make_sae(model, "topk")
    sae.save(tmp_path / "sae")
    np.save(tmp_path / "tokens.npy", make_tokens(model, batch=5, pos=8).numpy())
    assert cli_main([str(tmp_path / "model"), str(tmp_path / "tokens.npy"), "--sae", str(tmp_path / "sae"),
                     "--top-k", "4", "--out", str(tmp_path / "out"), "--shard-tokens", "16",
                     "--no-progress"]) == 0
    h = Harvest.open(tmp_path / "out")
    assert h.hook_names == [] and h.features().top_k == 4 and h.n_tokens == 40
    capsys.readouterr()
    feat = int(h.features().frequency.argmax())
    assert main(["feature", str(tmp_path / "sae"), str(feat), "--model", str(tmp_path / "model"),
                 "--harvest", str(tmp_path / "out"), "--k", "3", "--plot", str(tmp_path / "card.png")]) == 0
    out = capsys.readouterr().out
    assert f"feature #{feat}" in out and "of 40 positions" in out and out.count("[[") == 3
    assert (tmp_path / "card.png").stat().st_size > 0
    assert cli_main([str(tmp_path / "model"), str(tmp_path / "tokens.npy"), "--out",
                     str(tmp_path / "none"), "--no-progress"]) == 2
    assert "give --hooks, --sae or both" in capsys.readouterr().err
