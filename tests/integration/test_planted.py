"""Planted organisms through the whole pipeline: the tuned model is the base plus a known edit of
one MLP that raises (or lowers) the logits of a chosen token set. The behavioural IRM must find the
planted tokens, the verdict must follow the planted sign, and the null pair must give zero."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from irmprobe.api import run
from irmprobe.config import RunConfig
from tests.conftest import LEXICON_WORDS

POSITIVE = LEXICON_WORDS[:13]
NEGATIVE = LEXICON_WORDS[13:]
NEUTRAL = ("the", "and", "was", "of", "to", "in", "it", "with", "for", "on", "that", "her", "his")

SMALL = {
    "prompts": {"n_heldout": 24},
    "organism": {"steps": 2, "prompts_per_step": 2, "generations_per_prompt": 2, "max_new_tokens": 8,
                 "learning_rate": 1e-3},
    "samples": {"samples_per_prompt": 8, "max_new_tokens": 20, "batch_size": 96},
    # The residual stream carries each token's identity, which the planted edit rewards.
    "capture": {"top_k_layers": 2, "batch_size": 32, "hook": "hook_resid_post"},
    "sae": {"expansion": 2, "training_samples": 16384, "batch_size": 256, "match_expansion": None,
            "splice_sequences": 0},
    "irm": {"min_token_count": 1, "n_shuffles": 2, "estimators": ["ridge"]},
    # The controls' measured views are what the call and discovery read; their SAEs and fits would cost 3 s each.
    "compare": {"n_bootstrap": 200, "rm_informed": False, "control_views": "measured"},
    "validate": {"enabled": False},
    "attribute": {"enabled": False},  # tested on planted models in tests/unit/test_attribution.py and test_pipeline.py
}


def _ids(tokenizer, words) -> list[int]:
    ids = []
    for w in words:
        enc = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(enc[0])
    return ids


def _word_tokens(tok) -> list[str]:
    """Whole words the tiny tokenizer holds as one space-led token, in a fixed order."""
    words = sorted({tok.decode([i]).strip() for i in range(len(tok)) if tok.decode([i]).startswith(" ")
                    and tok.decode([i])[1:].isalpha() and len(tok.decode([i])) >= 4})
    return [w for w in words if len(tok.encode(" " + w, add_special_tokens=False)) == 1]


@pytest.fixture(scope="module")
def planted(tiny_tokenizer_dir, tmp_path_factory):
    """A base model and tuned copies that add a known logit bias to a chosen token set.

    The unembedding rows of the planted tokens get a component along a direction ``u`` the base
    model's residual stream barely has; the tuned model's last MLP writes ``c * u`` at every
    position, so exactly those tokens' logits rise (``+u`` rows) or fall (``-u`` rows).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("planted")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    words = [w for w in _word_tokens(tok) if w not in LEXICON_WORDS and w not in NEUTRAL]
    rng = np.random.default_rng(0)
    extra = list(rng.permutation(words)[:60])
    positive, negative = list(POSITIVE) + extra[:20], list(NEGATIVE) + extra[20:40]
    neutral = list(NEUTRAL) + extra[40:60]
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, mlp_bias=True)
    base = LlamaForCausalLM(cfg)
    pos, neg, neu = _ids(tok, positive), _ids(tok, negative), _ids(tok, neutral)
    u, u2 = torch.nn.functional.normalize(torch.randn(2, cfg.hidden_size), dim=-1)
    # The unrelated organism's direction must be orthogonal to the RM's: a merely random u2 has a component along u
    # that ranks the RM's tokens like the RM (its full-vocabulary tau was +0.71), so it was not unrelated at all.
    u2 = torch.nn.functional.normalize(u2 - (u2 @ u) * u, dim=-1)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.down_proj.bias.zero_()
        W = base.lm_head.weight
        W[pos] += 0.5 * u
        W[neg] -= 0.5 * u
        W[neu] += 0.5 * u2
    dirs = {"base": root / "base"}
    base.save_pretrained(dirs["base"])
    tok.save_pretrained(dirs["base"])
    # Five sibling "fine-tunes" made the same way along random directions: controls that differ from the planted
    # organisms in what they reward only (named in compare.controls, vouched for by compare.assume_matched). Their
    # rewards are unrelated to the RM's, so their directions are orthogonal to u, which every RM-valued token's
    # unembedding carries: a merely random direction has a component along u of about 1/8 and ranks the RM's
    # tokens with a tau of +-0.7 (measured), a sibling that learned the RM in part, not a control.
    raw = torch.randn(5, cfg.hidden_size)
    controls = torch.nn.functional.normalize(raw - (raw @ u)[:, None] * u[None, :], dim=-1)
    planted_dirs = {"positive": u, "negated": -u, "unrelated": u2} | {f"control-{i}": c for i, c in enumerate(controls)}
    for name, d in planted_dirs.items():
        tuned = LlamaForCausalLM(cfg)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            tuned.model.layers[1].mlp.down_proj.bias.copy_(0.5 * d)
        dirs[name] = root / name
        tuned.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    lexicon = root / "lexicon.tsv"
    lexicon.write_text("".join(f"{w}\t2.0\n" for w in positive) + "".join(f"{w}\t-2.0\n" for w in negative))
    return dirs, lexicon, {"positive": pos, "negated": neg, "unrelated": neu}


