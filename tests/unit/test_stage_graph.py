"""The stage graph: keys follow declarations, the runner orders/forces/verifies, the CLI is generated."""

from __future__ import annotations

import dataclasses

import pytest

from irmprobe.config import RunConfig, Runtime
from irmprobe.models.rewards import RandomRM
from irmprobe.pipeline.graph import GRAPH, STAGES
from irmprobe.pipeline.runner import CacheError, Runner, mark_done, verify
from irmprobe.pipeline.stage import Context, Sections, Stage, declared_values

_STRINGS = {"pair.base": "other-model", "pair.tuned": "other-tuned", "pair.device": "cuda", "pair.dtype": "bfloat16",
            "organism.method": "grpo", "capture.hook": "hook_resid_post", "capture.rank_layers_by": "relative",
            "sae.architecture": "topk", "irm.inputs": "diff", "validate.judge": "local", "validate.ablation": "mean",
            "report.wandb_mode": "offline", "llm.base_url": "http://127.0.0.1:9/v1", "irm.estimators": ("lasso",),
            "capture.patching_kind": "resid_post", "irm.positions": ("reader",),
            "irm.alphas": (3.0,), "sae.autocast": "off", "compare.primary": "sae_irm",
            "compare.control_views": "measured",
            "attribute.k_grid": (1, 3), "attribute.dictionary": "change", "attribute.change_architecture": "standard", "attribute.spread_ranking": "reward", "organism.precision": "bfloat16", "sae.pretrained": {0: {"release": "r", "id": "i"}}}


def _changed(config: RunConfig, section: str, name: str, tmp_path) -> RunConfig | None:
    """``config`` with one field changed to another valid value (None when no candidate is valid)."""
    current = getattr(getattr(config, section), name) if section != "seed" else config.seed
    dotted = f"{section}.{name}"
    text_file = tmp_path / f"{name}.txt"
    text_file.write_text("one line of text\nanother line\n")
    if dotted in _STRINGS:
        candidates = [_STRINGS[dotted]]
    elif isinstance(current, bool):
        candidates = [not current]
    elif isinstance(current, int):
        candidates = [current + 1, current * 2, max(1, current - 1)]
    elif isinstance(current, float):
        candidates = [current * 2, current / 2, current + 0.1]
    elif isinstance(current, str):
        candidates = [current + "x"]
    else:  # None: a file path, a number or a string
        candidates = [str(text_file), 10, 1.0]
    for value in candidates:
        data = config.to_dict()
        if section == "seed":
            data["seed"] = value
        else:
            data[section][name] = list(value) if isinstance(value, tuple) else value
        try:
            new = RunConfig.from_dict(data)
        except (ValueError, TypeError):
            continue
        if new != config:
            return new
    return None


def _declared(stage: Stage, section: str, name: str) -> bool:
    reads = stage.reads + stage.optional_reads
    return section in reads or f"{section}.{name}" in reads


def test_each_declared_field_changes_its_stages_key_and_no_other(tmp_path):
    config = RunConfig()
    ctx = Context(RandomRM(0), Runtime(), ["a prompt"], ["a held-out prompt"])
    keys = {s.name: s.key(config, ctx, ["input"]) for s in GRAPH}
    fields = {(r.split(".")[0], f.name) for s in GRAPH for r in s.reads + s.optional_reads if r != "seed"
              for f in dataclasses.fields(getattr(config, r.split(".")[0]))
              if "." not in r or r.split(".", 1)[1] == f.name} | {("seed", "seed")}
    checked = 0
    for section, name in sorted(fields):
        changed = _changed(config, section, name, tmp_path)
        assert changed is not None, f"no valid alternative value for {section}.{name}"
        for stage in GRAPH:
            moved = stage.key(changed, ctx, ["input"]) != keys[stage.name]
            reads = stage.reads if section != "seed" else stage.reads
            declared = "seed" in reads if section == "seed" else _declared(stage, section, name)
            assert moved == declared, f"{section}.{name}: key of {stage.name} moved={moved}, declared={declared}"
        checked += 1
    assert checked >= 60  # every field of every declared section, one at a time


def test_a_stage_cannot_read_what_it_did_not_declare():
    cfg = Sections(RunConfig(), ("irm.inputs", "seed"))
    assert cfg.irm.inputs == "tuned" and cfg.seed == 0
    with pytest.raises(AttributeError, match="did not declare irm.alphas"):
        cfg.irm.alphas
    with pytest.raises(AttributeError, match="did not declare 'sae'"):
        cfg.sae
    with pytest.raises(ValueError, match="not a field of RunConfig.irm"):
        declared_values(RunConfig(), ("irm.nope",))


