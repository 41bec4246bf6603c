"""The run's summary as text: the lines the terminal prints and the report quotes."""

from __future__ import annotations

from typing import Any

from irmprobe.analysis.verdict import (
    SUGGEST,
    matched_set_text,
    matched_text,
    matched_whose,
    reading,
    sampling_text,
    seeds_hold,
    spread_needed,
    spread_rows,
)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _spread(a: dict) -> str:
    """" (the top n blocks ranked by ...; ...)" for the attribution's spread sets ("" without them)."""
    rows = spread_rows(a)
    if not rows:
        return ""
    if all(h["value"] is None for _, h in rows):
        return f" (the top n blocks ranked by {a['spread_order']['ranked_by']}; shares undefined: m(tuned) <= 0)"
    n = spread_needed(a)
    return (f" (the top n blocks ranked by {a['spread_order']['ranked_by']}; {a['threshold']:.0%} of the implicit "
            "reward needs " + (f"the top {n} blocks' MLP outputs)" if n is not None else "more than every MLP output)"))


def _interval(ci, spec: str) -> str:
    """``[low,high]``; "undefined" when the bootstrap gave no bounds (resamples with no reward gain to share)."""
    if ci is None or any(v is None for v in ci):
        return "undefined"
    return f"[{format(ci[0], spec)},{format(ci[1], spec)}]"


def _trained(row: dict) -> str:
    """Samples an SAE trained on, "stop" when held-out explained variance plateaued first (older rows: "-")."""
    if row.get("trained_samples") is None:
        return "-"
    return f"{row['trained_samples']:,}" + (" stop" if row.get("stopped_early") else "")


def plain(metrics) -> dict:
    """The JSON form of a run's typed metrics (a dict read from metrics.json is checked against the schema)."""
    from irmprobe.results import RunMetrics

    if isinstance(metrics, RunMetrics):
        return metrics.to_json()
    return RunMetrics.from_json(metrics).to_json()


def comparison_lines(metrics: dict) -> list[str]:
    """The primary comparison's and the explanation's line: the view's tau against the controls', the test, the
    outcome (and its reading where it differs: :func:`irmprobe.analysis.verdict.reading`)."""
    lines = []
    for label, p in (("primary comparison", metrics.get("primary")), ("explanation", metrics.get("explanation"))):
        if not p or p.get("tau") is None:
            continue
        se = "" if p.get("tau_se") is None else f" ± {p['tau_se']:.3f}"
        stat = ("no test" if p.get("z") is None else f"t {p['z']:+.2f} ({p['df']} d.f., p {p['p_value']:.3g})")
        against = f" vs controls {[round(t, 3) for t in p['control_taus']]}" if p.get("control_taus") else ""
        told = reading(p)
        lines.append(f"{label}: {p['view']} tau {p['tau']:+.3f}{se}{against}: {stat} -> {p['outcome']}"
                     + (f" at alpha {p['alpha']:g}" if p.get("alpha") and p.get("z") is not None else "")
                     + (f" ({told}: p <= {SUGGEST:g})" if told != p["outcome"] else "")
                     + (f" ({p['reason']})" if p.get("reason") else ""))
    return lines


