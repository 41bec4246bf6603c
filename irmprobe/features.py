"""Sparse autoencoders via SAELens: train on captured activations, evaluate, encode.

SAEs are trained with SAELens's own ``SAETrainer`` on an iterator over the captured activations
(the store is read, never recomputed), saved in SAELens format with provenance metadata, and
loaded back with ``SAE.load_from_disk``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
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
    table = torch.from_numpy(np.asarray(acts, dtype=np.float32))  # no copy when already float32
    while True:
        order = torch.from_numpy(rng.permutation(len(acts)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield table.index_select(0, order[start : start + batch_size])


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
        from irmprobe.gpu import fast_bfloat16

        return fast_bfloat16(device)
    return config.autocast == "on"


def train_sae(
    acts: np.ndarray,
    config: SAEConfig,
    *,
    seed: int,
    metadata: dict,
    device: str = "cpu",
):
    """Train an SAE of ``config.architecture`` with SAELens on ``acts`` [n, d_in].

    With ``config.early_stop_every`` > 0, 5% of the rows (at most 4096) are held out of training
    and training stops once their explained variance plateaus; the SAE's metadata then records
    ``irmprobe_stopped_at`` (samples seen; None: the full budget ran) and ``irmprobe_curve``.
    """
    torch.manual_seed(seed)
    held_out = None
    if config.early_stop_every:
        n_val = min(4096, len(acts) // 20)
        pick = np.zeros(len(acts), dtype=bool)
        pick[np.random.default_rng(seed).choice(len(acts), n_val, replace=False)] = True
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
        return SAETrainer(trainer_cfg, sae, data_provider=batches).fit()
    trainer = _EarlyStoppingTrainer(trainer_cfg, sae, batches, held_out=held_out, every=config.early_stop_every,
                                    tolerance=config.early_stop_tolerance)
    trained = trainer.fit()
    trained.cfg.metadata["irmprobe_stopped_at"] = trainer.stopped_at
    trained.cfg.metadata["irmprobe_curve"] = trainer.curve
    return trained


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


def save_sae(sae: SAE, directory: Path, metrics: SAEMetrics | None = None) -> None:
    """Save in SAELens format (``SAE.load_from_disk`` reads it), with our metrics if given."""
    with atomic_dir(Path(directory)) as tmp:
        # Training SAEs save their inference form (BatchTopK becomes JumpReLU, for example), which
        # is what SAE.load_from_disk reads.
        save = getattr(sae, "save_inference_model", None) or sae.save_model
        save(tmp)
        if metrics is not None:
            write_json(tmp / "irmprobe_metrics.json", metrics)


def load_sae(directory: Path, device: str = "cpu") -> SAE:
    return SAE.load_from_disk(str(directory), device=device)


# ---------------------------------------------------------------------------------------------
# Dictionary matching


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


# ---------------------------------------------------------------------------------------------
# Splicing an SAE into the model


@torch.no_grad()
def splice_metrics(bridge, sae, hook_name: str, token_ids, *, batch_size: int = 16) -> dict:
    """Next-token loss with the SAE's reconstruction spliced in at ``hook_name``.

    Returns the cross-entropy of the clean model, with the hook's output replaced by the SAE's
    reconstruction, and with it zeroed; the fraction of the zero-ablation loss increase that the
    SAE recovers, ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``; and the mean per-token
    KL(clean || spliced). Sequences are right-padded; only real positions count.
    """
    device = next(bridge.parameters()).device
    pad = bridge.tokenizer.pad_token_id if bridge.tokenizer is not None else 0
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0

    def replace(act, hook):
        return sae.decode(sae.encode(act.float())).to(act.dtype)

    def zero(act, hook):
        return torch.zeros_like(act)

    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        width = max(len(t) for t in chunk)
        tokens = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
        for row, seq in enumerate(chunk):
            tokens[row, : len(seq)] = torch.tensor(seq)
        real = (torch.arange(1, width)[None, :] < torch.tensor([len(t) for t in chunk])[:, None]).to(device)
        tokens = tokens.to(device)
        target = tokens[:, 1:]
        logps = {}
        for name, hooks in (("clean", []), ("spliced", [(hook_name, replace)]), ("zero", [(hook_name, zero)])):
            logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
            logps[name] = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logps[name].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            totals[name] += float(nll[real].sum())
        kl = (logps["clean"].exp() * (logps["clean"] - logps["spliced"])).sum(-1)
        totals["kl"] += float(kl[real].sum())
        count += int(real.sum())
    ce = {k: totals[k] / max(count, 1) for k in ("clean", "spliced", "zero")}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap > 0 else float("nan"),
        "kl_spliced": totals["kl"] / max(count, 1), "tokens": count,
    }


def load_pretrained_sae(source: str, *, hook_name: str, d_model: int, sae_id: str | None = None,
                        device: str = "cpu") -> SAE:
    """A published SAELens SAE, by release and id (needs the hub) or from a directory on disk.

    Raises:
        ValueError: it cannot be loaded, or it was trained on another hook or width than the
            model it is meant for (so its features would mean nothing there).
    """
    try:
        if sae_id is None:
            sae = SAE.load_from_disk(source, device=device)
        else:
            sae = SAE.from_pretrained(source, sae_id, device=device)
    except (OSError, FileNotFoundError, ValueError, KeyError) as exc:
        where = f"release {source!r}, id {sae_id!r}" if sae_id else f"directory {source!r}"
        raise ValueError(f"could not load the SAE from {where}: {exc}. Offline, download it where the hub "
                         "is reachable and pass its directory") from exc
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE {source} reads {sae.cfg.d_in}-dimensional inputs but the model's d_model is {d_model}")
    trained_on = sae.cfg.metadata.hook_name
    if trained_on is not None and trained_on != hook_name:
        raise ValueError(f"SAE {source} was trained on {trained_on!r}, not {hook_name!r}; "
                         "pick the SAE for this hook or capture that hook instead")
    return sae


def sweep(acts: np.ndarray, base: SAEConfig, *, values, field: str | None = None, seed: int = 0,
          eval_fraction: float = 0.1, device: str = "cpu") -> list[dict]:
    """Train one SAE per value of the sparsity setting and report each one's metrics.

    ``field`` defaults to ``k`` for TopK/BatchTopK and ``l1_coefficient`` otherwise. The rows
    trace the sparsity/reconstruction frontier (L0 against explained variance).
    """
    from dataclasses import asdict, replace

    field = field or ("k" if base.architecture in ("topk", "batchtopk") else "l1_coefficient")
    held = np.random.default_rng(seed).random(len(acts)) < eval_fraction
    rows = []
    for value in values:
        cfg = replace(base, **{field: value})
        sae = train_sae(acts[~held], cfg, seed=seed, metadata={}, device=device)
        rows.append({field: value, **asdict(evaluate_sae(sae, acts[held]))})
    return rows
