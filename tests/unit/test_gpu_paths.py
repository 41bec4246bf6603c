"""The paths meant for GPUs, checked on CPU: ridge in torch, models split by device_map (part offloaded to
disk), data-parallel capture over two gloo processes, the offline wheelhouse, and the GPU benchmark."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import Ridge
from sklearn.utils.estimator_checks import parametrize_with_checks

from irmprobe.activations.capture import capture_pair
from irmprobe.activations.store import capture_to_store, load_store
from irmprobe.config import RunConfig
from irmprobe.irm.torch_ridge import TorchRidge
from irmprobe.models.divergence import layer_divergence
from irmprobe.models.loading import load_model, load_pair

ROOT = Path(__file__).resolve().parents[2]


# -- TorchRidge ---------------------------------------------------------------------------------------

def _relative(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_ridge_matches_sklearn_ridge_on_dense_data(solver, weighted):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 60)) * rng.uniform(0.1, 3.0, 60) + 2.0  # uncentred columns of unequal scale
    y = X @ rng.normal(size=60) + rng.normal(size=400) + 4.0
    sw = rng.uniform(0.2, 3.0, 400) if weighted else None
    for alpha in (0.1, 10.0, 1000.0):
        ours = TorchRidge(alpha=alpha, solver=solver).fit(X, y, sample_weight=sw)
        ref = Ridge(alpha=alpha, fit_intercept=True).fit(X, y, sample_weight=sw)
        assert _relative(ours.coef_, ref.coef_) < 1e-4
        assert _relative([ours.intercept_], [ref.intercept_]) < 1e-4
        assert _relative(ours.predict(X), ref.predict(X)) < 1e-4


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_torch_ridge_matches_sklearn_ridge_on_sparse_data(solver):
    rng = np.random.default_rng(1)
    X = sp.random(600, 300, density=0.03, format="csr", random_state=1, data_rvs=lambda n: rng.uniform(0, 4, n))
    y = np.asarray(X @ rng.normal(size=300)).ravel() + rng.normal(size=600) + 1.0
    ours = TorchRidge(alpha=1.0, solver=solver).fit(X, y)
    # scikit-learn's sparse solver on the same CSR matrix, run to convergence; and its exact dense solve.
    ref = Ridge(alpha=1.0, solver="sparse_cg", tol=1e-12, max_iter=20_000).fit(X, y)
    dense = Ridge(alpha=1.0).fit(X.toarray(), y)
    for other in (ref, dense):
        assert _relative(ours.coef_, other.coef_) < 1e-4
        assert _relative([ours.intercept_], [other.intercept_]) < 1e-4
    assert _relative(ours.predict(X), ref.predict(X)) < 1e-4


def test_torch_ridge_picks_conjugate_gradient_for_wide_data_and_fits_several_targets():
    rng = np.random.default_rng(2)
    X = sp.random(80, 500, density=0.05, format="csr", random_state=2)  # more features than rows
    Y = rng.normal(size=(80, 3))
    ours = TorchRidge(alpha=0.5, max_gram_features=100).fit(X, Y)
    ref = Ridge(alpha=0.5).fit(X.toarray(), Y)
    assert ours.solver_ == "cg" and ours.coef_.shape == (3, 500) and ours.intercept_.shape == (3,)
    assert _relative(ours.coef_, ref.coef_) < 1e-4 and _relative(ours.intercept_, ref.intercept_) < 1e-4


def test_linear_irm_on_a_cuda_device_solves_its_ridge_fits_with_torch_ridge(monkeypatch):
    """The IRM's ridge fits go to TorchRidge on a GPU device (here redirected to the CPU, which this machine has)."""
    import irmprobe.irm.torch_ridge as gpu
    from irmprobe.irm.estimators import LinearIRM

    used = []

    class OnCPU(TorchRidge):
        def fit(self, X, y, sample_weight=None):
            used.append(self.device)
            self.device = "cpu"
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(gpu, "TorchRidge", OnCPU)
    rng = np.random.default_rng(3)
    X = sp.random(900, 120, density=0.05, format="csr", random_state=3, data_rvs=lambda n: rng.uniform(0, 2, n))
    y = np.asarray(X @ rng.normal(size=120)).ravel() + 0.3 * rng.normal(size=900)
    groups = np.repeat(np.arange(90), 10)
    ours = LinearIRM("ridge", alphas=(0.1, 1.0, 10.0), device="cuda:0").fit(X, y, groups=groups)
    assert used and set(used) == {"cuda:0"}  # every CV fit and the final fit
    cpu = LinearIRM("ridge", alphas=(0.1, 1.0, 10.0)).fit(X, y, groups=groups)
    assert ours.alpha_ == cpu.alpha_
    exact = Ridge(alpha=ours.alpha_).fit(X.toarray(), y)
    assert _relative(ours.coef_, exact.coef_) < 1e-4 and _relative([ours.intercept_], [exact.intercept_]) < 1e-4
    used.clear()
    LinearIRM("lasso", device="cuda:0").fit(X, y, groups=groups)
    assert not used  # L1 penalties stay on scikit-learn
    for device in ("cpu", "mps", None):  # MPS has no float64: scikit-learn there too
        LinearIRM("ridge", alphas=(1.0,), device=device).fit(X, y, groups=groups)
    assert not used


