#!/usr/bin/env python
"""The causal call's error rates on planted models, through the ablate stage's own sampling and rule.

``benchmarks/ablation_stopping.py`` measures the rule on simulated rewards in which every random feature set
removes exactly nothing. Here the rewards come from real models sampling with real SAE features spliced out
(:func:`irmprobe.validation.ablation.paired_rows`, then :func:`irmprobe.validation.ablation.against_random`, as
the stage calls them), so random sets differ in what they remove, as they do in a real model.

Each replicate (seed s = ``--seed`` + 1000 x scale index + r) builds a random 4-block Llama (hidden 32, the
1,000-token BPE of ``benchmarks/gpu_pipeline.py``) whose unembedding gives five words one direction u; the tuned
model adds ``--strength`` x u to block 2's MLP output (the RM: one point per planted word, so the tuned model gains
reward). The SAE spliced at that MLP output has 63 random features (encoder scale ``--scales``: how much each random
feature writes, so how much random sets differ) and one planted feature that always fires and writes ``--carried`` x
strength x u (the replicate of seed s takes the (s mod n)-th value): ablating it removes that part of the reward's
write (the rest stays in the SAE's error, which the splice keeps). The demo's design: 4 targeted sets (Bonferroni
over 4) and 4 random sets of each of their sizes (6 and 10), 80 prompts, 4 to at most 8 samples per
prompt until every random set's share has a 95% CI half-width of at most 0.15. Unlike the demo: continuations of
12 tokens (the demo's 24), batches of 64 rows, and no patching-bound, reconstruction or steering condition (none
enters the rule). Targeted sets whose answer is known:

- ``planted_10``, ``planted_6``: the planted feature and 9 (5) random features; the answer is yes;
- ``null_10``, ``null_6``: features drawn as the random sets are, from the features no planted set holds, so
  exchangeable with them; the answer is no: a call says the set stands above random sets of its size, which it
  does not.

Two rules are applied to the same rows: the stage's (``against_random``: the set's Bonferroni interval wholly above
the 2.5-97.5 percentile range of the random sets' shares) and, for comparison, a t prediction test
(:func:`prediction_bound`), exact for normal exchangeable shares however much random sets differ. Rates are per
set, with exact binomial 95% CIs over replicates (each replicate gives one call per set); "family-wise": any of a
replicate's two null sets called; the known-null check's eight calls per replicate are not independent, so its rate
has a bootstrap CI over replicates. Each scale has models of its own (seeds ``--seed`` + 1000 x scale index + r).

    python benchmarks/causal_calibration.py                      # 45 replicates per scale (about 18 minutes)
    python benchmarks/causal_calibration.py --reps 10 --scales 0.3
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per sampling call would drown the table

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import binomtest, bootstrap, t  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_pipeline import small_tokenizer  # noqa: E402

from irmprobe.models.rewards import LexiconRM  # noqa: E402
from irmprobe.prompts import load_prompts  # noqa: E402
from irmprobe.validation.ablation import FeatureSet, against_random, paired_rows  # noqa: E402

LAYER, D_MODEL, D_SAE = 2, 32, 64
TARGETED = ("planted_10", "planted_6", "null_10", "null_6")


def planted_words(tokenizer, n: int = 5) -> tuple[list[str], list[int]]:
    """The first ``n`` whole-word tokens of four or more letters in the tokenizer's vocabulary (by id)."""
    vocab = tokenizer.get_vocab()
    words = sorted((w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 4),
                   key=lambda w: vocab["Ġ" + w])[:n]
    return words, [vocab["Ġ" + w] for w in words]


