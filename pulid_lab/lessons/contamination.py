"""What leaks from the ID reference into the output, measured (docs/world.md, docs/method.md).

A *leak set* pairs held-out references, whose true attributes the renderer knows, with prompts that ask for a
**different** value of every measured attribute (style, background, lighting, accessories). The same prompt and
initial noise are sampled without the ID and with each adapter; the attribute probe reads each output. Per
attribute and condition:

- ``follow``: the fraction of outputs that show the value the prompt asks for;
- ``copy``: the fraction that show the *reference's* value instead (it always differs from the prompt's).

Without the ID, ``copy`` is the chance of drawing the reference's value anyway: the baseline a leak rises above.

    lset = leak_set(64)
    report = leak_rates(base, evaluator, lset, {"Stage 1": stage1})
    plot_leak(report)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.imaging import to_uint8
from ..train.evaluate import generate
from ..world import toyfaces as world
from ..world import vocab

LEAK_ATTRIBUTES = ("style", "background", "lighting", "glasses", "hat")
LEAK_SEED = 41_000
WITHOUT_ID = "without ID"


@dataclass
class LeakSet:
    references: np.ndarray  # (N, 32, 32, 3) uint8 renders of held-out identities
    ids: np.ndarray  # (N,) identity ids
    reference_labels: dict[str, np.ndarray]  # attribute -> (N,) value index of each reference (the renderer's truth)
    asked: dict[str, np.ndarray]  # measured attribute -> (N,) value index the prompt asks for (never the reference's)
    prompts: list[str]  # (N,)
    seeds: list[int]  # (N,) initial-noise seeds

    def __len__(self):
        return len(self.prompts)

    def subset(self, idx) -> "LeakSet":
        idx = np.asarray(idx)
        return LeakSet(self.references[idx], self.ids[idx], {a: v[idx] for a, v in self.reference_labels.items()},
                       {a: v[idx] for a, v in self.asked.items()}, [self.prompts[i] for i in idx],
                       [self.seeds[i] for i in idx])


def leak_set(n: int = 64, attributes=LEAK_ATTRIBUTES, seed: int = 0) -> LeakSet:
    """``n`` held-out references (random attributes, young) and one prompt each that names every attribute in
    ``attributes`` with a value other than the reference's (drawn uniformly among the others)."""
    unknown = [a for a in attributes if a not in vocab.ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"attributes must be a non-empty subset of {tuple(vocab.ATTRIBUTES)}, got {tuple(attributes)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng((world.WORLD_SEED, 8, seed))
    ids = world.HELDOUT_IDS[np.arange(n) % len(world.HELDOUT_IDS)]
    labels = world.sample_attributes(rng, n, old_prob=0.0)
    refs = world.render(ids, labels, LEAK_SEED + seed * 100_003 + np.arange(n)).images
    asked = {a: (labels[a] + rng.integers(1, len(vocab.ATTRIBUTES[a]), n)) % len(vocab.ATTRIBUTES[a]) for a in attributes}
    prompts = [vocab.caption_from_labels(asked, i, attributes) for i in range(n)]
    seeds = [LEAK_SEED + seed * 100_003 + i for i in range(n)]
    return LeakSet(refs, ids, labels, asked, prompts, seeds)


@torch.no_grad()
def predict_attributes(probe, images: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    """The probe's reading (value index per attribute) of images (B, 3, 32, 32) in [-1, 1]."""
    out: dict[str, list] = {a: [] for a in vocab.ATTRIBUTES}
    for i in range(0, len(images), batch):
        logits = probe(images[i:i + batch])
        for a in vocab.ATTRIBUTES:
            out[a].append(logits[a].argmax(1).cpu().numpy())
    return {a: np.concatenate(v) for a, v in out.items()}


def rates(predicted: dict[str, np.ndarray], lset: LeakSet) -> dict[str, dict[str, float]]:
    """``{"follow": {attr: rate}, "copy": {attr: rate}}`` for predictions over ``lset`` (measured attributes)."""
    return {"follow": {a: float(np.mean(predicted[a] == lset.asked[a])) for a in lset.asked},
            "copy": {a: float(np.mean(predicted[a] == lset.reference_labels[a])) for a in lset.asked}}


def generate_conditions(base, evaluator, lset: LeakSet, adapters: dict, id_scale: float = 1.0,
                        batch: int = 64) -> dict[str, torch.Tensor]:
    """4-step samples (N, 3, 32, 32) per condition: ``"without ID"`` first, then each adapter (same prompt and noise)."""
    adapters = {WITHOUT_ID: None, **adapters}
    out = {}
    for name, adapter in adapters.items():
        chunks = [generate(base, adapter, lset.references[i:i + batch], lset.prompts[i:i + batch],
                           lset.seeds[i:i + batch], evaluator, id_scale) for i in range(0, len(lset), batch)]
        out[name] = torch.cat(chunks)
    return out


def leak_rates(base, evaluator, lset: LeakSet, adapters: dict, id_scale: float = 1.0, batch: int = 64) -> dict:
    """Measure the leak: ``{"n", "attributes", "id_scale", "conditions": {name: {"follow": {...}, "copy": {...},
    "follow_mean", "copy_mean"}}}`` with ``"without ID"`` always first. JSON-ready."""
    images = generate_conditions(base, evaluator, lset, adapters, id_scale, batch)
    conditions = {}
    for name, imgs in images.items():
        r = rates(predict_attributes(evaluator.probe, imgs), lset)
        r["follow_mean"] = float(np.mean(list(r["follow"].values())))
        r["copy_mean"] = float(np.mean(list(r["copy"].values())))
        conditions[name] = r
    return {"n": len(lset), "attributes": list(lset.asked), "id_scale": id_scale, "conditions": conditions}


def leak_verdicts(report: dict, name: str, level_z: float = 1.96) -> list[str]:
    """One sentence per attribute: does ``name``'s ID make the output copy the reference more often than without
    the ID? The difference of the two copy rates over the ``n`` references, with a normal-approximation 95% interval
    for two proportions (the pairs share references, prompts and noise, which only narrows the true interval);
    "leaks" only when the whole interval lies above zero."""
    n = report["n"]
    without, with_id = report["conditions"][WITHOUT_ID], report["conditions"][name]
    lines = []
    for a in report["attributes"]:
        p1, p0 = with_id["copy"][a], without["copy"][a]
        half = level_z * np.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / n)
        diff, lo, hi = 100 * (p1 - p0), 100 * (p1 - p0 - half), 100 * (p1 - p0 + half)
        word = "leaks" if lo > 0 else "copied less than by chance" if hi < 0 else "no measurable leak"
        lines.append(f"{a}: copied in {p1:.0%} with {name} vs {p0:.0%} without ID ({diff:+.0f} points, 95% CI "
                     f"{lo:+.0f} to {hi:+.0f}): {word}")
    return lines


def leak_by_scale(base, evaluator, lset: LeakSet, adapter, scales=(0.5, 1.0, 2.0, 4.0), batch: int = 64) -> dict:
    """How the leak grows with ``id_scale`` (the weight of the ID attention term) for one adapter:
    ``{"n", "attributes", "scales", "without ID": rates, "by_scale": [rates per scale]}``; rates as in ``leak_rates``."""
    def summarise(images):
        r = rates(predict_attributes(evaluator.probe, images), lset)
        r["follow_mean"], r["copy_mean"] = (float(np.mean(list(r[k].values()))) for k in ("follow", "copy"))
        return r
    without = summarise(generate_conditions(base, evaluator, lset, {}, batch=batch)[WITHOUT_ID])
    by_scale = [summarise(generate_conditions(base, evaluator, lset, {"ID": adapter}, s, batch)["ID"])
                if s != 0 else without for s in scales]
    return {"n": len(lset), "attributes": list(lset.asked), "scales": [float(s) for s in scales],
            WITHOUT_ID: without, "by_scale": by_scale}


def plot_leak_by_scale(sweep: dict, out=None, title: str = ""):
    """Two panels (follows the prompt / copies the reference) against id_scale: one line per attribute, the mean
    in black, the no-ID mean dotted."""
    import matplotlib.pyplot as plt

    from .plots import save
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    x = sweep["scales"]
    for ax, key, label in ((axes[0], "follow", "follows the prompt"), (axes[1], "copy", "copies the reference instead")):
        for a in sweep["attributes"]:
            ax.plot(x, [r[key][a] for r in sweep["by_scale"]], marker=".", lw=1, alpha=0.8, label=a)
        ax.plot(x, [r[f"{key}_mean"] for r in sweep["by_scale"]], marker="o", lw=2.2, color="black", label="mean")
        ax.axhline(sweep[WITHOUT_ID][f"{key}_mean"], color="black", ls=":", lw=1, label="mean without ID")
        ax.set_xlabel("id_scale")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(label, fontsize=9)
    axes[1].legend(fontsize=6, loc="upper left", ncol=2)
    fig.suptitle(title or f"The leak against id_scale ({sweep['n']} prompts that contradict their reference)", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


def format_report(report: dict) -> str:
    """The report as a plain-text table: one row per attribute, follow / copy per condition."""
    conds = list(report["conditions"])
    head = f"{'attribute':<11}" + "".join(f"{c[:18]:>20}" for c in conds)
    sub = f"{'':<11}" + "".join(f"{'follow  copy':>20}" for _ in conds)
    lines = [f"{report['n']} references, id_scale {report['id_scale']:g}", head, sub]
    for a in report["attributes"] + ["mean"]:
        cells = []
        for c in conds:
            r = report["conditions"][c]
            f, k = (r["follow_mean"], r["copy_mean"]) if a == "mean" else (r["follow"][a], r["copy"][a])
            cells.append(f"{f:>14.2f}{k:>6.2f}")
        lines.append(f"{a:<11}" + "".join(cells))
    return "\n".join(lines)


def plot_leak(report: dict, out=None, title: str | None = None):
    """Two panels: how often the output follows the prompt, and how often it copies the reference instead;
    per attribute, one bar per condition (without ID first)."""
    import matplotlib.pyplot as plt

    from .plots import save
    attrs, conds = report["attributes"] + ["mean"], list(report["conditions"])
    colours = ["#8c8c8c", "#c0392b", "#2c7fb8", "#d8a03a", "#27ae60", "#8e44ad"]
    width = 0.8 / len(conds)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, key, label in ((axes[0], "follow", "follows the prompt"), (axes[1], "copy", "copies the reference instead")):
        for k, c in enumerate(conds):
            r = report["conditions"][c]
            vals = [r[f"{key}_mean"] if a == "mean" else r[key][a] for a in attrs]
            ax.bar(np.arange(len(attrs)) + (k - (len(conds) - 1) / 2) * width, vals, width, label=c,
                   color=colours[k % len(colours)])
        ax.set_xticks(range(len(attrs)), attrs, fontsize=8)
        ax.axvline(len(attrs) - 1.5, color="black", lw=0.5, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of outputs")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"What leaks from the reference ({report['n']} prompts that contradict their reference, "
                          f"id_scale {report['id_scale']:g})", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


def _short(prompt: str) -> str:
    return prompt.replace(vocab.SUBJECT + ", ", "").replace(" background", " bg").replace(", ", "\n")


def leak_examples(base, evaluator, lset: LeakSet, adapters: dict, n: int = 6, id_scale: float = 1.0, out=None):
    """Side by side for ``n`` rows of ``lset``: reference, without ID, then one column per adapter; rows are
    titled with what the prompt asks for, columns with the reference's true values of the measured attributes
    (under the reference)."""
    from .plots import image_grid
    pick = np.linspace(0, len(lset) - 1, min(n, len(lset))).astype(int)
    sub = lset.subset(pick)
    images = generate_conditions(base, evaluator, sub, adapters, id_scale)
    grid = np.stack([sub.references] + [to_uint8(x) for x in images.values()], 1)
    fig = image_grid(grid, [_short(p) for p in sub.prompts], ["reference"] + list(images), scale=1.2)
    for r, ax in enumerate(fig.axes[::grid.shape[1]]):  # under each reference: its own (true) values
        values = _short(vocab.caption_from_labels(sub.reference_labels, r, sub.asked)).split("\n")
        half = (len(values) + 1) // 2
        ax.set_xlabel(", ".join(values[:half]) + "\n" + ", ".join(values[half:]), fontsize=5, labelpad=1)
    fig.subplots_adjust(hspace=0.5)
    from .plots import save
    return save(fig, out)
