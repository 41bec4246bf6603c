"""``run(config)``: every stage of the IRM analysis, each cached by its config.

Stages: organism (TRL) -> pair and layer divergence -> sampled text and organism report ->
paired capture -> SAEs (SAELens) -> IRM fits (scikit-learn) -> comparison with the RM -> report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from irmprobe import reporting
from irmprobe.cache import config_key, write_json
from irmprobe.capture import capture_to_store, load_store, store_complete
from irmprobe.compare import against_control, disagreements, feature_alignment
from irmprobe.config import RunConfig
from irmprobe.evals.validate import ablate, interpret, make_judge
from irmprobe.irm import token_map
from irmprobe.organisms import load_prompts, report_from, seed_everything, split_prompts
from irmprobe.pairs import layer_divergence
from irmprobe.rewards import RewardModel, reward_model
from irmprobe.stages import (
    chat_client,
    control_stage,
    extra_texts,
    get_pair,
    get_samples,
    sae_stage,
    stage_dir,
    stage_triples,
    triple_inputs,
    triples_source,
)
from irmprobe.views import analyse, probe_inputs

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunResult:
    """What a run produced: every figure, and where it was written."""

    metrics: dict
    metrics_path: Path | None
    """None when the run stopped before the report stage."""
    state: dict | None = None
    """When the run stopped early: the live objects so far (``pair``, ``saes``, ``fit``, ``rm`` ...)."""


class _Stages:
    """Times stages, records whether each reused its cached output, and prints one line per stage."""

    def __init__(self, echo) -> None:
        self.seconds: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.echo = echo
        self.reused = False

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.echo(f"[{name}] ...")
        self.reused = False
        yield self
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.status[name] = "reused" if self.reused else "ran"
        self.echo(f"[{name}] {'reused the cached output' if self.reused else 'done'} in {self.seconds[name]:.1f} s")


STAGES = ("organism", "layers", "samples", "capture", "saes", "fit", "compare", "interpret", "ablate", "report")
"""Stage order. ``--force STAGE`` re-runs that stage and every later one; ``until`` stops after one."""


def _fit_stage(config, pair, samples, capture, saes, layers, stream, rm_map, cap_key, echo, force: bool,
               force_upstream: tuple[str, ...] = ()):
    """Every IRM view of the organism (and of the control organism), cached by everything it reads."""
    ic, cmp = config.irm, config.compare
    X, feature_names = probe_inputs(ic.inputs, capture.acts, saes, layers)
    triples_file = Path(cmp.triples_path).read_bytes() if cmp.triples_path else b""
    # The control organism is trained from the organism and prompt settings: they key the fit too.
    control = (config.organism, config.prompts, config.pair) if cmp.control_steps else None
    key = config_key("fit-v3", cap_key, config.sae, ic, cmp, config.llm if cmp.llm_triples else None,
                     sorted(rm_map.items()), config.seed, hashlib.sha256(triples_file).hexdigest(), control)
    out = stage_dir("fit", key)
    if (out / "fit.json").is_file() and not force:
        fit = json.loads((out / "fit.json").read_text())
        fit["coef"] = np.load(out / "coef.npy", allow_pickle=False)
        fit["maps"] = {name: {int(t): v for t, v in m.items()} for name, m in fit["maps"].items()}
        return fit | {"path": str(out), "key": key}, X, feature_names, True
    raw = None if ic.inputs == "raw" else probe_inputs("raw", capture.acts, saes, layers)[0]
    triples = stage_triples(config, pair, samples, rm_map) if cmp.rm_informed else None
    triple_x = triple_inputs(config, pair, saes, layers, triples, cap_key) if triples is not None else None
    main = analyse(capture, X, samples, rm_map, config, seed=config.seed, raw=raw, triple_inputs=triple_x, n_jobs=2)
    control_rows, control_info = None, None
    if cmp.control_steps and not pair.is_null:
        control_rows, control_info = control_stage(config, pair, samples, stream, layers, saes, rm_map, triples, echo,
                                                   force=force_upstream)
    keep = ("log_ratio (no model)", "sae_irm", "full_vocab_log_ratio", "shuffled_0")
    fit = {"rows": main.rows, "control_rows": control_rows, "control": control_info,
           "maps": {name: main.maps[name] for name in keep if name in main.maps},
           "fits": {name: {"alpha": f.alpha, "test_r2": f.test_r2, "is_zero": f.is_zero,
                           "n_nonzero": int(np.count_nonzero(f.coef)) if f.coef is not None else None}
                    for name, f in main.fits.items()},
           "triples": None if triples is None else {"n": len(triples), "source": triples_source(config)}}
    out.mkdir(parents=True, exist_ok=True)
    primary = main.fits["sae_irm"]
    for name, array in (("coef", primary.coef), ("scale", primary.scale)):
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, array, allow_pickle=False)
        tmp.replace(out / f"{name}.npy")
    fit["intercept"] = primary.intercept
    fit["feature_names"] = feature_names
    write_json(out / "fit.json", fit)  # written last: its presence marks the stage complete
    fit["coef"] = main.fits["sae_irm"].coef
    return fit | {"path": str(out), "key": key}, X, feature_names, False


def run(config: RunConfig, *, reward: RewardModel | None = None, echo=print, until: str | None = None,
        force: tuple[str, ...] = ()) -> RunResult:
    """Run the analysis (every stage, or up to ``until``); print a summary; write metrics JSON, the
    HTML report and a W&B run.

    Every stage reuses its cached output when its config and inputs are unchanged; an interrupted
    run resumes from the last completed stage (and within the organism and capture stages).

    Args:
        config: the analysis.
        reward: an RM object to use instead of the one ``config.reward`` names (e.g. a
            :class:`irmprobe.rewards.TextRM` wrapping your own Python function).
        echo: where progress and the summary lines go.
        until: stop after this stage (one of :data:`STAGES`); None runs everything.
        force: stages to run again even when cached; each forces every later stage too.
    """
    for name in ((until,) if until else ()) + tuple(force):
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: stages are {', '.join(STAGES)}")
    first_forced = min((STAGES.index(f) for f in force), default=len(STAGES))
    forced = lambda name: STAGES.index(name) >= first_forced  # noqa: E731
    stop = lambda name: until is not None and STAGES.index(name) >= STAGES.index(until)  # noqa: E731
    stage = _Stages(echo)
    seed_everything(config.seed)
    rm = reward if reward is not None else reward_model(config.reward, device=config.pair.device)
    pc = config.prompts
    prompts = load_prompts(pc.path, dataset=pc.dataset, column=pc.column, split=pc.split)
    train_prompts, heldout = split_prompts(prompts, pc.n_heldout, config.seed)
    partial: dict = {"config": config.to_dict(), "stage_seconds": stage.seconds, "stage_status": stage.status}

    with stage("organism") as st:
        pair, tuned_id, organism_info = get_pair(config, rm, train_prompts, echo, force=forced("organism"))
        st.reused = bool(organism_info.get("reused"))
    partial["organism"] = organism_info | {"tuned_id": tuned_id}
    if stop("organism"):
        return _stopped("organism", partial, echo)
    with stage("layers"):
        div = layer_divergence(pair, config.capture.top_k_layers, by=config.capture.rank_layers_by)
        layers = div.chosen
    partial["layers"] = {"per_block": list(div.per_block), "relative": list(div.relative), "chosen": list(layers),
                         "ranked_by": div.ranked_by, "per_submodule": {k: list(v) for k, v in div.per_submodule.items()},
                         "relative_submodule": {k: list(v) for k, v in div.relative_submodule.items()},
                         "table": div.table()}
    if stop("layers"):
        for line in div.table():
            echo(line)
        return _stopped("layers", partial, echo)
    with stage("samples") as st:
        samples, samples_key, st.reused = get_samples(config, pair, tuned_id, heldout, rm, force=forced("samples"))
    if stop("samples"):
        return _stopped("samples", partial, echo)

    with stage("capture") as st:
        cc = config.capture
        stream = list(samples.token_ids) + extra_texts(cc, pair.tokenizer)
        cap_key = config_key("capture-v4", samples_key, layers, cc.hook,
                             hashlib.sha256(json.dumps(stream[len(samples.token_ids):]).encode()).hexdigest())
        cap_dir = stage_dir("capture", cap_key)
        if forced("capture") and cap_dir.exists():
            shutil.rmtree(cap_dir)
        st.reused = store_complete(cap_dir)
        if not st.reused:
            capture_to_store(pair, stream, layers, cap_dir, hook=cc.hook, batch_size=cc.batch_size)
        capture = load_store(cap_dir)
    partial["capture"] = {"rows": int(len(capture.token_ids)), "sequences": len(samples.token_ids),
                          "hook": capture.hook, "store": str(cap_dir)}
    if stop("capture"):
        return _stopped("capture", partial, echo)

    with stage("saes") as st:
        sae_rows, layer_rows, saes, st.reused = sae_stage(config, pair, samples, capture, cap_key, tuned_id, rm,
                                                          force=forced("saes"))
    partial |= {"saes": sae_rows, "sae_layers": layer_rows}
    if stop("saes"):
        return _stopped("saes", partial, echo)

    ic, cmp = config.irm, config.compare
    rm_map = rm.token_values(pair.tokenizer)
    with stage("fit") as st:
        fit, X, feature_names, st.reused = _fit_stage(
            config, pair, samples, capture, saes, layers, stream, rm_map, cap_key, echo, forced("fit"),
            tuple(name for name in ("organism", "capture", "saes") if forced(name)))
    if stop("fit"):
        return _stopped("fit", partial | {"agreement": fit["rows"]}, echo,
                        {"pair": pair, "saes": saes, "fit": fit, "rm": rm, "rm_map": rm_map, "layers": layers,
                         "inputs": ic.inputs, "hook": config.capture.hook})

    with stage("compare"):
        agree = against_control(fit["rows"], fit["control_rows"]) if fit["control_rows"] is not None else fit["rows"]
        decode = lambda t: pair.tokenizer.decode([t])  # noqa: E731
        rm_rows = np.array([rm_map.get(int(t), 0.0) for t in capture.token_ids])
        alignment = feature_alignment(X, fit["coef"], rm_rows, capture.token_ids, decode, feature_names,
                                      n=cmp.n_alignment) if ic.inputs != "raw" else None
        disagree = {name: disagreements(fit["maps"][name], rm_map, decode, cmp.n_disagreements)
                    for name in ("sae_irm", "log_ratio (no model)") if name in fit["maps"]}
        lr_map, sae_map = fit["maps"]["log_ratio (no model)"], fit["maps"]["sae_irm"]
        counts = {t: c for t, (_, c) in token_map(capture.token_ids, capture.log_ratio, ic.min_token_count).items()}
        token_rows = [[decode(tok), rm_map[tok], counts[tok], lr_map[tok], sae_map[tok],
                       fit["maps"].get("full_vocab_log_ratio", {}).get(tok), fit["maps"]["shuffled_0"].get(tok)]
                      for tok in sorted(set(lr_map) & set(rm_map), key=lambda t: -counts[t])]

    validation = None
    vc = config.validate
    if vc.enabled and not pair.is_null and not stop("compare") and (ic.inputs != "tuned" or cc.hook != "hook_mlp_out"):
        echo("validate: skipped; it needs irm.inputs=tuned and capture.hook=hook_mlp_out (the ablation splices "
             "SAEs at the MLP output)")
    elif vc.enabled and not pair.is_null and not stop("compare"):
        # Keyed by the fit it reads (which covers everything before it) and the judge's settings.
        key = config_key("interpret-v2", fit["key"], vc.top_k, vc.n_judged, vc.judge, vc.concept,
                         config.llm if vc.judge == "llm" else None)
        with stage("interpret") as st:
            path = stage_dir("interpret", key) / "interpretation.json"
            st.reused = path.is_file() and not forced("interpret")
            if st.reused:
                validation = json.loads(path.read_text())
            else:
                judge = make_judge(config, pair, rm_map, chat_client(config) if vc.judge == "llm" else None)
                validation = interpret(config, pair, capture, X, feature_names, fit["coef"], saes, rm_map, stream,
                                       judge=judge)
                write_json(path, validation)
        if not stop("interpret"):
            with stage("ablate") as st:
                path = stage_dir("ablate", config_key("ablate-v2", key, vc, rm.describe())) / "ablation.json"
                st.reused = path.is_file() and not forced("ablate")
                if st.reused:
                    validation["ablation"] = json.loads(path.read_text())
                else:
                    validation["ablation"] = ablate(config, pair, capture, X, feature_names, saes, rm, heldout,
                                                    validation, echo=echo)
                    write_json(path, validation["ablation"])

    organism_report = report_from(samples, capture)
    reward = organism_report["reward"] | {"n_prompts": organism_report["n_prompts"],
                                          "samples_per_prompt": organism_report["samples_per_prompt"]}
    metrics = partial | {
        "reward": reward,
        "kl": organism_report["kl"],
        "vader_compound": organism_report["vader_compound"],
        "examples": organism_report["examples"],
        "irm": {"inputs": ic.inputs, "n_features": int(X.shape[1]), "n_rows": int(X.shape[0]), "fits": fit["fits"],
                "triples": fit["triples"], "path": fit["path"]},
        "pca": _pca(X, rm_rows, config.seed),
        "agreement": agree,
        "control": fit["control"],
        "control_agreement": fit["control_rows"],
        "disagreements": disagree,
        "validation": validation,
        "feature_alignment": None if alignment is None else {k: alignment[k] for k in ("irm_not_rm", "rm_not_irm")},
        "tokens": {"columns": ["token", "rm_value", "count", "log_ratio", "sae_irm", "full_vocab", "shuffled_0"],
                   "rows": token_rows},
        "rm": {"tokens_with_value": len(rm_map), **rm.describe()},
        "verdict": verdict(reward, agree, pair.is_null, validation),
    }
    if until is not None and until != "report":
        for line in reporting.summary_lines(metrics):
            echo(line)
        return _stopped(until, metrics, echo)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.report.out_dir) / f"run-{stamp}-{config_key(config)[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with stage("report"):
        wandb_dir = reporting.log_to_wandb(metrics, config.to_dict(), token_rows, project=config.report.wandb_project,
                                           mode=config.report.wandb_mode, run_dir=run_dir)
        metrics["wandb_dir"] = wandb_dir
        path = reporting.write_metrics(run_dir / "metrics.json", metrics)
        reporting.write_html(metrics, run_dir / "report.html")
    for line in reporting.summary_lines(metrics):
        echo(line)
    return RunResult(metrics, path)


def _pca(X, rm_rows: np.ndarray, seed: int, n: int = 3000) -> dict:
    """Two principal components of a row sample of the probe inputs (scikit-learn TruncatedSVD)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import MaxAbsScaler

    if X.shape[1] < 3 or X.shape[0] < 3:
        return {}
    rows = np.random.default_rng(seed).permutation(X.shape[0])[:n]
    svd = TruncatedSVD(2, random_state=seed)
    xy = svd.fit_transform(MaxAbsScaler().fit_transform(X[rows]))
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "rm": rm_rows[rows].tolist(),
            "explained": svd.explained_variance_ratio_.tolist()}


