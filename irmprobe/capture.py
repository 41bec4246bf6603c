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

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from irmprobe.cache import sha256_file, write_json
from irmprobe.pairs import ModelPair, input_device, offload_targets


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


def is_bridged(model) -> bool:
    """True when a TransformerBridge has rewired this model's modules in place (see ``sample_continuations``)."""
    return any(type(m).__module__.startswith("transformer_lens.model_bridge") for m in model.modules())


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
                         "sample before capture, or from a fresh copy (irmprobe.pairs.load_model)")
    device = input_device(model)  # a model split by a device_map takes its ids where its embeddings run
    jobs = [i for i in range(len(prompts)) for _ in range(n_per_prompt)]
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
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
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", leave=False):
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
        from irmprobe.features import activation_batches

        return activation_batches(self.acts[key], batch_size, seed)


# ---------------------------------------------------------------------------------------------
# The paired activation store: shards of whole sequences, a manifest, a checksum per shard.

_MANIFEST = "manifest.json"




def _write_manifest(directory: Path, manifest: dict) -> None:
    write_json(directory / _MANIFEST, manifest)


def _read_manifest(path: Path, header: dict) -> dict:
    """The manifest at ``path`` if it describes the capture ``header`` describes, else a fresh one."""
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if {k: manifest.get(k) for k in header} != header:
        manifest = header | {"shards": {}, "complete": False}  # a different capture: start over
    return manifest


def _rank_manifests(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("manifest.rank-*.json"))


