"""Harvesting: activations on disk equal run_with_cache, a killed run resumes byte-identical,
two gloo ranks write what one rank writes, and bad input fails clearly without corrupting."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokens
from lens.ablation import mean_ablate
from lens.harvest import Harvest, HarvestDataset, cli_main, harvest

H = sys.modules["lens.harvest"]
TESTS = Path(__file__).parent
NAMES = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post",
         "blocks.1.hook_resid_pre"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def flat(name: str, act: torch.Tensor) -> torch.Tensor:
    if name.endswith("hook_pattern"):
        act = act.transpose(1, 2)
    return act.reshape(-1, *act.shape[2:])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_matches_run_with_cache_and_reads_back(tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=9, pos=8)
    h = harvest(model, tokens, NAMES, tmp_path, batch_size=3, shard_tokens=24, progress=False)
    assert isinstance(h, Harvest) and h.n_tokens == 72 and len(h.manifest["shards"]) == 3
    refs = {n: [] for n in NAMES}
    for s in range(0, 9, 3):  # the batches harvest runs: 3 sequences, aligned to shards
        _, cache = model.run_with_cache(tokens[s:s + 3], names_filter=NAMES)
        for n in NAMES:
            refs[n].append(flat(n, cache[n]))
    for n in NAMES:
        ref, acts = torch.cat(refs[n]), h.read(n)
        assert acts.shape == ref.shape and acts.dtype == torch.float32
        assert torch.equal(acts[:], ref)
        assert torch.equal(acts[5], ref[5]) and torch.equal(acts[20:30], ref[20:30])
        assert torch.equal(acts[[70, 0, 33]], ref[[70, 0, 33]])
        assert torch.equal(acts[-3:, 0], ref[-3:, 0])
        st, r64 = h.stats(n), ref.double()
        assert st["count"] == 72
        torch.testing.assert_close(st["mean"], r64.mean(0).float())
        torch.testing.assert_close(st["var"], r64.var(0, unbiased=False).float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st["norm"], r64.flatten(1).norm(dim=1).mean().float())
    # shards are plain safetensors files; the data lives in the memory-mapped shard files
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "shard-00001.safetensors")[NAMES[2]], torch.cat(refs[NAMES[2]])[24:48])
    held = h.read("hook_embed")
    if Path("/proc/self/maps").exists():
        assert str(tmp_path / "shard-00002.safetensors") in Path("/proc/self/maps").read_text()
    # loaders: in order, shuffled (a permutation, fixed by the seed), and a torch Dataset
    batches = list(h.loader(["blocks.0.mlp.hook_post"], batch_size=10))
    assert len(batches) == 8 and torch.equal(torch.cat([b["blocks.0.mlp.hook_post"] for b in batches]),
                                             torch.cat(refs["blocks.0.mlp.hook_post"]))
    shuffled = [b["hook_embed"] for b in h.loader("hook_embed", batch_size=16, shuffle=True, seed=3)]
    again = [b["hook_embed"] for b in h.loader("hook_embed", batch_size=16, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    assert not torch.equal(torch.cat(shuffled), h.read("hook_embed")[:])
    rows = lambda t: sorted(r.numpy().tobytes() for r in t)
    assert rows(torch.cat(shuffled)) == rows(h.read("hook_embed")[:])
    ds = h.dataset(NAMES)
    assert isinstance(ds, HarvestDataset) and len(ds) == 72
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert torch.equal(batch["blocks.1.hook_resid_pre"], torch.cat(refs["blocks.1.hook_resid_pre"])[:5])
    # means for mean ablation: per-token shape, what mean_ablate takes
    means = h.means()
    model.run_with_hooks(tokens, fwd_hooks=[mean_ablate("blocks.0.mlp.hook_post", means=means)])
    # harvesting again into a finished folder returns it untouched
    before = files(tmp_path)
    harvest(model, tokens, NAMES, tmp_path, batch_size=3, shard_tokens=24, progress=False)
    assert files(tmp_path) == before


def test_token_sources_and_dtype(tmp_path):
    model = make_model(d_vocab=50257)
    from lens.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.gpt2()
    text = "The quick brown fox jumps over the lazy dog.\n" * 12
    (tmp_path / "data.txt").write_text(text)
    ids = torch.tensor(model.tokenizer.encode(text))
    n = len(ids) // 10 * 10
    windows = ids[:n].reshape(-1, 10)
    name = "blocks.0.hook_resid_post"
    from_text = harvest(model, tmp_path / "data.txt", name, tmp_path / "t", seq_len=10,
                        batch_size=4, shard_tokens=40, progress=False)
    from_rows = harvest(model, windows, name, tmp_path / "r", batch_size=4, shard_tokens=40,
                        progress=False)
    np.save(tmp_path / "flat.npy", ids.numpy().astype(np.uint16))
    from_npy = harvest(model, tmp_path / "flat.npy", name, tmp_path / "n", seq_len=10,
                       batch_size=4, shard_tokens=40, progress=False)
    assert from_text.n_tokens == n
    assert torch.equal(from_text.read(name)[:], from_rows.read(name)[:])
    assert torch.equal(from_npy.read(name)[:], from_rows.read(name)[:])
    half = harvest(model, windows, name, tmp_path / "h", dtype=torch.bfloat16, batch_size=4,
                   shard_tokens=40, progress=False)
    assert half.read(name).dtype == torch.bfloat16
    assert torch.equal(half.read(name)[:], from_rows.read(name)[:].bfloat16())


KILLED = """
import sys, time, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import make_model
from lens.harvest import harvest
model = make_model()
model.add_hook("hook_embed", lambda x, hook: time.sleep(0.1))  # slow, same activations
harvest(model, np.load({npy!r}), {names!r}, {out!r}, batch_size=2, shard_tokens=16, progress=False)
"""


def test_killed_run_resumes_byte_identical(tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=20, pos=8)
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    out = tmp_path / "killed"
    script = KILLED.format(tests=str(TESTS), npy=str(tmp_path / "tokens.npy"), names=NAMES, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, env=ONE_THREAD)
    deadline = time.time() + 60
    while not (out / "shard-00000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the harvest subprocess wrote no shard"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = json.loads((out / "manifest.json").read_text())
    assert not left["complete"] and len(left["shards"]) < left["n_shards"] == 10
    assert len(list(out.glob("shard-*"))) < 10
    harvest(model, tokens, NAMES, out, batch_size=2, shard_tokens=16, progress=False)
    harvest(model, tokens, NAMES, tmp_path / "whole", batch_size=2, shard_tokens=16, progress=False)
    resumed, whole = files(out), files(tmp_path / "whole")
    assert sorted(resumed) == sorted(whole) and len([f for f in whole if f.startswith("shard")]) == 10
    for f in whole:
        assert resumed[f] == whole[f], f


RANKS = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from conftest import make_model
from lens.harvest import harvest
harvest(make_model(), np.load({npy!r}), {names!r}, {out!r}, batch_size=2, shard_tokens=16,
        progress=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one(tmp_path):
    model = make_model()
    tokens = make_tokens(model, batch=11, pos=8)  # 6 shards, the last one short
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(tests=str(TESTS), npy=str(tmp_path / "tokens.npy"), names=NAMES,
                                   out=str(tmp_path / "two")))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(script)],
                         capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-3000:]
    two = Harvest.open(tmp_path / "two")
    one = harvest(model, tokens, NAMES, tmp_path / "one", batch_size=2, shard_tokens=16, progress=False)
    assert two.manifest["shards"] == one.manifest["shards"]
    assert not list((tmp_path / "two").glob("manifest.rank*"))
    for n in NAMES:
        assert torch.equal(two.read(n)[:], one.read(n)[:])
        s1, s2 = one.stats(n), two.stats(n)
        assert s1["count"] == s2["count"] == 88
        for k in ("mean", "var", "norm"):
            torch.testing.assert_close(s1[k], s2[k])


def test_unknown_hook_and_another_models_folder(tmp_path):
    model, tokens = make_model(), make_tokens(make_model(), batch=4, pos=6)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        harvest(model, tokens, ["blocks.0.hook_resid_pots"], tmp_path, progress=False)
    h = harvest(model, tokens, "hook_embed", tmp_path / "a", progress=False)
    other = make_model(seed=5)
    with pytest.raises(ValueError, match="another model") as e:
        harvest(other, tokens, "hook_embed", tmp_path / "a", progress=False)
    assert h.manifest["model_hash"] in str(e.value) and H.model_hash(other) in str(e.value)
    with pytest.raises(ValueError, match="shard_tokens"):
        harvest(model, tokens, "hook_embed", tmp_path / "a", shard_tokens=12, progress=False)
    with pytest.raises(KeyError, match="was not harvested"):
        h.read("blocks.0.hook_resid_pre")


def test_full_disk_fails_cleanly_and_resumes(tmp_path, monkeypatch):
    model = make_model()
    tokens = make_tokens(model, batch=12, pos=8)
    calls = []
    real = H._write_safetensors

    def full_disk(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(H, "_write_safetensors", full_disk)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="no space left.*resume") as e:
        harvest(model, tokens, NAMES, out, batch_size=2, shard_tokens=16, progress=False)
    assert e.value.errno == errno.ENOSPC
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert sorted(p.name for p in out.glob("shard-*")) == [s["file"] for s in manifest["shards"]]
    with pytest.raises(ValueError, match="incomplete"):
        Harvest.open(out)
    monkeypatch.undo()  # space freed
    harvest(model, tokens, NAMES, out, batch_size=2, shard_tokens=16, progress=False)
    harvest(model, tokens, NAMES, tmp_path / "whole", batch_size=2, shard_tokens=16, progress=False)
    assert files(out) == files(tmp_path / "whole")


def test_cli(tmp_path, capsys):
    model = make_model()
    model.save(tmp_path / "model")
    np.save(tmp_path / "tokens.npy", make_tokens(model, batch=5, pos=8).numpy())
    cli_main([str(tmp_path / "model"), str(tmp_path / "tokens.npy"), "--hooks",
              "hook_embed,blocks.0.hook_resid_post", "--out", str(tmp_path / "out"),
              "--shard-tokens", "16", "--no-progress"])
    h = Harvest.open(tmp_path / "out")
    assert h.n_tokens == 40 and h.hook_names == ["blocks.0.hook_resid_post", "hook_embed"]
    assert "Harvest(" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="lens harvest: unknown hook point"):
        cli_main([str(tmp_path / "model"), str(tmp_path / "tokens.npy"), "--hooks", "hook_embd",
                  "--out", str(tmp_path / "bad"), "--no-progress"])
