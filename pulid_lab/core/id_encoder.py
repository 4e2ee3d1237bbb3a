"""ID encoder: face-recognition embedding + multi-scale image features of the reference -> N ID tokens.

Two variants (docs/real_tier.md, "The official weights"):

- ``mlp`` (PuLID v1): ``n_global`` global tokens from an MLP over [phi_cond embedding ++ global image feature]
  (the 512 + 768 = 1280-d ID vector of the official code), plus one local token per image-feature scale.
- ``idformer`` (PuLID v1.1): a small Perceiver — learned queries cross-attend to the ID vector (as tokens)
  and to every spatial position of every feature scale.

``uncond(batch)`` is the unconditional path for classifier-free guidance: the encoder applied to zeros, as
the official code does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class IDEncoderConfig:
    kind: str = "mlp"  # mlp | idformer
    id_dim: int = 512  # phi_cond embedding width
    feature_channels: tuple[int, ...] = (32, 64, 128, 256, 256)  # image encoder hidden states, last = global
    token_dim: int = 128  # = the UNet's cross_attention_dim
    n_global: int = 5
    n_queries: int = 16  # idformer
    width: int = 256
    depth: int = 2  # idformer layers

    def __post_init__(self):
        if self.kind not in ("mlp", "idformer"):
            raise ValueError(f"unknown ID encoder kind {self.kind!r}; use 'mlp' or 'idformer'")

    @property
    def n_tokens(self) -> int:
        return self.n_global + len(self.feature_channels) - 1 if self.kind == "mlp" else self.n_queries


def _mlp(din, width, dout):
    return nn.Sequential(nn.Linear(din, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, dout))


class MLPIDEncoder(nn.Module):
    def __init__(self, cfg: IDEncoderConfig):
        super().__init__()
        self.cfg = cfg
        glob = cfg.feature_channels[-1]
        self.global_map = _mlp(cfg.id_dim + glob, cfg.width * 2, cfg.n_global * cfg.token_dim)
        # one local token per spatial scale, from a 4x4 pooled map (identity is spatial structure)
        self.local_maps = nn.ModuleList(_mlp(c * 16, cfg.width, cfg.token_dim) for c in cfg.feature_channels[:-1])
        self.norm = nn.LayerNorm(cfg.token_dim)

    def forward(self, id_embedding, features):
        b = id_embedding.shape[0]
        id_vector = torch.cat([F.normalize(id_embedding, dim=-1) * id_embedding.shape[-1] ** 0.5,
                               features[-1].flatten(1)], -1)  # (B, id_dim + C_global)
        tokens = [self.global_map(id_vector).view(b, self.cfg.n_global, self.cfg.token_dim)]
        for f, m in zip(features[:-1], self.local_maps):
            tokens.append(m(F.adaptive_avg_pool2d(f, 4).flatten(1))[:, None])
        return self.norm(torch.cat(tokens, 1))  # (B, n_tokens, token_dim)


class _PerceiverLayer(nn.Module):
    def __init__(self, width, heads=4):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries, context):
        kv = self.norm_kv(torch.cat([context, queries], 1))  # Perceiver: latents attend to inputs and themselves
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.ff(queries)


class IDFormer(nn.Module):
    def __init__(self, cfg: IDEncoderConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, w) * 0.02)
        self.id_in = nn.Linear(cfg.id_dim + cfg.feature_channels[-1], 4 * w)  # ID vector -> 4 context tokens
        self.feature_in = nn.ModuleList(nn.Linear(c, w) for c in cfg.feature_channels[:-1])
        self.scale_embed = nn.Parameter(torch.zeros(len(cfg.feature_channels) - 1, w))
        self.layers = nn.ModuleList(_PerceiverLayer(w) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.token_dim))

    def forward(self, id_embedding, features):
        b, w = id_embedding.shape[0], self.cfg.width
        id_vector = torch.cat([F.normalize(id_embedding, dim=-1) * id_embedding.shape[-1] ** 0.5, features[-1].flatten(1)], -1)
        context = [self.id_in(id_vector).view(b, 4, w)]
        for i, (f, proj) in enumerate(zip(features[:-1], self.feature_in)):
            f = F.adaptive_avg_pool2d(f, min(f.shape[-1], 8))  # at most 8x8 positions per scale
            context.append(proj(f.flatten(2).transpose(1, 2)) + self.scale_embed[i])  # (B, h*w, width)
        context = torch.cat(context, 1)
        q = self.queries.expand(b, -1, -1)
        for layer in self.layers:
            q = layer(q, context)
        return self.out(q)  # (B, n_queries, token_dim)


class IDEncoder(nn.Module):
    """``IDEncoder(cfg)(id_embedding (B, id_dim), features [(B, C_i, H_i, W_i)...]) -> (B, n_tokens, token_dim)``."""

    def __init__(self, cfg: IDEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg or IDEncoderConfig()
        self.net = MLPIDEncoder(self.cfg) if self.cfg.kind == "mlp" else IDFormer(self.cfg)

    def forward(self, id_embedding: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        if id_embedding.ndim != 2 or id_embedding.shape[1] != self.cfg.id_dim:
            raise ValueError(f"id_embedding must be (B, {self.cfg.id_dim}), got {tuple(id_embedding.shape)}")
        if len(features) != len(self.cfg.feature_channels):
            raise ValueError(f"expected {len(self.cfg.feature_channels)} feature maps, got {len(features)}")
        return self.net(id_embedding, features)

    def uncond(self, id_embedding: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Unconditional ID tokens: the encoder applied to zero inputs (shapes taken from the real ones)."""
        return self.net(torch.zeros_like(id_embedding), [torch.zeros_like(f) for f in features])
