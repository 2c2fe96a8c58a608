"""Composition scores against the naive formula, head detectors on forced patterns, OV copying."""

import inspect

import pytest
import torch
from conftest import make_model, make_tokens

from lens.ablation import hook_name
from lens.circuits import (composition_scores, detect_head, duplicate_token_pattern,
                           duplicate_token_scores, induction_scores, ov_copying_scores,
                           plot_head_scores, previous_token_scores, random_composition_baseline,
                           repeated_tokens)
from lens.factored import FactoredMatrix, composition_score


def naive_score(W_A: torch.Tensor, W_B: torch.Tensor) -> float:
    return float((W_A @ W_B).norm() / (W_A.norm() * W_B.norm()))


@pytest.mark.parametrize("shape", [dict(n_layers=3, n_heads=3, d_head=4),
                                   dict(n_layers=2, d_model=6, n_heads=2, d_head=8)],
                         ids=["d_head<d_model", "d_head>d_model"])
def test_composition_scores_equal_the_naive_formula(shape):
    model = make_model(seed=3, dtype=torch.float64, attn_only=True, **shape)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_Q, W_K, W_V, W_O = model.W_Q.detach(), model.W_K.detach(), model.W_V.detach(), model.W_O.detach()
    for kind in ("q", "k", "v"):
        scores = composition_scores(model, kind)
        assert scores.shape == (L, H, L, H)
        for l1 in range(L):
            for h1 in range(H):
                OV = W_V[l1, h1] @ W_O[l1, h1]  # d_model x d_model, materialised
                for l2 in range(L):
                    for h2 in range(H):
                        if l2 <= l1:
                            assert scores[l1, h1, l2, h2].isnan()
                            continue
                        QK = W_Q[l2, h2] @ W_K[l2, h2].T
                        W_B = {"q": QK, "k": QK.T, "v": W_V[l2, h2] @ W_O[l2, h2]}[kind]
                        assert abs(float(scores[l1, h1, l2, h2]) - naive_score(OV, W_B)) < 1e-12
        # agrees with lens.factored's score, which keeps the circuits factored too
        W_B = {"q": model.QK, "k": model.QK.T, "v": model.OV}[kind]
        ref = composition_score(model.OV[0], W_B[L - 1], broadcast_dims=True)
        torch.testing.assert_close(scores[0, :, L - 1], ref.detach())


def test_composition_score_errors_and_baseline():
    model = make_model(seed=0, n_layers=2)
    with pytest.raises(ValueError, match="valid kinds"):
        composition_scores(model, "qk")
    base = random_composition_baseline(model, "k", n_samples=100, seed=1)
    assert base.shape == (100,) and ((base > 0) & (base < 1)).all()
    assert torch.equal(base, random_composition_baseline(model, "k", n_samples=100, seed=1))
    # one sample by hand, with the same random draws
    g = torch.Generator().manual_seed(1)
    d, e = model.cfg.d_model, model.cfg.d_head
    W_V, W_Q, W_K = (torch.randn(64, d, e, generator=g) for _ in range(3))
    W_O = torch.randn(64, e, d, generator=g)
    assert abs(float(base[0]) - naive_score(W_V[0] @ W_O[0], W_K[0] @ W_Q[0].T)) < 1e-5
    with pytest.raises(ValueError, match="n_samples"):
        random_composition_baseline(model, "q", n_samples=0)


def force(layer: int, head: int, target: torch.Tensor):
    """A hook that makes head (layer, head) attend exactly as `target` [batch or 1, q, k]
    (rows normalised; a row without target attends to its own position)."""
    def hook(pattern, hook):
        t = target.to(pattern.dtype).expand(pattern.shape[0], -1, -1)
        n = t.shape[-1]
        t = torch.where(t.sum(-1, keepdim=True) > 0, t, torch.eye(n, dtype=t.dtype))
        pattern = pattern.clone()
        pattern[:, head] = t / t.sum(-1, keepdim=True)
        return pattern
    return hook_name("pattern", layer), hook


