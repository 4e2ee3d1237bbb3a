"""scripts/gpu_check.py, the one prepared script for a GPU, run end to end on CPU (--allow-cpu) with the tiny
stand-ins of pulid_lab.real.tiny in the place of SDXL, SDXL-Lightning and antelopev2 (about 30 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("insightface")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_the_whole_real_path_on_the_tiny_stand_ins(tmp_path):
    from pulid_lab.real import tiny
    st = tiny.write_stand_ins(tmp_path / "tiny")
    env = {**os.environ, "SDXL_DIR": str(st.sdxl_dir), "LIGHTNING_UNET": str(st.lightning_unet),
           "ANTELOPEV2_ROOT": str(st.antelopev2_root), "FACE_IMAGE": str(st.face_image), "FACE_DIR": str(st.face_dir),
           "OUT": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--allow-cpu", "--resolution", "64",
                        "--train-resolution", "64", "--train-steps", "1"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"load_pipeline", "generate_4step", "align_capture", "train_stage1", "train_stage2_k1", "train_stage3_k1",
            "generate_after_training", "face_sim_converted_recognizer"} <= set(report["phases"])
    assert set(report["train_stage3"][0]) >= {"diff", "id", "align_sem", "align_layout", "total"}
    # the converted recognizer judges as insightface does (the same tiny network, in torch vs onnxruntime)
    ours, theirs = report["face_sim_converted"], report["face_sim_antelopev2"]
    assert set(ours) == set(theirs) and len(ours) == 6
    assert all(abs(ours[k] - theirs[k]) < 0.01 for k in ours), (ours, theirs)
    assert (tmp_path / "out" / "grid.png").is_file()
    # missing variables: a one-line message, exit code 2
    bare = {k: v for k, v in env.items() if k not in ("SDXL_DIR", "LIGHTNING_UNET")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--check-only"], env=bare,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "set SDXL_DIR, LIGHTNING_UNET" in r.stderr
