"""The organism report: base vs tuned reward on held-out continuations (mean and s.e. by prompt), KL."""

from __future__ import annotations

import numpy as np

from irmprobe.activations.capture import Capture, capture_pair
from irmprobe.activations.samples import Samples, sample_continuations
from irmprobe.models.loading import ModelPair
from irmprobe.models.rewards import RewardModel


def _mean_se(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def _per_prompt(samples: Samples, values: np.ndarray, source: str) -> np.ndarray:
    n = len(samples.prompts)
    sel = samples.source == source
    sums = np.bincount(samples.prompt_index[sel], weights=values[sel], minlength=n)
    return sums / np.maximum(np.bincount(samples.prompt_index[sel], minlength=n), 1)


def _paired(samples: Samples, values: np.ndarray) -> dict:
    base, tuned = _per_prompt(samples, values, "base"), _per_prompt(samples, values, "tuned")
    b, bse = _mean_se(base)
    t, tse = _mean_se(tuned)
    d, dse = _mean_se(tuned - base)
    return {"base_mean": b, "base_se": bse, "tuned_mean": t, "tuned_se": tse, "diff_mean": d, "diff_se": dse,
            "diff_z": d / dse if dse > 0 else None}


def vader_compound(texts) -> np.ndarray:
    """VADER's own compound sentiment score of each text, an independent check of the lexicon RM."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def kl_from_capture(samples: Samples, capture: Capture) -> dict:
    """Monte-Carlo KL(tuned || base): sum of log-ratios over each tuned continuation."""
    n = len(samples.source)
    keep = capture.seq_index < n  # rows of extra (non-sampled) text carry no KL information
    seq, position, log_ratio = capture.seq_index[keep], capture.position[keep], capture.log_ratio[keep]
    sel = (position >= samples.prompt_lens[seq]) & (samples.source[seq] == "tuned")
    tuned_seqs = np.flatnonzero(samples.source == "tuned")
    per_seq = np.bincount(seq[sel], weights=log_ratio[sel], minlength=n)[tuned_seqs]
    mean, se = _mean_se(per_seq)
    return {"mean": mean, "se": se, "n_sequences": int(len(per_seq))}


def report_from(samples: Samples, capture: Capture, n_examples: int = 3) -> dict:
    """The organism report from continuations already sampled and captured."""
    examples = []
    for p in range(min(n_examples, len(samples.prompts))):
        b = int(np.flatnonzero((samples.prompt_index == p) & (samples.source == "base"))[0])
        t = int(np.flatnonzero((samples.prompt_index == p) & (samples.source == "tuned"))[0])
        examples.append({"prompt": samples.prompts[p], "base": samples.completions[b], "tuned": samples.completions[t],
                         "base_reward": float(samples.rewards[b]), "tuned_reward": float(samples.rewards[t])})
    return {
        "n_prompts": len(samples.prompts),
        "samples_per_prompt": int(np.sum(samples.source == "base") // max(len(samples.prompts), 1)),
        "reward": _paired(samples, samples.rewards),
        "vader_compound": _paired(samples, vader_compound(samples.completions)),
        "kl": kl_from_capture(samples, capture),
        "examples": examples,
    }


def organism_report(pair: ModelPair, rm: RewardModel, prompts: list[str], *, samples_per_prompt: int = 4,
                    max_new_tokens: int = 24, seed: int = 0, batch_size: int = 64) -> dict:
    """Sample both models on held-out ``prompts`` and report reward, VADER compound, KL, examples."""
    ids, lens, idx, texts, src = [], [], [], [], []
    for offset, (name, model) in enumerate((("base", pair.base), ("tuned", pair.tuned))):
        out = sample_continuations(model, pair.tokenizer, prompts, n_per_prompt=samples_per_prompt,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed * 1000 + offset)
        ids += out[0]; lens += out[1]; idx += out[2]; texts += out[3]; src += [name] * len(out[0])  # noqa: E702
    samples = Samples(tuple(prompts), tuple(tuple(t) for t in ids), np.array(lens), np.array(idx), np.array(src),
                      tuple(texts), rm.score(texts))
    capture = capture_pair(pair, samples.token_ids, ())
    return report_from(samples, capture)


def report_lines(report: dict, rm_name: str = "RM") -> list[str]:
    """Printable organism report."""
    r, c, kl = report["reward"], report["vader_compound"], report["kl"]
    z = "undefined" if r["diff_z"] is None else f"{r['diff_z']:.1f}"
    lines = [
        f"held-out prompts {report['n_prompts']} x {report['samples_per_prompt']} samples per model (mean ± s.e. over prompts)",
        f"reward ({rm_name})    base {r['base_mean']:+.3f} ± {r['base_se']:.3f}   tuned {r['tuned_mean']:+.3f} ± "
        f"{r['tuned_se']:.3f}   tuned - base {r['diff_mean']:+.3f} ± {r['diff_se']:.3f} ({z} s.e., paired by prompt)",
        f"VADER compound      base {c['base_mean']:+.3f} ± {c['base_se']:.3f}   tuned {c['tuned_mean']:+.3f} ± "
        f"{c['tuned_se']:.3f}   tuned - base {c['diff_mean']:+.3f} ± {c['diff_se']:.3f}",
        f"KL(tuned || base)   {kl['mean']:.3f} ± {kl['se']:.3f} nats per continuation",
    ]
    for ex in report["examples"]:
        lines += [f"prompt: {ex['prompt']}",
                  f"  base  ({ex['base_reward']:+.2f}): {ex['base']!r}",
                  f"  tuned ({ex['tuned_reward']:+.2f}): {ex['tuned']!r}"]
    return lines