def capture_to_store(
    pair: ModelPair,
    token_ids,
    layers: tuple[int, ...],
    directory: Path,
    *,
    hook: str = "hook_mlp_out",
    batch_size: int = 32,
    shard_sequences: int = 128,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Capture ``token_ids`` into a sharded store at ``directory``, resuming a partial one.

    Each shard holds whole sequences ``[i * shard_sequences, (i + 1) * shard_sequences)`` and is
    written to a temporary file, renamed, checksummed and only then entered in the manifest, so
    an interrupted capture resumes at the first missing shard and no row is lost or duplicated.
    Every token is forwarded once per model.

    With ``world_size > 1`` this process is one of several writing the same store: it captures the
    shards ``rank, rank + world_size, ...``, records them in its own ``manifest.rank-<rank>.json`` and
    leaves the store incomplete. Once every rank has returned, one single-process call (``rank=0,
    world_size=1``) merges: it takes every rank's shards as done, captures any a failed rank left, and
    writes the one manifest (``irmprobe.parallel`` does this after a barrier).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(token_ids)
    n_shards = max(1, -(-n // shard_sequences))
    header = _store_header(pair, token_ids, layers, hook, shard_sequences)
    manifest = _read_manifest(directory / _MANIFEST, header)
    target = directory / (_MANIFEST if world_size == 1 else f"manifest.rank-{rank:05d}.json")
    own = manifest if world_size == 1 else _read_manifest(target, header)
    # Shards a previous run finished (under any rank count) are kept.
    done = dict(manifest["shards"])
    for part in _rank_manifests(directory):
        done |= _read_manifest(part, header)["shards"]
    for shard in tqdm(range(rank, n_shards, world_size), desc="capture shards", leave=False):
        name = f"shard-{shard:05d}.safetensors"
        if name in done and (directory / name).is_file():
            own["shards"][name] = done[name]
            continue
        lo, hi = shard * shard_sequences, min(n, (shard + 1) * shard_sequences)
        cap = capture_pair(pair, list(token_ids[lo:hi]), layers, hook=hook, batch_size=batch_size)
        arrays = cap.arrays() | {"seq_index": cap.seq_index + lo}
        tmp = directory / f".{name}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        os.replace(tmp, directory / name)
        own["shards"][name] = {"sequences": [lo, hi], "rows": int(len(cap.token_ids)),
                               "sha256": sha256_file(directory / name)}
        write_json(target, own)
    if world_size > 1:
        write_json(target, own)  # this rank's share is done (possibly none)
        return directory
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    manifest["complete"] = True
    manifest["rows"] = sum(v["rows"] for v in manifest["shards"].values())
    _write_manifest(directory, manifest)
    for part in _rank_manifests(directory):  # merged into the one manifest
        part.unlink()
    return directory


def _store_header(pair: ModelPair, token_ids, layers, hook: str, shard_sequences: int) -> dict:
    """What identifies a capture: its models, hook points, layers and token stream."""
    return {"version": 2, "models": {"base": pair.base_spec, "tuned": pair.tuned_spec}, "hook": hook,
            "hooks": [f"blocks.{l}.{hook}" for l in layers], "layers": list(layers), "dtype": "float32",
            "d_model": pair.d_model, "n_sequences": len(token_ids), "shard_sequences": shard_sequences,
            "tokens_sha256": hashlib.sha256(json.dumps([list(t) for t in token_ids]).encode()).hexdigest()}


def store_complete(directory: Path) -> bool:
    path = Path(directory) / _MANIFEST
    return path.is_file() and bool(json.loads(path.read_text()).get("complete"))


def load_store(directory: Path, *, verify: bool = True) -> Capture:
    """Read a store back into one :class:`Capture`, checking every shard's checksum.

    Raises:
        ValueError: the store is incomplete, or a shard is missing or corrupted.
    """
    directory = Path(directory)
    if not store_complete(directory):
        raise ValueError(f"activation store {directory} is incomplete: run the capture again to finish it")
    manifest = json.loads((directory / _MANIFEST).read_text())
    parts = []
    for name in sorted(manifest["shards"]):
        entry, path = manifest["shards"][name], directory / name
        if not path.is_file():
            raise ValueError(f"activation store {directory}: shard {name} is missing; run the capture again")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"activation store {directory}: shard {name} is corrupted (checksum mismatch); "
                             "delete it and run the capture again to recompute it")
        parts.append(load_file(str(path)))
    # Per-row arrays are concatenated over shards; full-vocabulary sums are added.
    arrays = {k: np.sum([p[k] for p in parts], axis=0) if k.startswith("vocab_logp_sum.")
              else np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Capture.from_arrays(manifest["layers"], manifest["hook"], arrays)


def _right_padded(token_ids, chunk: np.ndarray, lengths: np.ndarray, pad: int) -> torch.Tensor:
    """The sequences ``chunk`` of ``token_ids`` as one [batch, longest] tensor, right-padded with ``pad``."""
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


_HOOK_MODULES = {"hook_mlp_out": r"\.mlp", "hook_attn_out": r"\.(self_attn|attn|attention)", "hook_resid_post": ""}
"""The Hugging Face submodule whose output is each TransformerLens hook point of a block."""


def hook_module(model, name: str):
    """The module of a plain Hugging Face model whose (first) output is the hook point ``blocks.{l}.<hook>``.

    Raises:
        ValueError: a hook point other than ``hook_mlp_out``, ``hook_attn_out`` or ``hook_resid_post``, or a
            model whose blocks are not named ``layers.N``, ``h.N`` or ``blocks.N``.
    """
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", name)
    if not match or match.group(2) not in _HOOK_MODULES:
        raise ValueError(f"hook point {name!r}: without a TransformerLens bridge only blocks.N.{{"
                         f"{', '.join(_HOOK_MODULES)}}} can be captured")
    pattern = re.compile(rf"(^|\.)(layers|h|blocks)\.{match.group(1)}{_HOOK_MODULES[match.group(2)]}$")
    for module_name, module in model.named_modules():
        if pattern.search(module_name):
            return module
    raise ValueError(f"no module for {name} in {type(model).__name__}: its blocks must be named layers.N, h.N "
                     "or blocks.N")


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
    names = [f"blocks.{l}.{hook}" for l in layers]
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
    acts = {f"{k}.{l}": [] for k in models for l in layers}
    for start in tqdm(range(0, len(order), batch_size), desc="capture", leave=False):
        chunk = order[start : start + batch_size]
        tokens = _right_padded(token_ids, chunk, lengths, pad)
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
    names = [f"blocks.{l}.{hook}" for l in layers]
    device = next(bridge.parameters()).device
    pad = bridge.tokenizer.pad_token_id if bridge.tokenizer.pad_token_id is not None else 0
    lengths = np.array([len(t) for t in token_ids])
    out = {l: np.zeros((len(token_ids), 0), np.float32) for l in layers}
    parts: dict[int, list] = {l: [] for l in layers}
    order = np.argsort(-lengths, kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc="last-token activations", leave=False):
        chunk = order[start : start + batch_size]
        tokens = _right_padded(token_ids, chunk, lengths, pad)
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
