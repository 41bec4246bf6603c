"""Which SAE features carry the implicit reward: attribution, exact patching, faithfulness and completeness.

The method of Marks et al. (2024), *Sparse Feature Circuits*, applied to the tuning's implicit reward.

**Metric.** The DPO implicit reward of a continuation y of prompt x is ``r(y) = sum_t log p_tuned(y_t | ..)
- log p_base(y_t | ..)`` over its continuation tokens, teacher-forced (no sampling noise). Per prompt,
``m_p = mean r over the tuned model's continuations - mean r over the base's``: how much more the tuned
model's implicit reward prefers what it writes over what the base writes (positive by construction in
expectation: the sum of the two KL divergences). ``m`` is the mean of ``m_p`` over prompts; every interval is
a bootstrap over prompts.

**Nodes.** At each hook point (the output of block l's MLP, ``mlp_out``, or the residual stream after it,
``resid_post``), the tuned model's activation is split by the tuned model's SAE into its features and the
error term, ``x = decode(f) + e``. Nodes are the features and the error of every hook point. The
counterfactual of each node is its value on the base model's activation at the same position of the same
tokens, encoded in the same dictionary. Setting a node set C to its tuned value and every other node to its
base value means replacing each hook point's output by ``decode(f_C) + e_C``; all nodes tuned reproduces the
tuned model exactly, none tuned patches the base's activation in at every hook point (``m(empty)``).

**Attribution** (attribution patching with integrated gradients): node i's effect is
``(v_tuned - v_base) . mean over alpha of dm/dv`` along the straight path from the base's node values to the
tuned's (midpoint rule, ``ig_steps`` points); the effects sum to about ``m(M) - m(empty)``. The top nodes are
checked by exact patching: ``m(M) - m(M with node i at its base value)``.

**Faithfulness** of a set C: ``(m(C) - m(empty)) / (m(M) - m(empty))``; **completeness**: the same for its
complement (1 - completeness is what C alone would take away). The ranking is made on one half of the
prompts and the curves are measured on the other, beside random sets of features of the same size (a
distribution), the set of every error node, and the whole-hook-point bound ``(m(M) - m(empty)) / m(M)``: the
share of the implicit reward the hook points carry at all (the base model's own m is 0). A second curve ranks
the features alone (every error term at its base value): what a feature circuit without the errors carries.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from irmprobe.activations.capture import hook_module
from irmprobe.activations.patching import output_hooks
from irmprobe.progress import bar as progress_bar

HOOK_KINDS = {"hook_mlp_out": "mlp_out", "hook_resid_post": "resid_post"}
"""Capture hook -> the patch site this module splices at."""

ERROR = -1
"""The index of a hook point's error node."""


@dataclass(frozen=True)
class Node:
    """One node: feature ``index`` of the SAE at ``layer`` (``ERROR`` for that hook point's error term)."""

    layer: int
    index: int

    @property
    def name(self) -> str:
        return f"L{self.layer}/{'error' if self.index == ERROR else f'f{self.index}'}"

    @property
    def is_error(self) -> bool:
        return self.index == ERROR

    @classmethod
    def parse(cls, name: str) -> "Node":
        """The node named ``name`` (:attr:`name`: ``L<layer>/f<index>`` or ``L<layer>/error``)."""
        layer, _, part = name.partition("/")
        feature = part[:1] == "f" and part[1:].isdigit()
        if not (layer[:1] == "L" and layer[1:].isdigit() and (part == "error" or feature)):
            raise ValueError(f"not a node name: {name!r} (expected L<layer>/f<index> or L<layer>/error)")
        return cls(int(layer[1:]), ERROR if part == "error" else int(part[1:]))


