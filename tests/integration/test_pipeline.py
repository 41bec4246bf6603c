"""End-to-end runs of every stage on tiny random models (Llama- and GPT-NeoX-style)."""

import json

import numpy as np
import pytest

from irmprobe.analysis.verdict import null_family
from irmprobe.api import run
from irmprobe.cli import main
from irmprobe.config import RunConfig

TINY = {
    "prompts": {"n_heldout": 12},
    "organism": {"steps": 2, "prompts_per_step": 2, "generations_per_prompt": 2, "max_new_tokens": 8,
                 "learning_rate": 1e-3},
    "samples": {"samples_per_prompt": 4, "max_new_tokens": 16, "batch_size": 48},
    "capture": {"top_k_layers": 2, "batch_size": 16},
    "sae": {"expansion": 2, "training_samples": 4096, "batch_size": 256},
    "irm": {"min_token_count": 1, "n_shuffles": 2},
    "compare": {"n_bootstrap": 50, "n_triples": 20, "n_controls": 2},
    "validate": {"top_k": 3, "n_judged": 10, "n_prompts": 4, "max_new_tokens": 6},
}


def _config(tmp_path, **pair):
    data = json.loads(json.dumps(TINY))
    data["pair"] = pair
    data["report"] = {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}
    return RunConfig.from_dict(data)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_neox_dir"])
