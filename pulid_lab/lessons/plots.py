"""Figures. matplotlib only; every function returns the Figure and optionally saves it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.imaging import to_uint8
from ..models.base import load_base
from ..train.evaluate import METRICS, Evaluator, generate, spread_rows, test_set
from ..train.pulid_trainer import load_adapter
from ..train.reproduce import ROW_LABELS, ROWS
from ..world import toyfaces as world
from ..world.vocab import ATTRIBUTES

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
                ax.set_ylabel(row_titles[r], fontsize=6, rotation=0, ha="right", va="center")
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
    seeds = list(seeds)
    rows = []
    for cap in captions:
        slow = model.generate([cap] * len(seeds), seed=seeds, steps=50, solver="ddim")
        fast = model.generate([cap] * len(seeds), seed=seeds, steps=4, solver="lightning")
        rows.append(np.concatenate([to_uint8(slow), to_uint8(fast)]))
    titles = [f"50-step s{s}" for s in seeds] + [f"4-step s{s}" for s in seeds]
    return image_grid(np.stack(rows), [c.replace("a portrait, ", "").replace(", ", "\n") for c in captions], titles, out=out)


METRIC_TITLES = {"face_sim": "Face Sim (phi_eval)", "recognized": "recognized as the reference",
                 "prompt_score": "prompt score (CLIP-T analog)", "purity": "purity (CLIP-I analog)"}


def table2(table: dict, out=None):
    """One panel per metric: a bar per Table 2 row with its 95% interval (bootstrap over seeds and test identities);
    dashed lines: the original model without ID (grey) and the oracle (green), where the table has them."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 3.3))
    colours = ["#8c8c8c", "#d8a03a", "#c0392b", "#2c7fb8"]
    for ax, m in zip(axes, METRICS):
        means = np.array([table["rows"][r][m]["mean"] for r in ROWS])
        ci = np.array([table["rows"][r][m].get("ci", [v, v]) for r, v in zip(ROWS, means)])
        ax.bar(range(len(ROWS)), means, yerr=[means - ci[:, 0], ci[:, 1] - means], color=colours, capsize=3)
        for name, colour in (("no_id", "#555555"), ("oracle", "#2ca02c")):
            ref = (table.get(name) or {}).get(m)
            if ref is not None:
                ax.axhline(ref["mean"], ls="--", lw=1, color=colour, label="no ID" if name == "no_id" else "oracle")
        ax.set_xticks(range(len(ROWS)), [ROW_LABELS[r].replace(" (", "\n(") for r in ROWS], fontsize=6, rotation=20)
        ax.set_title(METRIC_TITLES[m], fontsize=9)
        if m == "recognized":
            ax.set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Table 2 in the mini world ({table.get('profile', '')}, {table.get('seeds', '')} seed(s)); "
                 "error bars: 95% intervals", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


def id_insertion(base, adapters: dict, evaluator, tests, n: int = 6, out=None):
    """Same prompts and noise; columns: reference, without ID, then one column per adapter (row of Table 2)."""
    pick = spread_rows(tests, n)
    refs, prompts, seeds = tests.references[pick], [tests.prompts[i] for i in pick], [tests.seeds[i] for i in pick]
    cols = [refs, to_uint8(generate(base, None, refs, prompts, seeds, evaluator))]
    for adapter in adapters.values():
        cols.append(to_uint8(generate(base, adapter, refs, prompts, seeds, evaluator)))
    grid = np.stack(cols, 1)
    return image_grid(grid, [p.replace("a portrait, ", "") for p in prompts],
                      ["reference", "without ID"] + list(adapters), scale=1.1, out=out)


def reproduction_figures(run: str | Path, figures: str | Path, models_dir: Path | None = None, device=None) -> list[Path]:
    """The figures of a finished ``reproduce`` run folder: ``table2.png`` (every row with its 95% interval) and
    ``id_insertion.png`` (the seed-0 adapters of the four rows on the run's test set); returns their paths."""
    run, figures = Path(run), Path(figures)
    table = json.loads((run / "table2.json").read_text())
    table2(table, out=figures / "table2.png")
    base = load_base(models_dir, device)
    adapters = {}
    for row in ROWS:
        result = json.loads((run / "seed0" / row / "result.json").read_text())
        adapters[row] = load_adapter(run / result["adapter"], base.unet).to(base.device)  # relative to the run
    tests = test_set(table["test_set"]["identities"])
    id_insertion(base, adapters, Evaluator(models_dir, base.device), tests, out=figures / "id_insertion.png")
    return [figures / "table2.png", figures / "id_insertion.png"]


