"""Every IRM view of one pair, side by side: behavioural, RM-informed and baselines.

A view is anything with the RM's type signature: a token -> value map and a text -> scalar
scorer. Row-level views (linear models over the probe inputs) give a value at every captured
row; their token map averages those over each token's occurrences, and a text's score is the sum
over its continuation tokens. Map-level views (the full-vocabulary log-ratio, the contrastive
probe's lexicon) score a text by summing their map over its continuation tokens.

Families, kept apart in every report:

* ``behavioural`` — fitted without the RM (the IRM proper): the per-token log-ratio, its
  full-vocabulary form, and Ridge/Lasso/ElasticNet fits to the log-ratio over the probe inputs;
* ``rm_informed`` — decodability views that use RM labels (the paper's contrastive probe, direct
  RM regression, the logistic preference probe); they would fit a model that learned nothing;
* ``baseline`` — an untrained random probe, shuffled-target refits, and the IRM fitted to raw
  activations instead of SAE features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler

from irmprobe.activations.capture import Capture
from irmprobe.activations.samples import Samples, in_prompt, row_prompts
from irmprobe.analysis.agreement import compare_view, kendall_tau, paired
from irmprobe.irm.crossfit import IRMFit, cross_fit_irm, preference_probe, random_probe, token_map, two_folds
from irmprobe.irm.estimators import ContrastiveProbe, contrastive_targets
from irmprobe.saes.evaluate import cosine_matrix, decoder_directions, encode


def probe_inputs(inputs: str, acts: dict[str, np.ndarray], saes: dict, layers) -> tuple[sp.csr_matrix | np.ndarray, list[str]]:
    """The IRM's design matrix from activations ``{"tuned.9": [rows, d]}`` and SAEs ``{("tuned", 9): sae}``.

    ``tuned``/``base``: that model's SAE features of its own activations (never one model's
    activations through the other's SAE). ``diff``: tuned features minus the base features matched
    to them one-to-one by decoder cosine (Hungarian), i.e. how each feature's activation changed.
    ``raw``: the tuned model's activations, no SAE. Columns are concatenated over layers.
    """
    blocks, names = [], []
    for layer in layers:
        if inputs == "raw":
            block = acts[f"tuned.{layer}"]
            names += [f"L{layer}/dim{i}" for i in range(block.shape[1])]
        elif inputs in ("tuned", "base"):
            block = encode(saes[inputs, layer], acts[f"{inputs}.{layer}"])
            names += [f"L{layer}/{inputs}{i}" for i in range(block.shape[1])]
        elif inputs == "diff":
            tuned_sae, base_sae = saes["tuned", layer], saes["base", layer]
            cos = cosine_matrix(decoder_directions(tuned_sae), decoder_directions(base_sae))
            if cos.shape[0] != cos.shape[1]:
                raise ValueError("inputs=diff needs base and tuned SAEs of the same size")
            rows, cols = linear_sum_assignment(-cos)
            match = cols[np.argsort(rows)]  # tuned feature i <-> base feature match[i]
            f_t = encode(tuned_sae, acts[f"tuned.{layer}"])
            f_b_matched = encode(base_sae, acts[f"base.{layer}"])[:, match]
            block = (f_t - f_b_matched).tocsr()
            names += [f"L{layer}/diff{i}" for i in range(block.shape[1])]
        else:
            raise ValueError(f"inputs must be tuned, base, diff or raw, got {inputs!r}")
        blocks.append(block)
    if inputs == "raw":
        return np.hstack(blocks).astype(np.float64), names
    return sp.hstack(blocks).tocsr(), names


def bilinear_inputs(X_prev, next_tokens: np.ndarray, directions: np.ndarray, unembed: np.ndarray,
                    gamma: np.ndarray | None = None, *, chunk: int = 262_144):
    """The decision-side IRM's bilinear design: each feature's activation at t-1 times its decoder direction's
    direct effect on the written token's logit.

    ``Z[r, c] = X_prev[r, c] * g_c(x_r)``, ``g_c(x) = (gamma * d_c) . (W_U[x] - mean_v W_U[v])``: ``d_c`` is
    column c's direction in the residual stream (an SAE feature's decoder row; a unit vector for raw
    activations), ``gamma`` the final norm's weight, and the unembedding is centred over the vocabulary
    (a shift every logit shares leaves the log-probabilities unchanged). A linear model on ``Z`` learns one weight
    per feature, so its value for token x depends on x: a function of the t-1 state alone gives every candidate
    token the same value and cannot fit the log-ratio of the token that was written.

    Args:
        X_prev: features at t-1, sparse or dense [n, n_cols].
        next_tokens: the token written at t, [n].
        directions: [n_cols, d]; unembed: [vocab, d]; gamma: [d] or None.
    """
    W = np.asarray(unembed, dtype=np.float32)
    W = W - W.mean(0, keepdims=True)
    D = np.asarray(directions, dtype=np.float32) * (1.0 if gamma is None else np.asarray(gamma, np.float32))
    tokens = np.asarray(next_tokens, dtype=np.int64)
    if D.shape[1] != W.shape[1] or D.shape[0] != X_prev.shape[1] or len(tokens) != X_prev.shape[0]:
        raise ValueError(f"bilinear_inputs: shapes do not match: X_prev {X_prev.shape}, tokens {tokens.shape}, "
                         f"directions {D.shape}, unembed {W.shape}")
    if not sp.issparse(X_prev):
        return np.asarray(X_prev, dtype=np.float64) * (W[tokens] @ D.T)
    X = sp.csr_matrix(X_prev)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    g = np.empty(len(X.data), dtype=np.float64)
    for start in range(0, len(g), chunk):
        r, c = rows[start:start + chunk], X.indices[start:start + chunk]
        g[start:start + chunk] = np.einsum("nd,nd->n", W[tokens[r]], D[c])
    return sp.csr_matrix((X.data * g, X.indices.copy(), X.indptr.copy()), shape=X.shape)


def prompt_folds(capture: Capture, samples: Samples, seed: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each captured row's prompt (its independent unit), and the two halves of the prompts every view and
    the contrastive triples are cross-fitted on."""
    units = row_prompts(samples, capture.seq_index)
    return units, two_folds(units, seed)


