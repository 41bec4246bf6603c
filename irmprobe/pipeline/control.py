"""The matched controls: the same stage graph with a random reward in place of the RM.

Every per-organism stage runs again for each control branch with the same settings (organism
method, steps, learning rate, beta, batch, LoRA, prompts, seed), so the control differs from the
organism in its reward only; it gets its own samples, layers, capture, SAEs and fits (with
``compare.control_views: measured``, its samples and one forward of them through both models only: the
measured views, which are all the primary comparison and discovery read). Dictionary
diagnostics that no comparison reads (MMCS against a second dictionary size, the splice loss,
base-model SAEs when the IRM reads tuned features only) are skipped for controls. A control the user names
(``compare.controls``) is a given model: every stage after the organism runs on it the same way.
"""

from __future__ import annotations

from irmprobe.models.rewards import RandomRM
from irmprobe.pipeline.stage import Branch, Context


def control_branches(config, ctx: Context) -> list[Context]:
    """One context per control organism (none for the null pair or with ``compare.control`` off): the
    ``compare.n_controls`` built ones (``control-0`` ...), then the models named in ``compare.controls``."""
    if not config.compare.control or config.pair.null:
        return []
    n, light = config.compare.n_controls, config.compare.control_views == "measured"
    built = [Branch(f"control-{i}", RandomRM(config.seed + i), diagnostics=False, measured_only=light)
             for i in range(n)]
    named = [Branch(f"control-{n + j}", RandomRM(config.seed + n + j), diagnostics=False, tuned=str(path),
                    measured_only=light) for j, path in enumerate(config.compare.controls)]
    return [ctx.for_branch(b) for b in built + named]


def rerank(pairs: list[dict], reward) -> list[dict]:
    """Preference pairs re-ranked by ``reward`` (a DPO control's pairs: the random reward picks chosen)."""
    out = []
    for p in pairs:
        a, b = reward.score([p["chosen"], p["rejected"]])
        out.append(p if a >= b else {**p, "chosen": p["rejected"], "rejected": p["chosen"]})
    return out
