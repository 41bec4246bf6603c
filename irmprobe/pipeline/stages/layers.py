"""The layers stage: the blocks to capture, by patching effect or weight divergence."""

from __future__ import annotations

from dataclasses import dataclass, replace

from irmprobe.cache import write_json
from irmprobe.models.divergence import layer_divergence
from irmprobe.pipeline.stage import Stage, read_result
from irmprobe.results import Record


@dataclass(frozen=True)
class LayersResult(Record):
    """Blocks ranked by how much the tuning changed them, or by the effect of patching them; the chosen ones are
    captured."""

    chosen: list[int]
    ranked_by: str
    per_block: list[float]
    relative: list[float]
    per_submodule: dict
    relative_submodule: dict
    table: list[str]
    patching: dict | None = None
    """With ``rank_layers_by: patching``: the patching and weight rankings, each block's share of KL(tuned || base)
    and of the mean log-ratio removed by patching it (per hook kind), and the cumulative curve of the top
    1 .. k+2 blocks (see :func:`irmprobe.activations.patching.layer_choice`)."""


class LayersStage(Stage):
    name, version = "layers", 3
    reads = ("capture.top_k_layers", "capture.rank_layers_by", "capture.patching_sequences", "capture.patching_kind",
             "pair.dtype")
    optional_reads = ("sae.pretrained",)
    needs = ("organism", "samples")
    measured_only_differs = True
    # A measured-only control chooses no block, whatever these say.
    measured_only_ignores = ("capture.top_k_layers", "capture.rank_layers_by", "capture.patching_sequences",
                             "capture.patching_kind", "sae.pretrained")

    def run(self, cfg, ctx, inputs, out):
        cc = cfg.capture
        pair = ctx.pair_of(inputs["organism"])
        by_effect = cc.rank_layers_by == "patching" and not ctx.branch.measured_only
        # A measured-only control's key leaves rank_layers_by out (it chooses no block): its record uses one ranking.
        by = "absolute" if cc.rank_layers_by == "patching" or ctx.branch.measured_only else cc.rank_layers_by
        div = layer_divergence(pair, cc.top_k_layers, by=by)
        patching, head = None, []
        if ctx.branch.measured_only:  # no activations are captured: the weight table is kept as a record only
            div = replace(div, chosen=())
            head = ["a measured-only control (compare.control_views: measured): no block is captured"]
        if by_effect:
            from irmprobe.activations.patching import layer_choice, plain_models

            rt = ctx.runtime
            base, tuned = plain_models(pair, device=rt.device, dtype=rt.dtype, trust_remote_code=rt.trust_remote_code,
                                       device_map=rt.device_map, max_memory=rt.max_memory)
            weight_order = sorted(range(len(div.per_block)), key=lambda i: (-div.per_block[i], i))
            stream = list(inputs["samples"].token_ids)[: cc.patching_sequences]
            patching = layer_choice(base, tuned, stream, cc.top_k_layers, cc.patching_kind, weight_order)
            div = replace(div, chosen=tuple(patching["chosen"]), ranked_by="patching")
            head = patching["table"]
        # Released SAEs exist for some blocks only: the best-ranked of those.
        if cfg.sae.pretrained and not ctx.branch.measured_only:
            from irmprobe.saes.pretrained import blocks

            ranking = patching["ranking"] if patching else sorted(range(len(div.per_block)),
                                                                   key=lambda i: (-div.per_block[i], i))
            chosen = sorted([b for b in ranking if b in blocks(cfg.sae)][: cc.top_k_layers])
            div = replace(div, chosen=tuple(chosen))
            head = head + [f"chosen among the blocks with a released SAE ({blocks(cfg.sae)}): {chosen}"]
        result = LayersResult(list(div.chosen), div.ranked_by, list(div.per_block), list(div.relative),
                              {k: list(v) for k, v in div.per_submodule.items()},
                              {k: list(v) for k, v in div.relative_submodule.items()}, head + div.table(), patching)
        write_json(out / "result.json", result.to_json())
        return result

    def load(self, cfg, ctx, inputs, out):
        return LayersResult.from_json(read_result(out))

    def summary(self, result):
        if not result.chosen:
            return "no block chosen" + (f" ({result.table[0]})" if result.table else "")
        if result.patching:
            curve = result.patching["curve"]["kl_share"]
            k = len(result.chosen)
            share = curve[k - 1] if len(curve) >= k and curve[k - 1] is not None else float("nan")
            return f"blocks {result.chosen} (by patching {result.patching['kind']}: {share:+.2f} of KL removed)"
        return f"blocks {result.chosen} (by {result.ranked_by})"
