"""Why the naive ID loss only works at small t (lesson 03): how much identity survives in what phi sees.

The naive ID loss applies phi to the one-step estimate of the diffusion branch at the training timestep,
``x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat`` (v-prediction). At small t, x0_hat is almost the
image itself; at large t it is a blur that keeps colours and loses the fine structure that carries identity
(docs/world.md), so phi(x0_hat) is a poor stand-in for phi(x0) and the loss pushes in a wrong direction.
The Lightning ID loss instead applies phi to the 4-step image generated from pure noise with the ID,
``1 - cos(phi(C_id), phi(LT2I(x_T, C_id, C_txt)))``: a real image at every training step.

``study(lab, {"no ID": None, "Stage 2": adapter})`` measures both on held-out renders:

- the naive curve: cos(phi_loss(x0_hat at t), phi_loss(x0)) for every t in a grid (x0 = held-out renders,
  one fixed noise per image for all t), per denoiser (base model alone, or with an adapter and the render's
  own ID, as the naive loss sees it in training);
- the Lightning figure: cos(phi_loss(4-step image with the ID, neutral prompt), phi_loss(reference)) for the
  same renders as references (and, for an entry ``None``, the image without ID: the chance level).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..core.imaging import align_faces, to_tensor, to_uint8
from ..core.metrics import cosine
from ..core.sampling import diffusion_targets, naive_x0, training_scheduler
from ..models import checkpoints
from ..train.evaluate import METRICS
from ..world import toyfaces as world
from ..world.data import render_bank

Denoise = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]  # (x_t, t, rows) -> v_hat
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, 32, 32) in [-1, 1] -> (B, D)
DEFAULT_TIMESTEPS = tuple(range(0, 1000, 50)) + (999,)


def face_embedder(phi, detector) -> Embed:
    """images -> phi(aligned face crop), the way ``losses.id_loss`` embeds (detector boxes, no gradient)."""
    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        return phi(align_faces(images, detector(images)))
    return embed


def phi_loss_embedder(models_dir=None, device=None) -> Embed:
    """The embedder of the ID loss: phi_loss (not phi_eval, which only evaluates) behind the detector."""
    phi = checkpoints.load_model("phi_loss", models_dir, device or "cpu").eval().requires_grad_(False)
    detector = checkpoints.load_model("detector", models_dir, device or "cpu").eval().requires_grad_(False)
    return face_embedder(phi, detector)


def heldout_renders(n: int, seed: int = 0, caption_dropout: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """``n`` renders of held-out identities (uint8 (n, 32, 32, 3)) and captions for them, incomplete with
    probability ``caption_dropout`` per attribute as in training (no age edit: the render is the reference)."""
    from ..train.base_trainer import captions_for
    ids = world.HELDOUT_IDS[np.arange(n) % len(world.HELDOUT_IDS)]
    bank = render_bank(ids, 1, seed=1000 + seed, old_prob=0.0, cache=False, progress=False)
    caps = captions_for(bank.labels, np.arange(n), np.random.default_rng((world.WORLD_SEED, 30, seed)), caption_dropout, 0.0)
    return bank.images, caps


def base_denoiser(base, captions: list[str], adapter=None, conditioner=None, references=None,
                  id_scale: float = 1.0) -> Denoise:
    """v_hat for rows of a batch: the base model on the captions, or base + adapter with the ID of
    ``references`` (for the naive loss in training: the target image itself, ``id_source='same'``)."""
    from ..core.branches import unet_fn
    with torch.no_grad():
        text = base.encode(list(captions))
        tokens = None
        if adapter is not None:
            if conditioner is None or references is None:
                raise ValueError("an adapter needs the conditioner and the reference images")
            tokens = adapter.tokens(*conditioner(references))

    @torch.no_grad()
    def denoise(x_t, t, rows: slice):
        if tokens is None:
            return base.predict(x_t, t, text[rows])
        with adapter.installed(base.unet):
            return unet_fn(base.unet, text[rows], tokens[rows], id_scale)(x_t, t, 0)
    return denoise


def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def naive_x0_hat(denoise: Denoise, x0: torch.Tensor, t: int, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """The naive one-step estimate x0_hat (clamped to [-1, 1], as the trainer does) from x_t = noised ``x0`` at
    timestep ``t``; the noise depends only on ``seed`` and the shape, so every t sees the same noise."""
    sched = training_scheduler()
    noise = _noise(x0.shape, seed).to(x0.device)
    out = []
    for lo in range(0, len(x0), batch):
        rows = slice(lo, lo + batch)
        tt = torch.full((len(x0[rows]),), int(t), dtype=torch.long, device=x0.device)
        x_t, _ = diffusion_targets(x0[rows], noise[rows], tt, sched)
        out.append(naive_x0(x_t, denoise(x_t, tt, rows), tt, sched).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def naive_cosines(denoise: Denoise, embed: Embed, x0: torch.Tensor, timesteps, seed: int = 0, keep: int = 0):
    """cos(phi(x0_hat at t), phi(x0)) as an array (len(timesteps), N); with ``keep > 0`` also the x0_hat images
    of the first ``keep`` rows, uint8 (keep, len(timesteps), 32, 32, 3): returns (cosines, images)."""
    target = embed(x0)
    cos, images = [], []
    for t in timesteps:
        hat = naive_x0_hat(denoise, x0, t, seed)
        cos.append(cosine(embed(hat), target).cpu().numpy())
        images.append(to_uint8(hat[:keep]))
    cos = np.stack(cos)
    return (cos, np.stack(images, 1)) if keep else cos


@dataclass
class IDLossStudy:
    """What lesson 03 plots. ``naive[name]``: (T, N) cosines; ``lightning[name]``: (N,) cosines."""
    timesteps: np.ndarray
    naive: dict[str, np.ndarray]
    lightning: dict[str, np.ndarray]
    renders: np.ndarray  # (N, 32, 32, 3) the x0 / references
    captions: list[str]
    x0_hat_images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (k, T, 32, 32, 3) uint8
    lightning_images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, 32, 32, 3) uint8

    def mean_curve(self, name: str) -> np.ndarray:
        return self.naive[name].mean(1)

    def crossover_t(self, name: str, lightning: str) -> int | None:
        """The first timestep at which the naive estimate's mean cosine falls below the Lightning image's mean
        cosine (None if it never does): above it, phi sees less identity in x0_hat than in the Lightning image."""
        below = np.flatnonzero(self.mean_curve(name) < self.lightning[lightning].mean())
        return int(self.timesteps[below[0]]) if len(below) else None

    def summary(self) -> dict:
        out = {f"naive {k} t={self.timesteps[i]}": float(v[i].mean()) for k, v in self.naive.items() for i in (0, -1)}
        out.update({f"lightning {k}": float(v.mean()) for k, v in self.lightning.items()})
        return out


@torch.no_grad()
def study(lab, adapters: dict, n: int = 64, timesteps=DEFAULT_TIMESTEPS, seed: int = 0, examples: int = 3,
          embed: Embed | None = None, prompt: str | None = None) -> IDLossStudy:
    """Naive curves and Lightning cosines for each entry of ``adapters`` (name -> adapter, or None for the base
    model without ID), on ``n`` held-out renders. ``lab``: a ``lesson.Lab`` (base, evaluator, models_dir)."""
    from ..train.evaluate import generate
    from ..train.pulid_trainer import NEUTRAL_PROMPT
    prompt = prompt or NEUTRAL_PROMPT
    dev = lab.base.device
    embed = embed or phi_loss_embedder(lab.models_dir, dev)
    renders, captions = heldout_renders(n, seed)
    x0 = to_tensor(renders).to(dev)
    timesteps = np.asarray(timesteps, int)
    seeds = [40_000 + 1000 * seed + i for i in range(n)]
    out = IDLossStudy(timesteps, {}, {}, renders, captions)
    for name, adapter in adapters.items():
        den = base_denoiser(lab.base, captions, adapter, lab.evaluator.conditioner_for(adapter), renders)
        out.naive[name], out.x0_hat_images[name] = naive_cosines(den, embed, x0, timesteps, seed, keep=max(1, examples))
        images = generate(lab.base, adapter, renders, [prompt] * n, seeds, lab.evaluator)
        out.lightning[name] = cosine(embed(images), embed(x0)).cpu().numpy()
        out.lightning_images[name] = to_uint8(images)
    return out


def plot_study(s: IDLossStudy, band: tuple[float, float] = (25, 75), out=None):
    """Left: naive x0_hat cosine vs t (mean line, percentile band) per denoiser, with each Lightning mean as a
    dashed line. Right: the Lightning cosines (same y axis), one box per entry."""
    import matplotlib.pyplot as plt

    from .plots import save
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, gridspec_kw={"width_ratios": [3, 1.2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, cos) in enumerate(s.naive.items()):
        c = colours[i % len(colours)]
        lo, hi = np.percentile(cos, band, axis=1)
        ax.fill_between(s.timesteps, lo, hi, color=c, alpha=0.2, lw=0)
        ax.plot(s.timesteps, cos.mean(1), "-o", ms=3, color=c, label=f"naive x0_hat, {name}")
        if name in s.lightning:
            ax.axhline(s.lightning[name].mean(), ls="--", color=c, lw=1, label=f"Lightning 4-step, {name}")
    ax.set_xlabel("timestep t of the one-step estimate")
    ax.set_ylabel("cos(phi_loss(image), phi_loss(reference))")
    ax.set_title(f"naive x0_hat vs t (mean, {band[0]:g}-{band[1]:g}th percentile band, n={s.renders.shape[0]})", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    names = list(s.lightning)
    bx.boxplot([s.lightning[k] for k in names], widths=0.5)
    bx.set_xticks(range(1, len(names) + 1), names, fontsize=7, rotation=20)
    bx.set_title("Lightning: 4 steps from pure noise", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_strip(s: IDLossStudy, name: str, columns: int = 6, out=None):
    """Rows = example renders; columns = x0_hat at a few timesteps, then the Lightning image with the ID."""
    from .plots import image_grid
    pick = np.unique(np.linspace(0, len(s.timesteps) - 1, columns).astype(int))
    hats = s.x0_hat_images[name][:, pick]
    k = hats.shape[0]
    grid = np.concatenate([s.renders[:k, None], hats, s.lightning_images[name][:k, None]], 1)
    titles = ["render x0"] + [f"x0_hat t={s.timesteps[i]}" for i in pick] + ["Lightning"]
    return image_grid(grid, [f"{name} #{i}" for i in range(k)], titles, scale=1.1, out=out)


def metrics_of(report: dict, id_scale: float = 1.0) -> dict:
    """The metrics of one ``evaluate`` report at one id_scale (means over the test rows)."""
    row = report[float(id_scale)]
    return {k: row[k] for k in METRICS}


def plot_metric_bars(results: dict[str, dict], title: str = "", out=None):
    """One panel per metric, one bar per entry of ``results`` (name -> {face_sim, recognized, prompt_score, purity})."""
    import matplotlib.pyplot as plt

    from .plots import METRIC_TITLES, save
    names = list(results)
    fig, axes = plt.subplots(1, len(METRIC_TITLES), figsize=(3.6 * len(METRIC_TITLES), 3.2))
    colours = ["#8c8c8c", "#d8a03a", "#c0392b", "#2c7fb8", "#4daf4a", "#984ea3"]
    for ax, (m, t) in zip(axes, METRIC_TITLES.items()):
        vals = [results[k][m] for k in names]
        ax.bar(range(len(names)), vals, color=[colours[i % len(colours)] for i in range(len(names))])
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=15)
        ax.set_title(t, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out)
