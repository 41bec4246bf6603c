"""Activation patching from the base into the tuned model: where does the learned change live?

For a block ``l`` and a hook kind (``mlp_out``: the output of block ``l``'s MLP, TransformerLens's
``blocks.{l}.hook_mlp_out``; ``resid_post``: the residual stream after block ``l``), the base
model's activation on a token stream replaces the tuned model's at every position. The share of
the tuned-vs-base divergence that goes away,

    share = 1 - D_patched / D,    D = mean over real tokens t >= 1 of KL(p_tuned(.|x<t) || p_base(.|x<t)),

ranks blocks by causal effect (weight divergence cannot: after full fine-tuning with Adam every
block moves about equally). The same share is given for the mean log-ratio of the actual tokens,
``log p_tuned(x_t|x<t) - log p_base(x_t|x<t)``. :func:`generate_patched` samples from the patched
tuned model, for the "patching bound": the reward gain removed when the base's activations replace
the tuned's at the chosen blocks.

Models are plain Hugging Face causal LMs; patches are PyTorch forward hooks, removed on exit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from irmprobe.activations.capture import hook_module, right_padded
from irmprobe.progress import bar as progress_bar
from irmprobe.prompts import encode_prompt

HOOK_KINDS = ("mlp_out", "resid_post")


Point = tuple[str, int]
"""A patch site: (hook kind, block)."""


@dataclass(frozen=True)
class PatchingResult:
    """Divergence of the tuned from the base model, unpatched and with each single block patched."""

    blocks: tuple[int, ...]
    """The blocks patched, in the order of the arrays below."""
    hook_kinds: tuple[str, ...]
    """The hook kinds patched (``mlp_out``, ``resid_post``)."""
    kl: float
    """D: mean KL(p_tuned || p_base) over real tokens t >= 1, unpatched."""
    log_ratio: float
    """Mean log p_tuned(x_t|x<t) - log p_base(x_t|x<t) of the actual tokens, unpatched."""
    patched_kl: dict[str, np.ndarray]
    """Per hook kind: D with that block patched, one value per block."""
    patched_log_ratio: dict[str, np.ndarray]
    """Per hook kind: mean log-ratio with that block patched, one value per block."""
    n_tokens: int
    """Number of real tokens averaged over."""

    def share(self, kind: str, metric: str = "kl") -> np.ndarray:
        """Share of the divergence removed by patching each block (NaN when there is none to remove)."""
        _check_kind(kind, self.hook_kinds)
        return _share(*_metric(self, kind, metric))


@dataclass(frozen=True)
class CumulativeCurve:
    """Share removed when the top 1, 2, ... blocks of a single-block ranking are patched together."""

    kind: str
    """The hook kind patched."""
    order: tuple[int, ...]
    """The blocks, best first; entry k-1 of the arrays patches ``order[:k]``."""
    kl_share: np.ndarray
    """Share of the mean KL removed by the top k blocks."""
    log_ratio_share: np.ndarray
    """Share of the mean log-ratio removed by the top k blocks."""


@dataclass(frozen=True)
class PatchedSamples:
    """Continuations sampled from the tuned model with the base's activations patched in."""

    blocks: tuple[int, ...]
    """Blocks patched (empty: the tuned model unpatched)."""
    kind: str
    """Hook kind patched."""
    token_ids: tuple[tuple[int, ...], ...]
    """Prompt + continuation token ids of each sample (no padding, no end-of-text)."""
    prompt_lens: np.ndarray
    """Number of prompt tokens at the start of each sample."""
    prompt_index: np.ndarray
    """Which prompt each sample continues; samples are ordered by (prompt, sample)."""
    texts: tuple[str, ...]
    """Decoded continuations."""


def round_order(parts: list[PatchedSamples]) -> np.ndarray:
    """The permutation that puts the concatenated rows of rounds of samples (e.g. samples 0-3, then 4, then 5 of
    every prompt) in (prompt, sample) order: rounds come in sample order, so a stable sort by prompt keeps it."""
    return np.argsort(np.concatenate([p.prompt_index for p in parts]), kind="stable")