def summary_lines(metrics) -> list[str]:
    """Human-readable summary of a run's :class:`irmprobe.results.RunMetrics`."""
    metrics = plain(metrics)
    lines: list[str] = []
    org = metrics["organism"]
    rw = metrics["reward"]
    lines.append("== organism ==")
    lines.append(f"tuned model      {org['source']}")
    if metrics["capture"].get("prompt_format") == "chat_template":
        lines.append("prompts          user turns of the chat template; continuations and log-ratios: the assistant "
                     "turn only")
    elif metrics["capture"].get("prompt_format") == "plain":
        lines.append("prompts          plain text (no chat template)")
    if metrics["rm"].get("token_value_rule"):
        lines.append(f"RM token values  {metrics['rm']['token_value_rule']}; {metrics['rm']['tokens_with_value']} "
                     "tokens valued")
    lines.append(
        f"reward (RM)      base {rw['base_mean']:+.3f} ± {rw['base_se']:.3f}   tuned {rw['tuned_mean']:+.3f} ± "
        f"{rw['tuned_se']:.3f}   (mean ± s.e. over {rw['n_prompts']} held-out prompts × {rw['samples_per_prompt']} samples)"
    )
    lines.append(
        f"tuned - base     {rw['diff_mean']:+.3f} ± {rw['diff_se']:.3f}  =  {_fmt(rw['diff_z'], '.1f')} s.e. (paired by prompt)"
    )
    vc = metrics["vader_compound"]
    lines.append(
        f"VADER compound   base {vc['base_mean']:+.3f} ± {vc['base_se']:.3f}   tuned {vc['tuned_mean']:+.3f} ± "
        f"{vc['tuned_se']:.3f}   (VADER's own sentence score, an independent check)"
    )
    kl = metrics["kl"]
    lines.append(f"KL(tuned || base) {kl['mean']:.3f} ± {kl['se']:.3f} nats per continuation")
    for ex in metrics["examples"][:2]:
        lines.append(f"prompt: {ex['prompt']}")
        lines.append(f"  base  ({ex['base_reward']:+.2f}): {ex['base']!r}")
        lines.append(f"  tuned ({ex['tuned_reward']:+.2f}): {ex['tuned']!r}")
    div = metrics["layers"]
    lines.append(f"== layers (divergence tuned - base, per block and submodule; * = chosen, ranked by {div['ranked_by']}) ==")
    lines.extend(div["table"])
    lines.append(
        "chosen blocks    " + ", ".join(f"{b} (|Δθ| {div['per_block'][b]:.3f})" for b in div["chosen"])
    )
    lines.extend(depth_section(metrics.get("depth") or {}, div["chosen"]))
    lines.append("== SAEs (held-out activations) ==")
    lines.append(f"{'model':<6} {'layer':>5} {'d_sae':>6} {'expl.var':>9} {'L0':>8} {'dead':>6} {'dense':>6} "
                 f"{'CE rec.':>8} {'KL':>7} {'MMCS 1x:2x':>10} {'trained on':>14}")
    for row in metrics["saes"]:
        lines.append(
            f"{row['model']:<6} {row['layer']:>5} {row['d_sae']:>6} {row['explained_variance']:>9.3f} "
            f"{row['l0']:>8.1f} {row['dead_fraction']:>6.3f} {row['dense_fraction']:>6.3f} "
            f"{_fmt(row.get('ce_loss_recovered'), '.3f'):>8} {_fmt(row.get('kl_spliced'), '.3f'):>7} "
            f"{_fmt(row.get('mmcs_small_vs_large'), '.3f'):>10} {_trained(row):>14}"
        )
    for row in metrics.get("sae_layers", []):
        lines.append(f"layer {row['layer']}: {row['tuned_only_features']} tuned-model features with no base match "
                     f"(MMCS tuned vs base {row['mmcs_tuned_vs_base']:.3f})")
    irm = metrics["irm"]
    lines.append(f"== IRM views vs RM, out of fold (every view cross-fitted on two halves of the prompts, the "
                 f"independent unit: each of {irm['n_heldout_rows']} rows outside the prompts, of {irm['n_rows']}, scored by a model "
                 "fitted on the other half; prompt rows, shared by every sequence of their prompt, are fitted on and "
                 "never scored; Kendall tau paired by token with a 95% CI by cluster bootstrap over prompts (the full "
                 "vocabulary's: over token types); sign accuracy on RM+/RM- tokens; text tau = IRM text score vs RM "
                 "reward of each generation, out of fold) ==")
    has_control = any(r.get("control_tau") is not None or r.get("control_is_zero") for r in metrics["agreement"])
    head = (f"{'view':<22} {'family':<11} {'tokens':>6} {'tau':>7} {'95% CI':>17} {'p':>8} {'rho':>6} "
            f"{'sign+':>5} {'sign-':>5} {'text tau':>8} {'R2 test':>7}")
    lines.append(head + (f" {'control':>7} {'above':>7}" if has_control else ""))
    for row in metrics["agreement"]:
        lines.append(agreement_line(row, has_control))
    lines.append("baseline_shuffled: its interval is the RANGE (min, max) of tau over its fits, not a confidence interval.")
    if metrics.get("full_vocabulary"):
        lines.append("== full-vocabulary log-ratio (its own token set: every vocabulary token the RM values; not fitted) ==")
        for row in metrics["full_vocabulary"]:
            lines.append(agreement_line(row, has_control))
    for c in metrics.get("control") or []:
        made = (f"the base tuned with {c['method'].upper()} for {c['steps']} steps (lr {c['learning_rate']:g}, beta "
                f"{c['beta']:g}, batch {c['batch']}, LoRA rank {c['lora_rank']}) against {c['reward']['name']} (a random "
                "reward)" if "name" in (c.get("reward") or {}) else f"{c['path']} (named in compare.controls)")
        own = ("its own samples, forwarded once through both models (measured views only: no block captured, no "
               "SAEs or fits)" if c.get("views") == "measured" else
               f"its own samples, layers {c['layers']}, capture and SAEs")
        lines.append(f"{c['branch']}: {made}, {own}: {'MATCHED to the organism but for the reward' if c['matched'] else 'NOT known to match'}; "
                     f"RM reward tuned - base {c['reward_diff']['diff_mean']:+.3f} ± {c['reward_diff']['diff_se']:.3f}, "
                     f"KL {c['kl']['mean']:.3f}.")
    if metrics.get("control"):
        lines.append("'control' is the mean tau of the control organism(s); 'above' the view's margin over it.")
    lines.extend(comparison_lines(metrics))
    if metrics.get("discovery"):
        lines.extend(discovery_section(metrics["discovery"]))
    for name, d in (metrics.get("disagreements") or {}).items():
        lines.append(f"== where {name} and RM disagree most (token, IRM value, RM value) ==")
        for label, key in (("IRM >> RM", "irm_over_rm"), ("RM >> IRM", "rm_over_irm")):
            lines.append(f"{label}: " + ", ".join(f"{t!r} ({a:+.2f}, {b:+.2f})" for t, a, b, _ in d[key]))
    fa = metrics.get("feature_alignment")
    if fa:
        lines.append("== feature alignment (sae_irm weight vs correlation with RM value; top tokens) ==")
        for label, key in (("IRM rewards, RM does not (candidate reward hacking)", "irm_not_rm"),
                           ("RM tracks, IRM does not reward", "rm_not_irm")):
            lines.append(label + ":")
            for e in fa[key][:5]:
                lines.append(f"  {e['feature']:<14} weight {e['weight']:+.4f}  RM corr {e['rm_corr']:+.3f}  "
                             f"freq {e['frequency']:.3f}  {e['top_tokens']}")
    val = metrics.get("validation")
    if val:
        cross = val["cross"]
        lines.append(f"== validation: {val['judge']} judge on {cross['n_judged']} features (IRM top-{cross['n_irm_top']} "
                     "included) ==")
        lines.append(f"flagged {cross['n_flagged']}; overlap with IRM top-k {cross['overlap']}; precision "
                     f"{_fmt(cross['precision'], '.2f')}, recall {_fmt(cross['recall'], '.2f')}, Cohen's kappa "
                     f"{_fmt(cross['kappa'], '+.2f')}; detection (balanced acc.) {_fmt(cross.get('detection_mean'), '.2f')}")
        lines.append(f"activation frequency: flagged {_fmt(cross['flagged_frequency'], '.4f')} vs dictionary mean "
                     f"{cross['dictionary_frequency']:.4f}")
        for r in [r for r in val["judged"] if r["in_irm_top_k"]][:5]:
            lines.append(f"  {r['feature']:<14} w {r['weight']:+.4f} {'FLAGGED' if r['relevant'] else '       '} "
                         f"{r['explanation'][:90]}")
    if metrics.get("attribution") and "skipped" not in metrics["attribution"]:
        lines.extend(attribution_section(metrics["attribution"]))
    if val and val.get("ablation"):
        lines.append("== ablation in the tuned model (RM reward of continuations, paired by prompt & sample; share = "
                     "(tuned - row) / (tuned - base): the share of the reward gain the row removes, 95% bootstrap CI) ==")
        if (design := sampling_text(val["ablation"])) is not None:
            lines.append(design)
        lines.extend(ablation_table(val["ablation"]))
    lines.append("== verdict ==")
    lines.extend(metrics["verdict"])
    lines.append("== stage times (s; * = reused from the cache) ==")
    status = metrics.get("stage_status", {})
    lines.append("  ".join(f"{k}{'*' if status.get(k) == 'reused' else ''} {v:.0f}"
                           for k, v in metrics["stage_seconds"].items()))
    return lines


