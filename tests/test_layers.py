"""The package's layers (pyproject.toml, [tool.importlinter]): core < world < models < train | real < lessons <
grid < cli, and the real tier on the core alone. A back-arrow fails here, hence in CI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's command on the package under ``root`` with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    shutil.copytree(ROOT / "pulid_lab", tmp_path / "pulid_lab", ignore=shutil.ignore_patterns("shipped", "__pycache__"))
    path = tmp_path / "pulid_lab" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    return tmp_path


def test_a_back_import_from_the_core_breaks_the_layers(tmp_path):
    run = lint_imports(_copy_with(tmp_path, "core/losses.py", "from ..train import config  # a back-arrow"))
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and "pulid_lab.core.losses -> pulid_lab.train.config" in run.stdout


def test_the_real_tier_may_not_use_the_mini_world(tmp_path):
    run = lint_imports(_copy_with(tmp_path, "real/train.py", "from ..world import vocab  # the toy vocabulary"))
    assert run.returncode != 0
    assert "pulid_lab.real.train -> pulid_lab.world.vocab" in run.stdout