class _Counter(Stage):
    """A fake stage: its result is its name and its inputs' results, and it counts its runs."""

    runs: dict = {}

    def __init__(self, name, needs=(), reads=()):
        self.name, self.needs, self.reads = name, needs, reads

    def run(self, cfg, ctx, inputs, out):
        _Counter.runs[(ctx.branch.name, self.name)] = _Counter.runs.get((ctx.branch.name, self.name), 0) + 1
        (out / "value.txt").write_text(self.name + "".join(sorted(str(v) for v in inputs.values())))
        return (out / "value.txt").read_text()

    def load(self, cfg, ctx, inputs, out):
        return (out / "value.txt").read_text()


def _graph():
    joint = _Counter("joint", needs=("b",))
    joint.control_needs = ("b",)
    return [_Counter("a", reads=("seed",)), _Counter("b", needs=("a",), reads=("irm.alphas",)), joint]


def test_runner_orders_reuses_forces_with_cascade_and_runs_controls_only_when_needed():
    from irmprobe.pipeline.stage import Branch

    _Counter.runs = {}
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lambda _: None)
    controls = [ctx.for_branch(Branch("control-0", RandomRM(1)))]
    Runner(_graph(), RunConfig(), ctx, controls, until="b").run()
    assert set(_Counter.runs) == {("organism", "a"), ("organism", "b")}  # until=b: no control yet
    runner = Runner(_graph(), RunConfig(), ctx, controls)
    runner.run()
    assert runner.status == {"a": "reused", "b": "reused", "control-0/a": "ran", "control-0/b": "ran", "joint": "ran"}
    runner = Runner(_graph(), RunConfig(), ctx, controls, force=("b",))
    runner.run()
    assert runner.status["a"] == "reused" and runner.status["b"] == "ran" and runner.status["joint"] == "ran"
    assert runner.status["control-0/b"] == "ran" and runner.status["control-0/a"] == "reused"
    with pytest.raises(ValueError, match="unknown stage 'c'"):
        Runner(_graph(), RunConfig(), ctx, controls, force=("c",))


def test_a_stage_that_runs_again_says_how_long_it_took_last_time(monkeypatch, tmp_path):
    import irmprobe.pipeline.runner as runner_module

    monkeypatch.setattr(runner_module, "ESTIMATE_FROM", 0.0)
    lines = []
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lines.append)
    first = Runner(_graph(), RunConfig(), ctx, [], until="b")
    first.run()
    assert not any("running: about" in line for line in lines)  # no history yet
    lines.clear()
    again = Runner(_graph(), RunConfig(), ctx, [], until="b", force=("b",))
    again.run()
    assert [line for line in lines if "running: about" in line] == [
        f"[b] running: about {first.seconds['b']:.0f} s (its last run on this machine)"]
    assert not any(line.startswith("[a] running") for line in lines)  # reused: no estimate
    # Its settings changed: the last run's time is shown as a rough guide only.
    lines.clear()
    Runner(_graph(), RunConfig.from_dict({"irm": {"alphas": [7.0]}}), ctx, [], until="b").run()
    assert [line for line in lines if "running: about" in line] == [
        f"[b] running: about {again.seconds['b']:.0f} s (its last run on this machine, with other settings or "
        "inputs: a rough guide)"]


def _reference(monkeypatch, tmp_path, stages):
    import json

    import irmprobe.pipeline.runner as runner_module

    path = tmp_path / "reference_seconds.json"
    path.write_text(json.dumps({"stages": stages}))
    monkeypatch.setattr(runner_module, "REFERENCE", path)


def test_the_plan_lists_every_stage_in_run_order_with_the_keys_the_run_uses():
    from irmprobe.pipeline.stage import Branch

    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lambda _: None)
    controls = [ctx.for_branch(Branch("control-0", RandomRM(1)))]
    plan = Runner(_graph(), RunConfig(), ctx, controls).plan()
    assert [p.label for p in plan] == ["a", "b", "control-0/a", "control-0/b", "joint"]
    assert not any(p.reused for p in plan)
    runner = Runner(_graph(), RunConfig(), ctx, controls, until="b")
    runner.run()
    assert list(runner.status) == ["a", "b"]
    again = Runner(_graph(), RunConfig(), ctx, controls).plan()
    assert [(p.label, p.key) for p in again] == [(p.label, p.key) for p in plan]  # keys known before any run
    assert [p.label for p in again if p.reused] == ["a", "b"]
    assert [(p.label, p.key) for p in again][:2] == [("a", runner.key("a")), ("b", runner.key("b"))]
    full = Runner(_graph(), RunConfig(), ctx, controls)
    full.run()
    assert list(full.status) == [p.label for p in plan]  # the order it ran them
    assert full.pending == [(p.label, p.key) for p in again if not p.reused]


