"""What the notebooks share: the models opened once, trained adapters on demand, and where figures go.

    lab = open_lab(profile)                 # base model, evaluator, device
    pulid = lab.adapter(stage=3)           # trains Stage 1 -> 2 -> 3 once (or reuses `pulid-lab reproduce`'s)
    refs, prompts, seeds = lab.examples(4)  # held-out references x test prompts, fixed seeds
    images = lab.generate(pulid, refs, prompts, seeds)

Trained stages are cached in ``runs/reproduce/stages`` (the main job's folder), keyed by everything that
shapes them, so a lesson reuses what the main job or an earlier lesson trained.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..train.config import REPRODUCE_PROFILES


def project_root() -> Path | None:
    """The repository this package lives in (editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


def runs_dir() -> Path:
    """Where training outputs go: $PULID_LAB_RUNS, else <repo>/runs, else the cache folder."""
    if os.environ.get("PULID_LAB_RUNS"):
        return Path(os.environ["PULID_LAB_RUNS"])
    root = project_root()
    if root is not None:
        return root / "runs"
    from ..world.data import cache_dir
    return cache_dir() / "runs"


UPDATE_FIGURES = "PULID_LAB_UPDATE_FIGURES"  # set to 1 to write the lessons' figures into the committed figures/


def figure_path(name: str, profile: str) -> Path | None:
    """Where a lesson saves a figure: None (show, do not save) for smoke runs; ``figures/<name>`` when the
    environment variable PULID_LAB_UPDATE_FIGURES is 1 (how the committed figures are regenerated); else
    ``<runs>/figures/<profile>/<name>``, so a class's own runs never overwrite the committed figures."""
    if profile == "smoke":
        return None
    if os.environ.get(UPDATE_FIGURES) == "1":
        return committed_figure(name)
    return runs_dir() / "figures" / profile / name


def committed_figure(name: str) -> Path:
    """``figures/<name>`` of the repository (what the README shows)."""
    return (project_root() or Path.cwd()) / "figures" / name


@dataclass
class Lab:
    profile: str
    base: object  # OriginalModel
    evaluator: object  # evaluate.Evaluator
    models_dir: Path | None = None
    stages_dir: Path = field(default_factory=lambda: runs_dir() / "reproduce" / "stages")
    progress: bool = True

    @property
    def device(self):
        return self.base.device

    def adapter(self, stage: int = 3, seed: int = 0, **knobs):
        """The adapter after ``stage`` (knobs as in experiment.Experiment), trained once and cached."""
        from ..train.experiment import Experiment, train_chain
        from ..train.pulid_trainer import load_adapter
        exp = Experiment(profile=self.profile, stage=stage, seed=seed, **knobs)
        folder = train_chain(exp, self.stages_dir, self.models_dir, self.base, self.device, self.progress)
        adapter = load_adapter(folder, self.base.unet).to(self.device)
        adapter.use_settings(exp.settings())
        return adapter

    def examples(self, n: int = 4, n_ids: int | None = None):
        """(references (n,32,32,3) uint8, prompts, seeds): n rows spread over the held-out test set."""
        from ..train.evaluate import spread_rows, test_set
        tests = test_set(n_ids or max(1, n))
        pick = spread_rows(tests, n)
        return tests.references[pick], [tests.prompts[i] for i in pick], [tests.seeds[i] for i in pick]

    def generate(self, adapter, references, prompts, seeds, id_scale: float = 1.0) -> np.ndarray:
        """4-step samples as uint8 (N,32,32,3); ``adapter=None`` generates without ID. A reference with no face is
        refused (ValueError), as a real pipeline refuses one its detector finds no face in."""
        from ..core.imaging import to_uint8
        from ..train.evaluate import generate
        return to_uint8(generate(self.base, adapter, references, list(prompts), list(seeds), self.evaluator, id_scale,
                                 check_faces=True))

    def evaluate(self, adapter, n_ids: int | None = None, id_scales=(1.0,)) -> dict:
        from ..train.evaluate import evaluate, test_set
        tests = test_set(n_ids or REPRODUCE_PROFILES[self.profile].eval_ids)
        return evaluate(self.base, adapter, self.evaluator, tests, id_scales, progress=self.progress)


def open_lab(profile: str, models_dir: str | Path | None = None, device=None, progress: bool = True) -> Lab:
    """Load the original model and the evaluation models once for a notebook."""
    from ..core.device import default_device
    from ..models.base import load_base
    from ..train.evaluate import Evaluator
    if profile not in REPRODUCE_PROFILES:
        raise ValueError(f"profile must be one of {tuple(REPRODUCE_PROFILES)}, got {profile!r}")
    device = default_device(device)
    models_dir = Path(models_dir) if models_dir else None
    base = load_base(models_dir, device)
    return Lab(profile, base, Evaluator(models_dir, device), models_dir, progress=progress)
