"""Held-out continuations of both models (:class:`Samples`): the text every later stage reads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irmprobe import progress
from irmprobe.activations.capture import is_bridged
from irmprobe.cache import write_json
from irmprobe.models.placement import input_device
from irmprobe.prompts import encode_prompt


@dataclass(frozen=True)
class Samples:
    """Continuations of held-out prompts from both models, with their RM rewards."""

    prompts: tuple[str, ...]
    """The held-out prompts."""
    token_ids: tuple[tuple[int, ...], ...]
    """Prompt + continuation token ids of each sequence (no padding, no end-of-text)."""
    prompt_lens: np.ndarray
    """Number of prompt tokens at the start of each sequence."""
    prompt_index: np.ndarray
    """Which prompt each sequence continues."""
    source: np.ndarray
    """``"base"`` or ``"tuned"``: which model wrote the continuation."""
    completions: tuple[str, ...]
    """Decoded continuations."""
    rewards: np.ndarray
    """RM reward of each continuation."""

    def save(self, path: Path) -> None:
        write_json(
            path,
            {
                "prompts": list(self.prompts),
                "token_ids": [list(t) for t in self.token_ids],
                "prompt_lens": self.prompt_lens.tolist(),
                "prompt_index": self.prompt_index.tolist(),
                "source": self.source.tolist(),
                "completions": list(self.completions),
                "rewards": self.rewards.tolist(),
            },
        )

    @classmethod
    def load(cls, path: Path) -> Samples:
        d = json.loads(Path(path).read_text())
        return cls(
            tuple(d["prompts"]),
            tuple(tuple(t) for t in d["token_ids"]),
            np.array(d["prompt_lens"], dtype=np.int64),
            np.array(d["prompt_index"], dtype=np.int64),
            np.array(d["source"]),
            tuple(d["completions"]),
            np.array(d["rewards"], dtype=np.float64),
        )


def row_prompts(samples: Samples, seq_index: np.ndarray) -> np.ndarray:
    """The independent unit of each captured row: the held-out prompt its sequence continues.

    Every sequence that continues one prompt shares that prompt's tokens, activations and log-ratios,
    so folds, resamples and tests split by prompt, never by sequence. Rows of extra capture text
    (sequences past the samples) are each their own unit: ``n_prompts + (sequence - n_sequences)``.
    """
    seq = np.asarray(seq_index, dtype=np.int64)
    n_seq, n_prompts = len(samples.token_ids), len(samples.prompts)
    inside = seq < n_seq
    out = n_prompts + seq - n_seq
    out[inside] = np.asarray(samples.prompt_index, dtype=np.int64)[seq[inside]]
    return out


def prompt_halves(samples: Samples, n_prompts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``n_prompts`` held-out prompts (drawn with ``seed``): the attribute stage ranks on one
    and measures on the other; the depth stage cross-fits on them."""
    prompts = np.unique(samples.prompt_index)
    chosen = np.random.default_rng(seed).permutation(prompts)[:n_prompts]
    half = len(chosen) // 2
    return np.sort(chosen[:half]), np.sort(chosen[half:])


def in_prompt(samples: Samples, seq_index: np.ndarray, position: np.ndarray) -> np.ndarray:
    """True for rows whose token belongs to the prompt (identical in every sequence of that prompt)."""
    seq, pos = np.asarray(seq_index, dtype=np.int64), np.asarray(position, dtype=np.int64)
    inside = seq < len(samples.token_ids)
    out = np.zeros(len(seq), dtype=bool)
    out[inside] = pos[inside] < np.asarray(samples.prompt_lens)[seq[inside]]
    return out


@torch.no_grad()
def sample_continuations(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[list[list[int]], list[int], list[int], list[str]]:
    """Sample ``n_per_prompt`` continuations of each prompt (top_k=0, top_p=1, temperature 1).

    Returns (token ids of prompt + continuation, prompt lengths, prompt index, continuation texts);
    generation stops at end-of-text, which is not kept. A prompt longer than the model's context
    (``max_position_embeddings``) less ``max_new_tokens`` is cut to its last tokens (a leading
    beginning-of-text token is kept), and a warning says how many prompts were cut.

    Raises:
        ValueError: ``model`` is wrapped by a TransformerBridge. The bridge rewires its modules in
            place and Hugging Face ``generate`` (KV cache) then samples differently; sample before
            building the bridge, or from a fresh copy. Or ``max_new_tokens`` leaves no room for a
            prompt in the model's context.
    """
    if is_bridged(model):
        raise ValueError("cannot sample from a model a TransformerBridge has wrapped (its generate() differs): "
                         "sample before capture, or from a fresh copy (irmprobe.models.loading.load_model)")
    device = input_device(model)  # a model split by a device_map takes its ids where its embeddings run
    jobs = [i for i in range(len(prompts)) for _ in range(n_per_prompt)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        room = int(context) - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                             f"{context}-position context; lower max_new_tokens below {context}")
        bos = getattr(tokenizer, "bos_token_id", None)
        cut = 0
        for i, ids in enumerate(encoded):
            if len(ids) > room:
                keep_bos = bos is not None and ids[0] == bos and room > 1
                encoded[i] = ([bos] if keep_bos else []) + list(ids[len(ids) - (room - keep_bos):])
                cut += 1
        if cut:
            logging.getLogger(__name__).warning(
                "cut %d of %d prompts to their last %d tokens: the model's context is %d positions and "
                "%d are kept for the continuation", cut, len(prompts), room, context, max_new_tokens)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pad = tokenizer.pad_token_id
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids_out, lens_out, idx_out, texts = [], [], [], []
    for start in progress.bar(range(0, len(jobs), batch_size), desc="sampling", leave=False):
        chunk = jobs[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        # Left padding so every continuation starts at the same column.
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        # generate() draws from torch's global RNG: seed it per batch from our own generator.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        for row, i in enumerate(chunk):
            cont = []
            for tok in out[row, width:].tolist():
                if tok in stop:
                    break
                cont.append(tok)
            ids_out.append(list(encoded[i]) + cont)
            lens_out.append(len(encoded[i]))
            idx_out.append(i)
            texts.append(tokenizer.decode(cont, skip_special_tokens=True))
    return ids_out, lens_out, idx_out, texts


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