def test_tiny_organism_end_to_end_and_reuse(fixture, request, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(fixture)
    import irmprobe.activations.samples as sampling

    sampled, real = [], sampling.sample_continuations
    monkeypatch.setattr(sampling, "sample_continuations", lambda model, *a, **k: sampled.append(k["seed"]) or real(model, *a, **k))
    lines = []
    result = run(_config(tmp_path, base=str(model_dir)), echo=lines.append)
    # The base model samples once per run (seed * 1000 + 0); each tuned model (organism, control) once.
    assert sorted(sampled) == [0, 1, 1, 1]
    runner = result.context.resources["runner"]
    organism_samples, control_samples = runner.result("samples"), runner.result("samples", "control-0")
    n_base = int((organism_samples.source == "base").sum())
    assert n_base == 12 * 4 and control_samples.token_ids[:n_base] == organism_samples.token_ids[:n_base]
    m = json.loads(result.metrics_path.read_text())
    assert m["kind"] == "irmprobe-metrics" and m["schema_version"] == 2
    from irmprobe.results import RunMetrics

    assert RunMetrics.from_json(m).to_json() == m  # the typed metrics round-trip through metrics.json
    assert m["organism"]["reused"] is False
    assert len(m["layers"]["chosen"]) == 2
    assert {(r["model"], r["layer"]) for r in m["saes"]} == {(k, b) for k in ("base", "tuned") for b in (0, 1)}
    assert all(0 < r["l0"] < r["d_sae"] and r["explained_variance"] <= 1 for r in m["saes"]), m["saes"]
    # Early stopping read whole prompts of the training rows, not single rows.
    assert all(0 < r["stopping_prompts"] < r["stopping_rows"] for r in m["saes"]), m["saes"]
    families = {r["name"]: r["family"] for r in m["agreement"]}
    # The preference probe needs 8 prompts whose continuations differ in reward within each fold: optional here.
    families.setdefault("preference_probe", "rm_informed")
    assert families == {"log_ratio (no model)": "behavioural", "sae_irm": "behavioural", "sae_irm_decision": "behavioural", "sae_irm_bilinear": "behavioural", "sae_lasso": "behavioural",
                        "sae_elasticnet": "behavioural", "rm_regression": "rm_informed", "contrastive_probe": "rm_informed",
                        "preference_probe": "rm_informed", "random_probe": "baseline",
                        "baseline_shuffled": "baseline", "raw_activations": "baseline"}
    assert [r["name"] for r in m["full_vocabulary"]] == ["full_vocab_log_ratio"]
    positions = {r["name"]: r["position"] for r in m["agreement"] if r["position"]}
    assert positions == {"sae_irm": "reader", "sae_lasso": "reader", "sae_elasticnet": "reader",
                         "sae_irm_decision": "decision", "sae_irm_bilinear": "decision (bilinear)"}
    # One token set for the whole table: every row-level view is scored on the same held-out tokens.
    assert len({r["n_tokens"] for r in m["agreement"] if not r["is_zero"]}) == 1
    # The matched control: the organism's recipe with a random reward, its own layers; figures next to each view.
    control, second = m["control"]
    assert second["reward"]["seed"] == control["reward"]["seed"] + 1 and m["primary"]["df"] == 1
    assert control["matched"] and control["steps"] == 2 and control["method"] == "rloo"
    assert control["reward"]["name"].startswith("random")
    assert len(m["control_agreement"][0]) == len(m["agreement"])
    assert all("control_tau" in r or r["is_zero"] or r.get("control_is_zero") for r in m["agreement"])
    assert all("cannot tell a control" in r["control_flag"] for r in m["agreement"] if r["family"] == "rm_informed")
    val = m["validation"]
    assert [r["set"] for r in val["ablation"]][0] == "none" and len(val["ablation"]) >= 4
    assert {"random_3 #1 (control)", "random_3 #4 (control)", "reconstruction_only (control)"} <= {
        r["set"] for r in val["ablation"]}
    assert val["cross"]["n_judged"] == 10 and all(r["explanation"] for r in val["judged"])
    assert any("ablation in the tuned model" in line for line in lines)
    # The attribute stage ran on the organism: curves on held-out prompts, a summary section, a verdict line.
    a = m["attribution"]
    assert a["kind"] == "mlp_out" and a["curves"]["rows"] and a["curves"]["feature_rows"]
    assert a["rank_half"]["ig_sum"] == pytest.approx(a["rank_half"]["m_full"] - a["rank_half"]["m_empty"],
                                                     rel=0.25, abs=0.05)
    assert any("what carries the implicit reward" in line for line in lines)
    assert any("of what the hook points carry" in line for line in m["verdict"])
    # Every hook point considered, on the same held-out prompts: the run's own is the curves' bound.
    points = {h["label"]: h for h in a["hook_points"]}
    assert list(points) == ["mlp_out at the chosen blocks", "resid_post at the chosen blocks",
                            "mlp_out at the top 1 block", "mlp_out at every block"]
    # The top block by the layers stage's ranking of MLP patches; both blocks together are the chosen ones.
    assert a["spread_order"]["order"] == m["layers"]["patching"]["ranking"]
    assert points["mlp_out at the top 1 block"]["points"] == [["mlp_out", a["spread_order"]["order"][0]]]
    assert any("over the blocks' MLPs (point estimates): the MLP outputs of the top 1 and all 2 blocks" in line
               for line in m["verdict"])
    assert points["mlp_out at the chosen blocks"]["value"] == pytest.approx(a["curves"]["bound"]["value"], abs=1e-3)
    assert len(points["mlp_out at every block"]["points"]) == len(m["layers"]["per_block"])
    assert any("the other hook points considered" in line for line in m["verdict"])
    assert any(line.startswith("hook points considered") for line in lines)
    assert m["kl"]["n_sequences"] == 12 * 4
    assert any(line.startswith("primary comparison") for line in m["verdict"])
    assert m["primary"]["view"] == "full_vocab_log_ratio" and len(m["primary"]["control_taus"]) == 2
    assert m["explanation"]["view"] == "sae_irm" and m["explanation"]["df"] == 1
    assert m["reward"]["n_prompts"] == 12

    again = []
    run(_config(tmp_path, base=str(model_dir)), echo=again.append)
    assert any(line.startswith("[organism] reused the cached output") for line in again)
    assert any(line.startswith("[control-0/organism] reused the cached output") for line in again)


def test_tiny_neox_with_given_tuned_model(tiny_neox_dir, tmp_path):
    from tests.unit.test_pairs import _perturbed_copy

    tuned = _perturbed_copy(tiny_neox_dir, tmp_path / "tuned", layer=0, scale=0.5)
    result = run(_config(tmp_path, base=str(tiny_neox_dir), tuned=str(tuned)), echo=lambda _: None)
    m = result.metrics.to_json()
    assert m["layers"]["per_block"][0] > m["layers"]["per_block"][1] == 0.0
    rows = {r["name"]: r for r in m["agreement"]}
    assert not rows["log_ratio (no model)"]["is_zero"]
    assert rows["sae_irm"]["tau"] is not None


def test_null_organism_reports_no_implicit_reward(tiny_llama_dir, tmp_path):
    result = run(_config(tmp_path, base=str(tiny_llama_dir), null=True), echo=lambda _: None)
    m = result.metrics.to_json()
    rows = {r["name"]: r for r in m["agreement"]}
    behavioural = [r for r in m["agreement"] if r["family"] == "behavioural"]
    assert {r["name"] for r in behavioural} == {"log_ratio (no model)", "sae_irm", "sae_irm_decision",
                                                "sae_irm_bilinear", "sae_lasso", "sae_elasticnet"}
    assert m["full_vocabulary"][0]["is_zero"]
    for row in behavioural:  # every behavioural IRM of tuned = base is reported as zero, with no tau
        assert row["is_zero"] and row["tau"] is None and row["p_value"] is None, row["name"]
    assert all(m["irm"]["fits"][name]["is_zero"] for name in ("sae_irm", "sae_lasso", "sae_elasticnet"))
    assert rows["baseline_shuffled"]["is_zero"]  # a zero target shuffled is still zero
    assert m["control"] == []  # the null organism is its own control
    assert m["kl"]["mean"] == 0.0
    assert m["verdict"] == ["null organism: the tuned model is the base model, so there is no implicit reward to find."]


def test_cli_prints_metrics_path_last(tiny_llama_dir, tmp_path, capsys):
    overrides = [f"pair.base={tiny_llama_dir}", "pair.null=true", f"report.out_dir={tmp_path / 'runs'}",
                 "report.wandb_mode=disabled"]
    for section, values in TINY.items():
        overrides += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()]
    assert main(["run", *sum((["--set", o] for o in overrides), [])]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("metrics: ") and last.endswith("metrics.json")


def test_cli_rejects_bad_config_with_field_name(capsys):
    assert main(["run", "--set", "organism.stepz=3"]) == 2
    assert "unknown field(s) ['stepz']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="OrganismConfig.steps must be positive"):
        RunConfig.from_dict({"organism": {"steps": 0}})
    with pytest.raises(ValueError, match="n_judged .* must be at least top_k"):
        RunConfig.from_dict({"validate": {"top_k": 10, "n_judged": 5}})


def test_same_seed_gives_same_numbers(tiny_llama_dir, tmp_path, monkeypatch):
    results = []
    for i in range(2):
        monkeypatch.setenv("IRMPROBE_CACHE", str(tmp_path / f"cache{i}"))  # nothing reused
        results.append(run(_config(tmp_path / str(i), base=str(tiny_llama_dir)), echo=lambda _: None).metrics.to_json())
    a, b = results
    assert a["reward"] == b["reward"]
    assert a["kl"] == b["kl"]
    assert a["agreement"] == b["agreement"]
    assert [r["explained_variance"] for r in a["saes"]] == [r["explained_variance"] for r in b["saes"]]


def test_extra_text_is_captured_beside_the_samples(tiny_llama_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["The happy people were good and the weather was good all day long."] * 5))
    plain = run(_config(tmp_path / "a", base=str(tiny_llama_dir)), echo=lambda _: None).metrics.to_json()
    data = json.loads(json.dumps(TINY)) | {"pair": {"base": str(tiny_llama_dir)},
                                          "report": {"out_dir": str(tmp_path / "b"), "wandb_mode": "disabled"}}
    data["capture"] = data["capture"] | {"text_path": str(texts), "max_text_tokens": 8}
    extra = run(RunConfig.from_dict(data), echo=lambda _: None).metrics.to_json()
    assert extra["capture"]["rows"] == plain["capture"]["rows"] + 5 * 7  # 5 texts of 8 tokens, t >= 1
    assert extra["kl"] == plain["kl"]  # KL comes from the samples alone
    # Measured-only controls score the rows full ones score, extra text included: the same log-ratio rows.
    data["compare"] = data["compare"] | {"control_views": "measured"}
    light = run(RunConfig.from_dict(data), echo=lambda _: None, until="compare").results["compare"]
    assert len(light.control_agreement) == len(extra["control_agreement"]) == 2
    for rows_m, rows_f in zip(light.control_agreement, extra["control_agreement"]):
        assert [r.to_json() for r in rows_m] == [r for r in rows_f if r["name"] == "log_ratio (no model)"]