@parametrize_with_checks([TorchRidge(), TorchRidge(solver="cg")])
def test_torch_ridge_is_a_scikit_learn_estimator(estimator, check):
    check(estimator)


# -- device_map: a model split between the CPU and disk ---------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny 4-block Llama: with 2 blocks accelerate's "auto" map keeps all blocks together (it reserves room
    for the largest one), so it takes 4 for a budget that splits them between the CPU and disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)), hidden_size=32,
                      intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("llama4")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tuned_llama_dir(llama_dir, tmp_path_factory):
    """The 4-block Llama with blocks 1 and 3 (and block 0's MLP) moved: a pair whose blocks differ."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.1." in name or "layers.3." in name or "layers.0.mlp" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("tuned-llama4")
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(llama_dir).glob("tokenizer*"):
        shutil.copy(f, out)
    return out


def _placement(model, module: str) -> str | None:
    """Where accelerate's map put ``module``: the entry for it or for the nearest module that holds it."""
    placed = getattr(model, "hf_device_map", None) or {}
    holders = [k for k in placed if k == "" or module == k or module.startswith(k + ".")]
    return str(placed[max(holders, key=len)]) if holders else None


def _split_budget(model_dir) -> int:
    """A CPU budget (bytes) under which accelerate's "auto" map keeps block 0 on the CPU and the last block on disk."""
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    for fraction in np.linspace(0.5, 0.98, 25):
        model, _ = load_model(str(model_dir), device_map="auto", max_memory={"cpu": int(size * fraction)})
        if _placement(model, "model.layers.0") == "cpu" and _placement(model, "model.layers.3") == "disk":
            return int(size * fraction)
    raise AssertionError("no CPU budget splits the tiny model between the CPU and disk")


def _sequences(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 900, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]


def _assert_same_capture(ours, ref, atol=1e-5):
    for key, value in ref.arrays().items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(ours.arrays()[key], value, err_msg=key)
        elif key.startswith("vocab_logp_sum."):  # sums over every row of log-probabilities
            np.testing.assert_allclose(ours.arrays()[key], value, rtol=1e-6, atol=atol, err_msg=key)
        else:
            np.testing.assert_allclose(ours.arrays()[key], value, rtol=0, atol=atol, err_msg=key)


