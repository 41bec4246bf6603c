"""What reporting sends to W&B, the offline run directory, and the cache's atomic writes."""

import json
from pathlib import Path

import pytest
import wandb

from irmprobe.api import run
from irmprobe.cache import atomic_dir, config_key
from irmprobe.config import RunConfig
from irmprobe.reporting.tracking import wandb_mode
from tests.integration.test_pipeline import TINY
from tests.unit.test_llm import _answer, server  # noqa: F401 (the loopback server fixture)


def test_wandb_receives_config_metrics_and_token_table(tiny_llama_dir, tmp_path, monkeypatch):
    sent = {"logs": [], "init": None, "artifacts": []}
    real_init = wandb.init

    def spy_init(**kwargs):
        sent["init"] = kwargs
        run_ = real_init(**kwargs)
        real_log = run_.log

        def log(data, *a, **kw):
            sent["logs"].append(data)
            return real_log(data, *a, **kw)

        run_.log = log
        real_artifact = run_.log_artifact

        def log_artifact(artifact, *a, **kw):
            sent["artifacts"].append(artifact)
            return real_artifact(artifact, *a, **kw)

        run_.log_artifact = log_artifact
        real_define = run_.define_metric

        def define_metric(name, *a, **kw):
            sent.setdefault("defined", []).append((name, kw.get("step_metric")))
            return real_define(name, *a, **kw)

        run_.define_metric = define_metric
        return run_

    monkeypatch.setattr(wandb, "init", spy_init)
    monkeypatch.delenv("WANDB_MODE")
    data = json.loads(json.dumps(TINY)) | {"pair": {"base": str(tiny_llama_dir)},
                                          "report": {"out_dir": str(tmp_path / "runs")}}
    result = run(RunConfig.from_dict(data), echo=lambda _: None)
    assert sent["init"]["mode"] == "offline"  # offline unless configured online
    assert sent["init"]["config"]["pair"]["base"] == str(tiny_llama_dir)
    logged = {k: v for d in sent["logs"] for k, v in d.items()}
    scalars = {k: v for k, v in logged.items() if isinstance(v, (int, float))}
    for key in ("reward/diff_mean", "reward/diff_z", "kl/mean", "irm/sae_irm/tau", "irm/baseline_shuffled/tau",
                "sae/tuned.0/explained_variance", "sae/base.1/l0", "time/capture"):
        assert key in scalars, key
    assert scalars["reward/diff_mean"] == pytest.approx(result.metrics.reward["diff_mean"])
    curves = [d for d in sent["logs"] if "organism/step" in d]
    assert ("organism/*", "organism/step") in sent["defined"]  # curves plotted against the training step
    history = [r for r in result.metrics.organism["history"] if "step" in r and len(r) > 2]
    assert [d["organism/step"] for d in curves] == [r["step"] for r in history]
    assert curves and all("organism/loss" in d or "organism/reward" in d or "organism/train_loss" in d for d in curves)
    table = next(d["tokens"] for d in sent["logs"] if "tokens" in d)
    assert table.columns == ["token", "rm_value", "heldout_count", "log_ratio", "sae_irm", "full_vocab", "shuffled_0"]
    assert len(table.data) == len(result.metrics.tokens["rows"]) > 0
    # Every table: views, tokens, SAE metrics, judged features (contexts, explanations, IRM weights), ablation.
    for name in ("views", "tokens", "saes", "features", "ablation"):
        assert isinstance(logged[name], wandb.Table) and len(logged[name].data) > 0, name
    assert {"explanation", "top_contexts", "irm_weight"} <= set(logged["features"].columns)
    assert len(logged["views"].data) == len(result.metrics.agreement) + len(result.metrics.full_vocabulary)
    # The report's interactive plots as native plotly panels, the others as images.
    for name in ("view_taus", "irm_vs_rm", "ablation_shares", "layer_effects", "attribution_curves"):
        assert isinstance(logged[f"plots/{name}"], wandb.Plotly), name
    for name in ("error_vs_frequency", "probe_pca", "sae_metrics"):
        assert isinstance(logged[f"plots/{name}"], wandb.Image), name
    assert "plots/irm_vs_rm_scatter" in logged
    # What the HTML file shows: the file itself, and its text views and feature cards as tables.
    assert isinstance(logged["report"], wandb.Html)
    assert 'id="texts-data"' in logged["report"].html and 'class="card"' in logged["report"].html
    dash = result.metrics.dashboard
    tokens = logged["text tokens"]
    assert len(tokens.data) == sum(len(s["tokens"]) for p in dash["texts"]["prompts"] for s in p["sequences"])
    assert {"log_ratio", "irm", "rm", "token"} <= set(tokens.columns)
    cards = logged["feature cards"]
    assert [r[0] for r in cards.data] == [c["id"] for c in dash["features"]]
    assert {"top_contexts", "promoted", "suppressed", "rm_corr"} <= set(cards.columns)
    assert "words made more likely" in logged
    # Artifacts: the SAEs, the IRM, the token map.
    kinds = {a.type: a for a in sent["artifacts"]}
    assert {"sae", "irm", "token_map"} <= set(kinds)  # (W&B also stores logged tables as run_table artifacts)
    assert {"coef.npy", "fit.json"} <= {e.split("/")[-1] for e in kinds["irm"].manifest.entries}
    assert any(e.endswith("cfg.json") for e in kinds["sae"].manifest.entries)
    offline_runs = list((tmp_path / "runs").glob("run-*/wandb/offline-run-*"))
    assert len(offline_runs) == 1  # (no key reaches these files: test_api_key_is_sent_and_never_written)
    # The saved workspace view (scripts/wandb_workspace.py) shows keys a run logs: no panel stays empty.
    import re

    workspace = (Path(__file__).resolve().parents[2] / "scripts" / "wandb_workspace.py").read_text()
    panels = set(re.findall(r'"((?:plots|irm|reward|kl|sae|organism|primary|ablation|attribution|depth)/[^"]+)"',
                            workspace))
    assert {"plots/ablation_shares", "irm/full_vocab_log_ratio/control_tau", "primary/t", "organism/step",
            "plots/depth_profile", "depth/direct_first_reaching"} <= panels
    # The known-null counts exist where the run has an ablation with random sets and attribution curves (the tiny
    # run may have neither): they come from the same headline figures, which are logged as well as summarised.
    from irmprobe.reporting.tracking import headline_scalars

    assert logged["primary/t"] == pytest.approx(result.metrics.primary.z)
    curves = {"bound": {"value": 0.3}, "errors_only": {"value": 0.7},
              "feature_rows": [{"k": 1, "random": {"values": [0.01, 0.02]}}]}
    judged = {"set": "random_3 #1 (control)", "n_features": 3, "null_check": {"called": False, "range": [0, 0.1]},
              "gain_share_adjusted": {"ci": [-0.1, 0.2]}}
    possible = set(logged) | set(headline_scalars(
        {"attribution": {"curves": curves, "threshold": 0.6, "exact": {"spearman": 0.9}},
         "validation": {"ablation": [judged]},
         "depth": {"direct": {"r2": [0.1], "first_reaching": None}}, "capture": {"layers": [0]}}))
    assert sorted(panels - possible) == []


