"""Data-parallel capture: several processes (one GPU each) write the shards of one activation store.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``)::

    torchrun --nproc-per-node 4 -m irmprobe.parallel configs/default.yaml [--set section.field=value ...]

Rank 0 runs (or reuses) the stages before the capture; then every rank captures the shards ``rank, rank +
world_size, ...`` of the capture stage's store, and after a barrier rank 0 merges the ranks' manifests into
the store's one manifest and marks the stage complete. A later ``irmprobe run`` reuses that capture. The
process group uses gloo: it only carries barriers, never tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from irmprobe.activations.store import capture_to_store
from irmprobe.models.loading import ModelPair


def capture_distributed(
    pair: ModelPair,
    token_ids,
    layers: tuple[int, ...],
    directory: Path,
    *,
    hook: str = "hook_mlp_out",
    batch_size: int = 32,
    shard_sequences: int = 128,
) -> Path:
    """Capture into one store from every rank of the initialised process group; rank 0 merges.

    Every rank must call this with the same arguments (the same token stream, layers and directory on a
    file system they share). On return the store is complete on every rank.
    """
    if not dist.is_initialized():
        raise ValueError("capture_distributed needs an initialised torch.distributed process group "
                         "(run under torchrun, or call torch.distributed.init_process_group first)")
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = {"hook": hook, "batch_size": batch_size, "shard_sequences": shard_sequences}
    capture_to_store(pair, token_ids, layers, directory, rank=rank, world_size=world, **kwargs)
    dist.barrier()
    if rank == 0:  # every rank's shards are on disk: merge them (and capture any a rank left) into one manifest
        capture_to_store(pair, token_ids, layers, directory, **kwargs)
    dist.barrier()
    return Path(directory)


def _device_for_rank(device: str) -> str:
    """``cuda`` becomes this process's own GPU (``cuda:LOCAL_RANK``); other devices stay as they are."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else device


def main(argv: list[str] | None = None) -> int:
    """``python -m irmprobe.parallel CONFIG [--set section.field=value ...]`` on every rank."""
    from irmprobe.activations.capture import extra_texts
    from irmprobe.api import run
    from irmprobe.cli import apply_overrides
    from irmprobe.config import RunConfig
    from irmprobe.pipeline.runner import stage_dir

    parser = argparse.ArgumentParser(prog="python -m irmprobe.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    try:
        config = RunConfig.from_dict(apply_overrides(RunConfig.from_yaml(args.config).to_dict(), args.overrides))
    except (ValueError, TypeError, OSError) as exc:
        print(f"irmprobe.parallel: invalid config: {exc}", file=sys.stderr)
        return 2
    # pair.device is in no cache key up to the capture (the stages run here), so each rank may run on its own GPU.
    config = replace(config, pair=replace(config.pair, device=_device_for_rank(config.pair.device)))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    quiet = (lambda _: None) if rank else print
    try:
        if rank == 0:
            result = run(config, until="layers", echo=quiet)  # organism, samples, layers: once, before the others
        dist.barrier()
        if rank:
            result = run(config, until="layers", echo=quiet)  # reuses what rank 0 computed
        ctx, results = result.context, result.results
        runner = ctx.resources["runner"]
        stage = runner.graph["capture"]
        key = stage.key(config, ctx, [runner.key(need) for need in stage.needs])
        out = stage_dir("capture", key)
        pair = ctx.pair_of(results["organism"])
        stream = list(results["samples"].token_ids) + extra_texts(config.capture, pair.tokenizer)
        quiet(f"[capture] {dist.get_world_size()} ranks capture {len(stream)} sequences into {out}")
        capture_to_store(pair, stream, tuple(results["layers"].chosen), out, hook=config.capture.hook,
                         batch_size=config.capture.batch_size, rank=rank, world_size=dist.get_world_size())
        dist.barrier()
        if rank == 0:
            runner.ensure(ctx, "capture")  # merges the ranks' manifests, checks the store, marks the stage done
            print(f"capture complete in {out}; `irmprobe run {args.config}` reuses it")
        dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
