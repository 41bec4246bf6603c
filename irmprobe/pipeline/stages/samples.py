"""The samples stage: held-out continuations of both models."""

from __future__ import annotations

from dataclasses import asdict

from irmprobe.activations.samples import Samples, sample_both
from irmprobe.models.loading import fingerprint
from irmprobe.pipeline.stage import Stage, digest


class SamplesStage(Stage):
    name, version = "samples", 3
    reads = ("samples", "pair.dtype", "seed")
    needs = ("organism",)

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe(), digest(ctx.heldout)

    def run(self, cfg, ctx, inputs, out):
        organism, rt = inputs["organism"], ctx.runtime
        # The base model's continuations are the same in every branch: sampled once per run.
        base_key = (fingerprint(organism.base), rt.device, rt.dtype, digest(ctx.heldout), digest(asdict(cfg.samples)),
                    cfg.seed)
        samples = sample_both(ctx.pair_of(organism), ctx.heldout, ctx.rm, cfg.samples, seed=cfg.seed,
                              base_memo=ctx.resources, base_key=base_key)
        samples.save(out / "samples.json")
        return samples

    def load(self, cfg, ctx, inputs, out):
        return Samples.load(out / "samples.json")

    def summary(self, result):
        return f"{len(result.token_ids)} continuations of {len(result.prompts)} held-out prompts"
