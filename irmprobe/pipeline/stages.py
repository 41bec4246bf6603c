"""The stages of the graph, in the order users see them. Each declares what it reads and needs;
the runner derives its key, reuses or runs it, and marks it complete."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from irmprobe.cache import write_json
from irmprobe.capture import Capture, Samples, capture_to_store, load_store
from irmprobe.pairs import ModelPair, fingerprint, layer_divergence, load_pair
from irmprobe.pipeline.stage import Context, Stage
from irmprobe.results import Record
from irmprobe.sampling import extra_texts, sample_both


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read(out: Path, name: str = "result.json") -> dict:
    return json.loads((out / name).read_text())


def pair_of(ctx: Context, organism: OrganismResult) -> ModelPair:
    """The (base, tuned) pair of an organism result, loaded once per run and shared by the stages."""
    key = ("pair", organism.base, organism.tuned)
    if key not in ctx.resources:
        rt = ctx.runtime
        ctx.resources[key] = load_pair(organism.base, organism.tuned, device=rt.device, dtype=rt.dtype,
                                       trust_remote_code=rt.trust_remote_code, device_map=rt.device_map,
                                       max_memory=rt.max_memory)
    return ctx.resources[key]


@dataclass(frozen=True)
class OrganismResult(Record):
    """Which tuned model the branch analyses, and how it was made."""

    base: str
    tuned: str | None
    """Tuned model spec; None for the null organism (tuned = base)."""
    tuned_id: str
    source: str
    reward: dict
    """What the tuned model was trained against (the RM, or a random reward for a control)."""
    settings: dict | None = None
    """The organism settings it was trained with (None when the tuned model was given)."""
    path: str | None = None
    reused: bool = False
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class OrganismStage(Stage):
    name, version = "organism", 4
    reads = ("pair.base", "pair.tuned", "pair.null", "pair.trust_remote_code", "organism", "prompts", "seed")

    def fingerprint(self, cfg, ctx):
        return (fingerprint(cfg.pair.base), fingerprint(cfg.pair.tuned) if cfg.pair.tuned else None,
                ctx.train_reward.describe(), _hash(ctx.train_prompts))

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.organisms import make_organism

        pc = cfg.pair
        if pc.null:
            result = OrganismResult(pc.base, None, f"null:{pc.base}", "null organism (tuned = base)", {})
        elif pc.tuned is not None and not ctx.branch.is_control:
            result = OrganismResult(pc.base, pc.tuned, f"spec:{pc.tuned}:{fingerprint(pc.tuned)}", pc.tuned,
                                    {"note": "given; the RM it was tuned against is the one named in the config"})
        else:
            oc = cfg.organism
            pairs = None
            if ctx.branch.is_control and oc.method == "dpo" and oc.dpo_pairs:
                from irmprobe.organisms import load_preference_pairs
                from irmprobe.pipeline.control import rerank

                pairs = rerank(load_preference_pairs(oc.dpo_pairs), ctx.train_reward)  # ranked by the random reward
            org = make_organism(pc.base, ctx.train_reward, oc, ctx.train_prompts, seed=cfg.seed, preference_pairs=pairs,
                                device=ctx.runtime.device, trust_remote_code=pc.trust_remote_code, force=ctx.forced)
            ctx.echo(f"{ctx.branch.name}: {'reusing the cached tuned model at' if org.reused else 'trained in '}"
                     + (f" {org.path}" if org.reused else f"{org.seconds:.0f} s, saved to {org.path}"))
            result = OrganismResult(pc.base, str(org.path), f"organism:{org.path.name}",
                                    f"{oc.method.upper()} organism {org.path.name} "
                                    f"({'reused from cache' if org.reused else 'trained now'})",
                                    ctx.train_reward.describe(), asdict(oc), str(org.path), org.reused, org.seconds,
                                    list(org.history))
        write_json(out / "result.json", result.to_json())
        return result

    def load(self, cfg, ctx, inputs, out):
        return OrganismResult.from_json(_read(out)).replace(reused=True)

    def summary(self, result):
        rewards = [r.get("reward") for r in result.history if "reward" in r]
        kls = [r.get("kl") for r in result.history if "kl" in r]
        return result.source + (f"; reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f}" if rewards else "") + (
            f", KL {kls[-1]:.3f}" if kls else "")


class SamplesStage(Stage):
    name, version = "samples", 3
    reads = ("samples", "pair.dtype", "seed")
    needs = ("organism",)

    def fingerprint(self, cfg, ctx):
        return ctx.rm.describe(), _hash(ctx.heldout)

    def run(self, cfg, ctx, inputs, out):
        organism, rt = inputs["organism"], ctx.runtime
        # The base model's continuations are the same in every branch: sampled once per run.
        base_key = (fingerprint(organism.base), rt.device, rt.dtype, _hash(ctx.heldout), _hash(asdict(cfg.samples)),
                    cfg.seed)
        samples = sample_both(pair_of(ctx, organism), ctx.heldout, ctx.rm, cfg.samples, seed=cfg.seed,
                              base_memo=ctx.resources, base_key=base_key)
        samples.save(out / "samples.json")
        return samples

    def load(self, cfg, ctx, inputs, out):
        return Samples.load(out / "samples.json")

    def summary(self, result):
        return f"{len(result.token_ids)} continuations of {len(result.prompts)} held-out prompts"


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
    1 .. k+2 blocks (see :func:`irmprobe.patching.layer_choice`)."""