def test_device_map_with_blocks_on_disk_captures_like_a_plain_load(llama_dir, tuned_llama_dir):
    budget = _split_budget(llama_dir)
    plain = load_pair(str(llama_dir), str(tuned_llama_dir))
    split = load_pair(str(llama_dir), str(tuned_llama_dir), device_map="auto", max_memory={"cpu": budget})
    for model in (split.base, split.tuned):
        assert _placement(model, "model.layers.0") == "cpu" and _placement(model, "model.layers.3") == "disk"
        assert next(model.model.layers[3].parameters()).device.type == "meta"  # loaded only inside its forward
    # Layer choice reads the offloaded weights module by module.
    assert layer_divergence(split, 2) == layer_divergence(plain, 2)
    assert layer_divergence(split, 2).chosen == (1, 3)
    seqs = _sequences(10)
    for hook in ("hook_mlp_out", "hook_resid_post", "hook_attn_out"):
        # The plain pair goes through TransformerLens bridges; the split one through forward hooks on
        # the HF modules, which see every block, on the CPU or on disk.
        _assert_same_capture(capture_pair(split, seqs, (0, 1, 2, 3), hook=hook, batch_size=4),
                             capture_pair(plain, seqs, (0, 1, 2, 3), hook=hook, batch_size=4))
    with pytest.raises(ValueError, match="offloaded to disk"):
        split.bridge("tuned")


def test_device_map_with_blocks_on_disk_samples_patches_and_ablates_like_a_plain_load(llama_dir, tuned_llama_dir):
    """Sampling, layer choice by patching and patched generation (the ablation's sampler) on a pair split between
    the CPU and disk give what they give on a plain load."""
    from irmprobe.activations.patching import generate_patched, layer_choice, plain_models
    from irmprobe.activations.samples import sample_continuations

    budget = _split_budget(llama_dir)
    plain = load_pair(str(llama_dir), str(tuned_llama_dir))
    split = load_pair(str(llama_dir), str(tuned_llama_dir), device_map="auto", max_memory={"cpu": budget})
    prompts = ["one two three", "four five", "six seven eight nine"]
    for model_split, model_plain in ((split.base, plain.base), (split.tuned, plain.tuned)):
        kw = dict(n_per_prompt=2, max_new_tokens=6, batch_size=4, seed=5)
        assert (sample_continuations(model_split, split.tokenizer, prompts, **kw)
                == sample_continuations(model_plain, plain.tokenizer, prompts, **kw))
    seqs = _sequences(8, seed=2)
    ours, ref = (layer_choice(*plain_models(p), seqs, 2, "mlp_out", [0, 1, 2, 3], batch_size=4) for p in (split, plain))
    assert ours["chosen"] == ref["chosen"] and ours["ranking"] == ref["ranking"]
    np.testing.assert_allclose(ours["shares"]["mlp_out"]["kl"], ref["shares"]["mlp_out"]["kl"], atol=1e-5)
    for blocks in ((), (1, 3)):
        kw = dict(n_per_prompt=2, max_new_tokens=5, seed=7, batch_size=3)
        a = generate_patched(split.base, split.tuned, split.tokenizer, prompts, blocks, **kw)
        b = generate_patched(plain.base, plain.tuned, plain.tokenizer, prompts, blocks, **kw)
        assert a.token_ids == b.token_ids
    # The depth stage's readout (hooks after every block, each model's own norm and head) reads the same rows.
    from irmprobe.activations.readout import readout_rows

    lens = np.full(len(seqs), 2)
    ours, ref = (readout_rows(*plain_models(p), seqs, lens, batch_size=3) for p in (split, plain))
    for key in ("r", "direct", "lens"):
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-5, err_msg=key)


def test_fresh_copies_for_hooks_keep_the_pairs_device_map(tiny_llama_dir, monkeypatch):
    """Once a bridge has wrapped a model, patching and ablation load fresh copies: placed by the same map."""
    import irmprobe.models.loading as pairs
    from irmprobe.activations.patching import plain_models

    mapping = {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.layers": "cpu", "model.norm": "cpu",
               "model.rotary_emb": "cpu"}
    pair = load_pair(str(tiny_llama_dir), None, device_map=mapping)
    pair.bridge("base")
    asked = []
    real = pairs.load_model
    monkeypatch.setattr(pairs, "load_model", lambda *a, **k: asked.append(k) or real(*a, **k))
    base, tuned = plain_models(pair, device_map=mapping, max_memory=None)
    assert base is tuned and base is not pair.base
    assert [(k["device_map"], k["max_memory"]) for k in asked] == [(mapping, None)]


