import numpy as np
import pytest
import torch

from irmprobe.activations.capture import capture_pair
from irmprobe.activations.samples import sample_continuations
from irmprobe.models.loading import load_pair


def _mlp(model, layer):
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers[layer].mlp
    return model.model.layers[layer].mlp


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_neox_dir"])
def test_capture_matches_independent_hf_hooks_and_excludes_padding(fixture, request):
    pair = load_pair(str(request.getfixturevalue(fixture)), None)
    seqs = [[5, 9, 17, 33, 2, 8, 40], [7, 3, 11], [12, 13, 14, 15, 16]]  # ragged: padded in batches
    cap = capture_pair(pair, seqs, (0, 1), batch_size=2)
    assert len(cap.token_ids) == sum(len(s) - 1 for s in seqs)  # positions t >= 1, no padding

    model = pair.base
    for s_idx, seq in enumerate(seqs):
        grabbed = {}
        handles = [_mlp(model, b).register_forward_hook(lambda m, i, o, b=b: grabbed.__setitem__(b, o.detach()))
                   for b in (0, 1)]
        try:
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0]
        finally:
            for h in handles:
                h.remove()
        rows = np.flatnonzero(cap.seq_index == s_idx)
        rows = rows[np.argsort(cap.position[rows])]
        assert cap.token_ids[rows].tolist() == seq[1:]
        for b in (0, 1):
            np.testing.assert_allclose(cap.acts[f"base.{b}"][rows], grabbed[b][0, 1:].numpy(), atol=1e-4)
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        np.testing.assert_allclose(cap.logp_base[rows], logp.numpy(), atol=1e-4)
    assert np.all(cap.log_ratio == 0)  # null pair: tuned is base


