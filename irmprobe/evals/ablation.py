"""Causal checks: ablate SAE features inside the tuned model and measure the reward it then earns.

The SAE is spliced in at its hook with the reconstruction error kept:

    x' = x - sum_{i in S} (f_i(x) - v_i) d_i

where ``f_i`` is feature ``i``'s activation, ``d_i`` its decoder direction and ``v_i`` the value it
is ablated to (0 for zero-ablation, its mean activation for mean-ablation). With ``S`` empty,
``x' = x`` exactly: ablating nothing leaves the model unchanged. The reconstruction-only control
replaces ``x`` by the SAE's reconstruction (the error dropped), which shows what the SAE
approximation alone costs. Steering adds ``alpha * d_i`` instead.

Generation runs on a plain Hugging Face model with PyTorch forward hooks on the MLP modules
(whose output is TransformerLens's ``hook_mlp_out``). It must be a model no TransformerBridge
has wrapped: a bridge rewires the modules in place, and Hugging Face ``generate`` with its KV
cache then samples differently (measured: the default organism's reward fell from +0.63 to
+0.13 on the same prompts and seed), so :func:`irmprobe.evals.validate.ablate` loads a fresh copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import bootstrap

from irmprobe.capture import hook_module, is_bridged, sample_continuations
from irmprobe.patching import output_hooks


@dataclass(frozen=True)
class FeatureSet:
    """Features to ablate: ``{layer: indices}`` with a name, e.g. the IRM's top-k."""

    name: str
    features: dict[int, tuple[int, ...]]
    mode: str = "zero"
    """``zero``, ``mean`` (to ``means``), ``reconstruction`` (error dropped, nothing ablated) or ``steer``."""
    means: dict[int, np.ndarray] | None = None
    """For ``mean``: each layer's mean activation per feature."""
    alpha: float = 0.0
    """For ``steer``: how much of each feature's decoder direction is added at every position."""

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean", "reconstruction", "steer"):
            raise ValueError(f"mode must be zero, mean, reconstruction or steer, got {self.mode!r}")
        if self.mode == "mean" and self.means is None:
            raise ValueError("mode=mean needs the features' mean activations (means)")

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.features.values())


