"""lens's FactoredMatrix against TransformerLens's on the same random factors (every shared
property and method gives the same values, singular vectors' signs included), and the
tokenizer helpers TransformerLens scripts call on a model (to_string, get_token_position)
against TransformerBridge's own code on the same GPT-2 vocabulary."""

import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lens.factored import FactoredMatrix
from lens.tokenizer import Tokenizer, get_token_position, gpt2_data_dir, to_string, to_tokens

TL = pytest.importorskip("transformer_lens.FactoredMatrix").FactoredMatrix
TOL = dict(rtol=1e-9, atol=1e-9)
SHAPES = {  # A's shape, B's shape
    "low_rank": ((7, 3), (3, 6)),
    "square": ((6, 3), (3, 6)),
    "full_rank": ((4, 6), (6, 5)),
    "tie": ((5, 4), (4, 4)),
    "layers_heads": ((2, 3, 8, 2), (2, 3, 2, 8)),
    "broadcast": ((3, 1, 6, 2), (4, 2, 6)),
    "one_side": ((5, 3), (2, 3, 5)),
}


def pair(name, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = SHAPES[name]
    return (torch.randn(*a, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(*b, generator=g, dtype=torch.float64).to(dtype))


def same(ours, theirs, **tol):
    if isinstance(theirs, TL):
        assert isinstance(ours, FactoredMatrix)
        assert ours.shape == theirs.shape and ours.mdim == theirs.mdim
        same(ours.A, theirs.A, **tol)
        same(ours.B, theirs.B, **tol)
        return
    assert type(ours) is type(theirs), (type(ours), type(theirs))
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **(tol or TOL))
    elif isinstance(theirs, tuple):
        for x, y in zip(ours, theirs, strict=True):
            same(x, y, **tol)
    else:
        assert ours == theirs


def public(obj) -> set:
    return {a for a in dir(obj) if not a.startswith("_")}


def test_the_public_api_covers_transformer_lens():
    A, B = pair("layers_heads")
    assert public(TL(A, B)) - public(FactoredMatrix(A, B)) == set()
    assert public(FactoredMatrix(A, B)) - public(TL(A, B)) == {"device", "dtype", "to"}
    assert "TransformerLens's historical name" in FactoredMatrix.Vh.__doc__


@pytest.mark.parametrize("name", SHAPES)
def test_every_property_and_method_matches(name):
    A, B = pair(name)
    ours, theirs = FactoredMatrix(A, B), TL(A, B)
    for attr in ("shape", "ldim", "mdim", "rdim", "ndim", "has_leading_dims", "A", "B", "pair",
                 "AB", "U", "S", "V"):
        same(getattr(ours, attr), getattr(theirs, attr))
    for method in ("svd", "norm", "collapse_l", "collapse_r", "make_even", "get_corner"):
        same(getattr(ours, method)(), getattr(theirs, method)())
    same(ours.get_corner(2), theirs.get_corner(2))
    same(ours.T, theirs.T)
    same(ours.unsqueeze(0), theirs.unsqueeze(0))
    with pytest.warns(DeprecationWarning):
        ours_vh = ours.Vh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        same(ours_vh, theirs.Vh)
    if ours.ldim == ours.rdim:
        same(ours.BA, theirs.BA)
        same(ours.eigenvalues, theirs.eigenvalues)
    for scalar in (2.5, torch.tensor(-0.5)):
        same(ours * scalar, theirs * scalar)
        same(scalar * ours, scalar * theirs)


@pytest.mark.parametrize("name", SHAPES)
def test_products_match(name):
    A, B = pair(name)
    ours, theirs = FactoredMatrix(A, B), TL(A, B)
    g = torch.Generator().manual_seed(1)
    for k in (1, 3, 9):  # thinner, as wide as, and wider than the factors
        right = torch.randn(ours.rdim, k, generator=g, dtype=torch.float64)
        left = torch.randn(k, ours.ldim, generator=g, dtype=torch.float64)
        same(ours @ right, theirs @ right)
        same(left @ ours, left @ theirs)
        other = pair("low_rank", seed=k)
        other = (torch.randn(ours.rdim, 2, generator=g, dtype=torch.float64), other[1][:2])
        same(ours @ FactoredMatrix(*other), theirs @ TL(*other))
    vec_r = torch.randn(ours.rdim, generator=g, dtype=torch.float64)
    vec_l = torch.randn(ours.ldim, generator=g, dtype=torch.float64)
    same(ours @ vec_r, theirs @ vec_r)
    same(vec_l @ ours, vec_l @ theirs)


def test_sixteen_bit_factors_match():
    for dtype in (torch.bfloat16, torch.float16):
        A, B = pair("layers_heads", dtype)
        ours, theirs = FactoredMatrix(A, B), TL(A, B)
        same(ours.AB, theirs.AB)
        for attr in ("U", "S", "V"):  # linear algebra in float32, in both
            same(getattr(ours, attr), getattr(theirs, attr), rtol=1e-5, atol=1e-5)
        same(ours.norm(), theirs.norm(), rtol=1e-5, atol=1e-5)


LEAD2 = [  # indices of a [2, 3, ldim, rdim] product
    0, -1, (0, 1), (slice(None), 2), [1, 0], torch.tensor([0, 1, 1]), (0, [2, 0]),
    (..., 1, 2), (..., -1, -1), (..., slice(1, None), slice(None, None, 2)),
    (..., [0, 2, 3], slice(None)), (..., [4, 0]), (0, 1, [1, 2], [0, 3, 4]),
    (..., torch.tensor([1, 3]), 2), (..., torch.tensor(2), slice(None)), (torch.tensor(1),),
    (..., torch.tensor([True, False, True, False, True, True, False, False]), slice(None)),
    (torch.tensor([True, False]),), (None,), (0, None), (..., None), (..., None, slice(None)),
    (..., None, None), (slice(None), None, 0, 1, None), (0, ..., 3), np.array([1, 0]),
]


@pytest.mark.parametrize("idx", LEAD2, ids=[str(i).replace("\n", "") for i in LEAD2])
def test_indexing_matches(idx):
    """Rows and columns by ints, slices, lists, integer tensors and masks, new axes and `...`:
    TransformerLens's reading (an int keeps the dim; rows and columns picked independently)."""
    A, B = pair("layers_heads")
    ours, theirs = FactoredMatrix(A, B)[idx], TL(A, B)[idx]
    same(ours, theirs)
    # and the same as indexing the product, rows then columns, ints kept as size-1 slices
    full = FactoredMatrix(A, B).AB
    key = idx if isinstance(idx, tuple) else (idx,)
    torch.testing.assert_close(ours.AB, _index_product(full, key), **TOL)


def _index_product(full, key):
    used = sum(0 if k is None or k is Ellipsis else 1 for k in key)
    at = [i for i, k in enumerate(key) if k is Ellipsis]
    fill = (slice(None),) * (full.ndim - used)
    key = key[:at[0]] + fill + key[at[0] + 1:] if at else key + fill
    axis, lead, rows_cols, after = 0, [], [], []
    for k in key:
        if k is not None:
            axis += 1
        if axis <= full.ndim - 2 and not (k is None and rows_cols):
            lead.append(k)
        elif k is None:
            after.append(len(rows_cols))
        else:
            if isinstance(k, (int, torch.Tensor)) and torch.as_tensor(k).ndim == 0:
                k = int(k)
                k = slice(k, k + 1 if k != -1 else None)
            rows_cols.append(k)
    out = full[tuple(lead) + (slice(None), slice(None))]
    out = out[..., rows_cols[0], :][..., :, rows_cols[1]]
    for where in after:
        out = out.unsqueeze(-2 if where == 1 else out.ndim)
    return out


def test_indexing_errors_name_the_shape():
    fm = FactoredMatrix(torch.randn(2, 3, 4, 5), torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"too many indices \(5\) for shape \(2, 3, 4, 6\)"):
        fm[0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="one ... at most"):
        fm[..., 0, ...]
    with pytest.raises(ValueError, match="row index must be .* got a torch.int64 tensor of shape \\(2, 2\\)"):
        fm[0, 0, torch.zeros(2, 2, dtype=torch.long)]
    with pytest.raises(ValueError, match="column index .*float32"):
        fm[..., torch.tensor([0.0, 1.0])]
    with pytest.raises(ValueError, match="2-dim boolean mask cannot cover the rows"):
        fm[0, torch.ones(3, 4, dtype=torch.bool)]
    with pytest.raises(ValueError, match="a bool is not an index"):
        fm[True]


# ---------------------------------------------------------------- tokenizer helpers
transformers = pytest.importorskip("transformers")
bridge = pytest.importorskip("transformer_lens.model_bridge.transformer_bridge").TransformerBridge


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_hf")
    shutil.copyfile(gpt2_data_dir() / "encoder.json", d / "vocab.json")
    shutil.copyfile(gpt2_data_dir() / "vocab.bpe", d / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(str(d))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


def test_to_string_matches_the_bridge(tok, hf):
    tl = SimpleNamespace(tokenizer=hf)
    for tokens in (995, np.int64(995), torch.tensor(995), [15496, 995], torch.tensor([15496, 11, 995]),
                   np.array([15496, 995]), torch.tensor([[15496, 995], [17250, 50256]]),
                   [[15496, 995], [17250, 0]], [50256, 15496, 50256]):
        assert to_string(tok, tokens) == bridge.to_string(tl, tokens), tokens
    assert to_string(tok, 995) == " world"


def test_get_token_position_takes_float_ids_as_the_bridge_does(tok, hf):
    tl = SimpleNamespace(to_single_token=lambda s: int(hf.encode(s)[0]))
    text = to_tokens(tok, "Hello world world, world")
    for dtype in (torch.float32, torch.float64, torch.long):
        ids = text.to(dtype)
        for single in (995, torch.tensor(995), torch.tensor(995.0), " world", 995.0):
            for mode in ("first", "last"):
                want = bridge.get_token_position(tl, single, ids, mode=mode)
                assert get_token_position(tok, single, ids, mode=mode) == want, (dtype, single, mode)
                assert get_token_position(tok, single, ids[0], mode=mode) == want
    assert get_token_position(tok, 995, np.array([15496.0, 995.0])) == 1
    with pytest.raises(ValueError, match="not whole numbers.*1.5"):  # the bridge finds no match
        get_token_position(tok, 995, torch.tensor([1.5, 995.0]))
