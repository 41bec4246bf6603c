"""Organisms on tiny models: RLOO, GRPO and DPO, LoRA, checkpoints and resume, the report."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from irmprobe.activations.samples import sample_continuations
from irmprobe.config import OrganismConfig
from irmprobe.models.loading import load_model, load_pair
from irmprobe.models.rewards import LexiconRM, TextRM
from irmprobe.organisms.report import organism_report, report_lines
from irmprobe.organisms.tuning import build_preference_pairs, load_preference_pairs, make_organism
from irmprobe.prompts import load_prompts

PROMPTS = load_prompts()[:24]


def _changed(base_dir, tuned_dir) -> float:
    a = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tuned_dir).state_dict()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _length_rm():
    # A dense reward (longer completions are better) so that tiny-model samples always differ.
    return TextRM(lambda texts: [len(t) / 10 for t in texts], name="length")


def _expected_token_chars(model_dir, tokenizer) -> float:
    """Expected characters per next token under the model, over every position of the prompts: what the
    length RM pays for per token, computed exactly from the model's distribution (no sampling noise)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chars = torch.tensor([len(tokenizer.decode([i])) for i in range(len(tokenizer))], dtype=torch.float64)
    means = []
    with torch.no_grad():
        for prompt in PROMPTS:
            logits = model(tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0].double()
            means.append(float((torch.softmax(logits, -1) @ chars).mean()))
    return float(np.mean(means))


def _logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion | prompt), summed over the completion's tokens."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + tokenizer(completion, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(p) - 1:].sum())


@pytest.mark.parametrize("method", ["rloo", "grpo", "dpo"])
def test_each_method_tunes_a_tiny_model(method, tiny_llama_dir):
    cfg = OrganismConfig(method=method, steps=3, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
                         learning_rate=1e-2, beta=0.1)
    org = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0)
    assert not org.reused and org.path.is_dir()
    assert [row["step"] for row in org.history if "loss" in row] == [1, 2, 3]  # logged every step
    meta = json.loads((org.path / "organism.json").read_text())
    assert meta["method"] == method and meta["reward"]["name"] == "length"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    if method == "dpo":
        # The organism moved towards what the RM prefers: on every pair, the log-ratio (tuned - base) of
        # the completion the RM scores higher minus that of the lower one (DPO's implicit reward margin).
        base_model, _ = load_model(str(tiny_llama_dir))
        rm = _length_rm()
        pairs = build_preference_pairs(base_model, tok, rm, PROMPTS, n_per_prompt=cfg.dpo_samples_per_prompt,
                                       max_new_tokens=cfg.max_new_tokens, seed=0)
        assert meta["preference_pairs"] == len(pairs) > 10
        tuned = AutoModelForCausalLM.from_pretrained(org.path).eval()
        margins = []
        for pair in pairs:
            hi, lo = sorted((pair["chosen"], pair["rejected"]), key=lambda t: -rm.score([t])[0])
            ratio = [_logp(tuned, tok, pair["prompt"], t) - _logp(base_model, tok, pair["prompt"], t) for t in (hi, lo)]
            margins.append(ratio[0] - ratio[1])
        assert np.mean(margins) > 0.3 and np.mean(np.array(margins) > 0) > 0.6  # measured: 1.05 nats, 79%
    else:
        # The length RM pays per character: the tuned model's next token is longer in expectation
        # (measured +0.012 to +0.013 chars; tuned against the negated RM, -0.006 to -0.007).
        assert _expected_token_chars(org.path, tok) > _expected_token_chars(tiny_llama_dir, tok) + 0.005
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
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(org.path).state_dict()
    assert set(tuned) == set(base)
    # LoRA on every linear layer of the blocks, merged: those weights moved, by a low-rank update;
    # the embeddings and norms, which LoRA does not adapt, are bit-identical.
    adapted = [k for k in base if ".layers." in k and k.endswith("proj.weight")]
    assert len(adapted) == 2 * 7
    for k in base:
        delta = (tuned[k] - base[k]).double()
        if k in adapted:
            assert delta.abs().max() > 1e-4 and torch.linalg.matrix_rank(delta, atol=1e-6) <= 4, k
        else:
            assert torch.equal(tuned[k], base[k]), k