def test_a_forced_previous_token_head_scores_one(model, tokens):
    n = tokens.shape[1]
    prev = torch.diag(torch.ones(n - 1), -1)[None]
    with model.hooks(fwd_hooks=[force(0, 1, prev)]):
        scores = previous_token_scores(model, tokens, batch_size=1)
    assert scores.shape == (2, 2)
    assert scores[0, 1] == 1.0 and (scores.flatten()[[0, 2, 3]] < 0.99).all()
    # the same from a cache of the patterns, and equal to the attention mass by hand
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    unforced = previous_token_scores(model, cache)
    rows = torch.arange(1, n)
    manual = cache["pattern", 1][:, 0, rows, rows - 1].mean()
    torch.testing.assert_close(unforced[1, 0], manual)
    torch.testing.assert_close(unforced, previous_token_scores(model, tokens))


def test_a_forced_duplicate_token_head_scores_one(model):
    tokens = repeated_tokens(model, seq_len=4, batch=3, seed=2)
    target = duplicate_token_pattern(tokens)
    assert target[:, 4:].sum(-1).min() >= 1 and target[0, 0].sum() == 0
    with model.hooks(fwd_hooks=[force(1, 0, target)]):
        scores = duplicate_token_scores(model, tokens)
        _, cache = model.run_with_cache(tokens)
    assert scores[1, 0] == 1.0 and (scores.flatten()[[0, 1, 3]] < 0.99).all()
    torch.testing.assert_close(duplicate_token_scores(model, tokens, cache=cache), scores)
    torch.testing.assert_close(duplicate_token_scores(model, tokens, batch_size=2),
                               duplicate_token_scores(model, tokens))


def test_a_forced_induction_head_scores_one(model):
    S = 5
    target = torch.zeros(2 * S, 2 * S)
    q = torch.arange(S, 2 * S)
    target[q, q - S + 1] = 1.0  # the token after the previous occurrence
    target[torch.arange(1, S), torch.arange(S - 1)] = 1.0  # previous token in the first half
    with model.hooks(fwd_hooks=[force(1, 1, target[None])]):
        scores = induction_scores(model, seq_len=S, batch=4, seed=0)
    assert scores[1, 1] == 1.0 and (scores.flatten()[:3] < 0.99).all()
    with pytest.raises(ValueError, match="n_ctx"):
        induction_scores(model, seq_len=7)


def test_detect_head_with_custom_patterns(model, tokens, tmp_path):
    n = tokens.shape[1]
    eye = torch.eye(n)
    with model.hooks(fwd_hooks=[force(1, 0, eye[None])]):
        by_tensor = detect_head(model, tokens, eye)
        by_fn = detect_head(model, tokens, lambda t: eye.expand(t.shape[0], n, n), batch_size=1)
    assert by_tensor[1, 0] == 1.0 and torch.equal(by_tensor, by_fn)
    # a target for every prompt, checked per chunk
    per_prompt = eye.expand(tokens.shape[0], n, n).clone()
    torch.testing.assert_close(detect_head(model, tokens, per_prompt, batch_size=1),
                               detect_head(model, tokens, eye))
    with pytest.raises(ValueError, match="target pattern must be"):
        detect_head(model, tokens, torch.eye(n + 1))
    with pytest.raises(ValueError, match="no nonzero entry"):
        detect_head(model, tokens, torch.zeros(n, n))
    plot_head_scores(by_tensor, path=tmp_path / "heads.png")
    plot_head_scores(composition_scores(model, "v"), path=tmp_path / "comp.png")
    assert (tmp_path / "heads.png").exists() and (tmp_path / "comp.png").exists()


def orthonormal(d: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, e, generator=g, dtype=torch.float64))[0]


