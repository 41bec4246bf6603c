"""Organisms on tiny models: RLOO, GRPO and DPO, LoRA, checkpoints and resume, the report."""

import json

import pytest
from transformers import AutoModelForCausalLM, TrainerCallback

from irmprobe.config import OrganismConfig
from irmprobe.organisms import (
    build_preference_pairs,
    load_preference_pairs,
    load_prompts,
    make_organism,
    organism_report,
    report_lines,
)
from irmprobe.pairs import load_model, load_pair
from irmprobe.rewards import LexiconRM, TextRM

PROMPTS = load_prompts()[:24]


def _changed(base_dir, tuned_dir) -> float:
    a = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tuned_dir).state_dict()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _length_rm():
    # A dense reward (longer completions are better) so that tiny-model samples always differ.
    return TextRM(lambda texts: [len(t) / 10 for t in texts], name="length")


@pytest.mark.parametrize("method", ["rloo", "grpo", "dpo"])
def test_each_method_tunes_a_tiny_model(method, tiny_llama_dir):
    cfg = OrganismConfig(method=method, steps=3, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
                         learning_rate=1e-2, beta=0.1)
    org = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0)
    assert not org.reused and org.path.is_dir()
    assert _changed(tiny_llama_dir, org.path) > 0
    assert any("loss" in row for row in org.history)
    meta = json.loads((org.path / "organism.json").read_text())
    assert meta["method"] == method and meta["reward"]["name"] == "length"
    if method == "dpo":
        assert meta["preference_pairs"] > 0
    again = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0)
    assert again.reused and again.path == org.path


def test_dpo_from_a_pairs_file_and_bad_files(tiny_neox_dir, tmp_path):
    rows = [{"prompt": p, "chosen": " good great", "rejected": " bad awful"} for p in PROMPTS[:6]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_preference_pairs(path) == rows
    cfg = OrganismConfig(method="dpo", steps=2, prompts_per_step=2, learning_rate=1e-2, dpo_pairs=str(path))
    org = make_organism(str(tiny_neox_dir), LexiconRM.vader(), cfg, PROMPTS, seed=0)
    assert json.loads((org.path / "organism.json").read_text())["preference_pairs"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}))
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        load_preference_pairs(bad)
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match="must be .jsonl or .csv"):
        load_preference_pairs(tmp_path / "pairs.txt")


def test_preference_pairs_built_from_samples_rank_by_rm(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    rm = _length_rm()
    pairs = build_preference_pairs(model, tok, rm, PROMPTS[:4], n_per_prompt=3, max_new_tokens=6, seed=0)
    assert pairs and all(rm.score([p["chosen"]])[0] > rm.score([p["rejected"]])[0] for p in pairs)
    with pytest.raises(ValueError, match="no preference pair"):
        build_preference_pairs(model, tok, TextRM(lambda t: [0.0] * len(t), name="flat"), PROMPTS[:2],
                               n_per_prompt=2, max_new_tokens=4, seed=0)


def test_lora_organism_is_merged_into_a_plain_model(tiny_llama_dir):
    cfg = OrganismConfig(steps=2, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
                         learning_rate=5e-2, lora_rank=4)
    org = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0)
    assert not (org.path / "adapter_config.json").exists()
    assert _changed(tiny_llama_dir, org.path) > 0
    base_params = {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).named_parameters()}
    assert {n for n, _ in AutoModelForCausalLM.from_pretrained(org.path).named_parameters()} == base_params


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


class _RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_interrupted_run_resumes_from_its_last_checkpoint(tiny_llama_dir):
    cfg = OrganismConfig(steps=4, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
                         learning_rate=1e-2, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0, callbacks=[_StopAt(3)])
    recorder = _RecordSteps()
    org = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0, callbacks=[recorder])
    assert org.resumed_from_step == 2
    assert recorder.steps == [2, 3]  # the second run did steps 3 and 4 only, not 1 to 4
    logged = [row["step"] for row in org.history if "loss" in row]
    assert logged == [1, 2, 3, 4]  # one history, no step twice
    assert [p.name for p in org.checkpoints] == ["step-2", "step-4"]
    assert _changed(org.checkpoints[-1], org.path) == 0.0  # the last checkpoint is the final model


def test_organism_report_on_a_tiny_pair(tiny_llama_dir, tmp_path):
    from tests.test_pairs import _perturbed_copy

    tuned = _perturbed_copy(tiny_llama_dir, tmp_path / "tuned", layer=1, scale=0.5)
    pair = load_pair(str(tiny_llama_dir), str(tuned))
    rep = organism_report(pair, LexiconRM.vader(), PROMPTS[:5], samples_per_prompt=2, max_new_tokens=8)
    assert rep["n_prompts"] == 5 and rep["samples_per_prompt"] == 2
    assert rep["kl"]["n_sequences"] == 10 and rep["kl"]["mean"] != 0.0
    assert set(rep["vader_compound"]) >= {"base_mean", "tuned_mean", "diff_z"}
    assert len(rep["examples"]) == 3
    lines = report_lines(rep, "vader")
    assert any(line.startswith("KL(tuned || base)") for line in lines)
    null = organism_report(load_pair(str(tiny_llama_dir), None), LexiconRM.vader(), PROMPTS[:3],
                           samples_per_prompt=2, max_new_tokens=4)
    assert null["kl"]["mean"] == 0.0


def test_prompts_from_files_and_datasets(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(txt) == ["first prompt", "second prompt"]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nalpha beta,1\ngamma delta,0\n")
    assert load_prompts(dataset=str(csv_file)) == ["alpha beta", "gamma delta"]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_prompts(dataset=str(csv_file), column="body")
    with pytest.raises(ValueError, match="not both"):
        load_prompts(txt, dataset=str(csv_file))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="hub is unreachable"):
        load_prompts(dataset="irmprobe-test/no-such-dataset")
    assert len(load_prompts()) >= 200


def test_sampling_seed_makes_organisms_reproducible(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = OrganismConfig(steps=2, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6, learning_rate=1e-2)
    paths = []
    for i in range(2):
        monkeypatch.setenv("IRMPROBE_CACHE", str(tmp_path / f"c{i}"))
        paths.append(make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=3).path)
    assert _changed(paths[0], paths[1]) == 0.0
