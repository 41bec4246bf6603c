"""The capture's disk store: shards written as they are captured (resumable, checksummed), read back as one
:class:`~irmprobe.activations.capture.Capture`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from irmprobe import progress
from irmprobe.activations.capture import Capture, capture_pair
from irmprobe.cache import sha256_file, write_json
from irmprobe.models.loading import ModelPair

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
    for shard in progress.bar(range(rank, n_shards, world_size), desc="capture shards", leave=False):
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
            "hooks": [f"blocks.{b}.{hook}" for b in layers], "layers": list(layers), "dtype": "float32",
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
