"""The discovery stage: what the tuned model learned beyond the RM, and the IRM as a reward model.

Tokens are tested by the full-vocabulary log-ratio (every word token's mean change in log-probability over
every held-out context) against the spread of the control organisms (two or more:
:func:`irmprobe.analysis.discovery.discover_vocabulary`); with fewer, by the per-token log-ratio of the
held-out rows against one control's or 0 (:func:`~irmprobe.analysis.discovery.discover_tokens`). Concepts,
the RM's share of the IRM's variance and the residual read the primary IRM on the fit stage's held-out rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from irmprobe.activations.samples import row_prompts
from irmprobe.analysis.discovery import (
    CATEGORIES,
    agreement_with_rm,
    concepts,
    continuation_sums,
    discover_tokens,
    discover_vocabulary,
    generation_pairs,
    load_preference_file,
    load_word_list,
    named_vocabulary,
    pairwise_accuracy,
    residual_top,
    rm_variance_share,
)
from irmprobe.cache import write_json
from irmprobe.models.rewards import word_tokens
from irmprobe.pipeline.stage import Stage
from irmprobe.prompts import as_user_turns, encode_prompt
from irmprobe.results import Record

NAMED_NEEDS = ("a word list is tested against the controls' values of its words, which needs 2 or more control "
               "organisms with full-vocabulary sums (compare.n_controls; a capture of this version)")

UNEXPLAINED = ("rewarded_unvalued", "rewarded_against", "penalised_unvalued", "penalised_against")
"""Discoveries the RM does not explain: valued at zero, or against the RM's sign."""


@dataclass(frozen=True)
class PairwiseRow(Record):
    """One scorer used as a reward model on preference pairs."""

    scorer: str
    accuracy: float | None
    ci: list[float] | None
    """Wilson 95% CI of the accuracy (ties count half)."""
    n: int
    n_ties: int
    agreement: float | None = None
    """How often it prefers the member the RM prefers (pairs the RM ties left out); None for the RM."""
    agreement_ci: list[float] | None = None


@dataclass(frozen=True)
class DiscoverRecord(Record):
    """Tokens and concepts the tuned model rewards beyond the RM, the RM's share of the IRM, pairwise accuracy."""

    alpha: float
    control: str | None
    """The branch(es) tokens were tested against (comma-separated); None: tested against 0 (no control)."""
    n_tokens_seen: int
    n_tested: int
    counts: dict
    """Discoveries (q < alpha) per category."""
    entries: dict
    """Category -> its top entries (token, irm_value, ci_low, ci_high, rm_value, count, control_value, q, ...)."""
    concepts: list[dict]
    variance: dict
    """:func:`irmprobe.analysis.discovery.rm_variance_share` of the primary IRM on held-out rows (or a ``note``)."""
    residual: dict
    pairs_source: str
    pairwise: list[PairwiseRow]
    test: str = "welch_hsu"
    """How tokens were tested (:attr:`irmprobe.analysis.discovery.Discovery.test`)."""
    named: dict | None = None
    """``discover.words`` judged against the controls' values of its words, as one set and then word by word within
    a list that passes, a family of its own (:func:`irmprobe.analysis.discovery.named_vocabulary`, plus ``path``;
    ``words``: how many the list holds; ``not_one_token`` and ``same_token``: the words left out, not one token
    after a space or the same token as an earlier word; ``control_passes``: the list's passes on each control
    against the others, all false, None with fewer than 3 controls), or ``{"path", "note"}`` where it could not be
    tested (fewer than 2 controls); None: no list."""


def irm_rows(X, fit) -> np.ndarray:
    """The primary IRM at each row of ``X``: ``(x / scale) @ coef + intercept``, as the fit predicts."""
    scale = np.where(fit.scale > 0, fit.scale, 1.0)
    scaled = X.multiply(1.0 / scale).tocsr() if hasattr(X, "multiply") else X / scale
    return np.asarray(scaled @ fit.coef).ravel() + fit.record.intercept


