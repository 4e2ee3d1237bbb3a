import json

import pytest
from PIL import Image

from pulid_lab.cli import main


def test_world_figure(tmp_path):
    out = tmp_path / "toyfaces.png"
    main(["world", "--out", str(out)])
    img = Image.open(out)
    assert img.size[0] > 600 and img.size[1] > 300


def test_sample_writes_an_image_and_rejects_unknown_words(smoke_models, tmp_path, capsys):
    models, _ = smoke_models
    out = tmp_path / "x.png"
    main(["sample", "a portrait, sketch, blue background, glasses", "--seed", "0", "--steps", "4",
          "--models", str(models), "--out", str(out)])
    assert Image.open(out).size == (128, 128)
    with pytest.raises(SystemExit) as e:
        main(["sample", "a portrait, anime", "--models", str(models), "--out", str(out)])
    assert "'anime'" in str(e.value) and "sketch" in str(e.value)


def test_check_models_prints_one_json_object(smoke_models, capsys):
    models, _ = smoke_models
    main(["check-models", "--models", str(models), "--json", "--variants", "2", "--pairs", "100",
          "--generations", "8", "--skip-base"])
    report = json.loads(capsys.readouterr().out)
    assert "probe_accuracy" in report and "passed" in report


def test_pretrain_rejects_unknown_network_names(tmp_path):
    with pytest.raises(ValueError, match="unknown network"):
        main(["pretrain", "--profile", "smoke", "--out", str(tmp_path), "--only", "phi_evil"])


@pytest.mark.parametrize("setting, message", [("lambda_sem", "expected NAME=VALUE"), ("profile=paper", "expected NAME=VALUE"),
                                              ("id_source=mirror", "id_source")])
def test_reproduce_rejects_a_bad_recipe_change_before_training(setting, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--profile", "smoke", "--out", str(tmp_path / "run"), "--set", setting])
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
