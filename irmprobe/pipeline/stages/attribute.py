"""The attribute stage: which SAE features carry the implicit reward (attribution patching with integrated
gradients, exact patching of the top nodes, faithfulness and completeness curves on held-out prompts)."""

from __future__ import annotations

import json
import time

import numpy as np
import scipy.sparse as sp

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage


def skip_reason(cfg, inputs) -> str | None:
    from irmprobe.validation.attribution import HOOK_KINDS

    if not cfg.attribute.enabled:
        return "attribute.enabled is off"
    if inputs["organism"].tuned is None:
        return "the null organism has no implicit reward to attribute"
    if cfg.capture.hook not in HOOK_KINDS:
        return f"it splices SAEs at {' or '.join(HOOK_KINDS)}, not capture.hook={cfg.capture.hook}"
    return None


def top_contexts(capture, features, index: int, streams, decode, *, n: int = 3,
                 window: int = 8, baseline: float = 0.0) -> list[str]:
    """The windows (text up to and including the token) where feature ``index`` fires most above ``baseline``
    (a change feature's value on a zero change), one per sequence.
    ``features``: one SAE's activations at every captured row (sparse [rows, d_sae])."""
    column = np.asarray(features[:, index].todense()).ravel() - baseline
    out, seen = [], set()
    for row in np.argsort(-column, kind="stable"):
        if column[row] <= 0 or len(out) >= n:
            break
        s, p = int(capture.seq_index[row]), int(capture.position[row])
        if s in seen:
            continue
        seen.add(s)
        ids = streams[s][max(0, p - window + 1): p + 1]
        out.append("".join(decode(int(t)) for t in ids[:-1]) + f"[[{decode(int(ids[-1]))}]]")
    return out


def change_dictionaries(cfg, capture, samples, layers, *, capture_key: str, device: str, force: bool = False,
                        change_seed: int | None = None) -> tuple[dict, list[dict]]:
    """The dictionaries of the change: per hook point an SAE (SAELens; the ``sae`` section's width, batch size
    and learning rate; ``attribute.change_*`` settings; no early stopping) trained on
    ``x_tuned - x_base`` at every captured row but the held-out prompts' (:func:`evaluation_rows`), on which it
    is measured. Cached like the stage's other SAEs. ``change_seed`` overrides ``attribute.change_seed`` (block
    l's dictionary is trained with ``change_seed + l``). Returns ``(layer -> SAE, metrics rows)``."""
    from dataclasses import asdict, replace

    from irmprobe.activations.samples import row_prompts
    from irmprobe.pipeline.stages.saes import get_sae
    from irmprobe.saes.train import evaluation_rows

    ac = cfg.attribute
    sc = replace(cfg.sae, pretrained=None, architecture=ac.change_architecture, k=ac.change_k,
                 l1_coefficient=ac.change_l1_coefficient, training_samples=ac.change_training_samples,
                 early_stop_every=0)
    units = row_prompts(samples, capture.seq_index)
    eval_rows = evaluation_rows(units, cfg.seed)
    saes, rows = {}, []
    for layer in layers:
        delta = capture.acts[f"tuned.{layer}"] - capture.acts[f"base.{layer}"]
        info = {"hook_name": capture.hook_name(layer), "irmprobe_model": "change (tuned - base)"}
        seed = (change_seed if change_seed is not None else cfg.seed if ac.change_seed is None
                else ac.change_seed) + layer
        sae, metrics, sae_dir = get_sae(sc, delta, eval_rows, seed=seed,
                                        key_parts=(capture_key, "change", layer), meta=info, device=device,
                                        force=force, units=units)
        saes[layer] = sae
        rows.append({"layer": layer, "d_sae": int(sae.cfg.d_sae), "path": str(sae_dir), "seed": seed, **asdict(metrics),
                     "change_norm_share": float(np.linalg.norm(delta, axis=1).mean()
                                                / np.linalg.norm(capture.acts[f"tuned.{layer}"], axis=1).mean())})
    return saes, rows