_CATEGORY_TEXT = {"rewarded_unvalued": "rewarded, RM zero", "rewarded_against": "rewarded against the RM",
                  "penalised_unvalued": "penalised, RM zero", "penalised_against": "penalised against the RM"}


def ablation_table(rows: list[dict]) -> list[str]:
    """The ablation rows as a table: set, mode, features, reward and share of the gain with their CIs. Names are cut
    at 44 characters, or at the longest random set's (up to 64), whose ``#i`` tells its draws apart."""
    w = min(64, max([44] + [len(r["set"]) for r in rows if r["set"].startswith("random_")]))
    lines = [f"{'set':<{w}} {'mode':<6} {'n':>3} {'reward':>8} {'95% CI':>17} {'share':>7} {'95% CI':>17}"]
    for r in rows:
        rw, g = r["reward"], r.get("gain_share")
        g_text = f"{g['share']:>+7.2f} {_interval(g['ci'], '+.2f'):>17}" if g else f"{'-':>7} {'-':>17}"
        lines.append(f"{r['set'][:w]:<{w}} {r['mode'][:6]:<6} {r['n_features']:>3} {rw['mean']:>+8.3f} "
                     f"{_interval(rw['ci'], '+.3f'):>17} {g_text}")
    return lines


def discovery_section(d: dict) -> list[str]:
    """What the RM does not explain: discovered tokens, concepts, the RM's share of the IRM, pairwise accuracy."""
    vs = d["control"] or "zero (no control organism)"
    if d.get("test") == "vocabulary_vs_controls":
        lines = [f"== what the RM does not explain (every word token's full-vocabulary log-ratio against the controls "
                 f"{vs}; Benjamini-Hochberg q < {d['alpha']:g}, RM-valued and unvalued tokens apart; by effect) =="]
    else:
        lines = [f"== what the RM does not explain (generated tokens, one per distinct context; log-ratio vs {vs}, "
                 f"Welch t, Benjamini-Hochberg q < {d['alpha']:g}) =="]
    v = d["variance"]
    if v.get("residual_share") is not None:
        lines.append(f"the RM explains {max(v['linear'], v['monotone']):.1%} of the primary IRM's held-out variance "
                     f"(linear {v['linear']:.3f}, monotone {v['direction']} {v['monotone']:.3f}; cross-fitted by "
                     f"prompt, {v['n']} rows): {v['residual_share']:.1%} is not the RM")
    else:
        lines.append(f"RM share of the IRM's variance: {v.get('note')}")
    lines.append(f"{d['n_tested']} of {d['n_tokens_seen']} {'word' if d.get('test') == 'vocabulary_vs_controls' else 'generated'}"
                 " tokens tested; discoveries: "
                 + ", ".join(f"{k} {n}" for k, n in d["counts"].items()))
    for cat, label in _CATEGORY_TEXT.items():
        entries = d["entries"].get(cat) or []
        if entries:
            lines.append(f"{label}: " + ", ".join(
                f"{e['token']!r} {e['irm_value']:+.2f} [{e['ci_low']:+.2f},{e['ci_high']:+.2f}] RM "
                f"{_fmt(e['rm_value'], '+.1f')} n {e['count']} ctrl {_fmt(e['control_value'], '+.2f')} q {e['q']:.1e}"
                for e in entries))
    for c in d["concepts"]:
        lines.append(f"concept {c['feature']:<14} weight {c['weight']:+.4f}  RM corr {c['rm_corr']:+.3f}  q "
                     f"{c['min_q']:.1e}  tokens {', '.join(repr(t) for t in c['labels'])}")
    for label, key in (("IRM >> RM (residual)", "irm_over_rm"), ("RM >> IRM (residual)", "rm_over_irm")):
        if d["residual"].get(key):
            lines.append(f"{label}: " + ", ".join(f"{r['token']!r} ({r['residual']:+.2f})" for r in d["residual"][key]))
    lines.append(f"== the IRM as a reward model: pairwise accuracy on {d['pairs_source']} ==")
    return lines + pairwise_lines(d["pairwise"])


