"""Conclusions computed from the numbers: a sentence that states a direction only when its interval does.

    from pulid_lab.lessons.verdict import compare
    v = compare(lab.evaluate(lightning)[1.0], lab.evaluate(naive)[1.0], "Lightning", "naive", label="Face Sim")
    print(v)  # "Lightning beats naive in Face Sim by 0.031 (95% CI +0.012 to +0.050)"

``compare`` takes two ``evaluate`` results on the *same* test rows (their per-row values), pairs them row by
row and bootstraps the mean difference over identities (``core.metrics.bootstrap_interval``). The sentence says
"beats" only when the whole interval lies on one side of zero, "no measurable difference" otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.metrics import bootstrap_interval


@dataclass
class Verdict:
    a: str
    b: str
    metric: str
    mean: float  # mean of a - weight * b over the rows
    low: float
    high: float
    weight: float = 1.0
    level: float = 0.95

    @property
    def direction(self) -> int:
        """+1: a above (weight x) b on the whole interval; -1: below; 0: the interval contains zero."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def __str__(self) -> str:
        ci = f"{self.level:.0%} CI {self.low:+.3f} to {self.high:+.3f}"
        b = f"{self.weight:g} x {self.b}" if self.weight != 1 else self.b
        if self.direction > 0:
            return f"{self.a} beats {b} in {self.metric} by {self.mean:.3f} ({ci})"
        if self.direction < 0:
            return f"{self.a} falls below {b} in {self.metric} by {-self.mean:.3f} ({ci})"
        return f"no measurable difference between {self.a} and {b} in {self.metric} ({self.mean:+.3f}, {ci})"


def _column(result, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, identity of each row) of an ``evaluate`` result (``report[1.0]``) or of its ``rows``."""
    rows = result.get("rows", result)
    if metric not in rows or "ids" not in rows:
        raise ValueError(f"expected an evaluate() result or its 'rows' with {metric!r} and 'ids'; got keys {sorted(rows)}")
    return np.asarray(rows[metric], np.float64), np.asarray(rows["ids"])


def compare(result_a, result_b, a: str, b: str, metric: str = "face_sim", label: str | None = None,
            weight: float = 1.0, level: float = 0.95) -> Verdict:
    """``a`` against ``weight`` x ``b`` in ``metric`` on the same test rows (two ``evaluate`` results at one scale,
    e.g. ``report[1.0]``). Rows that are NaN in either (no prompt attribute to score) are left out."""
    va, ids_a = _column(result_a, metric)
    vb, ids_b = _column(result_b, metric)
    if len(va) != len(vb) or not np.array_equal(ids_a, ids_b):
        raise ValueError(f"{a} and {b} were not evaluated on the same rows ({len(va)} vs {len(vb)}); compare "
                         f"results of one test set")
    keep = np.isfinite(va) & np.isfinite(vb)
    if not keep.any():
        raise ValueError(f"no row has a finite {metric} for both {a} and {b}")
    mean, low, high = bootstrap_interval((va - weight * vb)[keep][None], ids_a[keep], level=level)
    return Verdict(a, b, label or metric.replace("_", " "), mean, low, high, weight, level)

