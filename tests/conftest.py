"""Small random models shared by the tests."""

import importlib.util
from pathlib import Path

import pytest
import torch

import lens

# Tests run two pytest workers on two cores; one thread each avoids thread-pool contention,
# which dominates the run time of tiny models.
torch.set_num_threads(1)


def load_script(name: str):
    """experiments/<name>.py as a module (the experiments are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def EVERY(name: str) -> bool:
    """A names filter for every hook point, the per-head copies (hook_result, hook_q_input, ...)
    that run_with_cache() leaves out by default included."""
    return True


def make_model(seed: int = 0, **overrides) -> lens.HookedGPT:
    """A tiny GPT with every parameter random (LayerNorm weights and biases included)."""
    kw = dict(n_layers=2, d_model=16, n_heads=2, d_vocab=37, n_ctx=12, act_fn="gelu_new")
    kw.update(overrides)
    model = lens.HookedGPT(lens.GPTConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.copy_(1.0 + 0.2 * noise if name.endswith(".w") else 0.3 * noise)
    return model.eval()


def make_tokens(model: lens.HookedGPT, batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


@pytest.fixture
def model() -> lens.HookedGPT:
    return make_model()


@pytest.fixture
def tokens(model) -> torch.Tensor:
    return make_tokens(model)


# ---------------------------------------------------------------- HF GPT-2 checkpoints
SMALL = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)


def random_hf(seed: int = 0, std: float = 0.15, **config):
    """A random HF GPT-2 in eval mode with LayerNorm weights away from 1 and every bias away
    from 0 (HF initialises them to 1 and 0, which would hide folding mistakes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**SMALL, "bos_token_id": None, "eos_token_id": None, **config})
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif std is not None:
                p.copy_(std * torch.randn_like(p))
    return hf


def write(hf, folder: Path, layout: str = "safetensors") -> Path:
    """Save `hf` as save_pretrained does, sharded, as a pytorch_model.bin, or as the original
    GPT-2 .bin (no "transformer." prefix, no lm_head, causal-mask buffers included)."""
    if layout in ("safetensors", "sharded"):
        hf.save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "5GB")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if layout == "bin_legacy":
        n = hf.config.n_positions
        sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
        for l in range(hf.config.n_layer):
            sd[f"h.{l}.attn.bias"] = torch.ones(1, 1, n, n).tril()
            sd[f"h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


