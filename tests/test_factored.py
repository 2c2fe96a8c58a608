"""FactoredMatrix against the materialised product, computed naively in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens.factored import FactoredMatrix, composition_score

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
TOL = dict(rtol=1e-9, atol=1e-9)


def naive_product(A, B):
    """Broadcast multiply-and-sum, independent of torch.matmul."""
    return (A[..., :, :, None] * B[..., None, :, :]).sum(-2)


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@st.composite
def factors(draw, square=False, max_dim=6, ldim=None):
    """(A, B) with random inner sizes and leading dims that broadcast (some dropped or 1)."""
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    m = ldim or draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    n = m if square else draw(st.integers(1, max_dim))

    def variant(shape):
        kept = shape[draw(st.integers(0, len(shape))):]
        return [d if draw(st.booleans()) else 1 for d in kept]

    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return randn(g, *variant(lead), m, k), randn(g, *variant(lead), k, n)


def flat(x, keep):
    """Collapse leading dims to one, keeping the last `keep` dims."""
    return x.reshape(-1, *x.shape[x.ndim - keep:])


def assert_same_multiset(xs, ys, tol):
    ys = list(ys)
    assert len(xs) == len(ys), (xs, ys)
    for x in xs:
        j = min(range(len(ys)), key=lambda i: abs(ys[i] - x))
        assert abs(ys[j] - x) < tol, (x, ys)
        ys.pop(j)


@SETTINGS
@given(factors())
def test_shapes_product_and_transpose(AB_pair):
    A, B = AB_pair
    fm, want = FactoredMatrix(A, B), naive_product(A, B)
    assert fm.shape == want.shape and fm.ndim == want.ndim
    assert (fm.ldim, fm.mdim, fm.rdim) == (A.shape[-2], A.shape[-1], B.shape[-1])
    torch.testing.assert_close(fm.AB, want, **TOL)
    assert fm.pair[0].shape == want.shape[:-2] + A.shape[-2:]
    torch.testing.assert_close(naive_product(*fm.pair), want, **TOL)
    torch.testing.assert_close(fm.T.AB, want.mT, **TOL)
    assert fm.T.shape == want.mT.shape
    torch.testing.assert_close((fm * 2.5).AB, 2.5 * want, **TOL)
    torch.testing.assert_close((-1 * fm).AB, -want, **TOL)
    torch.testing.assert_close((fm * torch.tensor(3.0, dtype=A.dtype)).AB, 3 * want, **TOL)
    if fm.ldim == fm.rdim:
        torch.testing.assert_close(fm.BA, naive_product(fm.B, fm.A), **TOL)
    else:
        with pytest.raises(ValueError, match="ldim == rdim"):
            fm.BA


@SETTINGS
@given(factors())
def test_svd_norm_and_collapse(AB_pair):
    fm = FactoredMatrix(*AB_pair)
    want = naive_product(*AB_pair)
    r = min(fm.ldim, fm.mdim, fm.rdim)
    U, S, V = fm.svd()
    assert U.shape == fm.shape[:-1] + (r,) and V.shape == fm.shape[:-2] + (fm.rdim, r)
    assert S.shape == fm.shape[:-2] + (r,)
    torch.testing.assert_close(naive_product(U * S[..., None, :], V.mT), want, **TOL)
    eye = torch.eye(r, dtype=torch.float64).expand(*fm.shape[:-2], r, r)
    torch.testing.assert_close(U.mT @ U, eye, **TOL)
    torch.testing.assert_close(V.mT @ V, eye, **TOL)
    svdvals = torch.linalg.svdvals(want)
    torch.testing.assert_close(S, svdvals[..., :r], **TOL)
    assert torch.all(svdvals[..., r:].abs() < 1e-9)  # rank <= mdim
    assert fm.U is U and fm.S is S and fm.V is V
    with pytest.warns(DeprecationWarning, match="use .V"):
        assert fm.Vh is V
    torch.testing.assert_close(fm.norm(), torch.linalg.norm(want, dim=(-2, -1)), **TOL)
    torch.testing.assert_close(naive_product(U, fm.collapse_l()), want, **TOL)
    torch.testing.assert_close(naive_product(fm.collapse_r(), V.mT), want, **TOL)
    even = fm.make_even()
    torch.testing.assert_close(even.AB, want, **TOL)
    torch.testing.assert_close(even.A.norm(dim=-2), even.B.norm(dim=-1), **TOL)


@SETTINGS
@given(factors(square=True))
def test_eigenvalues_are_nonzero_eigenvalues_of_AB(AB_pair):
    fm = FactoredMatrix(*AB_pair)
    want = naive_product(*AB_pair)
    got = fm.eigenvalues
    assert got.is_complex() and got.shape == fm.shape[:-2] + (fm.mdim,)
    tol = 1e-7 * (1 + want.abs().max().item())
    for ours, full in zip(flat(got, 1), flat(want, 2)):
        ref = torch.linalg.eigvals(full)
        assert_same_multiset([x for x in ours.tolist() if abs(x) > tol],
                             [x for x in ref.tolist() if abs(x) > tol], tol)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 6), min_size=6, max_size=6))
def test_matmul_chains_stay_factored_with_cheapest_inner_dim(seed, dims):
    m, k1, n, k2, p, q = dims
    g = torch.Generator().manual_seed(seed)
    A1, B1, A2, B2 = randn(g, m, k1), randn(g, k1, n), randn(g, n, k2), randn(g, k2, p)
    left, right, vec_l, vec_r = randn(g, q, m), randn(g, p, q), randn(g, m), randn(g, p)
    f1, f2 = FactoredMatrix(A1, B1), FactoredMatrix(A2, B2)
    M1, M2 = naive_product(A1, B1), naive_product(A2, B2)

    prod = f1 @ f2
    assert isinstance(prod, FactoredMatrix) and prod.mdim == min(k1, n, k2)
    torch.testing.assert_close(prod.AB, naive_product(M1, M2), **TOL)
    chain = left @ f1 @ f2 @ right
    assert isinstance(chain, FactoredMatrix) and chain.mdim <= min(k1, n, k2)
    torch.testing.assert_close(chain.AB, naive_product(naive_product(left, M1 @ M2), right),
                               **TOL)
    assert (f2 @ right).mdim == min(k2, p) and (left @ f1).mdim == min(k1, m)
    torch.testing.assert_close(f1 @ f2 @ vec_r, M1 @ M2 @ vec_r, **TOL)
    torch.testing.assert_close(vec_l @ f1, vec_l @ M1, **TOL)
    with pytest.raises(ValueError, match="shape mismatch"):
        f1 @ randn(g, n + 1, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        randn(g, 2, m + 1) @ f1
    with pytest.raises(ValueError, match=r"shape mismatch in FactoredMatrix\(.*\) @ Factored"):
        f1 @ FactoredMatrix(randn(g, n + 1, 2), randn(g, 2, 3))


@SETTINGS
@given(factors())
def test_getitem_matches_indexing_the_product(AB_pair):
    fm, want = FactoredMatrix(*AB_pair), naive_product(*AB_pair)
    lead = fm.ndim - 2
    indices = [(..., slice(1, None), slice(None, None, 2)), (..., -1, 0), (..., slice(0, 2), -1)]
    if lead:
        indices += [0, -1, (slice(None, 2),), (..., 0, slice(None)), torch.tensor([0, 0])]
    if lead == 2:
        indices += [(0, -1), (slice(None), 0), ([0, 0, 0], slice(None), 1)]
    for idx in indices:
        got = fm[idx]
        assert isinstance(got, FactoredMatrix)
        key = idx if isinstance(idx, tuple) else (idx,)
        # Ints on the row/column dims keep a size-1 dim, so compare with the slice form.
        expected = want[_int_rows_cols_to_slices(key, fm.ndim)]
        torch.testing.assert_close(got.AB, expected, **TOL)


def _int_rows_cols_to_slices(key, ndim):
    if key[0] is Ellipsis:
        key = (slice(None),) * (ndim - len(key) + 1) + key[1:]
    key = key + (slice(None),) * (ndim - len(key))
    fix = [k if isinstance(k, slice) else slice(k, k + 1 if k != -1 else None) for k in key[-2:]]
    return key[:-2] + tuple(fix)


def test_getitem_errors():
    fm = FactoredMatrix(torch.randn(2, 3, 4, 5), torch.randn(5, 6))
    with pytest.raises(ValueError, match="too many indices"):
        fm[0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="row index must be"):  # lists and tensors are valid, 2-D ones not
        fm[0, 0, torch.zeros(2, 2, dtype=torch.long)]
    with pytest.raises(ValueError, match="one ... at most"):
        fm[..., 0, ...]


def test_broadcasts_over_layers_and_heads():
    n_layers, n_heads, d_model, d_head = 3, 4, 16, 4
    g = torch.Generator().manual_seed(0)
    W_Q, W_K, W_V = (randn(g, n_layers, n_heads, d_model, d_head) for _ in range(3))
    W_O = randn(g, n_layers, n_heads, d_head, d_model)
    QK, OV = FactoredMatrix(W_Q, W_K.mT), FactoredMatrix(W_V, W_O)
    assert QK.shape == (n_layers, n_heads, d_model, d_model) and QK.mdim == d_head
    torch.testing.assert_close(OV.AB, naive_product(W_V, W_O), **TOL)
    torch.testing.assert_close(OV[1, 2].AB, W_V[1, 2] @ W_O[1, 2], **TOL)
    # A single matrix broadcast against per-head factors.
    shared = FactoredMatrix(randn(g, d_model, d_head), W_O)
    assert shared.shape == OV.shape and shared.A.shape == W_V.shape
    torch.testing.assert_close(shared[2, 3].AB, shared.A[0, 0] @ W_O[2, 3], **TOL)

    heads = OV.unsqueeze(0)
    assert heads.shape == (1, n_layers, n_heads, d_model, d_model)
    assert OV.unsqueeze(-3).shape == (n_layers, n_heads, 1, d_model, d_model)
    with pytest.raises(ValueError, match="leading dim"):
        OV.unsqueeze(-1)
    torch.testing.assert_close(OV.get_corner(2), naive_product(W_V, W_O)[:2, :2, :2, :2], **TOL)
    torch.testing.assert_close(FactoredMatrix(W_V[0, 0], W_O[0, 0]).get_corner(),
                               (W_V[0, 0] @ W_O[0, 0])[:3, :3], **TOL)

    # Composition scores: elementwise over [n_layers, n_heads], and crossed over all heads.
    score = composition_score(OV, QK)
    naive = (torch.linalg.norm(naive_product(OV.AB, QK.AB), dim=(-2, -1))
             / (torch.linalg.norm(OV.AB, dim=(-2, -1)) * torch.linalg.norm(QK.AB, dim=(-2, -1))))
    assert score.shape == (n_layers, n_heads)
    torch.testing.assert_close(score, naive, **TOL)
    crossed = composition_score(OV, QK.T, broadcast_dims=True)
    assert crossed.shape == (n_layers, n_heads, n_layers, n_heads)
    for i, j, k, l in [(0, 1, 2, 3), (2, 0, 1, 1), (1, 3, 1, 3)]:
        WA, WB = OV.AB[i, j], QK.AB[k, l].mT
        expected = torch.linalg.norm(WA @ WB) / (torch.linalg.norm(WA) * torch.linalg.norm(WB))
        torch.testing.assert_close(crossed[i, j, k, l], expected, **TOL)
    assert torch.all((crossed > 0) & (crossed <= 1))


@SETTINGS
@given(factors(), st.data())
def test_composition_score_matches_naive_formula(left, data):
    fl = FactoredMatrix(*left)
    fr = FactoredMatrix(*data.draw(factors(ldim=fl.rdim)))
    Ml, Mr = fl.AB, fr.AB
    score = composition_score(fl, fr, broadcast_dims=True)
    lead_l, lead_r = fl.shape[:-2], fr.shape[:-2]
    Ml = Ml.reshape(*lead_l, *(1,) * len(lead_r), *Ml.shape[-2:])
    prod = naive_product(Ml, Mr)
    naive = (torch.linalg.norm(prod, dim=(-2, -1))
             / (torch.linalg.norm(Ml, dim=(-2, -1)) * torch.linalg.norm(Mr, dim=(-2, -1))))
    torch.testing.assert_close(score, naive, **TOL)


def test_constructor_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"inner dims.*\(4, 3\).*\(2, 5\)"):
        FactoredMatrix(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"at least 2 dims.*\(4,\).*\(4, 5\)"):
        FactoredMatrix(torch.randn(4), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"broadcast.*\(2, 4, 3\).*\(3, 3, 5\)"):
        FactoredMatrix(torch.randn(2, 4, 3), torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="W_A.rdim == W_B.ldim"):
        composition_score(FactoredMatrix(torch.randn(4, 2), torch.randn(2, 3)),
                          FactoredMatrix(torch.randn(4, 2), torch.randn(2, 3)))
    with pytest.raises(ValueError, match="scalar"):
        FactoredMatrix(torch.randn(4, 2), torch.randn(2, 3)) * torch.ones(2)


def test_repr_to_and_half_precision():
    fm = FactoredMatrix(torch.randn(2, 5, 3), torch.randn(3, 4))
    text = repr(fm)
    assert "shape=(2, 5, 4)" in text and "mdim=3" in text and "B=(2, 3, 4)" in text
    as64 = fm.to(torch.float64).to("cpu")
    assert as64.dtype == torch.float64 and as64.device.type == "cpu"
    half = fm.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.S.dtype == torch.float32
    torch.testing.assert_close(half.norm(), torch.linalg.norm(half.AB.float(), dim=(-2, -1)),
                               rtol=1e-2, atol=1e-2)
    assert FactoredMatrix(torch.eye(3).half(), torch.eye(3).half()).eigenvalues.is_complex()
    assert math.isclose(FactoredMatrix(torch.eye(3), torch.eye(3)).norm().item(), math.sqrt(3),
                        rel_tol=1e-6)