def pairwise_lines(rows: list[dict]) -> list[str]:
    """The pairwise-accuracy table: each scorer's accuracy (Wilson 95% CI) and agreement with the RM's choice."""
    lines = [f"{'scorer':<36} {'accuracy':>8} {'95% CI':>15} {'pairs':>6} {'ties':>5} {'agrees w/ RM':>12} "
             f"{'95% CI':>15}"]
    label = {"sae_irm": "sae_irm (IRM text score)", "log_ratio_sum": "log-ratio sum (DPO implicit reward)",
             "rm": "RM (reference)"}
    ci = lambda c: f"[{c[0]:.2f},{c[1]:.2f}]" if c else "-"  # noqa: E731
    for r in rows:
        lines.append(f"{label.get(r['scorer'], r['scorer']):<36} {_fmt(r['accuracy'], '.3f'):>8} {ci(r['ci']):>15} "
                     f"{r['n']:>6} {r['n_ties']:>5} {_fmt(r['agreement'], '.3f'):>12} {ci(r['agreement_ci']):>15}")
    return lines


def agreement_line(row: dict, control: bool = False) -> str:
    """One row of the views table."""
    start = f"{row['name'][:22]:<22} {row.get('family', ''):<11} {row['n_tokens']:>6}"
    if row["is_zero"]:
        return start + "   identically zero: no implicit reward learned"
    if row.get("tau") is None:
        return start + f"   no figure: {row.get('note')}"
    ci = row.get("tau_ci") or row.get("tau_range")
    if ci and None in ci:  # a CI that could not be computed (too few tokens) is stored as nulls
        ci = None
    ci_text = (("range " if row.get("tau_range") and not row.get("tau_ci") else "") + f"[{ci[0]:+.3f},{ci[1]:+.3f}]"
               if ci else "-")
    p = f"{row['p_value']:.1e}" if row.get("p_value") is not None else "-"
    line = (f"{start} {row['tau']:>+7.3f} {ci_text:>17} {p:>8} {_fmt(row.get('spearman'), '+.3f'):>6} "
            f"{_fmt(row.get('sign_acc_pos'), '.2f'):>5} {_fmt(row.get('sign_acc_neg'), '.2f'):>5} "
            f"{_fmt(row.get('text_tau'), '+.3f'):>8} {_fmt(row.get('test_r2'), '.3f'):>7}")
    if control:
        ctrl = "zero" if row.get("control_is_zero") else _fmt(row.get("control_tau"), "+.3f")
        line += f" {ctrl:>7} {_fmt(row.get('above_control'), '+.3f'):>7}"
    return line


