"""Causal checks: ablate SAE features inside the tuned model and measure the reward it then earns.

The SAE is spliced in at its hook with the reconstruction error kept:

    x' = x - sum_{i in S} (f_i(x) - v_i) d_i

where ``f_i`` is feature ``i``'s activation, ``d_i`` its decoder direction and ``v_i`` the value it
is ablated to (0 for zero-ablation, its mean activation for mean-ablation). With ``S`` empty,
``x' = x`` exactly: ablating nothing leaves the model unchanged. The reconstruction-only control
replaces ``x`` by the SAE's reconstruction (the error dropped), which shows what the SAE
approximation alone costs. Steering adds ``alpha * d_i`` instead.

A feature of a dictionary of the change (trained on ``x_tuned - x_base``, the attribute stage's
``attribute.dictionary: change``) is read off the change, so ablating it needs the base model's
activation at the same point on the same tokens: the base runs in lockstep, and

    x' = x_tuned - sum_{i in S} (f_i(x_tuned - x_base) - f_i(0)) d_i

sets each feature to its value on a zero change: the counterfactual the attribution measured, where the set lies
at one hook point (the attribution holds every other hook point at its clean value; while sampling, later
blocks recompute from the changed stream).

Generation runs on a plain Hugging Face model with PyTorch forward hooks on the module whose output is
the captured hook point (``hook_mlp_out``: the MLP; ``hook_resid_post``: the block). It must be a model
no TransformerBridge has wrapped: a bridge rewires the modules in place, and Hugging Face ``generate`` with its KV
cache then samples differently (measured: the default organism's reward fell from +0.63 to
+0.13 on the same prompts and seed), so :func:`irmprobe.validation.ablation.ablate` loads a fresh copy.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import bootstrap

from irmprobe.activations.capture import hook_module, is_bridged
from irmprobe.activations.patching import (
    Condition,
    generate_conditions,
    generate_patched,
    join_samples,
    output_hooks,
    plain_models,
    round_order,
)
from irmprobe.activations.samples import sample_continuations
from irmprobe.analysis.verdict import null_family
from irmprobe.validation.attribution import Node
from irmprobe.validation.interpret import feature_location


@dataclass(frozen=True)
class FeatureSet:
    """Features to ablate: ``{layer: indices}`` with a name, e.g. the IRM's top-k."""

    name: str
    features: dict[int, tuple[int, ...]]
    mode: str = "zero"
    """``zero``, ``mean`` (to ``means``), ``reconstruction`` (error dropped, nothing ablated), ``steer``, or
    ``change``: features of the dictionaries of the change ``saes``, each set to its value on a zero change
    (the base then runs in lockstep)."""
    means: dict[int, np.ndarray] | None = None
    """For ``mean``: each layer's mean activation per feature."""
    alpha: float = 0.0
    """For ``steer``: how much of each feature's decoder direction is added at every position."""
    saes: dict[int, object] | None = None
    """For ``change``: layer -> the dictionary of the change whose features ``features`` are."""

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean", "reconstruction", "steer", "change"):
            raise ValueError(f"mode must be zero, mean, reconstruction, steer or change, got {self.mode!r}")
        if self.mode == "mean" and self.means is None:
            raise ValueError("mode=mean needs the features' mean activations (means)")
        if self.mode == "change" and (self.saes is None or not set(self.features) <= set(self.saes)):
            raise ValueError("mode=change needs the dictionary of the change of every layer it ablates (saes)")

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