def test_a_first_run_of_the_reference_work_starts_each_stage_with_the_reference_time_and_the_runs_rest(
        monkeypatch, tmp_path):
    from irmprobe.pipeline.stage import Branch

    lines = []
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lines.append)
    controls = [ctx.for_branch(Branch("control-0", RandomRM(1)))]
    plan = {p.label: p.key for p in Runner(_graph(), RunConfig(), ctx, controls).plan()}
    _reference(monkeypatch, tmp_path, {"a": {"seconds": 40.0, "key": plan["a"]},
                                       "b": {"seconds": 600.0, "key": "other work"},
                                       "control-0/a": {"seconds": 20.0, "key": plan["control-0/a"]},
                                       "control-0/b": {"seconds": 50.0, "key": plan["control-0/b"]}})
    runner = Runner(_graph(), RunConfig(), ctx, controls)
    runner.run()
    # a: its reference time, and the rest of the run (a, control-0/a and control-0/b; b's reference is of other
    # work and joint has none: not counted, and said so). b: no figure of its work, no estimate. control-0/a: under
    # ESTIMATE_FROM, no line. control-0/b: scaled by this machine's pace on a (a fake stage: near 0).
    estimates = [line for line in lines if "running: about" in line]
    assert estimates[0] == ("[a] running: about 40 s (a reference run on 2 CPU cores); the run's 5 stages left from "
                            "here: about 110 s, 2 of them with no figure and not counted")
    assert len(estimates) == 1
    assert runner.against_reference[0][1] == 40.0 and len(runner.against_reference) == 3
    assert runner.speed() == pytest.approx((runner.seconds["a"] + runner.seconds["control-0/b"]) / 90.0)


def test_the_plans_keys_are_the_declared_config_and_the_inputs_keys_control_roots_and_joint_stages_included():
    from irmprobe.pipeline.stage import Branch

    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lambda _: None)
    cctx = ctx.for_branch(Branch("control-0", RandomRM(1)))
    graph = _graph()
    a, b, joint = graph
    config = RunConfig()
    keys = {"a": a.key(config, ctx, []), "control-0/a": a.key(config, cctx, [f"control-0:{RandomRM(1).describe()}"])}
    keys["b"] = b.key(config, ctx, [keys["a"]])
    keys["control-0/b"] = b.key(config, cctx, [keys["control-0/a"]])
    keys["joint"] = joint.key(config, ctx, [keys["b"], keys["control-0/b"]])
    assert {p.label: p.key for p in Runner(graph, config, ctx, [cctx]).plan()} == keys
    assert len(set(keys.values())) == 5


def test_a_reference_estimate_is_scaled_by_this_machines_pace_so_far(monkeypatch, tmp_path):
    lines = []
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lines.append)
    graph = [_Counter("a", reads=("seed",))]
    key = Runner(graph, RunConfig(), ctx, []).plan()[0].key
    _reference(monkeypatch, tmp_path, {"a": {"seconds": 40.0, "key": key}})
    runner = Runner(graph, RunConfig(), ctx, [])
    runner.against_reference = [(60.0, 30.0)]  # an earlier stage of this run took twice its reference time
    runner.run()
    assert [line for line in lines if "running:" in line] == [
        "[a] running: about 80 s (a reference run on 2 CPU cores, times 2.00: this machine's pace on the stages so "
        "far)"]


