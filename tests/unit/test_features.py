"""SAEs via SAELens on planted data, and dictionary matching."""

import numpy as np
import pytest

from irmprobe.config import SAEConfig
from irmprobe.saes.evaluate import decoder_directions, encode, evaluate_sae, mmcs, unmatched_features
from irmprobe.saes.train import train_sae


def _planted(n=60_000, d=32, k=48, seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((k, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    active = rng.random((n, k)) < 3 / k  # about 3 active directions per sample
    codes = active * rng.uniform(1.0, 3.0, (n, k))
    return (codes @ dirs).astype(np.float32), dirs


def test_sae_trained_with_saelens_recovers_planted_directions():
    acts, dirs = _planted()
    sae = train_sae(acts, SAEConfig(expansion=4, l1_coefficient=2.0, training_samples=400_000, batch_size=512,
                                    lr=3e-3), seed=0, metadata={"hook_name": "planted"})
    found = decoder_directions(sae)
    assert mmcs(dirs, found) >= 0.9
    metrics = evaluate_sae(sae, acts[:5000])
    assert metrics.explained_variance > 0.8
    assert 1.0 < metrics.l0 < 20
    assert encode(sae, acts[:10]).shape == (10, 128)


def test_mmcs_of_identical_and_permuted_dictionaries_is_one():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((20, 8))
    assert mmcs(d, d) == pytest.approx(1.0)
    assert mmcs(d, d[rng.permutation(20)], one_to_one=True) == pytest.approx(1.0)
    # Random dictionaries in 64 dimensions match poorly.
    assert mmcs(rng.standard_normal((20, 64)), rng.standard_normal((40, 64))) < 0.6


def test_one_to_one_matching_is_stricter_than_per_feature_max():
    a = np.array([[1.0, 0.0], [0.99, 0.14]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert mmcs(a, b) == pytest.approx((1.0 + 0.99 / np.hypot(0.99, 0.14)) / 2)
    assert mmcs(a, b, one_to_one=True) < mmcs(a, b)
    with pytest.raises(ValueError, match="different spaces"):
        mmcs(a, np.ones((2, 3)))


def test_unmatched_features_are_the_new_ones():
    base = np.eye(4)
    tuned = np.vstack([np.eye(4)[:3], [[0.0, 0.0, 0.0, 0.0, ][:3] + [1.0]], [[0.5, 0.5, 0.5, 0.5]]])
    assert unmatched_features(tuned, base, threshold=0.7).tolist() == [4]


class _IdentitySAE:
    def encode(self, x):
        return x

    def decode(self, f):
        return f


class _ZeroSAE(_IdentitySAE):
    def decode(self, f):
        return f * 0


def test_splice_metrics_identity_recovers_everything_and_zero_nothing(tiny_llama_dir):
    from irmprobe.models.loading import load_pair
    from irmprobe.saes.splice import splice_metrics

    bridge = load_pair(str(tiny_llama_dir), None).bridge("base")
    seqs = [[5, 9, 17, 33, 2, 8], [7, 3, 11], [12, 13, 14, 15]]
    ident = splice_metrics(bridge, _IdentitySAE(), "blocks.1.hook_mlp_out", seqs, batch_size=2)
    assert ident["tokens"] == 5 + 2 + 3
    assert ident["ce_spliced"] == pytest.approx(ident["ce_clean"], abs=1e-5)
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert ident["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    zero = splice_metrics(bridge, _ZeroSAE(), "blocks.1.hook_mlp_out", seqs)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-5)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_other_architectures_train_save_and_load(architecture, tmp_path):
    from irmprobe.saes.load import load_sae, save_sae

    acts, _ = _planted(n=8000)
    cfg = SAEConfig(architecture=architecture, expansion=2, k=4, l1_coefficient=1.0, training_samples=16_000,
                    batch_size=256, lr=3e-3)
    sae = train_sae(acts, cfg, seed=0, metadata={"hook_name": "blocks.0.hook_mlp_out", "model_name": "planted"})
    metrics = evaluate_sae(sae, acts[:2000])
    save_sae(sae, tmp_path / "sae", metrics)
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_mlp_out"
    again = evaluate_sae(loaded, acts[:2000])
    if architecture != "batchtopk":  # BatchTopK is saved in its inference form, a JumpReLU
        assert again.explained_variance == pytest.approx(metrics.explained_variance, abs=1e-4)
    if architecture == "topk":
        assert again.l0 <= 4 + 1e-6
    assert again.explained_variance > 0.2


def test_bad_architecture_is_rejected():
    with pytest.raises(ValueError, match="standard, topk, batchtopk or jumprelu"):
        SAEConfig(architecture="gated")


def test_pretrained_sae_from_disk_is_checked_against_hook_and_width(tmp_path):
    from irmprobe.saes.load import load_pretrained_sae, save_sae

    acts, _ = _planted(n=4000)
    sae = train_sae(acts, SAEConfig(training_samples=2048, batch_size=256), seed=0,
                    metadata={"hook_name": "blocks.3.hook_mlp_out"})
    save_sae(sae, tmp_path / "sae", evaluate_sae(sae, acts[:500]))
    loaded = load_pretrained_sae(str(tmp_path / "sae"), hook_name="blocks.3.hook_mlp_out", d_model=32)
    assert loaded.cfg.d_sae == 64
    with pytest.raises(ValueError, match="trained on 'blocks.3.hook_mlp_out', not 'blocks.4.hook_mlp_out'"):
        load_pretrained_sae(str(tmp_path / "sae"), hook_name="blocks.4.hook_mlp_out", d_model=32)
    with pytest.raises(ValueError, match="d_model is 576"):
        load_pretrained_sae(str(tmp_path / "sae"), hook_name="blocks.3.hook_mlp_out", d_model=576)
    with pytest.raises(ValueError, match="could not load the SAE"):
        load_pretrained_sae(str(tmp_path / "missing"), hook_name="x", d_model=32)


def test_sweep_traces_sparsity_against_reconstruction():
    from irmprobe.saes.train import sweep

    acts, _ = _planted(n=6000)
    rows = sweep(acts, SAEConfig(architecture="topk", training_samples=12_000, batch_size=256, lr=3e-3),
                 values=[2, 8])
    assert [r["k"] for r in rows] == [2, 8]
    assert rows[0]["l0"] <= 2 + 1e-6 < rows[1]["l0"]
    assert rows[1]["explained_variance"] > rows[0]["explained_variance"]


def test_early_stopping_ends_training_when_held_out_explained_variance_plateaus():
    acts, _ = _planted(n=20_000, seed=1)
    budget = 400_000
    cfg = SAEConfig(expansion=4, l1_coefficient=2.0, training_samples=budget, batch_size=512, lr=3e-3,
                    early_stop_every=20, early_stop_tolerance=0.002, autocast="off")
    sae = train_sae(acts, cfg, seed=0, metadata={})
    meta = sae.cfg.metadata
    curve = meta["irmprobe_curve"]
    stopped = meta["irmprobe_stopped_at"]
    # Planted data is learnt long before 400k samples: it stops, at a point where the last four checks gained
    # less than the tolerance and every earlier window of four gained more.
    assert stopped is not None and stopped < budget / 2, (stopped, curve[-6:])
    evs = [c["explained_variance"] for c in curve]
    assert evs[-1] - evs[-5] < 0.002 and all(evs[i] - evs[i - 4] >= 0.002 for i in range(4, len(evs) - 1))
    assert curve[-1]["samples"] == stopped and evaluate_sae(sae, acts[:4000]).explained_variance > 0.8
    # The scale folded back into the weights: the stopped SAE works on raw activations like a full run's.
    from irmprobe.pipeline.stages.saes import training_point

    point = training_point(sae, cfg)
    assert point["stopped_early"] and point["trained_samples"] == stopped and point["ev_gain_last_checks"] < 0.002
    full = train_sae(acts, SAEConfig(expansion=4, l1_coefficient=2.0, training_samples=40_960, batch_size=512, lr=3e-3,
                                     early_stop_every=0, autocast="off"), seed=0, metadata={})
    assert full.cfg.metadata["irmprobe_stopped_at"] is None
    assert training_point(full, cfg)["stopped_early"] is False


def test_autocast_follows_the_setting_and_the_hardware(monkeypatch):
    import torch

    from irmprobe.saes import train as features

    assert features.uses_autocast(SAEConfig(autocast="on"), "cpu") is True
    assert features.uses_autocast(SAEConfig(autocast="off"), "cpu") is False
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda amx=amx: {"amx_bf16": amx})
        assert features.uses_autocast(SAEConfig(autocast="auto"), "cpu") is amx
    seen = []
    real = features.SAETrainerConfig
    monkeypatch.setattr(features, "SAETrainerConfig", lambda **k: seen.append(k["autocast"]) or real(**k))
    acts, _ = _planted(n=20_000, seed=2)
    evs = {}
    for mode in ("on", "off"):
        cfg = SAEConfig(expansion=4, l1_coefficient=2.0, training_samples=100_000, batch_size=512, lr=3e-3,
                        early_stop_every=0, autocast=mode)
        evs[mode] = evaluate_sae(train_sae(acts, cfg, seed=0, metadata={}), acts[:4000]).explained_variance
    # bfloat16 products with float32 weights: the same reconstruction as float32 training.
    assert seen == [True, False] and evs["on"] > 0.8 and abs(evs["on"] - evs["off"]) < 0.02, evs
    with pytest.raises(ValueError, match="autocast must be auto, on or off"):
        SAEConfig(autocast="yes")


def test_early_stopping_holds_out_whole_prompts():
    from irmprobe.saes.train import stopping_rows

    # 60 prompts of 40-80 rows each (a prompt's rows recur in each of its sequences).
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(60), rng.integers(40, 81, 60))
    n = len(groups)
    pick = stopping_rows(n, seed=0, groups=groups)
    held = set(groups[pick])
    # Every prompt lies wholly on one side: none has rows both held out and trained on.
    assert held and held.isdisjoint(groups[~pick])
    # About 5% of the rows: at least the share, and beyond it by less than one prompt.
    assert n // 20 <= pick.sum() < n // 20 + 80, (pick.sum(), n)
    assert np.array_equal(pick, stopping_rows(n, seed=0, groups=groups))
    assert not np.array_equal(pick, stopping_rows(n, seed=1, groups=groups))
    # Every prompt larger than the share: the smallest alone if it holds at most 4 times the share (5 rows
    # here), else none (two prompts of 5 rows: holding one out would take half the rows).
    three = np.repeat([7, 8, 9], [45, 15, 40])
    assert np.array_equal(stopping_rows(len(three), seed=0, groups=three), three == 8)
    assert not stopping_rows(10, seed=0, groups=np.repeat([7, 9], 5)).any()
    # One prompt holds most rows: it is never held out, whatever the seed; prompts larger than the share
    # are skipped, and when none fits, the smallest alone.
    lopsided = np.r_[np.zeros(950, dtype=int), np.repeat(np.arange(1, 6), 10)]
    for seed in range(8):
        held_rows = stopping_rows(len(lopsided), seed=seed, groups=lopsided)
        assert held_rows.sum() == 50 and not held_rows[:950].any()
    assert not stopping_rows(1200, seed=0, groups=np.repeat([0, 1, 2], [500, 300, 400])).any()
    with pytest.raises(ValueError, match="fewer than 2 prompts"):
        stopping_rows(10, seed=0, groups=np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="one label per row"):
        stopping_rows(10, seed=0, groups=np.arange(9))
    # Trained with groups, the SAE says what its stopping rule read.
    acts, _ = _planted(n=n, seed=4)
    cfg = SAEConfig(expansion=2, l1_coefficient=2.0, training_samples=4096, batch_size=512, early_stop_every=4,
                    autocast="off")
    meta = train_sae(acts, cfg, seed=0, metadata={}, groups=groups).cfg.metadata
    assert meta["irmprobe_stopping_rows"] == pick.sum() and meta["irmprobe_stopping_groups"] == len(held)
    assert train_sae(acts, cfg, seed=0, metadata={}).cfg.metadata["irmprobe_stopping_groups"] is None
    # Rows of one prompt: none can be held out, so early stopping is off and the metadata says nothing was read.
    one = train_sae(acts, cfg, seed=0, metadata={}, groups=np.zeros(n, dtype=int)).cfg.metadata
    assert one["irmprobe_stopping_rows"] == 0 and one["irmprobe_stopping_groups"] == 0
    assert one["irmprobe_stopped_at"] is None
    # Prompts too large to hold one out: early stopping off too.
    huge = train_sae(acts, cfg, seed=0, metadata={}, groups=np.arange(n) * 2 // n).cfg.metadata
    assert huge["irmprobe_stopping_rows"] == 0 and huge["irmprobe_stopped_at"] is None


def test_a_sweep_with_prompts_measures_on_held_out_prompts(monkeypatch):
    from irmprobe.saes import train as features

    acts, _ = _planted(n=3000, seed=5)
    groups = np.repeat(np.arange(30), 100)
    seen = {}
    real_train, real_eval = features.train_sae, features.evaluate_sae
    monkeypatch.setattr(features, "train_sae", lambda a, c, **k: seen.setdefault("train", k["groups"]) is None
                        or real_train(a, c, **k))
    monkeypatch.setattr(features, "evaluate_sae", lambda sae, a: seen.setdefault("eval", len(a)) and real_eval(sae, a))
    rows = features.sweep(acts, SAEConfig(architecture="topk", training_samples=2048, batch_size=256, lr=3e-3,
                                          early_stop_every=2), values=[4], groups=groups)
    # 3 of 30 prompts measured (300 rows), the other 27 trained on, with their labels for early stopping.
    assert seen["eval"] == 300 and len(seen["train"]) == 2700 and len(set(seen["train"])) == 27
    assert rows[0]["k"] == 4 and np.isfinite(rows[0]["explained_variance"])
    with pytest.raises(ValueError, match="at least 2 groups"):
        features.sweep(acts, SAEConfig(), values=[4], groups=np.zeros(3000, dtype=int))