def change_bilinear_inputs(sae, delta: np.ndarray, written: np.ndarray, unembed: np.ndarray,
                           gamma: np.ndarray | None) -> sp.csr_matrix:
    """The bilinear design on one dictionary of the change: each feature's value on ``delta`` (x_tuned - x_base at
    t-1) less its value on no change, times its decoder direction's direct effect on the ``written`` token
    (:func:`irmprobe.analysis.views.bilinear_inputs`), [rows, d_sae]. Kept sparse as the features are:
    (f - f0) g = f g - f0 g, and only the few features that fire on no change (f0 != 0, as TopK's biases make
    some) add a dense column."""
    from irmprobe.analysis.views import bilinear_inputs
    from irmprobe.saes.evaluate import decoder_directions, encode, zero_input_features

    directions = decoder_directions(sae)
    z = bilinear_inputs(encode(sae, delta), written, directions, unembed, gamma)
    zero = zero_input_features(sae)
    fires = np.flatnonzero(zero)
    if len(fires):  # f0 g at the firing columns, through bilinear_inputs' chunked sparse branch (bounded memory)
        f0 = sp.csr_matrix(np.broadcast_to(zero[fires], (z.shape[0], len(fires))))
        z0 = bilinear_inputs(f0, written, directions[fires], unembed, gamma)
        z = z - sp.csr_matrix((z0.data, fires[z0.indices], z0.indptr), shape=z.shape)
    return sp.csr_matrix(z)


DECISION_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
"""The ridge penalties :func:`change_decision_view` chooses among (by inner CV grouped by prompt)."""

DECISION_SHUFFLES = 3
"""Shuffled-target refits beside :func:`change_decision_view`'s fit: its R^2 and tau with the target's pairing to the
features broken, on the same folds. Targets are permuted as in the fit stage's shuffled baseline, but each refit
chooses its own penalty (the fit stage's reuse the primary fit's). ``irm.n_shuffles`` is not read here, so the
attribute stage's key stays off the ``irm`` section."""


def change_decision_view(capture, samples, saes: dict, layers, unembed: np.ndarray, gamma: np.ndarray | None,
                         rm_map: dict[int, float], *, seed: int, min_token_count: int = 2, n_top: int = 10) -> dict:
    """The decision-side IRM on the dictionaries of the change: r_t from each change feature at t-1 (its value on
    ``x_tuned - x_base`` minus its value on no change) times its decoder direction's direct effect on the written
    token's logit (:func:`irmprobe.analysis.views.bilinear_inputs`), one learned weight per feature.

    The fit stage's bilinear view reads the IRM's own SAEs, dictionaries of the activations, which leave most of the
    tuning's change in their errors; this one reads features of the change itself. Cross-fitted like every view:
    the fit stage's two halves of the prompts, a ridge whose penalty (:data:`DECISION_ALPHAS`) inner CV grouped by
    prompt chooses, prompt rows fitted on and never scored; a token's value is the mean of its held-out rows' (tokens
    with ``min_token_count`` of them: 2, the ``irm`` section's default, whatever the run sets, since the stage does
    not read that section). The dictionaries themselves were trained on the change at rows of both halves (without
    the target, as the IRM's own SAEs are). ``top`` ranks the weights of the refit on every row, on max-abs-scaled
    inputs (:class:`irmprobe.irm.crossfit.IRMFit`). Returns ``{"test_r2", "alpha", "tau", "n_tokens", "n_rows",
    "top": [{"node", "weight"}], "shuffled": {"test_r2": [...], "tau": [...]}}`` (``tau``: Kendall's tau of its
    held-out token values against the RM's, None without two valued tokens; ``top``: the ``n_top`` features of
    largest positive weight; ``shuffled``: the same fit, penalty choice included, with the targets permuted across
    the rows of each training fold, :data:`DECISION_SHUFFLES` times, as the fit stage's shuffled baseline permutes
    them (but with the penalty chosen again for each), which breaks the pairing of target and features and with
    it the structure within prompts).

    Raises:
        ValueError: a block without a dictionary or without both models' activations, or no row to score."""
    from irmprobe.activations.patching import decision_rows
    from irmprobe.activations.samples import in_prompt
    from irmprobe.analysis.agreement import agreement
    from irmprobe.analysis.views import prompt_folds
    from irmprobe.irm.crossfit import cross_fit_irm, token_map
    from irmprobe.validation.attribution import Node

    missing = [layer for layer in layers if layer not in saes or f"tuned.{layer}" not in capture.acts
               or f"base.{layer}" not in capture.acts]
    if missing:
        raise ValueError(f"change_decision_view: no dictionary of the change or no captured activations of both "
                         f"models at block(s) {missing}: pass the blocks the attribute stage trained dictionaries at")
    y = capture.log_ratio.astype(np.float64)
    units, folds = prompt_folds(capture, samples, seed)
    rows, prev = decision_rows(capture.seq_index, capture.position)
    scored = np.flatnonzero(~in_prompt(samples, capture.seq_index, capture.position)[rows])
    if len(scored) == 0:
        raise ValueError("change_decision_view: no generated token has its decision position captured: nothing to "
                         "score (capture continuations, not prompts alone)")
    local = tuple(np.flatnonzero(np.isin(rows, fold)) for fold in folds)
    written = np.asarray(capture.token_ids)[rows]
    blocks, names = [], []
    for layer in layers:
        delta = (capture.acts[f"tuned.{layer}"] - capture.acts[f"base.{layer}"])[prev]
        blocks.append(change_bilinear_inputs(saes[layer], delta, written, unembed, gamma))
        names += [Node(layer, i).name for i in range(blocks[-1].shape[1])]
    X = sp.hstack(blocks).tocsr()

    def fitted(shuffle: int | None):
        fit = cross_fit_irm("change_bilinear", X, y[rows], units[rows], folds=local, score_rows=scored,
                            alphas=DECISION_ALPHAS, shuffle_target=shuffle is not None,
                            shuffle_seed=seed + (shuffle or 0))
        tmap = {t: v for t, (v, _) in token_map(written[scored], fit.predictions[scored], min_token_count).items()}
        return fit, agreement("change_bilinear", tmap, rm_map)

    fit, agree = fitted(None)
    shuffled = [fitted(i) for i in range(DECISION_SHUFFLES)]
    coef = np.asarray(fit.coef, dtype=np.float64)
    top = [i for i in np.argsort(-coef, kind="stable")[:n_top] if coef[i] > 0]
    return {"test_r2": None if fit.is_zero else float(fit.test_r2), "alpha": fit.alpha,
            "tau": agree.tau, "n_tokens": agree.n_tokens, "n_rows": len(scored),
            "top": [{"node": names[i], "weight": float(coef[i])} for i in top],
            "shuffled": {"test_r2": [None if f.is_zero else float(f.test_r2) for f, _ in shuffled],
                         "tau": [a.tau for _, a in shuffled]}}