def test_a_bfloat16_lora_control_with_checkpointing_trains_and_keeps_its_key(tiny_llama_dir, monkeypatch):
    """organism.precision bfloat16 with LoRA: the frozen weights are bfloat16 while training, the adapters learn,
    gradient checkpointing is on; the new settings stay out of the key while at their defaults."""
    import irmprobe.organisms.tuning as tuning
    from irmprobe.organisms.tuning import organism_key

    seen = {}
    real = tuning._build_trainer

    def spy(config, model, *a, **k):
        trainer = real(config, model, *a, **k)
        seen.update(weights=model.model.layers[0].mlp.down_proj.weight.dtype, bf16=trainer.args.bf16,
                    checkpointing=trainer.args.gradient_checkpointing)
        return trainer

    monkeypatch.setattr(tuning, "_build_trainer", spy)
    cfg = OrganismConfig(steps=2, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
                         learning_rate=5e-2, lora_rank=4, precision="bfloat16", gradient_checkpointing=True)
    org = make_organism(str(tiny_llama_dir), _length_rm(), cfg, PROMPTS, seed=0)
    assert seen == {"weights": torch.bfloat16, "bf16": True, "checkpointing": True}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(org.path, dtype=torch.float32).state_dict()
    assert (tuned["model.layers.0.mlp.down_proj.weight"] - base["model.layers.0.mlp.down_proj.weight"]).abs().max() > 1e-3
    plain = OrganismConfig(steps=2)
    key = organism_key(str(tiny_llama_dir), _length_rm(), plain, PROMPTS, 0, None)
    assert key == organism_key(str(tiny_llama_dir), _length_rm(), OrganismConfig(steps=2, precision="float32"),
                               PROMPTS, 0, None)
    assert key != organism_key(str(tiny_llama_dir), _length_rm(), OrganismConfig(steps=2, precision="bfloat16"),
                               PROMPTS, 0, None)
    with pytest.raises(ValueError, match="precision must be float32, bfloat16 or auto"):
        OrganismConfig(precision="fp16")


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
    from tests.unit.test_pairs import _perturbed_copy

    tuned = _perturbed_copy(tiny_llama_dir, tmp_path / "tuned", layer=1, scale=0.5)
    pair = load_pair(str(tiny_llama_dir), str(tuned))
    rm = TextRM(lambda texts: [float(len(t.split())) for t in texts], name="words")  # dense: samples differ
    rep = organism_report(pair, rm, PROMPTS[:5], samples_per_prompt=2, max_new_tokens=8)
    assert rep["n_prompts"] == 5 and rep["samples_per_prompt"] == 2
    # Recompute from the same samples (seed 0: base samples with seed 0, tuned with seed 1) with plain
    # HF forwards: KL(tuned || base) ~ mean over tuned continuations of sum log p_tuned - log p_base.
    fresh = load_pair(str(tiny_llama_dir), str(tuned))
    texts, per_seq = {}, []
    for name, model, seed in (("base", fresh.base, 0), ("tuned", fresh.tuned, 1)):
        ids, lens, idx, texts[name] = sample_continuations(model, fresh.tokenizer, PROMPTS[:5], n_per_prompt=2,
                                                           max_new_tokens=8, batch_size=64, seed=seed)
        assert idx == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for seq, n in zip(ids, lens):  # the tuned model's samples
        x = torch.tensor([seq])
        with torch.no_grad():
            lt, lb = (torch.log_softmax(m(x).logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None])[:, 0]
                      for m in (fresh.tuned, fresh.base))
        per_seq.append(float((lt - lb)[n - 1:].sum()))
    assert rep["kl"]["n_sequences"] == 10
    assert rep["kl"]["mean"] == pytest.approx(np.mean(per_seq), abs=1e-3)
    assert rep["kl"]["se"] == pytest.approx(np.std(per_seq, ddof=1) / np.sqrt(10), abs=1e-3)
    assert np.abs(per_seq).max() > 0.2  # the perturbation moved the tuned model: a real check
    # Reward per prompt (mean of its 2 samples), then mean and paired difference over the 5 prompts.
    base_r = rm.score(texts["base"]).reshape(5, 2).mean(1)
    tuned_r = rm.score(texts["tuned"]).reshape(5, 2).mean(1)
    assert rep["reward"]["base_mean"] == pytest.approx(base_r.mean())
    assert rep["reward"]["tuned_mean"] == pytest.approx(tuned_r.mean())
    assert rep["reward"]["diff_se"] == pytest.approx(np.std(tuned_r - base_r, ddof=1) / np.sqrt(5))
    assert set(rep["vader_compound"]) >= {"base_mean", "tuned_mean", "diff_z"}
    assert [(e["base"], e["tuned"]) for e in rep["examples"]] == [(texts["base"][2 * p], texts["tuned"][2 * p])
                                                                  for p in range(3)]
    lines = report_lines(rep, "words")
    kl = rep["kl"]
    assert f"KL(tuned || base)   {np.mean(per_seq):.3f} ± {kl['se']:.3f} nats per continuation" in lines
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
