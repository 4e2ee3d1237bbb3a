import json
import os

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
    with pytest.raises(SystemExit, match="error: unknown network"):
        main(["pretrain", "--profile", "smoke", "--out", str(tmp_path), "--only", "phi_evil"])


@pytest.mark.parametrize("setting, message", [("lambda_sem", "expected NAME=VALUE"), ("profile=paper", "expected NAME=VALUE"),
                                              ("id_source=mirror", "id_source")])
def test_reproduce_rejects_a_bad_recipe_change_before_training(setting, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--profile", "smoke", "--out", str(tmp_path / "run"), "--set", setting])
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_curve_evaluates_the_last_stage_at_each_milestone(smoke_models, tmp_path, capsys):
    models, _ = smoke_models
    out = tmp_path / "curve.json"
    main(["curve", "--set", "profile=smoke", "stage=2", "stage2_steps=3", "eval_ids=1", "--milestones", "1", "3",
          "--stages", str(tmp_path / "stages"), "--out", str(out), "--models", str(models)])
    saved = json.loads(out.read_text())
    assert [p["step"] for p in saved["points"]] == [1, 3]
    assert saved["experiment"]["eval_split"] == "validation" and "recognized" in saved["points"][1]["reconstruction"]
    assert saved["device"] == "cpu"  # where it trained, recorded
    assert len(list((tmp_path / "stages").glob("stage2-*/adapter.safetensors"))) == 1  # the finished stage is kept
    assert "recognized" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="milestones must lie in 1..3"):
        main(["curve", "--set", "profile=smoke", "stage=2", "stage2_steps=3", "--milestones", "5",
              "--stages", str(tmp_path / "stages"), "--out", str(out), "--models", str(models)])


@pytest.mark.parametrize("argv, message", [
    (["sample", "a portrait, sketch", "--steps", "0"], "--steps must be at least 1"),
    (["sample", "a portrait, sketch", "--zoom", "0"], "--zoom must be at least 1"),
    (["sample", "a portrait, sketch", "--guidance", "nan"], "--guidance must be a finite number"),
    (["reproduce", "--profile", "smoke", "--seeds", "0"], "--seeds must be at least 1"),
    (["grid", "grids/alignment.yaml", "--out", "x", "--workers", "0"], "--workers must be at least 1"),
])
def test_bad_numbers_stop_before_any_work_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_corrupted_adapter_or_manifest_is_one_line_naming_the_file_and_the_fix(smoke_models, tmp_path, capsys):
    import shutil

    from pulid_lab.train.experiment import Experiment, train_chain
    models, _ = smoke_models
    folder = train_chain(Experiment(profile="smoke", stage=1), tmp_path / "stages", models, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "adapter.safetensors").read_bytes()
    (broken / "adapter.safetensors").write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(broken), "--models", str(models), "--ids", "1"])
    assert "corrupted" in str(e.value) and f"delete {broken}" in str(e.value) and "\n" not in str(e.value)
    (broken / "manifest.json").write_text("{ half")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(broken), "--models", str(models), "--ids", "1"])
    assert "manifest.json is not valid JSON" in str(e.value) and f"delete {broken}" in str(e.value)
    with pytest.raises(SystemExit) as e:  # a wrong path: no pretraining hint, the folders that hold adapters
        main(["evaluate", str(tmp_path / "no_such_stage"), "--models", str(models), "--ids", "1"])
    assert "no trained adapter in" in str(e.value) and "pulid-lab reproduce" in str(e.value)
    assert "pretrain" not in str(e.value) and "\n" not in str(e.value)
    # a corrupted stage inside a run folder is rebuilt by the command that made it, from its final checkpoint
    (folder / "adapter.safetensors").write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = train_chain(Experiment(profile="smoke", stage=1), tmp_path / "stages", models, progress=False)
    assert (again / "adapter.safetensors").read_bytes() == data


def test_a_run_folder_has_one_writer_at_a_time(tmp_path):
    import subprocess
    import sys
    import time

    from pulid_lab.core.files import RunFolderBusy, run_lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pulid_lab.core.files import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
        with pytest.raises(SystemExit, match=f"being written by another process \\(pid {holder.pid}\\)"):
            main(["reproduce", "--profile", "smoke", "--out", str(tmp_path)])
    finally:
        holder.kill(), holder.wait()
    time.sleep(0.1)
    with run_lock(tmp_path):  # released when its holder dies, even by kill -9
        pass


def test_a_full_disk_is_one_sentence_and_leaves_no_tmp_file(tmp_path, monkeypatch):
    import errno

    from pulid_lab.core.files import write_json

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(OSError, match="could not write .*a.json \\(No space left on device\\): free disk space"):
        write_json(tmp_path / "a.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_the_next_write_removes_the_tmp_file_of_a_writer_killed_mid_write(tmp_path):
    import subprocess
    import sys

    from pulid_lab.core.files import write_json
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.json.{int(dead.stdout)}.tmp"  # what kill -9 between write and rename leaves
    live = tmp_path / f".a.json.{os.getppid()}.tmp"  # a writer still running (our parent): kept
    other = tmp_path / f".b.json.{int(dead.stdout)}.tmp"  # another file's: not ours to touch
    for f in (stale, live, other):
        f.write_text("half")
    write_json(tmp_path / "a.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", live.name, other.name])


class _MovedTo(Exception):
    pass


@pytest.mark.parametrize("argv", [
    ["curve", "--set", "profile=smoke", "stage=2", "--milestones", "1", "--stages", "stages", "--out", "c.json"],
    ["reproduce", "--profile", "smoke", "--out", "run"],
    ["evaluate", "x", "--ids", "1"],
])
def test_without_device_the_original_model_goes_to_cuda_when_available(argv, smoke_models, tmp_path, monkeypatch):
    """No --device means CUDA when available: a `curve` once trained on the CPU of a GPU machine because the model
    was loaded without a device (and its trainer followed the model). CUDA is faked; the move is caught, not made."""
    import torch

    from pulid_lab.models.base import OriginalModel
    models, _ = smoke_models
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def caught(self, device=None, *args, **kwargs):
        raise _MovedTo(str(device))
    monkeypatch.setattr(OriginalModel, "to", caught)
    with pytest.raises(_MovedTo, match="^cuda$"):
        main(argv + ["--models", str(models)])