def depth_section(d: dict, chosen) -> list[str]:
    """Per block: the out-of-fold R^2 of r_t from the residual stream's change (direct path, logit lens)."""
    if "direct" not in d:
        return [f"== depth: skipped ({d['skipped']}) ==" if d.get("skipped") else "== depth: not run =="]
    lens = "lens" in d
    lines = [f"== depth (out-of-fold R^2 of r_t from the residual stream's change after each block; "
             f"{d['n_rows']} rows of {d['n_prompts']} held-out prompts, 95% CI over prompts; * = chosen) ==",
             f"{'block':>6} {'direct':>7} {'95% CI':>17}" + (f" {'lens':>7} {'95% CI':>17}" if lens else "")]
    for b, value in enumerate(d["direct"]["r2"]):
        lines.append(f"{b:>5}{'*' if b in chosen else ' '} {_fmt(value, '+.3f'):>7} "
                     f"{_interval(d['direct']['ci'][b], '+.2f'):>17}"
                     + (f" {_fmt(d['lens']['r2'][b], '+.3f'):>7} {_interval(d['lens']['ci'][b], '+.2f'):>17}"
                        if lens else ""))
    return lines


def attribution_section(a: dict) -> list[str]:
    """Which nodes carry the implicit reward: IG against exact patching, and the faithfulness curves."""
    c, r = a["curves"], a["rank_half"]
    change = a.get("dictionary") == "change"
    nodes = "features and error terms of dictionaries of the change" if change else "SAE features and error terms"
    lines = [f"== what carries the implicit reward ({a['kind']} {nodes} at blocks "
             f"{', '.join(map(str, a['layers']))}; metric: mean implicit reward of tuned minus base continuations, "
             "teacher-forced) =="]
    for d in a.get("dictionaries") or []:
        lines.append(f"change dictionary at block {d['layer']}: {d['d_sae']} features trained on x_tuned - x_base "
                     f"(its norm {d['change_norm_share']:.2f} of the tuned activation's); held-out prompts: explained "
                     f"variance {d['explained_variance']:.3f}, L0 {d['l0']:.1f}, dead {d['dead_fraction']:.2f}")
    lines += [f"ranking half ({a['n_prompts'][0]} prompts): m(tuned) {r['m_full']:+.2f}, m(base at every hook point) "
              f"{r['m_empty']:+.2f}; IG ({a['ig_steps']} steps) sums to {r['ig_sum']:+.2f}; exact patching of the top "
              f"{len(a['exact']['rows'])} nodes: Spearman {_fmt(a['exact']['spearman'], '+.2f')} with IG",
              f"held-out half ({a['n_prompts'][1]} prompts): the hook points carry {_fmt(c['bound']['value'], '.2f')} "
              f"{_interval(c['bound']['ci'], '.2f')} of the implicit reward; the {'dictionary' if change else 'SAE'} "
              f"errors alone {_fmt(c['errors_only']['value'], '+.2f')} {_interval(c['errors_only']['ci'], '+.2f')} "
              "of that"
              + ("" if "features_all" not in c else f", every feature (errors at base) "
                 f"{_fmt(c['features_all']['value'], '+.2f')} {_interval(c['features_all']['ci'], '+.2f')}"),
              *(["hook points considered (the base's activations patched in at every point of a set, same "
                 "prompts): " + "; ".join(f"{h['label']} {_fmt(h['value'], '.2f')} {_interval(h['ci'], '.2f')}"
                                          for h in a["hook_points"]) + _spread(a)] if a.get("hook_points") else []),
              f"{'':>6}{'every node (errors included)':^44}{'features only':^36}",
              f"{'k':>4} {'faithfulness':>13} {'completeness':>13} {'errors':>6} {'faithfulness':>15} "
              f"{'completeness':>13} {'random k-sets':>15}"]
    by_k = {r["k"]: r for r in c.get("feature_rows", [])}
    for row in c["rows"]:
        f, comp, rnd = row["faithfulness"], row["completeness"], row["random"]["range"]
        fr = by_k.get(row["k"])
        lines.append(f"{row['k']:>4} {_fmt(f['value'], '+.2f'):>13} {_fmt(comp['value'], '+.2f'):>13} "
                     f"{row['errors_in_set']:>6} "
                     f"{(_fmt(fr['faithfulness']['value'], '+.2f') if fr else '-'):>15} "
                     f"{(_fmt(fr['completeness']['value'], '+.2f') if fr else '-'):>13} "
                     f"{(f'{rnd[0]:+.2f} .. {rnd[1]:+.2f}' if rnd else '-'):>15}")
    seeds = a.get("seed_checks")
    if seeds and seeds.get("checks"):
        ranked, whose = seeds.get("matched_set"), matched_whose(seeds)
        verdict = {True: "the named set holds across them", False: "the named set does not hold across them",
                   None: "no set was named with the run's dictionaries"
                   + (f"; {matched_set_text(ranked)} are matched in each other seed's dictionaries" if ranked else "")
                   }[seeds_hold(seeds)]
        lines.append("dictionary seeds (the seeds stage; same prompts, the same dictionaries trained with other "
                     f"seeds): {verdict}")
        for c in [seeds["primary"], *seeds["checks"]]:
            k = c["smallest_k_features"]
            if k is not None:
                found = (f"smallest set reaching {seeds['threshold']:.0%}: {k} features (faithfulness "
                         f"{_fmt(c['faithfulness'], '.2f')}, completeness {_fmt(c['completeness'], '.2f')})")
            else:
                found = f"no set of <= {seeds['max_k']} reaches {seeds['threshold']:.0%}" + (
                    f" (best {c['best']['faithfulness']:.2f} at k={c['best']['k']})" if c.get("best") else "")
            lines.append(f"  {'change seed' if seeds.get('dictionary', 'change') == 'change' else 'seed'} "
                         f"{c['seed']} (block seeds {', '.join(map(str, c['block_seeds']))}): {found}; "
                         f"every feature together {_fmt(c['features_all'], '+.2f')}; the hook points carry "
                         f"{_fmt(c['bound'], '.2f')}" + matched_text(c.get("matched"), whose))
    lines.append("top nodes: " + ", ".join(f"{t['node']} {t['attribution']:+.3f}" for t in a["top"][:6]))
    for n in (a["named"] or a.get("top_features", []))[:10]:
        lines.append(f"  {n['node']:<12} {n['attribution']:+.3f}  " + " | ".join(n["contexts"][:2])[:100])
    return lines
