"""Stage 7 wired together: judge the IRM's features and cross-compare (``interpret``), then ablate
them with controls (``ablate``)."""

from __future__ import annotations

import re
import time

import numpy as np
import scipy.sparse as sp

from irmprobe.evals.ablation import FeatureSet, _mean_ci, ablated, reward_gain_share
from irmprobe.pairs import load_model
from irmprobe.patching import Condition, generate_conditions, generate_patched, plain_models
from irmprobe.evals.autointerp import (LLMJudge, LocalChat, OfflineJudge, cross_comparison, feature_evidence,
                                       judge_feature)

_NAME = re.compile(r"^L(\d+)/tuned(\d+)$")


def _parse(name: str) -> tuple[int, int]:
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"validation needs tuned SAE features (irm.inputs=tuned); got feature {name!r}")
    return int(match.group(1)), int(match.group(2))


def make_judge(vc, runtime, pair, rm_map: dict, chat_client=None):
    """The judge ``vc.judge`` names (``vc``: the ``validate`` section; ``runtime``: device, dtype)."""
    kind = vc.judge
    if kind == "offline":
        return OfflineJudge(rm_map)
    if kind == "local":
        # A fresh copy: generate() on a model a TransformerBridge has wrapped samples differently.
        model, _ = load_model(pair.base_spec, device=runtime.device, dtype=runtime.dtype,
                              trust_remote_code=runtime.trust_remote_code)
        return LLMJudge(LocalChat(model, pair.tokenizer), name="local")
    return LLMJudge(chat_client, name=f"llm:{chat_client.model}")