@dataclass(frozen=True)
class Batch:
    """One padded batch of sequences with the node values of both models and the base's log-probabilities."""

    tokens: torch.Tensor
    """[B, T] right-padded ids."""
    targets: torch.Tensor
    """[B, T-1] bool: the positions t-1 whose next token (a continuation token) counts in the metric."""
    logp_base: torch.Tensor
    """[B, T-1] log p_base of the next token."""
    weights: torch.Tensor
    """[B]: +1/(tuned continuations of the prompt), -1/(base continuations of the prompt)."""
    prompt: np.ndarray
    """[B] the prompt (index into the call's prompt list) of each sequence."""
    f: dict
    """(layer, model) -> [B, T, d_sae] feature activations, model in {base, tuned}."""
    e: dict
    """(layer, model) -> [B, T, d] error term."""
    anchor: dict
    """layer -> [B, T, d] what the dictionary's reconstruction is added to: the base's activation for a
    dictionary of the change, zero (absent) for a dictionary of the activations."""
    prefix: Any = None
    """The tuned model's hidden state after the block before the first hook point (and the length of the tuple
    that block returns; None: a tensor): no node acts before it, so every setting of the nodes computes it
    alike and :meth:`ImplicitReward._run` starts there. One [B, T, d] tensor per batch, in the model's dtype
    (less than the error terms the batch keeps, [B, T, d] float32 per hook point). None: the first hook point
    is in block 0."""


@dataclass(frozen=True)
class Layout:
    """Sequences batched for the metric ``m``: per batch ``(tokens, targets, weights, prompt)`` as in
    :class:`Batch`; ``prompt``: each sequence's prompt (index into ``prompts``, the labels); ``used``: the prompts
    with continuations of both models (those ``m`` is measured on)."""

    batches: list
    prompt: np.ndarray
    prompts: np.ndarray
    used: np.ndarray
    device: torch.device


def layout(sequences, prompt_lens, prompt, source, *, batch_size: int, pad_id: int, device) -> Layout:
    """Batch the sequences of prompts with continuations of both models, each weighted so that a prompt's
    weighted sum of implicit rewards is ``mean over its tuned continuations - mean over its base ones``.

    Raises:
        ValueError: arrays of different lengths, a source other than base/tuned, or no prompt with both."""
    n = len(sequences)
    if not (len(prompt_lens) == len(prompt) == len(source) == n) or n == 0:
        raise ValueError("sequences, prompt_lens, prompt and source must be non-empty and of one length")
    source = np.asarray(source)
    if not set(source.tolist()) <= {"base", "tuned"}:
        raise ValueError("source must hold 'base' or 'tuned' per sequence")
    labels, index = np.unique(np.asarray(prompt), return_inverse=True)
    both = [p for p in range(len(labels)) if {"base", "tuned"} <= set(source[index == p].tolist())]
    if not both:
        raise ValueError("no prompt has continuations of both models: the metric compares the two")
    keep = np.isin(index, both)
    counts = {(p, s): int(np.sum((index == p) & (source == s))) for p in both for s in ("base", "tuned")}
    weight = np.array([(1.0 if s == "tuned" else -1.0) / counts[p, s] if k else 0.0
                       for p, s, k in zip(index, source, keep)])
    order = [i for i in range(n) if keep[i]]
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        targets = torch.zeros((len(idx), max(width - 1, 1)), dtype=torch.bool)
        for row, i in enumerate(idx):
            seq = list(sequences[i])
            tokens[row, : len(seq)] = torch.tensor(seq)
            # Position t-1 predicts token t; continuation tokens are t >= prompt_len.
            targets[row, max(int(prompt_lens[i]) - 1, 0) : len(seq) - 1] = True
        batches.append((tokens.to(device), targets[:, : width - 1].to(device),
                        torch.tensor(weight[idx], dtype=torch.float32, device=device), index[idx]))
    return Layout(batches, index, labels, np.array(both), device)


