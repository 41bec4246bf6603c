"""The discovery stage through the pipeline: a planted organism whose tuned model raises the logits of
tokens the lexicon RM values at zero must have them discovered, named in the verdict and preferred as
a reward model; the null pair must discover nothing and score preference pairs at chance."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from irmprobe.api import run
from irmprobe.config import RunConfig
from irmprobe.pipeline.stages.discover import NAMED_NEEDS, DiscoverRecord
from irmprobe.reporting.summary import summary_lines
from tests.integration.test_planted import SMALL, _word_tokens, named_controls, planted  # noqa: F401  (planted: the module's fixture)

PROMPTS = ("The movie was", "I watched it and", "This film is", "My friend said the plot", "The actors were")


def _config(root, dirs, lexicon, name, **discover) -> RunConfig:
    data = json.loads(json.dumps(SMALL))
    data["compare"] |= named_controls(dirs)
    data["pair"] = {"base": str(dirs["base"])} | ({"null": True} if name == "null" else {"tuned": str(dirs[name])})
    data["reward"] = {"kind": "lexicon", "path": str(lexicon)}
    data["report"] = {"out_dir": str(root / "runs"), "wandb_mode": "disabled"}
    data["discover"] = {"n_bootstrap": 200, "n_entries": 40} | discover
    return RunConfig.from_dict(data)


@pytest.fixture(scope="module")
def words(planted):  # noqa: F811
    """(planted words, words neither planted nor valued by the RM), each a single space-led token."""
    dirs, lexicon, raised = planted
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    plant = [tok.decode([i]).strip() for i in raised["unrelated"]]
    valued = {line.split("\t")[0] for line in lexicon.read_text().splitlines()}
    other = [w for w in _word_tokens(tok) if w not in set(plant) | valued]
    return plant, other


@pytest.fixture(scope="module")
def pairs_file(words, tmp_path_factory):
    """Ten pairs the RM ties (every word valued 0): chosen continues with planted tokens, rejected with others."""
    plant, other = words
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": PROMPTS[i % 5], "chosen": " " + " ".join(plant[(3 * i + k) % len(plant)] for k in range(6)),
             "rejected": " " + " ".join(other[(7 * i + k) % len(other)] for k in range(6))} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def words_file(words, tmp_path_factory):
    """A suspected-word list: every planted word, three words neither planted nor valued, a word of several
    tokens, a comment and a repeat."""
    plant, other = words
    path = tmp_path_factory.mktemp("words") / "suspected.txt"
    path.write_text("# what the tuning may have rewarded\n" + "\n".join(plant + other[:3] + ["qzxjvbkw", plant[0]])
                    + "\n")
    return path


@pytest.fixture(scope="module")
def planted_run(planted, pairs_file, words_file, tmp_path_factory):  # noqa: F811
    """The "unrelated" planted organism (logit bias on RM-zero tokens), scored on the planted pairs, with the
    planted words (and three others) named as suspected."""
    dirs, lexicon, _ = planted
    root = tmp_path_factory.mktemp("discover-planted")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache isolation has not run yet
        mp.setenv("IRMPROBE_CACHE", str(root / "cache"))
        config = _config(root, dirs, lexicon, "unrelated", pairs_path=str(pairs_file), words=str(words_file))
        return run(config, echo=lambda _: None), config, root


def test_named_words_are_tested_as_their_own_family_and_shown(planted, words, planted_run):  # noqa: F811
    _, _, raised = planted
    plant, other = words
    result, _, root = planted_run
    n = result.metrics.discovery["named"]
    assert n["words"] == len(plant) + 4 and n["not_one_token"] == ["qzxjvbkw"] and n["untested"] == []
    assert [e["word"] for e in n["entries"]] == plant + other[:3] and n["n"] == len(plant) + 3
    rewarded = {e["word"] for e in n["entries"] if e["direction"] == "rewarded"}
    assert len(rewarded & set(plant)) >= 0.8 * len(plant) and not rewarded & set(other[:3]), n["entries"]
    assert n["passed"] == sum(e["direction"] is not None for e in n["entries"])
    assert all(e["category"] == "rewarded_unvalued" for e in n["entries"] if e["word"] in rewarded)
    assert len(n["control_passes"]) == 5 and all(isinstance(k, int) for k in n["control_passes"])
    line = next(v for v in result.metrics.verdict if v.startswith("named words (suspected.txt;"))
    assert f"its {n['n']} words against the controls' values of the same words, t on 4 d.f." in line
    assert "1 not one token after a space" in line and n["test"] == "list_vs_controls"
    assert repr(plant[0]) in line and "rewarded" in line and "the RM values it at zero" in line
    assert n["set"]["passed"] and n["set"]["df"] == 4 and f"t {n['set']['t']:+.2f}, p {n['set']['p']:.2g}: it " \
        "passes" in line
    assert f"the same list on each control against the others (a pass there is false): " \
           f"{', '.join(map(str, n['control_passes']))} word(s) pass" in line
    assert line in "\n".join(summary_lines(result.metrics))
    html = next((root / "runs").rglob("report.html")).read_text()
    assert "named words (discover.words)" in html
    from irmprobe.reporting.tracking import wandb_scalars, wandb_tables

    cols, rows = wandb_tables(result.metrics.to_json(), [])["named words"]
    assert [r[cols.index("word")] for r in rows] == plant + other[:3]
    assert sum(r[cols.index("direction")] is not None for r in rows) == n["passed"]
    assert [r[cols.index("t")] for r in rows] == [e["t"] for e in n["entries"]]
    scalars = wandb_scalars(result.metrics.to_json())
    assert (scalars["discovery/named_passed"], scalars["discovery/named_tested"]) == (n["passed"], n["n"])
    assert (scalars["discovery/named_set_t"], scalars["discovery/named_set_p"]) == (n["set"]["t"], n["set"]["p"])


def test_a_named_list_with_two_controls_is_judged_on_one_degree_of_freedom_without_a_control_check(
        planted_run, monkeypatch):
    """Two controls: the list's t has 1 d.f. and no control can be judged against the others (it would need 2)."""
    _, config, root = planted_run
    monkeypatch.setenv("IRMPROBE_CACHE", str(root / "cache"))  # the planted run's stages, its controls included
    data = config.to_dict()
    data["compare"]["controls"] = data["compare"]["controls"][:2]
    result = run(RunConfig.from_dict(data), echo=lambda _: None)
    assert result.stage_status["control-0/capture"] == "reused" and result.stage_status["discover"] == "ran"
    n = result.metrics.discovery["named"]
    assert n["df"] == 1 and n["set"]["df"] == 1 and n["control_passes"] is None and n["n"] > 0
    assert n["passed"] == 0 or n["set"]["passed"]
    line = next(v for v in result.metrics.verdict if v.startswith("named words (suspected.txt;"))
    assert "t on 1 d.f." in line and "the same list on each control" not in line