def test_device_map_as_json_text_places_modules_where_it_says(tiny_llama_dir):
    mapping = {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
               "model.norm": "cpu", "model.rotary_emb": "cpu"}
    config = RunConfig.from_dict({"pair": {"base": str(tiny_llama_dir), "device_map": json.dumps(mapping)}})
    pair = load_pair(config.pair.base, None, device_map=config.pair.device_map, max_memory=config.pair.max_memory)
    assert _placement(pair.base, "model.layers.0") == "disk" and _placement(pair.base, "model.layers.1") == "cpu"
    seqs = _sequences(6, seed=1)
    _assert_same_capture(capture_pair(pair, seqs, (0, 1), batch_size=3),
                         capture_pair(load_pair(str(tiny_llama_dir), None), seqs, (0, 1), batch_size=3))


def test_device_map_settings_are_checked():
    with pytest.raises(ValueError, match="device_map must be"):
        RunConfig.from_dict({"pair": {"device_map": "everywhere"}})
    with pytest.raises(ValueError, match="only applies with a device_map"):
        RunConfig.from_dict({"pair": {"max_memory": {"cpu": "1GiB"}}})
    with pytest.raises(ValueError, match="must be a mapping"):
        RunConfig.from_dict({"pair": {"device_map": "auto", "max_memory": "1GiB"}})
    pc = RunConfig.from_dict({"pair": {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "60GiB"}}}).pair
    assert pc.max_memory == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(ValueError, match="device_map must be one of"):
        load_model("unused", device_map="{not json")


# -- data-parallel capture ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _capture_rank(rank, world, port, base, tuned, stream, layers, directory):
    import torch.distributed as dist

    from irmprobe.parallel import capture_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        capture_distributed(load_pair(base, tuned), stream, layers, directory, batch_size=4, shard_sequences=5)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_capture_one_store_equal_to_a_single_process(llama_dir, tuned_llama_dir, tmp_path):
    stream, layers = _sequences(23, seed=2), (1, 3)  # 5 shards of 5 sequences: rank 0 takes 3, rank 1 takes 2
    single = capture_to_store(load_pair(str(llama_dir), str(tuned_llama_dir)), stream, layers,
                              tmp_path / "single", batch_size=4, shard_sequences=5)
    multi = tmp_path / "multi"
    torch.multiprocessing.spawn(_capture_rank, nprocs=2, join=True,
                                args=(2, _free_port(), str(llama_dir), str(tuned_llama_dir), stream, layers,
                                      str(multi)))
    _assert_same_capture(load_store(multi), load_store(single), atol=1e-6)
    merged, alone = (json.loads((d / "manifest.json").read_text()) for d in (multi, single))
    assert merged["complete"] and merged["rows"] == alone["rows"] and merged["shards"].keys() == alone["shards"].keys()
    assert not list(multi.glob("manifest.rank-*.json"))


def test_merge_captures_the_shards_a_failed_rank_left(tiny_llama_dir, tmp_path):
    pair, stream = load_pair(str(tiny_llama_dir), None), _sequences(12, seed=3)
    store, alone = tmp_path / "store", tmp_path / "alone"
    capture_to_store(pair, stream, (1,), store, batch_size=4, shard_sequences=4, rank=1, world_size=3)
    assert [p.name for p in store.glob("manifest*.json")] == ["manifest.rank-00001.json"]
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-00001.safetensors"]
    capture_to_store(pair, stream, (1,), store, batch_size=4, shard_sequences=4)  # the merge: ranks 0, 2 failed
    capture_to_store(pair, stream, (1,), alone, batch_size=4, shard_sequences=4)
    _assert_same_capture(load_store(store), load_store(alone), atol=1e-6)
    assert [p.name for p in store.glob("manifest*.json")] == ["manifest.json"]


