"""The small convolutional networks of the mini world (docs/models.md).

- ``FaceRecognizer`` (phi): aligned face crop -> identity embedding; two architectures (``plain``, ``resnet``).
- ``FaceDetector``: full 32x32 image -> face box (cx, cy, s), so generated images can be aligned like renders.
- ``AttributeProbe``: full image -> logits for every prompt attribute; its penultimate features are the CLIP-I analog.
- ``ImageFeatureEncoder``: the EVA-CLIP analog; frozen in PuLID, exposes multi-scale hidden states.

All take images as float tensors in [-1, 1], shape (B, 3, H, W). Each is rebuilt from a plain config dict
stored in the checkpoint manifest (``build``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.vocab import ATTRIBUTES

FACE_CROP = 32  # recognizers see a 32x32 aligned crop (inside the ONNX graph: 112 -> 32)


def _conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _spatial_head(cin, dim, squeeze=64):
    """4x4 map -> vector, keeping where things are (eye spacing is spatial): 1x1 squeeze, flatten, linear."""
    return nn.Sequential(nn.Conv2d(cin, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(squeeze * 16, dim))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class Backbone(nn.Module):
    """A stack of stages, each halving the resolution after the first; returns every stage's hidden state."""

    def __init__(self, widths=(32, 64, 128, 256), arch: str = "plain"):
        super().__init__()
        if arch not in ("plain", "resnet"):
            raise ValueError(f"unknown backbone arch {arch!r}; use 'plain' or 'resnet'")
        self.stem = _conv_bn(3, widths[0] // 2)
        stages, cin = [], widths[0] // 2
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            if i == 0:  # full resolution is the costly level: one conv there
                stages.append(_conv_bn(cin, w) if arch == "plain" else ResBlock(cin, w, 1))
            elif arch == "plain":
                stages.append(nn.Sequential(_conv_bn(cin, w, stride), _conv_bn(w, w)))
            else:
                stages.append(ResBlock(cin, w, stride))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_dim = widths[-1]

    def forward(self, x) -> list[torch.Tensor]:
        h = self.stem(x)
        hidden = []
        for stage in self.stages:
            h = stage(h)
            hidden.append(h)  # (B, C_i, 32 / 2^i, 32 / 2^i)
        return hidden


class FaceRecognizer(nn.Module):
    """phi: aligned face crop (B, 3, H, W) in [-1, 1] -> embedding (B, dim). Resizes to 32x32 inside."""

    def __init__(self, widths=(32, 64, 128, 256), arch="plain", dim=128):
        super().__init__()
        self.backbone = Backbone(widths, arch)
        self.head = nn.Sequential(_spatial_head(self.backbone.out_dim, dim), nn.BatchNorm1d(dim))
        self.dim = dim

    def forward(self, crops):
        if crops.shape[-1] != FACE_CROP or crops.shape[-2] != FACE_CROP:
            crops = F.interpolate(crops, size=(FACE_CROP, FACE_CROP), mode="bilinear", align_corners=False)
        return self.head(self.backbone(crops)[-1])  # last stage is 4x4


class ArcFaceHead(nn.Module):
    """Additive angular margin: logits = s * cos(theta + m) for the true class, s * cos(theta) otherwise."""

    def __init__(self, dim, n_classes, scale=30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, emb, target, margin: float):
        cos = F.linear(F.normalize(emb), F.normalize(self.weight)).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(cos.gather(1, target[:, None]))
        # cos(theta + m), kept monotonic past pi - m as in insightface's "easy margin" fallback
        target_logit = torch.where(theta + margin < math.pi, torch.cos(theta + margin), cos.gather(1, target[:, None]) - margin * math.sin(margin))
        logits = cos.scatter(1, target[:, None], target_logit)
        return self.scale * logits


class FaceDetector(nn.Module):
    """Full image (B, 3, 32, 32) -> face box (B, 3) = centre x, centre y, half-height s, in pixels."""

    def __init__(self, widths=(16, 32, 64, 128), arch="plain"):
        super().__init__()
        self.backbone = Backbone(widths, arch)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(self.backbone.out_dim * 16, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, images):
        raw = self.head(self.backbone(images)[-1])
        return torch.stack([16 + 8 * raw[:, 0], 17 + 4 * raw[:, 1], 7.5 + 2 * raw[:, 2]], 1)


class FacePresence(nn.Module):
    """Full image (B, 3, 32, 32) -> logit (B,) that it shows a face: the score a real detector gives its boxes."""

    def __init__(self, widths=(16, 32, 64, 128), arch="plain"):
        super().__init__()
        self.backbone = Backbone(widths, arch)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(self.backbone.out_dim * 16, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, images):
        return self.head(self.backbone(images)[-1]).squeeze(1)


class AttributeProbe(nn.Module):
    """Full image -> {attribute: logits}; ``features`` gives the penultimate (CLIP-I analog) features."""

    def __init__(self, widths=(32, 64, 128, 192), arch="resnet", dim=256):
        super().__init__()
        self.backbone = Backbone(widths, arch)
        self.neck = nn.Sequential(_spatial_head(self.backbone.out_dim, dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(dim, len(v)) for a, v in ATTRIBUTES.items()})

    def features(self, images):
        return self.neck(self.backbone(images)[-1])

    def forward(self, images):
        h = self.features(images)
        return {a: head(h) for a, head in self.heads.items()}


class ImageFeatureEncoder(nn.Module):
    """EVA-CLIP analog: trained on attributes *and* identity, so its hidden states carry both (how contamination enters)."""

    def __init__(self, widths=(32, 64, 128, 256), arch="resnet", dim=256):
        super().__init__()
        self.backbone = Backbone(widths, arch)
        self.neck = _spatial_head(self.backbone.out_dim, dim)
        self.heads = nn.ModuleDict({a: nn.Linear(dim, len(v)) for a, v in ATTRIBUTES.items()})
        self.widths = tuple(widths)
        self.dim = dim

    def hidden_states(self, images) -> list[torch.Tensor]:
        """Multi-scale hidden states [(B, C_i, 32/2^i, 32/2^i)] plus the global feature (B, dim, 1, 1) last."""
        hidden = self.backbone(images)
        return hidden + [self.neck(hidden[-1])[:, :, None, None]]

    def forward(self, images):
        g = self.neck(self.backbone(images)[-1])
        return g, {a: head(g) for a, head in self.heads.items()}


KINDS = {"recognizer": FaceRecognizer, "detector": FaceDetector, "face_presence": FacePresence, "probe": AttributeProbe,
         "image_encoder": ImageFeatureEncoder}


def build(kind: str, config: dict) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind](**config)