def pareto(rows: list[dict], table2: dict | None = None, out=None, title: str = "", varied: list[str] | None = None):
    """Face Sim (x) vs prompt score and vs purity (y), one point per grid config, Pareto front drawn;
    the rows of a reproduce ``table2.json`` (if given) marked as the paper's rows. With one or two ``varied``
    parameters, the first is the colour and the second the marker (a legend, no crowded labels)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    varied = list(varied or [])
    encode = 1 <= len(varied) <= 2
    if encode:
        colour_values = sorted({r[varied[0]] for r in rows}, key=str)
        colours = dict(zip(colour_values, plt.cm.viridis(np.linspace(0.1, 0.85, len(colour_values)))))
        marker_values = sorted({r[varied[1]] for r in rows}, key=str) if len(varied) == 2 else [None]
        markers = dict(zip(marker_values, "osD^vP*Xph"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, y in zip(axes, ("prompt_score", "purity")):
        front = pareto_front(rows, "face_sim", y)
        ax.plot([r["face_sim"] for r in front], [r[y] for r in front], "-", color="#c0392b", lw=1, zorder=1)
        for r in rows:
            if encode:
                ax.scatter(r["face_sim"], r[y], s=40, zorder=2, color=colours[r[varied[0]]],
                           marker=markers[r[varied[1]] if len(varied) == 2 else None], edgecolor="k", linewidth=0.4)
            else:
                ax.scatter(r["face_sim"], r[y], s=18, color="#2c7fb8", zorder=2)
                label = ", ".join(f"{k}={r[k]}" for k in varied) if varied else str(r["config"])
                ax.annotate(label, (r["face_sim"], r[y]), fontsize=5, alpha=0.7)
        if table2:
            for row, vals in table2["rows"].items():
                ax.scatter(vals["face_sim"]["mean"], vals[y]["mean"], marker="*", s=110, color="#d8a03a",
                           edgecolor="#8a5a00", linewidth=0.5, zorder=3)
                ax.annotate(ROW_LABELS.get(row, row), (vals["face_sim"]["mean"], vals[y]["mean"]), fontsize=6,
                            color="#8a5a00", xytext=(4, -9), textcoords="offset points")
        ax.set_xlabel("Face Sim (higher = more ID fidelity)")
        ax.set_ylabel(y.replace("_", " ") + (" (CLIP-T analog)" if y == "prompt_score" else " (CLIP-I analog)"))
    handles = [Line2D([], [], color="#c0392b", lw=1, label="Pareto front")]
    if encode:
        handles += [Line2D([], [], ls="", marker="o", color=c, label=f"{varied[0]} = {v}") for v, c in colours.items()]
        if len(varied) == 2:
            handles += [Line2D([], [], ls="", marker=m, color="grey", label=f"{varied[1]} = {v}") for v, m in markers.items()]
    else:
        handles.append(Line2D([], [], ls="", marker="o", color="#2c7fb8", label="grid configs"))
    if table2:
        handles.append(Line2D([], [], ls="", marker="*", markersize=9, color="#d8a03a", label="main job's rows"))
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"Ablation grid {title}: ID fidelity vs editability", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    return save(fig, out)


def pareto_front(rows: list[dict], x: str, y: str) -> list[dict]:
    """Rows not dominated on (x, y), both higher-is-better, sorted by x."""
    front = [r for r in rows if not any(o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y]) for o in rows)]
    return sorted(front, key=lambda r: r[x])


def choose_config(rows: list[dict], tolerance: float = 0.03, fidelity: str = "face_sim",
                  editability: str = "prompt_score") -> tuple[dict, str]:
    """The rule a grid's reader can defend: among the configs whose ``editability`` is within ``tolerance`` of the
    grid's best, the one with the highest ``fidelity`` (always a member of the Pareto front). Returns (row, why)."""
    if not rows:
        raise ValueError("no rows to choose from")
    best = max(r[editability] for r in rows)
    keep = [r for r in rows if r[editability] >= best - tolerance]
    pick = max(keep, key=lambda r: r[fidelity])
    why = (f"{len(keep)} of {len(rows)} configs keep {editability} within {tolerance:g} of the best ({best:.3f}); "
           f"the most faithful of them has {fidelity} {pick[fidelity]:.3f} and {editability} {pick[editability]:.3f}")
    return pick, why
