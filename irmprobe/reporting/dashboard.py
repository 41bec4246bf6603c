"""What the report shows as coloured text and feature cards, computed once per run by the dashboard stage.

*Text views*: every held-out prompt's continuations from both models, each continuation token with three
numbers: the log-ratio ``r_t`` the tuning wrote there, the primary IRM's out-of-fold value at that row, and the
RM's value of the token (None where the RM does not value it). Prompts are ordered by how much the IRM and the
RM disagree on their continuations: the mean, over the prompt's continuations, of the absolute difference
between the percentile rank of the IRM's text score (its summed values, as the text-level comparison reads it)
and of the RM's reward, ranks taken over every continuation of the run.

*Feature cards*: one per SAE feature the report names anywhere (the IRM's top-k, the decision side's top-k, the
judge's flags, the attribute stage's set, the discovery's concepts, the feature alignment's lists, the
ablation's targeted sets): its top activating contexts in the held-out continuations (every token's
activation), an activation histogram, its weight in each IRM, its correlation with the RM, the tokens its
decoder direction promotes and suppresses through the final norm and the unembedding, and the judge's
explanation and detection score when it was judged.
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp
from scipy import stats

from irmprobe.analysis.discovery import feature_rm_corr
from irmprobe.validation.autointerp import feature_evidence

_TUNED_FEATURE = re.compile(r"^L(\d+)/(?:tuned|f)(\d+)$")


def feature_key(name: str) -> tuple[int, int] | None:
    """``L20/tuned870`` (an IRM column) or ``L20/f870`` (an attribution node) -> (20, 870); None for others."""
    match = _TUNED_FEATURE.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def card_id(key: tuple[int, int]) -> str:
    return f"L{key[0]}/tuned{key[1]}"


def prompt_disagreement(samples, irm_scores: np.ndarray) -> np.ndarray:
    """Per prompt: the mean over its continuations of |percentile rank of the IRM's text score - percentile rank
    of the RM's reward| (ranks over every continuation of the run); NaN for a prompt with none."""
    irm_scores, rewards = np.asarray(irm_scores, float), np.asarray(samples.rewards, float)
    ok = np.isfinite(irm_scores) & np.isfinite(rewards)  # a continuation without a finite score is left out
    gap = np.full(len(irm_scores), np.nan)
    n = int(ok.sum())
    if n:
        gap[ok] = np.abs((stats.rankdata(irm_scores[ok]) - 0.5) / n - (stats.rankdata(rewards[ok]) - 0.5) / n)
    prompts = np.asarray(samples.prompt_index)
    out = np.full(len(samples.prompts), np.nan)
    for p in np.unique(prompts):
        mine = gap[prompts == p]
        if np.isfinite(mine).any():
            out[p] = float(np.nanmean(mine))
    return out


def text_views(samples, capture, predictions: np.ndarray, eval_rows: np.ndarray, rm_map: dict[int, float], decode,
               *, max_prompts: int) -> dict:
    """Every scored continuation token with (log-ratio, IRM, RM), grouped by prompt, most disagreeing prompt
    first (at most ``max_prompts`` prompts)."""
    if max_prompts < 1:
        raise ValueError(f"report.text_prompts must be >= 1, got {max_prompts}")
    scored = np.zeros(len(capture.token_ids), bool)
    scored[eval_rows] = True
    log_ratio = capture.log_ratio
    n_seq = len(samples.token_ids)
    rows_of = [[] for _ in range(n_seq)]
    for row in np.flatnonzero(scored):
        if capture.seq_index[row] < n_seq:  # rows of extra texts (capture.text_path) belong to no prompt
            rows_of[int(capture.seq_index[row])].append(int(row))
    irm_scores = np.array([float(predictions[r].sum()) if len(r) else 0.0
                           for r in (np.asarray(rows, int) for rows in rows_of)])
    gap = prompt_disagreement(samples, irm_scores)
    order = [int(p) for p in np.argsort(-np.nan_to_num(gap, nan=-1.0), kind="stable") if np.isfinite(gap[p])]
    prompts = []
    for p in order[:max_prompts]:
        sequences = []
        for s in np.flatnonzero(np.asarray(samples.prompt_index) == p):
            rows = sorted(rows_of[s], key=lambda r: int(capture.position[r]))
            tokens = [int(capture.token_ids[r]) for r in rows]
            sequences.append({
                "source": str(samples.source[s]), "reward": float(samples.rewards[s]),
                "irm_score": float(irm_scores[s]),
                "tokens": [decode(t) for t in tokens],
                "log_ratio": [round(float(log_ratio[r]), 4) for r in rows],
                "irm": [round(float(predictions[r]), 4) for r in rows],
                "rm": [None if t not in rm_map else round(float(rm_map[t]), 4) for t in tokens]})
        prompts.append({"prompt": samples.prompts[p], "index": p, "disagreement": float(gap[p]),
                        "sequences": sequences})
    return {"prompts": prompts, "n_prompts": int(np.isfinite(gap).sum()),
            "rule": "mean |percentile rank of the IRM's text score - percentile rank of the RM's reward| over the "
                    "prompt's continuations (ranks over every continuation of the run)"}