def join_samples(parts: list[PatchedSamples]) -> PatchedSamples:
    """Rounds of one condition's samples (e.g. samples 0-3, then 4, then 5 of every prompt) as one result, in
    (prompt, sample) order.

    Raises:
        ValueError: no parts, or parts of different blocks or hook kinds.
    """
    if not parts:
        raise ValueError("join_samples needs at least one part")
    if len({(p.blocks, p.kind) for p in parts}) != 1:
        raise ValueError("join_samples joins rounds of one condition: the parts patch different blocks or kinds")
    index, order = np.concatenate([p.prompt_index for p in parts]), round_order(parts)
    ids = [t for p in parts for t in p.token_ids]
    texts = [t for p in parts for t in p.texts]
    return PatchedSamples(parts[0].blocks, parts[0].kind, tuple(ids[i] for i in order),
                          np.concatenate([p.prompt_lens for p in parts])[order], index[order],
                          tuple(texts[i] for i in order))


def _check_kind(kind: str, allowed=HOOK_KINDS) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown hook kind {kind!r}: expected one of {', '.join(allowed)}")


def _metric(result: PatchingResult, kind: str, metric: str) -> tuple[np.ndarray, float]:
    if metric == "kl":
        return result.patched_kl[kind], result.kl
    if metric == "log_ratio":
        return result.patched_log_ratio[kind], result.log_ratio
    raise ValueError(f"metric must be kl or log_ratio, got {metric!r}")


def _share(patched, total: float) -> np.ndarray:
    patched = np.asarray(patched, dtype=np.float64)
    if total == 0 or not np.isfinite(total):
        return np.full(patched.shape, np.nan)
    return 1.0 - patched / total


def _module(model, point: Point):
    kind, block = point
    return hook_module(model, f"blocks.{block}.hook_{kind}")  # mlp_out or resid_post


def _validate(base, tuned, blocks, kinds) -> None:
    for kind in kinds:
        _check_kind(kind)
    n_layers = int(base.config.num_hidden_layers)
    if int(tuned.config.num_hidden_layers) != n_layers or base.config.hidden_size != tuned.config.hidden_size:
        raise ValueError("base and tuned models must have the same number of blocks and width")
    for block in blocks:
        if not 0 <= int(block) < n_layers:
            raise ValueError(f"block {block} is out of range for a {n_layers}-block model")


@contextmanager
def output_hooks(model, points, fn):
    """Within the block, ``fn(point, activation)`` sees each point's output; a non-None return replaces it."""
    handles = []
    try:
        for point in points:
            def hook(module, inputs, output, point=point):
                act = output[0] if isinstance(output, tuple) else output
                new = fn(point, act)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(_module(model, point).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replace(store: dict):
    def fn(point, act):
        new = store[point]
        if new.shape != act.shape:
            raise ValueError(f"patch at {point} has shape {tuple(new.shape)}, the tuned model's {tuple(act.shape)}")
        # A copy: the same stored activation is patched into several forwards.
        return new.to(act.device, act.dtype, copy=True)
    return fn


def _condition_patches(store: dict, rows: list[slice], conditions: list[Condition]):
    """The tuned model's hook for :func:`generate_conditions`: at each point, the rows of every condition that
    patches that block get the base's activation (``store``: the base ran on the patching conditions' rows, in
    condition order) or the condition's ``mix`` of the two."""
    spans, offset = [], 0  # (the condition's rows in the batch, its rows in the base's run, the condition)
    for r, c in zip(rows, conditions):
        if c.blocks:
            spans.append((r, slice(offset, offset + r.stop - r.start), c))
            offset += r.stop - r.start

    def fn(point, act):
        x_base = store[point]
        if x_base.shape[1:] != act.shape[1:] or len(x_base) != offset:
            raise ValueError(f"patch at {point} has shape {tuple(x_base.shape)}, the tuned model's patched rows "
                             f"{(offset, *act.shape[1:])}")
        out = None
        for r, in_base, c in spans:
            if point[1] not in c.blocks:
                continue
            new = x_base[in_base].to(act.device, act.dtype)
            if c.mix is not None:
                new = c.mix(point[1], new, act[r]).to(act.dtype)
            out = act.clone() if out is None else out
            out[r] = new
        return out

    return fn


@functools.cache
def _forward_params(model_type) -> frozenset[str]:
    """The keyword arguments a model class's forward takes (read once per class, not at every sampling step)."""
    return frozenset(inspect.signature(model_type.forward).parameters)


def _cache_key(model) -> str:
    # transformers renamed the KV-cache argument (and output field) past_key_values -> cache during 5.x.
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def _device(model) -> torch.device:
    from irmprobe.models.placement import input_device

    return input_device(model)  # a model split by a device_map takes its ids where its embeddings run


def _step(model, cache, ids, mask, positions):
    """One cached forward on the new tokens ``ids``: (last position's logits, the updated cache).

    Where the model takes ``logits_to_keep``, its head runs on the last position only: on a prompt's first step
    the other positions' logits took about a tenth of the sampler's time on a CPU. (An int, not an index tensor:
    remote-code models often slice with ``-logits_to_keep``.)
    """
    key, device = _cache_key(model), _device(model)
    past = {key: cache} if cache is not None else {}
    if _keeps_logits(type(model)):
        past["logits_to_keep"] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, **past)
    return out.logits[:, -1], out[key]


