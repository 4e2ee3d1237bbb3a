"""A learning curve: the last stage of an Experiment evaluated at several step counts of one training run.

The stages before the last are trained (or reused) as ``train_chain`` does; the last stage trains once, to its
full budget, and is evaluated each time it reaches a milestone (the learning-rate schedule is the full run's, so
milestone 100 of a 600-step run is not a 100-step run). The finished stage is saved in ``stages_dir`` under its key,
so a reproduction or a grid with the same recipe reuses it.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..core.files import write_json
from ..models.base import load_base
from ..world import toyfaces as world
from ..world.data import render_bank
from .evaluate import Evaluator, evaluate, reconstruction_set, test_set
from .experiment import Experiment, stage_dirs, train_chain
from .pulid_trainer import PuLIDTrainer


def learning_curve(exp: Experiment, milestones: list[int], stages_dir: Path, models_dir: Path | None = None,
                   out: Path | None = None, device=None, progress: bool = True) -> list[dict]:
    """[{step, minutes, face_sim, recognized, prompt_score, purity, reconstruction: {...}}] at each milestone of
    ``exp``'s last stage, on ``exp.eval_split`` (written to ``out`` after every milestone when given)."""
    steps = exp.stage_training(exp.stage).steps
    milestones = sorted(set(int(m) for m in milestones))
    if not milestones or milestones[0] < 1 or milestones[-1] > steps:
        raise ValueError(f"milestones must lie in 1..{steps} (the last stage's steps), got {milestones}")
    base = load_base(models_dir, device)
    dirs = stage_dirs(exp, stages_dir, models_dir)
    parent = None
    if exp.stage > 1:
        parent = train_chain(replace(exp, stage=exp.stage - 1), stages_dir, models_dir, base, base.device, progress)
    bank = render_bank(world.TRAIN_IDS, exp.budget.bank_variants, seed=0, progress=progress)
    trainer = PuLIDTrainer(exp.stage_training(exp.stage), bank, dirs[-1], models_dir, base=base, init_adapter=parent,
                           device=base.device)
    evaluator = Evaluator(models_dir, base.device)
    n_ids = exp.eval_ids or exp.budget.eval_ids
    tests, own = test_set(n_ids, split=exp.eval_split), reconstruction_set(n_ids, exp.eval_split)
    points, train_seconds = [], 0.0
    for m in tqdm(milestones, desc="milestones", disable=not progress):
        t0 = time.time()
        trainer.fit(resume=True, progress=progress, stop_after=m)
        train_seconds += time.time() - t0
        trainer.adapter.eval()
        new = evaluate(base, trainer.adapter, evaluator, tests, progress=False)[1.0]
        rec = evaluate(base, trainer.adapter, evaluator, own, progress=False)[1.0]
        points.append({"step": m, "train_minutes": round(train_seconds / 60, 2),
                       **{k: v for k, v in new.items() if k != "rows"},
                       "reconstruction": {k: v for k, v in rec.items() if k != "rows"}})
        if out is not None:
            write_json(out, {"experiment": exp.__dict__, "adapter": str(dirs[-1]), "device": str(base.device),
                             "points": points})
    return points

