"""Estimators that solve on a torch device: ridge regression by normal equations or conjugate gradient.

:class:`TorchRidge` is a drop-in for ``sklearn.linear_model.Ridge(fit_intercept=True)`` whose solve runs in
float64 on any torch device (a GPU when one is present). It gives the same coefficients and intercept as
scikit-learn's exact solvers: the columns and the target are centred (weighted by ``sample_weight``), the
centred system ``(Xc^T W Xc + alpha I) w = Xc^T W yc`` is solved, and ``intercept = y_mean - x_mean @ w``.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

_SOLVERS = ("auto", "cholesky", "cg")


_CHUNK_BYTES = 1 << 28
"""Rows are moved to the device in dense float64 blocks of at most this many bytes."""


def _torch_csr(m: sp.csr_matrix, device) -> torch.Tensor:
    """A scipy CSR matrix as a float64 torch sparse CSR tensor on ``device``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.as_tensor(m.indptr, dtype=torch.int64), torch.as_tensor(m.indices, dtype=torch.int64),
            torch.as_tensor(m.data, dtype=torch.float64), size=m.shape, dtype=torch.float64,
            check_invariants=False).to(device)


class TorchRidge(RegressorMixin, BaseEstimator):
    """Ridge regression solved in torch float64 on ``device``; same results as scikit-learn's ``Ridge``.

    Args:
        alpha: L2 strength (>= 0), as in ``Ridge``.
        fit_intercept: centre X and y and fit an intercept, as ``Ridge(fit_intercept=True)`` does.
        device: torch device of the solve (``cpu``, ``cuda``, ``cuda:1``); inputs and results stay NumPy.
        solver: ``cholesky`` (the Gram matrix, ``n_features``^2 floats on the device), ``cg`` (conjugate
            gradient on matrix-vector products; never forms the Gram matrix, for wide X) or ``auto``
            (``cholesky`` up to ``max_gram_features`` features, else ``cg``).
        max_gram_features: ``auto`` picks ``cg`` above this many features.
        tol: ``cg`` stops when every target's residual norm is below ``tol`` times its right-hand side's.
        max_iter: ``cg`` iteration cap (None: ``10 * n_features``); hitting it warns (ConvergenceWarning).

    Attributes:
        coef_: ``[n_features]`` (or ``[n_targets, n_features]`` for a 2-D y).
        intercept_: float (or ``[n_targets]``).
        n_features_in_: number of columns seen in ``fit``.
        n_iter_: ``cg`` iterations (1 for ``cholesky``, a direct solve).
        solver_: the solver used.
    """

    def __init__(self, alpha: float = 1.0, *, fit_intercept: bool = True, device: str = "cpu",
                 solver: str = "auto", max_gram_features: int = 16384, tol: float = 1e-10,
                 max_iter: int | None = None):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.device = device
        self.solver = solver
        self.max_gram_features = max_gram_features
        self.tol = tol
        self.max_iter = max_iter

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y, sample_weight=None):
        """Fit on X (dense or scipy sparse) and y (``[n]`` or ``[n, n_targets]``); returns self."""
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        if not np.isscalar(self.alpha) or not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        X, y = validate_data(self, X, y, accept_sparse=("csr", "csc", "coo"), dtype=np.float64,
                             y_numeric=True, multi_output=True)
        if sp.issparse(X):
            X = X.tocsr()
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64)
        device = torch.device(self.device)
        n, d = X.shape
        Y = y.reshape(n, -1).astype(np.float64)
        w = torch.as_tensor(sw, device=device)
        Yt = torch.as_tensor(Y, device=device)
        if self.fit_intercept:
            x_mean = self._weighted_column_sum(X, w, device) / w.sum()
            y_mean = (w[:, None] * Yt).sum(0) / w.sum()
        else:
            x_mean = torch.zeros(d, dtype=torch.float64, device=device)
            y_mean = torch.zeros(Y.shape[1], dtype=torch.float64, device=device)
        Yc = Yt - y_mean
        solver = self.solver if self.solver != "auto" else ("cholesky" if d <= self.max_gram_features else "cg")
        if solver == "cholesky":
            coef, self.n_iter_ = self._solve_normal(X, w, Yc, x_mean, device), 1
        else:
            coef, self.n_iter_ = self._solve_cg(X, w, Yc, x_mean, device)
        intercept = y_mean - x_mean @ coef if self.fit_intercept else torch.zeros_like(y_mean)
        coef, intercept = coef.T.cpu().numpy(), intercept.cpu().numpy()  # coef: [n_targets, d]
        if y.ndim == 1:
            self.coef_, self.intercept_ = coef[0], float(intercept[0])
        else:
            self.coef_, self.intercept_ = coef, intercept
        self.solver_ = solver
        return self

    def predict(self, X):
        """``X @ coef_.T + intercept_`` (computed with NumPy/SciPy on the host)."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, accept_sparse=("csr", "csc", "coo"), dtype=np.float64, reset=False)
        out = X @ np.asarray(self.coef_).T
        return np.asarray(out) + self.intercept_

    # -- the solves ----------------------------------------------------------------------------------

    @staticmethod
    def _row_blocks(X, device):
        """Consecutive ``(lo, hi, dense float64 rows on device)`` blocks of X."""
        n, d = X.shape
        step = max(1, _CHUNK_BYTES // (8 * max(1, d)))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            part = X[lo:hi]
            if sp.issparse(part):
                block = _torch_csr(part, device).to_dense()  # only the non-zeros travel to the device
            else:
                block = torch.as_tensor(np.require(part, requirements=("C", "W")), device=device)
            yield lo, hi, block

    def _weighted_column_sum(self, X, w, device) -> torch.Tensor:
        total = torch.zeros(X.shape[1], dtype=torch.float64, device=device)
        for lo, hi, block in self._row_blocks(X, device):
            total += w[lo:hi] @ block
        return total

    def _solve_normal(self, X, w, Yc, x_mean, device) -> torch.Tensor:
        """Cholesky of the centred Gram matrix (an eigendecomposition when it is singular, e.g. alpha=0)."""
        d = X.shape[1]
        gram = torch.zeros((d, d), dtype=torch.float64, device=device)
        rhs = torch.zeros((d, Yc.shape[1]), dtype=torch.float64, device=device)
        for lo, hi, block in self._row_blocks(X, device):
            a = (block - x_mean) * w[lo:hi, None].sqrt()
            gram += a.T @ a
            rhs += a.T @ (Yc[lo:hi] * w[lo:hi, None].sqrt())
        gram.diagonal().add_(float(self.alpha))
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
        # Not positive definite: the minimum-norm least-squares solution, as scikit-learn falls back to.
        values, vectors = torch.linalg.eigh(gram)
        keep = values > values.abs().max() * d * torch.finfo(torch.float64).eps
        inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
        return vectors @ (inverse[:, None] * (vectors.T @ rhs))

    def _solve_cg(self, X, w, Yc, x_mean, device) -> tuple[torch.Tensor, int]:
        """Conjugate gradient on ``(Xc^T W Xc + alpha I) v``, each target column on its own, X kept sparse."""
        if sp.issparse(X):
            Xt, XTt = _torch_csr(X, device), _torch_csr(X.T.tocsr(), device)
        else:
            Xt = torch.as_tensor(np.require(X, requirements=("C", "W")), device=device)
            XTt = Xt.T

        def operator(v):  # v: [d, k]
            u = Xt @ v - (x_mean @ v)[None, :]  # Xc v
            u = w[:, None] * u
            return (XTt @ u - x_mean[:, None] * u.sum(0)[None, :]) + float(self.alpha) * v

        b = XTt @ (w[:, None] * Yc) - x_mean[:, None] * (w[:, None] * Yc).sum(0)[None, :]
        d = X.shape[1]
        max_iter = self.max_iter if self.max_iter is not None else 10 * d
        coef = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(0)
        goal = (self.tol * b.norm(dim=0)) ** 2
        it = 0
        while it < max_iter and bool((rs > goal).any()):
            ap = operator(p)
            denom = (p * ap).sum(0)
            step = torch.where(denom > 0, rs / torch.where(denom > 0, denom, torch.ones_like(denom)),
                               torch.zeros_like(rs))
            coef += step * p
            r -= step * ap
            new = (r * r).sum(0)
            p = r + (new / torch.where(rs > 0, rs, torch.ones_like(rs))) * p
            rs = new
            it += 1
        if bool((rs > goal).any()):
            warnings.warn(f"TorchRidge: conjugate gradient stopped after {it} iterations short of tol={self.tol}; "
                          "raise max_iter or alpha, or use solver='cholesky'", ConvergenceWarning, stacklevel=3)
        return coef, it


__all__ = ["TorchRidge"]
