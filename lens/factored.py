"""Low-rank matrices kept as a product A @ B (e.g. QK = W_Q W_Kᵀ, OV = W_V W_O) so that SVD,
eigenvalues, norms and composition scores cost O(d_model · d_head²) rather than O(d_model³).
API names follow TransformerLens's FactoredMatrix, so scripts written against it port directly."""

import operator
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from jaxtyping import Complex, Float
from torch import Tensor

Scalar = Union[int, float, Tensor]


def _upcast(x: Tensor) -> Tensor:
    """torch.linalg has no 16-bit QR/SVD/eig kernels, so those run in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class FactoredMatrix:
    """The matrix AB = A @ B with A: [..., ldim, mdim] and B: [..., mdim, rdim], never formed
    unless `.AB` is asked for. Leading (batch) dims of A and B broadcast, e.g. W_V of shape
    [n_layers, n_heads, d_model, d_head] with W_O of shape [n_layers, n_heads, d_head, d_model].

    A and B are stored broadcast to the common leading shape (as views, no copy) and are
    read-only, so the decomposition computed by `svd()` is cached on the instance.
    Linear-algebra results of 16-bit factors are returned in float32.
    """

    def __init__(self, A: Float[Tensor, "..."], B: Float[Tensor, "..."]):
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(f"A and B must be tensors, got {type(A).__name__}, {type(B).__name__}")
        shapes = f"A: {tuple(A.shape)}, B: {tuple(B.shape)}"
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors need at least 2 dims (matrices), got {shapes}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dims must match (A[..., m, k] @ B[..., k, n]), got {shapes}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(f"leading dims do not broadcast, got {shapes}") from None
        self._A = A.broadcast_to(lead + A.shape[-2:])
        self._B = B.broadcast_to(lead + B.shape[-2:])
        self._core: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._svd: Optional[tuple[Tensor, Tensor, Tensor]] = None

    # ---- shape and factors --------------------------------------------------------------------
    @property
    def A(self) -> Float[Tensor, "*batch ldim mdim"]:
        return self._A

    @property
    def B(self) -> Float[Tensor, "*batch mdim rdim"]:
        return self._B

    @property
    def pair(self) -> tuple[Float[Tensor, "*batch ldim mdim"], Float[Tensor, "*batch mdim rdim"]]:
        return self._A, self._B

    @property
    def shape(self) -> torch.Size:
        """Shape of the product: leading dims + (ldim, rdim)."""
        return self._A.shape[:-1] + self._B.shape[-1:]

    @property
    def ldim(self) -> int:
        return self._A.shape[-2]

    @property
    def mdim(self) -> int:
        return self._A.shape[-1]

    @property
    def rdim(self) -> int:
        return self._B.shape[-1]

    @property
    def ndim(self) -> int:
        return self._A.ndim

    @property
    def has_leading_dims(self) -> bool:
        """Whether the product has dims before its rows and columns (a stack of matrices)."""
        return self._A.ndim > 2

    @property
    def dtype(self) -> torch.dtype:
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        return self._A.device

    def __repr__(self) -> str:
        return (f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, "
                f"A={tuple(self._A.shape)}, B={tuple(self._B.shape)}, dtype={self.dtype})")

    # ---- products -----------------------------------------------------------------------------
    @property
    def AB(self) -> Float[Tensor, "*batch ldim rdim"]:
        """The materialised product (ldim x rdim per batch element)."""
        return self._A @ self._B

    @property
    def BA(self) -> Float[Tensor, "*batch mdim mdim"]:
        """B @ A, defined only when ldim == rdim; it shares AB's nonzero eigenvalues."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim, got A: {tuple(self._A.shape)}, "
                             f"B: {tuple(self._B.shape)}")
        return self._B @ self._A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self._B.mT, self._A.mT)

    def __matmul__(self, other: Union[Float[Tensor, "..."], "FactoredMatrix"]
                   ) -> Union["FactoredMatrix", Float[Tensor, "..."]]:
        """self @ other. A FactoredMatrix or matrix operand gives a FactoredMatrix whose inner
        dim is the smallest available (mdim, other's mdim, or rdim; on a tie, rdim, with the
        factors TransformerLens picks); a vector gives a tensor."""
        if isinstance(other, FactoredMatrix):
            if other.ldim != self.rdim:
                raise ValueError(f"shape mismatch in FactoredMatrix{tuple(self.shape)} @ "
                                 f"FactoredMatrix{tuple(other.shape)}")
            return (self @ other.A) @ other.B
        if not isinstance(other, Tensor):
            raise TypeError(f"cannot multiply FactoredMatrix by {type(other).__name__}")
        if other.ndim == 0 or other.shape[-2 if other.ndim > 1 else -1] != self.rdim:
            raise ValueError(f"shape mismatch in FactoredMatrix{tuple(self.shape)} @ "
                             f"{tuple(other.shape)}")
        if other.ndim == 1:
            return (self._A @ (self._B @ other.unsqueeze(-1))).squeeze(-1)
        if self.mdim < self.rdim:  # ties go to AB, as in TransformerLens (same factors)
            return FactoredMatrix(self._A, self._B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Float[Tensor, "..."]) -> Union["FactoredMatrix", Float[Tensor, "..."]]:
        """other @ self, for a tensor `other` (matrix or vector)."""
        if not isinstance(other, Tensor):
            raise TypeError(f"cannot multiply {type(other).__name__} by FactoredMatrix")
        if other.ndim == 0 or other.shape[-1] != self.ldim:
            raise ValueError(f"shape mismatch in {tuple(other.shape)} @ "
                             f"FactoredMatrix{tuple(self.shape)}")
        if other.ndim == 1:
            return ((other.unsqueeze(-2) @ self._A) @ self._B).squeeze(-2)
        if self.mdim < self.ldim:
            return FactoredMatrix(other @ self._A, self._B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Scalar) -> "FactoredMatrix":
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; "
                             "use @ for matrix products")
        return FactoredMatrix(self._A * scalar, self._B)

    def __rmul__(self, scalar: Scalar) -> "FactoredMatrix":
        return self * scalar

    # ---- decompositions -----------------------------------------------------------------------
    def _qr_core(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Qa, M, Qb) with AB = Qa @ M @ Qbᵀ, Qa and Qb having orthonormal columns and M small:
        A = Qa Ra, Bᵀ = Qb Rb, so AB = Qa (Ra Rbᵀ) Qbᵀ."""
        if self._core is None:
            Qa, Ra = torch.linalg.qr(_upcast(self._A))
            Qb, Rb = torch.linalg.qr(_upcast(self._B).mT)
            self._core = (Qa, Ra @ Rb.mT, Qb)
        return self._core

    def svd(self) -> tuple[Float[Tensor, "*batch ldim r"], Float[Tensor, "*batch r"],
                           Float[Tensor, "*batch rdim r"]]:
        """Thin SVD (U, S, V) with AB == U @ diag(S) @ V.mT, as in TransformerLens: V holds the
        right singular vectors as columns (it is V, not Vh). r = min(ldim, mdim, rdim); U and V
        have orthonormal columns and S is descending. Computed as TransformerLens does (thin
        SVDs A = Ua Sa Vaᵀ, B = Ub Sb Vbᵀ, then the SVD of the small Sa Vaᵀ Ub Sb), so the
        singular vectors come with the same signs, and a direction read off U or V points the
        same way as in a TransformerLens script."""
        if self._svd is None:
            Ua, Sa, Vha = torch.linalg.svd(_upcast(self._A), full_matrices=False)
            Ub, Sb, Vhb = torch.linalg.svd(_upcast(self._B), full_matrices=False)
            middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
            Um, S, Vhm = torch.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, S, Vhb.mT @ Vhm.mT)
        return self._svd

    @property
    def U(self) -> Float[Tensor, "*batch ldim r"]:
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "*batch r"]:
        return self.svd()[1]

    @property
    def V(self) -> Float[Tensor, "*batch rdim r"]:
        """Right singular vectors as columns: AB == U @ diag(S) @ V.mT."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[Tensor, "*batch rdim r"]:
        """Same tensor as `V` (TransformerLens's historical name, kept so ported scripts keep
        their meaning); the conjugate transpose proper is `V.mT`. Warns: prefer `.V`."""
        warnings.warn("FactoredMatrix.Vh returns V (AB == U @ diag(S) @ Vh.mT), as in "
                      "TransformerLens; use .V, or .V.mT for the actual Vh",
                      DeprecationWarning, stacklevel=2)
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "*batch mdim"]:
        """Eigenvalues of BA (mdim x mdim). If BAv = λv then AB(Av) = λ(Av), so these are AB's
        nonzero eigenvalues, padded with zeros when mdim > rank. Needs ldim == rdim."""
        return torch.linalg.eigvals(_upcast(self.BA))

    def norm(self) -> Float[Tensor, "*batch"]:
        """Frobenius norm ‖AB‖_F = ‖Ra Rbᵀ‖_F (orthonormal Qa, Qb drop out), without forming AB."""
        return torch.linalg.matrix_norm(self._qr_core()[1])

    def collapse_l(self) -> Float[Tensor, "*batch r rdim"]:
        """diag(S) @ V.mT: the product with its left orthogonal factor U removed (AB = U @ this)."""
        return self.S[..., :, None] * self.V.mT

    def collapse_r(self) -> Float[Tensor, "*batch ldim r"]:
        """U @ diag(S): the product with its right orthogonal factor removed (AB = this @ V.mT)."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> "FactoredMatrix":
        """The same matrix refactored as (U √S, √S Vᵀ): balanced factors with orthogonal
        columns/rows and inner dim r."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    # ---- reshaping and indexing ---------------------------------------------------------------
    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """Insert a size-1 leading dim at position k of the product's shape (not in the last two)."""
        pos = k + self.ndim + 1 if k < 0 else k
        if not 0 <= pos <= self.ndim - 2:
            raise ValueError(f"unsqueeze({k}) must add a leading dim of shape {tuple(self.shape)}")
        return FactoredMatrix(self._A.unsqueeze(pos), self._B.unsqueeze(pos))

    def get_corner(self, k: int = 3) -> Float[Tensor, "..."]:
        """The first k entries of every dim of AB (as TransformerLens's get_corner), computed
        from the first k rows of A and first k columns of B."""
        lead = tuple(slice(k) for _ in range(self.ndim - 2))
        return self._A[lead + (slice(k), slice(None))] @ self._B[lead + (slice(None), slice(k))]

    def __getitem__(self, idx: Any) -> "FactoredMatrix":
        """Index the product's dims without forming it, as TransformerLens does: fm[idx].AB is
        fm.AB[idx], except that an int on the row or column dim keeps that dim (size 1), so the
        result is still a matrix, and that rows and columns are picked independently:
        fm[..., rows, cols] is the submatrix of those rows and columns (np.ix_'s reading, and
        TransformerLens's), not torch's pairs of them. The leading dims take any torch index
        (int, slice, list, integer or boolean tensor, None), applied as torch applies it, and
        the rows and columns are then picked from what it leaves. Rows and columns take an int,
        a slice, a list or 1D tensor of ints, or a 1D boolean mask. One `...`; a `None` after
        the leading dims adds a size-1 dim there, as torch would."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        shape = tuple(self.shape)
        at = [i for i, item in enumerate(idx) if item is Ellipsis]
        if len(at) > 1:
            raise ValueError(f"an index can have one ... at most, got {idx} for shape {shape}")
        used = sum(_dims_taken(item, shape) for item in idx)
        if used > self.ndim:
            raise ValueError(f"too many indices ({used}) for shape {shape}")
        fill = (slice(None),) * (self.ndim - used)
        idx = idx[:at[0]] + fill + idx[at[0] + 1:] if at else idx + fill
        n_lead, axis = self.ndim - 2, 0
        lead: list = []
        picks: list = []  # the row index, then the column index
        new_axes: list[int] = []  # None after the rows (1) or after the columns (2)
        for item in idx:
            if item is None:
                if axis <= n_lead:
                    lead.append(None)
                else:
                    new_axes.append(axis - n_lead)
                continue
            taken = _dims_taken(item, shape)
            if axis + taken <= n_lead:
                lead.append(item)
            elif taken == 1:
                picks.append(_one_axis(item, "row" if axis == n_lead else "column", shape))
            else:
                raise ValueError(f"a {taken}-dim boolean mask cannot cover the rows or columns "
                                 f"of a FactoredMatrix of shape {shape}; index them with 1D masks")
            axis += taken
        rest = (slice(None), slice(None))
        A, B = self._A[tuple(lead) + rest], self._B[tuple(lead) + rest]
        out = FactoredMatrix(A[..., picks[0], :], B[..., :, picks[1]])
        for where in new_axes:
            if where == 1:  # between rows and columns: the rows become a leading dim
                out = FactoredMatrix(out.A.unsqueeze(-2), out.B.unsqueeze(-3))
            else:  # after the columns: they become the rows of a one-column matrix
                out = FactoredMatrix(out.B.mT.unsqueeze(-3), out.A.unsqueeze(-1))
        return out

    def to(self, *args: Any, **kwargs: Any) -> "FactoredMatrix":
        """Move/cast both factors, with the arguments of `Tensor.to`."""
        return FactoredMatrix(self._A.to(*args, **kwargs), self._B.to(*args, **kwargs))


def _dims_taken(item: Any, shape: tuple) -> int:
    """How many of the product's dims an index item consumes (a boolean mask: its ndim)."""
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, bool) or (isinstance(item, (Tensor, np.ndarray)) and item.ndim == 0
                                  and item.dtype in (torch.bool, np.bool_)):
        raise ValueError(f"a bool is not an index (torch reads it as a new axis); use an int or "
                         f"a boolean mask tensor, got {item!r} for shape {shape}")
    if isinstance(item, (list, tuple)):
        item = torch.as_tensor(item)
    if isinstance(item, (Tensor, np.ndarray)) and item.dtype in (torch.bool, np.bool_):
        return item.ndim
    return 1


