"""Image helpers of the core: tensor <-> uint8 conversion and differentiable face alignment."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


CROP_HALF = 1.2  # aligned crop: a square of half-size 1.2 s around the face
CROP_SHIFT = -0.05  # centred slightly above the face centre (hair)


def align_faces(images: torch.Tensor, boxes: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Differentiable aligned crops (B, 3, size, size) from images (B, 3, H, W) and boxes (B, 3) = (cx, cy, s) px."""
    b, _, h, w = images.shape
    boxes = boxes.to(images.dtype)
    cx, cy, s = boxes[:, 0], boxes[:, 1] + CROP_SHIFT * boxes[:, 2], boxes[:, 2]
    half = CROP_HALF * s
    zero = torch.zeros_like(cx)
    theta = torch.stack([torch.stack([2 * half / w, zero, 2 * cx / w - 1], 1),
                         torch.stack([zero, 2 * half / h, 2 * cy / h - 1], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
