"""Ablation grids: a YAML file -> many papermill runs of one notebook, on a local Dask pool or a Dask cluster.

A grid file::

    notebook: ../notebooks/experiment.ipynb      # relative to the YAML file
    fixed: {stage: 3}                            # parameters every config gets
    axes:                                        # crossed: 2 x 2 = 4 configs ...
      lambda_sem: [0.0, 0.6]
      lambda_layout: [0.0, 0.1]
    # configs: [{name: pulid, lambda_sem: 0.6}, ...]   # ... or an explicit list (optional `name`)
    smoke:                                       # what `--smoke` changes (CI runs it)
      fixed: {profile: smoke}

Each config runs into ``OUT/runs/<name>/`` (``notebook.ipynb`` + the ``result.json`` the notebook writes).
A rerun skips configs whose result.json is valid for the same parameters; a failure is recorded in
``OUT/failures.json`` (the partial notebook stays) and the others go on; ``OUT/results.csv`` gathers every
result. Every file is written atomically, so killing the runner at any moment loses no finished result.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from .core.files import write_csv, write_json
from .train.evaluate import METRICS
from .train.experiment import Experiment, stage_dirs

INJECTED = ("result_path", "stages_dir")  # parameters the runner sets for every config


class GridError(ValueError):
    """A grid file that cannot run; raised before anything runs."""


@dataclass
class Grid:
    path: Path
    notebook: Path
    configs: dict[str, dict]  # name -> parameters (fixed merged in)
    notebook_parameters: list[str] = field(default_factory=list)


def _config_name(params: dict) -> str:
    name = "__".join(f"{k}-{v}" for k, v in params.items())
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name) or "default"


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_grid(path: str | Path, smoke: bool = False) -> Grid:
    """Parse and check a grid file: notebook present, parameters known to the notebook, configs well formed."""
    path = Path(path)
    if not path.exists():
        raise GridError(f"grid file {path} does not exist (shipped grids are under grids/)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with keys notebook, fixed, axes or configs, smoke")
    unknown_keys = set(spec) - {"notebook", "fixed", "axes", "configs", "smoke", "description"}
    if unknown_keys:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown_keys)}; allowed: notebook, fixed, axes, configs, smoke, description")
    if smoke:
        spec = _merge({k: v for k, v in spec.items() if k != "smoke"}, spec.get("smoke") or {})
    if "notebook" not in spec:
        raise GridError(f"{path}: missing `notebook:` (the notebook each config runs)")
    notebook = (path.parent / spec["notebook"]).resolve()
    if not notebook.exists():
        raise GridError(f"{path}: notebook {spec['notebook']} not found (looked for {notebook})")
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise GridError(f"{path}: `fixed` must be a mapping of parameter: value")
    configs = _expand(path, spec, fixed)
    import papermill
    known = list(papermill.inspect_notebook(str(notebook)).keys())
    for name, params in configs.items():
        bad = sorted(set(params) - set(known))
        if bad:
            raise GridError(f"{path}: config {name!r} sets unknown parameter(s) {bad}; "
                            f"{notebook.name}'s parameters cell defines {known}")
        reserved = sorted(set(params) & set(INJECTED))
        if reserved:
            raise GridError(f"{path}: {reserved} are set by the runner for every config; remove them")
    return Grid(path, notebook, configs, known)


def _expand(path: Path, spec: dict, fixed: dict) -> dict[str, dict]:
    axes, listed = spec.get("axes"), spec.get("configs")
    if (axes is None) == (listed is None):
        raise GridError(f"{path}: give exactly one of `axes` (lists to cross) or `configs` (an explicit list)")
    configs: dict[str, dict] = {}
    if axes is not None:
        if not isinstance(axes, dict) or not axes:
            raise GridError(f"{path}: `axes` must map parameter names to non-empty lists")
        for k, v in axes.items():
            if not isinstance(v, list) or not v:
                raise GridError(f"{path}: axis {k!r} must be a non-empty list, got {v!r}")
        for values in itertools.product(*axes.values()):
            varied = dict(zip(axes, values))
            configs[_config_name(varied)] = {**fixed, **varied}
    else:
        if not isinstance(listed, list) or not listed:
            raise GridError(f"{path}: `configs` must be a non-empty list of mappings")
        for i, c in enumerate(listed):
            if not isinstance(c, dict):
                raise GridError(f"{path}: configs[{i}] must be a mapping, got {c!r}")
            c = dict(c)
            name = str(c.pop("name", None) or _config_name(c))
            if name in configs:
                raise GridError(f"{path}: two configs are named {name!r}")
            configs[re.sub(r"[^A-Za-z0-9_.=-]", "_", name)] = {**fixed, **c}
    return configs


# -- running -----------------------------------------------------------------------------------------------

def valid_result(folder: Path, params: dict, stages_dir: Path | None = None) -> dict | None:
    """The config's result.json if it is complete and the runner recorded it as made with these parameters (a
    result without the runner's ``grid_params``, e.g. the notebook's own write before a kill, is not done). With
    ``stages_dir``, a result is also not done when its adapter is not the one the same parameters give now: same
    ``--set``, but a profile's budgets, a default or the models changed since (the stage key differs)."""
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not all(isinstance(result.get(m), (int, float)) for m in METRICS):
        return None
    if result.get("grid_params") != params:
        return None
    if stages_dir is not None and "adapter" in result and "params" in result:
        if Path(result["adapter"]).name != _adapter_now(result["params"], stages_dir, params.get("models_dir")):
            return None
    return result


