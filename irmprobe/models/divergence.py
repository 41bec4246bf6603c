"""How far the tuning moved each block's weights (the paper's layer ranking)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from irmprobe.models.loading import ModelPair

SUBMODULES = ("attention", "mlp", "norm", "other")
"""Parts of a block that divergence is broken down into."""


@dataclass(frozen=True)
class LayerDivergence:
    """Per-block parameter divergence of a pair, broken down by submodule, and the chosen layers."""

    per_block: tuple[float, ...]
    """Sum over the block's parameters of the Frobenius norm of (tuned - base)."""
    relative: tuple[float, ...]
    """``per_block`` divided by the same sum of base parameter norms."""
    chosen: tuple[int, ...]
    """Indices of the top-k blocks, in ascending layer order."""
    per_submodule: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Submodule (attention, mlp, norm, other) -> per-block sum of Frobenius norms of (tuned - base)."""
    relative_submodule: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """The same, divided by the submodule's summed base norms."""
    ranked_by: str = "absolute"
    """Whether blocks were ranked by absolute or relative divergence."""

    def table(self) -> list[str]:
        """Printable per-block table: absolute and relative divergence, total and per submodule."""
        parts = [p for p in SUBMODULES if any(self.per_submodule.get(p, ()))]
        head = f"{'block':>5} {'|dθ|':>9} {'rel':>9} " + " ".join(f"{p + ' |dθ|':>14} {'rel':>9}" for p in parts)
        rows = [head]
        for i, (a, r) in enumerate(zip(self.per_block, self.relative)):
            cells = " ".join(f"{self.per_submodule[p][i]:>14.4f} {self.relative_submodule[p][i]:>9.2e}" for p in parts)
            mark = " *" if i in self.chosen else ""
            rows.append(f"{i:>5} {a:>9.4f} {r:>9.2e} {cells}{mark}")
        return rows


def _paired_parameters(pair: ModelPair):
    """``(name, base parameter, tuned parameter)`` in ``named_parameters`` order, module by module.

    Weights accelerate offloaded (on the meta device between calls) are loaded for the time their
    module is visited, so a pair larger than the devices is compared one module at a time.
    """
    from accelerate.utils import align_module_device

    tuned_modules = dict(pair.tuned.named_modules())
    listed = {name for name, _ in pair.base.named_parameters()}  # a tied weight is listed once, by its first name
    for prefix, base_module in pair.base.named_modules():
        names = [(f"{prefix}.{key}" if prefix else key, key) for key, _ in base_module.named_parameters(recurse=False)]
        names = [(name, key) for name, key in names if name in listed]
        if not names:
            continue
        tuned_module = tuned_modules[prefix]
        with align_module_device(base_module), (
                align_module_device(tuned_module) if tuned_module is not base_module else contextlib.nullcontext()):
            for name, key in names:
                yield name, getattr(base_module, key), getattr(tuned_module, key)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _submodule(name: str) -> str:
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered:
        return "mlp"
    if "norm" in lowered or ".ln" in lowered:
        return "norm"
    return "other"


def layer_divergence(pair: ModelPair, top_k: int, *, by: str = "absolute") -> LayerDivergence:
    """Rank blocks by how much tuning moved their float weights; keep the top ``top_k``.

    Weights are compared in float32 whatever their stored dtype. Ties (e.g. a null pair, where
    every block scores 0) are broken by layer index, so the choice is deterministic.

    Args:
        pair: the models to compare.
        top_k: how many blocks to keep.
        by: ``absolute`` (sum of Frobenius norms of the difference, the paper's criterion) or
            ``relative`` (that sum over the base weights' summed norms).
    """
    n = pair.n_layers
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must be between 1 and the number of layers ({n}), got {top_k}")
    if by not in ("absolute", "relative"):
        raise ValueError(f"by must be 'absolute' or 'relative', got {by!r}")
    diff = {p: [0.0] * n for p in SUBMODULES}
    norm = {p: [0.0] * n for p in SUBMODULES}
    with torch.no_grad():
        for name, p_base, p_tuned in _paired_parameters(pair):
            idx = _block_index(name)
            if idx is None:
                continue
            part = _submodule(name)
            delta = p_tuned.float().to(p_base.device) - p_base.float()
            diff[part][idx] += float(torch.linalg.norm(delta.flatten()))
            norm[part][idx] += float(torch.linalg.norm(p_base.float().flatten()))
    total = [sum(diff[p][i] for p in SUBMODULES) for i in range(n)]
    base_total = [sum(norm[p][i] for p in SUBMODULES) for i in range(n)]
    rel = [d / m if m > 0 else 0.0 for d, m in zip(total, base_total)]
    score = total if by == "absolute" else rel
    order = sorted(range(n), key=lambda i: (-score[i], i))
    return LayerDivergence(
        tuple(total), tuple(rel), tuple(sorted(order[:top_k])),
        {p: tuple(diff[p]) for p in SUBMODULES},
        {p: tuple(d / m if m > 0 else 0.0 for d, m in zip(diff[p], norm[p])) for p in SUBMODULES},
        by,
    )
