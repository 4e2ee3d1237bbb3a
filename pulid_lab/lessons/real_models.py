"""Notebook 06's helpers: figures and tables of the real tier (SDXL / SD1.5), and quiet notebook output."""
from __future__ import annotations

import warnings

import numpy as np

from .plots import save


def short_layer(name: str) -> str:
    """``down_blocks.2.attentions.1.transformer_blocks.7.attn2`` -> ``down2.a1.t7`` (``mid.a0.t3``, ``up0.a2.t9``)."""
    parts = name.removesuffix(".processor").removesuffix(".attn2").split(".")
    out = []
    for i, p in enumerate(parts):
        if p in ("down_blocks", "up_blocks"):
            out.append(p.split("_")[0] + parts[i + 1])
        elif p == "mid_block":
            out.append("mid")
        elif p == "attentions":
            out.append(f"a{parts[i + 1]}")
        elif p == "transformer_blocks":
            out.append(f"t{parts[i + 1]}")
    return ".".join(out) or name


def plot_images(images, titles=None, out=None, scale: float = 2.4, suptitle: str = ""):
    """A row of images (PIL or uint8 (H, W, 3), any sizes) with titles; saved to ``out`` when given."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(scale * len(images), scale + 0.4), squeeze=False)
    for i, (ax, im) in enumerate(zip(axes[0], images)):
        ax.imshow(np.asarray(im))
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_align_layers(terms, out=None, title: str = ""):
    """The alignment terms of ``alignment_maps.loss_terms`` (layers x sampler steps) as two heat maps, semantic
    and layout, layers in UNet order (labels ``short_layer``); the titles carry the sums (= L_align_sem and
    L_align_layout)."""
    import matplotlib.pyplot as plt

    n = len(terms.layers)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 1.2 + 0.16 * max(n, 8)), squeeze=False)
    for ax, attr, name in zip(axes[0], ("semantic", "layout"), ("L_align_sem", "L_align_layout")):
        v = getattr(terms, attr)
        im = ax.imshow(v, cmap="Reds", vmin=0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(terms.steps)), [f"step {s}" for s in terms.steps], fontsize=7)
        ax.set_yticks(range(n), [short_layer(la) for la in terms.layers], fontsize=6 if n > 20 else 7)
        ax.set_title(f"{name} = {v.sum():.3g}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def format_align_layers(terms, top: int | None = None) -> str:
    """A table of the alignment terms per layer (summed over steps), in UNet order, or the ``top`` layers by the
    semantic term."""
    rows = list(zip(terms.layers, terms.semantic.sum(1), terms.layout.sum(1), terms.semantic[:, 0], terms.layout[:, 0]))
    if top is not None and len(rows) > top:
        rows = sorted(rows, key=lambda r: -r[1])[:top]
    lines = [f"{'layer':14s} {'positions':>9s} {'sem':>9s} {'layout':>9s} {'sem@0':>9s} {'layout@0':>9s}"]
    for la, s, lay, s0, l0 in rows:
        lines.append(f"{short_layer(la):14s} {terms.sizes[la]:9d} {s:9.4f} {lay:9.4f} {s0:9.4f} {l0:9.4f}")
    return "\n".join(lines)


def quiet() -> None:
    """Notebook output: no diffusers/transformers progress bars or info logs, no skimage deprecation warning from
    insightface's alignment."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
