"""Every bad input gets one clear error (issue 15): credentials, HTTP errors, lexicons, configs,
model directories, over-long prompts, grouped CV through scikit-learn's metadata routing."""

from __future__ import annotations

import base64
import logging
import re

import numpy as np
import pytest

from irmprobe.llm import ChatClient, LLMError, redact_url

# ---------------------------------------------------------------------------------------------
# Chat endpoint: a loopback server (127.0.0.1 only) that answers from a list of canned replies (conftest).


@pytest.fixture
def endpoint(chat_endpoint):
    return chat_endpoint


def _answer(text: str) -> tuple[int, dict]:
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_redact_url_hides_userinfo_and_key_parameters():
    assert redact_url("https://alice:s3cret@host:8443/v1?api_key=k1&x=2&token=t1") == \
        "https://***@host:8443/v1?api_key=***&x=2&token=***"
    assert redact_url("http://localhost:8000/v1") == "http://localhost:8000/v1"
    assert redact_url(None) is None


def test_url_credentials_go_as_basic_auth_and_never_appear(endpoint, tmp_path, monkeypatch):
    port, handler = endpoint
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    handler.replies = [_answer("hello")]
    client = ChatClient(f"http://alice:s3cret-pw@127.0.0.1:{port}/v1?key=q-secret", "m", cache_dir=tmp_path,
                        backoff=0)
    assert client.chat([{"role": "user", "content": "hi"}]) == "hello"
    seen = handler.seen[0]
    assert seen["path"] == "/v1/chat/completions?key=q-secret"  # the query survives, the userinfo does not
    assert seen["auth"] == "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert "s3cret" not in repr(client) and "q-secret" not in repr(client)
    assert all("s3cret" not in p.read_text() and "q-secret" not in p.read_text() for p in tmp_path.iterdir())
    handler.replies = [(401, {"error": {"message": "bad credentials"}})]
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "another"}])
    assert "s3cret" not in str(info.value) and "q-secret" not in str(info.value) and "***" in str(info.value)


