"""Released SAEs as the IRM's basis: SAELens-format SAEs named per block, checked against the pair."""

import json

import pytest
import torch

from irmprobe.api import run
from tests.integration.test_pipeline import _config


def _save_released(directory, *, d_in=32, hook="blocks.0.hook_mlp_out", model="llama", norm="none", seed=0):
    """A StandardSAE in SAELens's on-disk format, as a release is shipped."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=4 * d_in, normalize_activations=norm)
    cfg.metadata.hook_name, cfg.metadata.model_name = hook, model
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_dec), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    sae.save_model(str(directory))
    return str(directory)


def _config_with(tmp_path, model_dir, pretrained, **sae):
    cfg = _config(tmp_path, base=str(model_dir)).to_dict()
    cfg["sae"] |= {"pretrained": pretrained, **sae}
    cfg["compare"]["control"] = False  # the controls would read the same releases: one branch keeps the test short
    cfg["attribute"] |= {"n_prompts": 4, "ig_steps": 2, "n_exact": 2, "k_grid": [1, 5], "n_random": 1}
    from irmprobe.config import RunConfig

    return RunConfig.from_dict(cfg)


def test_released_saes_are_the_basis_end_to_end(tiny_llama_dir, tmp_path):
    name = tiny_llama_dir.name  # the model the releases name: the pair's directory
    released = {b: _save_released(tmp_path / f"sae{b}", hook=f"blocks.{b}.hook_mlp_out", model=name, seed=b)
                for b in (0, 1)}
    config = _config_with(tmp_path, tiny_llama_dir, {1: released[1]}, **{"expansion": 2})
    result = run(config, echo=lambda _: None)
    m = result.metrics.to_json()
    assert m["layers"]["chosen"] == [1]  # chosen among the blocks with a released SAE only
    rows = [r for r in m["saes"] if r["model"] == "tuned"]
    assert rows and all(r["pretrained"] == released[1] and r["d_sae"] == 128 and r["trained_samples"] == 0
                        for r in rows)
    saes = result.context.resources["runner"].result("saes").saes
    loaded = saes["tuned", 1]
    from sae_lens import SAE

    original = SAE.load_from_disk(released[1])
    assert torch.equal(loaded.W_dec, original.W_dec)  # the release itself, not a retrained SAE
    fit = result.context.resources["runner"].result("fit")
    assert fit.coef.shape[-1] == 128  # the IRM's inputs are the release's 128 features
    assert m["verdict"]
    # A second run reuses every stage; replacing the release's weights reruns the SAE stage.
    again = run(config, echo=lambda _: None)
    assert again.stage_status["saes"] == "reused"
    _save_released(tmp_path / "sae1", hook="blocks.1.hook_mlp_out", model=name, seed=7)
    assert run(config, echo=lambda _: None, until="saes").stage_status["saes"] == "ran"


@pytest.mark.parametrize("kwargs, block, message", [
    ({"hook": "blocks.0.hook_resid_post"}, 0, "was trained on 'blocks.0.hook_resid_post', not 'blocks.0.hook_mlp_out'"),
    ({"d_in": 16}, 0, "reads 16-dimensional inputs but the pair's d_model is 32"),
    ({"model": "gemma-2-2b"}, 0, "was trained on model 'gemma-2-2b'"),
    ({"norm": "expected_average_only_in"}, 0, "expects its inputs normalised"),
    ({}, 5, "names block 5, but .* has 2 blocks"),
])
def test_a_release_that_does_not_fit_the_pair_is_refused_before_any_stage(tiny_llama_dir, tmp_path, kwargs, block,
                                                                           message):
    kwargs = {"model": tiny_llama_dir.name, "hook": f"blocks.{block}.hook_mlp_out"} | kwargs
    path = _save_released(tmp_path / "sae", **kwargs)
    with pytest.raises(ValueError, match=message):
        run(_config_with(tmp_path, tiny_llama_dir, {block: path}), echo=lambda _: None)
    assert not (tmp_path / "cache" / "stages").exists()


def test_release_settings_are_checked(tiny_llama_dir, tmp_path):
    from irmprobe.config import SAEConfig

    with pytest.raises(ValueError, match="not a block index"):
        SAEConfig(pretrained={"x": "dir"})
    with pytest.raises(ValueError, match=r"must be a directory or \{release"):
        SAEConfig(pretrained={0: {"release": "r"}})
    with pytest.raises(ValueError, match="holds no cfg.json"):
        run(_config_with(tmp_path, tiny_llama_dir, {0: str(tmp_path)}), echo=lambda _: None)
    # The model check can be waived for a model saved under another name.
    path = _save_released(tmp_path / "other", model="renamed-copy")
    cfg = _config_with(tmp_path, tiny_llama_dir, {0: path}, pretrained_model_check=False)
    assert run(cfg, echo=lambda _: None, until="saes").stage_status["saes"] == "ran"
    assert json.loads(json.dumps(cfg.to_dict()))["sae"]["pretrained"] == {"0": path} or cfg.sae.pretrained == {0: path}
