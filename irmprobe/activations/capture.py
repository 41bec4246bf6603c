"""Sampled text and paired activation capture through TransformerLens hooks.

One token stream is built once: held-out prompts continued by both models. Both models then see
exactly those tokens; for every real (non-padding) position ``t >= 1`` the capture keeps

* the hook activations ``blocks.{l}.<hook>`` of each model at the chosen layers, and
* ``log p(x_t | x_<t)`` under each model, whose difference is the per-token implicit reward
  ``r_t`` (log-ratio of tuned vs base) that the IRM is fitted to.

Sequences are right-padded: with causal attention no real position attends to padding, so no
attention mask is needed and positions match an unpadded forward exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge

from irmprobe import progress
from irmprobe.models.loading import ModelPair
from irmprobe.models.placement import input_device, offload_targets
from irmprobe.prompts import load_prompts


def is_bridged(model) -> bool:
    """True when a TransformerBridge has rewired this model's modules in place (see ``sample_continuations``)."""
    return any(type(m).__module__.startswith("transformer_lens.model_bridge") for m in model.modules())


def activation_batches(acts: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless iterator of shuffled batches over ``acts`` (a new permutation each pass)."""
    if len(acts) < batch_size:
        raise ValueError(
            f"only {len(acts)} activations for an SAE batch of {batch_size}: capture more text "
            "or lower sae.batch_size"
        )
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(np.asarray(acts, dtype=np.float32))  # no copy when already float32
    while True:
        order = torch.from_numpy(rng.permutation(len(acts)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield table.index_select(0, order[start : start + batch_size])



@dataclass(frozen=True)
class Capture:
    """Paired activations and log-probabilities for every real position ``t >= 1``."""

    layers: tuple[int, ...]
    hook: str
    token_ids: np.ndarray
    """``x_t`` at each row."""
    seq_index: np.ndarray
    """Which sequence of the Samples each row belongs to."""
    position: np.ndarray
    """``t`` within its sequence."""
    logp_base: np.ndarray
    """``log p_base(x_t | x_<t)``."""
    logp_tuned: np.ndarray
    """``log p_tuned(x_t | x_<t)``."""
    acts: dict[str, np.ndarray]
    """``"{model}.{layer}"`` -> float32 array [rows, d_model], model in {base, tuned}."""
    vocab_logp_sum: dict[str, np.ndarray] | None = None
    """``model`` -> float64 [vocab]: ``log p(v | x_<t)`` of every vocabulary token ``v``, summed over
    the rows. Divided by the row count it is the full-vocabulary mean log-probability."""

    def vocab_log_ratio(self) -> np.ndarray:
        """Full-vocabulary implicit reward: mean over contexts of log p_tuned(v) - log p_base(v)."""
        if self.vocab_logp_sum is None:
            raise ValueError("this capture has no full-vocabulary sums: capture it again with this version")
        return (self.vocab_logp_sum["tuned"] - self.vocab_logp_sum["base"]) / max(1, len(self.token_ids))

    @property
    def log_ratio(self) -> np.ndarray:
        """Per-token implicit reward ``r_t = log p_tuned - log p_base``."""
        return self.logp_tuned - self.logp_base

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (``acts.{model}.{layer}`` for activations)."""
        out = {"token_ids": self.token_ids, "seq_index": self.seq_index, "position": self.position,
               "logp_base": self.logp_base, "logp_tuned": self.logp_tuned}
        out.update({f"acts.{k}": v for k, v in self.acts.items()})
        out.update({f"vocab_logp_sum.{k}": v for k, v in (self.vocab_logp_sum or {}).items()})
        return out

    @classmethod
    def from_arrays(cls, layers, hook: str, arrays: dict[str, np.ndarray]) -> Capture:
        acts = {k[len("acts."):]: v for k, v in arrays.items() if k.startswith("acts.")}
        sums = {k[len("vocab_logp_sum."):]: v for k, v in arrays.items() if k.startswith("vocab_logp_sum.")}
        return cls(tuple(layers), hook, arrays["token_ids"], arrays["seq_index"], arrays["position"],
                   arrays["logp_base"], arrays["logp_tuned"], acts, sums or None)

    def batches(self, key: str, batch_size: int, seed: int):
        """Endless shuffled batches of one activation array (``"tuned.9"``), for SAELens."""
        return activation_batches(self.acts[key], batch_size, seed)


def right_padded(token_ids, chunk: np.ndarray, lengths: np.ndarray, pad: int) -> torch.Tensor:
    """The sequences ``chunk`` of ``token_ids`` as one [batch, longest] tensor, right-padded with ``pad`` (with
    causal attention no real position sees a pad, so no attention mask is needed and positions are the default)."""
    tokens = torch.full((len(chunk), int(lengths[chunk].max())), pad, dtype=torch.long)
    for row, s in enumerate(chunk):
        tokens[row, : lengths[s]] = torch.tensor(token_ids[s])
    return tokens


@torch.no_grad()
def _forward(bridge: TransformerBridge, tokens: torch.Tensor, names: list[str], real: torch.Tensor):
    logits, cache = bridge.run_with_cache(tokens, names_filter=names, return_cache_object=False)
    logits = logits[:, :-1].float()
    target = tokens[:, 1:].unsqueeze(-1).to(logits.device)  # a sharded model's logits sit on its last device
    # log p(x_t | x_<t) for t >= 1, without materialising a second [batch, pos, vocab] tensor.
    lse = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, target).squeeze(-1) - lse
    # Sum over real rows of log p(v | x_<t) for every v: sum_t logits_t - sum_t logsumexp_t.
    weight = real.to(logits.device, logits.dtype)
    # A batched matrix product over the (non-contiguous) logits view: einsum copied it first, about 1 s a batch.
    vocab_sum = torch.bmm(weight.unsqueeze(1), logits).sum(0).squeeze(0).double() - (lse * weight).sum().double()
    return token_logp, {n: cache[n][:, 1:].float() for n in names}, vocab_sum


