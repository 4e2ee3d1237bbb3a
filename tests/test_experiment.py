"""Experiment configs: validation, and which knobs shape which stage (so grids share the stages they can)."""
import json
import os

import pytest

from pulid_lab.lessons.lab import committed_figure, figure_path, runs_dir
from pulid_lab.train.experiment import Experiment, stage_key


def test_unknown_and_bad_parameters_are_clear():
    with pytest.raises(ValueError, match=r"unknown experiment parameter\(s\) \['lambda_semantic'\]"):
        Experiment.from_params({"lambda_semantic": 0.3})
    with pytest.raises(ValueError, match="ortho must be one of"):
        Experiment(ortho="yes")
    with pytest.raises(ValueError, match="id_loss must be"):
        Experiment(id_loss="exact")
    with pytest.raises(ValueError, match="profile must be one of"):
        Experiment(profile="huge")
    with pytest.raises(ValueError, match="eval_split must be one of"):
        Experiment(eval_split="train")


def test_stage_keys_depend_only_on_the_knobs_a_stage_uses(smoke_models):
    models, _ = smoke_models
    a, b = Experiment(profile="smoke", lambda_sem=0.0), Experiment(profile="smoke", lambda_sem=0.6)

    def chain(exp):
        keys, parent = [], None
        for s in (1, 2, 3):
            parent = stage_key(exp.stage_training(s), parent, models, exp.budget.bank_variants)
            keys.append(parent)
        return keys
    ka, kb = chain(a), chain(b)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]  # lambda_sem shapes Stage 3 only
    kc = chain(Experiment(profile="smoke", id_loss="naive"))
    assert kc[0] == ka[0] and kc[1] != ka[1] and kc[2] != ka[2]  # the ID loss shapes Stage 2 and what follows
    naive_k4 = chain(Experiment(profile="smoke", id_loss="naive", grad_steps=4))
    assert naive_k4[:2] == kc[:2]  # k (Lightning steps backpropagated) shapes neither Stage 1 nor the naive row ...
    k4 = chain(Experiment(profile="smoke", grad_steps=4))
    assert k4[0] == ka[0] and k4[1] != ka[1]  # ... but the Lightning Stage 2
    kd = chain(Experiment(profile="smoke", id_source="other"))
    assert len(set(kd) & set(ka)) == 0  # the ID source shapes every stage
    default = chain(Experiment(profile="smoke"))
    assert chain(Experiment(profile="smoke", id_scale=0.5, ortho="ortho_v2")) == default  # inference knobs train nothing
    assert Experiment(profile="smoke").stage_training(3).lambda_sem == 0.15  # a quarter of the paper's 0.6
    # the options added later shape every stage when set, and leave the key as it was at their neutral value
    ke = chain(Experiment(profile="smoke", lambda_sem=0.6, face_weight=4.0))
    assert len(set(ke) & set(kb)) == 0
    assert chain(Experiment(profile="smoke", lambda_sem=0.6, face_weight=0.0, id_dropout=0.0)) == kb
    kg = chain(Experiment(profile="smoke", lambda_sem=0.6, align_every_step=False))
    assert kg[:2] == kb[:2] and kg[2] != kb[2]  # alignment at every Lightning step shapes Stage 3 only
    km = chain(Experiment(profile="smoke", lambda_sem=0.6, align_token_mask=True))
    assert km[:2] == kb[:2] and km[2] != kb[2]  # so does masking the padding out of L_align_sem
    from pulid_lab.train.experiment import STAGE3_ONLY
    old = chain(Experiment(profile="smoke", **STAGE3_ONLY))  # the Stage 3 defaults before alignment at every step
    assert old[:2] == kb[:2]  # Stage 3's defaults do not shape the keys of Stages 1 and 2
    from pulid_lab.train.experiment import STAGE2_ON
    kh = chain(Experiment(profile="smoke", lambda_sem=0.6, lambda_id=STAGE2_ON["lambda_id"]))
    assert kh[0] == kb[0] and kh[1] != kb[1]  # the ID loss's weight shapes Stage 2 on, never Stage 1
    kf = chain(Experiment(profile="smoke", lambda_sem=0.6, stage2_steps=5))
    assert kf[0] == kb[0] and kf[1] != kb[1]  # a stage's own budget shapes it and what follows


def test_lessons_write_committed_figures_only_when_asked(monkeypatch):
    monkeypatch.delenv("PULID_LAB_UPDATE_FIGURES", raising=False)
    assert figure_path("tour.png", "smoke") is None
    assert figure_path("tour.png", "quick") == runs_dir() / "figures" / "quick" / "tour.png"
    assert figure_path("tour.png", "quick") != committed_figure("tour.png")
    monkeypatch.setenv("PULID_LAB_UPDATE_FIGURES", "1")
    assert figure_path("tour.png", "quick") == committed_figure("tour.png")
    assert committed_figure("tour.png").parts[-2:] == ("figures", "tour.png")


def test_stage_key_changes_with_the_base_model(smoke_models, tmp_path):
    import shutil

    from pulid_lab.models import checkpoints
    models, _ = smoke_models
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    cfg = Experiment(profile="smoke").stage_training(1)
    before = stage_key(cfg, None, copy, 2)
    manifest = checkpoints.read_manifest(copy)
    name = next(k for k, v in manifest["files"].items() if v.get("source") == "base")
    manifest["files"][name]["sha256"] = "0" * 64  # another base model
    checkpoints.write_manifest(copy, manifest)
    assert stage_key(cfg, None, copy, 2) != before
    assert stage_key(cfg, None, models, 2) != stage_key(cfg, None, models, 8)  # another training bank