def test_the_estimate_prefers_this_machines_record_then_the_scaled_reference_then_a_rough_guide(
        monkeypatch, tmp_path):
    import irmprobe.pipeline.runner as runner_module

    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lambda _: None)
    _reference(monkeypatch, tmp_path, {"a": {"seconds": 60.0, "key": "k1"}, "b": {"seconds": 10.0, "key": "k2"}})
    runner = Runner(_graph(), RunConfig(), ctx, [])
    assert runner.estimate("a", "k1") == (60.0, "a reference run on 2 CPU cores")
    runner.against_reference = [(80.0, 40.0), (5.0, 10.0)]  # the 10-s stage is mostly start-up: left out
    assert runner.speed() == 2.0
    assert runner.estimate("a", "k1") == (120.0, "a reference run on 2 CPU cores, times 2.00: this machine's pace "
                                                 "on the stages so far")
    assert runner.estimate("a", "other") is None
    runner_module._record_seconds("a", 33.0, "other")
    assert runner.estimate("a", "other") == (33.0, "its last run on this machine")
    assert runner.estimate("a", "k1") == (120.0, "a reference run on 2 CPU cores, times 2.00: this machine's pace "
                                                 "on the stages so far")
    runner_module._record_seconds("a", 70.0, "k1")
    assert runner.estimate("a", "k1") == (70.0, "its last run on this machine")
    assert runner.estimate("a", "third") == (70.0, "its last run on this machine, with other settings or inputs: "
                                                   "a rough guide")
    # The run's rest counts the stages from this one on, not those already done.
    runner.against_reference = []
    runner.pending = [("b", "k2"), ("a", "k1"), ("c", "k3")]
    assert runner._left("a") == "; the run's 2 stages left from here: about 70 s, 1 of them with no figure and not " \
                                "counted"
    assert runner._left("b") == "; the run's 3 stages left from here: about 80 s, 1 of them with no figure and not " \
                                "counted"
    assert runner._left("c") == ""  # the last stage: its own estimate says it all
    runner_module._record_seconds("c", 500.0, "k0")  # c's last run was of other work: a rough guide, said so
    assert runner._left("b") == "; the run's 3 stages left from here: about 10 min, 1 of them timed by a run with " \
                                "other settings or inputs"


def test_the_shipped_reference_times_every_stage_of_the_demos_plan_with_its_current_key(tmp_path):
    """The reference a first demo run estimates from (irmprobe/data/reference_seconds.json) must be of today's work:
    a stage added, renamed, or changed in its version or its settings fails here until the reference is rewritten
    (rerun `make demo` in the cache that wrote it, which reruns what changed, then scripts/reference_timings.py)."""
    import json
    from pathlib import Path

    from irmprobe.api import prepare
    from irmprobe.pipeline.runner import REFERENCE

    config = RunConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    config = dataclasses.replace(config, pair=dataclasses.replace(config.pair, memory_check=False),
                                 report=dataclasses.replace(config.report, out_dir=str(tmp_path)))
    plan = prepare(config, echo=lambda _: None).plan()
    stages = json.loads(REFERENCE.read_text())["stages"]
    assert set(stages) == {p.label for p in plan}
    # The report stage is never cached, and its key holds report.out_dir (here a temporary directory).
    stale = [p.label for p in plan if p.name != "report" and stages[p.label]["key"] != p.key]
    assert not stale, f"the reference timings are of other work for {stale}: rewrite them (this test's docstring)"
    assert all(s["seconds"] >= 0 for s in stages.values())


@pytest.mark.parametrize("field", ["pairs_path", "words"])
def test_a_missing_file_a_stage_reads_is_refused_before_any_stage_runs(tmp_path, field):
    """The run plans every key first, and a key hashes the files a stage reads: a missing one stops the run before
    the first stage (here the discover stage's, the tenth to run)."""
    from irmprobe.api import prepare
    from irmprobe.cache import cache_root

    config = RunConfig.from_dict({"pair": {"memory_check": False, "chat_template": False},
                                  "report": {"out_dir": str(tmp_path / "out")},
                                  "discover": {field: str(tmp_path / "no-file.txt")}})
    lines = []
    runner = prepare(config, echo=lines.append)
    with pytest.raises(ValueError, match=f"discover.{field}.*no-file.txt does not exist"):
        runner.run()
    if field == "words":  # a list with no word is refused as early
        (tmp_path / "no-file.txt").write_text("# nothing yet\n")
        with pytest.raises(ValueError, match="discover.words: word list .*no-file.txt lists no word"):
            prepare(config, echo=lines.append).run()
    assert not lines and not (cache_root() / "stages").exists()


class _Resumable(_Counter):
    """A fake resumable stage: it writes a part file, then fails while ``fail`` is set."""

    resumable, fail = True, False

    def run(self, cfg, ctx, inputs, out):
        (out / "part.txt").write_text("half")
        if _Resumable.fail:
            raise RuntimeError("interrupted")
        return super().run(cfg, ctx, inputs, out)