def test_cli_reports_missing_or_malformed_config_files(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "invalid config" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["run", str(tmp_path / "list.yaml")]) == 2
    assert "must be a mapping" in capsys.readouterr().err


def test_retrained_model_in_the_same_folder_is_not_served_from_cache(tiny_llama_dir, tmp_path):
    from tests.unit.test_pairs import _perturbed_copy

    tuned = _perturbed_copy(tiny_llama_dir, tmp_path / "tuned", layer=0, scale=0.5)
    first = run(_config(tmp_path / "a", base=str(tiny_llama_dir), tuned=str(tuned)), echo=lambda _: None).metrics.to_json()
    import shutil

    shutil.rmtree(tuned)
    _perturbed_copy(tiny_llama_dir, tuned, layer=1, scale=0.5)  # a different model, same path
    second = run(_config(tmp_path / "b", base=str(tiny_llama_dir), tuned=str(tuned)), echo=lambda _: None).metrics.to_json()
    assert second["kl"] != first["kl"]


def test_stage_cache_reuses_every_stage_and_reruns_only_what_a_change_touches(tiny_llama_dir, tmp_path, monkeypatch):
    first = run(_config(tmp_path, base=str(tiny_llama_dir)), echo=lambda _: None)
    assert set(first.stage_status.values()) == {"ran"}
    # The depth stage ran once, for the organism: after the last block the logit lens is the log-ratio itself.
    assert "control-0/depth" not in first.stage_status and first.metrics.depth["n_layers"] == 2
    assert first.metrics.depth["lens"]["r2"][-1] > 0.99 and len(first.metrics.depth["direct"]["r2"]) == 2
    again = run(_config(tmp_path, base=str(tiny_llama_dir)), echo=lambda _: None)
    status = again.stage_status
    assert all(status[s] == "reused" for s in ("organism", "samples", "layers", "capture", "saes", "fit", "compare",
                                               "interpret", "ablate"))
    assert all(status[f"control-0/{s}"] == "reused" for s in ("organism", "samples", "capture", "saes", "fit"))
    assert again.metrics.agreement == first.metrics.agreement
    # Change only an IRM setting: fit and later stages run again (organism and control); nothing before them does.
    changed = _config(tmp_path, base=str(tiny_llama_dir))
    changed = RunConfig.from_dict(changed.to_dict() | {"irm": changed.to_dict()["irm"] | {"l1_ratio": 0.7}})
    status = run(changed, echo=lambda _: None).stage_status
    # The attribute, seeds and depth stages read no IRM setting: they are reused too.
    assert {s for s, v in status.items() if v == "reused"} == {
        f"{b}{s}" for b in ("", "control-0/", "control-1/") for s in ("organism", "samples", "layers", "capture",
                                                                      "saes")} | {"attribute", "depth", "seeds"}
    assert all(status[s] == "ran" for s in ("fit", "control-0/fit", "control-1/fit", "compare", "interpret", "ablate"))
    # --force saes re-trains the SAEs (and everything after), for the control too, but reuses the capture.
    status = run(changed, echo=lambda _: None, force=("saes",)).stage_status
    assert status["capture"] == "reused" and status["saes"] == "ran" and status["fit"] == "ran"
    assert status["control-0/capture"] == "reused" and status["control-0/saes"] == "ran"
    stopped = run(changed, echo=lambda _: None, until="capture")
    assert stopped.metrics_path is None and stopped.metrics is None and "saes" not in stopped.results
    with pytest.raises(ValueError, match="unknown stage 'sae'"):
        run(changed, force=("sae",))
    # Measured-only controls (compare.control_views: measured) reuse each control's training and samples, capture
    # no activations, train no SAE, fit nothing, and give the very same full-vocabulary taus, hence the same call.
    full = run(changed, echo=lambda _: None)
    data = changed.to_dict()
    light = RunConfig.from_dict(data | {"compare": data["compare"] | {"control_views": "measured"}})
    measured = run(light, echo=lambda _: None)
    status = measured.stage_status
    assert all(status[f"control-{i}/{s}"] == "reused" for i in (0, 1) for s in ("organism", "samples"))
    assert all(status[f"control-{i}/{s}"] == "ran" for i in (0, 1) for s in ("layers", "capture", "saes", "fit"))
    assert all(status[s] == "reused" for s in ("organism", "samples", "layers", "capture", "saes", "fit"))
    runner = measured.context.resources["runner"]
    for i in (0, 1):
        assert runner.result("layers", f"control-{i}").chosen == []
        assert runner.result("capture", f"control-{i}").acts == {}
        assert runner.result("saes", f"control-{i}").saes == {}
        assert not runner.result("fit", f"control-{i}").record.fits
        assert {r.name for r in runner.result("fit", f"control-{i}").record.rows} == {"log_ratio (no model)"}
    assert measured.metrics.primary.control_taus == full.metrics.primary.control_taus
    for rows_m, rows_f in zip(measured.metrics.control_agreement, full.metrics.control_agreement):
        assert rows_m == [r for r in rows_f if r.name == "log_ratio (no model)"]
    assert measured.metrics.primary.z == full.metrics.primary.z and measured.metrics.primary.z is not None
    assert measured.metrics.discovery == full.metrics.discovery
    assert [c.views for c in measured.metrics.control] == ["measured"] * 2
    e = measured.metrics.explanation
    assert e.view == "sae_irm" and e.outcome == "no call" and "control_views" in e.reason and not e.control_taus
    assert e.tau == full.metrics.explanation.tau
    # Blocks ranked for the spread sets by each one's own share of the implicit reward (on the ranking half): only the
    # attribute stage and what reads it run again.
    # The ranking and the sets it orders are measured on disjoint prompts (every sequence of a prompt in one half).
    import irmprobe.validation.attribution as attribution_module

    measured_on, bounds = [], attribution_module.hook_point_bounds

    def spy(base, tuned, sequences, prompt_lens, prompt, source, point_sets, **kw):
        measured_on.append((next(iter(point_sets)), set(np.asarray(prompt).tolist())))
        return bounds(base, tuned, sequences, prompt_lens, prompt, source, point_sets, **kw)

    monkeypatch.setattr(attribution_module, "hook_point_bounds", spy)
    data = light.to_dict()
    ranked = run(RunConfig.from_dict(data | {"attribute": data["attribute"] | {"spread_ranking": "reward"}}),
                 echo=lambda _: None)
    monkeypatch.setattr(attribution_module, "hook_point_bounds", bounds)
    (rank_set, rank_prompts), (_, spread_prompts) = measured_on
    assert rank_set == "mlp_out at block 0" and rank_prompts and spread_prompts
    assert not rank_prompts & spread_prompts
    assert ranked.stage_status["saes"] == "reused" and ranked.stage_status["attribute"] == "ran"
    spread = ranked.metrics.to_json()["attribution"]["spread_order"]
    shares = spread["block_shares"]
    assert spread["ranked_by"].startswith("each block's own share") and [b["block"] for b in shares] == [0, 1]
    assert spread["ranked_by"].endswith("(on the ranking half of the prompts)")
    assert all(ranked.stage_status[s] == "reused" for s in ("layers", "capture", "fit", "compare"))
    assert spread["order"] == sorted([0, 1], key=lambda b: (shares[b]["value"] is None, -(shares[b]["value"] or 0), b))
    # Dictionaries of the change as the attribution's nodes: the attribute stage trains them on tuned - base and
    # runs again with what reads it; no SAE of the IRM retrains. The ablation sets the named change features to their
    # zero-change value with the base in lockstep, against random features of the same dictionaries.
    light = light.to_dict()
    change = RunConfig.from_dict(light | {"attribute": light["attribute"] | {"dictionary": "change",
                                                                             "change_training_samples": 4096}})
    lines = []
    switched = run(change, echo=lines.append)
    assert switched.stage_status["saes"] == "reused" and switched.stage_status["attribute"] == "ran"
    a = switched.metrics.to_json()["attribution"]
    assert a["dictionary"] == "change" and [d["layer"] for d in a["dictionaries"]] == a["layers"]
    assert all(0 < d["change_norm_share"] and d["explained_variance"] <= 1 for d in a["dictionaries"])
    assert any("(dictionaries of the change)" in line for line in switched.metrics.verdict)
    view = a["decision_view"]  # the decision-side view on the same dictionaries, cross-fitted by prompt
    assert view["n_rows"] > 0 and view["test_r2"] is not None and 1 <= len(view["top"]) <= 10
    assert all(int(t["node"].split("/")[0][1:]) in a["layers"] and "/f" in t["node"] for t in view["top"])
    assert any("on the dictionaries of the change (the attribute stage's" in line for line in switched.metrics.verdict)
    assert switched.stage_status["ablate"] == "ran"
    rows = switched.metrics.to_json()["validation"]["ablation"]
    named = [r for r in rows if r["set"].startswith("attribution")]
    assert [r["set"].split("_")[1] for r in named] == ["change"] and named[0]["mode"] == "change"
    # The decision-side view's top features on those dictionaries are ablated too; each named set of change features
    # meets random sets with its count at each hook point.
    top = [t for t in view["top"] if t["weight"] > 0][:change.validate.top_k]
    viewed = [r for r in rows if r["set"].startswith("decision_change_top_")]
    assert [(r["set"], r["mode"], r["n_features"]) for r in viewed] == [(f"decision_change_top_{len(top)}", "change",
                                                                        len(top))]
    families = {r["blocks"] for r in named + viewed}
    randoms = [r for r in rows if r["set"].startswith("random_change_")]
    assert len(randoms) == len(families) * change.validate.n_random_sets >= 1
    assert all(x["mode"] == "change" and f"[{x['blocks']}]" in x["set"] for x in randoms)
    for r in named + viewed:  # (the tiny organism gains no reward, so no share is judged here: test_ablation.py)
        assert sum(null_family(x) == null_family(r) for x in randoms) == change.validate.n_random_sets
    assert len({r["set"] for r in rows}) == len(rows)
    # Nor are they the IRM's SAE features: no feature card is named for, or carries, a change node's attribution.
    cards = switched.metrics.to_json()["dashboard"]["features"]
    assert not any(s.startswith("attribution") for c in cards for s in c["named_as"])
    assert all(c["attribution"] is None for c in cards)
    assert switched.stage_status["seeds"] == "ran" and "seed_checks" not in a  # no check asked for: nothing to say
    # One more dictionary seed: only the seeds stage runs (the ablation does not read it); its dictionaries are
    # trained with the change seed + 100, on the same prompts, and the verdict says whether the named set holds.
    data = change.to_dict()
    checked = run(RunConfig.from_dict(data | {"seeds": {"checks": 1}}),
                  echo=lines.append)
    status = checked.stage_status
    assert status["seeds"] == "ran" and all(status[s] == "reused" for s in ("attribute", "interpret", "ablate"))
    s = checked.metrics.to_json()["attribution"]["seed_checks"]
    assert s["primary"]["block_seeds"] == [d["seed"] for d in a["dictionaries"]] == [change.seed + layer for layer in
                                                                                a["layers"]]
    assert [c["block_seeds"] for c in s["checks"]] == [[seed + 100 for seed in s["primary"]["block_seeds"]]]
    assert s["primary"]["smallest_k_features"] == a["smallest_k_features"]
    # No set named: the top k attributed features, the set the ablation takes, are matched in the other seed's
    # dictionaries instead, and the verdict says what their counterparts carry.
    assert not a["named"]
    ranked, matched = s["matched_set"], s["checks"][0]["matched"]
    ablated = next(r for r in rows if r["set"].startswith("attribution_change_top_"))
    assert ranked["k"] == ablated["n_features"] == len(matched["features"]) == len(ranked["nodes"]) >= 1
    assert [f["node"] for f in matched["features"]] == ranked["nodes"]
    from irmprobe.validation.ablation import attributed_features

    _, ablated_nodes = attributed_features(a, change.validate.top_k)  # the ablate stage's definition of its set
    assert sorted(ranked["nodes"]) == sorted(f"L{b}/f{i}" for b, idx in ablated_nodes.items() for i in idx)
    assert matched["faithfulness"]["value"] is not None
    assert "random" in matched  # that seed's random sets of as many features (None where the curve has no such k)
    line = next(v for v in checked.metrics.verdict if "(dictionaries of the change)" in v)
    assert "change seed 100: " in line and f"the top {ranked['k']} attributed features' counterparts" in line
    # Resumable: a run interrupted after a check redoes only the checks not written (here a marked one is reused).
    from irmprobe.pipeline.runner import DONE, stage_dir

    out = stage_dir("seeds", checked.context.resources["runner"].key("seeds"))
    marked = json.loads((out / "check-100.json").read_text()) | {"smallest_k_features": 7}
    (out / "check-100.json").write_text(json.dumps(marked))
    (out / DONE).unlink()
    resumed = run(RunConfig.from_dict(data | {"seeds": {"checks": 1}}), echo=lines.append)
    assert resumed.stage_status["seeds"] == "ran"
    assert resumed.metrics.to_json()["attribution"]["seed_checks"]["checks"][0]["smallest_k_features"] == 7
    # With the activations' dictionaries a check retrains the tuned model's SAEs as the saes stage does, differing in
    # the seed only: at the run's own seed it is the saes stage's very SAE (one cache entry).
    from irmprobe.pipeline.stages.seeds import activation_dictionaries

    runner = checked.context.resources["runner"]
    capture, layers = runner.result("capture"), runner.result("layers").chosen
    kw = dict(capture_key=runner.key("capture"), device="cpu")
    _, own = activation_dictionaries(change, capture, runner.result("samples"), layers, seed=change.seed, **kw)
    assert [r["path"] for r in own] == [runner.result("saes").record.paths[f"tuned.{layer}"] for layer in layers]
    _, other = activation_dictionaries(change, capture, runner.result("samples"), layers, seed=change.seed + 100,
                                       **kw)
    assert [r["seed"] for r in other] == [change.seed + 100 + layer for layer in layers]
    assert not {r["path"] for r in other} & {r["path"] for r in own}
    # A named set's features are matched to each check's dictionaries (closest decoder direction), and what their
    # counterparts carry is measured on the same held-out prompts: with either kind of dictionary (the threshold
    # lowered so that the tiny model names a set).
    for dictionary, threshold in (("change", 0.01), ("activations", 0.002)):
        low = RunConfig.from_dict(data | {"seeds": {"checks": 1}, "attribute": data["attribute"] | {
            "threshold": threshold, "dictionary": dictionary}})
        named_run = run(low, until="seeds", echo=lines.append)
        a = named_run.context.resources["runner"].result("attribute")
        s = named_run.context.resources["runner"].result("seeds")
        matched = s["checks"][0]["matched"]
        assert a["named"] and [f["node"] for f in matched["features"]] == [n["node"] for n in a["named"]]
        assert all(-1.0 <= f["cosine"] <= 1.0 + 1e-6 for f in matched["features"])
        # Another seed's dictionary, not the run's own matched to itself (which would give cosine 1 throughout).
        assert min(f["cosine"] for f in matched["features"]) < 0.999
        assert matched["faithfulness"]["value"] is not None and matched["match_cosine"] == 0.7
        assert {c.split("/")[0] for c in (f["counterpart"] for f in matched["features"])} <= {
            f"L{layer}" for layer in a["layers"]}


