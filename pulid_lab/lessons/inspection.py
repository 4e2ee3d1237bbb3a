"""Looking inside the models, for the lessons: verification ROC curves of the recognizers, the probe's accuracy,
per-word cross-attention heat maps of the original model, what the ID adapter adds (and trains), and the
loss curve a stage's trainer wrote.

Every measurement is a plain function returning arrays or dicts; every ``plot_*`` returns a matplotlib Figure
and saves it when ``out`` is given (``plots.save``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.attention import Capture, heat_maps, install
from ..core.branches import unet_fn
from ..core.imaging import align_faces, to_tensor, to_uint8
from ..core.metrics import cosine, roc_auc, roc_curve, verification_pairs
from ..core.sampling import LIGHTNING_STEPS, lightning_sample
from ..models import checkpoints
from ..models.base import initial_noise
from ..train.check_models import CHECK_SEED, RECOGNIZERS
from ..world import toyfaces as world
from ..world import vocab
from ..world.data import Bank, render_bank
from ..world.vocab import ATTRIBUTES
from .plots import save

# ----------------------------------------------------------------------------------------------------------
# The recognizers and the probe, on held-out renders


def heldout_bank(n_ids: int = 50, variants: int = 4) -> Bank:
    """``variants`` renders (random attributes) of each of the first ``n_ids`` held-out identities, rendered
    with the seed of ``pulid-lab check-models`` (never used by training)."""
    return render_bank(world.HELDOUT_IDS[:n_ids], variants, seed=CHECK_SEED, cache=False, progress=False)


@torch.no_grad()
def embed(recognizer, detector, images_u8: np.ndarray, batch: int = 512) -> torch.Tensor:
    """phi on aligned crops: the detector finds the face, ``align_faces`` crops it (as real pipelines do)."""
    x = to_tensor(images_u8)
    return torch.cat([recognizer(align_faces(x[i:i + batch], detector(x[i:i + batch]))) for i in range(0, len(x), batch)])


def colour_matched_renders(n_ids: int, variants: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three aligned sets of renders (a, b, c): a and b show the same held-out identity (different attributes),
    c an impostor with a's colours (skin, hair, eyes) on another identity's structure (``world.colour_matched_factors``)."""
    from ..train.check_models import colour_matched_renders as renders
    images = renders(np.random.default_rng(seed), n_ids, variants).images
    n = n_ids * variants
    return images[:n], images[n:2 * n], images[2 * n:]