def test_a_resumed_stages_time_is_not_recorded_as_a_guide_to_a_whole_run(monkeypatch):
    import irmprobe.pipeline.runner as runner_module

    monkeypatch.setattr(runner_module, "ESTIMATE_FROM", 0.0)
    lines = []
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lines.append)
    Runner([_Resumable("a", reads=("seed",))], RunConfig(seed=5), ctx, []).run()
    whole = runner_module._last_seconds()["a"]
    monkeypatch.setattr(_Resumable, "fail", True)
    with pytest.raises(RuntimeError, match="interrupted"):
        Runner([_Resumable("a", reads=("seed",))], RunConfig(seed=6), ctx, []).run()
    monkeypatch.setattr(_Resumable, "fail", False)
    lines.clear()
    resumed = Runner([_Resumable("a", reads=("seed",))], RunConfig(seed=6), ctx, [])
    resumed.run()
    assert resumed.status["a"] == "ran" and runner_module._last_seconds()["a"] == whole
    assert [line for line in lines if "running:" in line] == [
        f"[a] running: it resumes an interrupted run; a whole one takes about {whole['seconds']:.0f} s (its last run "
        "on this machine, with other settings or inputs: a rough guide)"]
    # A leftover temporary file (leading dot) is not a part done: a whole run, recorded.
    fresh = Runner([_Resumable("a", reads=("seed",))], RunConfig(seed=7), ctx, [])
    leftover = runner_module.stage_dir("a", fresh.plan()[0].key) / ".part.txt.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("")
    fresh.run()
    assert runner_module._last_seconds()["a"]["key"] == fresh.key("a") != whole["key"]


class _Skipper(_Counter):
    """A fake stage that does no work when ``seed`` is 1 (as the seeds stage does when ``seeds.checks`` is 0)."""

    def skips(self, cfg, ctx, inputs):
        return "seed is 1" if cfg.seed == 1 else None


def test_the_reference_script_takes_each_stages_recorded_time_zero_for_a_skip_and_refuses_a_missing_one():
    import irmprobe.pipeline.runner as runner_module
    from tests.unit.benchmark_module import load_benchmark

    reference = load_benchmark("reference_timings", "scripts").reference
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lambda _: None)
    graph = lambda: [_Counter("a", reads=("seed",)), _Skipper("s", needs=("a",), reads=("seed",))]  # noqa: E731
    config = RunConfig(seed=1)  # s skips
    ran = Runner(graph(), config, ctx, [])
    ran.run()
    assert reference(Runner(graph(), config, ctx, [])) == {"a": {"seconds": ran.seconds["a"], "key": ran.key("a")},
                                                           "s": {"seconds": 0.0, "key": ran.key("s")}}
    runner_module._record_seconds("a", 9.0, "other work")  # a later run with other settings overwrote a's time
    with pytest.raises(ValueError, match="no recorded time of this config's run for a in this cache"):
        reference(Runner(graph(), config, ctx, []))


def test_a_stage_that_will_skip_shows_no_estimate_and_keeps_the_last_real_runs_time(monkeypatch, tmp_path):
    import irmprobe.pipeline.runner as runner_module

    monkeypatch.setattr(runner_module, "ESTIMATE_FROM", 0.0)
    lines = []
    ctx = Context(RandomRM(0), Runtime(), [], [], echo=lines.append)
    graph = lambda: [_Skipper("a", reads=("seed",))]  # noqa: E731
    Runner(graph(), RunConfig(), ctx, []).run()
    recorded = runner_module._last_seconds()["a"]
    lines.clear()
    skipped = Runner(graph(), RunConfig(seed=1), ctx, [])
    skipped.run()
    assert skipped.status["a"] == "ran" and not any("running: about" in line for line in lines)
    assert runner_module._last_seconds()["a"] == recorded  # the skip's instant is not recorded
    lines.clear()
    Runner(graph(), RunConfig(seed=2), ctx, []).run()  # a real run again: the real run's time is the guide
    assert [line for line in lines if "running: about" in line] == [
        f"[a] running: about {recorded['seconds']:.0f} s (its last run on this machine, with other settings or "
        "inputs: a rough guide)"]


def test_completion_marker_checksums_catch_a_changed_file(tmp_path):
    stage = _Counter("a")
    (tmp_path / "value.txt").write_text("a")
    mark_done(tmp_path, stage, "k1")
    assert verify(tmp_path, "k1") and not verify(tmp_path, "k2")
    (tmp_path / "value.txt").write_text("b")
    with pytest.raises(CacheError, match="checksum mismatch.*the a stage recomputes it"):
        verify(tmp_path, "k1")


