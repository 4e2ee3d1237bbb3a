"""Measurements shared by check-models and evaluation (docs/metrics.md)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) embeddings."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def verification_pairs(ids: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j) of renders: half same identity (different renders), half different identities."""
    by_id: dict[int, np.ndarray] = {}
    for k, i in enumerate(ids):
        by_id.setdefault(int(i), []).append(k)
    groups = [np.array(v) for v in by_id.values() if len(v) >= 2]
    if not groups:
        raise ValueError("verification needs at least two renders of some identity")
    first, second, same = [], [], []
    for _ in range(n_pairs // 2):
        g = groups[rng.integers(len(groups))]
        i, j = rng.choice(g, 2, replace=False)
        first.append(i), second.append(j), same.append(True)
    while len(first) < n_pairs:
        i, j = rng.integers(len(ids), size=2)
        if ids[i] != ids[j]:
            first.append(i), second.append(j), same.append(False)
    return np.array(first), np.array(second), np.array(same)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold on similarity that maximises verification accuracy."""
    cands = np.unique(scores)
    accs = [((scores >= t) == same).mean() for t in cands]
    return float(cands[int(np.argmax(accs))])


def verification_accuracy(scores: np.ndarray, same: np.ndarray, rng: np.random.Generator) -> float:
    """Pair verification accuracy: threshold chosen on one random half of the pairs, accuracy on the other."""
    perm = rng.permutation(len(scores))
    fit, test = perm[: len(perm) // 2], perm[len(perm) // 2:]
    t = best_threshold(scores[fit], same[fit])
    return float(((scores[test] >= t) == same[test]).mean())


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of a verification score: (false accept rate, true accept rate, thresholds), thresholds descending.

    A pair is accepted when ``score >= threshold``. The curve starts at (0, 0) (threshold +inf) and ends at
    (1, 1); tied scores give one point (so the area counts a tie as half a correct ordering)."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError(f"scores and same must be 1-d arrays of one length, got {scores.shape} and {same.shape}")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise ValueError("a ROC curve needs both genuine (same) and impostor (different) pairs")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each group of tied scores
    tpr = np.r_[0.0, np.cumsum(y)[last] / n_same]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / n_diff]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a genuine pair scores above an impostor pair."""
    fpr, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
