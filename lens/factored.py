"""Low-rank matrices kept as a product A @ B (e.g. QK = W_Q W_Kᵀ, OV = W_V W_O) so that SVD,
eigenvalues, norms and composition scores cost O(d_model · d_head²) rather than O(d_model³).
API names follow TransformerLens's FactoredMatrix, so scripts written against it port directly."""

import operator
import warnings
from typing import Any, Optional, Union

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
        dim is the smallest available (mdim, other's mdim, or rdim); a vector gives a tensor."""
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
        if self.mdim <= self.rdim:
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
        if self.mdim <= self.ldim:
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
        have orthonormal columns and S is descending. Costs two thin QRs and an r-sized SVD."""
        if self._svd is None:
            Qa, M, Qb = self._qr_core()
            Um, S, Vhm = torch.linalg.svd(M, full_matrices=False)
            self._svd = (Qa @ Um, S, Qb @ Vhm.mT)
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
        """Index the product's dims: leading dims take any torch index (int, slice, integer
        tensor or list); the row and column dims take an int or slice, applied to A's rows and
        B's columns. Ints there keep a size-1 dim so the result is still a matrix. One `...`
        is allowed; `None` and multi-dim boolean masks are not."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_ellipsis = sum(item is Ellipsis for item in idx)
        if n_ellipsis > 1 or any(item is None for item in idx):
            raise ValueError(f"unsupported index {idx} for shape {tuple(self.shape)}")
        if any(isinstance(item, Tensor) and item.dtype == torch.bool and item.ndim != 1
               for item in idx):
            raise ValueError(f"multi-dim boolean masks are unsupported, shape {tuple(self.shape)}")
        if n_ellipsis:
            at = next(i for i, item in enumerate(idx) if item is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(idx) + 1)
            idx = idx[:at] + fill + idx[at + 1:]
        if len(idx) > self.ndim:
            raise ValueError(f"too many indices ({len(idx)}) for shape {tuple(self.shape)}")
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        lead, rows, cols = idx[:-2], _as_slice(idx[-2]), _as_slice(idx[-1])
        return FactoredMatrix(self._A[lead + (rows, slice(None))],
                              self._B[lead + (slice(None), cols)])

    def to(self, *args: Any, **kwargs: Any) -> "FactoredMatrix":
        """Move/cast both factors, with the arguments of `Tensor.to`."""
        return FactoredMatrix(self._A.to(*args, **kwargs), self._B.to(*args, **kwargs))


def _as_slice(item: Any) -> slice:
    if isinstance(item, slice):
        return item
    try:
        i = operator.index(item)
    except TypeError:
        raise ValueError(f"row/column index must be an int or slice, got {item!r}") from None
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
