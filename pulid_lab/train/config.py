"""Configuration as plain dataclasses; the profiles (smoke / quick / paper) are data (docs/profiles.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base_trainer import BaseTraining

PROFILE_NAMES = ("smoke", "quick", "paper")


@dataclass
class NetTraining:
    """One network of the mini world: its architecture and its training budget."""
    kind: str  # recognizer | detector | face_presence | probe | image_encoder (nets.KINDS)
    arch: str = "plain"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    dim: int | None = None  # embedding / feature width where the kind has one
    seed: int = 0
    steps: int = 1000
    batch: int = 128
    lr: float = 2e-3
    margin: float = 0.5  # ArcFace additive angular margin (recognizers, image encoder's identity head)

    def model_config(self) -> dict:
        cfg = {"widths": list(self.widths), "arch": self.arch}
        if self.dim is not None:
            cfg["dim"] = self.dim
        return cfg


@dataclass
class PretrainConfig:
    """The foundation models (recognizers, detector, probe, image encoder), the original text-to-image model,
    and the data they learn from."""
    profile: str
    train_variants: int  # renders per train identity in the training bank
    nets: dict[str, NetTraining] = field(default_factory=dict)
    base: "BaseTraining | None" = None


def _foundation(variants: int, scale: float, profile: str, base_steps: int) -> PretrainConfig:
    """The same recipe at every profile; only budgets differ (``scale`` multiplies the step counts)."""
    def steps(n):
        return max(2, int(n * scale))
    from ..models.base import BaseModelConfig
    from .base_trainer import BaseTraining
    # the original model's recipe (docs/models.md, "The original model"): the pixel's coordinates as input, self-attention
    # at 8x8, the caption-reading loss on the text tokens, the face box weighted 5x in the diffusion loss
    base = BaseTraining(model=BaseModelConfig(coord_channels=True, only_cross_attention=(True, True, False)),
                        caption_reading=0.1, face_weight=4.0,
                        steps=base_steps, batch=32 if base_steps > 10 else 4, checkpoint_every=min(250, base_steps))
    return PretrainConfig(profile, variants, base=base, nets={
        "detector": NetTraining("detector", "plain", (16, 32, 64, 128), seed=11, steps=steps(1500), lr=2e-3),
        "phi_cond": NetTraining("recognizer", "plain", (32, 64, 128, 256), dim=512, seed=1, steps=steps(2000)),
        "phi_loss": NetTraining("recognizer", "resnet", (32, 64, 128, 192), dim=128, seed=2, steps=steps(2000)),
        "phi_eval": NetTraining("recognizer", "plain", (32, 64, 128, 256), dim=128, seed=3, steps=steps(2000)),
        "probe": NetTraining("probe", "resnet", (32, 64, 128, 192), dim=256, seed=4, steps=steps(2500)),
        "image_encoder": NetTraining("image_encoder", "resnet", (32, 64, 128, 256), dim=256, seed=5, steps=steps(1500)),
        # the face check: renders against faceless images (world/faceless.py), batch renders + as many faceless
        "face_check": NetTraining("face_presence", "plain", (16, 32, 64, 128), seed=12, steps=steps(1000), batch=64),
    })


PRETRAIN_PROFILES = {
    "smoke": _foundation(variants=2, scale=0.004, profile="smoke", base_steps=2),
    "quick": _foundation(variants=8, scale=0.25, profile="quick", base_steps=1200),
    "paper": _foundation(variants=24, scale=1.0, profile="paper", base_steps=4000),
}


def resolve_profile(profile: str | None) -> str:
    """``profile`` if given; else ``smoke`` when the environment variable CI is set, else ``paper``."""
    if profile is None:
        profile = "smoke" if os.environ.get("CI") else "paper"
    if profile not in PROFILE_NAMES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILE_NAMES}")
    return profile


def pretrain_config(profile: str | None = None, **overrides) -> PretrainConfig:
    return replace(PRETRAIN_PROFILES[resolve_profile(profile)], **overrides)


@dataclass
class ReproduceProfile:
    """Budgets of the PuLID stages (steps, batches) and of the evaluation, per profile."""
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    batch: int
    lightning_batch: int  # ID loss on the Lightning branch
    align_batch: int  # alignment loss (stage 3)
    eval_ids: int
    bank_variants: int
    checkpoint_every: int = 50


REPRODUCE_PROFILES = {
    "smoke": ReproduceProfile(2, 1, 1, batch=4, lightning_batch=2, align_batch=2, eval_ids=2, bank_variants=2,
                              checkpoint_every=1),
    # quick: the budgets chosen by the identity screens on the validation split (docs/results.md: Stage 2 at 1,200
    # steps took PuLID from 51.6% to 74.0% recognized); its trained stages ship with the models
    "quick": ReproduceProfile(1500, 1200, 120, batch=16, lightning_batch=8, align_batch=4, eval_ids=24, bank_variants=8),
    # paper: quick's ID-loss budget, twice its alignment budget, three times the renders per identity, 50 test identities
    "paper": ReproduceProfile(1500, 1200, 240, batch=16, lightning_batch=8, align_batch=4, eval_ids=50, bank_variants=24),
}