def _adapter_now(experiment_params: dict, stages_dir: Path, models_dir: str | None) -> str | None:
    """The folder name (``stage<k>-<key>``) of the adapter an experiment with these parameters trains today."""
    try:
        return stage_dirs(Experiment(**experiment_params), stages_dir, models_dir)[-1].name
    except (TypeError, ValueError):  # parameters of an older Experiment: its result is stale
        return None


def stages_dir_of(out: Path) -> Path:
    """Where a grid's cells train and share their stages: ``OUT/stages``."""
    return (Path(out) / "stages").resolve()


def run_config(notebook: str, folder: str, params: dict, threads: int | None = None) -> dict:
    """Execute the notebook for one config (on a Dask worker). Never raises: failures come back as data."""
    import papermill
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if threads:  # the kernel inherits it: N configs share the cores instead of each taking all of them
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands every freed tensor back to the
    # OS at once, and a training kernel spent 30% of its time in the system, each step 3x as long as outside a grid
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    t0 = time.time()
    try:
        papermill.execute_notebook(notebook, str(folder / "notebook.ipynb"), parameters=params, progress_bar=False,
                                   cwd=str(folder))
        result = json.loads((folder / "result.json").read_text())
        return {"ok": True, "seconds": round(time.time() - t0, 1), "result": result}
    except Exception as e:  # noqa: BLE001 - recorded in failures.json, the grid goes on
        return {"ok": False, "seconds": round(time.time() - t0, 1), "error": f"{type(e).__name__}: {e}"[:4000],
                "traceback": traceback.format_exc()[-4000:]}


def write_results_csv(out: Path, grid: Grid) -> Path:
    """Every valid result with its parameters, one row per config (a stale one, see ``valid_result``, left out)."""
    rows = []
    for name, params in grid.configs.items():
        r = valid_result(out / "runs" / name, params, stages_dir_of(out))
        if r is not None:
            own = r.get("reconstruction") or {}
            rows.append({"config": name, **{k: v for k, v in params.items()},
                         **{m: r[m] for m in METRICS}, **{f"own_caption_{m}": own[m] for m in METRICS if m in own},
                         "n": r.get("n"), "seconds": r.get("seconds")})
    return write_csv(out / "results.csv", rows, list(dict.fromkeys(k for row in rows for k in row)))


