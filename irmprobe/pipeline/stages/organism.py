"""The organism stage: which tuned model a branch analyses (given, null, or trained now with TRL)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from irmprobe.cache import write_json
from irmprobe.models.loading import fingerprint
from irmprobe.pipeline.stage import Stage, digest, read_result
from irmprobe.results import Record


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

    def key(self, config, ctx, input_keys):
        # A control is tuned from the base alone: the tuned model being judged is not part of what makes it, so
        # judging a second tuned model of the same base reuses the control and every stage after it.
        if ctx.branch.is_control and (config.pair.tuned is not None or ctx.branch.tuned is not None):
            config = replace(config, pair=replace(config.pair, tuned=ctx.branch.tuned))
        return super().key(config, ctx, input_keys)

    def fingerprint(self, cfg, ctx):
        return (fingerprint(cfg.pair.base), fingerprint(cfg.pair.tuned) if cfg.pair.tuned else None,
                ctx.train_reward.describe(), digest(ctx.train_prompts))

    def run(self, cfg, ctx, inputs, out):
        from irmprobe.organisms.tuning import make_organism

        pc = cfg.pair
        if pc.null:
            result = OrganismResult(pc.base, None, f"null:{pc.base}", "null organism (tuned = base)", {})
        elif pc.tuned is not None and not ctx.branch.is_control:
            result = OrganismResult(pc.base, pc.tuned, f"spec:{pc.tuned}:{fingerprint(pc.tuned)}", pc.tuned,
                                    {"note": "given; the RM it was tuned against is the one named in the config"})
        elif ctx.branch.tuned is not None:
            named = ctx.branch.tuned
            result = OrganismResult(pc.base, named, f"spec:{named}:{fingerprint(named)}", named,
                                    {"note": "a control named in compare.controls; its reward is not known here"})
        else:
            oc = cfg.organism
            pairs = None
            if ctx.branch.is_control and oc.method == "dpo" and oc.dpo_pairs:
                from irmprobe.organisms.tuning import load_preference_pairs
                from irmprobe.pipeline.control import rerank

                pairs = rerank(load_preference_pairs(oc.dpo_pairs), ctx.train_reward)  # ranked by the random reward
            org = make_organism(pc.base, ctx.train_reward, oc, ctx.train_prompts, seed=cfg.seed, preference_pairs=pairs,
                                device=ctx.runtime.device, trust_remote_code=pc.trust_remote_code, force=ctx.forced,
                                chat_template=ctx.chat_template, user_turns=ctx.resources.get("user_turns"))
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
        return OrganismResult.from_json(read_result(out)).replace(reused=True)

    def summary(self, result):
        rewards = [r.get("reward") for r in result.history if "reward" in r]
        kls = [r.get("kl") for r in result.history if "kl" in r]
        return result.source + (f"; reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f}" if rewards else "") + (
            f", KL {kls[-1]:.3f}" if kls else "")