_HOOK_MODULES = {"hook_mlp_out": (r"post_feedforward_layernorm", r"mlp"),
                 "hook_attn_out": (r"post_attention_layernorm", r"self_attn|attn|attention"),
                 "hook_resid_post": ()}
"""Per TransformerLens hook point of a block, the block's submodules whose output it is, in order of preference.

A block that normalises each sublayer's output before adding it to the residual stream (Gemma-2 and 3:
``post_feedforward_layernorm``, ``post_attention_layernorm``, with a ``pre_feedforward_layernorm``)
writes the normalised tensor, and that is TransformerLens's ``hook_mlp_out`` / ``hook_attn_out``; any
other block writes the sublayer's output itself. (Llama's ``post_attention_layernorm`` is the norm *before*
its MLP, so the post-norm names count only in a block that also has ``pre_feedforward_layernorm``.)"""


def hook_module(model, name: str):
    """The module of a plain Hugging Face model whose (first) output is the hook point ``blocks.{l}.<hook>``:
    the tensor a TransformerLens bridge's hook of that name sees (tested per architecture family).

    Raises:
        ValueError: a hook point other than ``hook_mlp_out``, ``hook_attn_out`` or ``hook_resid_post``, or a
            model whose blocks are not named ``layers.N``, ``h.N`` or ``blocks.N``.
    """
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", name)
    if not match or match.group(2) not in _HOOK_MODULES:
        raise ValueError(f"hook point {name!r}: without a TransformerLens bridge only blocks.N.{{"
                         f"{', '.join(_HOOK_MODULES)}}} can be captured")
    pattern = re.compile(rf"(^|\.)(layers|h|blocks)\.{match.group(1)}$")
    block = next((module for module_name, module in model.named_modules() if pattern.search(module_name)), None)
    if block is None:
        raise ValueError(f"no module for {name} in {type(model).__name__}: its blocks must be named layers.N, h.N "
                         "or blocks.N")
    choices = _HOOK_MODULES[match.group(2)]
    if not choices:
        return block
    children = dict(block.named_children())
    post_norm, plain = choices
    if post_norm in children and "pre_feedforward_layernorm" in children:
        return children[post_norm]
    found = next((m for n, m in children.items() if re.fullmatch(plain, n)), None)
    if found is None:
        raise ValueError(f"no {plain.replace('|', ' or ')} module in block {match.group(1)} of {type(model).__name__} "
                         f"for {name}; its submodules are {sorted(children)}")
    return found