@dataclass(frozen=True)
class Analysis:
    """The comparison rows of every view of one pair, and the fits behind them.

    Every token map and figure comes from out-of-fold values (each row scored by a model fitted on
    the other half of the prompts), on one token set: tokens seen at least ``min_token_count``
    times in the scored rows (generated tokens; prompt rows are never scored).
    """

    rows: list[dict]
    """The main table: every row-level view on the same tokens, each value out of fold."""
    full_vocabulary: list[dict]
    """The full-vocabulary log-ratio: every vocabulary token (its own token set and n)."""
    fits: dict[str, IRMFit]
    maps: dict[str, dict[int, float]]
    """View name -> token -> value (held-out rows)."""
    eval_rows: np.ndarray
    """Indices of the rows every view is scored on: rows outside the prompts (at t >= 2 with a decision-side view)."""
    rm_rows: np.ndarray
    """The RM value of the token at each captured row (0 where the RM does not value it)."""


def analyse(capture: Capture, X, samples: Samples, rm_map: dict[int, float], ic, cc, *, seed: int,
            raw: np.ndarray | None = None, triple_inputs: tuple | None = None, n_jobs: int | None = None,
            decision: tuple | None = None, device: str | None = None, measured_only: bool = False) -> Analysis:
    """Cross-fit every view on two halves of the prompts and compare it with the RM, out of fold.

    The prompt is the independent unit: every sequence continuing one prompt shares its prompt rows.
    Every row's value comes from a model fitted on the other half of the prompts (the penalty is chosen
    by CV grouped by prompt too), so every token map and figure is held out. Prompt rows are fitted on
    and never scored: the token maps, R^2 and taus read the generated (and extra-text) rows only, and
    each tau's CI is a cluster bootstrap over prompts.

    Args:
        capture: the pair's capture (its log-ratio is the behavioural target).
        X: probe inputs at every captured row (see :func:`probe_inputs`).
        samples: the held-out generations (text-level agreement, preference pairs).
        rm_map: the RM's token -> value map.
        ic, cc: the ``irm`` and ``compare`` config sections (``compare`` needs ``rm_informed`` and
            ``n_bootstrap``).
        seed: seeds the folds and every fit.
        raw: raw activations at every row, for the raw-activation baseline (None skips it).
        triple_inputs: one (X_pos, X_neg, X_neu, positive tokens, negative tokens) per fold, from
            contrastive triples cut from that fold's sequences (None for a fold without triples).
        n_jobs: parallel cross-validation fits.
        device: where the ridge fits run (a CUDA device: in torch on the GPU; see :class:`irmprobe.irm.estimators.LinearIRM`).
        decision: ``(X_prev, rows, prev_rows)``: features at the decision position t-1 for the rows
            ``rows`` (see :func:`irmprobe.activations.patching.decision_rows`); adds the decision-side IRM. A
            fourth entry (:func:`bilinear_inputs` of those rows, or None) adds the bilinear decision-side IRM.
        measured_only: only the views that are measured, not fitted (the log-ratio and the full-vocabulary
            log-ratio), as a measured-only control needs; ``X`` is not read (None will do).
    """
    y = capture.log_ratio.astype(np.float64)
    groups, token_ids = capture.seq_index, capture.token_ids
    n_seq = len(samples.token_ids)
    units, folds = prompt_folds(capture, samples, seed)
    # Prompt rows are copies shared by every sequence of their prompt: fitted on, never scored.
    prompt_rows = in_prompt(samples, groups, capture.position)
    rows_used = np.flatnonzero(~prompt_rows)
    if decision is not None:
        # Only rows whose decision position was captured (t >= 2): every view has a value on the same rows.
        rows_used = np.intersect1d(np.asarray(decision[1]), rows_used)
    continuation = (groups < n_seq) & ~prompt_rows
    rewards = samples.rewards
    # One token set for the whole table: tokens seen often enough in the rows every view scores.
    counts = {t: c for t, (_, c) in token_map(token_ids[rows_used], y[rows_used]).items()}
    rm_rows = np.array([rm_map.get(int(t), 0.0) for t in token_ids])
    rows, full_vocab, fits, maps = [], [], {}, {}

    def heldout_map(row_values: np.ndarray) -> dict[int, float]:
        return {t: v for t, (v, _) in token_map(token_ids[rows_used], row_values[rows_used],
                                                ic.min_token_count).items()}

    def text_scores(row_values: np.ndarray) -> np.ndarray:
        return np.bincount(groups[continuation], weights=row_values[continuation], minlength=n_seq)[:n_seq]

    def add(name, family, row_values, is_zero=False, **extra):
        tmap = heldout_map(row_values)
        maps[name] = tmap
        rows.append(compare_view(name, family, tmap, counts, rm_map, text_scores=text_scores(row_values),
                                 rewards=rewards, n_bootstrap=cc.n_bootstrap, seed=seed, is_zero=is_zero,
                                 clusters=(token_ids[rows_used], row_values[rows_used], units[rows_used]), **extra))

    def fit(name, X_, target, **kw):
        out = cross_fit_irm(name, X_, target, units, folds=folds, n_jobs=n_jobs, device=device, score_rows=rows_used,
                            **kw)
        fits[name] = out
        return out

    # Behavioural: the tuning's own change, with no model, then linear models of it.
    add("log_ratio (no model)", "behavioural", y, is_zero=not np.any(y))
    if capture.vocab_logp_sum is not None:
        vocab = capture.vocab_log_ratio()
        tmap = {i: float(v) for i, v in enumerate(vocab)}
        maps["full_vocab_log_ratio"] = tmap
        full_vocab.append(compare_view(
            "full_vocab_log_ratio", "full_vocabulary", tmap, counts, rm_map, n_bootstrap=cc.n_bootstrap, seed=seed,
            is_zero=not np.any(vocab), note="every vocabulary token the RM values, averaged over every captured "
            "position (not fitted): its own token set"))
    if measured_only:  # a measured-only control: the views that are measured, nothing fitted
        return Analysis(rows, full_vocab, fits, maps, np.sort(rows_used), rm_rows)
    for i, est in enumerate(ic.estimators):
        name = "sae_irm" if i == 0 else f"sae_{est}"
        f = fit(name, X, y, alphas=ic.alphas if est == "ridge" else None, penalty=est, l1_ratio=ic.l1_ratio)
        add(name, "behavioural", f.predictions, is_zero=f.is_zero, estimator=est, test_r2=f.test_r2, alpha=f.alpha,
            n_nonzero=int(np.count_nonzero(f.coef)), position="reader")
    if decision is not None:
        d_rows = decision[1]
        local = tuple(np.flatnonzero(np.isin(d_rows, fold)) for fold in folds)

        def decision_view(name, X_, position):
            f = cross_fit_irm(name, X_, y[d_rows], units[d_rows], folds=local, n_jobs=n_jobs, device=device,
                              score_rows=np.flatnonzero(np.isin(d_rows, rows_used)),
                              alphas=ic.alphas if ic.estimators[0] == "ridge" else None, penalty=ic.estimators[0],
                              l1_ratio=ic.l1_ratio)
            fits[f.name] = f
            values = np.zeros(len(y))
            values[d_rows] = f.predictions
            add(f.name, "behavioural", values, is_zero=f.is_zero, estimator=ic.estimators[0], test_r2=f.test_r2,
                alpha=f.alpha, n_nonzero=int(np.count_nonzero(f.coef)), position=position)

        decision_view("sae_irm_decision", decision[0], "decision")
        if len(decision) > 3 and decision[3] is not None:
            decision_view("sae_irm_bilinear", decision[3], "decision (bilinear)")

    # RM-informed: decodability of the RM from the same inputs (cross-fitted on the same folds).
    if cc.rm_informed:
        f = fit("rm_regression", X, rm_rows, alphas=ic.alphas)
        add("rm_regression", "rm_informed", f.predictions, test_r2=f.test_r2, alpha=f.alpha)
        if triple_inputs is not None and all(t is not None for t in triple_inputs):
            values, extra = _contrastive(triple_inputs, X, folds, rm_map, ic, len(y))
            add("contrastive_probe", "rm_informed", values, **extra)
        pooled = _mean_pool(X, groups, n_seq)
        values, accs = np.zeros(len(y)), []
        for train_fold, test_fold in (folds, folds[::-1]):
            seqs = np.unique(groups[train_fold][groups[train_fold] < n_seq])
            model, acc = preference_probe(pooled[seqs], samples.rewards[seqs], samples.prompt_index[seqs],
                                          source=samples.source[seqs], seed=seed)
            if model is None:
                break
            values[test_fold] = model.decision_function(X[test_fold])
            accs.append(acc)
        if len(accs) == 2:
            add("preference_probe", "rm_informed", values, pairwise_accuracy=float(np.mean(accs)))

    # Baselines: what agreement looks like with nothing learned.
    rp = random_probe(X, seed)
    fits["random_probe"] = rp
    add("random_probe", "baseline", rp.predictions)
    primary = fits["sae_irm"]
    shuffled = []
    for i in range(ic.n_shuffles):
        # The same folds as every other view; only the training targets are permuted.
        f = cross_fit_irm(f"shuffled_{i}", X, y, units, folds=folds, alphas=(primary.alpha,), shuffle_target=True,
                          score_rows=rows_used,
                          shuffle_seed=seed + 1 + i, n_jobs=n_jobs, device=device, penalty=ic.estimators[0], l1_ratio=ic.l1_ratio)
        tmap = heldout_map(f.predictions)
        maps[f.name] = tmap
        shuffled.append(compare_view(f.name, "baseline", tmap, counts, rm_map, text_scores=text_scores(f.predictions),
                                     rewards=rewards, n_bootstrap=0, seed=seed, is_zero=f.is_zero, test_r2=f.test_r2))
    rows.append(shuffled_summary(shuffled))
    if raw is not None:
        f = fit("raw_activations", raw, y, alphas=ic.alphas)
        add("raw_activations", "baseline", f.predictions, is_zero=f.is_zero, test_r2=f.test_r2, alpha=f.alpha)
    return Analysis(rows, full_vocab, fits, maps, np.sort(rows_used), rm_rows)


