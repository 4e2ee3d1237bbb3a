"""PuLID's losses (docs/method.md); ``objective.pulid_objective`` weighs them into the total.

L = L_diff + L_align + lambda_id L_id, with L_align = lambda_sem L_align_sem + lambda_layout L_align_layout
over all cross-attention layers and all sampler steps: summed as the paper writes it (``reduction='sum'``), or
averaged over the (layer, step) pairs (``'mean'``, the mini world's trainer default; docs/method.md says why).
Q: (B, N_img, C) query features of a layer; K: (B, N_txt, C) projected text keys of the same layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import Capture
from .imaging import align_faces
from .metrics import cosine

LAMBDA_SEM, LAMBDA_LAYOUT, LAMBDA_ID = 0.6, 0.1, 1.0


def diffusion_loss(v_pred: torch.Tensor, v_target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_diff = || v_hat - v ||_2^2 (mean over pixels; v-prediction). ``weights`` (B, 1, H, W), mean 1 per image,
    make some pixels count more (e.g. the face box, whose fine structure carries the identity)."""
    if weights is None:
        return F.mse_loss(v_pred.float(), v_target.float())
    return ((v_pred.float() - v_target.float()) ** 2 * weights).mean()


def text_response(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(K Q^T / sqrt d) Q: attention with the text keys as queries and image features as keys and values.
    q (B, N_img, C), k (B, N_txt, C) -> (B, N_txt, C)."""
    return F.scaled_dot_product_attention(k[:, None], q[:, None], q[:, None])[:, 0]


def _pairs(cap_id: Capture, cap_plain: Capture):
    keys = cap_id.keys()
    if not keys:
        raise ValueError("no captured layers: run both paths with a Capture in cross_attention_kwargs")
    missing = [k for k in keys if k not in cap_plain.q]
    if missing:
        raise ValueError(f"the two paths captured different layers/steps, e.g. {missing[:2]}")
    return keys


REDUCTIONS = ("sum", "mean")


def _reduce(total: torch.Tensor, pairs: int, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return total if reduction == "sum" else total / pairs


def align_semantic_loss(cap_id: Capture, cap_plain: Capture, token_mask: torch.Tensor | None = None,
                        reduction: str = "sum") -> torch.Tensor:
    """L_align_sem = sum over layers and steps of || softmax(K Q_tid^T/sqrt d) Q_tid - softmax(K Q_t^T/sqrt d) Q_t ||_2
    (L2 norm over channels, mean over text tokens and batch). ``token_mask`` (B, N_txt) restricts to real tokens.
    ``reduction='mean'`` divides the sum by the number of (layer, step) pairs (a scale independent of depth)."""
    total, keys = 0.0, _pairs(cap_id, cap_plain)
    for key in keys:
        k = cap_id.k[key]
        diff = text_response(cap_id.q[key], k) - text_response(cap_plain.q[key], cap_plain.k[key])
        norms = torch.linalg.vector_norm(diff.float(), dim=-1)  # (B, N_txt)
        total = total + (norms[token_mask].mean() if token_mask is not None else norms.mean())
    return _reduce(total, len(keys), reduction)


def align_layout_loss(cap_id: Capture, cap_plain: Capture, reduction: str = "sum") -> torch.Tensor:
    """L_align_layout = sum over layers and steps of || Q_tid - Q_t ||_2 (L2 over channels, mean over positions);
    ``reduction='mean'``: divided by the number of (layer, step) pairs."""
    total, keys = 0.0, _pairs(cap_id, cap_plain)
    for key in keys:
        total = total + torch.linalg.vector_norm((cap_id.q[key] - cap_plain.q[key]).float(), dim=-1).mean()
    return _reduce(total, len(keys), reduction)


def align_loss(cap_id: Capture, cap_plain: Capture, lambda_sem: float = LAMBDA_SEM, lambda_layout: float = LAMBDA_LAYOUT,
               token_mask: torch.Tensor | None = None, reduction: str = "sum") -> tuple[torch.Tensor, dict[str, float]]:
    """L_align = lambda_sem L_align_sem + lambda_layout L_align_layout; also returns both terms as floats."""
    sem = align_semantic_loss(cap_id, cap_plain, token_mask, reduction) if lambda_sem else torch.zeros(())
    lay = align_layout_loss(cap_id, cap_plain, reduction) if lambda_layout else torch.zeros(())
    return lambda_sem * sem + lambda_layout * lay, {"align_sem": float(sem.detach()), "align_layout": float(lay.detach())}


def id_loss(phi, reference_embedding: torch.Tensor, images: torch.Tensor, detector=None) -> torch.Tensor:
    """L_id = 1 - CosSim(phi(C_id), phi(x0)), mean over the batch: ``images`` (B, 3, H, W) are embedded by the
    frozen, differentiable recognizer ``phi``; ``reference_embedding`` (B, D) is fixed. With a ``detector`` the
    images are first aligned on its face boxes (no gradient through the box), as the mini world does."""
    if detector is not None:
        with torch.no_grad():
            boxes = detector(images.float())
        images = align_faces(images.float(), boxes)
    return (1 - cosine(reference_embedding.detach(), phi(images))).mean()
