"""Screen a change to the original model from scratch: train a short run, read prompt following as it goes.

    .venv/bin/python scripts/screen_base.py NAME --model '{"only_cross_attention": [true, true, false]}' \
        --train '{"caption_reading": 0.1}' --steps 900 --threads 1

Trains `BaseTraining(steps, batch 32, model=BaseModelConfig(**model), **train)` on the paper bank into
runs/screens/NAME (resumable: rerun the same command), and every 300 steps samples 32 held-out complete captions
x 3 seeds (DPM-Solver++ 25 steps) with the EMA weights and appends the probe's accuracy per attribute to
runs/screens/NAME/log.jsonl. A screen, not the check: 96 generations (about +-0.05 per attribute), short cosine
schedules. The README's "original model" section reports what these screens measured.

    .venv/bin/python scripts/screen_base.py --peek ~/.cache/pulid_lab/train_state/<run>/base/train_state.pt

reads the same screen off a running `pretrain`'s resume state (its EMA weights, with the architecture the state
records; states written before recipes were recorded get the paper profile's), without touching the run.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pulid_lab.models import checkpoints
from pulid_lab.models.base import OriginalModel, base_config_from_dict
from pulid_lab.train.base_trainer import BaseTraining, train_base
from pulid_lab.train.check_models import prompt_scores, prompt_test_set
from pulid_lab.world import toyfaces as world
from pulid_lab.world.data import render_bank


def screen_reading(ema, probe) -> dict:
    """Prompt score per attribute of the EMA model on 32 held-out complete captions x 3 seeds (DPM-Solver++ 25)."""
    caps, labels, seeds = prompt_test_set(32, 3)
    with torch.no_grad():
        images = torch.cat([ema.generate(caps[i:i + 48], seed=seeds[i:i + 48], steps=25) for i in range(0, len(caps), 48)])
    per = prompt_scores(probe, images, labels)
    return {"score": round(float(np.mean(list(per.values()))), 4), **{a: round(v, 3) for a, v in per.items()}}


def peek(state_path: Path) -> dict:
    from pulid_lab.train.config import pretrain_config
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    recipe = state.get("recipe")
    ema = OriginalModel(base_config_from_dict(recipe["model"]) if recipe else pretrain_config("paper").base.model)
    ema.load_state_dict(state["ema"])
    ema.eval()
    return {"step": state["step"], **screen_reading(ema, checkpoints.load_model("probe"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help="the screen's folder under runs/screens")
    ap.add_argument("--peek", type=Path, default=None, help="read the screen off a pretrain resume state instead")
    ap.add_argument("--model", default="{}", help="BaseModelConfig fields as JSON")
    ap.add_argument("--train", default="{}", help="BaseTraining fields as JSON")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peek is not None:
        print(json.dumps(peek(args.peek)), flush=True)
        return
    if not args.name:
        ap.error("give a screen NAME (or --peek STATE)")
    out = Path("runs/screens") / args.name
    out.mkdir(parents=True, exist_ok=True)
    model = base_config_from_dict(json.loads(args.model))
    cfg = BaseTraining(steps=args.steps, batch=32, checkpoint_every=100, model=model, **json.loads(args.train))
    bank = render_bank(world.TRAIN_IDS, 24, seed=0, progress=False)  # the paper profile's bank
    probe = checkpoints.load_model("probe")
    log = out / "log.jsonl"
    done = {json.loads(line)["step"] for line in log.read_text().splitlines()} if log.exists() else set()
    for stop in range(args.every, args.steps + 1, args.every):
        if stop in done:
            continue
        t0 = time.time()
        ema, stats = train_base(cfg, bank, out, resume=True, progress=True, stop_after=stop)
        rec = {"step": stop, **screen_reading(ema, probe), "sec": round(time.time() - t0), "loss": stats["final_loss"]}
        print(json.dumps(rec), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
