"""The depth stage: from which block the tuning's effect on the written token is readable (out-of-fold R^2 of the
log-ratio, per block, from the residual stream's change through the direct path and by the logit lens)."""

from __future__ import annotations

import json
import time

import numpy as np

from irmprobe.cache import write_json
from irmprobe.pipeline.stage import Stage


class DepthStage(Stage):
    """Per block: how much of r_t the residual stream's change explains (see :mod:`irmprobe.analysis.depth`)."""

    name, version = "depth", 1
    reads = ("depth", "seed")
    needs = ("organism", "samples")

    def skips(self, cfg, ctx, inputs):
        if not cfg.depth.enabled:
            return "depth.enabled is off"
        if inputs["organism"].tuned is None:
            return "the null organism has no log-ratio to read"
        return None

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.activations.patching import plain_models
        from irmprobe.activations.readout import readout_rows
        from irmprobe.activations.samples import prompt_halves
        from irmprobe.analysis.depth import depth_profile
        from irmprobe.models.loading import final_norm

        dc, samples = cfg.depth, inputs["samples"]
        reason = self.skips(cfg, ctx, inputs)
        if reason is not None:
            result = {"skipped": reason}
        else:
            started = time.perf_counter()
            runtime, pair = ctx.runtime, ctx.pair_of(inputs["organism"])
            halves = prompt_halves(samples, dc.n_prompts, cfg.seed)
            seqs = np.flatnonzero(np.isin(samples.prompt_index, np.concatenate(halves)))
            base, tuned = plain_models(pair, device=runtime.device, dtype=runtime.dtype,
                                       trust_remote_code=runtime.trust_remote_code, device_map=runtime.device_map,
                                       max_memory=runtime.max_memory)
            lens, note = dc.lens, None
            if lens and (final_norm(base) is None or final_norm(tuned) is None):
                lens, note = False, "no logit lens: this architecture's final norm is not known (direct path only)"
                ctx.echo(f"depth: {note}")
            ctx.echo(f"depth: {len(seqs)} continuations of {len(halves[0]) + len(halves[1])} held-out prompts, "
                     f"{int(tuned.config.num_hidden_layers)} blocks" + (", with the logit lens" if lens else ""))
            rows = readout_rows(base, tuned, [samples.token_ids[i] for i in seqs], samples.prompt_lens[seqs],
                                batch_size=dc.batch_size, lens=lens,
                                pad_id=pair.tokenizer.pad_token_id or 0)
            units = samples.prompt_index[seqs][rows["sequence"]]
            folds = tuple(np.flatnonzero(np.isin(units, half)) for half in halves)
            result = depth_profile(rows, units, folds, seed=cfg.seed) | {
                "n_layers": int(tuned.config.num_hidden_layers), "seconds": time.perf_counter() - started,
                **({"note": note} if note else {})}
        write_json(out / "depth.json", result)
        return result

    def load(self, cfg, ctx, inputs, out):
        return json.loads((out / "depth.json").read_text())

    def summary(self, result):
        if "skipped" in result:
            return f"skipped ({result['skipped']})"
        parts = []
        for reading in ("direct", "lens"):
            if reading in result:
                first = result[reading]["first_reaching"]
                last = result[reading]["r2"][-1]
                parts.append(f"{reading} R^2 reaches {result['target']:g} "
                             + (f"from block {first}" if first is not None else "at no block")
                             + f" (last block {'undefined' if last is None else format(last, '+.2f')})")
        return f"{result['n_rows']} rows of {result['n_prompts']} prompts; " + "; ".join(parts)
