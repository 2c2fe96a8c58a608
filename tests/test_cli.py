"""The `lens` command line: what the user got wrong is one line on stderr and exit code 2, with
no traceback; a bug in lens still raises."""

import builtins
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokens
from lens import cli
from lens.harvest import Harvest

H = __import__("sys").modules["lens.harvest"]


@pytest.fixture
def job(tmp_path):
    """A saved tiny model and a .npy of 5 sequences of 8 tokens."""
    model = make_model()
    model.save(tmp_path / "model")
    np.save(tmp_path / "tokens.npy", make_tokens(model, batch=5, pos=8).numpy())
    return tmp_path


def harvest_args(job, *extra, out="out", data="tokens.npy"):
    return ["harvest", str(job / "model"), str(job / data), "--hooks", "hook_embed",
            "--out", str(job / out), "--shard-tokens", "16", "--no-progress", *extra]


def error(capsys) -> str:
    """The one line a failed command wrote to stderr (and it wrote nothing to stdout)."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def read_only(folder: Path, monkeypatch) -> None:
    """Make `folder` refuse new files and folders, as a read-only mount does; also as root,
    whom file modes do not stop."""
    folder = folder.resolve()
    def inside(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and Path(os.path.abspath(p)).is_relative_to(folder)

    def refuse(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))

    def guard(real, writes):
        def wrapped(p, *args, **kwargs):
            if inside(p) and writes(*args, **kwargs):
                refuse(p)
            return real(p, *args, **kwargs)
        return wrapped

    opens = lambda mode="r", *a, **k: any(c in mode for c in "wax+")
    flags = lambda f, *a, **k: f & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(builtins, "open", guard(builtins.open, opens))
    monkeypatch.setattr(io, "open", guard(io.open, opens))
    monkeypatch.setattr(os, "open", guard(os.open, flags))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, lambda *a, **k: True))


def test_a_harvest_runs(job, capsys):
    assert cli.main(harvest_args(job)) == 0
    assert "Harvest(" in capsys.readouterr().out and Harvest.open(job / "out").n_tokens == 40


@pytest.mark.parametrize("extra, message", [
    (["--device", "gpu"], "--device 'gpu' is not a device; valid: cpu, cuda, cuda:N, mps "
                          "(this machine has cpu"),
    (["--seq-len", "0"], "seq_len=0 must be a positive int"),
    (["--batch-size", "-2"], "batch_size=-2 must be a positive int"),
])
def test_bad_harvest_arguments(job, capsys, extra, message):
    assert cli.main(harvest_args(job, *extra)) == 2
    assert error(capsys).startswith(f"lens harvest: error: {message}")
    assert not (job / "out").exists()


def test_cuda_devices_this_machine_lacks(job, capsys, monkeypatch):
    if not torch.cuda.is_available():
        assert cli.main(harvest_args(job, "--device", "cuda")) == 2
        assert "--device 'cuda': CUDA is not available on this machine (valid here: cpu" in error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(harvest_args(job, "--device", "cuda:3")) == 2
    assert "--device 'cuda:3': this machine has 1 CUDA devices (valid here: cpu, cuda:0)" in error(capsys)


def test_bad_token_file_and_out_path(job, capsys):
    np.save(job / "floats.npy", np.ones((2, 8), dtype=np.float32))
    assert cli.main(harvest_args(job, data="floats.npy")) == 2
    assert "floats.npy holds float32 values; a token file holds integer token ids" in error(capsys)
    (job / "a file").write_text("keep me")
    assert cli.main(harvest_args(job, out="a file")) == 2
    assert "is a file; give a folder" in error(capsys)
    assert (job / "a file").read_text() == "keep me"


def test_read_only_out(job, capsys, monkeypatch):
    (job / "ro").mkdir()
    read_only(job / "ro", monkeypatch)
    assert cli.main(harvest_args(job, out="ro")) == 2  # an existing read-only folder
    assert error(capsys) == f"lens harvest: error: cannot write into out_dir {job / 'ro'}: Permission denied\n"
    assert cli.main(harvest_args(job, out="ro/new")) == 2  # a new folder in one
    assert error(capsys) == f"lens harvest: error: {job / 'ro' / 'new'}: Permission denied\n"


def test_full_disk(job, capsys, monkeypatch):
    def full(tensors, path, metadata):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(H, "_write_safetensors", full)
    assert cli.main(harvest_args(job)) == 2
    assert error(capsys).startswith(f"lens harvest: error: no space left on the device writing to "
                                    f"{job / 'out'}: 0 shards are complete")


def test_dissect_plot_onto_a_read_only_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from lens.tokenizer import Tokenizer
    model = make_model(d_vocab=50257, n_ctx=16)
    model.tokenizer = Tokenizer.gpt2()
    model.save(tmp_path / "m")
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro", monkeypatch)
    args = ["dissect", "Hello", "--model", str(tmp_path / "m"), "--max-new-tokens", "0"]
    assert cli.main([*args, "--plot", str(tmp_path / "ro" / "figs")]) == 2
    assert error(capsys) == f"lens dissect: error: {tmp_path / 'ro' / 'figs'}: Permission denied\n"
    assert cli.main([*args, "--head", "5"]) == 2
    assert error(capsys).startswith("lens dissect: error: head=5 is out of range")


def test_check_device(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path), "--device", "gpu"]) == 2
    assert error(capsys).startswith("lens check: error: --device 'gpu' is not a device")


def test_a_bug_keeps_its_traceback(job, monkeypatch):
    def bug(*args, **kwargs):
        """A harvest with a bug in it."""
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(H, "harvest", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(harvest_args(job))