def test_html_report_is_self_contained_with_every_plot(tiny_llama_dir, tmp_path, capsys):
    import re

    from irmprobe.reporting import figures
    from irmprobe.reporting.html import render

    result = run(_config(tmp_path, base=str(tiny_llama_dir)), echo=lambda _: None)
    page = result.metrics_path.with_name("report.html").read_text()
    for name in figures.STATIC:
        assert f'alt="{name}" src="data:image/png;base64,' in page, name
    for name in ("view_taus", "irm_vs_rm", "ablation_shares", "layer_effects", "attribution_curves", "mlp_spread"):
        assert f'id="plot-{name}"' in page, name
    assert "what each set of hook points carries" in page and "resid_post at the chosen blocks" in page
    assert page.index('class="verdict') < page.index('id="contents"') < page.index('id="texts"')
    # Nothing in the page's markup loads from outside the file (the browser check watches the scripts' requests).
    markup = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert re.findall(r'(?:src|href)="(?!#|data:)([^"]*)"', markup) == []
    m = json.loads(result.metrics_path.read_text())
    dash = m["dashboard"]
    assert dash["texts"]["prompts"] and all(len(s["tokens"]) == len(s["irm"]) == len(s["rm"]) == len(s["log_ratio"])
                                            for p in dash["texts"]["prompts"] for s in p["sequences"])
    assert dash["features"] and all(c["named_as"] and c["contexts"] for c in dash["features"])
    assert {"IRM top-3"} <= {s for c in dash["features"] for s in c["named_as"]}
    assert page.count('class="card"') == len(dash["features"])
    out = tmp_path / "again.html"
    assert main(["report", str(result.metrics_path), "--out", str(out)]) == 0
    assert out.read_text().count('class="plot"') == page.count('class="plot"')
    # A run without a control, SAEs or text views still renders, saying what is absent.
    bare = render(m | {"control": [], "control_agreement": [], "primary": None, "saes": [], "dashboard": None})
    for absent in ("no control organism in this run", "no SAE in this run", "no text views",
                   "no feature cards"):
        assert absent in bare, absent
    no_saes = render(m | {"dashboard": dash | {"features": [], "features_absent": "the run has no SAEs of the "
                                                                                  "tuned model"}})
    assert "the run has no SAEs of the tuned model" in no_saes and 'class="card"' not in no_saes
    # Hostile text cannot close the embedded data, and missing CI bounds (NaN in a run) draw no error bar.
    hostile = json.loads(json.dumps(m))
    hostile["dashboard"]["texts"]["prompts"][0]["prompt"] = "<!--<script>x</script> & y"
    for r in hostile["agreement"]:
        r["tau_ci"] = [None, None]
    for r in hostile["validation"]["ablation"]:
        r["reward"]["ci"] = [None, None]
        if r.get("gain_share"):
            r["gain_share"]["ci"] = [None, r["gain_share"]["ci"][1]]
    page = render(hostile)
    data = re.search(r'<script type="application/json" id="texts-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and json.loads(data)["prompts"][0]["prompt"] == "<!--<script>x</script> & y"
    # An old or foreign metrics file keeps its one-line error.
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"kind": "something-else"}))
    capsys.readouterr()
    assert main(["report", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an irmprobe metrics file" in err
    browser_check(result.metrics_path.with_name("report.html"), tmp_path)


def browser_check(report, tmp_path):
    """The report in headless Chromium (scripts/screenshot_report.py): 1024 and 1920 px, the colouring switched,
    no empty plot, no label outside its box, no request leaving the file."""
    import importlib.util
    import shutil
    from pathlib import Path

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (make screenshot installs it): the browser check did not run")
    pytest.importorskip("playwright", reason="the playwright package is missing (pip install -e '.[dev]')")
    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.check(report, tmp_path / "shot.png", [1024, 1920], chromium)
    assert result["failures"] == [], result["failures"]
    assert result["requests"]["outside"] == [] and result["widths"][1024]["interaction"]["changed"]
    assert all(p["marks"] > 0 for w in result["widths"].values() for p in w["plots"].values())


@pytest.mark.parametrize("command", ["run", "organism", "samples", "layers", "capture", "saes", "fit", "compare",
                                     "interpret", "ablate", "dashboard", "report"])
def test_every_subcommand_has_help_from_the_config_docs(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    if command == "fit":
        assert "estimators = ('ridge', 'lasso', 'elasticnet'): Behavioural SAE-feature fits" in text
    if command == "interpret":
        assert "judge = 'offline'" in text


def test_fitted_irm_scores_new_text_like_the_fit(tiny_llama_dir, tmp_path):
    from irmprobe.api import FittedIRM

    config = _config(tmp_path, base=str(tiny_llama_dir))
    irm = FittedIRM(config, echo=lambda _: None)
    text = "The happy cat sat on the terrible mat"
    rows = irm.token_values(text)
    assert len(rows) == len(irm.pair.tokenizer(text)["input_ids"]) - 1
    assert all(np.isfinite(r["irm"]) and np.isfinite(r["log_ratio"]) for r in rows)
    scored = irm.score([text, "Nothing much"])
    assert scored[0]["irm"] == pytest.approx(sum(r["irm"] for r in rows))
    assert scored[0]["rm"] == pytest.approx(float(irm.rm.score([text])[0]))
    with pytest.raises(ValueError, match="shorter than two tokens"):
        irm.token_values("")