class ImplicitReward:
    """The metric ``m`` per prompt on a fixed set of sequences, under any setting of the nodes.

    Args:
        base, tuned: plain Hugging Face models (hooks are PyTorch forward hooks).
        saes: ``layer -> SAE`` of the tuned model at ``kind`` of that block.
        kind: ``mlp_out`` or ``resid_post``.
        sequences: token ids of each sequence (prompt + continuation).
        prompt_lens: prompt length of each sequence (tokens before the continuation).
        prompt: the prompt each sequence continues (any hashable labels; the unit of every interval).
        source: ``"tuned"`` or ``"base"``: which model wrote each continuation.
        change: the SAEs are dictionaries of the change (trained on tuned - base activations at the hook
            point, same tokens): a hook point's output is then ``x_base + decode(f) + e`` with ``f`` and ``e``
            encoded from ``x_tuned - x_base``; the base's node values are those of a zero change.
    """

    def __init__(self, base, tuned, saes: dict, kind: str, sequences, prompt_lens, prompt, source, *,
                 batch_size: int = 16, pad_id: int = 0, change: bool = False) -> None:
        if kind not in HOOK_KINDS.values():
            raise ValueError(f"kind must be one of {', '.join(HOOK_KINDS.values())}, got {kind!r}")
        if not saes:
            raise ValueError("no SAEs: attribution needs the tuned model's SAE at one hook point at least")
        lay = layout(sequences, prompt_lens, prompt, source, batch_size=batch_size, pad_id=pad_id,
                     device=next(tuned.parameters()).device)
        self.base, self.tuned, self.saes, self.kind, self.change = base, tuned, saes, kind, change
        self.points = [(kind, layer) for layer in sorted(saes)]
        self.layers = sorted(saes)
        self.prompt, self.prompts, self.used = lay.prompt, lay.prompts, lay.used
        self.n_prompts = len(lay.prompts)
        self.device = lay.device
        # The blocks before the first hook point, which every setting of the nodes computes alike (their output is
        # kept per batch and handed on: a forward under any node setting runs from there, a 3-fold saving at the
        # demo's blocks 20-23 of 30).
        self.skipped = [hook_module(tuned, f"blocks.{b}.hook_resid_post") for b in range(self.layers[0])]
        self.batches: list[Batch] = [self._capture(*b) for b in lay.batches]

    @torch.no_grad()
    def _capture(self, tokens, targets, weights, prompt) -> Batch:
        acts: dict = {}

        def keep(model_name):
            def fn(point, act):
                acts[point[1], model_name] = act.detach().float()
            return fn

        with output_hooks(self.base, self.points, keep("base")):
            logits = self.base(input_ids=tokens, use_cache=False).logits
        logp_base = _next_logp(logits, tokens)
        prefix = {}

        def keep_prefix(module, args, output):  # returns None: the forward goes on unchanged
            prefix["output"] = _hidden(output)

        handle = self.skipped[-1].register_forward_hook(keep_prefix) if self.skipped else None
        try:
            with output_hooks(self.tuned, self.points, keep("tuned")):
                self.tuned(input_ids=tokens, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        f, e, anchor = {}, {}, {}
        for layer in self.layers:
            inputs = {"base": acts[layer, "base"], "tuned": acts[layer, "tuned"]}
            if self.change:
                anchor[layer] = inputs["base"]
                inputs = {"base": torch.zeros_like(anchor[layer]), "tuned": inputs["tuned"] - anchor[layer]}
            for model_name, x in inputs.items():
                feats = self.saes[layer].encode(x)
                f[layer, model_name] = feats
                e[layer, model_name] = x - self.saes[layer].decode(feats)
        return Batch(tokens, targets, logp_base, weights, prompt, f, e, anchor, prefix.get("output"))

    def _run(self, batch: Batch, f: dict, e: dict) -> torch.Tensor:
        """Per-sequence weighted implicit reward with each hook point replaced by ``decode(f) + e``."""
        def replace(point, act):
            layer = point[1]
            x = self.saes[layer].decode(f[layer]) + e[layer]
            return (x + batch.anchor[layer] if layer in batch.anchor else x).to(act.dtype)

        with output_hooks(self.tuned, self.points, replace), _starting_after(self.skipped, batch.prefix):
            logits = self.tuned(input_ids=batch.tokens, use_cache=False).logits
        r = ((_next_logp(logits, batch.tokens) - batch.logp_base) * batch.targets).sum(-1)
        return r * batch.weights

    def _per_prompt(self, per_batch: list[torch.Tensor]) -> np.ndarray:
        values = np.zeros(self.n_prompts)
        for batch, v in zip(self.batches, per_batch):
            np.add.at(values, batch.prompt, v.detach().double().cpu().numpy())
        return values[self.used]

    @torch.no_grad()
    def evaluate(self, tuned_nodes: Callable[[int, str], object] | None) -> np.ndarray:
        """``m_p`` per prompt with the nodes ``tuned_nodes(layer, 'features')`` (a bool mask over features, or
        True/False for all) and ``tuned_nodes(layer, 'error')`` (bool) at their tuned value, the rest at the
        base's. None: every node tuned (the tuned model itself)."""
        out = []
        for batch in self.batches:
            f, e = {}, {}
            for layer in self.layers:
                ft, fb = batch.f[layer, "tuned"], batch.f[layer, "base"]
                et, eb = batch.e[layer, "tuned"], batch.e[layer, "base"]
                if tuned_nodes is None:
                    f[layer], e[layer] = ft, et
                    continue
                mask = tuned_nodes(layer, "features")
                if isinstance(mask, bool | np.bool_):
                    f[layer] = ft if mask else fb
                else:
                    m = torch.as_tensor(np.asarray(mask, dtype=bool), device=ft.device)
                    f[layer] = torch.where(m, ft, fb)
                e[layer] = et if tuned_nodes(layer, "error") else eb
            out.append(self._run(batch, f, e))
        return self._per_prompt(out)

    def integrated_gradients(self, steps: int = 4, echo=None) -> dict[int, tuple[np.ndarray, float]]:
        """Each node's IG attribution: ``layer -> (per-feature attribution [d_sae], error attribution)``."""
        if steps < 1:
            raise ValueError(f"ig_steps must be at least 1, got {steps}")
        feats = {layer: torch.zeros(self.saes[layer].cfg.d_sae, dtype=torch.float64) for layer in self.layers}
        errors = {layer: 0.0 for layer in self.layers}
        alphas = (np.arange(steps) + 0.5) / steps
        with progress_bar(total=len(self.batches) * steps, desc="attribution (IG)") as bar:
            for batch in self.batches:
                for alpha in alphas:
                    f, e = {}, {}
                    for layer in self.layers:
                        fb, ft = batch.f[layer, "base"], batch.f[layer, "tuned"]
                        eb, et = batch.e[layer, "base"], batch.e[layer, "tuned"]
                        f[layer] = (fb + alpha * (ft - fb)).requires_grad_(True)
                        e[layer] = (eb + alpha * (et - eb)).requires_grad_(True)
                    m = self._run(batch, f, e).sum()
                    # allow_unused: a residual-stream hook point replaced wholesale cuts every earlier one off
                    # the metric (resid_post at blocks 20 and 23: block 20's nodes act only through block 23's).
                    grads = torch.autograd.grad(m, [f[layer] for layer in self.layers] +
                                                [e[layer] for layer in self.layers], allow_unused=True)
                    for i, layer in enumerate(self.layers):
                        gf, ge = grads[i], grads[len(self.layers) + i]
                        if gf is not None:
                            df = batch.f[layer, "tuned"] - batch.f[layer, "base"]
                            feats[layer] += (gf * df).sum((0, 1)).double().cpu() / steps
                        if ge is not None:
                            de = batch.e[layer, "tuned"] - batch.e[layer, "base"]
                            errors[layer] += float((ge * de).sum()) / steps
                    bar.update(1)
        # The metric is a mean over prompts of per-prompt sums: scale the attributions alike.
        scale = 1.0 / len(self.used)
        return {layer: (feats[layer].numpy() * scale, errors[layer] * scale) for layer in self.layers}


def _hidden(output):
    """The hidden state a block returned (a tensor, or the first item of a tuple), detached from the graph, and the
    length of the tuple (None: a tensor)."""
    if isinstance(output, tuple):
        return output[0].detach(), len(output)
    return output.detach(), None


@contextmanager
def _starting_after(blocks: list, kept):
    """Within the block, each of ``blocks`` (the model's first blocks) returns without computing: the last of them
    a copy of ``kept`` (:func:`_hidden` of what it returned in an earlier forward of the same tokens), the others
    the kept tensor itself, which the next skipped block ignores. The model's loop hands each block's return to the
    next, so the first block after them sees that output and everything from there on is computed as in a full
    forward (a tuple's other items, attention weights or a cache, are None: read only when asked for). The blocks'
    own ``forward`` (an accelerate hook's included) is put back after. ``kept`` None: nothing is skipped.

    PyTorch hooks cannot skip a module's computation, hence the swap; any hook on or inside a skipped block does
    not fire, and a model whose later blocks read what earlier ones stored (layers sharing K/V across blocks) is
    not supported."""
    if kept is None or not blocks:
        yield
        return
    hidden, n = kept

    def returned(copy: bool):
        h = hidden.clone() if copy else hidden
        return h if n is None else (h, *[None] * (n - 1))

    missing = object()
    patched = []
    try:
        for i, block in enumerate(blocks):
            patched.append((block, block.__dict__.get("forward", missing)))
            last = i == len(blocks) - 1
            block.forward = lambda *args, last=last, **kwargs: returned(last)
        yield
    finally:
        for block, own in patched:
            if own is missing:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


def _next_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T-1] log-probability of each next token."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def reads_tuned_saes(result: dict | None) -> bool:
    """The attribute stage ran and its feature nodes are the tuned model's SAE features (the IRM's basis), not
    features of dictionaries of the change."""
    return bool(result) and "skipped" not in result and result.get("dictionary") != "change"


