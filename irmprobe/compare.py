"""Compare an IRM's token -> value map with the RM's: rank and sign agreement, paired by token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def paired(irm_map: dict[int, float], rm_map: dict[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids present in both maps, with the IRM's and the RM's value for each, in id order."""
    ids = np.array(sorted(set(irm_map) & set(rm_map)), dtype=np.int64)
    return ids, np.array([irm_map[i] for i in ids], dtype=np.float64), np.array([rm_map[i] for i in ids], dtype=np.float64)


def kendall_tau(irm_values: np.ndarray, rm_values: np.ndarray) -> tuple[float, float]:
    """Kendall tau-b and its two-sided p-value between values paired by token (SciPy)."""
    if len(irm_values) != len(rm_values):
        raise ValueError("kendall_tau needs values paired by token: the two arrays differ in length")
    if len(irm_values) < 2:
        raise ValueError("kendall_tau needs at least two tokens")
    res = stats.kendalltau(irm_values, rm_values)
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class Agreement:
    """How one IRM view agrees with the RM on the tokens both value."""

    name: str
    """Which IRM view."""
    n_tokens: int
    """Lexicon tokens compared."""
    is_zero: bool
    """The IRM is identically zero: no implicit reward was learned, so no tau is reported."""
    tau: float | None = None
    p_value: float | None = None
    sign_acc_pos: float | None = None
    """Fraction of RM-positive tokens the IRM values above its neutral point."""
    sign_acc_neg: float | None = None
    """Fraction of RM-negative tokens the IRM values below its neutral point."""
    n_pos: int = 0
    n_neg: int = 0
    neutral_point: float | None = None
    """The IRM's zero: the median value over every token in its map (implicit rewards are
    defined up to a constant)."""
    note: str | None = None
    """Why no figure could be computed, when none was."""


def agreement(name: str, irm_map: dict[int, float], rm_map: dict[int, float]) -> Agreement:
    """Kendall tau (paired by token) and sign accuracy of ``irm_map`` against ``rm_map``."""
    ids, irm, rm = paired(irm_map, rm_map)
    all_values = np.array(list(irm_map.values()), dtype=np.float64)
    if len(all_values) == 0 or np.all(all_values == 0):
        return Agreement(name, len(ids), True)
    if len(ids) < 2:
        return Agreement(name, len(ids), False, note=(
            f"only {len(ids)} RM token(s) occur in the captured text: capture more text or lower "
            "irm.min_token_count"))
    center = float(np.median(all_values))
    tau, p = kendall_tau(irm, rm)
    pos, neg = rm > 0, rm < 0
    return Agreement(
        name, len(ids), False, tau, p,
        float(np.mean(irm[pos] > center)) if pos.any() else None,
        float(np.mean(irm[neg] < center)) if neg.any() else None,
        int(pos.sum()), int(neg.sum()), center,
    )