def test_down_endpoint_with_credentials_does_not_print_them(tmp_path):
    client = ChatClient("http://bob:pw-hidden@127.0.0.1:9/v1", "m", cache_dir=tmp_path, retries=1, timeout=2)
    with pytest.raises(LLMError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert "did not answer" in str(info.value) and "pw-hidden" not in str(info.value)
    with pytest.raises(ValueError) as bad:
        ChatClient("ftp://bob:pw-hidden@host/v1", "m")
    assert "pw-hidden" not in str(bad.value)


@pytest.mark.parametrize("status, hint", [
    (400, "rejected the request"),
    (401, "refused the credentials"),
    (403, "refused the credentials"),
    (404, "llm.base_url"),
])
def test_client_errors_become_one_llm_error_without_retry(endpoint, tmp_path, status, hint):
    port, handler = endpoint
    handler.replies = [(status, {"error": {"message": "server says no"}})] * 3
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", cache_dir=tmp_path, retries=3, backoff=0)
    with pytest.raises(LLMError, match=hint) as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert info.value.status == status and f"HTTP {status}" in str(info.value)
    assert "server says no" in str(info.value)
    assert len(handler.seen) == 1  # a client error does not change on retry


@pytest.mark.parametrize("status", [429, 503])
def test_rate_limits_and_server_errors_are_retried(endpoint, tmp_path, status):
    port, handler = endpoint
    handler.replies = [(status, {"error": "busy"}), (status, {"error": "busy"}), _answer("done")]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", cache_dir=tmp_path, retries=3, backoff=0)
    assert client.chat([{"role": "user", "content": "hi"}]) == "done"
    assert len(handler.seen) == 3


def test_persistent_server_error_names_status_after_retries(endpoint, tmp_path):
    port, handler = endpoint
    handler.replies = [(503, {"error": "busy"})] * 2
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", cache_dir=tmp_path, retries=2, backoff=0)
    with pytest.raises(LLMError, match="HTTP 503") as info:
        client.chat([{"role": "user", "content": "hi"}])
    assert info.value.status == 503 and len(handler.seen) == 2


# ---------------------------------------------------------------------------------------------
# Lexicon files


def _lexicon_file(tmp_path, data: bytes, name: str = "lex.tsv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_lexicon_with_a_utf8_bom_keeps_its_first_word(tmp_path):
    from irmprobe.models.rewards import LexiconRM

    rm = LexiconRM.from_file(_lexicon_file(tmp_path, "\ufeffgood\t2.0\nbad\t-2.0\n".encode()))
    assert rm.lexicon == {"good": 2.0, "bad": -2.0}


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_lexicon_rejects_non_finite_values_with_file_and_line(tmp_path, value):
    from irmprobe.models.rewards import LexiconRM

    path = _lexicon_file(tmp_path, f"good\t2\nbad\t{value}\n".encode())
    with pytest.raises(ValueError, match=rf"lex.tsv:2: value '{value}' is not a finite number"):
        LexiconRM.from_file(path)
    with pytest.raises(ValueError, match="'bad' is not a finite number"):
        LexiconRM({"good": 1.0, "bad": float(value)})


def test_lexicon_duplicates_refused_when_they_disagree_warned_when_they_agree(tmp_path):
    from irmprobe.models.rewards import LexiconRM

    clash = _lexicon_file(tmp_path, b"good\t2\nbad\t-2\nGood\t3\n")
    with pytest.raises(ValueError, match=r"lex.tsv:3: 'Good' repeats 'good' of line 1 with another value"):
        LexiconRM.from_file(clash)
    same = _lexicon_file(tmp_path, b"good\t2\nbad\t-2\ngood\t2\n", "same.tsv")
    with pytest.warns(UserWarning, match=r"same.tsv:3: 'good' repeats line 1"):
        assert LexiconRM.from_file(same).lexicon == {"good": 2.0, "bad": -2.0}


def test_lexicon_that_is_not_utf8_or_has_an_empty_word_names_the_file(tmp_path):
    from irmprobe.models.rewards import LexiconRM

    latin1 = _lexicon_file(tmp_path, "good\t2\ncaf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"lex.tsv is not UTF-8 text \(line 2\); save it as UTF-8"):
        LexiconRM.from_file(latin1)
    empty = _lexicon_file(tmp_path, b"good\t2\n \t1\n", "empty.tsv")
    with pytest.raises(ValueError, match=r"empty.tsv:2: the word is empty"):
        LexiconRM.from_file(empty)


# ---------------------------------------------------------------------------------------------
# Classifier RMs and model directories


def test_a_causal_lm_is_refused_as_classifier_rm(tiny_llama_dir):
    from irmprobe.models.rewards import ClassifierRM

    with pytest.raises(ValueError, match=r"is not a sequence classifier: its checkpoint has no .*score\.weight"):
        ClassifierRM(str(tiny_llama_dir))


def _broken_copy(src, dst, how: str):
    import shutil

    shutil.copytree(src, dst)
    if how == "no weights":
        (dst / "model.safetensors").unlink()
    elif how == "truncated weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "garbage weights":
        (dst / "model.safetensors").write_bytes(b"\x00" * 4096)
    elif how == "malformed config":
        (dst / "config.json").write_text('{"model_type": "llama",')
    elif how == "config without model_type":
        (dst / "config.json").write_text("{}")
    elif how == "no tokenizer":
        for p in dst.glob("tokenizer*"):
            p.unlink()
    return dst


@pytest.mark.parametrize("how, message", [
    ("no weights", r"holds no weights \(no \*\.safetensors or pytorch_model\*\.bin\)"),
    ("truncated weights", r"weights file model\.safetensors is damaged or incomplete"),
    ("garbage weights", r"weights file model\.safetensors is damaged or incomplete"),
    ("malformed config", r"config\.json is not valid JSON \(line 1"),
    ("config without model_type", r"config\.json has no model_type"),
    ("no tokenizer", r"holds no tokenizer files"),
])
def test_broken_model_directories_say_what_is_wrong(tiny_llama_dir, tmp_path, how, message):
    from irmprobe.models.loading import load_model

    broken = _broken_copy(tiny_llama_dir, tmp_path / "model", how)
    with pytest.raises(ValueError, match=message) as info:
        load_model(str(broken))
    assert "hub did not answer" not in str(info.value)


def test_broken_classifier_directory_says_what_is_wrong(tiny_llama_dir, tmp_path):
    from irmprobe.models.rewards import ClassifierRM

    broken = _broken_copy(tiny_llama_dir, tmp_path / "clf", "no weights")
    with pytest.raises(ValueError, match="holds no weights"):
        ClassifierRM(str(broken))


# ---------------------------------------------------------------------------------------------
# Prompts longer than the model's context


def test_long_prompts_are_cut_to_fit_the_context_keeping_their_end(tiny_llama_dir, caplog):
    from irmprobe.activations.samples import sample_continuations
    from irmprobe.models.loading import load_model

    model, tok = load_model(str(tiny_llama_dir))
    long_prompt = " ".join(["good day"] * 600) + " the end"
    prompts = [long_prompt, "a short one"]
    with caplog.at_level(logging.WARNING, logger="irmprobe.capture"):
        ids, lens, idx, _ = sample_continuations(model, tok, prompts, n_per_prompt=2, max_new_tokens=8,
                                                 batch_size=4, seed=0)
    assert "cut 1 of 2 prompts" in caplog.text and "120 tokens" in caplog.text
    full = tok(long_prompt)["input_ids"]
    for seq, n, i in zip(ids, lens, idx):
        assert len(seq) <= 128
        if i == 0:
            assert n == 120 and seq[:n] == full[-120:]  # the end of the prompt is kept
        else:
            assert seq[:n] == tok("a short one")["input_ids"]
    with pytest.raises(ValueError, match="max_new_tokens=128 leaves no room for the prompt"):
        sample_continuations(model, tok, prompts, n_per_prompt=1, max_new_tokens=128, batch_size=4, seed=0)


# ---------------------------------------------------------------------------------------------
# Config values of the wrong type


@pytest.mark.parametrize("data, message", [
    ({"organism": {"steps": "abc"}}, "config.organism.steps must be int, got 'abc' (str)"),
    ({"seed": "abc"}, "config.seed must be int, got 'abc' (str)"),
    ({"sae": {"expansion": 1.5}}, "config.sae.expansion must be int, got 1.5 (float)"),
    ({"samples": {"batch_size": 2.5}}, "config.samples.batch_size must be int, got 2.5 (float)"),
    ({"organism": {"steps": True}}, "config.organism.steps must be int, got True (bool)"),
    ({"validate": {"enabled": "yes"}}, "config.validate.enabled must be bool (true or false), got 'yes' (str)"),
    ({"sae": {"lr": "fast"}}, "config.sae.lr must be float, got 'fast' (str)"),
    ({"capture": {"max_texts": "5"}}, "config.capture.max_texts must be int or null, got '5' (str)"),
    ({"irm": {"alphas": [1.0, "x"]}}, "config.irm.alphas[1] must be float, got 'x' (str)"),
    ({"irm": {"alphas": 10}}, "config.irm.alphas must be a list of float, got 10 (int)"),
    ({"pair": {"base": None}}, "config.pair.base must be str, got None (NoneType)"),
    ({"pair": {"device": "tpu"}}, "config.pair.device must be cpu, cuda, cuda:N (e.g. cuda:1) or mps, got 'tpu'"),
])
def test_config_values_of_the_wrong_type_name_field_value_and_type(data, message):
    from irmprobe.config import RunConfig

    with pytest.raises(ValueError) as info:
        RunConfig.from_dict(data)
    assert str(info.value) == message


@pytest.mark.parametrize("data, message", [
    ({"seeds": {"checks": -1}}, "SeedsConfig.checks must be a non-negative integer, got -1"),
    ({"seeds": {"checks": 2}, "sae": {"pretrained": {0: {"release": "r", "id": "i"}}}},
     "they are released SAEs (sae.pretrained), which have no seed to vary"),
    ({"validate": {"share_half_width": 0.0}}, "ValidateConfig.share_half_width must be > 0 or null, got 0.0"),
    ({"validate": {"min_samples_per_prompt": 0}}, "ValidateConfig.min_samples_per_prompt must be positive, got 0"),
])
def test_config_refuses_seed_checks_and_sampling_rules_it_cannot_honour(data, message):
    from irmprobe.config import RunConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_dict(data)
    # With the change's dictionaries released SAEs are no obstacle: those dictionaries are trained by the stage.
    RunConfig.from_dict({"seeds": {"checks": 2}, "attribute": {"dictionary": "change"},
                         "sae": {"pretrained": {0: {"release": "r", "id": "i"}}}})


def test_config_accepts_ints_for_floats_and_numbers_written_as_text():
    from irmprobe.config import RunConfig

    cfg = RunConfig.from_dict({"sae": {"lr": 1}, "organism": {"learning_rate": "1e-4"}, "reward": {"label": 1},
                               "irm": {"alphas": [1, 10.0]}, "pair": {"device": "cuda:1"},
                               "capture": {"max_texts": None}})
    assert cfg.sae.lr == 1 and cfg.organism.learning_rate == pytest.approx(1e-4) and cfg.reward.label == "1"
    assert cfg.irm.alphas == (1, 10.0) and cfg.pair.device == "cuda:1"
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()
    for device in ("cpu", "cuda", "mps"):
        assert RunConfig.from_dict({"pair": {"device": device}}).pair.device == device


def test_config_file_that_is_not_yaml_gets_one_line_with_file_and_line(tmp_path):
    from irmprobe.config import RunConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("pair:\n  base: x\norganism: {steps: [1, 2\n")
    with pytest.raises(ValueError) as info:
        RunConfig.from_yaml(bad)
    assert str(info.value).startswith(f"{bad}:4: not valid YAML") and "line 3" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"config file .*missing.yaml does not exist"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary.yaml is not UTF-8 text"):
        RunConfig.from_yaml(binary)


# ---------------------------------------------------------------------------------------------
# A failed organism build


def test_failed_organism_build_leaves_no_empty_work_directory(tiny_llama_dir, monkeypatch):
    from irmprobe.cache import cache_root
    from irmprobe.config import OrganismConfig
    from irmprobe.models.rewards import LexiconRM
    from irmprobe.organisms import tuning as organisms

    def broken_trainer(*args, **kwargs):
        raise RuntimeError("trainer could not be built")

    monkeypatch.setattr(organisms, "_make_trainer", broken_trainer)
    rm = LexiconRM({"good": 1.0})
    with pytest.raises(RuntimeError, match="could not be built"):
        organisms.make_organism(str(tiny_llama_dir), rm, OrganismConfig(steps=1), ["a prompt", "another"])
    assert not list((cache_root() / "organisms").glob(".work-*"))


def test_failed_organism_build_keeps_a_work_directory_with_checkpoints(tiny_llama_dir, monkeypatch):
    from irmprobe.cache import cache_root
    from irmprobe.config import OrganismConfig
    from irmprobe.models.rewards import LexiconRM
    from irmprobe.organisms import tuning as organisms

    class Trainer:
        def __init__(self, work):
            self.work = work

        def train(self, resume_from_checkpoint=None):
            (self.work / "checkpoint-2").mkdir()
            raise KeyboardInterrupt

    monkeypatch.setattr(organisms, "_make_trainer", lambda *a, **k: Trainer(a[5]))
    with pytest.raises(KeyboardInterrupt):
        organisms.make_organism(str(tiny_llama_dir), LexiconRM({"good": 1.0}),
                                OrganismConfig(steps=4, checkpoint_every=2), ["a prompt", "another"])
    assert [p.name for p in (cache_root() / "organisms").glob(".work-*/checkpoint-*")] == ["checkpoint-2"]


# ---------------------------------------------------------------------------------------------
# Grouped cross-validation through scikit-learn's metadata routing


def _grouped_data(n_groups: int = 24, per_group: int = 5):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_groups * per_group, 6))
    y = X[:, 0] + 0.1 * rng.normal(size=len(X))
    return X, y, np.repeat(np.arange(n_groups), per_group)


@pytest.fixture
def spy_folds(monkeypatch):
    """Record every inner split LinearIRM.fit makes, as the sequences (X's last column) on each side."""
    from irmprobe.irm import estimators as irm

    folds = []

    class Spy(irm.GroupKFold):
        def split(self, X, y=None, groups=None):
            for train, test in super().split(X, y, groups):
                folds.append((set(X[train, -1]), set(X[test, -1])))
                yield train, test

    monkeypatch.setattr(irm, "GroupKFold", Spy)
    return folds


def test_groups_reach_linear_irm_through_grid_search_and_cross_validate(spy_folds):
    import sklearn
    from sklearn.model_selection import GridSearchCV, GroupKFold, cross_validate

    from irmprobe.irm.estimators import LinearIRM

    X, y, groups = _grouped_data()
    # Tag each row with its sequence in a column, so the spy can see which sequence a row is from.
    Xg = np.c_[X, groups]
    with sklearn.config_context(enable_metadata_routing=True):
        GridSearchCV(LinearIRM(alphas=(0.1, 10.0)), {"cv": [2, 3]}, cv=GroupKFold(3)).fit(Xg, y, groups=groups)
        cross_validate(LinearIRM(alphas=(0.1, 10.0)), Xg, y, params={"groups": groups}, cv=GroupKFold(3))
    assert len(spy_folds) > 10
    for train, test in spy_folds:
        assert not train & test  # no sequence on both sides of an inner fold


def test_fit_irm_works_with_metadata_routing_on():
    import sklearn

    from irmprobe.irm.crossfit import fit_irm

    X, y, groups = _grouped_data()
    plain = fit_irm("v", X, y, groups, test_fraction=0.25, seed=0)
    with sklearn.config_context(enable_metadata_routing=True):
        routed = fit_irm("v", X, y, groups, test_fraction=0.25, seed=0)
    assert routed.alpha == plain.alpha and np.allclose(routed.coef, plain.coef)


# --- Failures after the work is done, unreadable metrics, Ctrl-C, NaN intervals (issue 15 items 10-12) ---


def test_report_dir_that_is_a_file_or_online_wandb_without_key_fail_before_the_first_stage(tmp_path, monkeypatch):
    from irmprobe.api import run
    from irmprobe.config import RunConfig

    stages_ran = []
    monkeypatch.setattr("irmprobe.pipeline.runner.Runner.run", lambda self: stages_ran.append(1) or {})
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="report.out_dir .* is a file, not a directory"):
        run(RunConfig.from_dict({"report": {"out_dir": str(blocker)}}), echo=lambda _: None)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ValueError, match="wandb_mode is online but no W&B key"):
        run(RunConfig.from_dict({"report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "online"}}),
            echo=lambda _: None)
    assert stages_ran == []  # nothing ran, nothing was left half-written


@pytest.mark.parametrize("content", ["{}", "[]", '{"kind": "irmprobe-metrics", "schema_version": 2}', "not json"])
def test_report_on_a_file_that_is_not_a_metrics_file_gives_one_line(content, tmp_path, capsys):
    from irmprobe.cli import main

    path = tmp_path / "metrics.json"
    path.write_text(content)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"irmprobe: cannot read {path}")
    assert "Traceback" not in err[0]


def test_ctrl_c_ends_with_one_line_saying_the_run_resumes(tmp_path, monkeypatch, capsys):
    from irmprobe import api
    from irmprobe.cli import main

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run", interrupted)
    assert main(["run", "--set", f"report.out_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["irmprobe: interrupted; completed stages are cached, so running the same command again resumes"]


def test_a_nan_interval_from_too_few_tokens_reloads_and_reports():
    from irmprobe.analysis.verdict import primary_comparison
    from irmprobe.reporting.summary import agreement_line
    from irmprobe.results import ViewRow

    row = ViewRow.from_json({"name": "sae_irm", "family": "behavioural", "n_tokens": 2, "is_zero": False, "tau": 1.0,
                             "p_value": 1.0, "tau_ci": [None, None]})  # what write_json makes of [nan, nan]
    assert "   -" in agreement_line(row.to_json()) and "+1.000" in agreement_line(row.to_json())
    assert primary_comparison(row, [row, row]).outcome == "undetermined"  # controls that do not vary