def score_file_pairs(pairs, pair, fit, saes, layers, hook: str, rm, *, batch: int = 32) -> dict:
    """Capture prompt + chosen and prompt + rejected through both models (``batch`` sequences at a time)
    and score each continuation: IRM text score, summed log-ratio, RM reward. Name -> (chosen, rejected)."""
    from irmprobe.activations.capture import capture_pair
    from irmprobe.analysis.views import probe_inputs

    tok, layers = pair.tokenizer, tuple(layers)
    limit = getattr(pair.base.config, "max_position_embeddings", None)
    seqs, heads = [], []
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosen, pairs.rejected):
        head = encode_prompt(tok, prompt) or [
            tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]  # one row before the text
        for text in (chosen, rejected):  # continuation tokens past the context are cut
            seqs.append((head + tok(text, add_special_tokens=False)["input_ids"])[:limit])
            heads.append(len(head))
    irm, lr = np.zeros(len(seqs)), np.zeros(len(seqs))
    for s in range(0, len(seqs), batch):
        cap = capture_pair(pair, seqs[s:s + batch], layers, hook=hook, batch_size=batch)
        X, _ = probe_inputs(fit.record.inputs, cap.acts, saes, layers)
        for out, values in ((irm, irm_rows(X, fit)), (lr, cap.log_ratio)):
            out[s:s + batch] = continuation_sums(values, cap.seq_index, cap.position, heads[s:s + batch])
    rewards = np.asarray(rm.score([t for c, r in zip(pairs.chosen, pairs.rejected) for t in (c, r)]), dtype=float)
    return {name: (v[0::2], v[1::2]) for name, v in (("sae_irm", irm), ("log_ratio_sum", lr), ("rm", rewards))}


def pairwise_rows(scores: dict) -> list[PairwiseRow]:
    """Accuracy (chosen above rejected) of each scorer, and its agreement with the RM's choice."""
    rows = []
    for name, (c, r) in scores.items():
        acc = pairwise_accuracy(c, r)
        agree = agreement_with_rm(c, r, *scores["rm"]) if name != "rm" else {}
        rows.append(PairwiseRow(name, acc["accuracy"], acc["ci"], acc["n"], acc["n_ties"], agree.get("agreement"),
                                agree.get("ci")))
    return rows


