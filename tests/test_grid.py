"""The papermill grid runner: validation before running, a grid through a Dask LocalCluster, failures recorded
while the rest go on, what counts as a finished cell, and the report (resume after kill -9: test_faults.py; a real
experiment grid, with its shared stages: lesson 05 in smoke mode)."""
import json
from pathlib import Path

import pytest
import yaml

from pulid_lab.grid import GridError, load_grid, read_results, report, run_grid
from pulid_lab.lessons.plots import choose_config, pareto_front

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "experiment.ipynb"


def _write(tmp_path, spec) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "grids").glob("*.yaml")))
def test_shipped_grids_load(name):
    from pulid_lab.train.experiment import Experiment
    full, smoke = load_grid(ROOT / "grids" / f"{name}.yaml"), load_grid(ROOT / "grids" / f"{name}.yaml", smoke=True)
    assert full.notebook == NOTEBOOK and len(smoke.configs) <= len(full.configs)
    assert all(p["profile"] == "smoke" for p in smoke.configs.values())
    assert all(p["profile"] in ("quick", "paper") for p in full.configs.values())
    for params in list(full.configs.values()) + list(smoke.configs.values()):
        Experiment.from_params(params)  # every cell is a valid experiment


def test_axes_are_crossed(tmp_path):
    g = load_grid(_write(tmp_path, {"notebook": str(NOTEBOOK), "fixed": {"stage": 3},
                                    "axes": {"lambda_sem": [0.0, 0.6], "lambda_layout": [0.0, 0.1, 0.3]}}))
    assert len(g.configs) == 6
    assert {(p["lambda_sem"], p["lambda_layout"]) for p in g.configs.values()} == {(a, b) for a in (0.0, 0.6) for b in (0.0, 0.1, 0.3)}
    assert all(p["stage"] == 3 for p in g.configs.values())


@pytest.mark.parametrize("spec, message", [
    ({"notebook": str(NOTEBOOK), "axes": {"lambda_semantic": [0.1]}}, "unknown parameter(s) ['lambda_semantic']"),
    ({"notebook": "missing.ipynb", "axes": {"stage": [1]}}, "not found"),
    ({"axes": {"stage": [1]}}, "missing `notebook:`"),
    ({"notebook": str(NOTEBOOK), "axes": {"stage": [1]}, "configs": [{"stage": 2}]}, "exactly one of"),
    ({"notebook": str(NOTEBOOK), "axes": {"stage": []}}, "non-empty list"),
    ({"notebook": str(NOTEBOOK), "configs": [{"name": "a"}, {"name": "a"}]}, "two configs are named"),
    ({"notebook": str(NOTEBOOK), "axes": {"result_path": ["x"]}}, "set by the runner"),
    ({"notebook": str(NOTEBOOK), "axis": {"stage": [1]}}, "unknown key(s) ['axis']"),
    ("notebook: [unclosed\n", "not valid YAML"),
])
def test_bad_grid_files_fail_before_running(tmp_path, spec, message):
    with pytest.raises(GridError) as e:
        load_grid(_write(tmp_path, spec))
    assert message in str(e.value)


