"""Device and dtype paths that can be tested on the CPU: bfloat16, caching to a device,
torch.compile with and without hooks."""

import pytest
import torch
from conftest import make_model, make_tokens


def test_bfloat16_forward_is_close_to_float32():
    model = make_model(d_model=32, n_heads=4)
    tokens = make_tokens(model, 2, 10)
    with torch.no_grad():
        ref = model(tokens).log_softmax(-1)
        half = model.to(torch.bfloat16)
        out = half(tokens)
        assert out.dtype == torch.bfloat16
        _, cache = half.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale")))
    # one bfloat16 step is 2**-8 relative; logits here are O(1-10)
    assert (out.float().log_softmax(-1) - ref).abs().max() < 0.15
    pattern = cache["pattern", 0]
    assert pattern.dtype == torch.bfloat16
    torch.testing.assert_close(pattern.float().sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-2, rtol=0)


def test_cache_device_argument_moves_tensors():
    model = make_model()
    tokens = make_tokens(model)
    _, cache = model.run_with_cache(tokens, device="cpu", names_filter="blocks.0.hook_resid_post")
    assert cache["resid_post", 0].device.type == "cpu"
    with pytest.raises(RuntimeError):
        model.run_with_cache(tokens, device="no-such-device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cache_to_pinned_cpu_memory():
    model = make_model().cuda()
    tokens = make_tokens(model).cuda()
    _, cache = model.run_with_cache(tokens, device="cpu")
    assert all(t.device.type == "cpu" for t in cache.values())
    assert cache["resid_post", 0].is_pinned()


COMPILE_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import make_model, make_tokens
model = make_model()
tokens = make_tokens(model)
compiled = torch.compile(model)
close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
with torch.no_grad():
    close(compiled(tokens), model(tokens))
    zero = [("blocks.0.hook_resid_post", lambda x, hook: x * 0)]
    ref = model.run_with_hooks(tokens, fwd_hooks=zero)
    with model.hooks(fwd_hooks=zero):
        close(compiled(tokens), ref)  # the guards see the new hook: recompiled, not stale
    close(compiled(tokens), model(tokens))
print("ok")
"""


@pytest.mark.slow
def test_torch_compile_without_hooks_and_with_hooks_added_later():
    # In a fresh interpreter: the test run's runtime shape checks wrap every lens function,
    # which dynamo cannot trace; users compile the plain functions.
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check
    rows = gpu_check.main(["--device", "cpu", "--layers", "1", "--repeats", "1", "--no-peers"])
    parity = {r[0]: r[1] for r in rows if r[0].startswith("parity")}
    fp32 = float(parity["parity CPU fp32 vs cpu float32"].split()[-1])
    bf16 = float(parity["parity CPU fp32 vs cpu bfloat16"].split()[-1])
    assert fp32 < 1e-5 and 0 < bf16 < 0.2
    assert any(r[0].startswith("patching sweep") for r in rows)