def test_defaults_have_one_source():
    """Experiment's training knobs default to PuLIDTraining's, and experiment.ipynb's parameters cell (literals,
    for papermill) states the same values, so a grid cell without overrides is the main job's recipe."""
    import ast
    from dataclasses import fields
    from pathlib import Path

    from pulid_lab.train.pulid_trainer import PuLIDTraining

    exp, training = Experiment(), PuLIDTraining()
    shared = ({f.name for f in fields(Experiment)} & {f.name for f in fields(PuLIDTraining)}) - {"stage"}  # stage: last vs own
    assert {"lambda_sem", "lambda_layout", "align_reduction", "reference_view", "id_loss"} <= shared
    assert {k: getattr(exp, k) for k in shared} == {k: getattr(training, k) for k in shared}

    import papermill  # the grid runner reads the parameters cell the same way
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "experiment.ipynb"
    literals = {name: ast.literal_eval(p["default"]) for name, p in papermill.inspect_notebook(str(notebook)).items()
                if name != "profile"}  # profile's default is an expression (smoke under CI)
    knobs = {f.name for f in fields(Experiment)} - {"profile"}
    assert knobs <= set(literals), f"experiment.ipynb lacks parameters {sorted(knobs - set(literals))}"
    assert {k: literals[k] for k in knobs} == {k: getattr(exp, k) for k in knobs}


def test_shipped_stages_are_used_for_the_same_recipe_only(smoke_models, tmp_path, monkeypatch):
    """A stage trained once and shipped beside the models is copied (sha256-checked), not retrained, by any chain
    with the same key; ``pretrained=False`` retrains, and a changed recipe never takes it."""
    import shutil

    from pulid_lab.models import checkpoints
    from pulid_lab.train import experiment
    from pulid_lab.train.pulid_trainer import PuLIDTrainer
    models, _ = smoke_models
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    exp = Experiment(profile="smoke", stage=2)
    trained = experiment.train_chain(exp, tmp_path / "trained", copy, progress=False)
    for folder in (tmp_path / "trained").glob("stage*"):
        dest = experiment.shipped_stages_dir(copy) / folder.name
        dest.mkdir(parents=True)
        for name in experiment.SHIPPED_FILES:
            shutil.copy2(folder / name, dest / name)

    def no_training(self, *a, **k):
        raise RuntimeError("trained")
    monkeypatch.setattr(PuLIDTrainer, "fit", no_training)
    used = experiment.train_chain(exp, tmp_path / "user", copy, progress=False)
    assert used.name == trained.name and not (used / "train_state.pt").exists()
    assert checkpoints.load_state("adapter", used)[1]["sha256"] == checkpoints.load_state("adapter", trained)[1]["sha256"]
    with pytest.raises(RuntimeError, match="trained"):
        experiment.train_chain(exp, tmp_path / "retrain", copy, progress=False, pretrained=False)
    with pytest.raises(RuntimeError, match="trained"):  # another Stage 2 recipe: Stage 1 is shipped, Stage 2 is not
        experiment.train_chain(Experiment(profile="smoke", stage=2, lambda_id=0.5), tmp_path / "other", copy,
                               progress=False)
    assert len(list((tmp_path / "other").glob("stage1-*/adapter.safetensors"))) == 1
    # a corrupted shipped file is refused with the checkpoint's error, not used
    victim = next(experiment.shipped_stages_dir(copy).glob("stage1-*")) / "adapter.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(checkpoints.CheckpointError, match="corrupted"):
        experiment.train_chain(exp, tmp_path / "corrupt", copy, progress=False)


def test_numbers_written_as_yaml_reads_them_are_taken_and_wrong_types_refused():
    exp = Experiment.from_params({"profile": "smoke", "stage2_steps": "1e3", "lr": "3e-3", "lambda_sem": 1})
    assert exp.stage2_steps == 1000 and exp.lr == 0.003 and exp.lambda_sem == 1.0
    with pytest.raises(ValueError, match="stage2_steps must be an int, got 2.5"):
        Experiment(stage2_steps=2.5)
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        Experiment(lr="fast")
    with pytest.raises(ValueError, match="reconstruction must be a bool"):
        Experiment(reconstruction="yes")


def test_the_main_jobs_stages_ship_with_the_models():
    """`make demo` (quick, seed 0) finds every stage of every Table 2 row among the shipped stages: a change of a
    default that silently changes a key (and would make the main job retrain for 1.5 h) fails here."""
    from pathlib import Path

    from pulid_lab.train.experiment import shipped_stages_dir, stage_dirs
    from pulid_lab.train.reproduce import ROWS, row_experiment
    shipped = {p.name for p in shipped_stages_dir().iterdir() if (p / "adapter.safetensors").exists()}
    for row in ROWS:
        needed = {d.name for d in stage_dirs(row_experiment(row, "quick", 0), Path("unused"))}
        assert needed <= shipped, f"{row}: {sorted(needed - shipped)} not shipped"


def test_a_results_adapter_path_survives_moving_the_run_folder(tmp_path):
    """A grid cell's result.json names its adapter relative to itself: the folder moved elsewhere still finds it."""
    from pulid_lab.train.experiment import adapter_of, write_result
    run = tmp_path / "run"
    adapter = run / "stages" / "stage3-abc"
    adapter.mkdir(parents=True)
    (adapter / "adapter.safetensors").write_bytes(b"x")
    result_path = write_result(run / "cells" / "cell-0" / "result.json", {"face_sim": 0.5, "adapter": str(adapter)})
    assert json.loads(result_path.read_text())["adapter"] == os.path.join("..", "..", "stages", "stage3-abc")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    assert (adapter_of(moved / "cells" / "cell-0" / "result.json") / "adapter.safetensors").read_bytes() == b"x"