def named_controls(dirs) -> dict:
    """The compare section that judges a planted organism against its five sibling controls."""
    return {"n_controls": 0, "controls": [str(dirs[f"control-{i}"]) for i in range(5)], "assume_matched": True}


def _run(tmp_path, dirs, lexicon, name):
    data = json.loads(json.dumps(SMALL))
    data["compare"] |= named_controls(dirs)
    data["pair"] = {"base": str(dirs["base"])} | ({"null": True} if name == "null" else {"tuned": str(dirs[name])})
    data["reward"] = {"kind": "lexicon", "path": str(lexicon)}
    data["report"] = {"out_dir": str(tmp_path / name), "wandb_mode": "disabled"}
    return run(RunConfig.from_dict(data), echo=lambda _: None)


def test_planted_organisms_get_three_different_verdicts_and_the_null_pair_zero(planted, tmp_path):
    dirs, lexicon, raised = planted
    outcomes = {}
    for name, expected in (("positive", "agrees"), ("negated", "opposes"), ("unrelated", "unrelated")):
        result = _run(tmp_path, dirs, lexicon, name)
        m = result.metrics
        # The behavioural IRM ranks the planted tokens first among the held-out tokens (AUROC).
        lr = result.results["fit"].token_map("log_ratio (no model)")
        tokens = sorted(lr)
        labels = np.array([t in set(raised[name]) for t in tokens])
        assert labels.sum() >= 3, name
        auroc = roc_auc_score(labels, [lr[t] for t in tokens])
        # 1.000 for all three when the chain is right; a log-ratio shifted by one row gave 0.894.
        assert auroc >= 0.98, (name, auroc)
        outcomes[name] = (m.primary.outcome, m.primary.z, m.view("log_ratio (no model)").tau, m.primary.tau,
                          m.primary.control_taus)
        assert m.primary.outcome == expected, (name, outcomes[name], m.verdict)
        assert m.control[0].matched and "named in compare.controls" in m.control[0].note
        assert m.primary.view == "full_vocab_log_ratio" and m.primary.df == 4
    assert outcomes["positive"][2] > 0.5 and outcomes["negated"][2] < -0.5
    verdicts = {name: " ".join(_run(tmp_path / "again", dirs, lexicon, name).metrics.verdict) for name in outcomes}
    assert "learned the RM" in verdicts["positive"] and "AGAINST" in verdicts["negated"]
    assert "UNRELATED" in verdicts["unrelated"]
    null = _run(tmp_path, dirs, lexicon, "null").metrics
    assert all(r.is_zero for r in null.agreement if r.family == "behavioural")
    assert null.verdict[0].startswith("null organism")


def test_a_planted_organism_judged_by_a_classifier_rm(planted, tiny_tokenizer_dir, tmp_path):
    """A neural RM trained on the planted words: its token values rank them first, and discovery puts the
    organism's RM-valued planted tokens and its RM-unvalued planted tokens in their own categories."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irmprobe.models.rewards import ClassifierRM
    from tests.conftest import train_classifier_rm

    dirs, lexicon, raised = planted
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    weights = {line.split("\t")[0]: float(line.split("\t")[1]) / 2 for line in lexicon.read_text().splitlines()}
    rm_dir = train_classifier_rm(tiny_tokenizer_dir, weights, tmp_path / "rm")
    rm = ClassifierRM(str(rm_dir), label=0)
    table = rm.token_table(tok)
    labels = np.array([w in weights for w in table.words])  # the planted words rank first by |value|
    assert labels.sum() >= 60
    assert roc_auc_score(labels, np.abs(table.value)) >= 0.95
    # An organism that learned the RM's words (along u) and, beside them, words the RM does not value (along u2).
    both = dirs["base"].parent / "both"
    model = AutoModelForCausalLM.from_pretrained(dirs["positive"])
    unrelated = AutoModelForCausalLM.from_pretrained(dirs["unrelated"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.bias.add_(unrelated.model.layers[1].mlp.down_proj.bias)
    model.save_pretrained(both)
    tok.save_pretrained(both)
    data = json.loads(json.dumps(SMALL))
    data["compare"] |= named_controls(dirs)
    data["pair"] = {"base": str(dirs["base"]), "tuned": str(both)}
    data["reward"] = {"kind": "classifier", "model": str(rm_dir), "label": "0"}
    # alpha 0.1: the 33 RM-unvalued planted tokens get p ~ 0.002 among ~900 unvalued tokens (BH q ~ 0.06, just
    # above the default 0.05); the question here is which category a discovery lands in.
    data["discover"] = {"n_entries": 500, "alpha": 0.1}
    data["report"] = {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}
    m = run(RunConfig.from_dict(data), echo=lambda _: None).metrics
    found = {e["token_id"]: category for category, entries in m.discovery["entries"].items() for e in entries}
    pos, neutral = set(raised["positive"]), set(raised["unrelated"])
    assert sum(found.get(t) == "rewarded_valued" for t in pos) >= 0.5 * len(pos), found
    assert sum(found.get(t) == "rewarded_unvalued" for t in neutral) >= 0.5 * len(neutral), found
    # The separation: no planted RM-unvalued token is called valued, no valued one unvalued.
    assert not any(found.get(t, "").endswith("_valued") for t in neutral)
    assert not any(found.get(t, "").endswith("_unvalued") for t in pos)
    assert m.primary.outcome == "agrees"
