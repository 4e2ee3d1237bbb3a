"""Experiment configs: validation, and which knobs shape which stage (so grids share the stages they can)."""
import pytest

from pulid_lab.lessons.lab import figure_path
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
            parent = stage_key(exp.stage_training(s), parent, models)
            keys.append(parent)
        return keys
    ka, kb = chain(a), chain(b)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]  # lambda_sem shapes Stage 3 only
    kc = chain(Experiment(profile="smoke", id_loss="naive"))
    assert kc[0] == ka[0] and kc[1] != ka[1] and kc[2] != ka[2]  # the ID loss shapes Stage 2 and what follows
    kd = chain(Experiment(profile="smoke", id_source="other"))
    assert len(set(kd) & set(ka)) == 0  # the ID source shapes every stage
    assert chain(Experiment(profile="smoke", id_scale=0.5, ortho="ortho_v2")) == kb  # inference knobs train nothing
    assert Experiment(profile="smoke").stage_training(3).lambda_sem == 0.6
    # the options added later shape every stage when set, and leave the key as it was at their neutral value
    ke = chain(Experiment(profile="smoke", lambda_sem=0.6, face_weight=4.0))
    assert len(set(ke) & set(kb)) == 0
    assert chain(Experiment(profile="smoke", lambda_sem=0.6, face_weight=0.0, id_dropout=0.0)) == kb
    kf = chain(Experiment(profile="smoke", lambda_sem=0.6, stage2_steps=5))
    assert kf[0] == kb[0] and kf[1] != kb[1]  # a stage's own budget shapes it and what follows


def test_smoke_runs_never_write_committed_figures():
    assert figure_path("tour.png", "smoke") is None
    assert figure_path("tour.png", "quick").parts[-2:] == ("figures", "tour.png")


def test_stage_key_changes_with_the_base_model(smoke_models, tmp_path):
    import shutil

    from pulid_lab.models import checkpoints
    models, _ = smoke_models
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    cfg = Experiment(profile="smoke").stage_training(1)
    before = stage_key(cfg, None, copy)
    manifest = checkpoints.read_manifest(copy)
    name = next(k for k, v in manifest["files"].items() if v.get("source") == "base")
    manifest["files"][name]["sha256"] = "0" * 64  # another base model
    checkpoints.write_manifest(copy, manifest)
    assert stage_key(cfg, None, copy) != before


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