def _keeps_logits(model_type) -> bool:
    return "logits_to_keep" in _forward_params(model_type)


@torch.no_grad()
def _divergences(base, tuned, token_ids, conditions: list[tuple[Point, ...]], batch_size: int):
    """Mean KL and log-ratio over real tokens, unpatched and under each condition (a set of patches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.array([len(t) for t in token_ids], dtype=np.int64)
    n_tokens = int(np.clip(lengths - 1, 0, None).sum())
    if n_tokens == 0:
        raise ValueError("the token stream is empty: patching needs sequences of at least 2 tokens")
    points = sorted({p for c in conditions for p in c})
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] >= 2]
    kl = np.zeros(len(conditions) + 1)
    lr = np.zeros(len(conditions) + 1)
    store: dict[Point, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        tokens = right_padded(token_ids, chunk, lengths, pad)  # no mask needed: see right_padded
        real = torch.arange(1, tokens.shape[1])[None, :] < torch.tensor(lengths[chunk])[:, None]
        with output_hooks(base, points, lambda p, a: store.__setitem__(p, a)):
            base_logp = base(tokens.to(_device(base))).logits[:, :-1].float().log_softmax(-1)
        target = tokens[:, 1:, None].to(base_logp.device)
        real = real.to(base_logp.device)
        base_tok = base_logp.gather(-1, target).squeeze(-1)
        for i, condition in enumerate([(), *conditions]):
            with output_hooks(tuned, condition, _replace(store)):
                logits = tuned(tokens.to(_device(tuned))).logits[:, :-1]
            logp = logits.float().log_softmax(-1).to(base_logp.device)
            div = (logp.exp() * (logp - base_logp)).sum(-1)
            kl[i] += float(div[real].double().sum())
            lr[i] += float((logp.gather(-1, target).squeeze(-1) - base_tok)[real].double().sum())
        store.clear()
    return kl / n_tokens, lr / n_tokens, n_tokens


def patching_effects(base, tuned, token_ids, blocks, *, hook_kinds=HOOK_KINDS, batch_size: int = 16) -> PatchingResult:
    """Patch each block's base activation into the tuned model and measure the divergence left.

    Args:
        base, tuned: Hugging Face causal LMs of the same architecture.
        token_ids: The token stream, one list of ids per sequence (e.g. held-out samples).
        blocks: The blocks to patch, one at a time.
        hook_kinds: ``mlp_out`` and/or ``resid_post``.
        batch_size: Sequences per forward; each batch costs one base forward and
            ``1 + len(blocks) * len(hook_kinds)`` tuned forwards.

    Raises:
        ValueError: an unknown hook kind, a block out of range, or an empty stream.
    """
    blocks, hook_kinds = tuple(int(b) for b in blocks), tuple(hook_kinds)
    if not blocks or not hook_kinds:
        raise ValueError("patching needs at least one block and one hook kind")
    _validate(base, tuned, blocks, hook_kinds)
    conditions = [((kind, b),) for kind in hook_kinds for b in blocks]
    kl, lr, n = _divergences(base, tuned, token_ids, conditions, batch_size)

    def per_kind(v):
        return {k: v[1 + j * len(blocks) : 1 + (j + 1) * len(blocks)] for j, k in enumerate(hook_kinds)}

    return PatchingResult(blocks, hook_kinds, float(kl[0]), float(lr[0]), per_kind(kl), per_kind(lr), n)


def ranking(result: PatchingResult, kind: str = "mlp_out", metric: str = "kl") -> tuple[int, ...]:
    """The blocks ordered by the share of the divergence their patch removes, largest first."""
    share = np.nan_to_num(result.share(kind, metric), nan=-np.inf)
    return tuple(result.blocks[i] for i in np.argsort(-share, kind="stable"))


def cumulative_curve(base, tuned, token_ids, result: PatchingResult, kind: str = "mlp_out", *, metric: str = "kl",
                     max_blocks: int | None = None, batch_size: int = 16) -> CumulativeCurve:
    """Share removed when patching the top 1, 2, ... blocks of ``ranking(result, kind, metric)`` together."""
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    order = ranking(result, kind, metric)[:max_blocks]
    _validate(base, tuned, order, (kind,))
    conditions = [tuple((kind, b) for b in order[:k]) for k in range(1, len(order) + 1)]
    kl, lr, _ = _divergences(base, tuned, token_ids, conditions, batch_size)
    return CumulativeCurve(kind, order, _share(kl[1:], kl[0]), _share(lr[1:], lr[0]))


def table(result: PatchingResult, weight_ranking, curve: CumulativeCurve | None = None, *,
          kind: str = "mlp_out", metric: str = "kl") -> list[str]:
    """Lines printing the patching ranking beside a weight-divergence ranking, then the cumulative curve."""
    order = ranking(result, kind, metric)
    share = dict(zip(result.blocks, result.share(kind, metric)))
    weight = list(weight_ranking)
    lines = [f"layers by effect (share of mean {metric} removed patching {kind}; D_kl={result.kl:.4f}, "
             f"log-ratio={result.log_ratio:+.4f}, {result.n_tokens} tokens) vs by weight divergence",
             f"{'rank':>4}  {'patching':>16}  {'weight':>8}"]
    for r in range(max(len(order), len(weight))):
        left = f"block {order[r]:>3} {share[order[r]]:+.3f}" if r < len(order) else ""
        right = f"block {weight[r]:>3}" if r < len(weight) else ""
        lines.append(f"{r + 1:>4}  {left:>16}  {right:>8}")
    if curve is not None:
        lines.append(f"cumulative: top-k blocks by patching {curve.kind} patched together")
        for k in range(len(curve.order)):
            blocks = ",".join(str(b) for b in curve.order[: k + 1])
            lines.append(f"  k={k + 1:<3} KL share {curve.kl_share[k]:+.3f}  log-ratio share "
                         f"{curve.log_ratio_share[k]:+.3f}  blocks {blocks}")
    return lines


@dataclass(frozen=True)
class Condition:
    """One way of running the tuned model while it samples, for :func:`generate_conditions`.

    ``hooks(rows)`` returns a context manager that changes the tuned model's computation for the batch rows
    ``rows`` only (e.g. :func:`irmprobe.validation.ablation.ablated` with ``rows``); None runs it unchanged.
    ``blocks``: at these blocks the call's ``kind`` activation of this condition's rows is replaced, by the
    base's (patching) or by ``mix(block, x_base, x_tuned)`` (e.g. the tuned activation less some features of
    a dictionary of the change, read off ``x_tuned - x_base``); the base model then runs in lockstep on
    those rows, on the tokens they sampled. With both, ``hooks`` act first: a patch at the same module
    overwrites what they did, and a mix reads their output as ``x_tuned``.
    """

    hooks: Callable[[slice], Any] | None = None
    blocks: tuple[int, ...] = ()
    mix: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def generate_patched(base, tuned, tokenizer, prompts, blocks, kind: str = "mlp_out", *, n_per_prompt: int,
                     max_new_tokens: int, seed: int, batch_size: int = 16, first_sample: int = 0) -> PatchedSamples:
    """Sample from ``tuned`` with the base's activations at ``blocks`` patched in at every position.

    Both models advance in lockstep on the same tokens, each with its own KV cache; sampling is
    top_k=0, top_p=1, temperature 1, by inverse CDF from one uniform per (prompt, sample) slot and
    step, drawn up front from ``seed``. So calls with the same prompts and seed are paired by
    (prompt, sample) whatever their batching: ``blocks=()`` samples the tuned model unpatched, and
    ``tuned=base, blocks=()`` the base model, with the same random numbers. ``first_sample``: the samples drawn
    are numbers ``first_sample`` to ``first_sample + n_per_prompt - 1`` of each prompt (see
    :func:`generate_conditions`).

    Raises:
        ValueError: an unknown hook kind, a block out of range, or no prompts.
    """
    return generate_conditions(base, tuned, tokenizer, prompts, [Condition(None, tuple(blocks))], kind,
                               n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens, seed=seed,
                               batch_size=batch_size, first_sample=first_sample)[0]


@torch.no_grad()
def generate_conditions(base, tuned, tokenizer, prompts, conditions: list[Condition], kind: str = "mlp_out", *,
                        n_per_prompt: int, max_new_tokens: int, seed: int, batch_size: int = 16,
                        first_sample: int = 0) -> list[PatchedSamples]:
    """Sample the tuned model under several conditions in shared batches; one result per condition.

    Each batch holds the same (prompt, sample) slots once per condition (``batch_size // len(conditions)``
    slots, at least one: more rows than ``batch_size`` only when conditions outnumber it), so one forward
    of the tuned model serves
    every condition, which keeps a GPU busy. Rows draw the uniforms of their slot (see
    :func:`generate_patched`), so each condition's samples equal those of its own
    :func:`generate_patched` call with the same seed (up to float rounding that differs between batch
    shapes, which can flip a draw only when a uniform falls within that rounding of a CDF step). Conditions
    may patch (or mix) different blocks: the base runs, on the rows of every condition that has blocks, to
    each of them, and each condition's rows are changed at its own blocks only.

    The uniforms of sample s of prompt i depend on ``seed``, the number of prompts, ``max_new_tokens``, s and i,
    not on ``n_per_prompt`` or ``first_sample``, so samples can be drawn in rounds: a call for samples 0-3
    (``n_per_prompt=4``) followed by one for samples 4-7 (``first_sample=4``) draws with the uniforms of one
    call for samples 0-7 (the same samples, up to the batch-shape rounding above). Results are in prompt order,
    then sample order.

    Raises:
        ValueError: an unknown hook kind, a block out of range, no prompts or conditions, a ``mix``
            without blocks, or a negative ``first_sample``.
    """
    if not conditions:
        raise ValueError("generate_conditions needs at least one condition")
    if any(c.mix is not None and not c.blocks for c in conditions):
        raise ValueError("a condition with a mix needs the blocks it mixes at (Condition.blocks)")
    blocks = sorted({int(b) for c in conditions for b in c.blocks})
    _validate(base, tuned, blocks, (kind,))
    if not prompts or n_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("generate_patched needs prompts, and n_per_prompt, max_new_tokens, batch_size >= 1")
    if first_sample < 0:
        raise ValueError(f"first_sample must be >= 0, got {first_sample}")
    points = [(kind, b) for b in blocks]
    jobs = [i for i in range(len(prompts)) for _ in range(n_per_prompt)]
    numbers = [s for _ in range(len(prompts)) for s in range(first_sample, first_sample + n_per_prompt)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # One uniform per (slot, step), fixed by the seed, the table's shape, the prompt and the sample number: batching
    # and rounds never change what a slot draws (the draw is sample-major, so samples 0..s-1's are a prefix).
    table = torch.rand((first_sample + n_per_prompt, len(prompts), max_new_tokens),
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniforms = table[numbers, jobs]
    n_cond = len(conditions)
    per_chunk = max(1, batch_size // n_cond)
    store: dict[Point, torch.Tensor] = {}
    out = [([], [], [], []) for _ in conditions]
    for start in progress_bar(range(0, len(jobs), per_chunk), desc=f"sampling {n_cond} condition(s)", leave=False):
        slots = list(range(start, min(start + per_chunk, len(jobs))))
        n = len(slots)
        width = max(len(encoded[jobs[j]]) for j in slots)
        # Left padding so every continuation starts at the same column; the slots repeat once per condition.
        one = torch.full((n, width), pad, dtype=torch.long)
        one_mask = torch.zeros((n, width), dtype=torch.long)
        for row, j in enumerate(slots):
            ids_j = encoded[jobs[j]]
            one[row, width - len(ids_j):] = torch.tensor(ids_j)
            one_mask[row, width - len(ids_j):] = 1
        ids, mask = one.repeat(n_cond, 1), one_mask.repeat(n_cond, 1)
        rows = [slice(c * n, (c + 1) * n) for c in range(n_cond)]
        # Rows of the conditions that patch (contiguous when they come last; any order works).
        patch_rows = torch.cat([torch.arange(r.start, r.stop) for r, c in zip(rows, conditions) if c.blocks]) \
            if points else torch.zeros(0, dtype=torch.long)
        patches = _condition_patches(store, rows, conditions)
        draws = uniforms[slots].repeat(n_cond, 1)
        cache_base = cache_tuned = None
        done = torch.zeros(len(ids), dtype=torch.bool)
        new = []
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            if points:  # the base runs only to supply the patches, on the rows that take them
                with output_hooks(base, points, lambda p, a: store.__setitem__(p, a)):
                    _, cache_base = _step(base, cache_base, ids[patch_rows], mask[patch_rows], positions[patch_rows])
            # The conditions' hooks are live around the tuned model's step only (tuned may be the base itself).
            with ExitStack() as stack:
                for r, c in zip(rows, conditions):
                    if c.hooks is not None:
                        stack.enter_context(c.hooks(r))
                stack.enter_context(output_hooks(tuned, points, patches))
                logits, cache_tuned = _step(tuned, cache_tuned, ids, mask, positions)
            probs = logits.double().softmax(-1).cpu()
            store.clear()
            # Inverse-CDF sampling from the slot's uniform: every condition of a slot draws the same number.
            # One number per row, not one per vocabulary entry: an exponential race over the vocabulary
            # cost a quarter of the ablation's time on a CPU.
            cdf = probs.cumsum(-1)
            u = draws[:, step: step + 1]
            drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
            token = torch.where(done, pad, drawn)
            new.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            ids = token[:, None]
            mask = torch.cat([mask, torch.ones((len(mask), 1), dtype=torch.long)], dim=1)
        new = torch.stack(new, dim=1)
        for c, r in enumerate(rows):
            ids_out, lens_out, idx_out, texts = out[c]
            for row, j in zip(range(r.start, r.stop), slots):
                cont = []
                for tok in new[row].tolist():
                    if tok in stop_ids:
                        break
                    cont.append(tok)
                i = jobs[j]
                ids_out.append(tuple(encoded[i]) + tuple(cont))
                lens_out.append(len(encoded[i]))
                idx_out.append(i)
                texts.append(tokenizer.decode(cont, skip_special_tokens=True))
    return [PatchedSamples(tuple(int(b) for b in c.blocks), kind, tuple(o[0]), np.array(o[1], dtype=np.int64),
                           np.array(o[2], dtype=np.int64), tuple(o[3])) for c, o in zip(conditions, out)]


def decision_rows(seq_index, position) -> tuple[np.ndarray, np.ndarray]:
    """Pair each captured row (token x_t of sequence s) with the row of its decision position t-1.

    Args:
        seq_index, position: Per captured row, its sequence and position
            (``Capture.seq_index``, ``Capture.position``).

    Returns:
        ``(rows_t, rows_prev)``: the rows whose position (s, t-1) is also captured, ascending, and
        that previous row's index, so a decision-side IRM regresses r at ``rows_t`` on features
        at ``rows_prev``.

    Raises:
        ValueError: arrays of different shapes, negative entries, or a (sequence, position) twice.
    """
    seq = np.asarray(seq_index, dtype=np.int64)
    pos = np.asarray(position, dtype=np.int64)
    if seq.ndim != 1 or seq.shape != pos.shape:
        raise ValueError(f"seq_index and position must be 1-d of the same length, got {seq.shape} and {pos.shape}")
    if len(seq) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if seq.min() < 0 or pos.min() < 0:
        raise ValueError("seq_index and position must be non-negative")
    key = seq * (int(pos.max()) + 1) + pos  # unique per (s, t); (s, t-1) is key - 1 when t >= 1
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    if np.any(sorted_key[1:] == sorted_key[:-1]):
        raise ValueError("a (sequence, position) pair occurs in more than one row")
    j = np.minimum(np.searchsorted(sorted_key, key - 1), len(key) - 1)
    hit = (pos >= 1) & (sorted_key[j] == key - 1)
    return np.flatnonzero(hit), order[j[hit]]


def plain_models(pair, *, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                 device_map=None, max_memory: dict | None = None):
    """``(base, tuned)`` of a :class:`~irmprobe.models.loading.ModelPair` as plain Hugging Face models for hooks.

    A TransformerBridge rewires the modules of the model it wraps in place; when it has wrapped
    either model, fresh copies are loaded from the pair's specs (one copy for a null pair), placed
    by the same ``device_map`` and ``max_memory`` as the pair.
    """
    from irmprobe.activations.capture import is_bridged
    from irmprobe.models.loading import load_model

    if not (is_bridged(pair.base) or is_bridged(pair.tuned)):
        return pair.base, pair.tuned
    def load(spec):
        return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          device_map=device_map, max_memory=max_memory)[0]

    base = load(pair.base_spec)
    return base, (base if pair.is_null else load(pair.tuned_spec))


def _floats(values) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def layer_choice(base, tuned, token_ids, top_k: int, kind: str, weight_ranking, *, batch_size: int = 16) -> dict:
    """Choose ``top_k`` blocks by the share of KL(tuned || base) that patching ``kind`` removes.

    Measures single-block patches of every block (one batched pass each) and the cumulative curve
    of the top 1 .. top_k + 2 blocks: about ``n_layers + top_k + 6`` forwards of the stream in all.

    Returns:
        A JSON-ready dict: ``chosen`` (ascending), ``ranking`` and ``weight_ranking`` (best first),
        ``shares`` (``kind`` -> metric -> per-block share, NaN as None), the unpatched ``kl`` and
        ``log_ratio``, ``curve`` and the printable ``table``.
    """
    _check_kind(kind)
    n_layers = int(base.config.num_hidden_layers)
    if not 1 <= top_k <= n_layers:
        raise ValueError(f"top_k must be between 1 and the number of layers ({n_layers}), got {top_k}")
    result = patching_effects(base, tuned, token_ids, range(n_layers), hook_kinds=(kind,), batch_size=batch_size)
    curve = cumulative_curve(base, tuned, token_ids, result, kind, max_blocks=min(top_k + 2, n_layers),
                             batch_size=batch_size)
    order = ranking(result, kind)
    return {"kind": kind, "metric": "kl", "chosen": sorted(order[:top_k]), "ranking": list(order),
            "weight_ranking": [int(b) for b in weight_ranking], "kl": result.kl, "log_ratio": result.log_ratio,
            "n_sequences": len(token_ids), "n_tokens": result.n_tokens,
            "shares": {k: {m: _floats(result.share(k, m)) for m in ("kl", "log_ratio")} for k in result.hook_kinds},
            "curve": {"order": list(curve.order), "kl_share": _floats(curve.kl_share),
                      "log_ratio_share": _floats(curve.log_ratio_share)},
            "table": table(result, weight_ranking, curve, kind=kind)}
