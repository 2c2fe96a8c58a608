"""Small random models shared by the tests."""

import pytest
import torch

import lens


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
