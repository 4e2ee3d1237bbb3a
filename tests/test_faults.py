"""kill -9 where it hurts: inside each training stage of a chain, and inside a grid cell. A killed process loses
at most the step (or cell) it was in; rerunning the same command continues and ends where an uninterrupted run
ends. A reference with no face is refused. (The other faults — corrupted files, bad arguments, a full disk, two
writers — are in test_cli.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAIN = dict(profile="smoke", stage=3, stage1_steps=6, stage2_steps=4, stage3_steps=4)  # smoke checkpoints every step
TRAIN_CHAIN = """
import sys
from pathlib import Path
from pulid_lab.train.experiment import Experiment, train_chain
train_chain(Experiment(**{chain!r}), Path(sys.argv[1]), Path(sys.argv[2]), device="cpu", progress=False,
            pretrained=False)
"""


def _wait_for(predicate, proc, timeout=300.0, what="") -> None:
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _checkpoint_of(stages: Path, stage: int) -> bool:
    return any((d / "train_state.pt").exists() for d in stages.glob(f"stage{stage}-*"))


def _finished(stages: Path, stage: int) -> bool:
    return any((d / "adapter.safetensors").exists() for d in stages.glob(f"stage{stage}-*"))


def _adapter(stages: Path, stage: int) -> dict:
    from safetensors.torch import load_file
    (folder,) = [d for d in stages.glob(f"stage{stage}-*") if (d / "adapter.safetensors").exists()]
    return load_file(str(folder / "adapter.safetensors"))


def test_kill_9_inside_each_stage_resumes_to_the_uninterrupted_weights(smoke_models, tmp_path):
    from pulid_lab.train.experiment import Experiment, train_chain
    models, _ = smoke_models
    code = TRAIN_CHAIN.format(chain=CHAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every run: the same float reductions, bit for bit
    ref, threads = tmp_path / "ref", torch.get_num_threads()  # the uninterrupted run, here
    torch.set_num_threads(1)
    try:
        train_chain(Experiment(**CHAIN), ref, models, device="cpu", progress=False, pretrained=False)
    finally:
        torch.set_num_threads(threads)

    stages = tmp_path / "killed"
    for stage in (1, 2, 3):  # start, wait for the stage's first checkpoint, kill -9 in the middle of the stage
        proc = subprocess.Popen([sys.executable, "-c", code, str(stages), str(models)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(lambda: _checkpoint_of(stages, stage), proc, what=f"stage {stage}'s first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not _finished(stages, stage), f"stage {stage} ended before the kill: lengthen it"
        assert all(_finished(stages, s) for s in range(1, stage))  # what finished before the kill is kept
    done = subprocess.run([sys.executable, "-c", code, str(stages), str(models)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in (1, 2, 3):
        want, got = _adapter(ref, stage), _adapter(stages, stage)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), f"stage {stage}: {k} differs after kill -9 and resume"
    leftovers = [p.name for p in stages.rglob("*.tmp")]
    assert not leftovers, leftovers


def test_kill_9_inside_a_grid_cell_keeps_the_finished_cells(tmp_path):
    """The grid command killed (with its Dask worker and kernel) while its second cell runs: the rerun skips the
    first cell, reruns the second, and the table has both rows."""
    log, go = tmp_path / "executions.log", tmp_path / "go"
    spec = {"notebook": str(ROOT / "tests" / "data" / "grid_cell.ipynb"), "fixed": {"log_path": str(log)},
            "configs": [{"name": "first", "value": 0.25}, {"name": "second", "value": 0.75, "wait_for": str(go)}]}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pulid_lab.cli", "grid", str(grid_file), "--out", str(out), "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def first_recorded():
            try:
                return "grid_params" in json.loads((out / "runs" / "first" / "result.json").read_text())
            except (OSError, ValueError):
                return False
        _wait_for(lambda: first_recorded() and log.exists() and "0.75" in log.read_text(), proc,
                  what="the first cell's result and the second cell's start")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner, its Dask worker and the running kernel
        proc.wait()
    assert not (out / "runs" / "second" / "result.json").exists()
    go.touch()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert (summary["skipped"], summary["ran"], summary["failed"]) == (1, 1, [])
    assert log.read_text().split() == ["0.25", "0.75", "0.75"]  # the first cell ran once, the killed one twice
    from pulid_lab.grid import read_results
    rows = {r["config"]: r for r in read_results(out)}
    assert rows["first"]["face_sim"] == 0.25 and rows["second"]["face_sim"] == 0.75


# ---------------------------------------------------------------------------------------------------------------
# A reference with no face: refused with one sentence, as a real pipeline refuses one its detector finds no face in

def _faceless_references(n: int = 8):
    """Renders of held-out identities, and faceless images of kinds the face check never trained on or did."""
    import numpy as np

    from pulid_lab.core.imaging import to_tensor, to_uint8
    from pulid_lab.world import faceless
    from pulid_lab.world import toyfaces as world
    r = world.render(world.HELDOUT_IDS[:n], world.sample_attributes(np.random.default_rng(5), n), np.arange(n) + 77)
    gen = torch.Generator().manual_seed(5)
    painted = faceless.painted_head(to_tensor(r.images), torch.as_tensor(r.boxes), gen)
    held_out = faceless.check_faceless(n, gen)
    return r.images, {"painted head": to_uint8(painted), **{k: to_uint8(v) for k, v in held_out.items()}}


def test_a_reference_with_no_face_is_refused_with_one_sentence():
    import pytest

    from pulid_lab.lessons.lab import open_lab
    from pulid_lab.train.experiment import shipped_stages_dir
    from pulid_lab.train.pulid_trainer import load_adapter
    faces, faceless_kinds = _faceless_references()
    lab = open_lab("quick", device="cpu", progress=False)
    adapter = load_adapter(next(shipped_stages_dir().glob("stage1-*")), lab.base.unet)
    prompts, seeds = ["a portrait, photo"] * len(faces), list(range(len(faces)))
    assert lab.generate(adapter, faces, prompts, seeds).shape == (len(faces), 32, 32, 3)  # every render passes
    for kind, images in faceless_kinds.items():
        mixed = faces.copy()
        mixed[3] = images[3]
        with pytest.raises(ValueError) as e:
            lab.generate(adapter, mixed, prompts, seeds)
        message = str(e.value)
        assert message.startswith("no face in reference image(s) 3 (") and "\n" not in message, (kind, message)
        assert "reference_for(identity)" in message


def test_models_whose_face_check_did_not_qualify_say_so_and_check_nothing(smoke_models):
    import pytest

    from pulid_lab.models.identity import FaceAnalysis
    _, faceless_kinds = _faceless_references(2)
    analysis = FaceAnalysis(smoke_models[0])  # the smoke profile's face check trained 4 steps
    with pytest.warns(UserWarning, match="face check too weak to trust .* pretrain --profile paper --only face_check"):
        analysis.require_faces(faceless_kinds["flat colour"])