def test_missing_grid_file(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")


def test_choose_config_takes_the_most_faithful_of_the_editable_ones():
    rows = [{"config": c, "face_sim": f, "prompt_score": p} for c, f, p in
            [("a", 0.70, 0.60), ("b", 0.60, 0.78), ("c", 0.50, 0.80), ("d", 0.55, 0.79)]]
    pick, why = choose_config(rows, tolerance=0.03)
    assert pick["config"] == "b" and "3 of 4 configs" in why
    assert pick in pareto_front(rows, "face_sim", "prompt_score")
    assert choose_config(rows, tolerance=0.5)[0]["config"] == "a"
    with pytest.raises(ValueError):
        choose_config([])


def test_pareto_front():
    rows = [{"config": "a", "x": 0.1, "y": 0.9}, {"config": "b", "x": 0.5, "y": 0.5}, {"config": "c", "x": 0.4, "y": 0.4},
            {"config": "d", "x": 0.9, "y": 0.1}, {"config": "e", "x": 0.5, "y": 0.5}]
    assert [r["config"] for r in pareto_front(rows, "x", "y")] == ["a", "b", "e", "d"]


def test_a_grid_on_a_dask_cluster_records_failures_and_reports(tmp_path):
    """The runner on a Dask LocalCluster by its scheduler address, with tests/data/grid_cell.ipynb standing in for
    experiment.ipynb (seconds per cell: a real experiment grid runs in lesson 05's smoke run, and resume after a kill
    in test_faults.py): every config runs, a failing one is recorded with its error and partial notebook while the
    others finish, and the report reads the results."""
    from dask.distributed import LocalCluster
    spec = {"notebook": str(ROOT / "tests" / "data" / "grid_cell.ipynb"),
            "configs": [{"value": v} for v in (0.25, 0.75)] + [{"name": "broken", "value": -1.0}]}
    grid = load_grid(_write(tmp_path, spec))
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = run_grid(grid, out, scheduler=cluster.scheduler_address, threads_per_config=1, progress=False)
    assert summary["ran"] == 3 and summary["failed"] == ["broken"]
    failures = json.loads((out / "failures.json").read_text())
    assert "value must be >= 0" in failures["broken"]["error"]
    assert (out / "runs" / "broken" / "notebook.ipynb").exists()  # the partial notebook is kept
    rows = read_results(out)
    assert sorted(r["face_sim"] for r in rows) == [0.25, 0.75]
    results = [json.loads((out / "runs" / r["config"] / "result.json").read_text()) for r in rows]
    assert [res["grid_params"]["value"] for res in results] == [r["value"] for r in rows]
    # Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_ (a training kernel then ran 3x slower): the kernels lack it
    assert [res["malloc_trim_threshold"] for res in results] == [None, None]
    rep = report(out)
    assert Path(rep["figure"]).stat().st_size > 1000 and "value" in rep["markdown"]


@pytest.mark.parametrize("varied", [[], ["lambda_sem"], ["lambda_sem", "lambda_layout"], ["a", "b", "c"]])
def test_pareto_plot_encodes_up_to_two_varied_parameters(tmp_path, varied):
    from pulid_lab.lessons import plots
    rows = [{"config": f"c{i}", "face_sim": 0.1 * i, "prompt_score": 0.9 - 0.1 * i, "purity": 0.95 - 0.01 * i,
             **{k: (i + j) % 3 for j, k in enumerate(varied)}} for i in range(6)]
    table2 = {"rows": {"stage1": {m: {"mean": 0.5} for m in ("face_sim", "prompt_score", "purity")}}}
    plots.pareto(rows, table2, out=tmp_path / "p.png", title="t", varied=varied)
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_a_cell_is_done_only_when_the_runner_recorded_the_same_parameters(tmp_path):
    from pulid_lab.grid import valid_result
    metrics = {"face_sim": 0.5, "recognized": 0.2, "prompt_score": 0.9, "purity": 0.95}
    (tmp_path / "result.json").write_text("{ half written")
    assert valid_result(tmp_path, {"lambda_sem": 0.6}) is None
    (tmp_path / "result.json").write_text(json.dumps(metrics))  # the notebook's own write, killed before the runner's
    assert valid_result(tmp_path, {"lambda_sem": 0.6}) is None
    (tmp_path / "result.json").write_text(json.dumps({**metrics, "grid_params": {"lambda_sem": 0.6}}))
    assert valid_result(tmp_path, {"lambda_sem": 0.6})["face_sim"] == 0.5
    assert valid_result(tmp_path, {"lambda_sem": 0.3}) is None  # another --set: rerun, never relabel


def test_a_cell_whose_adapter_the_same_parameters_no_longer_train_is_not_done(tmp_path):
    """A profile's budget changed after the grid ran (same --set, another stage key): the cell runs again."""
    from dataclasses import asdict

    from pulid_lab.grid import valid_result
    from pulid_lab.train.experiment import Experiment, stage_dirs
    exp = Experiment(profile="quick", stage=3, lambda_sem=0.0)
    now = stage_dirs(exp, tmp_path / "stages")[-1]
    result = {"face_sim": 0.5, "recognized": 0.2, "prompt_score": 0.9, "purity": 0.95, "params": asdict(exp),
              "grid_params": {"lambda_sem": 0.0}}
    (tmp_path / "result.json").write_text(json.dumps({**result, "adapter": str(now)}))
    assert valid_result(tmp_path, {"lambda_sem": 0.0}, tmp_path / "stages")["face_sim"] == 0.5
    older = stage_dirs(Experiment(profile="quick", stage=3, lambda_sem=0.0, stage2_steps=600), tmp_path / "stages")[-1]
    assert older.name != now.name
    (tmp_path / "result.json").write_text(json.dumps({**result, "adapter": str(older)}))
    assert valid_result(tmp_path, {"lambda_sem": 0.0}, tmp_path / "stages") is None
    assert valid_result(tmp_path, {"lambda_sem": 0.0})["face_sim"] == 0.5  # without a stages folder: parameters only
    (tmp_path / "result.json").write_text(json.dumps({**result, "adapter": str(now), "params": {"renamed": 1}}))
    assert valid_result(tmp_path, {"lambda_sem": 0.0}, tmp_path / "stages") is None