def ranked_nodes(attribution: dict[int, tuple[np.ndarray, float]]) -> list[tuple[Node, float]]:
    """Every node with a nonzero attribution, largest (signed) first: the nodes that carry the reward."""
    nodes = []
    for layer, (feats, err) in attribution.items():
        nodes += [(Node(layer, int(i)), float(feats[i])) for i in np.flatnonzero(feats)]
        if err != 0:
            nodes.append((Node(layer, ERROR), float(err)))
    return sorted(nodes, key=lambda t: (-t[1], t[0].layer, t[0].index))


def node_setter(nodes, saes: dict, *, complement: bool = False):
    """A ``tuned_nodes`` function for :meth:`ImplicitReward.evaluate`: ``nodes`` tuned (their complement with
    ``complement``), the rest at the base's value."""
    masks = {layer: np.zeros(saes[layer].cfg.d_sae, dtype=bool) for layer in saes}
    errors = {layer: False for layer in saes}
    for node in nodes:
        if node.is_error:
            errors[node.layer] = True
        else:
            masks[node.layer][node.index] = True

    def tuned_nodes(layer, part):
        if part == "error":
            return errors[layer] != complement
        return ~masks[layer] if complement else masks[layer]

    return tuned_nodes


def ratio_ci(numer: np.ndarray, denom: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> list[float | None]:
    """95% percentile bootstrap over prompts of ``mean(numer) / mean(denom)`` (per-prompt arrays, resampled
    together). Resamples whose denominator is not positive are dropped; None when fewer than half remain."""
    rng = np.random.default_rng(seed)
    n = len(numer)
    idx = rng.integers(0, n, size=(n_boot, n))
    num, den = numer[idx].mean(1), denom[idx].mean(1)
    ok = den > 0
    if ok.sum() < n_boot / 2:
        return [None, None]
    values = num[ok] / den[ok]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _share(values: np.ndarray, empty: np.ndarray, full: np.ndarray, seed: int) -> dict:
    denom = full - empty
    point = float((values - empty).mean() / denom.mean()) if denom.mean() != 0 else None
    return {"value": point, "ci": ratio_ci(values - empty, denom, seed=seed)}


@torch.no_grad()
def hook_point_bounds(base, tuned, sequences, prompt_lens, prompt, source, point_sets: dict[str, list], *,
                      batch_size: int = 16, pad_id: int = 0, seed: int = 0) -> list[dict]:
    """The share of the implicit reward each set of hook points carries, with no dictionary: ``1 - m(the base's
    activations patched in at every point of the set) / m(tuned)``. At the points where the SAEs sit this is
    :func:`attribution_curves`' ``bound`` (every node at its base value is the base's activation; equal up to
    rounding); at others it says how much any dictionary there could carry, as a bound on a set of its features'
    share of ``m``.

    Args:
        point_sets: a label -> the (hook kind, block) points patched together (kinds of :data:`HOOK_KINDS`).

    Returns:
        One dict per set, in order: ``label``, ``points``, ``value`` and its 95% bootstrap ``ci`` over prompts
        (:func:`ratio_ci`; None where ``m(tuned)`` is not positive), and ``m_full``, ``m(tuned)`` itself.

    Cost: per batch one base forward (keeping its activation at every point of every set) and one tuned forward
    per set plus one unpatched.
    """
    for label, points in point_sets.items():
        if not points:
            raise ValueError(f"hook_point_bounds: the set {label!r} has no hook point")
        for kind, _ in points:
            if kind not in HOOK_KINDS.values():
                raise ValueError(f"hook_point_bounds: unknown hook kind {kind!r} in {label!r}: expected one of "
                                 f"{', '.join(HOOK_KINDS.values())}")
    lay = layout(sequences, prompt_lens, prompt, source, batch_size=batch_size, pad_id=pad_id,
                 device=next(tuned.parameters()).device)
    every = sorted({tuple(p) for points in point_sets.values() for p in points})
    full = np.zeros(len(lay.prompts))
    patched = {label: np.zeros(len(lay.prompts)) for label in point_sets}
    for tokens, targets, weights, prompt_of in lay.batches:
        acts: dict = {}
        with output_hooks(base, every, lambda point, act: acts.__setitem__(point, act.detach())):
            logp_base = _next_logp(base(input_ids=tokens, use_cache=False).logits, tokens)

        def reward(logits):
            r = ((_next_logp(logits, tokens) - logp_base) * targets).sum(-1) * weights
            return r.double().cpu().numpy()

        np.add.at(full, prompt_of, reward(tuned(input_ids=tokens, use_cache=False).logits))
        for label, points in point_sets.items():
            # A copy on the tuned model's device: one stored activation is patched into several forwards.
            with output_hooks(tuned, [tuple(p) for p in points],
                              lambda point, act: acts[point].to(act.device, act.dtype, copy=True)):
                np.add.at(patched[label], prompt_of, reward(tuned(input_ids=tokens, use_cache=False).logits))
    full = full[lay.used]
    out = []
    for label, points in point_sets.items():
        p = patched[label][lay.used]
        total = float(full.mean())
        out.append({"label": label, "points": [[k, int(b)] for k, b in points],
                    "value": float((full - p).mean() / total) if total > 0 else None,
                    "ci": ratio_ci(full - p, full, seed=seed), "m_full": total})
    return out


def attribution_curves(metric: ImplicitReward, ranked: list[tuple[Node, float]], k_grid, *, n_random: int,
                       candidates: list[Node], seed: int, echo=None) -> dict:
    """Faithfulness and completeness of the top-k nodes of ``ranked`` for k in ``k_grid``, on ``metric``'s
    sequences, beside random feature sets of each size (``n_random`` draws from ``candidates``), the set of
    every error node, the set of every feature and the whole-hook-point bound. Every share has a bootstrap CI
    over prompts."""
    saes = metric.saes
    full = metric.evaluate(None)
    empty = metric.evaluate(lambda layer, part: False)
    errors_only = metric.evaluate(node_setter([Node(layer, ERROR) for layer in metric.layers], saes))
    # Every feature tuned, every error at its base value: what the dictionaries' reconstructions carry together.
    features_all = metric.evaluate(lambda layer, part: part == "features")
    rng = np.random.default_rng(seed)
    order = [node for node, _ in ranked]
    features = [node for node in order if not node.is_error]
    ks = [int(k) for k in k_grid if 1 <= k <= len(order)]
    rows, feature_rows = [], []
    with progress_bar(total=len(ks) * (4 + n_random), desc="faithfulness curves") as bar:
        for k in ks:
            top = order[:k]
            faith = metric.evaluate(node_setter(top, saes))
            comp = metric.evaluate(node_setter(top, saes, complement=True))
            bar.update(2)
            randoms = []
            for _ in range(n_random):
                draw = [candidates[i] for i in rng.choice(len(candidates), min(k, len(candidates)), replace=False)]
                randoms.append(_share(metric.evaluate(node_setter(draw, saes)), empty, full, seed)["value"])
                bar.update(1)
            rows.append({"k": k, "faithfulness": _share(faith, empty, full, seed),
                         "completeness": _share(comp, empty, full, seed),
                         "random": {"values": randoms,
                                    "range": [float(np.min(randoms)), float(np.max(randoms))] if randoms else None},
                         "errors_in_set": sum(n.is_error for n in top)})
            # Features only (every SAE error at its base value): what a feature circuit without the errors carries.
            if k <= len(features):
                top = features[:k]
                feature_rows.append({"k": k,
                                     "faithfulness": _share(metric.evaluate(node_setter(top, saes)), empty, full, seed),
                                     "completeness": _share(metric.evaluate(node_setter(top, saes, complement=True)),
                                                            empty, full, seed),
                                     "random": rows[-1]["random"]})
            bar.update(2)
    total = float(full.mean())
    bound = (float((full - empty).mean() / total) if total > 0 else None)
    return {"m_full": total, "m_empty": float(empty.mean()), "n_prompts": len(full), "n_candidates": len(candidates),
            "bound": {"value": bound, "ci": ratio_ci(full - empty, full, seed=seed)},
            "errors_only": _share(errors_only, empty, full, seed),
            "features_all": _share(features_all, empty, full, seed), "rows": rows, "feature_rows": feature_rows}


MATCH_COSINE = 0.7
"""The decoder cosine at or above which a feature's counterpart in another dictionary is counted as the same
feature (a descriptive count; whether the counterparts carry the reward is measured, not assumed)."""


def counterparts(nodes: list[Node], saes: dict, others: dict) -> list[dict]:
    """Each feature node's counterpart in other dictionaries at the same hook points: the feature of
    ``others[layer]`` whose decoder direction is closest in cosine to the node's (the matching that
    feature-universality studies use across SAEs trained with other seeds). Error nodes have none and are left
    out. Two nodes may share a counterpart.

    Returns:
        Per feature node: ``{"node", "counterpart" (a node name), "cosine"}``.

    Raises:
        ValueError: a node's layer has no dictionary in ``saes`` or ``others``, or their widths of input differ.
    """
    out = []
    for node in nodes:
        if node.is_error:
            continue
        if node.layer not in saes or node.layer not in others:
            raise ValueError(f"counterparts: no dictionary at block {node.layer} in both sets of dictionaries")
        w = saes[node.layer].W_dec.detach()[node.index].double()
        W = others[node.layer].W_dec.detach().double()
        if W.shape[1] != w.shape[0]:
            raise ValueError(f"counterparts: the dictionaries at block {node.layer} read inputs of width "
                             f"{w.shape[0]} and {W.shape[1]}")
        cos = (W @ w) / (W.norm(dim=1) * w.norm()).clamp_min(1e-12)
        j = int(torch.argmax(cos))
        out.append({"node": node.name, "counterpart": Node(node.layer, j).name, "cosine": float(cos[j])})
    return out


def set_shares(metric: ImplicitReward, nodes: list[Node], *, seed: int = 0) -> dict:
    """Faithfulness and completeness of one set of feature nodes as the features-only curve measures them
    (faithfulness: the set tuned, every other node and every error at its base value; completeness: the set at
    its base value, everything else, errors included, tuned), each with its bootstrap CI over ``metric``'s
    prompts."""
    full = metric.evaluate(None)
    empty = metric.evaluate(lambda layer, part: False)
    return {"faithfulness": _share(metric.evaluate(node_setter(nodes, metric.saes)), empty, full, seed),
            "completeness": _share(metric.evaluate(node_setter(nodes, metric.saes, complement=True)), empty, full,
                                   seed)}


def exact_check(metric: ImplicitReward, ranked: list[tuple[Node, float]], n: int) -> dict:
    """Exact patching of the top ``n`` nodes by |attribution|: ``m(M) - m(M with the node at its base value)``,
    against the attribution (Spearman over those nodes)."""
    top = sorted(ranked, key=lambda t: -abs(t[1]))[:n]
    full = metric.evaluate(None).mean()
    rows = []
    for node, estimate in top:
        patched = metric.evaluate(node_setter([node], metric.saes, complement=True)).mean()
        rows.append({"node": node.name, "attribution": estimate, "exact": float(full - patched)})
    rho = (float(spearmanr([r["attribution"] for r in rows], [r["exact"] for r in rows]).statistic)
           if len(rows) >= 3 else None)
    return {"rows": rows, "spearman": rho}


def smallest_faithful(curves: dict, threshold: float, which: str = "rows") -> int | None:
    """The smallest k of a curve (``rows``: every node; ``feature_rows``: features only) whose faithfulness
    reaches ``threshold`` (None if none does)."""
    for row in curves[which]:
        value = row["faithfulness"]["value"]
        if value is not None and value >= threshold:
            return row["k"]
    return None
