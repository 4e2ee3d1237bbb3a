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
import os
from pathlib import Path

import numpy as np

from ..core.files import run_lock, write_json
from ..core.metrics import bootstrap_interval
from ..models.base import load_base
from .config import REPRODUCE_PROFILES
from .evaluate import METRICS, Evaluator, evaluate, oracle, test_set
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
OVERRIDABLE = ("id_source", "reference_view", "grad_steps", "lambda_id", "lambda_sem", "lambda_layout", "align_reduction",
               "align_every_step", "align_token_mask", "lr", "face_weight", "id_dropout")


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


def _read_result(path: Path) -> dict | None:
    """A finished row's result, or None when it is missing or predates per-row metrics (then it is re-evaluated)."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if "rows" in result else None


def reproduce(out: Path, profile: str = "quick", seeds: int = 1, models_dir: Path | None = None, device=None,
              progress: bool = True, train: bool = False, **overrides) -> dict:
    """Train and evaluate the four rows for ``seeds`` seeds, plus the no-ID and oracle rows; write table2.json /
    table2.md with 95% intervals and the five claims decided on them (the figures of a run:
    ``lessons.plots.reproduction_figures``).

    A stage that ships with the models under the same recipe key (``experiment.shipped_stages_dir``) is used as
    it is unless ``train``, which retrains every stage the run needs.

    Trained stages live in ``out/stages`` (shared by the rows, and by the notebooks, which default to
    ``runs/reproduce/stages``); each row's metrics, per test row, in ``out/seed<k>/<row>/result.json``.
    """
    check_overrides(profile, overrides)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    with run_lock(out):  # one writer per run folder
        return _reproduce(Path(out), profile, seeds, models_dir, device, progress, train, overrides)


def _reproduce(out: Path, profile: str, seeds: int, models_dir, device, progress: bool, train: bool,
               overrides: dict) -> dict:
    base = load_base(models_dir, device)
    tests = test_set(REPRODUCE_PROFILES[profile].eval_ids)
    evaluator = Evaluator(models_dir, base.device)
    results: dict[str, list[dict]] = {r: [] for r in ROWS}
    for seed in range(seeds):
        for row in ROWS:
            path = out / f"seed{seed}" / row / "result.json"
            exp = row_experiment(row, profile, seed, **overrides)
            result = _read_result(path)
            if result is None:
                adapter_dir = train_chain(exp, out / "stages", models_dir, base, base.device, progress, pretrained=not train)
                adapter = load_adapter(adapter_dir, base.unet).to(base.device)
                metrics = evaluate(base, adapter, evaluator, tests, id_scales=(1.0,), progress=progress)
                # the adapter's path relative to the run folder: a moved or copied run folder stays whole
                write_json(path, {"row": row, "seed": seed, "adapter": os.path.relpath(adapter_dir, out), **metrics[1.0]})
                result = json.loads(path.read_text())
            _check_same_recipe(path, result, stage_dirs(exp, out / "stages", models_dir)[-1])  # a reused row too
            results[row].append(result)
    references = {"no_id": _read_result(out / "no_id" / "result.json"), "oracle": _read_result(out / "oracle" / "result.json")}
    if references["no_id"] is None:
        references["no_id"] = evaluate(base, None, evaluator, tests, progress=progress)[1.0]
        write_json(out / "no_id" / "result.json", references["no_id"])
    if references["oracle"] is None:
        references["oracle"] = oracle(evaluator, tests)
        write_json(out / "oracle" / "result.json", references["oracle"])
    table = summarise(results, references)
    table["claims"] = claims(results)
    table["overrides"] = dict(overrides)  # what differs from the default recipe ({} = the paper's recipe)
    table["profile"], table["seeds"], table["test_set"] = profile, seeds, {"identities": REPRODUCE_PROFILES[profile].eval_ids,
                                                                          "rows": len(tests.prompts)}
    table["recognition_threshold"] = evaluator.recognition_threshold
    write_json(out / "table2.json", table)
    (out / "table2.md").write_text(markdown_table(table))
    return table


def _per_row(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (seeds, test rows), identity of each row) of one metric over a row's runs."""
    return np.array([r["rows"][metric] for r in runs], np.float64), np.array(runs[0]["rows"]["ids"])


def _metric_summary(runs: list[dict], metric: str) -> dict:
    values, ids = _per_row(runs, metric)
    mean, lo, hi = bootstrap_interval(values, ids)
    per_seed = values.mean(1)
    return {"mean": mean, "std": float(per_seed.std()), "runs": [float(v) for v in per_seed], "ci": [lo, hi]}