def written_words(samples, vocab_log_ratio: np.ndarray | None, words: dict[int, str], rm_map: dict[int, float],
                  *, n: int = 150) -> dict | None:
    """The word tokens the tuning made most and least likely (full-vocabulary log-ratio: the mean change in
    log-probability over every held-out context), with the RM's value and how often each model wrote them."""
    if vocab_log_ratio is None or not words:
        return None
    counts = {"tuned": {}, "base": {}}
    for ids, start, source in zip(samples.token_ids, samples.prompt_lens, samples.source):
        bucket = counts.setdefault(str(source), {})
        for t in ids[int(start):]:
            bucket[t] = bucket.get(t, 0) + 1
    ids = np.array(sorted(words), dtype=np.int64)
    values = vocab_log_ratio[ids]
    order = np.argsort(-values, kind="stable")

    def row(t: int) -> list:
        return [words[t], t, round(float(vocab_log_ratio[t]), 4), rm_map.get(t), counts["tuned"].get(t, 0),
                counts["base"].get(t, 0)]

    return {"columns": ["token", "token_id", "full_vocab_log_ratio", "rm_value", "written_by_tuned",
                        "written_by_base"],
            "more": [row(int(ids[i])) for i in order[:n]], "less": [row(int(ids[i])) for i in order[::-1][:n]],
            "n_words": int(len(ids))}


def named_features(feature_names: list[str], coef: np.ndarray, decision_coef: np.ndarray | None, top_k: int,
                   interpretation: dict | None, attribution: dict | None, alignment: dict | None,
                   concepts: list[dict], ablated: bool) -> dict[tuple[int, int], list[str]]:
    """Every feature the report names, with where it is named (in the order the report names them)."""
    from irmprobe.validation.ablation import attribution_set, decision_columns, flagged_columns

    out: dict[tuple[int, int], list[str]] = {}

    def add(name: str, label: str) -> None:
        key = feature_key(name)
        if key is not None and label not in out.setdefault(key, []):
            out[key].append(label)

    top = [int(i) for i in np.argsort(-coef, kind="stable")[:top_k] if coef[i] > 0]
    decision = decision_columns(decision_coef, top_k)
    flagged = flagged_columns(interpretation, len(feature_names)) if interpretation and "judged" in interpretation \
        else []
    attributed = attribution_set(attribution, top_k)
    for i in top:
        add(feature_names[i], f"IRM top-{top_k}")
    for i in decision:
        add(feature_names[i], f"decision-side top-{top_k}")
    for i in flagged:
        add(feature_names[i], "judge-flagged")
    if attributed is not None:
        for layer, indices in attributed[1].items():
            for index in indices:
                add(f"L{layer}/f{index}", attributed[0].replace("_", " "))
    for c in concepts:
        add(c["feature"], "discovery concept")
    for label, key in (("IRM weights, RM does not track", "irm_not_rm"), ("RM tracks, IRM does not weight",
                                                                          "rm_not_irm")):
        for entry in (alignment or {}).get(key, []):
            add(entry["feature"], label)
    if ablated:
        # The ablation's own sets: the judge-flagged ones capped at the IRM's top-k count, as it caps them.
        targeted = {feature_names[i] for i in top + decision + flagged[:len(top)]}
        targeted |= {f"L{layer}/f{index}" for layer, idx in (attributed[1].items() if attributed else ())
                     for index in idx}
        for name in targeted:
            add(name, "ablated while sampling")
    return out