def _stopped(name: str, partial: dict, echo, state: dict | None = None) -> RunResult:
    echo(f"stopped after stage {name!r} (as asked); its output is cached, and a full run reuses it")
    return RunResult(partial, None, state)


class FittedIRM:
    """The primary IRM of a config, ready to score new text: the RM's type signature, in Python.

    ``FittedIRM(config)`` runs (or reuses from the cache) every stage up to ``fit``.
    ``token_values(text)`` gives each token's IRM value, log-ratio and RM value;
    ``score(texts)`` gives each text's IRM score (the sum over its tokens) and its RM reward.
    """

    def __init__(self, config: RunConfig, *, reward: RewardModel | None = None, echo=print) -> None:
        state = run(config, reward=reward, echo=echo, until="fit").state
        self.pair, self.saes, self.rm, self.rm_map = state["pair"], state["saes"], state["rm"], state["rm_map"]
        self.layers, self.inputs, self.hook = state["layers"], state["inputs"], state["hook"]
        fit_dir = Path(state["fit"]["path"])
        self.coef = np.load(fit_dir / "coef.npy", allow_pickle=False)
        self.scale = np.load(fit_dir / "scale.npy", allow_pickle=False)
        self.intercept = float(state["fit"]["intercept"])

    def token_values(self, text: str) -> list[dict]:
        """Per token from the second on: its text, the IRM's value, the log-ratio, and the RM's value."""
        from irmprobe.capture import capture_pair

        ids = self.pair.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"text {text!r} is shorter than two tokens: nothing to score")
        cap = capture_pair(self.pair, [ids], tuple(self.layers), hook=self.hook)
        X, _ = probe_inputs(self.inputs, cap.acts, self.saes, self.layers)
        scale = np.where(self.scale > 0, self.scale, 1.0)
        irm = np.asarray((X.multiply(1.0 / scale) if hasattr(X, "multiply") else X / scale) @ self.coef).ravel()
        irm = irm + self.intercept
        order = np.argsort(cap.position)
        return [{"token": self.pair.tokenizer.decode([int(cap.token_ids[i])]), "irm": float(irm[i]),
                 "log_ratio": float(cap.log_ratio[i]), "rm": self.rm_map.get(int(cap.token_ids[i]))} for i in order]

    def score(self, texts: list[str]) -> list[dict]:
        """Each text's IRM score (sum of token values), log-ratio sum, and RM reward."""
        rewards = self.rm.score(texts)
        out = []
        for text, reward in zip(texts, rewards):
            rows = self.token_values(text)
            out.append({"text": text, "irm": sum(r["irm"] for r in rows), "log_ratio": sum(r["log_ratio"] for r in rows),
                        "rm": float(reward)})
        return out