def _one_axis(item: Any, what: str, shape: tuple) -> Union[slice, Tensor]:
    """A row or column index: an int becomes a size-1 slice (the dim stays); a slice, a 1D list
    or tensor of ints, or a 1D boolean mask is kept."""
    if isinstance(item, slice):
        return item
    if isinstance(item, (list, tuple, np.ndarray)):
        item = torch.as_tensor(item)
    if isinstance(item, Tensor):
        if item.ndim == 0 and not item.dtype.is_floating_point and not item.dtype.is_complex:
            item = int(item.item())
        elif item.ndim == 1 and (item.dtype == torch.bool or not (
                item.dtype.is_floating_point or item.dtype.is_complex)):
            return item
        else:
            raise ValueError(f"a {what} index must be an int, a slice, or a 1D index of ints or "
                             f"bools, got a {item.dtype} tensor of shape {tuple(item.shape)} "
                             f"for shape {shape}")
    try:
        i = operator.index(item)
    except TypeError:
        raise ValueError(f"a {what} index must be an int, a slice, or a 1D index of ints or "
                         f"bools, got {item!r} for shape {shape}") from None
    return slice(i, i + 1 if i != -1 else None)


def composition_score(W_A: FactoredMatrix, W_B: FactoredMatrix,
                      broadcast_dims: bool = False) -> Float[Tensor, "..."]:
    """‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F), the transformer-circuits paper's composition score.
    In the row-vector convention x @ W_A @ W_B, W_A is the earlier head's OV and W_B the later
    head's QK (Q-composition), QK.T (K-composition) or OV (V-composition); W_A.rdim must equal
    W_B.ldim. Leading dims broadcast elementwise; with
    broadcast_dims=True they are instead crossed, giving shape W_A's leading + W_B's leading
    (TransformerLens's `composition_scores` behaviour). AB is never formed."""
    if W_A.rdim != W_B.ldim:
        raise ValueError(f"W_A @ W_B needs W_A.rdim == W_B.ldim, got W_A: {tuple(W_A.shape)}, "
                         f"W_B: {tuple(W_B.shape)}")
    if broadcast_dims:
        n_a, n_b = W_A.ndim - 2, W_B.ndim - 2
        for _ in range(n_b):
            W_A = W_A.unsqueeze(n_a)
        for _ in range(n_a):
            W_B = W_B.unsqueeze(0)
    return (W_A @ W_B).norm() / (W_A.norm() * W_B.norm())