def feature_cards(named: dict[tuple[int, int], list[str]], X: sp.spmatrix, feature_names: list[str],
                  coef: np.ndarray, decision_coef: np.ndarray | None, capture, eval_rows: np.ndarray, rm_rows,
                  streams, decode, directions: dict[int, np.ndarray], unembed: np.ndarray, gamma: np.ndarray | None,
                  *, interpretation: dict | None, attribution: dict | None, n_contexts: int, n_tokens: int = 8,
                  seed: int = 0) -> list[dict]:
    """One card per named feature (see the module docstring). Contexts come from the scored continuation rows
    of ``streams`` only (prompt rows repeat across the sequences that share a prompt; extra texts are not
    held-out continuations).

    Args:
        X: the tuned model's SAE features at every captured row, one column per ``feature_names`` entry.
        rm_rows: the RM value of the token at each captured row (0 where unvalued).
        directions: layer -> the tuned SAE's decoder rows [d_sae, d_model].
        unembed: [vocab, d_model]; gamma: the final norm's weight [d_model] or None.
    """
    column_of = {feature_key(n): i for i, n in enumerate(feature_names)}
    keys = [k for k in named if k in column_of]
    if not keys:
        return []
    cols = [column_of[k] for k in keys]
    Xe = sp.csc_matrix(X)[:, cols]
    mask = np.zeros(Xe.shape[0])
    mask[eval_rows] = 1.0
    mask[np.asarray(capture.seq_index) >= len(streams)] = 0.0  # extra texts: not the held-out continuations
    Xe = sp.csc_matrix(sp.diags(mask) @ Xe)  # prompt rows silenced: contexts from continuations only
    shown = eval_rows[np.asarray(capture.seq_index)[eval_rows] < len(streams)]
    corr = feature_rm_corr(sp.csr_matrix(Xe[shown]), np.asarray(rm_rows, float)[shown])
    readout = unembed - unembed.mean(axis=0, keepdims=True)
    judged = {r["feature"]: r for r in (interpretation or {}).get("judged", [])}
    attributed = {}
    from irmprobe.validation.attribution import reads_tuned_saes

    # Nodes of dictionaries of the change are not these SAE features: they get no attribution here.
    for entry in attribution.get("top", []) if reads_tuned_saes(attribution) else []:
        key = feature_key(entry["node"])
        if key is not None:
            attributed[key] = entry["attribution"]
    weight_rank = {int(c): r + 1 for r, c in enumerate(np.argsort(-coef, kind="stable"))}
    cards = []
    for j, (key, col) in enumerate(zip(keys, cols)):
        layer, index = key
        direction = directions[layer][index]
        effect = readout @ (direction * gamma if gamma is not None else direction)
        ev = feature_evidence(card_id(key), layer, index, Xe[:, j], capture.token_ids, capture.seq_index,
                              capture.position, streams, decode, direction, unembed.T, n_contexts=n_contexts,
                              n_heldout=0, n_negatives=0, seed=seed + index)
        order = np.argsort(-effect, kind="stable")
        judge = judged.get(card_id(key))
        cards.append({
            "id": card_id(key), "layer": layer, "index": index, "named_as": named[key],
            "irm_weight": float(coef[col]), "irm_rank": weight_rank[col], "n_columns": len(coef),
            "decision_weight": None if decision_coef is None else float(decision_coef[col]),
            "attribution": attributed.get(key), "rm_corr": float(corr[j]),
            "frequency": float(Xe[shown, j].count_nonzero() / max(1, len(shown))),  # of the continuation rows
            "max_activation": ev.max_activation,
            "histogram": {"counts": list(ev.histogram[0]), "edges": [round(e, 4) for e in ev.histogram[1]]},
            "contexts": [{"tokens": list(c.tokens), "activations": [round(a, 4) for a in c.activations]}
                         for c in ev.contexts],
            "promoted": [[decode(int(t)), round(float(effect[t]), 4)] for t in order[:n_tokens]],
            "suppressed": [[decode(int(t)), round(float(effect[t]), 4)] for t in order[::-1][:n_tokens]],
            "judge": None if judge is None else {k: judge.get(k) for k in ("explanation", "detection", "relevant",
                                                                          "score")},
        })
    return cards
