import numpy as np
import pytest
import torch

from irmprobe.capture import capture_pair, sample_continuations
from irmprobe.pairs import load_pair


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
        handles = [_mlp(model, l).register_forward_hook(lambda m, i, o, l=l: grabbed.__setitem__(l, o.detach()))
                   for l in (0, 1)]
        try:
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0]
        finally:
            for h in handles:
                h.remove()
        rows = np.flatnonzero(cap.seq_index == s_idx)
        rows = rows[np.argsort(cap.position[rows])]
        assert cap.token_ids[rows].tolist() == seq[1:]
        for l in (0, 1):
            np.testing.assert_allclose(cap.acts[f"base.{l}"][rows], grabbed[l][0, 1:].numpy(), atol=1e-4)
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
    assert all(pair.tokenizer.eos_token_id not in seq[l:] for seq, l in zip(ids, lens))


def test_layer_out_of_range_raises(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    with pytest.raises(ValueError, match="out of range"):
        capture_pair(pair, [[1, 2, 3]], (5,))
