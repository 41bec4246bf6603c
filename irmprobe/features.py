"""Sparse autoencoders via SAELens: train on captured activations, evaluate, encode.

SAEs are trained with SAELens's own ``SAETrainer`` on an iterator over the captured activations
(the store is read, never recomputed), saved in SAELens format with provenance metadata, and
loaded back with ``SAE.load_from_disk``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from irmprobe.cache import atomic_dir, write_json
from irmprobe.config import SAEConfig

log = logging.getLogger(__name__)


def activation_batches(acts: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless iterator of shuffled batches over ``acts`` (a new permutation each pass)."""
    if len(acts) < batch_size:
        raise ValueError(
            f"only {len(acts)} activations for an SAE batch of {batch_size}: capture more text "
            "or lower sae.batch_size"
        )
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(acts))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(acts[order[start : start + batch_size]])


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


def train_sae(
    acts: np.ndarray,
    config: SAEConfig,
    *,
    seed: int,
    metadata: dict,
    device: str = "cpu",
) -> StandardTrainingSAE:
    """Train a standard (ReLU + L1) SAE with SAELens on ``acts`` [n, d_in]."""
    torch.manual_seed(seed)
    d_in = int(acts.shape[1])
    sae_cfg = StandardTrainingSAEConfig(
        d_in=d_in,
        d_sae=config.expansion * d_in,
        l1_coefficient=config.l1_coefficient,
        # Scale inputs to mean norm sqrt(d_in) so one L1 coefficient suits every layer;
        # SAELens folds the scale back into the weights when training ends.
        normalize_activations="expected_average_only_in",
        device=device,
    )
    sae = StandardTrainingSAE(sae_cfg)
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    trainer_cfg = SAETrainerConfig(
        total_training_samples=config.training_samples,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr,
        device=device,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // config.batch_size)),
        dead_feature_window=max(50, config.training_samples // config.batch_size // 4),
        feature_sampling_window=max(50, config.training_samples // config.batch_size // 2),
    )
    batches = (b.to(device) for b in activation_batches(acts.astype(np.float32), config.batch_size, seed))
    return SAETrainer(trainer_cfg, sae, data_provider=batches).fit()


@torch.no_grad()
def encode(sae: SAE, acts: np.ndarray, batch_size: int = 4096) -> sp.csr_matrix:
    """SAE feature activations of ``acts`` as a sparse [n, d_sae] matrix."""
    device = next(sae.parameters()).device
    blocks = []
    for start in range(0, len(acts), batch_size):
        x = torch.from_numpy(acts[start : start + batch_size]).to(device, torch.float32)
        blocks.append(sp.csr_matrix(sae.encode(x).cpu().numpy()))
    return sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, sae.cfg.d_sae))


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: np.ndarray, batch_size: int = 4096) -> SAEMetrics:
    """Explained variance, MSE, L0 and dead fraction of ``sae`` on ``acts``."""
    device = next(sae.parameters()).device
    x_all = torch.from_numpy(acts.astype(np.float32))
    mean = x_all.mean(0)
    sse = tot = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), batch_size):
        x = x_all[start : start + batch_size].to(device)
        f = sae.encode(x)
        recon = sae.decode(f)
        sse += float(((recon - x) ** 2).sum())
        tot += float(((x - mean.to(device)) ** 2).sum())
        active = f > 0
        l0 += float(active.sum())
        fired |= active.any(0).cpu()
    n = len(acts)
    return SAEMetrics(
        explained_variance=1.0 - sse / tot if tot > 0 else float("nan"),
        mse=sse / (n * acts.shape[1]),
        l0=l0 / n,
        dead_fraction=float((~fired).float().mean()),
    )


def save_sae(sae: SAE, directory: Path, metrics: SAEMetrics) -> None:
    """Save in SAELens format (``SAE.load_from_disk`` reads it) plus our metrics."""
    with atomic_dir(Path(directory)) as tmp:
        sae.save_model(tmp)
        write_json(tmp / "irmprobe_metrics.json", metrics)


def load_sae(directory: Path, device: str = "cpu") -> SAE:
    return SAE.load_from_disk(str(directory), device=device)