def test_sampling_is_seeded_and_strips_end_of_text(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    kw = dict(n_per_prompt=2, max_new_tokens=6, batch_size=4, seed=3)
    a = sample_continuations(pair.base, pair.tokenizer, ["The train left", "I bought a"], **kw)
    b = sample_continuations(pair.base, pair.tokenizer, ["The train left", "I bought a"], **kw)
    assert a == b
    ids, lens, idx, _ = a
    assert idx == [0, 0, 1, 1]
    assert all(pair.tokenizer.eos_token_id not in seq[n:] for seq, n in zip(ids, lens))


def test_layer_out_of_range_raises(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    with pytest.raises(ValueError, match="out of range"):
        capture_pair(pair, [[1, 2, 3]], (5,))


def _seqs(n=10):
    rng = np.random.default_rng(0)
    return [rng.integers(3, 200, size=int(rng.integers(3, 12))).tolist() for _ in range(n)]


def test_store_round_trip_matches_direct_capture(tiny_llama_dir, tmp_path):
    import json

    from irmprobe.activations.store import capture_to_store, load_store

    pair = load_pair(str(tiny_llama_dir), None)
    seqs = _seqs()
    capture_to_store(pair, seqs, (0, 1), tmp_path / "store", shard_sequences=3, batch_size=4)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert manifest["hooks"] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"] and manifest["dtype"] == "float32"
    assert manifest["rows"] == sum(len(s) - 1 for s in seqs)
    assert all(len(v["sha256"]) == 64 for v in manifest["shards"].values())
    stored = load_store(tmp_path / "store")
    direct = capture_pair(pair, seqs, (0, 1))
    key = lambda c: np.lexsort((c.position, c.seq_index))  # noqa: E731
    a, b = key(stored), key(direct)
    np.testing.assert_array_equal(stored.token_ids[a], direct.token_ids[b])
    np.testing.assert_allclose(stored.acts["base.1"][a], direct.acts["base.1"][b], atol=1e-5)
    batch = next(stored.batches("base.0", 8, seed=0))
    assert tuple(batch.shape) == (8, pair.d_model)


def test_interrupted_capture_resumes_without_losing_or_duplicating_rows(tiny_llama_dir, tmp_path, monkeypatch):
    from irmprobe.activations import store as capture_mod

    pair = load_pair(str(tiny_llama_dir), None)
    seqs = _seqs(12)
    real = capture_mod.capture_pair
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "capture_pair", flaky)
    with pytest.raises(KeyboardInterrupt):
        capture_mod.capture_to_store(pair, seqs, (1,), tmp_path / "s", shard_sequences=3)
    assert not capture_mod.store_complete(tmp_path / "s")
    with pytest.raises(ValueError, match="incomplete"):
        capture_mod.load_store(tmp_path / "s")
    calls["n"] = -100  # no more failures
    capture_mod.capture_to_store(pair, seqs, (1,), tmp_path / "s", shard_sequences=3)
    assert calls["n"] == -100 + 2  # only the two missing shards were computed
    cap = capture_mod.load_store(tmp_path / "s")
    pairs_seen = list(zip(cap.seq_index.tolist(), cap.position.tolist()))
    assert len(pairs_seen) == len(set(pairs_seen)) == sum(len(s) - 1 for s in seqs)


def test_corrupted_shard_is_detected(tiny_llama_dir, tmp_path):
    from irmprobe.activations.store import capture_to_store, load_store

    pair = load_pair(str(tiny_llama_dir), None)
    capture_to_store(pair, _seqs(4), (0,), tmp_path / "s", shard_sequences=2)
    shard = sorted((tmp_path / "s").glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.safetensors is corrupted"):
        load_store(tmp_path / "s")


def test_full_vocab_log_ratio_matches_an_independent_log_softmax(tiny_llama_dir, tmp_path):
    from tests.unit.test_pairs import _perturbed_copy

    tuned = _perturbed_copy(tiny_llama_dir, tmp_path / "tuned", layer=0, scale=0.5)
    pair = load_pair(str(tiny_llama_dir), str(tuned))
    seqs = [[5, 9, 17, 33, 2, 8, 40], [7, 3, 11], [12, 13, 14, 15, 16]]
    cap = capture_pair(pair, seqs, (0,), batch_size=2)
    total, rows = 0.0, 0
    for seq in seqs:
        with torch.no_grad():
            lt = torch.log_softmax(pair.tuned(torch.tensor([seq])).logits[0, :-1].double(), -1)
            lb = torch.log_softmax(pair.base(torch.tensor([seq])).logits[0, :-1].double(), -1)
        total = total + (lt - lb).sum(0)
        rows += len(seq) - 1
    expected = (total / rows).numpy()
    np.testing.assert_allclose(cap.vocab_log_ratio(), expected, atol=1e-4)
    assert np.abs(expected).max() > 1e-3  # the perturbation moved the distribution: a real check


def test_last_token_activations_equal_the_captured_rows(tiny_llama_dir):
    from irmprobe.activations.capture import last_token_activations

    pair = load_pair(str(tiny_llama_dir), None)
    seqs = [[5, 9, 17, 33], [7, 3], [12, 13, 14]]
    cap = capture_pair(pair, seqs, (1,), batch_size=2)
    last = last_token_activations(pair.bridge("base"), seqs, (1,), batch_size=2)[1]
    for s, seq in enumerate(seqs):
        row = np.flatnonzero((cap.seq_index == s) & (cap.position == len(seq) - 1))[0]
        np.testing.assert_allclose(last[s], cap.acts["base.1"][row], atol=1e-5)


@pytest.mark.parametrize("hook", ["hook_mlp_out", "hook_resid_post", "hook_attn_out"])
def test_last_token_activations_stop_after_the_last_hooked_block_and_match_a_full_forward(tiny_llama_dir, hook):
    import torch

    from irmprobe.activations.capture import last_token_activations
    from irmprobe.models.loading import load_pair

    bridge = load_pair(str(tiny_llama_dir), None).bridge("base")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 200, size=int(n)).tolist() for n in rng.integers(3, 12, size=9)]
    ours = last_token_activations(bridge, seqs, (0,), hook=hook, batch_size=4)
    name = f"blocks.0.{hook}"
    for i, s in enumerate(seqs):
        _, cache = bridge.run_with_cache(torch.tensor([s]), names_filter=[name], return_cache_object=False)
        np.testing.assert_allclose(ours[0][i], cache[name][0, -1].float().numpy(), atol=1e-5, rtol=0)