def _contrastive(triple_inputs, X, folds, rm_map, ic, n_rows) -> tuple:
    """The paper's contrastive probe, cross-fitted: the probe trained on one fold's triples scores the other
    fold's rows and triples. Returns (row values, extra columns)."""
    values = np.zeros(n_rows)
    lexicon = np.array(list(rm_map.values()))
    held_pred, held_y, held_tok = [], [], []
    for (train_t, test_t), test_fold in zip((triple_inputs, triple_inputs[::-1]), folds[::-1]):
        tp, tn, tu, tok_pos, tok_neg = train_t
        Xc, yc = contrastive_targets(tp, tn, tu)
        pair_groups = np.r_[np.arange(len(tok_pos)), np.arange(len(tok_pos))]
        probe = make_pipeline(MaxAbsScaler(), ContrastiveProbe(alphas=ic.alphas,
                                                               value_range=(lexicon.min(), lexicon.max())))
        probe.fit(Xc, yc, contrastiveprobe__groups=pair_groups)  # CV folds keep triples whole
        values[test_fold] = probe.predict(X[test_fold])
        hp, hn, hu, h_pos, h_neg = test_t
        Xh, yh = contrastive_targets(hp, hn, hu)
        held_pred.append((probe[-1].ridge_.predict(probe[0].transform(Xh)), probe.predict(Xh)))
        held_y.append(yh)
        held_tok.append(np.r_[h_pos, h_neg])
    raw_pred = np.concatenate([p for p, _ in held_pred])
    y_all = np.concatenate(held_y)
    # Held-out R^2 of the ridge before rescaling: the rescaled output is in lexicon units, not the target's.
    extra = {"n_triples": int(sum(len(t) for t in held_tok) // 2),
             "test_r2": float(1 - np.sum((y_all - raw_pred) ** 2) / max(np.sum((y_all - y_all.mean()) ** 2), 1e-300))}
    triple_map = {t: v for t, (v, _) in token_map(np.concatenate(held_tok),
                                                   np.concatenate([p for _, p in held_pred])).items()}
    ids, a, b = paired(triple_map, rm_map)
    if len(ids) >= 2:
        extra["triple_map_tau"], _ = kendall_tau(a, b)
        extra["triple_map_n"] = int(len(ids))
    return values, extra


def _mean_pool(X, groups: np.ndarray, n_seq: int):
    """Mean of the rows of each sequence ``0..n_seq-1`` (rows of other texts are left out)."""
    keep = np.flatnonzero(groups < n_seq)
    counts = np.bincount(groups[keep], minlength=n_seq).astype(np.float64)
    P = sp.csr_matrix((1.0 / np.maximum(counts[groups[keep]], 1), (groups[keep], keep)), shape=(n_seq, X.shape[0]))
    return (P @ X).tocsr() if sp.issparse(X) else P @ X


def shuffled_summary(rows: list[dict]) -> dict:
    """The shuffled-target fits as one row: mean of each figure, and the range (min, max) of tau over the
    fits (``tau_range``: a range, not a confidence interval)."""
    out = {"name": "baseline_shuffled", "family": "baseline", "n_fits": len(rows), "n_tokens": rows[0]["n_tokens"]}
    if any(r["is_zero"] for r in rows):
        return out | {"is_zero": True, "tau": None, "p_value": None}
    if any(r["tau"] is None for r in rows):
        return out | {"is_zero": False, "tau": None, "p_value": None, "note": rows[0].get("note")}
    taus = np.array([r["tau"] for r in rows])

    def mean(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    return out | {"is_zero": False, "tau": float(taus.mean()), "tau_sd": float(taus.std(ddof=1)) if len(taus) > 1 else 0.0,
                  "tau_max": float(taus.max()), "tau_range": [float(taus.min()), float(taus.max())], "p_value": None,
                  "sign_acc_pos": mean("sign_acc_pos"), "sign_acc_neg": mean("sign_acc_neg"), "test_r2": mean("test_r2"),
                  "spearman": mean("spearman"), "text_tau": mean("text_tau")}
