"""Measuring SAEs: encode, explained variance, L0, dead and dense features, dictionary agreement (MMCS)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sae_lens import SAE


@dataclass(frozen=True)
class SAEMetrics:
    """Reconstruction quality of an SAE on activations it was not trained on."""

    explained_variance: float
    """1 - SSE / total variance (per dimension, summed)."""
    mse: float
    """Mean squared error per element."""
    l0: float
    """Mean number of active features per token."""
    dead_fraction: float
    """Fraction of features that never fire on the evaluation activations."""
    dense_fraction: float = 0.0
    """Fraction of features that fire on more than 10% of tokens."""


@torch.no_grad()
def encode(sae: SAE, acts: np.ndarray, batch_size: int = 4096) -> sp.csr_matrix:
    """SAE feature activations of ``acts`` as a sparse [n, d_sae] matrix."""
    device = next(sae.parameters()).device
    blocks = []
    for start in range(0, len(acts), batch_size):
        x = torch.from_numpy(acts[start : start + batch_size]).to(device, torch.float32)
        blocks.append(sp.csr_matrix(sae.encode(x).cpu().numpy()))
    return sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, sae.cfg.d_sae))


def zero_input_features(sae: SAE) -> np.ndarray:
    """Each feature's activation on a zero input: a dictionary of the change's feature values on no change
    (nonzero where its biases make a feature fire, as TopK's do)."""
    return encode(sae, np.zeros((1, sae.cfg.d_in), np.float32)).toarray()[0]


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: np.ndarray, batch_size: int = 4096) -> SAEMetrics:
    """Explained variance, MSE, L0 and dead fraction of ``sae`` on ``acts``."""
    device = next(sae.parameters()).device
    x_all = torch.from_numpy(np.asarray(acts, dtype=np.float32))
    mean = x_all.mean(0)
    sse = tot = 0.0
    l0 = 0.0
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(acts), batch_size):
        x = x_all[start : start + batch_size].to(device)
        f = sae.encode(x)
        recon = sae.decode(f)
        sse += float(((recon - x) ** 2).sum())
        tot += float(((x - mean.to(device)) ** 2).sum())
        active = f > 0
        l0 += float(active.sum())
        fires += active.sum(0).double().cpu()
    n = len(acts)
    return SAEMetrics(
        explained_variance=1.0 - sse / tot if tot > 0 else float("nan"),
        mse=sse / (n * acts.shape[1]),
        l0=l0 / n,
        dead_fraction=float((fires == 0).double().mean()),
        dense_fraction=float((fires / max(n, 1) > 0.1).double().mean()),
    )


def decoder_directions(sae: SAE) -> np.ndarray:
    """Unit-norm decoder directions of an SAE, one row per feature: [d_sae, d_in]."""
    w = sae.W_dec.detach().float().cpu().numpy()
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def mmcs(a: np.ndarray, b: np.ndarray, *, one_to_one: bool = False) -> float:
    """Mean max cosine similarity of the rows of ``a`` against those of ``b``.

    With ``one_to_one`` each row of ``a`` is matched to a distinct row of ``b`` by the Hungarian
    algorithm (SciPy's ``linear_sum_assignment``) maximising total similarity; otherwise each row
    takes its best match (the paper's per-feature max). ``a`` should be the smaller dictionary.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries live in different spaces: d_in {a.shape[1]} vs {b.shape[1]}")
    sim = cosine_matrix(a, b)
    if not one_to_one:
        return float(sim.max(axis=1).mean())
    if a.shape[0] > b.shape[0]:
        raise ValueError("one-to-one matching needs the first dictionary to be the smaller one")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-sim)
    return float(sim[rows, cols].mean())


def unmatched_features(a: np.ndarray, b: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Indices of rows of ``a`` whose best cosine match in ``b`` is below ``threshold``.

    With ``a`` a tuned model's dictionary and ``b`` the base model's, these are the features that
    are new or changed in the tuned model.
    """
    return np.flatnonzero(cosine_matrix(a, b).max(axis=1) < threshold)