def test_cli_is_generated_from_the_stage_declarations(capsys):
    from irmprobe.cli import build_parser, reads_of

    parser = build_parser()
    for name in STAGES:
        if name != "report":
            assert parser.parse_args([name]).until == name
    assert "irm.inputs" in reads_of("saes") and "irm.alphas" not in reads_of("saes")
    assert set(reads_of("fit")) >= {"irm", "compare.n_triples", "sae", "organism"}
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--force", "sae"])
    assert "invalid choice: 'sae'" in capsys.readouterr().err


def test_corrupted_sae_weights_and_a_deleted_shard_are_recomputed_alone(tiny_llama_dir, tmp_path):
    import json as _json
    from pathlib import Path

    import numpy as np

    from irmprobe.api import run
    from tests.integration.test_pipeline import TINY

    data = _json.loads(_json.dumps(TINY)) | {"pair": {"base": str(tiny_llama_dir)},
                                             "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}}
    config = RunConfig.from_dict(data)
    first = run(config, until="saes", echo=lambda _: None)
    rows = first.results["saes"].record.rows
    weights = Path(first.results["saes"].record.paths["tuned.0"]) / "sae_weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-64:] = bytes(b ^ 0xFF for b in blob[-64:])  # flip bits inside the tensor data
    weights.write_bytes(bytes(blob))
    lines = []
    again = run(config, until="saes", echo=lines.append)
    assert again.stage_status["saes"] == "ran" and again.stage_status["capture"] == "reused"
    assert any("tuned.0 are missing or corrupted" in line and "retraining" in line for line in lines)
    # Retrained with the same seed: the same SAE, and every other SAE was reused untouched.
    assert [r["explained_variance"] for r in again.results["saes"].record.rows] == [r["explained_variance"] for r in rows]
    store = Path(first.results["capture"].layers and again.results["saes"].record.paths["tuned.0"]).parent
    capture_dir = next((tmp_path / "cache" / "stages" / "capture").iterdir())
    shard = sorted(capture_dir.glob("shard-*.safetensors"))[0]
    shard.unlink()
    lines = []
    third = run(config, until="capture", echo=lines.append)
    assert third.stage_status["capture"] == "ran" and any("missing or corrupted" in line for line in lines)
    assert np.array_equal(third.results["capture"].acts["tuned.0"], first.results["capture"].acts["tuned.0"])
    assert store.is_dir()


@pytest.mark.parametrize("change", [{"steps": 7}, {"method": "grpo"}, {"method": "dpo"}, {"learning_rate": 3e-5},
                                    {"beta": 0.2}, {"lora_rank": 4}, {"prompts_per_step": 3}])
def test_the_control_follows_every_organism_setting_and_differs_only_in_its_reward(change, monkeypatch, tmp_path):
    """The control branch trains with exactly the organism's settings; only the reward it is tuned against differs."""
    from types import SimpleNamespace

    import irmprobe.organisms.tuning as organisms
    from irmprobe.pipeline.control import control_branches
    from irmprobe.pipeline.stages.organism import OrganismStage

    calls = []

    def fake_make_organism(base, rm, oc, prompts, **kw):
        calls.append((rm.describe(), oc, tuple(prompts), kw["seed"]))
        return SimpleNamespace(path=tmp_path / f"org{len(calls)}", reused=False, seconds=0.0, history=())

    monkeypatch.setattr(organisms, "make_organism", fake_make_organism)
    config = RunConfig.from_dict({"organism": change})
    from irmprobe.models.rewards import reward_model

    ctx = Context(reward_model(config.reward), Runtime(), ["p1", "p2"], ["h1"], echo=lambda _: None)
    control, *_ = control_branches(config, ctx)
    stage = OrganismStage()
    keys = []
    for branch in (ctx, control):
        out = tmp_path / branch.branch.name
        out.mkdir()
        stage.run(Sections(config, stage.reads), branch, {}, out)
        keys.append(stage.key(config, branch, []))
    (rm_org, oc_org, prompts_org, seed_org), (rm_ctrl, oc_ctrl, prompts_ctrl, seed_ctrl) = calls
    assert oc_ctrl == oc_org == config.organism  # same method, steps, lr, beta, batch, LoRA
    assert (prompts_ctrl, seed_ctrl) == (prompts_org, seed_org)
    assert rm_ctrl["name"].startswith("random") and rm_ctrl != rm_org
    assert keys[0] != keys[1]


def test_a_controls_key_does_not_depend_on_the_tuned_model_being_judged(tmp_path):
    """Judging a second tuned model of the same base reuses the control: its key follows what makes it only."""
    from irmprobe.pipeline.control import control_branches
    from irmprobe.pipeline.stages.organism import OrganismStage

    first, second = tmp_path / "tuned-a", tmp_path / "tuned-b"
    for d, text in ((first, "a"), (second, "b")):
        d.mkdir()
        (d / "model.safetensors").write_text(text)
    keys = {}
    for tuned in (first, second):
        config = RunConfig.from_dict({"pair": {"tuned": str(tuned)}})
        ctx = Context(RandomRM(0), Runtime(), ["p1"], ["h1"])
        control, *_ = control_branches(config, ctx)
        keys[tuned.name] = (OrganismStage().key(config, ctx, []), OrganismStage().key(config, control, []))
    assert keys["tuned-a"][0] != keys["tuned-b"][0]  # the organism branch: the tuned model is what it is
    assert keys["tuned-a"][1] == keys["tuned-b"][1]  # the control: the same base, settings and random reward
    base_only = RunConfig()
    ctx = Context(RandomRM(0), Runtime(), ["p1"], ["h1"])
    control, *_ = control_branches(base_only, ctx)
    assert OrganismStage().key(base_only, control, []) == keys["tuned-a"][1]


def test_a_measured_only_control_shares_its_training_and_samples_with_the_full_one():
    """compare.control_views=measured: a control keeps its organism and samples keys (no retraining, no
    resampling); its layers key, hence every key after it, differs from the full control's, and ignores the
    settings of what it does not make (blocks, hook)."""
    from irmprobe.pipeline.control import control_branches
    from irmprobe.pipeline.stages.layers import LayersStage
    from irmprobe.pipeline.stages.organism import OrganismStage
    from irmprobe.pipeline.stages.samples import SamplesStage

    ctx = Context(RandomRM(0), Runtime(), ["p1"], ["h1"])
    keys = {}
    for views in ("all", "measured"):
        config = RunConfig.from_dict({"compare": {"control_views": views}})
        control, *_ = control_branches(config, ctx)
        assert control.branch.measured_only == (views == "measured")
        organism = OrganismStage().key(config, control, [])
        samples = SamplesStage().key(config, control, [organism])
        keys[views] = (organism, samples, LayersStage().key(config, control, [organism, samples]))
    assert keys["all"][:2] == keys["measured"][:2] and keys["all"][2] != keys["measured"][2]
    # What blocks to capture and at which hook sets nothing a measured-only control makes: its layers and capture
    # keys ignore those settings (judging at another hook reuses its capture); a full control's follow them.
    from irmprobe.pipeline.stages.capture import CaptureStage

    def chain(views, **capture):
        config = RunConfig.from_dict({"compare": {"control_views": views}, "capture": capture})
        control, *_ = control_branches(config, ctx)
        organism = OrganismStage().key(config, control, [])
        samples = SamplesStage().key(config, control, [organism])
        layers = LayersStage().key(config, control, [organism, samples])
        return layers, CaptureStage().key(config, control, [organism, samples, layers])

    moved = {"hook": "hook_resid_post", "patching_kind": "resid_post", "top_k_layers": 5, "rank_layers_by": "relative"}
    assert chain("measured") == chain("measured", **moved) and chain("measured")[0] == keys["measured"][2]
    assert chain("all", hook="hook_resid_post")[1] != chain("all")[1] and chain("all", top_k_layers=5) != chain("all")
    assert chain("measured", max_texts=3)[1] != chain("measured")[1]  # extra texts are captured by every branch
    from irmprobe.pipeline.graph import GRAPH

    for stage in GRAPH:  # an ignored setting the stage does not read would silently ignore nothing
        assert set(stage.measured_only_ignores) <= set(stage.reads + stage.optional_reads), stage.name
    with pytest.raises(ValueError, match="control_views measured gives the controls no SAEs"):
        RunConfig.from_dict({"compare": {"control_views": "measured", "primary": "sae_irm"}})
    with pytest.raises(ValueError, match="control_views must be all or measured"):
        RunConfig.from_dict({"compare": {"control_views": "light"}})


def test_a_known_answer_organism_is_tuned_against_its_own_reward_but_shares_the_rms_controls(tmp_path):
    """``reward.tuned_against``: the organism's key follows what it is tuned against; its controls are the RM's."""
    from irmprobe.models.rewards import LexiconRM, training_reward
    from irmprobe.pipeline.control import control_branches
    from irmprobe.pipeline.stage import Branch
    from irmprobe.pipeline.stages.organism import OrganismStage

    words = tmp_path / "words.tsv"
    words.write_text("the\t2.0\nof\t2.0\n")
    rm = LexiconRM({"good": 2.0, "bad": -2.0}, name="rm")
    keys = {}
    for against in (None, "negated", str(words)):
        config = RunConfig.from_dict({"reward": {"tuned_against": against}})
        tuned_on = training_reward(against, rm)
        ctx = Context(rm, Runtime(), ["p1"], ["h1"], branch=Branch("organism", None if tuned_on is rm else tuned_on))
        control, *_ = control_branches(config, ctx)
        keys[against] = (OrganismStage().key(config, ctx, []), OrganismStage().key(config, control, []))
        if against == "negated":
            assert ctx.train_reward.score(["good day", "bad day"]).tolist() == [-0.4, 0.4]
    assert len({k[0] for k in keys.values()}) == 3  # three different organisms
    assert len({k[1] for k in keys.values()}) == 1  # one control for all three
    for bad, where in (({"reward": {"tuned_against": "negate"}}, "tuned_against"),
                       ({"reward": {"tuned_against": str(tmp_path / "missing.tsv")}}, "tuned_against"),
                       ({"reward": {"tuned_against": "negated"}, "pair": {"tuned": "x"}}, "nothing is tuned")):
        with pytest.raises(ValueError, match=where):
            RunConfig.from_dict(bad)


def test_named_controls_are_checked_before_any_stage_runs(tiny_llama_dir, tmp_path):
    """A control in compare.controls that is not a model, or has another tokenizer: one clear error, no stage run."""
    import json
    import shutil

    from irmprobe.api import run

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_llama_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[100], sorted(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same tokens under other ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_weights / "config.json")
    cases = [(str(tmp_path / "nowhere"), "is not a directory"), (str(empty), "not a model: .*no config.json"),
             (str(no_weights), "not a model: .*holds no weights"), (str(other), "another tokenizer")]
    for path, message in cases:
        config = RunConfig.from_dict({"pair": {"base": str(tiny_llama_dir)},
                                      "compare": {"n_controls": 1, "controls": [str(tiny_llama_dir), path]},
                                      "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}})
        with pytest.raises(ValueError, match=r"compare\.controls\[1\].*" + message):
            run(config, echo=lambda _: None)
        assert not (tmp_path / "cache" / "stages").exists()
    with pytest.raises(ValueError, match="below the 2 that the t-test"):
        RunConfig.from_dict({"compare": {"n_controls": 1}})
    assert RunConfig.from_dict({"compare": {"n_controls": 1, "control": False}}).compare.n_controls == 1


def test_each_real_stage_says_it_will_skip_exactly_where_its_run_skips():
    """The runner's estimate rests on ``Stage.skips``; these are the stages whose ``run`` records a skip."""
    from types import SimpleNamespace

    from irmprobe.pipeline.stages.ablate import AblateStage
    from irmprobe.pipeline.stages.attribute import AttributeStage
    from irmprobe.pipeline.stages.depth import DepthStage
    from irmprobe.pipeline.stages.interpret import InterpretStage
    from irmprobe.pipeline.stages.seeds import SeedsStage

    tuned, null = SimpleNamespace(tuned=object()), SimpleNamespace(tuned=None)

    def skips(stage, inputs, **sections):
        config = RunConfig.from_dict(sections)
        return stage.skips(stage.sections(config), None, inputs)

    assert skips(SeedsStage(), {"attribute": {}}) == "seeds.checks is 0"
    assert skips(SeedsStage(), {"attribute": {}}, seeds={"checks": 1}) is None
    assert "no attribution" in skips(SeedsStage(), {"attribute": {"skipped": "x"}}, seeds={"checks": 1})
    assert skips(DepthStage(), {"organism": tuned}) is None
    assert skips(DepthStage(), {"organism": tuned}, depth={"enabled": False}) == "depth.enabled is off"
    assert skips(DepthStage(), {"organism": null}) is not None
    assert skips(AttributeStage(), {"organism": tuned}) is None
    assert skips(AttributeStage(), {"organism": tuned}, attribute={"enabled": False}) == "attribute.enabled is off"
    assert skips(AttributeStage(), {"organism": null}) is not None
    assert skips(InterpretStage(), {"organism": tuned}) is None
    assert skips(InterpretStage(), {"organism": tuned}, validate={"enabled": False}) == "validate.enabled is off"
    assert skips(AblateStage(), {"interpret": {"top_k_columns": []}}) is None
    assert skips(AblateStage(), {"interpret": {"skipped": "x"}}) is not None