def run_grid(grid: Grid, out: str | Path, workers: int = 1, scheduler: str | None = None,
             threads_per_config: int | None = None, progress: bool = True) -> dict:
    """Run every config not yet done; returns {done, skipped, failed, seconds}."""
    from dask.distributed import Client, LocalCluster, as_completed
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    stages = str(stages_dir_of(out))
    todo = {n: p for n, p in grid.configs.items() if valid_result(out / "runs" / n, p, stages) is None}
    skipped = len(grid.configs) - len(todo)
    failures_path = out / "failures.json"
    failures = {}
    t0 = time.time()
    if todo:
        if threads_per_config is None and scheduler is None:
            threads_per_config = max(1, (os.cpu_count() or 1) // max(1, workers))
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        try:
            futures = {}
            for name, params in todo.items():
                folder = (out / "runs" / name).resolve()
                injected = {**params, "result_path": str(folder / "result.json"), "stages_dir": stages}
                fut = client.submit(run_config, str(grid.notebook), str(folder), injected, threads_per_config,
                                    key=f"grid-{name}-{time.time_ns()}", pure=False)
                futures[fut] = name
            bar = tqdm(total=len(todo), desc=f"grid {grid.path.stem}", disable=not progress)
            for fut in as_completed(futures):
                name, rep = futures[fut], fut.result()
                folder = out / "runs" / name
                if rep["ok"]:  # remember the grid parameters beside the notebook's result (atomic rewrite)
                    write_json(folder / "result.json", {**rep["result"], "grid_params": grid.configs[name]})
                else:
                    failures[name] = {"params": grid.configs[name], "error": rep["error"],
                                      "traceback": rep["traceback"], "notebook": str(folder / "notebook.ipynb")}
                write_json(failures_path, failures, default=str)
                write_results_csv(out, grid)
                bar.set_postfix(failed=len(failures))
                bar.update()
            bar.close()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        write_json(failures_path, failures, default=str)
    write_results_csv(out, grid)
    return {"configs": len(grid.configs), "ran": len(todo), "skipped": skipped, "failed": sorted(failures),
            "seconds": round(time.time() - t0, 1), "results": str(out / "results.csv")}


# -- reading -----------------------------------------------------------------------------------------------

def read_results(out: str | Path) -> list[dict]:
    """results.csv as dicts with numbers parsed."""
    path = Path(out) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `pulid-lab grid GRID.yaml --out {out}` first")
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def varied_parameters(rows: list[dict]) -> list[str]:
    """The parameters that take more than one value across a grid's result rows."""
    return [k for k in rows[0] if k not in (*METRICS, "config", "n", "seconds") and not k.startswith("own_caption_")
            and len({r[k] for r in rows}) > 1]


def report(out: str | Path, figure: str | Path | None = None, table2: str | Path | None = None) -> dict:
    """Pareto plot (Face Sim vs prompt score and vs purity) + a markdown table of a finished grid."""
    from .lessons import plots
    from .lessons.plots import pareto_front
    out = Path(out)
    rows = read_results(out)
    if not rows:
        raise GridError(f"{out}/results.csv has no results yet")
    paper_rows = json.loads(Path(table2).read_text()) if table2 else None
    fig_path = Path(figure) if figure else out / "pareto.png"
    varied = varied_parameters(rows)
    plots.pareto(rows, paper_rows, out=fig_path, title=out.name, varied=varied)
    lines = ["| " + " | ".join(varied + list(METRICS)) + " | Pareto (prompt score) | Pareto (purity) |",
             "|" + "---|" * (len(varied) + len(METRICS) + 2)]
    front_p = {r["config"] for r in pareto_front(rows, "face_sim", "prompt_score")}
    front_u = {r["config"] for r in pareto_front(rows, "face_sim", "purity")}
    for r in sorted(rows, key=lambda r: [r[k] for k in varied]):
        cells = [str(r[k]) for k in varied] + [f"{r[m]:.3f}" for m in METRICS]
        cells += ["yes" if r["config"] in front_p else "", "yes" if r["config"] in front_u else ""]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    return {"figure": str(fig_path), "table": str(out / "report.md"), "markdown": md}
