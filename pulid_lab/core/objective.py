"""The total PuLID objective, assembled in one place for every trainer (mini world and real tier).

L = L_diff + lambda_id L_id + lambda_sem L_align_sem + lambda_layout L_align_layout
"""
from __future__ import annotations

import torch

from .losses import LAMBDA_ID, LAMBDA_LAYOUT, LAMBDA_SEM


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; the trainer stops and keeps the last finite weights."""


def pulid_objective(terms: dict[str, torch.Tensor], lambda_id: float = LAMBDA_ID, lambda_sem: float = LAMBDA_SEM,
                    lambda_layout: float = LAMBDA_LAYOUT) -> dict[str, torch.Tensor]:
    """``terms`` holds any of ``diff``, ``id``, ``align_sem``, ``align_layout`` (tensors or floats; an absent term
    counts 0); returns the same terms plus ``total``, the weighted sum."""
    unknown = set(terms) - {"diff", "id", "align_sem", "align_layout"}
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; expected diff, id, align_sem, align_layout")
    total = (terms.get("diff", 0.0) + lambda_id * terms.get("id", 0.0)  # L = L_diff + lambda_id L_id
             + lambda_sem * terms.get("align_sem", 0.0) + lambda_layout * terms.get("align_layout", 0.0))  # + L_align
    return {**terms, "total": total}