def verification_scores(bank: Bank, models_dir: Path | None = None, recognizers=RECOGNIZERS, n_pairs: int = 2000,
                        colour_matched_ids: int | None = None, seed: int = 1) -> dict:
    """Cosine scores of genuine and impostor pairs for each recognizer:
    ``{name: {"random impostors": (scores, same), "colour-matched impostors": (scores, same)}}``.

    Random impostors: pairs of renders of ``bank`` (half the same identity). Colour-matched: a render of an
    identity against another render of it (genuine) and against its colour-matched impostor."""
    detector = checkpoints.load_model("detector", models_dir)
    rng = np.random.default_rng(seed)
    i, j, same = verification_pairs(bank.ids, n_pairs, rng)
    n_cm = colour_matched_ids or len(np.unique(bank.ids))
    variants = max(1, len(bank) // len(np.unique(bank.ids)))
    a, b, c = colour_matched_renders(n_cm, variants, seed + 1)
    cm_same = np.r_[np.ones(len(a), bool), np.zeros(len(a), bool)]
    out = {}
    for name in recognizers:
        phi = checkpoints.load_model(name, models_dir)
        e = embed(phi, detector, bank.images)
        ea, eb, ec = (embed(phi, detector, x) for x in (a, b, c))
        out[name] = {"random impostors": (cosine(e[i], e[j]).numpy(), same),
                     "colour-matched impostors": (torch.cat([cosine(ea, eb), cosine(ea, ec)]).numpy(), cm_same)}
    return out


def auc_table(scores: dict) -> dict:
    """``{recognizer: {pair set: AUC}}`` of ``verification_scores``' output."""
    return {name: {k: round(roc_auc(*v), 4) for k, v in sets.items()} for name, sets in scores.items()}


def plot_roc(scores: dict, out=None):
    """One panel per pair set (random / colour-matched impostors), one ROC curve per recognizer."""
    import matplotlib.pyplot as plt
    sets = list(next(iter(scores.values())))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for name, per_set in scores.items():
            fpr, tpr, _ = roc_curve(*per_set[s])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc(*per_set[s]):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance (AUC 0.5)")
        ax.set_xscale("symlog", linthresh=0.01)  # linear below 1 %, logarithmic above: the low-FAR end matters
        ax.set_xlim(0, 1), ax.set_ylim(0.5, 1.005)
        ax.set_xlabel("false accept rate (impostor pairs accepted)")
        ax.set_ylabel("true accept rate (genuine pairs accepted)\n(axis from 0.5)", fontsize=8)
        n = len(per_set[s][1])
        ax.set_title(f"{s} ({n} pairs)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Face verification on held-out identities", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


@torch.no_grad()
def probe_accuracy(probe, bank: Bank, batch: int = 512) -> dict[str, float]:
    """The probe's accuracy per attribute on ``bank`` (whose true attributes the renderer knows)."""
    x = to_tensor(bank.images)
    logits = [probe(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {a: float(np.mean(torch.cat([lg[a] for lg in logits]).argmax(1).numpy() == bank.labels[a])) for a in ATTRIBUTES}


def plot_probe_accuracy(accuracy: dict[str, float], out=None):
    """Bars: accuracy per attribute; ticks: chance (one over the number of values)."""
    import matplotlib.pyplot as plt
    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(range(len(names)), [accuracy[a] for a in names], color="#2c7fb8", label="probe accuracy")
    ax.scatter(range(len(names)), [1 / len(ATTRIBUTES[a]) for a in names], marker="_", s=300, color="#c0392b",
               label="chance", zorder=3)
    for k, a in enumerate(names):
        ax.annotate(f"{accuracy[a]:.3f}", (k, accuracy[a]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Attribute probe on held-out renders", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, out)


# ----------------------------------------------------------------------------------------------------------
# Cross-attention heat maps of the original model


@dataclass
class TokenMaps:
    caption: str  # in the vocabulary's phrase order (what the text encoder saw)
    image: np.ndarray  # (32, 32, 3) uint8: the 4-step sample the maps were captured on
    words: list[str]  # the caption's word tokens (no <bos>/<eos>/<pad>, no commas)
    positions: list[int]  # their index in the text token sequence
    maps: dict[int, np.ndarray]  # resolution side (16, 8) -> (n_words, size, size) attention probability maps
    layers: dict[int, list[str]]  # resolution side -> the attn2 layers averaged
    total: dict[int, np.ndarray]  # resolution side -> (size, size): summed over *every* token (1 everywhere)


@torch.no_grad()
def caption_heat_maps(base, caption: str, seed: int = 0, steps: int = LIGHTNING_STEPS, size: int = 32) -> TokenMaps:
    """Sample ``caption`` with the Lightning sampler while capturing every attn2 layer's attention
    probabilities; per resolution, average each word token's probability map over heads, layers and steps.
    The caption is put in the vocabulary's phrase order first, as ``base.encode`` does (``TokenMaps.caption``)."""
    from ..models.text import SPECIAL
    caption = vocab.canonical(caption)
    text = base.encode([caption])
    ids = base.token_ids([caption])[0].tolist()  # the ids base.encode read
    tokens = base.tokenizer.convert_ids_to_tokens(ids)
    capture = Capture(probs=True)
    with install(base.unet):
        image = lightning_sample(unet_fn(base.unet, text, None, 0.0, capture), initial_noise(1, [seed], base.device), steps)
    by_side: dict[int, Capture] = {}
    for (layer, step), p in capture.p.items():
        side = int(round(p.shape[2] ** 0.5))
        by_side.setdefault(side, Capture(probs=True)).p[(layer, step)] = p
    words = [(k, t) for k, t in enumerate(tokens) if t not in SPECIAL and t != ","]
    maps, total, layers = {}, {}, {}
    for side in sorted(by_side, reverse=True):
        cap = by_side[side]
        maps[side] = torch.stack([heat_maps(cap, k, size)[0] for k, _ in words]).cpu().numpy()
        total[side] = sum(heat_maps(cap, k, size)[0] for k in range(len(tokens))).cpu().numpy()
        layers[side] = sorted({layer for layer, _ in cap.p})
    return TokenMaps(caption, to_uint8(image.clamp(-1, 1))[0], [t for _, t in words], [k for k, _ in words],
                     maps, layers, total)


def plot_heat_maps(token_maps, out=None, scale: float = 1.0):
    """Rows: each caption at each attention resolution; columns: the sample, then one map per word.
    Each map has its own colour scale (its maximum probability is printed under it)."""
    import matplotlib.pyplot as plt
    token_maps = [token_maps] if isinstance(token_maps, TokenMaps) else list(token_maps)
    rows = [(tm, side) for tm in token_maps for side in tm.maps]
    cols = 1 + max(len(tm.words) for tm in token_maps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * scale, len(rows) * scale * 1.25), squeeze=False)
    for r, (tm, side) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.imshow(tm.image, interpolation="nearest")
                ax.set_ylabel(f"{side}x{side}\n({len(tm.layers[side])} layers)", fontsize=7)
                ax.set_title("sample", fontsize=7)
            elif c - 1 < len(tm.words):
                m = tm.maps[side][c - 1]
                ax.imshow(m, cmap="magma", interpolation="bilinear")
                ax.set_title(tm.words[c - 1], fontsize=7)
                ax.set_xlabel(f"max {m.max():.2f}", fontsize=5, labelpad=1)
            else:
                ax.axis("off")
    fig.suptitle("Cross-attention per word (mean over heads, layers, 4 Lightning steps)\n"
                 + " | ".join(dict.fromkeys(tm.caption for tm in token_maps)), fontsize=8)
    fig.tight_layout()
    return save(fig, out)


# ----------------------------------------------------------------------------------------------------------
# The ID adapter: its parts, and which of them train


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def adapter_parts(adapter, base, image_encoder=None) -> list[dict]:
    """Rows (part, parameters, trains) of the PuLID model: what the trainer's optimiser updates (the adapter's
    parameters) and what stays frozen (the original model, the conditioning networks)."""
    layers = adapter.processors.layer_names
    procs = [adapter.processors.processor(n) for n in layers]
    widths = "/".join(str(w) for w in sorted({p.id_to_k.out_features for p in procs}))
    rows = [
        {"part": f"ID encoder ({adapter.encoder.cfg.kind}): embedding + image features -> "
                 f"{adapter.encoder.cfg.n_tokens} ID tokens", "parameters": _count(adapter.encoder), "trains": True},
        {"part": f"id_to_k, id_to_v of {len(layers)} attn2 layers "
                 f"({procs[0].id_to_k.in_features} -> {widths}, no bias)",
         "parameters": _count(adapter.processors), "trains": True},
        {"part": "UNet of the original model (incl. its to_q/to_k/to_v)", "parameters": _count(base.unet), "trains": False},
        {"part": "text encoder", "parameters": _count(base.text_encoder), "trains": False},
    ]
    if image_encoder is not None:
        rows.append({"part": "image encoder (EVA-CLIP analog)", "parameters": _count(image_encoder), "trains": False})
    return rows


def format_table(rows: list[dict]) -> str:
    """A list of flat dicts as an aligned plain-text table."""
    keys = list(rows[0])
    cells = [[str(k) for k in keys]] + [[f"{r[k]:,}" if isinstance(r[k], int) and not isinstance(r[k], bool) else str(r[k])
                                         for k in keys] for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(keys))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Training curves


def stage_folder(lab, stage: int = 1, seed: int = 0, **knobs) -> Path:
    """The folder of a trained stage of ``lab`` (as ``lab.adapter`` trains it; trains it if it is missing)."""
    from ..train.experiment import Experiment, train_chain
    exp = Experiment(profile=lab.profile, stage=stage, seed=seed, **knobs)
    return train_chain(exp, lab.stages_dir, lab.models_dir, lab.base, lab.device, progress=False)


def read_losses(path: str | Path) -> dict[str, np.ndarray]:
    """``losses.csv`` (written by the PuLID trainer) -> {column: values}, ``step`` included."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no logged steps")
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first values average what exists so far)."""
    c = np.cumsum(np.r_[0.0, values])
    k = np.arange(1, len(values) + 1)
    lo = np.maximum(0, k - window)
    return (c[k] - c[lo]) / (k - lo)


def plot_losses(losses: dict[str, np.ndarray] | str | Path, out=None, title: str = "", window: int | None = None):
    """One panel per loss term (``total`` last): raw values per step and a moving average."""
    import matplotlib.pyplot as plt
    losses = read_losses(losses) if isinstance(losses, (str, Path)) else losses
    terms = [k for k in losses if k not in ("step", "total")] + (["total"] if "total" in losses else [])
    if len(terms) == 2 and np.allclose(losses[terms[0]], losses["total"], equal_nan=True):
        terms = terms[:1]  # one term: total is the same curve
    steps = losses["step"]
    window = window or max(1, len(steps) // 20)
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 2.8), squeeze=False)
    for ax, k in zip(axes[0], terms):
        if window > 1:
            ax.plot(steps, losses[k], lw=0.6, alpha=0.4, color="#2c7fb8", label="per step")
            ax.plot(steps, smooth(losses[k], window), lw=1.6, color="#2c7fb8", label=f"mean of the last {window} steps")
        else:
            ax.plot(steps, losses[k], lw=1.2, marker=".", color="#2c7fb8", label="per step")
        ax.set_title({"diff": "L_diff"}.get(k, k), fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out)