class ForwardHooks:
    """The part of a TransformerBridge that capture uses (``run_with_cache``), through PyTorch forward hooks.

    For models whose weights accelerate offloaded (to the CPU beside GPUs, or to disk): accelerate loads
    those weights inside each module's own forward, and a forward hook runs after it, so it sees every
    layer; a TransformerLens bridge cannot run such a model (see ``ModelPair.bridge``).
    """

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def run_with_cache(self, tokens: torch.Tensor, names_filter: list[str], return_cache_object: bool = False):
        """(logits, {hook name: activation}) of one forward; hooks are removed when it returns or fails."""
        cache: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for name in names_filter:
                def keep(module, inputs, output, name=name):
                    cache[name] = output[0] if isinstance(output, tuple) else output

                handles.append(hook_module(self.model, name).register_forward_hook(keep))
            logits = self.model(input_ids=tokens, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return logits, cache


def capture_pair(
    pair: ModelPair,
    token_ids: list[list[int]] | tuple[tuple[int, ...], ...],
    layers: tuple[int, ...],
    *,
    hook: str = "hook_mlp_out",
    batch_size: int = 32,
) -> Capture:
    """Run both models over the same sequences and keep hooks and log-probs at real positions."""
    n_layers = pair.n_layers
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a {n_layers}-layer model")
    if not token_ids:
        raise ValueError("nothing to capture: the token stream is empty")
    names = [f"blocks.{b}.{hook}" for b in layers]
    models = {"base": pair.base} if pair.is_null else {"base": pair.base, "tuned": pair.tuned}
    # A model with offloaded weights runs without a bridge, through plain forward hooks (see ForwardHooks).
    bridges = {k: ForwardHooks(m) if offload_targets(m) else pair.bridge(k) for k, m in models.items()}
    device = input_device(pair.base)
    pad = pair.tokenizer.pad_token_id

    lengths = np.array([len(t) for t in token_ids])
    # Batch sequences of similar length together so little compute is spent on padding.
    order = np.argsort(-lengths, kind="stable")
    rows_tok, rows_seq, rows_pos = [], [], []
    logps = {k: [] for k in models}
    vocab: dict[str, np.ndarray] = {}
    acts = {f"{k}.{b}": [] for k in models for b in layers}
    for start in progress.bar(range(0, len(order), batch_size), desc="capture", leave=False):
        chunk = order[start : start + batch_size]
        tokens = right_padded(token_ids, chunk, lengths, pad)
        width = tokens.shape[1]
        real = torch.arange(1, width)[None, :] < torch.tensor(lengths[chunk])[:, None]  # t >= 1
        tokens = tokens.to(device)
        for kind, bridge in bridges.items():
            token_logp, cache, vocab_sum = _forward(bridge, tokens, names, real)
            vocab[kind] = vocab_sum.cpu().numpy() + vocab.get(kind, 0.0)
            logps[kind].append(token_logp[real].cpu().numpy())
            for layer, name in zip(layers, names):
                acts[f"{kind}.{layer}"].append(cache[name][real].cpu().numpy())
        seq = np.repeat(chunk[:, None], width - 1, axis=1)[real.numpy()]
        pos = np.repeat(np.arange(1, width)[None, :], len(chunk), axis=0)[real.numpy()]
        rows_seq.append(seq)
        rows_pos.append(pos)
        rows_tok.append(tokens[:, 1:][real.to(device)].cpu().numpy())
    merged = {k: np.concatenate(v).astype(np.float32) for k, v in acts.items()}
    logp_base = np.concatenate(logps["base"]).astype(np.float32)
    if pair.is_null:
        for layer in layers:
            merged[f"tuned.{layer}"] = merged[f"base.{layer}"]
        logp_tuned = logp_base.copy()
        vocab["tuned"] = vocab["base"].copy()
    else:
        logp_tuned = np.concatenate(logps["tuned"]).astype(np.float32)
    return Capture(
        tuple(layers), hook,
        np.concatenate(rows_tok).astype(np.int64), np.concatenate(rows_seq).astype(np.int64),
        np.concatenate(rows_pos).astype(np.int64), logp_base, logp_tuned, merged, vocab,
    )


@torch.no_grad()
def last_token_activations(bridge: TransformerBridge, token_ids, layers: tuple[int, ...], *,
                           hook: str = "hook_mlp_out", batch_size: int = 32) -> dict[int, np.ndarray]:
    """Hook activations at the last token of each sequence: layer -> float32 [n_sequences, d_model].

    Sequences are right-padded, so the last real position sees exactly its own prefix.
    """
    if not token_ids:
        raise ValueError("no sequences to run")
    if not layers:
        raise ValueError("no layers to read: pass at least one block index")
    names = [f"blocks.{b}.{hook}" for b in layers]
    device = next(bridge.parameters()).device
    pad = bridge.tokenizer.pad_token_id if bridge.tokenizer.pad_token_id is not None else 0
    lengths = np.array([len(t) for t in token_ids])
    out = {b: np.zeros((len(token_ids), 0), np.float32) for b in layers}
    parts: dict[int, list] = {b: [] for b in layers}
    order = np.argsort(-lengths, kind="stable")
    for start in progress.bar(range(0, len(order), batch_size), desc="last-token activations", leave=False):
        chunk = order[start : start + batch_size]
        tokens = right_padded(token_ids, chunk, lengths, pad)
        # Nothing after the last hooked block is needed: the blocks above it and the unembedding are skipped.
        _, cache = bridge.run_with_cache(tokens.to(device), names_filter=names, return_cache_object=False,
                                         stop_at_layer=max(layers) + 1)
        last = torch.tensor(lengths[chunk] - 1, device=device)
        for layer, name in zip(layers, names):
            parts[layer].append(cache[name][torch.arange(len(chunk), device=device), last].float().cpu().numpy())
    inverse = np.argsort(order, kind="stable")
    for layer in layers:
        out[layer] = np.concatenate(parts[layer])[inverse]
    return out


def extra_texts(cc, tokenizer) -> list[list[int]]:
    """Token ids of the extra capture texts (a file or dataset column), each cut to max_text_tokens."""
    if not (cc.text_path or cc.text_dataset):
        return []
    texts = load_prompts(cc.text_path, dataset=cc.text_dataset, column=cc.text_column, limit=cc.max_texts)
    ids = [tokenizer(t, truncation=True, max_length=cc.max_text_tokens)["input_ids"] for t in texts]
    return [list(i) for i in ids if len(i) >= 2]