SPREAD_GRID = (1, 2, 3, 5, 10, 15, 20)
"""How many of the best-ranked blocks' MLP outputs the spread sets patch together (below the number of blocks;
the MLP outputs of every block are a set of their own); :func:`spread_sizes` adds half and three quarters of
a deep model's blocks."""


def spread_sizes(n_layers: int) -> list[int]:
    """The spread sets' sizes for a model of ``n_layers`` blocks: :data:`SPREAD_GRID` below ``n_layers``, and in a
    model deeper than twice the grid's largest size its half and three quarters too, so that the last step before
    every block is not a jump from 20 to, say, 80 blocks."""
    sizes = {n for n in SPREAD_GRID if n < n_layers}
    if n_layers > 2 * max(SPREAD_GRID):
        sizes |= {n_layers // 2, 3 * n_layers // 4}
    return sorted(sizes)


def hook_point_sets(layers, n_layers: int, order: list[int] | None = None) -> dict[str, list[tuple[str, int]]]:
    """The hook points the attribution considers, each set patched together: every kind a dictionary can be
    spliced at (:data:`irmprobe.validation.attribution.HOOK_KINDS`) at the chosen blocks, the MLP outputs of the
    top n blocks of ``order`` (a ranking of the blocks, best first) for n in :func:`spread_sizes`, and the MLP
    outputs of every block (how much of the implicit reward passes through any MLP output at all). The spread
    sets say over how many blocks' MLPs the change is spread; one whose points equal an earlier set's is left
    out (the chosen blocks are often the top ones)."""
    from irmprobe.validation.attribution import HOOK_KINDS

    sets = {f"{kind} at the chosen blocks": [(kind, int(b)) for b in layers] for kind in HOOK_KINDS.values()}
    if order is not None:
        check_order(order, n_layers)
        for n in spread_sizes(n_layers):
            points = [("mlp_out", int(b)) for b in sorted(order[:n])]
            if points not in sets.values():
                sets[f"mlp_out at the top {n} block{'s' if n > 1 else ''}"] = points
    sets["mlp_out at every block"] = [("mlp_out", b) for b in range(n_layers)]
    return sets


def check_order(order, n_layers: int) -> None:
    """A ranking of the blocks must name each of the model's ``n_layers`` blocks once (ValueError otherwise)."""
    if sorted(int(b) for b in order) != list(range(n_layers)):
        raise ValueError(f"the block order must rank each of the {n_layers} blocks once, got {list(order)}")


def mlp_order(layers) -> tuple[list[int], str]:
    """The blocks ranked for the spread sets, best first, and what ranked them: the layers stage's patching
    ranking where it patched the MLP outputs (the share of KL(tuned || base) each block's removes), else the
    change in each block's MLP weights (the layers stage's weight divergence, absolute), else, where no MLP
    weight changed (e.g. a given model with its MLPs frozen, or MLPs the divergence does not name), the change
    in each block's weights."""
    if layers.patching and layers.patching.get("kind") == "mlp_out":
        return ([int(b) for b in layers.patching["ranking"]],
                "the share of KL(tuned || base) patching each block's MLP output removes")
    mlp = list(layers.per_submodule.get("mlp") or [])
    if mlp and max(mlp) > 0:
        return sorted(range(len(mlp)), key=lambda i: (-mlp[i], i)), "the change in each block's MLP weights"
    block = list(layers.per_block)
    return sorted(range(len(block)), key=lambda i: (-block[i], i)), "the change in each block's weights"


def reward_order(base, tuned, sequences, prompt_lens, prompt, source, *, batch_size: int = 16, pad_id: int = 0,
                 seed: int = 0) -> tuple[list[int], str, list[dict]]:
    """The blocks ranked by each one's own share of the implicit reward: its MLP output alone patched to the
    base's (:func:`irmprobe.validation.attribution.hook_point_bounds`, one forward per block) on these sequences,
    best first (undefined shares last). Returns the order, what ranked it (the caller says on which prompts), and
    each block's ``block``, ``value`` and ``ci``."""
    from irmprobe.validation.attribution import hook_point_bounds

    n_layers = int(tuned.config.num_hidden_layers)
    singles = hook_point_bounds(base, tuned, sequences, prompt_lens, prompt, source,
                                {f"mlp_out at block {b}": [("mlp_out", b)] for b in range(n_layers)},
                                batch_size=batch_size, pad_id=pad_id, seed=seed)
    shares = [{"block": b, "value": h["value"], "ci": h["ci"]} for b, h in enumerate(singles)]
    order = sorted(range(n_layers), key=lambda b: (shares[b]["value"] is None, -(shares[b]["value"] or 0.0), b))
    if all(s["value"] is None for s in shares):  # m(tuned) <= 0 on these prompts: no share to rank by
        return order, "block index (no block's own share of the implicit reward is defined)", shares
    return order, "each block's own share of the implicit reward, its MLP output patched alone", shares


def attribute(ac, seed: int, runtime, pair, samples, capture, saes: dict, layers, hook: str, echo=print,
              change: bool = False, dictionaries: list[dict] | None = None, hook_points: bool = True,
              match: list[dict] | None = None, order: tuple[list[int], str] | None = None) -> dict:
    """Rank nodes on one half of the prompts, check the top ones by exact patching, and measure the curves on
    the other half; name the smallest set reaching ``ac.threshold`` faithfulness (with its top contexts).

    ``saes``: ``layer -> SAE`` whose features are the nodes; ``change``: they are dictionaries of the change
    (see :class:`irmprobe.validation.attribution.ImplicitReward`), described by ``dictionaries``.
    ``hook_points``: also measure, on the same held-out half, the share of the implicit reward each set of
    :func:`hook_point_sets` carries (no dictionary needed: it does not depend on ``saes``). ``match``: another
    set of dictionaries' named features with their counterparts in ``saes``
    (:func:`irmprobe.validation.attribution.counterparts`): the counterparts' faithfulness and completeness are
    measured too (``matched``). ``order``: a ranking of the blocks, best first, and what ranked them
    (:func:`mlp_order`): the hook point sets then include the MLP outputs of its top n blocks (``spread_order``
    in the result); with ``ac.spread_ranking: reward`` the blocks are ranked instead by :func:`reward_order` on
    the ranking half (each block's share in ``spread_order["block_shares"]``)."""
    from irmprobe.activations.patching import plain_models
    from irmprobe.activations.samples import prompt_halves
    from irmprobe.validation.attribution import (
        HOOK_KINDS,
        MATCH_COSINE,
        ImplicitReward,
        Node,
        attribution_curves,
        exact_check,
        hook_point_bounds,
        ranked_nodes,
        set_shares,
        smallest_faithful,
    )

    started = time.perf_counter()
    kind = HOOK_KINDS[hook]
    base, tuned = plain_models(pair, device=runtime.device, dtype=runtime.dtype,
                               trust_remote_code=runtime.trust_remote_code, device_map=runtime.device_map,
                               max_memory=runtime.max_memory)
    if order is not None:  # before any forward: a bad ranking should not cost the attribution first
        check_order(order[0], int(tuned.config.num_hidden_layers))
    rank_half, eval_half = prompt_halves(samples, ac.n_prompts, seed)
    pad = pair.tokenizer.pad_token_id or 0

    def sequences(half):
        seqs = np.flatnonzero(np.isin(samples.prompt_index, half))
        return ([samples.token_ids[i] for i in seqs], samples.prompt_lens[seqs], samples.prompt_index[seqs],
                samples.source[seqs])

    def metric(half):
        return ImplicitReward(base, tuned, saes, kind, *sequences(half), batch_size=ac.batch_size, pad_id=pad,
                              change=change)

    echo(f"attribute: {len(layers)} hook point(s) ({kind} at blocks {', '.join(map(str, layers))}), dictionaries "
         f"of the {'change' if change else 'activations'}; ranking on "
         f"{len(rank_half)} prompts, curves on {len(eval_half)} others")
    ranking = metric(rank_half)
    attribution = ranking.integrated_gradients(ac.ig_steps)
    ranked = ranked_nodes(attribution)
    full, empty = ranking.evaluate(None).mean(), ranking.evaluate(lambda layer, part: False).mean()
    check = exact_check(ranking, ranked, ac.n_exact)
    del ranking
    candidates = [node for node, _ in ranked if not node.is_error]
    evaluation = metric(eval_half)
    curves = attribution_curves(evaluation, ranked, ac.k_grid, n_random=ac.n_random, candidates=candidates,
                                seed=seed)
    matched = None
    if match is not None:  # another seed's counterparts of a named set, measured on the same held-out half
        nodes = sorted({Node.parse(c["counterpart"]) for c in match}, key=lambda n: (n.layer, n.index))
        matched = {"features": match, "n_distinct": len(nodes), "match_cosine": MATCH_COSINE,
                   **set_shares(evaluation, nodes, seed=seed)}
    del evaluation
    bounds = None
    block_shares = None
    if hook_points and ac.spread_ranking == "reward":
        echo(f"attribute: ranking the blocks by their MLP outputs' own shares of the implicit reward "
             f"({len(rank_half)} ranking prompts, one forward per block)")
        ranked_blocks, ranked_by, block_shares = reward_order(base, tuned, *sequences(rank_half),
                                                              batch_size=ac.batch_size, pad_id=pad, seed=seed)
        order = (ranked_blocks, f"{ranked_by} (on the ranking half of the prompts)")
    if hook_points:
        echo("attribute: the share of the implicit reward each set of hook points carries (patched together)")
        bounds = hook_point_bounds(base, tuned, *sequences(eval_half),
                                   hook_point_sets(layers, int(tuned.config.num_hidden_layers),
                                                   order[0] if order else None),
                                   batch_size=ac.batch_size, pad_id=pad, seed=seed)
    k = smallest_faithful(curves, ac.threshold)
    k_features = smallest_faithful(curves, ac.threshold, "feature_rows")
    streams = list(samples.token_ids)
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
    encoded: dict[int, tuple] = {}

    def contexts(node):
        from irmprobe.saes.evaluate import encode, zero_input_features

        if node.layer not in encoded:  # each layer's SAE runs over the capture once
            acts = capture.acts[f"tuned.{node.layer}"]
            zero = None
            if change:  # a change feature reads the change at that token, against its value on no change
                acts = acts - capture.acts[f"base.{node.layer}"]
                zero = zero_input_features(saes[node.layer])
            encoded[node.layer] = encode(saes[node.layer], acts).tocsc(), zero
        features, zero = encoded[node.layer]
        return top_contexts(capture, features, node.index, streams, decode,
                            baseline=0.0 if zero is None else float(zero[node.index]))

    features = [(node, value) for node, value in ranked if not node.is_error]
    # The named set is the smallest set of features (errors left out) reaching the threshold.
    named = [{"node": node.name, "attribution": value,
              "contexts": contexts(node)}
             for node, value in features[: k_features or 0]]
    positive = [node for node, value in ranked if value > 0]
    return {
        "kind": kind, "layers": list(layers), "n_prompts": [len(rank_half), len(eval_half)],
        "dictionary": "change" if change else "activations", "dictionaries": dictionaries or [],
        "ig_steps": ac.ig_steps, "threshold": ac.threshold,
        "rank_half": {"m_full": float(full), "m_empty": float(empty),
                      "ig_sum": float(sum(v for _, v in ranked)),
                      "n_nodes": len(ranked), "n_positive": len(positive)},
        "top": [{"node": node.name, "attribution": value} for node, value in ranked[:50]],
        "exact": check, "curves": curves, **({"hook_points": bounds} if bounds is not None else {}),
        **({"spread_order": {"order": order[0], "ranked_by": order[1],
                             **({"block_shares": block_shares} if block_shares is not None else {})}}
           if bounds is not None and order else {}),
        **({"matched": matched} if matched is not None else {}),
        "smallest_k": k, "smallest_k_features": k_features, "named": named,
        "top_features": [{"node": node.name, "attribution": value,
                          "contexts": contexts(node)} for node, value in features[:5]],
        "errors_in_top_20": sum(node.is_error for node, _ in ranked[:20]),
        "error_nodes": [{"node": Node(layer, -1).name, "attribution": attribution[layer][1]} for layer in layers],
        "seconds": time.perf_counter() - started,
    }


class AttributeStage(Stage):
    """Attribution of the implicit reward to SAE features and error terms at the captured hook points."""

    # 4: the share of the implicit reward each set of hook points carries; 5: the MLP outputs of the top n blocks
    name, version = "attribute", 5
    reads = ("attribute", "capture.hook", "seed", "sae")
    needs = ("organism", "samples", "layers", "capture", "saes")

    def skips(self, cfg, ctx, inputs):
        return skip_reason(cfg, inputs)

    def fingerprint(self, cfg, ctx):
        # With dictionaries of the change the stage also fits the decision-side view on them (version 4 of that
        # view: a sparse design, its no-change term in chunks, shuffled-target refits beside it); the activations'
        # attribution is unchanged by it, and so are its key and every key after it.
        return {"change_decision_view": 4} if cfg.attribute.dictionary == "change" else None

    def run(self, cfg, ctx, inputs, out):
        reason = self.skips(cfg, ctx, inputs)
        if reason:
            ctx.echo(f"attribute: skipped; {reason}")
            result = {"skipped": reason}
        else:
            layers, capture, samples = inputs["layers"].chosen, inputs["capture"], inputs["samples"]
            change = cfg.attribute.dictionary == "change"
            if change:
                saes, rows = change_dictionaries(cfg, capture, samples, layers, capture_key=ctx.input_keys["capture"],
                                                 device=ctx.runtime.device, force=ctx.forced)
            else:
                saes, rows = {layer: inputs["saes"].saes["tuned", layer] for layer in layers}, None
            pair = ctx.pair_of(inputs["organism"])
            result = attribute(cfg.attribute, cfg.seed, ctx.runtime, pair, samples,
                               capture, saes, layers, cfg.capture.hook, echo=ctx.echo, change=change,
                               dictionaries=rows, order=mlp_order(inputs["layers"]))
            if change:  # the decision-side view on the same dictionaries of the change
                from irmprobe.models.loading import readout

                ctx.echo("attribute: the decision-side IRM (bilinear) on the dictionaries of the change")
                started = time.perf_counter()
                result["decision_view"] = change_decision_view(
                    capture, samples, saes, layers, *readout(pair.tuned), ctx.rm.token_values(pair.tokenizer),
                    seed=cfg.seed)
                result["seconds"] += time.perf_counter() - started
        write_json(out / "attribution.json", result)
        return result

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "attribution.json").read_text())

    def summary(self, result):
        from irmprobe.analysis.verdict import attribution_line

        return attribution_line(result)
