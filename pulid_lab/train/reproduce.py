"""`pulid-lab reproduce`: the paper's Table 2 in the mini world — four rows, several seeds, one table.

Rows (each trains the adapter; later stages start from the earlier stage's weights, as in the paper):
- ``stage1``: L_diff only;
- ``naive``: Stage 1 + the naive ID loss (phi on x0_hat at the training timestep);
- ``stage2``: Stage 1 + the Lightning ID loss;
- ``stage3``: Stage 2 + contrastive alignment (= PuLID).
Every finished row is saved at once; an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.files import write_json
from ..models.base import load_base
from .config import REPRODUCE_PROFILES
from .evaluate import METRICS, Evaluator, evaluate, test_set
from .experiment import Experiment, stage_dirs, train_chain
from .pulid_trainer import load_adapter

ROWS = ("stage1", "naive", "stage2", "stage3")
ROW_LABELS = {"stage1": "Stage 1 (L_diff)", "naive": "+ naive ID loss", "stage2": "+ Lightning ID loss (Stage 2)",
              "stage3": "+ alignment (Stage 3 = PuLID)"}
PAPER = {  # the paper's Table 2 (docs/method.md): Face Sim / CLIP-T / CLIP-I on DivID-120
    "stage1": (0.561, 29.06, 0.736), "naive": (0.652, 27.05, 0.683),
    "stage2": (0.761, 24.91, 0.624), "stage3": (0.733, 31.31, 0.812),
}
# the Experiment knobs a reproduction may change for every row (the rows themselves fix stage and id_loss; the
# profile fixes budgets and the test set)
OVERRIDABLE = ("id_source", "reference_view", "grad_steps", "lambda_id", "lambda_sem", "lambda_layout", "align_reduction")


def row_experiment(row: str, profile: str, seed: int, **overrides) -> Experiment:
    """The Experiment of a Table 2 row (its chain of stages shares Stage 1 / Stage 2 with the other rows)."""
    rows = {"stage1": dict(stage=1), "naive": dict(stage=2, id_loss="naive"), "stage2": dict(stage=2, id_loss="lightning"),
            "stage3": dict(stage=3, id_loss="lightning")}
    if row not in rows:
        raise ValueError(f"unknown row {row!r}; rows are {ROWS}")
    return Experiment(profile=profile, seed=seed, **{**overrides, **rows[row]})


def check_overrides(profile: str, overrides: dict) -> None:
    """A clear ValueError, before any training, for a knob ``reproduce`` cannot change or a bad value."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"reproduce cannot override {unknown}; it can override {list(OVERRIDABLE)}")
    for row in ROWS:
        row_experiment(row, profile, 0, **overrides)  # Experiment validates every value


def _check_same_recipe(result_path: Path, result: dict, adapter_dir: Path) -> None:
    """A finished row is reused only if it was trained by the recipe asked for now (same stage key)."""
    saved = Path(result["adapter"]).name
    if saved != adapter_dir.name:
        raise ValueError(f"{result_path} is a row of another recipe (adapter {saved}; this run's is {adapter_dir.name}): "
                         f"use another --out for a changed --set, or delete that folder to retrain it")


def reproduce(out: Path, profile: str = "quick", seeds: int = 1, models_dir: Path | None = None, device=None,
              progress: bool = True, **overrides) -> dict:
    """Train and evaluate the four rows for ``seeds`` seeds; write table2.json / table2.md (the figures of a run:
    ``lessons.plots.reproduction_figures``).

    Trained stages live in ``out/stages`` (shared by the rows, and by the notebooks, which default to
    ``runs/reproduce/stages``); each row's metrics in ``out/seed<k>/<row>/result.json``.
    """
    check_overrides(profile, overrides)
    out = Path(out)
    base = load_base(models_dir, device)
    tests = test_set(REPRODUCE_PROFILES[profile].eval_ids)
    evaluator = Evaluator(models_dir, base.device)
    results: dict[str, list[dict]] = {r: [] for r in ROWS}
    for seed in range(seeds):
        for row in ROWS:
            path = out / f"seed{seed}" / row / "result.json"
            exp = row_experiment(row, profile, seed, **overrides)
            if not path.exists():
                adapter_dir = train_chain(exp, out / "stages", models_dir, base, base.device, progress)
                adapter = load_adapter(adapter_dir, base.unet).to(base.device)
                metrics = evaluate(base, adapter, evaluator, tests, id_scales=(1.0,), progress=progress)
                write_json(path, {"row": row, "seed": seed, "adapter": str(adapter_dir), **metrics[1.0]})
            result = json.loads(path.read_text())
            _check_same_recipe(path, result, stage_dirs(exp, out / "stages", models_dir)[-1])  # a reused row too
            results[row].append(result)
    table = summarise(results)
    table["claims"] = claims(table)
    table["overrides"] = dict(overrides)  # what differs from the default recipe ({} = the paper's recipe)
    table["profile"], table["seeds"], table["test_set"] = profile, seeds, {"identities": REPRODUCE_PROFILES[profile].eval_ids,
                                                                          "rows": len(tests.prompts)}
    write_json(out / "table2.json", table)
    (out / "table2.md").write_text(markdown_table(table))
    return table


def summarise(results: dict[str, list[dict]]) -> dict:
    rows = {}
    for row, runs in results.items():
        rows[row] = {m: {"mean": float(np.mean([r[m] for r in runs])), "std": float(np.std([r[m] for r in runs])),
                         "runs": [r[m] for r in runs]} for m in METRICS}
    return {"rows": rows}


def claims(table: dict) -> dict:
    """The paper's Table 2 directions, checked on the means."""
    m = {r: {k: v["mean"] for k, v in table["rows"][r].items()} for r in ROWS}
    return {
        "1_naive_raises_face_sim_over_stage1": m["naive"]["face_sim"] > m["stage1"]["face_sim"],
        "2_lightning_raises_face_sim_over_naive": m["stage2"]["face_sim"] > m["naive"]["face_sim"],
        "3_stage2_lowers_prompt_score_and_purity_below_stage1":
            m["stage2"]["prompt_score"] < m["stage1"]["prompt_score"] and m["stage2"]["purity"] < m["stage1"]["purity"],
        "4_stage3_restores_prompt_score_and_purity_to_stage1":
            m["stage3"]["prompt_score"] >= m["stage1"]["prompt_score"] and m["stage3"]["purity"] >= m["stage1"]["purity"],
        "5_stage3_keeps_90pct_of_stage2_face_sim": m["stage3"]["face_sim"] >= 0.9 * m["stage2"]["face_sim"],
    }


def markdown_table(table: dict) -> str:
    lines = ["| row | Face Sim (mini) | prompt score (mini) | purity (mini) | Face Sim (paper) | CLIP-T (paper) | CLIP-I (paper) |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = table["rows"][row]
        mini = " | ".join(f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" for m in METRICS)
        paper = " | ".join(str(v) for v in PAPER[row])
        lines.append(f"| {ROW_LABELS[row]} | {mini} | {paper} |")
    lines.append("")
    if table.get("overrides"):
        lines.append("Recipe changed for every row: " + ", ".join(f"{k} = {v}" for k, v in table["overrides"].items()))
        lines.append("")
    for claim, held in table.get("claims", {}).items():
        lines.append(f"- {claim}: {'held' if held else 'did NOT hold'}")
    return "\n".join(lines) + "\n"
