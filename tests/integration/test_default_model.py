"""The real default path: the bundled SmolLM2 GGUF, dequantised, tuned with TRL, probed (tiny budgets)."""

import json

import pytest

from irmprobe.api import run
from irmprobe.config import RunConfig
from irmprobe.models.loading import DEFAULT_BASE, resolve_spec


@pytest.mark.slow
def test_default_model_runs_every_stage_with_tiny_budgets(tmp_path):
    config = RunConfig.from_dict({
        "pair": {"base": DEFAULT_BASE, "chat_template": False},  # as the demo (configs/default.yaml)
        "prompts": {"n_heldout": 4},
        "organism": {"steps": 1, "prompts_per_step": 2, "generations_per_prompt": 2, "max_new_tokens": 6},
        "samples": {"samples_per_prompt": 2, "max_new_tokens": 12, "batch_size": 16},
        "capture": {"top_k_layers": 1, "batch_size": 16, "patching_sequences": 4},  # layers by patching: 30 blocks
        "sae": {"expansion": 1, "training_samples": 1024, "batch_size": 128},
        "irm": {"min_token_count": 1, "n_shuffles": 1, "alphas": [10.0]},
        "compare": {"n_bootstrap": 20, "n_triples": 10, "n_controls": 2, "control_views": "measured"},  # as the demo
        "validate": {"top_k": 2, "n_judged": 6, "n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 4},
        "attribute": {"n_prompts": 4, "ig_steps": 2, "n_exact": 2, "k_grid": [1, 5], "n_random": 1},
        "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"},
    })
    result = run(config, echo=lambda _: None)
    m = json.loads(result.metrics_path.read_text())
    # The dequantised model is a normal safetensors directory in the cache.
    model_dir = resolve_spec(DEFAULT_BASE)
    assert (tmp_path / "cache" / "models" / DEFAULT_BASE).samefile(model_dir)
    assert json.loads((tmp_path / "cache" / "models" / DEFAULT_BASE / "config.json").read_text())["num_hidden_layers"] == 30
    assert m["organism"]["reused"] is False
    assert len(m["layers"]["per_block"]) == 30 and len(m["layers"]["chosen"]) == 1
    assert m["capture"]["sequences"] == 4 * 2 * 2
    assert any("reward" in row for row in m["organism"]["history"])  # TRL really trained and logged
    assert (tmp_path / "cache" / "organisms" / m["organism"]["tuned_id"].split(":")[1] / "model.safetensors").is_file()
    assert {r["model"] for r in m["saes"]} == {"base", "tuned"}
    assert m["saes"][0]["d_sae"] == 576
    assert m["control"][0]["steps"] == 1 and m["control"][0]["matched"]
    assert m["validation"]["ablation"][0]["set"] == "none"