def test_ov_copying_scores_of_identity_like_and_negated_ovs():
    model = make_model(seed=5, attn_only=True, dtype=torch.float64, n_heads=2, d_head=8)
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)  # tied embeddings
        for l, block in enumerate(model.blocks):
            for h in range(2):
                P = orthonormal(16, 8, seed=10 * l + h)  # OV = ±P Pᵀ, a projection
                block.attn.W_V[h] = P
                block.attn.W_O[h] = P.T if h == 0 else -P.T
    scores = ov_copying_scores(model)
    expected = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)


def test_ov_copying_scores_equal_the_full_circuits_eigenvalues():
    model = make_model(seed=6, dtype=torch.float64)
    scores = ov_copying_scores(model)
    W_E, W_U = model.W_E.detach(), model.W_U.detach()
    for l in range(2):
        for h in range(2):
            full = W_E @ model.W_V[l, h].detach() @ model.W_O[l, h].detach() @ W_U  # d_vocab²
            lam = torch.linalg.eigvals(full)
            expected = lam.sum().real / lam.abs().sum()
            assert abs(float(scores[l, h]) - float(expected)) < 1e-8
    # the factored circuit the scores come from has the full circuit's nonzero eigenvalues
    fm = FactoredMatrix(model.W_E.detach() @ model.W_V[0, 0].detach(), model.W_O[0, 0].detach() @ W_U)
    torch.testing.assert_close(fm.eigenvalues.abs().sort().values,
                               torch.linalg.eigvals(fm.AB).abs().sort().values[-8:])


def test_scores_are_float_tensors_for_float32_models():
    model = make_model(seed=1)
    tokens = make_tokens(model)
    for scores in (previous_token_scores(model, tokens), ov_copying_scores(model),
                   induction_scores(model, seq_len=4, batch=2)):
        assert scores.shape == (2, 2) and scores.dtype == torch.float32


def plain(fn):
    """fn without the test run's runtime type checks: the errors a caller sees by default."""
    return inspect.unwrap(fn)


def test_detectors_take_token_lists_and_strings(model, tokens):
    from lens.tokenizer import Tokenizer
    prompts = tokens.tolist()
    assert torch.equal(previous_token_scores(model, prompts), previous_token_scores(model, tokens))
    assert torch.equal(duplicate_token_scores(model, prompts), duplicate_token_scores(model, tokens))
    eye = torch.eye(tokens.shape[1])
    assert torch.equal(detect_head(model, prompts, eye), detect_head(model, tokens, eye))
    assert previous_token_scores(model, prompts[0]).shape == (2, 2)  # one prompt, [pos]
    for scorer in (previous_token_scores, duplicate_token_scores):
        with pytest.raises(ValueError, match="tokens is a list but neither strings nor token ids"):
            scorer(model, [[1, 2, 3], [1, 2]])
    text = make_model(d_vocab=50257)
    text.tokenizer = Tokenizer.gpt2()
    assert torch.equal(previous_token_scores(text, "the cat sat on the mat"),
                       previous_token_scores(text, text.to_tokens("the cat sat on the mat")))
    with pytest.raises(ValueError, match=r"tokens: the prompts are \[7, 2\] tokens long"):
        duplicate_token_scores(text, ["the cat sat on the mat", "a"])
    with pytest.raises(ValueError, match="batch_size=2.5 must be an int >= 1"):
        plain(detect_head)(model, tokens, eye, batch_size=2.5)


def test_seeds_are_ints_in_torchs_range(model):
    for fn, kw in ((repeated_tokens, {}), (induction_scores, {}), (random_composition_baseline, dict(n_samples=2))):
        for seed in (1.5, "a", 2 ** 70, None):
            with pytest.raises(ValueError, match=r"seed=.* must be an int in \[-2\*\*63, 2\*\*64 - 1\]$"):
                plain(fn)(model, seed=seed, **kw)
    assert torch.equal(repeated_tokens(model, seed=-1), repeated_tokens(model, seed=-1))