def verdict(reward: dict, agree: list[dict], is_null: bool, validation: dict | None = None) -> list[str]:
    """Plain statements of what the figures do and do not show."""
    out = []
    z = reward["diff_z"]
    if is_null:
        out.append("null organism: the tuned model is the base model, so there is no implicit reward to find.")
    elif z is None or z < 3:
        out.append(f"the organism did NOT learn reliably: tuned - base reward is {_z(z)} s.e. (< 3).")
    else:
        out.append(f"the organism learned: tuned - base reward is {_z(z)} s.e. above zero.")
    rows = {r["name"]: r for r in agree}
    irm, base = rows["sae_irm"], rows["baseline_shuffled"]
    if irm["is_zero"]:
        out.append("the SAE IRM is identically zero: no implicit reward was learned (no tau or p-value applies).")
        return out
    if irm["tau"] is None or base["tau"] is None:
        out.append(f"no comparison with the RM was possible: {irm.get('note') or base.get('note')}")
        return out
    floor = base["tau_max"] if not base["is_zero"] else 0.0
    if irm["tau"] > floor and irm["p_value"] < 0.05:
        out.append(f"the SAE IRM agrees with the RM (tau {irm['tau']:+.3f}, p {irm['p_value']:.1e}) above every "
                   f"shuffled-target baseline fit (max tau {floor:+.3f} of {base['n_fits']}).")
    else:
        out.append(f"the SAE IRM does NOT beat the shuffled-target baseline: tau {irm['tau']:+.3f} "
                   f"(p {irm['p_value']:.1e}) vs baseline max {floor:+.3f} over {base['n_fits']} fits.")
    if irm.get("control_tau") is not None:
        gap = irm["above_control"]
        out.append(f"against the random-reward control organism (tau {irm['control_tau']:+.3f}) the SAE IRM stands "
                   f"{gap:+.3f} above it" + (" with non-overlapping 95% CIs." if irm.get("above_control_ci")
                                              else "; the CIs overlap, so this is not clear evidence of a learned reward."))
    if validation:
        rows = {r["set"]: r for r in validation.get("ablation") or []}
        top = next((r for name, r in rows.items() if name.startswith("irm_top")), None)
        rand = next((r for name, r in rows.items() if name.startswith("random")), None)
        if top and rand and top["change"] and rand["change"]:
            lowered = top["change"]["ci"][1] < 0
            out.append(f"ablating the IRM's top {top['n_features']} features changed reward by {top['change']['mean']:+.3f} "
                       f"(95% CI {top['change']['ci'][0]:+.3f}..{top['change']['ci'][1]:+.3f}); {rand['n_features']} random "
                       f"features: {rand['change']['mean']:+.3f}. "
                       + ("The IRM's features carry reward causally." if lowered and rand["change"]["ci"][0] <= 0 <= rand["change"]["ci"][1]
                          else "No clear causal effect beyond the random control."))
    informed = [r for r in agree if r.get("family") == "rm_informed" and r.get("tau") is not None]
    if informed:
        out.append("RM-informed views (" + ", ".join(r["name"] for r in informed) + ") use RM labels: they show the "
                   "RM is decodable from the features, which is as true of a model that learned nothing.")
    return out


def _z(z: float | None) -> str:
    return "undefined" if z is None else f"{z:.1f}"


