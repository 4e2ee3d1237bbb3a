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


def impostor_scores(embeddings: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of embeddings (N, D) whose identities differ (each pair once)."""
    e = F.normalize(embeddings.float(), dim=-1)
    sims = (e @ e.T).cpu().numpy()
    ids = np.asarray(ids)
    upper = np.triu(np.ones(sims.shape, bool), k=1) & (ids[:, None] != ids[None, :])
    if not upper.any():
        raise ValueError("impostor pairs need embeddings of at least two different identities")
    return sims[upper]


def threshold_at_far(impostor: np.ndarray, far: float = 0.01) -> float:
    """The similarity threshold at which a fraction ``far`` of impostor pairs is accepted (score >= threshold):
    a face is *recognised* as a reference when its similarity reaches it."""
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    return float(np.quantile(np.asarray(impostor, np.float64), 1 - far))


def bootstrap_interval(values: np.ndarray, groups: np.ndarray, n: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap interval of the mean of ``values`` (S, N) — S training seeds x N
    test rows — resampling seeds and test identities (``groups`` (N,): the identity of each row) independently.

    Rows of one identity move together, so a paired difference (row-wise A - B on the same test rows) gets the
    interval of a paired bootstrap over identities; with one seed only identities are resampled."""
    v = np.atleast_2d(np.asarray(values, np.float64))
    groups = np.asarray(groups)
    if v.shape[1] != len(groups):
        raise ValueError(f"values have {v.shape[1]} rows per seed but groups has {len(groups)}")
    uniq, inverse = np.unique(groups, return_inverse=True)
    per_group = np.stack([np.bincount(inverse, weights=row, minlength=len(uniq)) / np.bincount(inverse) for row in v])
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(len(v), size=(n, len(v)))
    g_idx = rng.integers(len(uniq), size=(n, len(uniq)))
    stats = per_group[s_idx[:, :, None], g_idx[:, None, :]].mean(axis=(1, 2))  # (n,)
    alpha = (1 - level) / 2
    return float(per_group.mean()), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