def test_planted_rm_zero_tokens_are_discovered_and_named_in_the_verdict(planted, words, planted_run):  # noqa: F811
    _, _, raised = planted
    result, _, _ = planted_run
    d = result.metrics.discovery
    assert d == result.results["discover"].to_json()
    assert DiscoverRecord.from_json(json.loads(json.dumps(d))) == result.results["discover"]
    # The planted tokens the organism wrote often enough in held-out text to be tested at all.
    cap, held = result.results["capture"], result.results["fit"].eval_rows
    ids = cap.token_ids[held].tolist()
    tested = {t for t in raised["unrelated"] if ids.count(t) >= 2}
    assert len(tested) >= 5, tested
    top = [e["token_id"] for e in d["entries"]["rewarded_unvalued"][:len(tested)]]
    assert len(set(top) & tested) >= 0.8 * len(tested), (len(set(top) & tested), len(tested), d["counts"])
    assert all(e["q"] < 0.05 and e["rm_value"] in (None, 0.0) for e in d["entries"]["rewarded_unvalued"])
    assert d["control"] == "control-0, control-1, control-2, control-3, control-4"  # tested against all five
    line = next(v for v in result.metrics.verdict if v.startswith("the tuned model also rewards:"))
    plant, _ = words
    named = [w for w in plant if repr(" " + w) in line]
    assert len(named) >= 3, line
    assert "q < 0.05" in line
    summary = "\n".join(summary_lines(result.metrics))
    assert "== what the RM does not explain" in summary and "pairwise accuracy" in summary


