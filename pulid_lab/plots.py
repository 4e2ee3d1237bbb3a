"""Figures. matplotlib only; every function returns the Figure and optionally saves it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import world
from .vocab import ATTRIBUTES

# (column title, attribute changes applied to the base look)
WORLD_COLUMNS = (
    ("photo", {}),
    ("sketch", {"style": "sketch"}),
    ("pixel art", {"style": "pixel"}),
    ("comic", {"style": "comic"}),
    ("painting", {"style": "painting"}),
    ("pink bg", {"background": "pink"}),
    ("left light", {"lighting": "left"}),
    ("top light", {"lighting": "top"}),
    ("glasses", {"glasses": "yes"}),
    ("hat", {"hat": "yes"}),
    ("smiling", {"expression": "smiling"}),
    ("surprised", {"expression": "surprised"}),
    ("on the left", {"position": "left"}),
    ("distant", {"scale": "distant"}),
    ("old (ID edit)", {"age": "old"}),
)
BASE_LOOK = dict(background="blue", style="photo", lighting="front", glasses="no", hat="no",
                 expression="neutral", position="center", scale="close-up", age="young")


def save(fig, out: str | Path | None, dpi: int = 110):
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, bbox_inches="tight")
    return fig


def image_grid(images: np.ndarray, row_titles=None, col_titles=None, scale: float = 0.9, out=None):
    """images: (rows, cols, H, W, 3) uint8 -> a Figure with titled rows and columns."""
    import matplotlib.pyplot as plt
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 and col_titles is not None:
                ax.set_title(col_titles[c], fontsize=7)
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize=7)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return save(fig, out)


def world_grid(ids=None, seed: int = 0, out=None):
    """Rows = identities (train and held-out), columns = one attribute change each from a base look."""
    ids = np.asarray(ids if ids is not None else [0, 1, 2, 3, world.HELDOUT_IDS[0], world.HELDOUT_IDS[1]])
    looks = [{**BASE_LOOK, **change} for _, change in WORLD_COLUMNS]
    labels = {a: np.array([ATTRIBUTES[a].index(look[a]) for look in looks]) for a in ATTRIBUTES}
    rows = []
    for i in ids:
        r = world.render(np.full(len(looks), i), labels, seed + np.arange(len(looks)))
        rows.append(r.images)
    names = [("held-out " if i >= world.N_TRAIN else "train ") + str(i) for i in ids]
    return image_grid(np.stack(rows), names, [t for t, _ in WORLD_COLUMNS], out=out)


BASE_SAMPLE_CAPTIONS = (
    "a portrait, photo, blue background",
    "a portrait, sketch, red background, glasses",
    "a portrait, comic, green background, hat",
    "a portrait, pixel art, yellow background, smiling",
    "a portrait, painting, purple background, on the left, distant",
    "a portrait, photo, teal background, left light, old",
)


def base_samples(model, captions=BASE_SAMPLE_CAPTIONS, seeds=range(6), out=None):
    """The original model: rows = captions, columns = seeds, for DDIM 50 steps (left) and Lightning 4 steps (right)."""
    from .data import to_uint8
    seeds = list(seeds)
    rows = []
    for cap in captions:
        slow = model.generate([cap] * len(seeds), seed=seeds, steps=50, solver="ddim")
        fast = model.generate([cap] * len(seeds), seed=seeds, steps=4, solver="lightning")
        rows.append(np.concatenate([to_uint8(slow), to_uint8(fast)]))
    titles = [f"50-step s{s}" for s in seeds] + [f"4-step s{s}" for s in seeds]
    return image_grid(np.stack(rows), [c.replace("a portrait, ", "") for c in captions], titles, out=out)