FAKE_KEY = "sk-irmprobe-fake-7f3a9c1e5b"


def test_api_key_is_sent_and_never_written_or_printed(tiny_llama_dir, tmp_path, monkeypatch, capsys, caplog,
                                                      server):  # noqa: F811
    """A run with both LLM steps on and a key set: the endpoint gets the key, and no output file of the run
    (run directory, W&B offline files, caches) nor anything printed or logged holds it."""
    url, handler = server
    # One reply that serves every LLM step: a JSON object (swap words), a first digit 1 (relevance)
    # and a list of 0/1 longer than any detection set.
    reply = '{"negative": "awful", "neutral": "table"} 1 [' + ", ".join(["1", "0"] * 40) + "]"
    handler.replies = [_answer(reply)] * 10_000
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))  # W&B's own files land here too
    data = json.loads(json.dumps(TINY)) | {
        "pair": {"base": str(tiny_llama_dir)},
        "llm": {"base_url": url, "model": "m", "api_key_env": "OPENAI_API_KEY"},
        "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "offline"}}
    data["compare"] = data["compare"] | {"llm_triples": True}
    data["validate"] = data["validate"] | {"judge": "llm"}
    lines = []
    with caplog.at_level("DEBUG"):
        run(RunConfig.from_dict(data), echo=lines.append)
    # The key was in play: every request to the endpoint carried it, from both LLM steps.
    assert len(handler.seen) >= 2 and all(r["auth"] == f"Bearer {FAKE_KEY}" for r in handler.seen)
    prompts = " ".join(json.dumps(r["body"]["messages"]) for r in handler.seen)
    assert "neuron" in prompts and "could replace it" in prompts  # the feature judge and the swap-word step
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("offline-run" in str(p) for p in files) and any("/llm/" in str(p) for p in files)
    leaked = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    out, err = capsys.readouterr()
    for text in (out, err, "\n".join(lines), caplog.text):
        assert FAKE_KEY not in text


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("y")
    assert (target / "done").read_text() == "y"


def test_config_key_is_stable_and_sensitive():
    a = RunConfig()
    assert config_key(a) == config_key(RunConfig())
    assert config_key(a) != config_key(RunConfig.from_dict({"irm": {"min_token_count": 3}}))


def test_metrics_json_is_strict_json_even_with_undefined_figures(tmp_path):
    from irmprobe.cache import write_json

    path = write_json(tmp_path / "m.json", {"se": float("nan"), "ok": 1.5})
    assert json.loads(path.read_text()) == {"se": None, "ok": 1.5}