class DiscoverStage(Stage):
    name, version = "discover", 10
    reads = ("discover", "irm.inputs", "capture.hook", "seed")
    needs = ("organism", "samples", "capture", "saes", "fit", "layers")
    control_needs = ("samples", "capture", "fit")

    def fingerprint(self, cfg, ctx):
        path = cfg.discover.pairs_path
        if path and not Path(path).is_file():
            raise ValueError(f"discover.pairs_path {path} does not exist")
        file = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
        # The word list's content enters the key only when one is given (runs without one keep their keys).
        words = cfg.discover.words
        if words:
            try:
                load_word_list(words)
            except ValueError as exc:
                raise ValueError(f"discover.words: {exc}") from None
        listed = (hashlib.sha256(Path(words).read_bytes()).hexdigest(),) if words else ()
        # The chat template formats the file's prompts; it enters the key only when set (plain runs keep theirs).
        return (ctx.rm.describe(), file) + ((ctx.chat_template,) if path and ctx.chat_template else ()) + listed

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.analysis.views import probe_inputs

        dc, capture, fit, saes = cfg.discover, inputs["capture"], inputs["fit"], inputs["saes"].saes
        pair = ctx.pair_of(inputs["organism"])
        rm_map = ctx.rm.token_values(pair.tokenizer)
        decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
        held = fit.eval_rows
        samples = inputs["samples"]
        # Continuation tokens only: a prompt's tokens recur in every sample of that prompt with the very same
        # context, so they are not independent occurrences (and would give zero-spread "discoveries").
        test_rows = written_rows(capture, samples, held)
        # The RM-variance fits split by prompt, the independent unit (sequences of one prompt share its context).
        groups = row_prompts(samples, capture.seq_index)[held]
        tokens, irm = capture.token_ids[held], fit.predictions[held]
        rm_rows = np.array([rm_map.get(int(t), 0.0) for t in tokens])
        controls = [c | {"branch": f"control-{i}"} for i, c in enumerate(inputs.get("controls") or [])
                    if c["capture"].vocab_logp_sum is not None]
        if len(controls) >= 2 and capture.vocab_logp_sum is not None:
            # The strongest valid evidence: every word token's full-vocabulary log-ratio against the controls'.
            words = np.array(sorted(word_tokens(pair.tokenizer)), dtype=np.int64)
            base_logp = capture.vocab_logp_sum["base"] / max(1, len(capture.token_ids))
            organism, vectors = capture.vocab_log_ratio(), np.stack([c["capture"].vocab_log_ratio() for c in controls])
            found = discover_vocabulary(organism, vectors, rm_map, tokens=words, strata=base_logp, alpha=dc.alpha,
                                        decode=decode)
            against = ", ".join(c["branch"] for c in controls)
            named = None
            if dc.words:
                named = named_words(dc.words, organism, vectors, rm_map, words, base_logp, dc.alpha, pair.tokenizer)
                named["control_passes"] = control_passes(named, controls, rm_map, words, dc.alpha)
        else:
            named = {"path": dc.words, "note": NAMED_NEEDS} if dc.words else None
            # The null pair, compare.control off, or a single control: occurrences, against one control or 0.
            if controls:
                c_cap = controls[0]["capture"]
                c_held = written_rows(c_cap, controls[0]["samples"], controls[0]["fit"].eval_rows)
                c_tok, c_val = c_cap.token_ids[c_held], c_cap.log_ratio[c_held]
            else:
                c_tok, c_val = np.zeros(0, dtype=tokens.dtype), np.zeros(0)
            found = discover_tokens(capture.token_ids[test_rows], capture.log_ratio[test_rows], c_tok, c_val, rm_map,
                                    min_count=dc.min_count, n_bootstrap=dc.n_bootstrap, alpha=dc.alpha,
                                    seed=cfg.seed, decode=decode)
            against = controls[0]["branch"] if controls else None
        found_concepts = []
        if cfg.irm.inputs != "raw" and found.discoveries:
            acts = {k: v[held] for k, v in capture.acts.items()}
            X, names = probe_inputs(cfg.irm.inputs, acts, saes, inputs["layers"].chosen)
            found_concepts = [{k: list(v) if isinstance(v, tuple) else v for k, v in c.to_dict().items()}
                              for c in concepts(found, X, fit.coef, tokens, rm_rows, names, n=dc.n_concepts,
                                                categories=UNEXPLAINED)]
        try:
            variance = rm_variance_share(irm, rm_rows, groups=groups, seed=cfg.seed)
            residual = residual_top(tokens, irm, rm_rows, dc.n_entries, min_count=dc.min_count, groups=groups,
                                    seed=cfg.seed, decode=decode)
        except ValueError as exc:  # too few held-out rows or prompts
            variance, residual = {"note": str(exc)}, {"irm_over_rm": [], "rm_over_irm": []}
        if dc.pairs_path:
            pairs = load_preference_file(dc.pairs_path)
            if ctx.chat_template:  # the file's prompts as user turns, as every other prompt of the run
                pairs = dataclasses.replace(pairs, prompts=tuple(as_user_turns(pair.tokenizer, list(pairs.prompts),
                                                                               ctx.chat_template)))
            scores = score_file_pairs(pairs, pair, fit, saes, inputs["layers"].chosen, cfg.capture.hook, ctx.rm)
        else:
            pairs, scores = generation_pairs(inputs["samples"], capture.seq_index, capture.position, fit.eval_rows,
                                             {"sae_irm": fit.predictions, "log_ratio_sum": capture.log_ratio})
        record = DiscoverRecord(
            found.alpha, against, found.n_tokens_seen, len(found.entries), found.counts(),
            {c: [asdict(e) for e in found.category(c)[:dc.n_entries]] for c in CATEGORIES}, found_concepts,
            variance, residual, pairs.source, pairwise_rows(scores), found.test, named)
        write_json(out / "result.json", record.to_json())
        return record

    def load(self, cfg, ctx, inputs, out):
        return DiscoverRecord.from_json(json.loads((out / "result.json").read_text()))

    def summary(self, result):
        n = sum(result.counts[c] for c in UNEXPLAINED)
        share = result.variance.get("residual_share")
        irm = next((r for r in result.pairwise if r.scorer == "sae_irm"), None)
        return (f"{n} tokens beyond the RM at q < {result.alpha:g}"
                + (f"; RM leaves {share:.0%} of the IRM's variance" if share is not None else "")
                + (f"; IRM pairwise accuracy {irm.accuracy:.2f} on {irm.n} pairs" if irm and irm.n else ""))