def test_parallel_entry_point_captures_the_pipelines_store(tiny_llama_dir, tmp_path):
    """``python -m irmprobe.parallel CONFIG`` on two ranks; a following run reuses its capture."""
    from irmprobe.api import run

    config = {"pair": {"base": str(tiny_llama_dir), "null": True}, "prompts": {"n_heldout": 6},
              "samples": {"samples_per_prompt": 2, "max_new_tokens": 8}, "capture": {"top_k_layers": 1},
              "report": {"out_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "irmprobe.parallel", str(path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "capture complete" in out.stdout
    lines = []
    run(RunConfig.from_yaml(path), until="capture", echo=lines.append)
    assert any(line.startswith("[capture] reused the cached output") for line in lines), lines


# -- offline install ------------------------------------------------------------------------------------

def test_makefile_wheelhouse_leaves_torch_to_the_host():
    text = (ROOT / "Makefile").read_text()
    assert "\nwheelhouse:" in text and "\ninstall-offline:" in text
    dry = subprocess.run(["make", "-n", "wheelhouse", "HOST_PYTHON=3.12", "HOST_TORCH=2.11.0"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "scripts/wheelhouse.py wheelhouse --python-version 3.12" in dry and "--torch 2.11.0" in dry
    install = subprocess.run(["make", "-n", "install-offline"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert "--no-index --find-links wheelhouse -c" in install and "torch.__version__" in install
    script = (ROOT / "scripts" / "wheelhouse.py").read_text()
    assert '"download", "--no-deps"' in script and '"wheel", "--no-deps"' in script


def _wheelhouse():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import wheelhouse
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return wheelhouse


def test_wheelhouse_keeps_what_irmprobe_needs_without_going_through_torch():
    def item(name, *requires):
        return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}}

    report = {"install": [item("irmprobe", "torch>=2.6", "transformers>=5", "sae-lens"),
                          item("torch", "sympy", "nvidia-cudnn-cu12; platform_system == 'Linux'", "filelock"),
                          item("transformers", "numpy", "filelock", "pytest; extra == 'testing'"),
                          item("sae_lens", "torch", "numpy"), item("numpy"), item("filelock"), item("sympy"),
                          item("nvidia-cudnn-cu12"), item("pytest")]}
    kept = _wheelhouse().without_host_packages(report)
    assert kept == {"filelock": "1.0", "numpy": "1.0", "sae_lens": "1.0", "transformers": "1.0"}


def test_stub_torch_and_irmprobes_own_wheel_build_offline(tmp_path):
    stub = _wheelhouse().stub_torch_wheel(tmp_path, "2.11.0")
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--no-index",
                    "--find-links", str(tmp_path), "--report", str(report), "torch==2.11.0+host"], check=True)
    (entry,) = json.loads(report.read_text())["install"]
    assert entry["metadata"]["version"] == "2.11.0+host" and not entry["metadata"].get("requires_dist")
    assert stub.name == "torch-2.11.0+host-py3-none-any.whl"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (own,) = tmp_path.glob("irmprobe-*.whl")
    names = zipfile.ZipFile(own).namelist()
    assert {"irmprobe/irm/torch_ridge.py", "irmprobe/pipeline/stages/fit.py", "irmprobe/parallel.py", "irmprobe/data/pairs.yaml"} <= set(names)


# -- the GPU benchmark, as a CPU smoke run -----------------------------------------------------------------

def test_gpu_benchmark_runs_every_stage_on_cpu_with_tiny_shapes(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_pipeline.py"), "--device", "cpu", "--tiny",
                          "--work", str(tmp_path / "work"), "--json", str(tmp_path / "bench.json")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    (report,) = json.loads((tmp_path / "bench.json").read_text())["shapes"]
    stages = {r["stage"]: r for r in report["stages"]}
    assert {"organism", "samples", "capture", "saes", "fit", "ablate", "report"} <= set(stages)
    assert stages["capture"]["tokens_per_s"] > 0 and stages["samples"]["tokens_per_s"] > 0
    assert "| capture |" in out.stdout