def interpret(vc, seed: int, pair, capture, X: sp.csr_matrix, feature_names: list[str], coef: np.ndarray, saes: dict,
              rm_map: dict, streams, *, judge) -> dict:
    """Judge the IRM's top features and others, and compare the two selections.

    Args:
        X: the tuned model's SAE features at every captured row (unscaled).
        feature_names: ``L{layer}/tuned{index}`` for each column of ``X``.
        coef: the primary IRM's weight of each column.
        saes: ``{("tuned", layer): sae}``.
        streams: token ids of every captured sequence (for feature contexts).
    """
    rng = np.random.default_rng(seed)
    Xc = X.tocsc()
    frequency = np.diff(Xc.indptr) / X.shape[0]
    top_k = [int(i) for i in np.argsort(-coef, kind="stable")[: vc.top_k] if coef[i] > 0]
    by_weight = [int(i) for i in np.argsort(-np.abs(coef), kind="stable") if frequency[i] > 0 and int(i) not in top_k]
    universe = top_k + by_weight[: max(0, vc.n_judged // 2 - len(top_k))]
    firing = np.setdiff1d(np.flatnonzero(frequency > 0), universe)
    n_random = max(0, min(len(firing), vc.n_judged - len(universe)))
    universe += [int(i) for i in rng.choice(firing, n_random, replace=False)]

    unembed = pair.tuned.get_output_embeddings().weight.detach().float().cpu().numpy().T
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    judged = []
    for i in universe:
        layer, index = _parse(feature_names[i])
        direction = saes["tuned", layer].W_dec[index].detach().float().cpu().numpy()
        ev = feature_evidence(feature_names[i], layer, index, Xc[:, i], capture.token_ids, capture.seq_index,
                              capture.position, streams, decode, direction, unembed, seed=seed + i)
        j = judge_feature(judge, ev, vc.concept, seed=seed)  # explained from shown contexts, scored on held-out
        judged.append({"feature": ev.name, "column": i, "weight": float(coef[i]), "frequency": ev.frequency,
                       "max_activation": ev.max_activation, "in_irm_top_k": i in top_k, "relevant": j.relevant,
                       "score": j.score, "explanation": j.explanation, "detection": j.detection,
                       "contexts": [{"text": c.text(), "tokens": list(c.tokens), "activations": list(c.activations)}
                                    for c in ev.contexts[:5]],
                       "promoted": [t for _, t in ev.promoted], "histogram": list(ev.histogram[0])})
    flagged = [r for r in judged if r["relevant"]]
    cross = cross_comparison([r["feature"] for r in judged], {feature_names[i] for i in top_k},
                             {r["feature"] for r in flagged}, {r["feature"]: r["frequency"] for r in judged},
                             float(frequency.mean()))
    detections = [r["detection"] for r in judged if r["detection"] is not None]
    cross["detection_mean"] = float(np.mean(detections)) if detections else None

    return {"judge": getattr(judge, "name", "judge"), "top_k": [feature_names[i] for i in top_k],
            "top_k_columns": top_k, "judged": judged, "cross": cross}


_PATCH_KINDS = {"hook_mlp_out": "mlp_out", "hook_resid_post": "resid_post"}
"""Capture hook -> the hook kind the patching bound patches at the same blocks."""

READER_NOTE = "(reader side: expected null, these features read tokens already written)"


def ablate(vc, seed: int, runtime, pair, capture, X: sp.csr_matrix, feature_names: list[str], saes: dict, rm,
           prompts: list[str], interpretation: dict, *, decision_coef: np.ndarray | None = None,
           hook: str = "hook_mlp_out", echo=print) -> list[dict]:
    """Ablate, steer and patch inside the tuned model while it generates; the share of the reward gain each removes.

    Conditions (rows, in order): ``none`` (the tuned model), the base model (the gain's reference),
    the reader-side IRM's top-k (features at t: expected null), the decision-side IRM's top-k
    (largest positive ``decision_coef``, features at t-1; skipped when None), the judge-flagged
    features, k random firing features (the control, one row per count), reconstruction only,
    steering (``vc.steer_alpha``), and the patching bound: the base's activations patched into the
    tuned model at the captured blocks (``vc.patching_bound``). Features are ablated at every
    position. Every condition samples the same prompts with the same random numbers per (prompt, sample)
    slot (:func:`irmprobe.patching.generate_conditions`), so rows are paired by (prompt, sample).

    Returns:
        One dict per row: ``reward`` (mean, 95% CI), ``change`` from ``none`` (paired, 95% CI) and
        ``gain_share``: (tuned - row) / (tuned - base) with a paired 95% bootstrap CI over prompts
        (None where the tuned model gained nothing), as in
        :func:`irmprobe.evals.ablation.reward_gain_share`.
    """
    rng = np.random.default_rng(seed + 1)
    frequency = np.diff(X.tocsc().indptr) / X.shape[0]
    top_k = interpretation["top_k_columns"]
    decision = [] if decision_coef is None else [
        int(i) for i in np.argsort(-np.asarray(decision_coef), kind="stable")[: vc.top_k] if decision_coef[i] > 0]

    def as_layers(columns) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for c in columns:
            layer, index = _parse(feature_names[c])
            out.setdefault(layer, []).append(index)
        return {k: tuple(v) for k, v in out.items()}

    means = None
    if vc.ablation == "mean":
        col_means = np.asarray(X.mean(axis=0)).ravel()
        means = {}
        for c, name in enumerate(feature_names):
            layer, index = _parse(name)
            means.setdefault(layer, np.zeros(saes["tuned", layer].cfg.d_sae))[index] = col_means[c]
    k, kd = len(top_k), len(decision)
    flagged = [r for r in interpretation["judged"] if r["relevant"]]
    flagged_cols = [r["column"] for r in sorted(flagged, key=lambda r: -(r["score"] or 0.0))][:k]
    firing = np.setdiff1d(np.flatnonzero(frequency > 0), top_k + decision)
    draw = lambda n: [int(i) for i in rng.choice(firing, min(n, len(firing)), replace=False)]  # noqa: E731
    sets = [FeatureSet(f"irm_top_{k} {READER_NOTE}", as_layers(top_k), vc.ablation, means)]
    if decision:
        sets.append(FeatureSet(f"decision_top_{kd}", as_layers(decision), vc.ablation, means))
    if flagged_cols:
        sets.append(FeatureSet(f"judge_flagged_{len(flagged_cols)}", as_layers(flagged_cols), vc.ablation, means))
    sets.append(FeatureSet(f"random_{k} (control)", as_layers(draw(k)), vc.ablation, means))
    if decision and kd != k:
        sets.append(FeatureSet(f"random_{kd} (control for decision_top_{kd})", as_layers(draw(kd)), vc.ablation,
                               means))
    sets.append(FeatureSet("reconstruction_only (control)", {}, "reconstruction"))
    if vc.steer_alpha is not None and top_k:
        sets.append(FeatureSet(f"steer top feature x{vc.steer_alpha:g}", as_layers(top_k[:1]), "steer",
                               alpha=vc.steer_alpha))
    if vc.steer_alpha is not None and decision:
        sets.append(FeatureSet(f"steer decision_top_{kd} x{vc.steer_alpha:g}", as_layers(decision), "steer",
                               alpha=vc.steer_alpha))
    kind = _PATCH_KINDS.get(hook)
    if vc.patching_bound and kind is None:
        echo(f"ablate: no patching bound; patching supports {', '.join(_PATCH_KINDS)}, not {hook}")
    bound = tuple(capture.layers) if vc.patching_bound and kind is not None else None
    layer_saes = {layer: saes["tuned", layer] for layer in capture.layers}
    prompts = prompts[: vc.n_prompts]
    echo(f"ablate: {len(sets) + 2 + (bound is not None)} conditions over {len(prompts)} prompts x "
         f"{vc.samples_per_prompt} samples")
    base, tuned = plain_models(pair, device=runtime.device, dtype=runtime.dtype,
                               trust_remote_code=runtime.trust_remote_code, device_map=runtime.device_map,
                               max_memory=runtime.max_memory)
    return paired_rows(base, tuned, pair.tokenizer, layer_saes, sets, rm, prompts, bound, kind or "mlp_out",
                       samples_per_prompt=vc.samples_per_prompt, max_new_tokens=vc.max_new_tokens, seed=seed,
                       batch_size=vc.batch_size)


def gain_share_row(base, tuned, ablated, prompt_index) -> dict | None:
    """A row's ``gain_share`` entry (see :func:`irmprobe.evals.ablation.reward_gain_share`); None where the tuned
    model gained nothing. A bound the bootstrap could not define (resamples with no gain) is None, in memory
    as in the JSON, so the verdict and the summary read it as undefined."""
    try:
        g = reward_gain_share(base, tuned, ablated, prompt_index)
    except ValueError:  # no gain (or a single prompt): nothing to share out
        return None
    ci = [float(v) if np.isfinite(v) else None for v in g.ci]
    return {"share": g.share, "ci": ci, "gain": g.gain, "removed": g.removed, "n_prompts": g.n_prompts}


def paired_rows(base, tuned, tokenizer, saes: dict, feature_sets: list[FeatureSet], rm, prompts: list[str],
                bound: tuple[int, ...] | None, kind: str = "mlp_out", *, samples_per_prompt: int,
                max_new_tokens: int, seed: int, batch_size: int = 32) -> list[dict]:
    """Sample every condition with one seed, score with ``rm``, and pair the rows.

    ``base`` and ``tuned`` are plain Hugging Face models. Rows: ``none`` (tuned), ``base model
    (reference)``, one per feature set (``saes``: layer -> the tuned model's SAE, spliced at the MLP
    output), and with ``bound`` the base's ``kind`` activations patched in at those blocks. The
    tuned-model conditions share batches of ``batch_size`` rows (:func:`irmprobe.patching.generate_conditions`);
    their ``seconds`` are the shared time split evenly.
    """
    started = time.perf_counter()
    base_run = generate_patched(base, base, tokenizer, prompts, (), kind, n_per_prompt=samples_per_prompt,
                                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    base_s = time.perf_counter() - started
    # Every tuned-model condition in shared batches: one forward serves them all; each slot draws the same
    # uniforms in every condition (and in the base's run), so rows stay paired by (prompt, sample).
    conds = [Condition(None)] + [Condition(lambda rows, fs=fs: ablated(tuned, saes, fs, rows)) for fs in feature_sets]
    if bound is not None:
        conds.append(Condition(None, tuple(bound)))
    started = time.perf_counter()
    runs = generate_conditions(base, tuned, tokenizer, prompts, conds, kind, n_per_prompt=samples_per_prompt,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    per_condition = (time.perf_counter() - started) / len(conds)  # one shared batch: the time split evenly

    def score(run):
        return np.asarray(rm.score(list(run.texts)), dtype=np.float64)

    clean_run, clean, base_r = runs[0], score(runs[0]), score(base_run)
    clean_s = per_condition
    conditions = [("base model (reference)", "-", 0, base_r, base_run, base_s)]
    for fs, run in zip(feature_sets, runs[1:]):
        conditions.append((fs.name, fs.mode, fs.size, score(run), run, per_condition))
    if bound is not None:
        conditions.append((f"patching bound: base {kind} at blocks {','.join(map(str, bound))}", "patch", 0,
                           score(runs[-1]), runs[-1], per_condition))

    def share(rewards):
        return gain_share_row(base_r, clean, rewards, clean_run.prompt_index)

    rows = [{"set": "none", "mode": "-", "n_features": 0, "reward": _mean_ci(clean), "change": None,
             "gain_share": share(clean), "example": clean_run.texts[0], "seconds": clean_s}]
    for name, mode, size, rewards, run, seconds in conditions:
        rows.append({"set": name, "mode": mode, "n_features": size, "reward": _mean_ci(rewards),
                     "change": _mean_ci(rewards - clean), "gain_share": share(rewards),
                     "example": run.texts[0], "seconds": seconds})
    return rows
