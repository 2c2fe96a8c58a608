"""Harvesting: activations on disk equal run_with_cache, a killed run resumes byte-identical,
two gloo ranks write what one rank writes, and bad input fails clearly without corrupting."""

import errno
import json
import os
import re
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
    # a second harvest into the same folder is refused, naming the process that writes it
    with pytest.raises(OSError, match=f"being written by another harvest \\(pid {proc.pid} on "):
        harvest(model, tokens, NAMES, out, batch_size=2, shard_tokens=16, progress=False)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the dead process's lock file is left behind, and does not block the resume
    assert (out / H.LOCK).read_text() == f"pid {proc.pid} on {socket.gethostname()}\n"
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
    assert cli_main([str(tmp_path / "model"), str(tmp_path / "tokens.npy"), "--hooks", "hook_embd",
                     "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("lens harvest: error: unknown hook point 'hook_embd'")


def small(tmp_path, **kwargs) -> Harvest:
    """20 tokens of hook_embed in 2 shards of 10."""
    model = make_model()
    return harvest(model, make_tokens(model, batch=4, pos=5), "hook_embed", tmp_path,
                   batch_size=2, shard_tokens=10, progress=False, **kwargs)


def test_indexing_by_masks_and_bad_indices(tmp_path):
    acts = small(tmp_path).read("hook_embed")
    ref = acts.tensor()
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 7, 15]] = True  # rows in both shards
    for m in (mask, mask.numpy(), mask.tolist()):
        assert torch.equal(acts[m], ref[mask]) and acts[m].shape == (3, 16)
    assert torch.equal(acts[mask, 2:4], ref[mask, 2:4])
    assert torch.equal(acts[np.int64(13)], ref[13]) and torch.equal(acts[torch.tensor(-2)], ref[-2])
    grid = torch.tensor([[0, 19], [9, 10]])
    assert torch.equal(acts[grid], ref[grid]) and torch.equal(acts[grid, 0], ref[grid, 0])
    assert torch.equal(acts[..., 3], ref[..., 3]) and acts[[]].shape == (0, 16)
    with pytest.raises(IndexError, match=r"boolean mask of shape \(3,\) cannot select among 20 tokens"):
        acts[[True, False, True]]
    with pytest.raises(IndexError, match="boolean mask of shape"):
        acts[torch.ones(20, 16, dtype=torch.bool)]
    for bad in (1.5, "3", True, None, [0.5, 1.0], torch.tensor([1.0]), np.float32(2)):
        with pytest.raises(IndexError, match="valid: an int, a slice, a list/array/tensor of ints, "
                                             "or a boolean mask of 20 entries"):
            acts[bad]


def test_float_dtypes_only(tmp_path):
    for bad in (torch.int64, torch.int8, torch.bool, "int8", "half", "torch.int32"):
        with pytest.raises(ValueError, match=r"dtype=.* cannot hold activations; valid: None .*"
                                             r"\['float64', 'float32', 'float16', 'bfloat16'\]"):
            small(tmp_path / "bad", dtype=bad)
    assert not (tmp_path / "bad").exists()
    h = small(tmp_path / "half", dtype="float16")
    assert h.read("hook_embed").dtype == torch.float16
    assert h.manifest["hooks"]["hook_embed"]["dtype"] == "float16"


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=0), "seq_len=0 must be a positive int"),
    (dict(seq_len=-5), "seq_len=-5 must be a positive int"),
    (dict(batch_size=True), "batch_size=True must be a positive int"),
    (dict(queue_depth=0), "queue_depth=0 must be a positive int"),
    (dict(queue_depth=-1), "queue_depth=-1 must be a positive int"),
    (dict(shard_tokens=0), "shard_tokens=0 must be a positive int"),
    (dict(seq_len=13), r"seq_len=13 exceeds the model's n_ctx=12; valid: 1 to 12"),
])
def test_bad_sizes(tmp_path, kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        harvest(model, make_tokens(model, batch=1, pos=40).reshape(-1), "hook_embed",
                tmp_path / "out", progress=False, **kwargs)
    assert not list(tmp_path.glob("out/shard-*"))


def test_sizes_that_are_not_ints():
    """What harvest's arguments go through (at test time the signature's `int` is checked before)."""
    for bad in (2.5, 2.0, "4", None, True, np.float64(3)):
        with pytest.raises(ValueError, match=re.escape(f"batch_size={bad!r} must be a positive int")):
            H._positive_int("batch_size", bad)
    assert H._positive_int("seq_len", np.int32(7)) == 7


def test_rows_longer_than_the_context(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="token rows hold 13 tokens, more than the model's n_ctx=12"):
        harvest(model, make_tokens(model, batch=2, pos=13), "hook_embed", tmp_path, progress=False)


def test_bad_files(tmp_path):
    from lens.tokenizer import Tokenizer
    model = make_model(d_vocab=50257)
    model.tokenizer = Tokenizer.gpt2()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 4)
    np.save(tmp_path / "floats.npy", np.ones((2, 8), dtype=np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    (tmp_path / "a file").write_text("")
    go = lambda data, out="out": harvest(model, data, "hook_embed", out, progress=False)
    with pytest.raises(ValueError, match="the text file .*empty.txt is empty"):
        go(tmp_path / "empty.txt", tmp_path / "e")
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(invalid continuation byte: byte 0xe9\)"):
        go(tmp_path / "latin1.txt", tmp_path / "l")
    assert not list((tmp_path / "l").glob("tokens-*"))
    with pytest.raises(ValueError, match="floats.npy holds float32 values; a token file holds integer"):
        go(tmp_path / "floats.npy", tmp_path / "f")
    with pytest.raises(ValueError, match="junk.npy is not a readable .npy file"):
        go(tmp_path / "junk.npy", tmp_path / "j")
    with pytest.raises(ValueError, match="out_dir='.*a file' is a file; give a folder"):
        go(make_tokens(model, batch=2, pos=8), tmp_path / "a file")
    assert (tmp_path / "a file").read_text() == ""


def test_damaged_shard_is_refused_and_computed_again(tmp_path):
    small(tmp_path / "whole")
    h = small(tmp_path / "out")
    acts = h.read("hook_embed")
    shard = tmp_path / "out" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short
    with pytest.raises(ValueError, match="damaged harvest: .*shard-00001.safetensors.*run harvest again"):
        Harvest.open(tmp_path / "out")
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        h.read("hook_embed")
    with pytest.warns(UserWarning, match="shard-00001.safetensors.*; computing shard 1 again"):
        small(tmp_path / "out")
    assert files(tmp_path / "out") == files(tmp_path / "whole")
    (tmp_path / "out" / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00000.safetensors is missing"):
        Harvest.open(tmp_path / "out")
    with pytest.warns(UserWarning, match="computing shard 0 again"):
        small(tmp_path / "out")
    assert files(tmp_path / "out") == files(tmp_path / "whole")
    assert acts.shape == (20, 16)


@pytest.mark.parametrize("text, problem", [
    ("{not json", r"not JSON \(Expecting property name.*\)"),
    ("[]", "not a JSON object"),
    (json.dumps({"format": H.FORMAT, "hooks": {}}), "no list of shards"),
    (json.dumps({"format": "other/9", "shards": []}), "format 'other/9', not 'lens-harvest/1'"),
])
def test_bad_manifest(tmp_path, text, problem):
    small(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    message = f"manifest.json is not a lens harvest manifest: {problem}; delete it"
    with pytest.raises(ValueError, match=message):
        Harvest.open(tmp_path)
    with pytest.raises(ValueError, match=message):
        small(tmp_path)