def summarise(results: dict[str, list[dict]], references: dict[str, dict] | None = None) -> dict:
    """Per row and metric: the mean over seeds and test rows, the std of the per-seed means, and a 95% bootstrap
    interval over seeds and test identities; the no-ID and oracle rows (one run each) beside them."""
    table = {"rows": {row: {m: _metric_summary(runs, m) for m in METRICS} for row, runs in results.items()}}
    for row, runs in results.items():
        table["rows"][row]["phi_gap"] = float(np.mean([r["phi_gap"] for r in runs]))
    for name, ref in (references or {}).items():
        table[name] = {m: (_metric_summary([ref], m) if ref.get(m) is not None else None) for m in METRICS}
    return table


# The paper's Table 2 directions. Each claim is one or more paired differences "a - weight * b" of a metric, per
# test row (same references, prompts and noise in every row); it holds when every difference's 95% interval lies
# above 0, fails when some interval lies below 0, and is undecided otherwise.
CLAIMS = {
    "1_naive_raises_face_sim_over_stage1": [("naive", "stage1", "face_sim", 1.0)],
    "2_lightning_raises_face_sim_over_naive": [("stage2", "naive", "face_sim", 1.0)],
    "3_stage2_lowers_prompt_score_and_purity_below_stage1": [("stage1", "stage2", "prompt_score", 1.0),
                                                             ("stage1", "stage2", "purity", 1.0)],
    "4_stage3_restores_prompt_score_and_purity_to_stage1": [("stage3", "stage1", "prompt_score", 1.0),
                                                            ("stage3", "stage1", "purity", 1.0)],
    "5_stage3_keeps_90pct_of_stage2_face_sim": [("stage3", "stage2", "face_sim", 0.9)],
}


def _difference(results, a: str, b: str, metric: str, weight: float) -> dict:
    va, ids = _per_row(results[a], metric)
    vb, _ = _per_row(results[b], metric)
    diff = va - weight * vb  # (seeds, rows): paired on the same test rows, seed by seed
    mean, lo, hi = bootstrap_interval(diff, ids)
    label = f"{a} - {weight:g} x {b}" if weight != 1 else f"{a} - {b}"
    per_seed = [list(bootstrap_interval(d[None], ids)) for d in diff] if len(diff) > 1 else []
    return {"difference": f"{label}, {metric}", "mean": mean, "ci": [lo, hi], "per_seed": per_seed}


def claims(results: dict[str, list[dict]]) -> dict:
    """Each claim of ``CLAIMS`` with its differences, their intervals and a verdict (held / failed / undecided)."""
    out = {}
    for name, tests in CLAIMS.items():
        diffs = [_difference(results, *test) for test in tests]
        if all(d["ci"][0] > 0 for d in diffs):
            verdict = "held"
        elif any(d["ci"][1] < 0 for d in diffs):
            verdict = "failed"
        else:
            verdict = "undecided"
        out[name] = {"verdict": verdict, "differences": diffs}
    return out


def _cell(s: dict | None, percent: bool = False) -> str:
    if s is None:
        return "—"
    f = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.3f}")
    return f"{f(s['mean'])} [{f(s['ci'][0])}, {f(s['ci'][1])}]"


def markdown_table(table: dict) -> str:
    """Table 2 with 95% intervals (bootstrap over seeds and test identities) and the claims' verdicts."""
    lines = ["| row | Face Sim | recognized | prompt score | purity | Face Sim (paper) | CLIP-T (paper) | CLIP-I (paper) |",
             "|---|---|---|---|---|---|---|---|"]
    named = [("no_id", "no ID (the original model)", None), *((r, ROW_LABELS[r], PAPER[r]) for r in ROWS),
             ("oracle", "oracle: the world's render of the reference with the prompt's attributes", None)]
    for key, label, paper in named:
        r = table["rows"].get(key) or table.get(key)
        if r is None:
            continue
        cells = " | ".join(_cell(r.get(m), percent=m == "recognized") for m in METRICS)
        lines.append(f"| {label} | {cells} | {' | '.join(str(v) for v in paper) if paper else '| |'} |")
    lines.append("")
    lines.append("Cells: mean [95% interval, bootstrap over seeds and test identities]. recognized: share of generations "
                 f"whose phi_eval similarity to the reference reaches {table.get('recognition_threshold', float('nan')):.3f}, "
                 "the threshold accepting 1% of impostor pairs.")
    gaps = ", ".join(f"{ROW_LABELS[r]} {table['rows'][r]['phi_gap']:+.3f}" for r in ROWS if "phi_gap" in table["rows"][r])
    if gaps:
        lines.append(f"phi_loss minus phi_eval Face Sim on the same generations: {gaps}.")
    lines.append("")
    if table.get("overrides"):
        lines.append("Recipe changed for every row: " + ", ".join(f"{k} = {v}" for k, v in table["overrides"].items()))
        lines.append("")
    for claim, c in table.get("claims", {}).items():
        parts = "; ".join(f"{d['difference']} {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                          for d in c["differences"])
        lines.append(f"- {claim}: **{c['verdict']}** ({parts})")
    return "\n".join(lines) + "\n"