def named_words(path: str, organism, controls, rm_map: dict, words, strata, alpha: float, tokenizer) -> dict:
    """``discover.words`` as a family of its own: each word that is one token after a space (as a word inside
    a continuation is written, whatever the tokenizer's word-start mark), judged against the controls' values of the
    same words (:func:`irmprobe.analysis.discovery.named_vocabulary`): the list as one set, then each word only within
    a list that passes, Benjamini-Hochberg over the list only. Words that share a token with an earlier one are
    listed apart."""
    from irmprobe.models.tokens import word_ids

    listed = load_word_list(path)
    ids, several, same = {}, [], []
    for w in listed:
        enc = word_ids(tokenizer, w)
        if len(enc) != 1:
            several.append(w)
        elif enc[0] in ids:
            same.append(w)
        else:
            ids[enc[0]] = w
    family = named_vocabulary(organism, controls, list(ids), rm_map, tokens=words, strata=strata, alpha=alpha,
                              decode=lambda t: tokenizer.decode([t]))
    for e in family["entries"]:
        e["word"] = ids[e["token_id"]]
    family["untested"] = [ids[t] for t in family["untested"]]
    return {"path": str(path), "words": len(listed), "not_one_token": several, "same_token": same} | family


def control_passes(named: dict, controls: list[dict], rm_map: dict, words, alpha: float) -> list[int] | None:
    """The list's false passes: each control, as if it were the organism, against the other controls (the same
    test and list); None with fewer than 3 controls (the test needs 2 others)."""
    if len(controls) < 3:
        return None
    vectors = [c["capture"].vocab_log_ratio() for c in controls]
    ids = [e["token_id"] for e in named["entries"]]
    out = []
    for j, c in enumerate(controls):
        cap = c["capture"]
        strata = cap.vocab_logp_sum["base"] / max(1, len(cap.token_ids))
        out.append(named_vocabulary(vectors[j], np.stack(vectors[:j] + vectors[j + 1:]), ids, rm_map, tokens=words,
                                    strata=strata, alpha=alpha)["passed"])
    return out


def written_rows(capture, samples, rows):
    """The rows among ``rows`` that hold a generated token (a continuation, not a prompt or extra text),
    one per distinct context: a prompt's tokens, and a continuation repeated word for word, recur with
    the very same prefix, which is not independent evidence."""
    seq, pos = capture.seq_index[rows], capture.position[rows]
    seen, keep = set(), []
    for i, (s, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        if s >= len(samples.token_ids) or p < samples.prompt_lens[s]:
            continue
        context = tuple(samples.token_ids[s][: p + 1])
        if context not in seen:
            seen.add(context)
            keep.append(i)
    return rows[np.array(keep, dtype=np.int64)]
