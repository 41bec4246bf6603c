#!/usr/bin/env python
"""Calibration: how often irmprobe's decisions are wrong when the answer is known.

Runs the whole decision on organisms whose answer is known and prints one table (Markdown):

- **null pairs**: a pool of K random-reward organisms (the control organisms of one run, each trained with
  the demo's recipe and its own seed). Each is judged, as if it were the organism, against the other K - 1:
  the primary comparison (t-test against the controls' spread) on the full-vocabulary log-ratio and on the
  SAE IRM; and, for reference, the old one-control z rule on every ordered pair. Any "agrees" or "opposes"
  is a false call; the nominal rate of the t-test is ``alpha`` (two-sided). Discoveries per null organism
  are counted by the discovery stage's token test (against one other null organism, as the pipeline does).
- **known positives**: the demo organism (tuned against the RM: should be called "agrees"), an organism
  tuned against the negated RM with fewer steps (``opposes``), and an organism tuned to write common words
  the RM values at zero (``benchmarks/data/planted_words.tsv``: should not be called "agrees"/"opposes",
  and those words should be discovered). Each is judged against the same pool of K controls.

Every run goes through the stage cache, so a second call reuses the organisms and fits (a cold call trains
K + 3 organisms: about 10 min each on 2 CPU cores). Validation (ablation), the depth stage and the attribution
are off: the calibration reads none of them (the ablation's causal call has its own check).

    python benchmarks/calibration.py                       # K = 4 controls, the default config
    python benchmarks/calibration.py --pool 6 --out docs/calibration.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.analysis.agreement import prediction_t  # noqa: E402
from irmprobe.analysis.discovery import load_word_list  # noqa: E402
from irmprobe.analysis.verdict import SUGGEST, primary_comparison, reading  # noqa: E402
from irmprobe.api import run  # noqa: E402
from irmprobe.config import RunConfig  # noqa: E402
from irmprobe.models.tokens import word_ids  # noqa: E402

HERE = Path(__file__).resolve().parent
VIEWS = ("full_vocab_log_ratio", "sae_irm")
UNEXPLAINED = ("rewarded_unvalued", "rewarded_against", "penalised_unvalued", "penalised_against")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k/n (statsmodels would do it; one formula is not worth a dependency)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rows_of(runner, branch: str) -> dict:
    fit = runner.result("fit", branch).record
    return {r.name: r for r in fit.rows + fit.full_vocabulary}


def one_control_z(row, control) -> float | None:
    """The rule the verdict used before several controls (kept here as a reference): the difference of two taus
    over the root sum of their bootstrap s.e.s, called at |z| >= 3 (the larger of the two bootstraps' s.e.)."""
    def se(r):
        widths = [ci[1] - ci[0] for ci in (r.tau_ci, r.tau_ci_tokens) if ci is not None and None not in ci]
        return max(widths) / 3.92 if widths else None

    a, b = se(row), se(control)
    if row.tau is None or control.tau is None or a is None or b is None or a + b == 0:
        return None
    return (row.tau - control.tau) / float(np.hypot(a, b))


def vocabulary_discoveries(cap, control_caps: list, rm_map: dict, alpha: float, decode, tokenizer,
                           top: int | None = None):
    """The discovery stage's test: every word token's full-vocabulary log-ratio against the controls' spread
    (``top``: only the ``top`` word tokens of highest base log-probability over the organism's own held-out
    contexts; the stage tests them all)."""
    from irmprobe.analysis.discovery import discover_vocabulary
    from irmprobe.models.rewards import word_tokens

    words = np.array(sorted(word_tokens(tokenizer)), dtype=np.int64)
    base = cap.vocab_logp_sum["base"] / len(cap.token_ids)
    if top is not None:
        words = np.sort(words[np.argsort(-base[words], kind="stable")[:top]])
    return discover_vocabulary(cap.vocab_log_ratio(), np.stack([c.vocab_log_ratio() for c in control_caps]), rm_map,
                               tokens=words, strata=base, alpha=alpha, decode=decode)


def occurrence_discoveries(runner, cfg, organism: str, control: str, rm_map: dict, decode):
    """The old test: a token's held-out occurrences against one control's (Welch t, occurrences independent)."""
    from irmprobe.analysis.discovery import discover_tokens
    from irmprobe.pipeline.stages.discover import written_rows

    def held(branch):
        cap, samples, fit = (runner.result(s, branch) for s in ("capture", "samples", "fit"))
        rows = written_rows(cap, samples, fit.eval_rows)
        return cap.token_ids[rows], cap.log_ratio[rows]

    return discover_tokens(*held(organism), *held(control), rm_map, min_count=cfg.discover.min_count,
                           n_bootstrap=0, alpha=cfg.discover.alpha, seed=cfg.seed, decode=decode)


def known_family(found, known, *, alpha: float = 0.05) -> dict:
    """Discovery's own test with the known (planted) tokens as the whole family: what multiplicity costs.

    ``found`` is :func:`vocabulary_discoveries` over every word token; the known tokens keep its p-values and
    Benjamini-Hochberg runs over them only (:func:`irmprobe.analysis.discovery.named_family`), where the open
    search's family spans every word token. A pass needs a positive effect (the organism raised the token). The
    stage's ``discover.words`` judges a list by the controls' spread on its own words instead
    (:func:`irmprobe.analysis.discovery.named_vocabulary`).
    """
    from irmprobe.analysis.discovery import named_family

    ids = {int(t) for t in known}
    fam = named_family(found, sorted(ids), alpha=alpha)
    if not fam["entries"]:
        raise ValueError("none of the known tokens was tested by discovery: check the word list and the tokenizer")
    p = np.array([e["p"] for e in fam["entries"]])
    up = np.array([e["effect"] > 0 for e in fam["entries"]])
    return {"n": fam["n"], "alpha": alpha, "bh": sum(e["direction"] == "rewarded" for e in fam["entries"]),
            "bonferroni": int(((p < alpha / fam["n"]) & up).sum()), "nominal": int(((p < alpha) & up).sum()),
            "whole_family": int(sum(1 for e in found.discoveries if e.token_id in ids and e.effect > 0)),
            "n_family": len(found.entries)}


def named_text(stage: dict) -> str:
    """The planted run's ``discover.words`` result in words: passes, the list as one set, the words' shared part."""
    whole, share = stage.get("set") or {}, stage.get("shared_share")
    return (f"{stage['passed']} of {stage['n']} pass"
            + (f", as one set t {whole['t']:+.2f} on {whole['df']} d.f., p {whole['p']:.2g} ("
               + ("passes: its words are tested" if whole.get("passed") else "not passed: no word is named") + ")"
               if whole.get("p") is not None else ", no set t (the pool's list means do not vary)")
            + (f"; the pool's listed words share {share:.0%} of their spread" if share is not None else ""))


def known_set_power(organism: np.ndarray, pool: np.ndarray, known, tokens, *, alpha: float = 0.05) -> dict:
    """An exact small-K check of the known (planted) tokens against the pool, one by one and as one set.

    Each organism's full-vocabulary log-ratio is centred by its median over ``tokens`` (a log-ratio carries each
    context's change of normaliser, the same for every token). Each known token's centred change is judged against
    the pool's by the primary comparison's prediction t (K - 1 d.f.), Bonferroni over the known tokens; and the
    known tokens' mean change the same way, as one set. It is exact but, per token, far weaker than discovery's
    pooled null (``critical``: the |t| a Bonferroni pass needs), so it bounds nothing: it says whether the organism
    moved the tokens beyond the spread between organisms, which only the set's t can show with K of 3 to 6.
    Non-finite values (a token no organism can write) are left out; a token the pool does not move at all gets a NaN
    t and counts as not passed.
    """
    from scipy import stats

    organism, pool = np.asarray(organism, dtype=np.float64), np.atleast_2d(np.asarray(pool, dtype=np.float64))
    if pool.shape[1] != organism.shape[0]:
        raise ValueError(f"pool {pool.shape} must be [K, {organism.shape[0]}] like the organism's vector")
    finite = np.isfinite(organism) & np.isfinite(pool).all(axis=0)
    tokens = np.asarray(tokens, dtype=np.int64)
    tokens = tokens[finite[tokens]]
    known = np.asarray(sorted(known), dtype=np.int64)
    known = known[finite[known]] if len(known) else known
    k = pool.shape[0]
    if k < 2 or len(known) == 0:
        raise ValueError(f"known_set_power needs >= 2 pool organisms and >= 1 known token, got {k} and {len(known)}")
    o = organism - np.median(organism[tokens])
    c = pool - np.median(pool[:, tokens], axis=1, keepdims=True)

    per, p = prediction_t(o[known], c[:, known])
    whole, whole_p = (float(x) for x in prediction_t(o[known].mean(), c[:, known].mean(axis=1)))
    return {"n": len(known), "raised": int((o[known] > c[:, known].mean(axis=0)).sum()),
            "bonferroni": int(((p < alpha / len(known)) & (per > 0)).sum()),
            "nominal": int(((p < alpha) & (per > 0)).sum()), "alpha": alpha,
            "critical": float(stats.t.isf(alpha / len(known) / 2, k - 1)),
            "median_difference": float(np.median(o[known] - c[:, known].mean(axis=0))),
            "median_pool_sd": float(np.median(c[:, known].std(axis=0, ddof=1))),
            "set_mean": float(o[known].mean()), "pool_set_means": c[:, known].mean(axis=1).tolist(),
            "set_t": whole, "set_p": whole_p, "df": k - 1,
            "tokens": known.tolist(), "t": per.tolist(), "p": p.tolist()}


def beyond(found) -> list:
    """Discoveries the RM does not explain (valued at zero or against its sign), largest effect first."""
    return [e for e in found.discoveries if e.category in UNEXPLAINED]


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def undecided_line(null: dict, alpha: float) -> str:
    """How many null tests (``{view: [(name, PrimaryComparison)]}``) the verdict reads "undecided": not called at
    ``alpha`` but p <= SUGGEST, which a null test does with probability SUGGEST - alpha."""
    undecided = {v: sum(reading(pc).startswith("undecided") for _, pc in tests) for v, tests in null.items()}
    return ("Undecided readings among the null tests (not called at alpha, p <= "
            f"{SUGGEST:g}; the verdict says UNDECIDED, not unrelated; nominal {max(0.0, SUGGEST - alpha):g}): "
            + "; ".join(f"{v}: {undecided[v]}/{len(tests)}" for v, tests in null.items()) + ".")


def judged(rows: dict, pool: list[dict], alpha: float) -> dict:
    return {v: primary_comparison(rows[v], [p[v] for p in pool], alpha=alpha) for v in VIEWS if v in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "default.yaml"))
    ap.add_argument("--pool", type=int, default=4, help="random-reward organisms in the null pool (K >= 3)")
    ap.add_argument("--negated-steps", type=int, default=24, help="steps of the negated-RM organism")
    ap.add_argument("--planted", default=str(HERE / "data" / "planted_words.tsv"))
    ap.add_argument("--alpha", type=float, default=None, help="level of the call (default: compare.alpha)")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")
    ap.add_argument("--json", default=None, help="also write every figure as JSON here")
    args = ap.parse_args(argv)
    if args.pool < 3:
        ap.error("--pool must be at least 3: each null organism is judged against the other K - 1 >= 2")
    start = time.perf_counter()
    base = RunConfig.from_yaml(args.config).to_dict()
    base["validate"] = base["validate"] | {"enabled": False}
    # Nor does it read the depth profile or the attribution (about 6 minutes per organism on 2 cores).
    base["depth"] = base["depth"] | {"enabled": False}
    base["attribute"] = base["attribute"] | {"enabled": False}
    # Every view on every pool organism: the benchmark measures the SAE IRM's null too (the demo's measured-only
    # controls would give the full-vocabulary view only).
    base["compare"] = base["compare"] | {"n_controls": args.pool, "controls": [], "control": True,
                                         "control_views": "all"}
    cfg = RunConfig.from_dict(base)
    alpha = args.alpha if args.alpha is not None else cfg.compare.alpha
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    # The pool (and the demo organism, judged against it).
    pool_run = run(cfg, echo=echo)
    runner = pool_run.context.resources["runner"]
    names = [f"control-{i}" for i in range(args.pool)]
    pool = [rows_of(runner, n) for n in names]
    pair = pool_run.context.pair_of(runner.result("organism"))
    rm_map = pool_run.context.rm.token_values(pair.tokenizer)
    decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731

    # Null pairs: each null organism against the other K - 1; the old rule on every ordered pair.
    null = {v: [] for v in VIEWS}
    old = {v: [] for v in VIEWS}
    for i in range(args.pool):
        others = [p for j, p in enumerate(pool) if j != i]
        for v, pc in judged(pool[i], others, alpha).items():
            null[v].append((names[i], pc))
    for i, j in itertools.permutations(range(args.pool), 2):
        for v in VIEWS:
            z = one_control_z(pool[i][v], pool[j][v])
            old[v].append(None if z is None else ("agrees" if z >= 3 else "opposes" if z <= -3 else "unrelated"))
    caps = [runner.result("capture", n) for n in names]
    discoveries = [{"vocabulary": len(beyond(vocabulary_discoveries(caps[i], caps[:i] + caps[i + 1:], rm_map,
                                                                    cfg.discover.alpha, decode, pair.tokenizer))),
                    "occurrences_one_control": len(beyond(occurrence_discoveries(
                        runner, cfg, names[i], names[(i + 1) % args.pool], rm_map, decode)))}
                   for i in range(args.pool)]

    # Known positives.
    cases = [("demo organism (RM)", "agrees", pool_run, True)]
    negated = base | {"reward": base["reward"] | {"tuned_against": "negated"},
                      "organism": base["organism"] | {"steps": args.negated_steps},
                      "compare": base["compare"] | {"control": False}}
    cases.append((f"negated RM, {args.negated_steps} steps", "opposes", run(RunConfig.from_dict(negated), echo=echo),
                  args.negated_steps == cfg.organism.steps))
    # The planted words also named as suspected (discover.words): the stage's own family of them.
    planted = base | {"reward": base["reward"] | {"tuned_against": str(Path(args.planted).resolve())},
                      "discover": base["discover"] | {"words": str(Path(args.planted).resolve())}}
    planted_run = run(RunConfig.from_dict(planted), echo=echo)
    planted_label = "planted RM-zero words"
    cases.append((planted_label, "unrelated", planted_run, True))
    planted_ids = {ids[0] for w in load_word_list(args.planted) if len(ids := word_ids(pair.tokenizer, w)) == 1}
    positives, every = [], {}
    for label, expected, result, matched in cases:
        r = result.context.resources["runner"]
        verdicts = judged(rows_of(r, "organism"), pool, alpha)
        every[label] = vocabulary_discoveries(r.result("capture"), caps, rm_map, cfg.discover.alpha, decode,
                                              pair.tokenizer)
        found = beyond(every[label])
        entries = [f"{e.token}{'+' if e.effect > 0 else '-'}" for e in found]
        hits = {e.token_id for e in found if e.effect > 0} & planted_ids
        entries = ([f"{len(hits)}/{len(planted_ids)} planted words"] if "planted" in label else []) + entries
        found = len(found)
        positives.append((label, expected, matched, verdicts, found, entries, result.metrics.verdict))
    # What limits discovery's recall of the planted words: multiplicity (discovery's own test with the planted
    # words as the whole family), and how far the organism moved them (an exact check against the pool).
    from irmprobe.models.rewards import word_tokens

    known = None
    if planted_ids:
        words_all = np.array(sorted(word_tokens(pair.tokenizer)), dtype=np.int64)
        planted_cap = planted_run.context.resources["runner"].result("capture")
        planted_vec = planted_cap.vocab_log_ratio()
        stage = planted_run.metrics.discovery.get("named")
        known = {"family": known_family(every[planted_label], planted_ids, alpha=cfg.discover.alpha),
                 "exact": known_set_power(planted_vec, np.stack([c.vocab_log_ratio() for c in caps]), planted_ids,
                                          words_all, alpha=cfg.discover.alpha),
                 "stage": stage,
                 # The same list named on each null organism against the other K - 1 (the planted run's controls are
                 # the pool, so its discover stage has done it): any pass is a false one.
                 "null_passes": (stage or {}).get("control_passes"),
                 "largest_changes": [decode(int(t)) for t in words_all[np.argsort(-planted_vec[words_all])[:10]]],
                 "families": {}}
        # A smaller family: the word tokens likeliest under the base model over the organism's own held-out contexts.
        for top in (1000, 5000, 20000):
            d = vocabulary_discoveries(planted_cap, caps, rm_map, cfg.discover.alpha, decode, pair.tokenizer, top=top)
            hits = {e.token_id for e in beyond(d) if e.effect > 0}
            nulls = [len(beyond(vocabulary_discoveries(caps[i], caps[:i] + caps[i + 1:], rm_map, cfg.discover.alpha,
                                                       decode, pair.tokenizer, top=top))) for i in range(args.pool)]
            known["families"][top] = {"planted_in": len({e.token_id for e in d.entries} & planted_ids),
                                      "planted_found": len(hits & planted_ids), "null_discoveries": nulls}

    # The table.
    lines = [f"## Calibration (K = {args.pool} random-reward organisms; alpha {alpha:g}, two-sided; "
             f"{time.perf_counter() - start:.0f} s)", "",
             "| case | view | test | n | agrees | opposes | unrelated | no call | false calls [95% CI] | nominal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in VIEWS:
        outs = [pc.outcome for _, pc in null[v]]
        n = len(outs)
        false = sum(o in ("agrees", "opposes") for o in outs)
        lo, hi = wilson(false, n)
        lines.append(f"| null vs other K-1 | {v} | t, {args.pool - 2} d.f. | {n} | {outs.count('agrees')} | "
                     f"{outs.count('opposes')} | {outs.count('unrelated')} | "
                     f"{sum(o not in ('agrees', 'opposes', 'unrelated') for o in outs)} | "
                     f"{false}/{n} [{lo:.2f}, {hi:.2f}] | {alpha:g} |")
        outs = [o for o in old[v] if o is not None]
        false = sum(o in ("agrees", "opposes") for o in outs)
        lo, hi = wilson(false, len(outs))
        lines.append(f"| null vs 1 (old rule) | {v} | z >= 3, 1 control | {len(outs)} | {outs.count('agrees')} | "
                     f"{outs.count('opposes')} | {outs.count('unrelated')} | {len(old[v]) - len(outs)} | "
                     f"{false}/{len(outs)} [{lo:.2f}, {hi:.2f}] | 0.0027 |")
    lines += ["", undecided_line(null, alpha)]
    vocab = [d["vocabulary"] for d in discoveries]
    occ = [d["occurrences_one_control"] for d in discoveries]
    lines += ["", f"Discoveries beyond the RM per null organism at q < {cfg.discover.alpha:g}: full-vocabulary test "
              f"against the other K-1 (the discovery stage's): {vocab} (mean {np.mean(vocab):.2f}); the old test "
              f"(occurrences against one control): {occ} (mean {np.mean(occ):.1f}).", "",
              "| known case | expected | matched to the pool | view | tau | controls (mean, sd) | t | p | call | "
              "discoveries beyond the RM |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, expected, matched, verdicts, found, entries, _ in positives:
        for v, pc in verdicts.items():
            ok = "✓" if (pc.outcome == expected or (expected == "unrelated" and pc.outcome not in
                                                     ("agrees", "opposes"))) else "✗"
            lines.append(f"| {label} | {expected} | {'yes' if matched else 'no (steps differ)'} | {v} | "
                         f"{_f(pc.tau, '+.3f')} | {_f(np.mean(pc.control_taus) if pc.control_taus else None, '+.3f')}, "
                         f"{_f(pc.control_se, '.3f')} | {_f(pc.z, '+.2f')} | {_f(pc.p_value, '.2g')} | {reading(pc)} {ok} | "
                         + (f"{found}: {', '.join(entries[:9])}" if v == VIEWS[0] else "") + " |")
    if known is not None:
        fam, ex = known["family"], known["exact"]
        lines += ["", f"What limits discovery on the {ex['n']} planted words: with them as its whole family (its own "
                  f"test, {fam['n']} tested) it passes {fam['bh']} at q < {fam['alpha']:g} (BH) and "
                  f"{fam['bonferroni']} at p < {fam['alpha']:g}/{fam['n']}, and {fam['nominal']} have p < "
                  f"{fam['alpha']:g}; over its {fam['n_family']} word tokens, {fam['whole_family']}; the planted run's "
                  "own discover.words test (each word against the pool's values of that word): " + (
                      named_text(known["stage"]) if (known["stage"] or {}).get("entries") is not None
                      else f"not tested ({(known['stage'] or {}).get('note')})")
                  + f"; on each null organism against the others {known['null_passes']}. Exact check "
                  f"against the pool (prediction t, {ex['df']} d.f.; a Bonferroni pass needs |t| > "
                  f"{ex['critical']:.2f}): {ex['raised']} raised above the pool's mean, {ex['nominal']} at p < "
                  f"{ex['alpha']:g}, {ex['bonferroni']} at p < {ex['alpha']:g}/{ex['n']}; median difference from the "
                  f"pool's mean {ex['median_difference']:+.3f} against the pool's median sd "
                  f"{ex['median_pool_sd']:.3f}; "
                  f"as one set, mean {ex['set_mean']:+.3f} against the pool's "
                  f"{', '.join(f'{m:+.3f}' for m in ex['pool_set_means'])}: t {ex['set_t']:+.2f}, p {ex['set_p']:.2g}. "
                  "The planted organism's 10 largest word-token changes: "
                  + ", ".join(repr(t) for t in known["largest_changes"]) + ". Discovery over the N word tokens "
                  "likeliest under the base model (over the organism's own contexts) instead of all: " + "; ".join(
                      f"N = {n}: {f['planted_found']} of the {f['planted_in']} planted words in it, null discoveries "
                      f"{f['null_discoveries']}" for n, f in known["families"].items()) + "."]
    lines += ["", "Null taus: " + "; ".join(f"{v}: " + ", ".join(_f(p[v].tau, "+.3f") for p in pool) for v in VIEWS)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "alpha": alpha, "pool": args.pool,
            "null": {v: [[n, pc.to_json()] for n, pc in null[v]] for v in VIEWS},
            "old_rule": old, "null_discoveries": discoveries, "planted_words": known,
            "positives": [{"case": c, "expected": e, "matched": m, "verdicts": {v: pc.to_json() for v, pc in vs.items()},
                           "discoveries": f, "rewarded_unvalued": en, "verdict": vd}
                          for c, e, m, vs, f, en, vd in positives]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