def change_mix(sae, indices):
    """``mix(x_base, x_tuned)``: ``x_tuned`` with features ``indices`` of ``sae``, a dictionary of the change read
    off ``x_tuned - x_base``, set to their value on a zero change; every other feature and the error term keep
    their tuned value (for :class:`irmprobe.activations.patching.Condition`)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    W_dec = sae.W_dec.detach()[idx]
    with torch.no_grad():
        zero = sae.encode(torch.zeros((1, W_dec.shape[1]), dtype=W_dec.dtype, device=W_dec.device))[0, idx]

    def mix(x_base, x_tuned):
        x = x_tuned.float()
        f = sae.encode(x - x_base.float())[..., idx]
        return (x - (f - zero.to(x.device)) @ W_dec.to(x.device)).to(x_tuned.dtype)

    return mix


def mlp_module(model, layer: int):
    """The MLP module of block ``layer`` (``model.layers.9.mlp``, ``gpt_neox.layers.9.mlp``, ``h.9.mlp``)."""
    return hook_module(model, f"blocks.{layer}.hook_mlp_out")


@contextmanager
def ablated(model, saes: dict[int, object], feature_set: FeatureSet, rows: slice | None = None, site: str = "mlp_out"):
    """Within the block, ``model`` (a plain Hugging Face model) runs with ``feature_set`` ablated.

    Each layer's SAE is spliced where it was trained: ``site`` ``mlp_out`` (the output of that block's MLP),
    ``resid_post`` (the block's output) or ``attn_out``. With ``rows``, only those batch rows are changed
    (several conditions share one batch, see :func:`irmprobe.activations.patching.generate_conditions`).
    """
    if feature_set.mode == "change":
        raise ValueError("a set of change features is ablated with the base in lockstep (change_mix in a "
                         "patching Condition), not by ablated()")
    layers = sorted(set(feature_set.features) | (set(saes) if feature_set.mode == "reconstruction" else set()))
    splices = {(site, layer): splice_hook(saes[layer], feature_set.features.get(layer, ()), feature_set.mode,
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
                         "differently): load a fresh copy with irmprobe.models.loading.load_model")

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


_PATCH_KINDS = {"hook_mlp_out": "mlp_out", "hook_resid_post": "resid_post"}
"""Capture hook -> the hook kind the patching bound patches at the same blocks."""


READER_NOTE = "(reader side: expected null, these features read tokens already written)"


def decision_columns(decision_coef: np.ndarray | None, top_k: int) -> list[int]:
    """The decision-side IRM's ``top_k`` columns of largest positive weight (none without a decision-side fit)."""
    if decision_coef is None:
        return []
    coef = np.asarray(decision_coef)
    return [int(i) for i in np.argsort(-coef, kind="stable")[:top_k] if coef[i] > 0]


def flagged_columns(interpretation: dict, k: int) -> list[int]:
    """The judge-flagged features' columns, highest judge score first, at most ``k``."""
    flagged = [r for r in interpretation["judged"] if r["relevant"]]
    return [r["column"] for r in sorted(flagged, key=lambda r: -(r["score"] or 0.0))][:k]


def attribution_set(attribution: dict | None, top_k: int) -> tuple[str, dict[int, tuple[int, ...]]] | None:
    """The tuned model's SAE features the attribute stage names (see :func:`attributed_features`). None where its
    nodes are features of dictionaries of the change: not the tuned model's SAE features."""
    from irmprobe.validation.attribution import reads_tuned_saes

    return attributed_features(attribution, top_k) if reads_tuned_saes(attribution) else None


def attributed_features(attribution: dict | None, top_k: int) -> tuple[str, dict[int, tuple[int, ...]]] | None:
    """The features the attribute stage names (its smallest faithful set, error terms left out: an error is
    not a feature that can be ablated), else its ``top_k`` features of largest positive attribution; labelled
    ``attribution_faithful_n`` / ``attribution_top_n`` (``attribution_change_...`` for features of
    dictionaries of the change). None without an attribution or a feature."""
    if not attribution or "skipped" in attribution:
        return None
    named = attribution.get("named") or []
    prefix = "attribution_change" if attribution.get("dictionary") == "change" else "attribution"
    label = f"{prefix}_faithful_{len(named)}"
    if not named:
        named = [t for t in attribution.get("top", []) if t["attribution"] > 0 and not t["node"].endswith("/error")]
        named = named[:top_k]
        label = f"{prefix}_top_{len(named)}"
    out = by_layer(t["node"] for t in named)
    return (label, out) if out else None


def by_layer(nodes) -> dict[int, tuple[int, ...]]:
    """Feature node names (``L29/f308``) as ``{layer: indices}``, in the order given; error nodes left out."""
    out: dict[int, list[int]] = {}
    for name in nodes:
        node = Node.parse(name)
        if not node.is_error:
            out.setdefault(node.layer, []).append(node.index)
    return {k: tuple(v) for k, v in out.items()}


def ablate(vc, seed: int, runtime, pair, capture, X: sp.csr_matrix, feature_names: list[str], saes: dict, rm,
           prompts: list[str], interpretation: dict, *, decision_coef: np.ndarray | None = None,
           hook: str = "hook_mlp_out", attribution: dict | None = None, echo=print) -> list[dict]:
    """Ablate, steer and patch inside the tuned model while it generates; the share of the reward gain each removes.

    Conditions (rows, in order): ``none`` (the tuned model), the base model (the gain's reference),
    the reader-side IRM's top-k (features at t: expected null), the decision-side IRM's top-k
    (largest positive ``decision_coef``, features at t-1; skipped when None), the judge-flagged
    features, the attribute stage's named features and, with its dictionaries of the change, the top features
    of its decision-side view on them (``decision_change_top_n``; features of those dictionaries are set to
    their zero-change value with the base in lockstep, and get random sets of features of those
    dictionaries with their count at each hook point), k random firing features (the control, one row per
    count), reconstruction only, steering (``vc.steer_alpha``), and the patching bound: the base's activations
    patched into the tuned model at the captured blocks (``vc.patching_bound``). Features are ablated at every
    position. Every condition samples the same prompts with the same random numbers per (prompt, sample)
    slot (:func:`irmprobe.activations.patching.generate_conditions`), so rows are paired by (prompt, sample).

    Returns:
        One dict per row: ``reward`` (mean, 95% CI), ``change`` from ``none`` (paired, 95% CI) and
        ``gain_share``: (tuned - row) / (tuned - base) with a paired 95% bootstrap CI over prompts
        (None where the tuned model gained nothing), as in
        :func:`irmprobe.validation.ablation.reward_gain_share`.
    """
    rng = np.random.default_rng(seed + 1)
    frequency = np.diff(X.tocsc().indptr) / X.shape[0]
    top_k = interpretation["top_k_columns"]
    decision = decision_columns(decision_coef, vc.top_k)

    def as_layers(columns) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for c in columns:
            layer, index = feature_location(feature_names[c])
            out.setdefault(layer, []).append(index)
        return {k: tuple(v) for k, v in out.items()}

    means = None
    if vc.ablation == "mean":
        col_means = np.asarray(X.mean(axis=0)).ravel()
        means = {}
        for c, name in enumerate(feature_names):
            layer, index = feature_location(name)
            means.setdefault(layer, np.zeros(saes["tuned", layer].cfg.d_sae))[index] = col_means[c]
    k, kd = len(top_k), len(decision)
    flagged_cols = flagged_columns(interpretation, k)
    firing = np.setdiff1d(np.flatnonzero(frequency > 0), top_k + decision)
    draw = lambda n: [int(i) for i in rng.choice(firing, min(n, len(firing)), replace=False)]  # noqa: E731
    sets = [FeatureSet(f"irm_top_{k} {READER_NOTE}", as_layers(top_k), vc.ablation, means)]
    if decision:
        sets.append(FeatureSet(f"decision_top_{kd}", as_layers(decision), vc.ablation, means))
    if flagged_cols:
        sets.append(FeatureSet(f"judge_flagged_{len(flagged_cols)}", as_layers(flagged_cols), vc.ablation, means))
    attributed = attributed_features(attribution, vc.top_k)
    change = bool(attribution) and "skipped" not in attribution and attribution.get("dictionary") == "change"
    # With dictionaries of the change, the attribute stage also fits the decision-side view on them: its top
    # features are ablated too (issue: "its top features are what the ablation targets").
    viewed = decision_view_features(attribution, vc.top_k) if change else None
    if viewed is not None and attributed is not None and same_features(viewed[1], attributed[1]):
        echo(f"ablate: the decision-side view's top features are the attribution's set {attributed[0]}: ablated once")
        viewed = None
    kind = _PATCH_KINDS.get(hook)
    if (attributed is not None or viewed is not None) and change and kind is None:
        raise ValueError(f"change features are ablated with the base in lockstep at {', '.join(_PATCH_KINDS)}, not "
                         f"{hook}")
    if attributed is not None and not change:
        sets.append(FeatureSet(attributed[0], attributed[1], vc.ablation, means))
    sizes = sorted({fs.size for fs in sets})
    named_change = []
    if change and (attributed is not None or viewed is not None):
        # A change feature is read off x_tuned - x_base: it is ablated with the base in lockstep, against random
        # features of the same dictionaries (a null of its own kind).
        change_saes = load_change_dictionaries(attribution, runtime.device)
        named_change = [FeatureSet(n[0], n[1], "change", saes=change_saes) for n in (attributed, viewed) if n]
        sets += named_change
    targeted = tuple(fs.name for fs in sets)
    # Several random sets of each targeted size: the targeted sets are judged against their distribution.
    for size in sizes:
        for i in range(vc.n_random_sets):
            sets.append(FeatureSet(f"random_{size} #{i + 1} (control)", as_layers(draw(size)), vc.ablation, means))
    if named_change:
        # Each named set of change features meets random sets with its count at each hook point, drawn from the
        # live features that no named set holds (one family per count per hook point, shared by sets that match).
        live = live_change_features(change_saes, capture, exclude=held_features(named_change))
        sets += change_null_sets(named_change, live, vc.n_random_sets, rng, echo)
    sets.append(FeatureSet("reconstruction_only (control)", {}, "reconstruction"))
    if vc.steer_alpha is not None and top_k:
        sets.append(FeatureSet(f"steer top feature x{vc.steer_alpha:g}", as_layers(top_k[:1]), "steer",
                               alpha=vc.steer_alpha))
    if vc.steer_alpha is not None and decision:
        sets.append(FeatureSet(f"steer decision_top_{kd} x{vc.steer_alpha:g}", as_layers(decision), "steer",
                               alpha=vc.steer_alpha))
    if vc.patching_bound and kind is None:
        echo(f"ablate: no patching bound; patching supports {', '.join(_PATCH_KINDS)}, not {hook}")
    bound = tuple(capture.layers) if vc.patching_bound and kind is not None else None
    layer_saes = {layer: saes["tuned", layer] for layer in capture.layers}
    prompts = prompts[: vc.n_prompts]
    plan = (f"{vc.samples_per_prompt} samples" if vc.share_half_width is None else
            f"{min(vc.min_samples_per_prompt, vc.samples_per_prompt)} to {vc.samples_per_prompt} samples (more only "
            f"while a random set's share has a 95% CI half-width above {vc.share_half_width:g})")
    echo(f"ablate: {len(sets) + 2 + (bound is not None)} conditions over {len(prompts)} prompts x {plan}")
    if vc.share_half_width is not None and vc.min_samples_per_prompt > vc.samples_per_prompt:
        echo(f"ablate: validate.min_samples_per_prompt ({vc.min_samples_per_prompt}) is above samples_per_prompt "
             f"({vc.samples_per_prompt}), the most: one check, after {vc.samples_per_prompt}")
    base, tuned = plain_models(pair, device=runtime.device, dtype=runtime.dtype,
                               trust_remote_code=runtime.trust_remote_code, device_map=runtime.device_map,
                               max_memory=runtime.max_memory)
    rows = paired_rows(base, tuned, pair.tokenizer, layer_saes, sets, rm, prompts, bound, kind or "mlp_out",
                       samples_per_prompt=vc.samples_per_prompt, max_new_tokens=vc.max_new_tokens, seed=seed,
                       batch_size=vc.batch_size, targeted=targeted, site=hook.removeprefix("hook_"),
                       share_half_width=vc.share_half_width, min_samples_per_prompt=vc.min_samples_per_prompt,
                       echo=echo)
    return against_random(rows, targeted)


def load_change_dictionaries(attribution: dict, device: str) -> dict[int, object]:
    """The attribute stage's dictionaries of the change (layer -> SAE), from the cache paths it recorded.

    Raises:
        ValueError: a dictionary is no longer in the cache.
    """
    from pathlib import Path

    from irmprobe.saes.load import load_sae

    out = {}
    for row in attribution.get("dictionaries") or []:
        path = Path(row["path"])
        if not (path / "cfg.json").is_file():
            raise ValueError(f"the attribute stage's dictionary of the change at block {row['layer']} is no longer "
                             f"at {path}: rerun the attribute stage (irmprobe attribute <config> --force)")
        out[int(row["layer"])] = load_sae(path, device=device)
    return out


def same_features(a: dict[int, tuple[int, ...]], b: dict[int, tuple[int, ...]]) -> bool:
    """Whether two ``{layer: indices}`` sets hold the same features, in whatever order each lists them."""
    def held(x):
        return {layer: frozenset(idx) for layer, idx in x.items() if idx}

    return held(a) == held(b)


def held_features(sets: list[FeatureSet]) -> dict[int, tuple[int, ...]]:
    """Every feature any of ``sets`` holds, per layer (sorted): what random sets must leave out."""
    held: dict[int, set[int]] = {}
    for fs in sets:
        for layer, idx in fs.features.items():
            held.setdefault(layer, set()).update(idx)
    return {layer: tuple(sorted(idx)) for layer, idx in sorted(held.items())}


def change_null_sets(named: list[FeatureSet], live: dict[int, np.ndarray], n_sets: int, rng, echo=print
                     ) -> list[FeatureSet]:
    """:func:`random_change_sets` for each distinct count at each hook point among the ``named`` change sets, in
    their order: named sets with the same counts share one family of ``n_sets`` draws."""
    out, families = [], set()
    for fs in named:
        if block_counts(fs.features) not in families:
            families.add(block_counts(fs.features))
            out += random_change_sets(fs, live, n_sets, rng, echo)
    return out


def block_counts(features: dict[int, tuple[int, ...]]) -> str:
    """A feature set's count at each hook point, as ablation rows name it: ``b20:1 b23:4``."""
    return " ".join(f"b{layer}:{len(idx)}" for layer, idx in sorted(features.items()) if idx)


def decision_view_features(attribution: dict | None, top_k: int) -> tuple[str, dict[int, tuple[int, ...]]] | None:
    """The features of largest positive weight (at most ``top_k``, and at most the 10 the view records) in the
    attribute stage's decision-side view on the dictionaries of the change (its ``decision_view``), labelled
    ``decision_change_top_n``; None without that view or a positive weight."""
    top = ((attribution or {}).get("decision_view") or {}).get("top") or []
    named = [t for t in top if t["weight"] > 0][:top_k]
    out = by_layer(t["node"] for t in named)
    return (f"decision_change_top_{len(named)}", dict(sorted(out.items()))) if out else None


def random_change_sets(named: FeatureSet, live: dict[int, np.ndarray], n_sets: int, rng, echo=print
                       ) -> list[FeatureSet]:
    """``n_sets`` random sets of change features, the null of ``named``: each has ``named``'s count of features at
    each hook point, drawn from that point's ``live`` features (a set at block 23 meets random sets at block 23,
    not at earlier blocks), and is named with those counts (``random_change_5 [b20:1 b23:4] #1 (control)``), so sets
    of one size at other hook points stay apart. None (with the reason echoed) where a hook point has too few live
    features."""
    counts = {layer: len(idx) for layer, idx in named.features.items() if idx}
    short = {layer: (n, len(live.get(layer, ()))) for layer, n in counts.items() if len(live.get(layer, ())) < n}
    if short:
        echo(f"ablate: no random sets of change features for {named.name}; too few live features at " + ", ".join(
            f"block {layer} ({have} for {n})" for layer, (n, have) in sorted(short.items())))
        return []
    return [FeatureSet(f"random_change_{named.size} [{block_counts(named.features)}] #{i + 1} (control)",
                       {layer: tuple(int(j) for j in np.sort(rng.choice(live[layer], n, replace=False)))
                        for layer, n in sorted(counts.items())}, "change", saes=named.saes)
            for i in range(n_sets)]


def live_change_features(saes: dict[int, object], capture, exclude: dict[int, tuple[int, ...]] | None = None
                         ) -> dict[int, np.ndarray]:
    """Per layer, the features of its dictionary of the change that move from their zero-change value on some
    captured row (the random sets' pool), less ``exclude``."""
    from irmprobe.saes.evaluate import encode, zero_input_features

    out = {}
    for layer in sorted(saes):
        delta = capture.acts[f"tuned.{layer}"] - capture.acts[f"base.{layer}"]
        zero = zero_input_features(saes[layer])
        moved = np.zeros(len(zero), dtype=bool)
        for start in range(0, len(delta), 4096):
            f = encode(saes[layer], delta[start:start + 4096]).toarray()
            moved |= np.any(f != zero, axis=0)
        out[layer] = np.setdiff1d(np.flatnonzero(moved), np.asarray((exclude or {}).get(layer, ()), dtype=np.int64))
    return out


def reward_gain_test(base, tuned, prompt_index, *, confidence: float = 0.95, n_resamples: int = 2000,
                     seed: int = 0) -> dict:
    """Is the tuned model's RM reward gain over the base significantly positive on these prompts?

    The gain of each prompt is its mean tuned reward minus its mean base reward (samples of one prompt are
    not independent); the interval is a percentile bootstrap over prompts. A share of a gain whose interval
    reaches 0 or below is meaningless (a ratio over a denominator that may be nothing), so the ablation
    computes shares only when ``positive``.

    Returns:
        ``{"gain": mean per-prompt gain, "ci": [low, high], "n_prompts": n, "positive": low > 0}``.
    """
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    prompts, inverse = np.unique(np.asarray(prompt_index), return_inverse=True)
    counts = np.bincount(inverse)
    per_prompt = (np.bincount(inverse, weights=tuned) - np.bincount(inverse, weights=base)) / counts
    gain = float(per_prompt.mean())
    if len(prompts) < 2 or np.all(per_prompt == per_prompt[0]):
        return {"gain": gain, "ci": [gain, gain], "n_prompts": int(len(prompts)), "positive": gain > 0
                and len(prompts) >= 2}
    res = bootstrap((per_prompt,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"gain": gain, "ci": [low, high], "n_prompts": int(len(prompts)), "positive": low > 0}


def gain_share_row(base, tuned, ablated, prompt_index, confidence: float = 0.95) -> dict | None:
    """A row's ``gain_share`` entry (see :func:`irmprobe.validation.ablation.reward_gain_share`); None where the tuned
    model gained nothing. A bound the bootstrap could not define (resamples with no gain) is None, in memory
    as in the JSON, so the verdict and the summary read it as undefined."""
    try:
        g = reward_gain_share(base, tuned, ablated, prompt_index, confidence=confidence)
    except ValueError:  # no gain (or a single prompt): nothing to share out
        return None
    ci = [float(v) if np.isfinite(v) else None for v in g.ci]
    return {"share": g.share, "ci": ci, "gain": g.gain, "removed": g.removed, "n_prompts": g.n_prompts}


def adjusted_share(base, tuned, ablated, prompt_index, n_targeted: int) -> dict | None:
    """A row's ``gain_share_adjusted``, what the causal rule (:func:`against_random`) reads: its share's interval
    at the Bonferroni level ``1 - 0.05 / m`` over the ``m = n_targeted`` targeted sets; None where the tuned model
    gained nothing."""
    level = 1 - 0.05 / max(1, n_targeted)
    row = gain_share_row(base, tuned, ablated, prompt_index, confidence=level)
    return None if row is None else {"ci": row["ci"], "confidence": level, "n_tests": n_targeted}


def shares_settled(base, tuned, randoms: list, prompt_index, half_width: float, *, seed: int = 0) -> dict:
    """The ablation's stopping rule: are the random sets' shares of the gain as precise as asked?

    Settled when the reward gain's 95% CI over prompts lies above 0 (:func:`reward_gain_test`) and every
    random set's share (``randoms``: its rewards, paired with ``base`` and ``tuned``) has a 95% CI half-width
    at most ``half_width`` (:func:`gain_share_row`). It reads the intervals' widths, not the shares (though a
    ratio's width moves with its estimate; docs/validation.md, and ``benchmarks/ablation_stopping.py`` measures
    the coverage this leaves). No random sets: never settled. A gain that is not
    significantly positive ends the sampling (:func:`paired_rows`) rather than prolonging it: sampling on until
    the gain test passes would be optional stopping on that test.

    Returns:
        ``{"settled": bool, "gain_positive": bool, "widest": the widest random half-width (None: none
        defined)}``.
    """
    test = reward_gain_test(base, tuned, prompt_index, seed=seed)
    widths = []
    for rewards in randoms:
        row = gain_share_row(base, tuned, rewards, prompt_index) if test["positive"] else None
        widths.append(None if row is None or None in row["ci"] else (row["ci"][1] - row["ci"][0]) / 2)
    defined = [w for w in widths if w is not None]
    settled = bool(test["positive"] and widths and len(defined) == len(widths) and max(defined) <= half_width)
    return {"settled": settled, "gain_positive": bool(test["positive"]), "widest": max(defined) if defined else None}


def paired_rows(base, tuned, tokenizer, saes: dict, feature_sets: list[FeatureSet], rm, prompts: list[str],
                bound: tuple[int, ...] | None, kind: str = "mlp_out", *, samples_per_prompt: int,
                max_new_tokens: int, seed: int, batch_size: int = 32, targeted: tuple[str, ...] = (),
                site: str | None = None, share_half_width: float | None = None, min_samples_per_prompt: int = 4,
                echo=print) -> list[dict]:
    """Sample every condition with one seed, score with ``rm``, and pair the rows.

    ``base`` and ``tuned`` are plain Hugging Face models. Rows: ``none`` (tuned), ``base model
    (reference)``, one per feature set (``saes``: layer -> the tuned model's SAE, spliced at ``site``, by
    default ``kind``; a ``change`` set mixes its own dictionaries in at ``kind`` with the base in lockstep),
    and with ``bound`` the base's ``kind`` activations patched in at those blocks. The tuned-model conditions share
    batches of ``batch_size`` rows (:func:`irmprobe.activations.patching.generate_conditions`); their ``seconds`` are
    the shared time split evenly.

    ``samples_per_prompt`` samples of each prompt, or with ``share_half_width`` at least
    ``min_samples_per_prompt`` and then one more per prompt per round until :func:`shares_settled` (the random
    sets' rows are those named ``random_...``), until a check finds the gain not significantly positive (no share
    is then computed, as with a fixed count), or until ``samples_per_prompt``. Rounds draw what one call would
    (:func:`irmprobe.activations.patching.generate_conditions`), so the rows stay paired. The ``none`` row's
    ``sampling`` records the samples drawn, each check and what stopped it (``stopped_by``: ``widths``,
    ``gain``, ``most``, or None for a fixed count).
    """
    site = site or kind

    def condition(fs: FeatureSet) -> Condition:
        if fs.mode != "change":
            return Condition(lambda rows: ablated(tuned, saes, fs, rows, site))
        mixes = {layer: change_mix(fs.saes[layer], idx) for layer, idx in fs.features.items()}
        return Condition(None, tuple(sorted(mixes)), lambda block, x_base, x_tuned: mixes[block](x_base, x_tuned))

    conds = [Condition(None)] + [condition(fs) for fs in feature_sets]
    if bound is not None:
        conds.append(Condition(None, tuple(bound)))
    randoms = [i + 1 for i, fs in enumerate(feature_sets) if fs.name.startswith("random_")]
    rule = share_half_width is not None and bool(randoms)
    if share_half_width is not None and not randoms:
        echo(f"ablate: no random sets, so no share half-width to check: {samples_per_prompt} samples per prompt")
    first = min(min_samples_per_prompt, samples_per_prompt) if rule else samples_per_prompt
    rounds = [first] + [1] * (samples_per_prompt - first)
    base_parts, parts = [], [[] for _ in conds]
    scores: list[list[np.ndarray]] = [[] for _ in range(len(conds) + 1)]  # per round: the base's, then each condition's
    base_s = shared_s = 0.0
    drawn, checks = 0, []

    def joined(k: int) -> np.ndarray:
        # The rounds' scores in the order join_samples puts their samples: (prompt, sample).
        return np.concatenate(scores[k])[round_order(base_parts)]

    for n in rounds:
        started = time.perf_counter()
        base_parts.append(generate_patched(base, base, tokenizer, prompts, (), kind, n_per_prompt=n,
                                           max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                                           first_sample=drawn))
        base_s += time.perf_counter() - started
        # Every tuned-model condition in shared batches: one forward serves them all; each slot draws the same
        # uniforms in every condition (and in the base's run), so rows stay paired by (prompt, sample).
        started = time.perf_counter()
        for acc, run in zip(parts, generate_conditions(base, tuned, tokenizer, prompts, conds, kind, n_per_prompt=n,
                                                       max_new_tokens=max_new_tokens, seed=seed,
                                                       batch_size=batch_size, first_sample=drawn)):
            acc.append(run)
        shared_s += time.perf_counter() - started
        drawn += n
        for k, run in enumerate([base_parts[-1]] + [acc[-1] for acc in parts]):  # each round is scored once
            scores[k].append(score(rm, run))
        if not rule:
            continue
        index = np.concatenate([p.prompt_index for p in base_parts])[round_order(base_parts)]
        check = shares_settled(joined(0), joined(1), [joined(i + 1) for i in randoms], index, share_half_width,
                               seed=seed)
        checks.append({"samples_per_prompt": drawn, **check})
        widest = "undefined" if check["widest"] is None else f"{check['widest']:.3f}"
        echo(f"ablate: {drawn} samples per prompt: widest random-set share half-width {widest} (target "
             f"{share_half_width:g}); gain significantly positive: {check['gain_positive']}")
        if check["settled"] or not check["gain_positive"]:
            break
    base_run, runs = join_samples(base_parts), [join_samples(p) for p in parts]
    per_condition = shared_s / len(conds)  # one shared batch: the time split evenly
    sampling = {"samples_per_prompt": drawn, "most": samples_per_prompt, "share_half_width": share_half_width,
                "min_samples_per_prompt": first if rule else None, "checks": checks,
                "settled": checks[-1]["settled"] if checks else None,
                "stopped_by": None if not checks else "widths" if checks[-1]["settled"] else
                "gain" if not checks[-1]["gain_positive"] else "most",
                **({"note": "no random sets: the rule had nothing to check"} if share_half_width is not None
                   and not randoms else {})}

    clean_run, clean, base_r = runs[0], joined(1), joined(0)
    clean_s = per_condition
    conditions = [("base model (reference)", "-", 0, base_r, base_run, base_s, None)]
    for i, (fs, run) in enumerate(zip(feature_sets, runs[1:])):
        conditions.append((fs.name, fs.mode, fs.size, joined(i + 2), run, per_condition,
                           block_counts(fs.features) if fs.mode == "change" else None))
    if bound is not None:
        conditions.append((f"patching bound: base {kind} at blocks {','.join(map(str, bound))}", "patch", 0,
                           joined(len(conds)), runs[-1], per_condition, None))

    gain_test = reward_gain_test(base_r, clean, clean_run.prompt_index, seed=seed)

    def share(rewards):
        # No share of a gain that is not significantly positive (its CI over prompts reaches 0).
        return gain_share_row(base_r, clean, rewards, clean_run.prompt_index) if gain_test["positive"] else None

    # The targeted sets are several tests at once: each also gets a Bonferroni interval (level 1 - 0.05 / m). The
    # random sets get one at the same level: each is judged by the same rule against the others (a known null).
    def adjusted(name, rewards):
        if (name not in targeted and not name.startswith("random_")) or not gain_test["positive"]:
            return None
        return adjusted_share(base_r, clean, rewards, clean_run.prompt_index, len(targeted))

    rows = [{"set": "none", "mode": "-", "n_features": 0, "reward": _mean_ci(clean), "change": None,
             "gain_share": share(clean), "gain_test": gain_test, "sampling": sampling, "example": clean_run.texts[0],
             "seconds": clean_s}]
    for name, mode, size, rewards, run, seconds, blocks in conditions:
        rows.append({"set": name, "mode": mode, "n_features": size, **({"blocks": blocks} if blocks else {}),
                     "reward": _mean_ci(rewards),
                     "change": _mean_ci(rewards - clean), "gain_share": share(rewards),
                     "gain_share_adjusted": adjusted(name, rewards), "example": run.texts[0], "seconds": seconds})
    return rows


def score(rm, run) -> np.ndarray:
    """``rm``'s reward of each continuation of ``run``."""
    return np.asarray(rm.score(list(run.texts)), dtype=np.float64)


def _above(row: dict, shares: list[float]) -> tuple[list[float], bool | None]:
    """The causal rule: ``row``'s Bonferroni interval lies wholly above the 2.5-97.5 percentile range of
    ``shares`` (None: the row has no such interval)."""
    low, high = (float(np.percentile(shares, q)) for q in (2.5, 97.5))
    ci = (row.get("gain_share_adjusted") or {}).get("ci") or [None, None]
    return [low, high], None if ci[0] is None else bool(ci[0] > high)


def against_random(rows: list[dict], targeted: tuple[str, ...]) -> list[dict]:
    """Give each targeted row the distribution of the random sets of its size and whether it stands above it;
    judge each random set by the same rule against the other random sets of its size.

    Sizes are kept apart by kind (:func:`null_family`): a set of change features meets random change features
    with its count at each hook point.
    ``random``: the random sets' shares of the gain (one per draw), their 2.5-97.5 percentile range, and
    ``above_random``: the targeted set's Bonferroni interval (see :func:`paired_rows`) lies wholly above that
    range. None where there is no share (no significant gain) or no random set of that size.

    ``null_check`` (on a random row, where at least two other random sets share its size): the range of the others
    and ``called``: whether the rule would call this random set causal. A random set is a case whose answer is
    known (its features were drawn, not chosen for the reward), so every ``called`` is a false call:
    :func:`irmprobe.analysis.verdict.null_calls` counts them.
    """
    by_size: dict[tuple[int, bool, str], list[tuple[int, float]]] = {}
    for i, r in enumerate(rows):
        if r["set"].startswith("random_") and r.get("gain_share"):
            by_size.setdefault(null_family(r), []).append((i, r["gain_share"]["share"]))
    for i, r in enumerate(rows):
        drawn = by_size.get(null_family(r))
        if not drawn or not r.get("gain_share"):
            continue
        if r["set"] in targeted:
            shares = [s for _, s in drawn]
            band, above = _above(r, shares)
            r["random"] = {"shares": shares, "range": band, "above_random": above}
        elif r["set"].startswith("random_") and len(drawn) >= 3:
            band, above = _above(r, [s for j, s in drawn if j != i])
            if above is not None:
                r["null_check"] = {"range": band, "called": above}
    return rows