def splice_hook(sae, indices, mode: str = "zero", means: np.ndarray | None = None, alpha: float = 0.0):
    """A TransformerLens hook function that ablates ``indices`` of ``sae`` keeping the error term."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    W_dec = sae.W_dec.detach()

    def hook(act, hook):
        x = act.float()
        if mode == "steer":
            return (x + alpha * W_dec[idx].sum(0).to(x.device)).to(act.dtype)
        if mode == "reconstruction":
            return sae.decode(sae.encode(x)).to(act.dtype)
        f = sae.encode(x)[..., idx]
        target = torch.zeros_like(f) if mode == "zero" else torch.as_tensor(means, dtype=f.dtype, device=f.device)[idx]
        return (x - (f - target) @ W_dec[idx].to(x.device)).to(act.dtype)

    return hook


def mlp_module(model, layer: int):
    """The MLP module of block ``layer`` (``model.layers.9.mlp``, ``gpt_neox.layers.9.mlp``, ``h.9.mlp``)."""
    return hook_module(model, f"blocks.{layer}.hook_mlp_out")


@contextmanager
def ablated(model, saes: dict[int, object], feature_set: FeatureSet, rows: slice | None = None):
    """Within the block, ``model`` (a plain Hugging Face model) runs with ``feature_set`` ablated.

    Each layer's SAE is spliced at the output of that block's MLP (``hook_mlp_out``). With ``rows``,
    only those batch rows are changed (several conditions share one batch, see
    :func:`irmprobe.patching.generate_conditions`).
    """
    layers = sorted(set(feature_set.features) | (set(saes) if feature_set.mode == "reconstruction" else set()))
    splices = {("mlp_out", layer): splice_hook(saes[layer], feature_set.features.get(layer, ()), feature_set.mode,
                                               feature_set.means.get(layer) if feature_set.means else None,
                                               feature_set.alpha)
               for layer in layers}

    def apply(point, act):
        if rows is None:
            return splices[point](act, None)
        new = act.clone()
        new[rows] = splices[point](act[rows], None)
        return new

    with output_hooks(model, list(splices), apply):
        yield


def _mean_ci(values: np.ndarray) -> dict:
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": se, "ci": [float(values.mean() - 1.96 * se),
                                                          float(values.mean() + 1.96 * se)]}


def ablation_table(model, tokenizer, saes: dict[int, object], feature_sets: list[FeatureSet], rm,
                   prompts: list[str], *, samples_per_prompt: int = 2, max_new_tokens: int = 24, batch_size: int = 32,
                   seed: int = 0) -> list[dict]:
    """Reward of the tuned model's continuations with each feature set ablated, against no ablation.

    ``model`` must be a plain Hugging Face model (see the module docstring); a bridged one raises.

    Every condition samples with the same seed, so conditions differ only by the ablation and the
    reward change is paired by (prompt, sample). Returns one row per condition (the first is
    ``none``): mean reward with a 95% CI, and the paired change from ``none`` with its CI.
    """
    if is_bridged(model):
        raise ValueError("ablation_table needs a model no TransformerBridge has wrapped (its generate() samples "
                         "differently): load a fresh copy with irmprobe.pairs.load_model")

    def generate():
        _, _, _, texts = sample_continuations(model, tokenizer, prompts, n_per_prompt=samples_per_prompt,
                                              max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        return rm.score(texts), texts

    clean, clean_texts = generate()
    rows = [{"set": "none", "mode": "-", "n_features": 0, "reward": _mean_ci(clean),
             "change": None, "example": clean_texts[0]}]
    for fs in feature_sets:
        with ablated(model, saes, fs):
            rewards, texts = generate()
        rows.append({"set": fs.name, "mode": fs.mode, "n_features": fs.size, "reward": _mean_ci(rewards),
                     "change": _mean_ci(rewards - clean), "example": texts[0]})
    return rows


@dataclass(frozen=True)
class GainShare:
    """Share of the reward gain (tuned minus base) that a condition removes, with a bootstrap CI."""

    share: float
    """(tuned - condition) / (tuned - base), from the mean rewards."""
    ci: tuple[float, float]
    """Confidence interval of ``share``, resampling prompts with their samples paired."""
    gain: float
    """Mean reward of the tuned model minus the base's."""
    removed: float
    """Mean reward of the tuned model minus the condition's."""
    n_prompts: int
    """Number of prompts resampled."""


def reward_gain_share(base, tuned, ablated, prompt_index, *, confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> GainShare:
    """Share of the reward gain an ablation (or patch) removes, with a paired CI by bootstrap over prompts.

    Args:
        base, tuned, ablated: Rewards of the same (prompt, sample) slots under each condition,
            e.g. from paired sampling with one seed.
        prompt_index: The prompt of each slot; prompts are the resampling unit, so samples of one
            prompt stay together and the three conditions stay paired. The interval is the
            percentile bootstrap, which stays defined for a ratio whose resamples can be extreme.

    Raises:
        ValueError: arrays of different lengths, fewer than 2 prompts, or no reward gain.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (base, tuned, ablated, prompt_index)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"base, tuned, ablated and prompt_index must be 1-d of one length, got "
                         f"{[a.shape for a in arrays]}")
    prompts, inverse = np.unique(arrays[3], return_inverse=True)
    if len(prompts) < 2:
        raise ValueError("a bootstrap over prompts needs at least 2 prompts")
    # Per-prompt reward sums: a resample's share is a ratio of sums (the sample counts cancel).
    sums = [np.bincount(inverse, weights=a) for a in arrays[:3]]
    gain = float(arrays[1].mean() - arrays[0].mean())
    if gain == 0:
        raise ValueError("the tuned model's mean reward equals the base's: there is no gain to remove")

    def stat(b, t, a, axis=-1):
        return (t.sum(axis) - a.sum(axis)) / (t.sum(axis) - b.sum(axis))

    res = bootstrap(tuple(sums), stat, paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed))  # rng= needs scipy >= 1.15
    removed = float(arrays[1].mean() - arrays[2].mean())
    return GainShare(removed / gain, (float(res.confidence_interval.low), float(res.confidence_interval.high)),
                     gain, removed, len(prompts))