def planted_setup(tmp: Path) -> tuple[object, list[str], list[int]]:
    """(tokenizer, planted words, their ids) for the planted models, torch at no more than 2 threads (the 2-core
    machine these rates were measured on)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tokenizer = small_tokenizer(tmp)
    return (tokenizer, *planted_words(tokenizer))


def planted_case(tokenizer, ids: list[int], seed: int, strength: float, carried: float, feature_scale: float):
    """(base, tuned, sae): the tuned model writes ``strength`` x u at block ``LAYER``'s MLP output; the SAE's
    feature 0 always fires and writes ``carried`` x strength x u there; its other features are random."""
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, mlp_bias=True)
    base = LlamaForCausalLM(cfg).eval()
    u = torch.randn(D_MODEL)
    u /= u.norm()
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
        base.lm_head.weight *= 30.0  # a random tiny model's logits are near-uniform: sharpen them
        base.lm_head.weight[ids] = 3.0 * u + 0.1 * base.lm_head.weight[ids]
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[LAYER].mlp.down_proj.bias += strength * u
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, D_SAE) * feature_scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        w = torch.randn(D_SAE, D_MODEL)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc[:, 0] = 0.0
        sae.b_enc[0] = carried * strength
        sae.W_dec[0] = u
    return base, tuned, sae


def design(seed: int) -> tuple[list[FeatureSet], tuple[str, ...]]:
    """The demo's design: 4 targeted sets (see the module's docstring), then 4 random sets of each size. The null
    sets and the random sets are drawn alike, each from the features no planted set holds, so that a null set is
    exchangeable with the random sets of its size (they may share features, as random sets may)."""
    rng = np.random.default_rng(seed)
    others = np.arange(1, D_SAE)

    def draw(pool, n):
        return tuple(int(i) for i in rng.choice(pool, n, replace=False))

    chosen = {"planted_10": (0,) + draw(others, 9), "planted_6": (0,) + draw(others, 5)}
    pool = np.setdiff1d(others, chosen["planted_10"] + chosen["planted_6"])
    chosen |= {"null_10": draw(pool, 10), "null_6": draw(pool, 6)}
    sets = [FeatureSet(name, {LAYER: chosen[name]}) for name in TARGETED]
    for size in (6, 10):
        sets += [FeatureSet(f"random_{size} #{i + 1} (control)", {LAYER: draw(pool, size)}) for i in range(4)]
    return sets, TARGETED


def prediction_bound(shares: list[float], n_targeted: int, alpha: float = 0.05) -> float | None:
    """The alternative rule measured beside the stage's (not the stage's): the share a new random set of this size
    stays below with probability 1 - alpha / (2 m) (m = ``n_targeted``), the upper end of a t prediction interval
    from the random sets' ``shares``: mean + t(k - 1) x sd x sqrt(1 + 1 / k) for k sets. It is exact for normal,
    exchangeable shares, whatever makes random sets differ; None with fewer than 3 shares."""
    k = len(shares)
    if k < 3:
        return None
    level = 1 - alpha / (2 * max(1, n_targeted))
    return float(np.mean(shares) + t.ppf(level, k - 1) * np.std(shares, ddof=1) * np.sqrt(1 + 1 / k))


def prediction_calls(rows: list[dict], targeted: tuple[str, ...]) -> tuple[dict[str, bool | None], list[bool]]:
    """The prediction test's call on each targeted row (its share above :func:`prediction_bound` of the random sets
    of its size), and on each random row against the other random sets of its size (its known-null check)."""
    calls, nulls = {}, []
    for r in rows:
        if not r.get("gain_share") or not (r["set"] in targeted or r["set"].startswith("random_")):
            continue
        shares = [q["gain_share"]["share"] for q in rows if q is not r and q.get("gain_share")
                  and q["set"].startswith(f"random_{r['n_features']} ")]
        b = prediction_bound(shares, len(targeted))
        called = None if b is None else bool(r["gain_share"]["share"] > b)
        if r["set"] in targeted:
            calls[r["set"]] = called
        elif called is not None:
            nulls.append(called)
    return calls, nulls


def replicate(tokenizer, ids, words, prompts, seed: int, args) -> dict:
    carried = args.carried[seed % len(args.carried)]
    base, tuned, sae = planted_case(tokenizer, ids, seed, args.strength, carried, args.scale)
    sets, targeted = design(seed)
    rm = LexiconRM({w: 1.0 for w in words}, scale=1.0, name="planted")
    rows = paired_rows(base, tuned, tokenizer, {LAYER: sae}, sets, rm, prompts, None, samples_per_prompt=8,
                       max_new_tokens=12, seed=seed, batch_size=64, targeted=targeted, share_half_width=0.15,
                       min_samples_per_prompt=4, echo=lambda *_: None)
    rows = against_random(rows, targeted)
    by = {r["set"]: r for r in rows}
    spreads = [np.std([r["gain_share"]["share"] for r in rows if r["set"].startswith(f"random_{size} ")
                       and r.get("gain_share")], ddof=1) for size in (6, 10)]
    prediction, prediction_nulls = prediction_calls(rows, targeted)
    test = by["none"]["gain_test"]
    return {"carried": carried, "positive": bool(test["positive"]),
            "gain": test["gain"], "gain_t": test["gain"] / ((test["ci"][1] - test["ci"][0]) / (2 * 1.96)),
            "samples": by["none"]["sampling"]["samples_per_prompt"],
            "stage": {n: bool((by[n].get("random") or {}).get("above_random")) for n in targeted},
            "prediction": prediction, "prediction_nulls": prediction_nulls,
            "share": {n: (by[n].get("gain_share") or {}).get("share") for n in targeted},
            "random_sd": float(np.nanmean(spreads)),  # the random sets' spread, per size, averaged over the sizes
            "known_nulls": [bool(r["null_check"]["called"]) for r in rows if r.get("null_check")]}


def clustered_rate(calls: list[list[bool]]) -> str:
    """The share of all calls that are True, where each replicate gives several dependent calls: a 95% percentile
    bootstrap CI over replicates (the independent unit), the count, and how many replicates made any call (with
    its exact binomial CI: one yes or no per replicate)."""
    hits, counts = np.array([sum(c) for c in calls]), np.array([len(c) for c in calls])
    k, n = int(hits.sum()), int(counts.sum())
    by_replicate = rate([any(c) for c in calls])
    if len(set((hits / counts).tolist())) == 1:  # every replicate alike: the bootstrap has nothing to resample
        return f"{k / n:.3f} (no bootstrap CI: every replicate alike; {k}/{n}; by replicate: any call in " \
            f"{by_replicate})"
    ci = bootstrap((hits, counts), lambda h, c: h.sum() / c.sum(), paired=True, vectorized=False,
                   method="percentile", random_state=0).confidence_interval
    return f"{k / n:.3f} [{ci.low:.3f}, {ci.high:.3f}] ({k}/{n}; by replicate: any call in {by_replicate})"


def rate(calls: list[bool]) -> str:
    """The share of ``calls`` that are True, with its exact binomial 95% CI and the count."""
    if not calls:
        return "-"
    ci = binomtest(int(sum(calls)), len(calls)).proportion_ci(0.95)
    return f"{np.mean(calls):.3f} [{ci.low:.3f}, {ci.high:.3f}] ({sum(calls)}/{len(calls)})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=45, help="replicates (models) per feature scale")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.3],
                        help="encoder scales of the random features (larger: random sets differ more)")
    parser.add_argument("--strength", type=float, default=0.03, help="the tuned model's write along u")
    parser.add_argument("--carried", type=float, nargs="+", default=[0.1, 0.2, 1.0],
                        help="the share of that write the planted feature makes (seed s takes value s mod n)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, words, ids = planted_setup(Path(tmp))
    prompts = load_prompts()[:80]
    results = {}
    for j, scale in enumerate(args.scales):
        args.scale = scale
        started = time.perf_counter()
        # Other models at each scale (seed + 1000 j + r): the scales' replicates are independent of each other.
        reps = [replicate(tokenizer, ids, words, prompts, args.seed + 1000 * j + r, args) for r in range(args.reps)]
        done = [r for r in reps if r["positive"]]
        print(f"feature scale {scale:g}: {len(reps)} replicates ({time.perf_counter() - started:.0f} s); gain "
              f"significantly positive in {len(done)} (median {np.median([r['gain'] for r in reps]):+.3f}, "
              f"{np.median([r['gain_t'] for r in reps]):.1f} s.e.); samples per prompt "
              f"{np.mean([r['samples'] for r in reps]):.1f}; random sets' share sd (per size) median "
              f"{np.median([r['random_sd'] for r in done]):.3f}")
        for rule in ("stage", "prediction"):
            for name in TARGETED:
                groups = [(f"carried {c:g}", [r for r in done if r["carried"] == c]) for c in args.carried] \
                    if name.startswith("planted") else [("", done)]
                for label, group in groups:
                    calls = [bool(r[rule].get(name)) for r in group]
                    shares = [r["share"][name] for r in group if r["share"][name] is not None]
                    print(f"  {rule:10} {name:11} {label:13} mean share {np.mean(shares):+.2f}  called causal "
                          f"{rate(calls)}")
            nulls = [r[rule]["null_10"] or r[rule]["null_6"] for r in done]
            print(f"  {rule:10} any null set (family-wise) called {rate(nulls)}")
            key = "known_nulls" if rule == "stage" else "prediction_nulls"
            print(f"  {rule:10} known-null check (each random set against the other 3 of its size): "
                  f"{clustered_rate([r[key] for r in done if r[key]])}")
        results[scale] = reps
    return results


if __name__ == "__main__":
    main()