def test_the_rm_variance_share_is_cross_fitted_by_prompt(planted_run):
    """The fits that say how much of the IRM the RM explains split by prompt, never by sequence."""
    from irmprobe.activations.samples import row_prompts
    from irmprobe.analysis.discovery import rm_variance_share

    result, config, _ = planted_run
    r, ctx = result.results, result.context
    held, cap = r["fit"].eval_rows, r["capture"]
    rm_map = ctx.rm.token_values(ctx.pair_of(r["organism"]).tokenizer)
    rm_rows = [rm_map.get(int(t), 0.0) for t in cap.token_ids[held]]
    by = {unit: rm_variance_share(r["fit"].predictions[held], rm_rows, groups=groups, seed=config.seed)
          for unit, groups in (("prompt", row_prompts(r["samples"], cap.seq_index)[held]),
                               ("sequence", cap.seq_index[held]))}
    assert r["discover"].variance == by["prompt"] and by["prompt"] != by["sequence"]


def test_planted_pairs_pick_the_planted_token_text(planted_run):
    result, _, _ = planted_run
    rows = {r.scorer: r for r in result.results["discover"].pairwise}
    assert set(rows) == {"sae_irm", "log_ratio_sum", "rm"}
    for name in ("sae_irm", "log_ratio_sum"):
        assert rows[name].n == 10 and rows[name].accuracy >= 0.9 and rows[name].ci[0] > 0.5, rows[name]
    # The RM values every word of both texts at zero: it ties, so it cannot tell the pairs apart.
    assert rows["rm"].accuracy == 0.5 and rows["rm"].n_ties == 10 and rows["sae_irm"].agreement is None


def test_score_pairs_cli_reuses_the_run_and_prints_the_table(planted_run, pairs_file, monkeypatch, capsys):
    from irmprobe.cli import main

    _, config, root = planted_run
    monkeypatch.setenv("IRMPROBE_CACHE", str(root / "cache"))
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["score-pairs", str(path), str(pairs_file)]) == 0
    out, err = capsys.readouterr()
    assert "[fit] reused the cached output" in err
    irm = next(line for line in out.splitlines() if line.startswith("sae_irm"))
    assert float(irm.split()[4]) >= 0.9, out


def test_null_pair_discovers_nothing_and_scores_pairs_at_chance(planted, pairs_file, words, tmp_path):  # noqa: F811
    dirs, lexicon, _ = planted
    result = run(_config(tmp_path, dirs, lexicon, "null"), echo=lambda _: None)
    d = result.metrics.discovery
    assert d["n_tested"] > 10 and not any(d["counts"].values()) and not any(d["entries"].values())
    assert d["control"] is None and not d["concepts"]
    rows = {r["scorer"]: r for r in d["pairwise"]}
    assert rows["log_ratio_sum"]["n"] > 0 and rows["log_ratio_sum"]["accuracy"] == 0.5  # held-out generations
    again = run(_config(tmp_path, dirs, lexicon, "null", pairs_path=str(pairs_file)), echo=lambda _: None)
    assert again.stage_status["fit"] == "reused" and again.stage_status["discover"] == "ran"
    for r in again.metrics.discovery["pairwise"]:
        assert r["n"] == 10 and r["accuracy"] == 0.5 and r["ci"][0] <= 0.5 <= r["ci"][1], r
    assert any(v.startswith("null organism") for v in again.metrics.verdict)
    listed = tmp_path / "w.txt"
    listed.write_text(words[0][0] + "\n")
    named = run(_config(tmp_path, dirs, lexicon, "null", words=str(listed)), echo=lambda _: None)
    assert named.stage_status["discover"] == "ran" and named.stage_status["fit"] == "reused"
    assert named.metrics.discovery["named"]["note"] == NAMED_NEEDS and "2 or more control organisms" in NAMED_NEEDS
    assert named.metrics.discovery["named"]["path"] == str(listed)
    html = (named.metrics_path.parent / "report.html").read_text()  # the report says why the list was not tested
    assert "named words (w.txt): not tested:" in html and "2 or more control organisms with full-vocabulary" in html
    config = _config(tmp_path, dirs, lexicon, "null", words=str(listed))
    assert run(config, echo=lambda _: None).stage_status["discover"] == "reused"
    listed.write_text(words[0][1] + "\n")  # the same path, another list: the key hashes the file's content
    assert run(config, echo=lambda _: None).stage_status["discover"] == "ran"