class LayersStage(Stage):
    name, version = "layers", 3
    reads = ("capture.top_k_layers", "capture.rank_layers_by", "capture.patching_sequences", "capture.patching_kind",
             "pair.dtype")
    needs = ("organism", "samples")

    def run(self, cfg, ctx, inputs, out):
        cc = cfg.capture
        pair = pair_of(ctx, inputs["organism"])
        by_effect = cc.rank_layers_by == "patching"
        div = layer_divergence(pair, cc.top_k_layers, by="absolute" if by_effect else cc.rank_layers_by)
        patching, head = None, []
        if by_effect:
            from irmprobe.patching import layer_choice, plain_models

            rt = ctx.runtime
            base, tuned = plain_models(pair, device=rt.device, dtype=rt.dtype, trust_remote_code=rt.trust_remote_code,
                                       device_map=rt.device_map, max_memory=rt.max_memory)
            weight_order = sorted(range(len(div.per_block)), key=lambda i: (-div.per_block[i], i))
            stream = list(inputs["samples"].token_ids)[: cc.patching_sequences]
            patching = layer_choice(base, tuned, stream, cc.top_k_layers, cc.patching_kind, weight_order)
            div = replace(div, chosen=tuple(patching["chosen"]), ranked_by="patching")
            head = patching["table"]
        result = LayersResult(list(div.chosen), div.ranked_by, list(div.per_block), list(div.relative),
                              {k: list(v) for k, v in div.per_submodule.items()},
                              {k: list(v) for k, v in div.relative_submodule.items()}, head + div.table(), patching)
        write_json(out / "result.json", result.to_json())
        return result

    def load(self, cfg, ctx, inputs, out):
        return LayersResult.from_json(_read(out))

    def summary(self, result):
        if result.patching:
            curve = result.patching["curve"]["kl_share"]
            k = len(result.chosen)
            share = curve[k - 1] if len(curve) >= k and curve[k - 1] is not None else float("nan")
            return f"blocks {result.chosen} (by patching {result.patching['kind']}: {share:+.2f} of KL removed)"
        return f"blocks {result.chosen} (by {result.ranked_by})"


class CaptureStage(Stage):
    name, version, resumable = "capture", 5, True
    reads = ("capture.hook", "capture.batch_size", "capture.text_path", "capture.text_dataset", "capture.text_column",
             "capture.max_text_tokens", "capture.max_texts", "pair.dtype")
    needs = ("organism", "samples", "layers")

    def fingerprint(self, cfg, ctx):
        path = cfg.capture.text_path
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None

    def run(self, cfg, ctx, inputs, out):
        pair = pair_of(ctx, inputs["organism"])
        stream = list(inputs["samples"].token_ids) + extra_texts(cfg.capture, pair.tokenizer)
        capture_to_store(pair, stream, inputs["layers"].chosen, out, hook=cfg.capture.hook,
                         batch_size=cfg.capture.batch_size)
        return load_store(out)

    def load(self, cfg, ctx, inputs, out):
        return load_store(out)

    def summary(self, result: Capture):
        return f"{len(result.token_ids)} token rows at {', '.join(result.hook_name(l) for l in result.layers)}"


# The later stages' modules import this one (pair_of, the results above), so they come last.
from irmprobe.pipeline.analysis_stages import FitStage, SAEStage  # noqa: E402
from irmprobe.pipeline.compare_stage import CompareStage  # noqa: E402
from irmprobe.pipeline.discover_stage import DiscoverStage  # noqa: E402
from irmprobe.pipeline.validation_stages import AblateStage, InterpretStage, ReportStage  # noqa: E402

GRAPH: list[Stage] = [OrganismStage(), SamplesStage(), LayersStage(), CaptureStage(), SAEStage(), FitStage(),
                      CompareStage(), DiscoverStage(), InterpretStage(), AblateStage(), ReportStage()]
"""Every stage, in the order users see them. ``--force STAGE`` re-runs it and every stage that needs it."""

STAGES = tuple(s.name for s in GRAPH)
