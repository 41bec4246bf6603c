"""Held-out continuations of both models (the text every later stage reads), and extra capture text."""

from __future__ import annotations

import numpy as np

from irmprobe.capture import Samples, sample_continuations
from irmprobe.organisms import load_prompts


def sample_both(pair, heldout: list[str], rm, sc, *, seed: int, base_memo: dict | None = None,
                base_key=None) -> Samples:
    """``sc.samples_per_prompt`` continuations of each held-out prompt from the base, then the tuned model.

    Each model samples with its own fixed seed, so the base continuations are the same in every
    branch (organism and controls) and the tuned ones differ only by the tuned model. With
    ``base_memo`` (a dict shared by the branches of a run) and ``base_key`` (what fixes the base
    model's continuations: its identity, dtype, device, prompts, settings and seed), the base model
    samples once per run and every branch takes the same continuations.
    """
    ids, lens, idx, texts, src = [], [], [], [], []
    for offset, (name, model) in enumerate((("base", pair.base), ("tuned", pair.tuned))):
        memo_key = ("base-continuations", base_key) if name == "base" and base_key is not None else None
        if memo_key is not None and base_memo is not None and memo_key in base_memo:
            out = base_memo[memo_key]
        else:
            out = sample_continuations(model, pair.tokenizer, heldout, n_per_prompt=sc.samples_per_prompt,
                                       max_new_tokens=sc.max_new_tokens, batch_size=sc.batch_size,
                                       seed=seed * 1000 + offset)
            if memo_key is not None and base_memo is not None:
                base_memo[memo_key] = out
        ids += out[0]
        lens += out[1]
        idx += out[2]
        texts += out[3]
        src += [name] * len(out[0])
    return Samples(tuple(heldout), tuple(tuple(t) for t in ids), np.array(lens), np.array(idx),
                   np.array(src), tuple(texts), rm.score(texts))


def extra_texts(cc, tokenizer) -> list[list[int]]:
    """Token ids of the extra capture texts (a file or dataset column), each cut to max_text_tokens."""
    if not (cc.text_path or cc.text_dataset):
        return []
    texts = load_prompts(cc.text_path, dataset=cc.text_dataset, column=cc.text_column, limit=cc.max_texts)
    ids = [tokenizer(t, truncation=True, max_length=cc.max_text_tokens)["input_ids"] for t in texts]
    return [list(i) for i in ids if len(i) >= 2]
