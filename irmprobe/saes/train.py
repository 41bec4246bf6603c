"""Sparse autoencoders via SAELens: train on captured activations, evaluate, encode.

SAEs are trained with SAELens's own ``SAETrainer`` on an iterator over the captured activations
(the store is read, never recomputed), saved in SAELens format with provenance metadata, and
loaded back with ``SAE.load_from_disk``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from irmprobe.activations.capture import activation_batches
from irmprobe.config import SAEConfig
from irmprobe.saes.evaluate import evaluate_sae

log = logging.getLogger(__name__)


# architecture -> (training SAE class, its config class, the sparsity settings it takes)
_ARCHITECTURES = {
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, lambda c: {"l1_coefficient": c.l1_coefficient}),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, lambda c: {"k": c.k}),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, lambda c: {"k": c.k}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, lambda c: {"l0_coefficient": c.l1_coefficient}),
}


_CHECKS = 4
"""Early stopping compares held-out explained variance across this many checks."""


class _EarlyStoppingTrainer(SAETrainer):
    """SAELens's trainer, stopped once explained variance on held-out activations plateaus.

    ``SAETrainer.fit`` has no stopping rule. ``step`` is the seam SAELens keeps public for external
    coordinators, so the check runs there: on a plateau it lowers the sample budget to what has been
    seen, ``fit``'s loop ends after this step, and ``fit`` folds the activation scale into the
    weights as usual. ``curve`` keeps every check; ``stopped_at`` the samples seen when it stopped.
    """

    def __init__(self, cfg, sae, data_provider, *, held_out: torch.Tensor, every: int, tolerance: float):
        super().__init__(cfg, sae, data_provider=data_provider)
        self.held_out, self.every, self.tolerance = held_out, every, tolerance
        self.curve: list[dict] = []
        self.stopped_at: int | None = None

    @torch.no_grad()
    def _measure(self) -> dict:
        x = self.activation_scaler(self.held_out.to(self.sae.device))  # the scale the SAE trains at
        f = self.sae.encode(x)
        resid = ((self.sae.decode(f) - x) ** 2).sum()
        total = ((x - x.mean(0)) ** 2).sum()
        return {"samples": self.n_training_samples, "explained_variance": float(1 - resid / total),
                "l0": float((f > 0).float().sum(-1).mean())}

    def step(self, batch):
        out = super().step(batch)
        if (self.n_training_steps + 1) % self.every == 0:
            self.curve.append(self._measure())
            evs = [c["explained_variance"] for c in self.curve]
            if len(evs) > _CHECKS and evs[-1] - evs[-1 - _CHECKS] < self.tolerance:
                self.stopped_at = self.n_training_samples
                self.cfg = replace(self.cfg, total_training_samples=self.n_training_samples)
        return out


def uses_autocast(config: SAEConfig, device: str) -> bool:
    """Whether SAE training runs in bfloat16 autocast on ``device`` (``config.autocast``; ``auto``: where it is fast)."""
    if config.autocast == "auto":
        from irmprobe.devices import fast_bfloat16

        return fast_bfloat16(device)
    return config.autocast == "on"


def evaluation_rows(units: np.ndarray, seed: int, fraction: float = 0.1) -> np.ndarray:
    """The rows every SAE is measured on and never trained on: all rows of a random tenth of the prompts.

    Rows are held out by prompt, their independent unit: a prompt's rows recur in each of its sequences,
    so a row-level split would measure an SAE on copies of rows it was trained on.
    """
    uniq = np.unique(units)
    if len(uniq) < 2:
        raise ValueError("the capture holds fewer than 2 prompts: an SAE cannot be evaluated on held-out prompts; "
                         "sample more held-out prompts (prompts.n_heldout)")
    n_eval = min(len(uniq) - 1, max(1, int(round(fraction * len(uniq)))))
    held = np.random.default_rng(seed).choice(uniq, n_eval, replace=False)
    return np.isin(units, held)


def stopping_rows(n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """The rows early stopping reads and training never sees: a mask over ``n`` rows, about 5% of them
    (at most 4096).

    With ``groups`` the rows are whole groups, taken in random order until they reach the share; a group
    larger than the share is skipped, so the held-out rows stay below twice the share, and never every
    group is taken. When every group is larger than the share, the smallest is held out alone if it holds
    at most four times the share, and otherwise no row is (the caller then trains without early
    stopping). Rows of one prompt recur in each of its sequences, so single held-out rows would have
    copies in the training rows, and the stopping rule would read a training-set fit. Raises
    ``ValueError`` when ``groups`` has fewer than 2 labels (no group can be held out) or a length other
    than ``n``.
    """
    rng = np.random.default_rng(seed)
    n_val = min(4096, n // 20)
    pick = np.zeros(n, dtype=bool)
    if groups is None:
        pick[rng.choice(n, n_val, replace=False)] = True
        return pick
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for {n} activation rows: pass one label per row")
    labels, inverse = np.unique(groups, return_inverse=True)
    if len(labels) < 2:
        raise ValueError("the SAE's training rows come from fewer than 2 prompts: early stopping cannot hold out a "
                         "whole prompt; capture more prompts or turn it off (sae.early_stop_every: 0)")
    counts = np.bincount(inverse)
    target = max(1, n_val)
    taken, total = [], 0
    for g in rng.permutation(len(labels)):
        if total >= target or len(taken) == len(labels) - 1:
            break
        if counts[g] <= target:  # a group larger than the share alone is never held out
            taken.append(g)
            total += counts[g]
    if not taken and counts.min() <= 4 * target:  # every group is larger than the share: the smallest, if small
        taken = [int(np.argmin(counts))]
    return np.isin(inverse, taken)  # empty when no group fits in four times the share


def train_sae(
    acts: np.ndarray,
    config: SAEConfig,
    *,
    seed: int,
    metadata: dict,
    device: str = "cpu",
    groups: np.ndarray | None = None,
):
    """Train an SAE of ``config.architecture`` with SAELens on ``acts`` [n, d_in].

    With ``config.early_stop_every`` > 0, about 5% of the rows (at most 4096) are held out of training
    and training stops once their explained variance plateaus (it reads explained variance only: L0 may
    still be falling when it stops). ``groups`` (one label per row, e.g. its prompt) makes the held-out
    rows whole groups (see :func:`stopping_rows`); without it they are single rows. With a single group,
    or no group small enough to fit in the share, none can be held out and early stopping is off (a
    warning). The SAE's metadata records
    ``irmprobe_stopped_at`` (samples seen; None: the full budget ran), ``irmprobe_curve``, and what the
    rule read: ``irmprobe_stopping_rows`` and ``irmprobe_stopping_groups`` (None: single rows; 0 and 0:
    early stopping was asked for but had nothing to hold out).
    """
    torch.manual_seed(seed)
    held_out = None
    pick = None
    if config.early_stop_every and (groups is None or len(np.unique(groups)) >= 2):
        pick = stopping_rows(len(acts), seed, groups)
    if config.early_stop_every and (pick is None or not pick.any()):
        # Nothing can be held out: train the full budget rather than read rows that have copies in training.
        log.warning("early stopping off for this SAE: nothing to hold out (one prompt, too few rows, or no prompt "
                    "of its training rows within 4 x the 5%% share of %d rows); it trains for the full "
                    "sae.training_samples", max(1, min(4096, len(acts) // 20)))
        pick = None
    if pick is not None:
        held_groups = None if groups is None else np.asarray(groups)[pick]
        held_out = torch.from_numpy(np.asarray(acts[pick], dtype=np.float32))
        acts = acts[~pick]
    d_in = int(acts.shape[1])
    sae_cls, cfg_cls, sparsity = _ARCHITECTURES[config.architecture]
    sae_cfg = cfg_cls(
        d_in=d_in,
        d_sae=config.expansion * d_in,
        # Scale inputs to mean norm sqrt(d_in) so one sparsity setting suits every layer;
        # SAELens folds the scale back into the weights when training ends.
        normalize_activations="expected_average_only_in",
        device=device,
        **sparsity(config),
    )
    sae = sae_cls(sae_cfg)
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    trainer_cfg = SAETrainerConfig(
        total_training_samples=config.training_samples,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr,
        device=device,
        autocast=uses_autocast(config, device),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // config.batch_size)),
        dead_feature_window=max(50, config.training_samples // config.batch_size // 4),
        feature_sampling_window=max(50, config.training_samples // config.batch_size // 2),
    )
    batches = (b.to(device) for b in activation_batches(acts, config.batch_size, seed))
    if held_out is None:
        trained = SAETrainer(trainer_cfg, sae, data_provider=batches).fit()
        if config.early_stop_every:  # asked for but impossible (one prompt): nothing was read
            trained.cfg.metadata["irmprobe_stopped_at"] = None
            trained.cfg.metadata["irmprobe_stopping_rows"] = 0
            trained.cfg.metadata["irmprobe_stopping_groups"] = 0
        return trained
    trainer = _EarlyStoppingTrainer(trainer_cfg, sae, batches, held_out=held_out, every=config.early_stop_every,
                                    tolerance=config.early_stop_tolerance)
    trained = trainer.fit()
    trained.cfg.metadata["irmprobe_stopped_at"] = trainer.stopped_at
    # What the stopping rule read: its rows and, where rows were held out by group, how many groups.
    trained.cfg.metadata["irmprobe_stopping_rows"] = int(len(held_out))
    trained.cfg.metadata["irmprobe_stopping_groups"] = None if groups is None else int(len(np.unique(held_groups)))
    trained.cfg.metadata["irmprobe_curve"] = trainer.curve
    return trained


def sweep(acts: np.ndarray, base: SAEConfig, *, values, field: str | None = None, seed: int = 0,
          eval_fraction: float = 0.1, device: str = "cpu", groups: np.ndarray | None = None) -> list[dict]:
    """Train one SAE per value of the sparsity setting and report each one's metrics.

    ``field`` defaults to ``k`` for TopK/BatchTopK and ``l1_coefficient`` otherwise. The rows
    trace the sparsity/reconstruction frontier (L0 against explained variance), measured on
    ``eval_fraction`` of the rows: of the groups (all rows of each held-out label, e.g. prompt) when
    ``groups`` is given, which early stopping also holds out by.
    """
    from dataclasses import asdict, replace

    field = field or ("k" if base.architecture in ("topk", "batchtopk") else "l1_coefficient")
    if groups is None:
        held = np.random.default_rng(seed).random(len(acts)) < eval_fraction
    else:
        groups = np.asarray(groups)
        if len(np.unique(groups)) < 2:
            raise ValueError("sweep needs rows of at least 2 groups (prompts) to measure on held-out ones")
        held = evaluation_rows(groups, seed, eval_fraction)
    rows = []
    for value in values:
        cfg = replace(base, **{field: value})
        sae = train_sae(acts[~held], cfg, seed=seed, metadata={}, device=device,
                        groups=None if groups is None else groups[~held])
        rows.append({field: value, **asdict(evaluate_sae(sae, acts[held]))})
    return rows
