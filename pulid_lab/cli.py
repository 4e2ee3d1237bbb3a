"""The `pulid-lab` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _world(args):
    from .lessons import plots
    plots.world_grid(seed=args.seed, out=args.out)
    print(f"wrote {args.out}")


def _pretrain(args):
    from .train.config import pretrain_config
    from .train.pretrain import pretrain
    cfg = pretrain_config(args.profile)
    out = Path(args.out)
    t0 = time.time()
    report = pretrain(cfg, out, device=args.device, resume=args.resume, only=args.only)
    report["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    print(f"models written to {out} (profile {cfg.profile}, {report['wall_seconds']} s)")


def _check_models(args):
    from .models import checkpoints
    from .train.check_models import check_base_model, check_models
    report = check_models(args.models, variants=args.variants, n_pairs=args.pairs, progress=not args.json)
    folder = Path(args.models) if args.models else checkpoints.default_models_dir()
    if "base" in checkpoints.read_manifest(folder) and not args.skip_base:
        base = check_base_model(folder, n=args.generations, progress=not args.json)
        report["passed"].update(base.pop("passed"))
        report.update(base)
    print(json.dumps(report, indent=2 if not args.json else None))
    if args.strict and not all(report["passed"].values()):
        sys.exit(1)


def _sample(args):
    from .core.device import default_device
    from .core.imaging import to_uint8
    from .models.base import load_base
    from .world.vocab import check_words
    check_words(args.caption)  # a VocabularyError is main's one-line error
    model = load_base(args.models, default_device(args.device))
    solver = "lightning" if args.steps == 4 and args.solver == "auto" else ("dpm++" if args.solver == "auto" else args.solver)
    img = model.generate([args.caption], seed=args.seed, steps=args.steps, solver=solver, guidance=args.guidance)
    from PIL import Image
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img)[0]).resize((32 * args.zoom, 32 * args.zoom), Image.NEAREST).save(args.out)
    print(f"wrote {args.out} ({solver}, {args.steps} steps, seed {args.seed})")


def _evaluate(args):
    from .core.device import default_device
    from .models.base import load_base
    from .train.evaluate import Evaluator, evaluate, test_set
    from .train.pulid_trainer import load_adapter
    device = default_device(args.device)
    base = load_base(args.models, device)
    adapter = load_adapter(Path(args.checkpoint), base.unet).to(device)
    tests = test_set(args.ids, split=args.split)
    report = evaluate(base, adapter, Evaluator(args.models, device), tests, tuple(args.id_scales), progress=not args.json)
    summary = {f"id_scale {scale:g}": {k: v for k, v in r.items() if k != "rows"} for scale, r in report.items()}
    print(json.dumps(summary, indent=None if args.json else 2))


def _settings(items: list[str] | None, allowed) -> dict:
    """``--set NAME=VALUE ...`` as a dict (values read as YAML); a ValueError names what is allowed."""
    import yaml
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME one of {list(allowed)}")
        out[key] = yaml.safe_load(value)
    return out


def _reproduce(args):
    from .lessons import plots
    from .train.config import resolve_profile
    from .train.reproduce import OVERRIDABLE, check_overrides, reproduce
    profile = resolve_profile(args.profile)
    overrides = _settings(args.set, OVERRIDABLE)
    check_overrides(profile, overrides)  # before any training
    t0 = time.time()
    table = reproduce(Path(args.out), profile, args.seeds, args.models, args.device, train=args.train, **overrides)
    figures = Path(args.figures) if args.figures else Path(args.out) / "figures"
    plots.reproduction_figures(args.out, figures, args.models, args.device)
    print((Path(args.out) / "table2.md").read_text())
    print(f"{(time.time() - t0) / 60:.1f} min (this run; stages and rows already in {args.out} were reused)")
    print(f"table: {Path(args.out) / 'table2.json'} and table2.md; figures: {figures / 'table2.png'}, "
          f"{figures / 'id_insertion.png'}")
    return table


def _grid(args):
    from .grid import load_grid, run_grid
    grid = load_grid(args.grid, smoke=args.smoke)
    settings = _settings(args.set, grid.notebook_parameters)
    for params in grid.configs.values():
        params.update(settings)
    print(f"{len(grid.configs)} configs of {grid.notebook.name} -> {args.out}/runs/")
    summary = run_grid(grid, Path(args.out), workers=args.workers, scheduler=args.scheduler)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"{len(summary['failed'])} config(s) failed: see {Path(args.out) / 'failures.json'}; rerun to retry them")
        sys.exit(1)


def _curve(args):
    from dataclasses import fields

    from .train.curve import learning_curve
    from .train.experiment import Experiment
    params = _settings(args.set, [f.name for f in fields(Experiment)])
    exp = Experiment.from_params({"eval_split": "validation", "reconstruction": True, **params})
    points = learning_curve(exp, args.milestones, Path(args.stages), args.models, Path(args.out), args.device)
    print("step  train min  recognized  Face Sim  prompt  purity | own caption: recognized  Face Sim")
    for p in points:
        r = p["reconstruction"]
        print(f"{p['step']:>4}  {p['train_minutes']:>9.1f}  {100 * p['recognized']:>9.1f}%  {p['face_sim']:>8.3f}  "
              f"{p['prompt_score']:>6.3f}  {p['purity']:>6.3f} | {100 * r['recognized']:>21.1f}%  {r['face_sim']:>8.3f}")
    print(f"written to {args.out}")


def _grid_report(args):
    from .grid import report
    rep = report(Path(args.out), args.figure, args.table2)  # GridError, FileNotFoundError: main's one-line error
    print(rep["markdown"])
    print(f"figure: {rep['figure']}; table: {rep['table']}")


def _bench(args):
    from .train.bench import iteration_k4_over_k1, run, stage_step_breakdown
    if args.breakdown:
        report = {f"stage {s}": stage_step_breakdown(stage=s, models_dir=args.models) for s in (1, 2, 3)}
        # the paper's s/iter at k = 4 vs k = 1, on whole training iterations of the stages with a Lightning branch
        # (each as the mini trainer runs it, and with the per-step recomputation SDXL needs)
        report["iteration_k4_over_k1"] = {f"stage {s}{', checkpointed' if ckpt else ''}": iteration_k4_over_k1(
            s, args.models, lightning_checkpoint=ckpt) for s in (2, 3) for ckpt in (False, True)}
    else:
        report = run()
    print(json.dumps(report, indent=None if args.json else 2))


def main(argv=None):
    p = argparse.ArgumentParser(prog="pulid-lab", description="PuLID workbench: the ToyFaces world, mini models, training and evaluation.")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="draw the ToyFaces world: rows = identities, columns = attribute changes")
    w.add_argument("--out", default="figures/toyfaces.png")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=_world)

    t = sub.add_parser("pretrain", help="train the mini world's foundation models")
    t.add_argument("--profile", choices=["smoke", "quick", "paper"], default=None,
                   help="budget (default: smoke when CI is set, else paper)")
    t.add_argument("--out", required=True, help="folder for safetensors + manifest.json")
    t.add_argument("--resume", action="store_true", help="keep networks already finished in --out")
    t.add_argument("--only", nargs="+", default=None, help="train only these networks (e.g. phi_eval probe)")
    t.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    t.set_defaults(func=_pretrain)

    c = sub.add_parser("check-models", help="re-measure the models on fresh held-out renders")
    c.add_argument("--models", default=None, help="models folder (default: the shipped ones)")
    c.add_argument("--variants", type=int, default=8, help="renders per held-out identity")
    c.add_argument("--pairs", type=int, default=4000, help="verification pairs per recognizer")
    c.add_argument("--generations", type=int, default=256, help="base-model generations (captions x seeds)")
    c.add_argument("--skip-base", action="store_true", help="check only the recognizers, detector and probe")
    c.add_argument("--json", action="store_true", help="print one JSON object only")
    c.add_argument("--strict", action="store_true", help="exit 1 when a threshold is missed")
    c.set_defaults(func=_check_models)

    s = sub.add_parser("sample", help="generate one image with the original model")
    s.add_argument("caption", help='e.g. "a portrait, sketch, blue background, glasses"')
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=4, help="4 = the Lightning sampler (default)")
    s.add_argument("--solver", choices=["auto", "lightning", "dpm++", "ddim"], default="auto")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--zoom", type=int, default=4, help="nearest-neighbour upscaling of the saved PNG")
    s.add_argument("--models", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="sample.png")
    s.set_defaults(func=_sample)

    e = sub.add_parser("evaluate", help="Face Sim, prompt score and purity of a trained adapter on the held-out test set")
    e.add_argument("checkpoint", help="folder with adapter.safetensors + manifest.json (a trainer's output)")
    e.add_argument("--ids", type=int, default=100,
                   help="held-out identities (x 8 prompts); at most 150 (test) or 50 (validation)")
    e.add_argument("--id-scales", type=float, nargs="+", default=[1.0, 0.5])
    e.add_argument("--split", choices=["test", "validation"], default="test",
                   help="held-out identities: the test set (first 150) or the validation set (last 50)")
    e.add_argument("--models", default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("reproduce", help="the paper's Table 2 in the mini world: train (or take the shipped) and evaluate four rows")
    r.add_argument("--profile", choices=["smoke", "quick", "paper"], default=None,
                   help="budget (default: smoke when CI is set, else paper)")
    r.add_argument("--seeds", type=int, default=1)
    r.add_argument("--out", default="runs/reproduce")
    r.add_argument("--figures", default=None,
                   help="folder for table2.png and id_insertion.png (default: OUT/figures; `--figures figures` updates "
                        "the README's pictures)")
    r.add_argument("--set", nargs="+", metavar="NAME=VALUE",
                   help="change the recipe of every row, e.g. lambda_sem=0.3 lambda_layout=0 (recorded in table2.json)")
    r.add_argument("--train", action="store_true",
                   help="retrain every stage, even those that ship trained with the models for this exact recipe")
    r.add_argument("--models", default=None)
    r.add_argument("--device", default=None)
    r.set_defaults(func=_reproduce)

    c = sub.add_parser("curve", help="a learning curve: one recipe's last stage evaluated at several step counts "
                                     "(validation split, new prompts and own captions, unless --set says otherwise)")
    c.add_argument("--set", nargs="+", metavar="NAME=VALUE", help="the experiment, e.g. stage=2 stage2_steps=600 grad_steps=1")
    c.add_argument("--milestones", nargs="+", type=int, required=True, help="steps of the last stage at which to evaluate")
    c.add_argument("--stages", default="runs/reproduce/stages", help="trained stages (shared with reproduce and grids)")
    c.add_argument("--out", required=True, help="the curve's JSON (rewritten after every milestone)")
    c.add_argument("--models", default=None)
    c.add_argument("--device", default=None)
    c.set_defaults(func=_curve)

    g = sub.add_parser("grid", help="run an ablation grid (papermill, on a local Dask pool or a Dask cluster)")
    g.add_argument("grid", help="grid YAML (see grids/)")
    g.add_argument("--out", required=True, help="results folder (rerun with the same --out to resume)")
    g.add_argument("--workers", type=int, default=1, help="local worker processes (ignored with --scheduler)")
    g.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--smoke", action="store_true", help="the grid's smoke variant (seconds per config)")
    g.add_argument("--set", nargs="+", metavar="NAME=VALUE", help="override a parameter in every config")
    g.set_defaults(func=_grid)

    gr = sub.add_parser("grid-report", help="Pareto plot and markdown table of a grid's results")
    gr.add_argument("out", help="the grid's --out folder")
    gr.add_argument("--figure", default=None, help="where to save the plot (default OUT/pareto.png)")
    gr.add_argument("--table2", default=None, help="a reproduce table2.json whose rows are marked on the plot")
    gr.set_defaults(func=_grid_report)

    b = sub.add_parser("bench", help="measured speed and memory ratios of the PuLID core on the mini model")
    b.add_argument("--json", action="store_true")
    b.add_argument("--breakdown", action="store_true",
                   help="instead: where one training step of each stage spends its time, on the shipped models")
    b.add_argument("--models", default=None)
    b.set_defaults(func=_bench)

    args = p.parse_args(argv)
    _check_numbers(p, args)
    from .core.files import RunFolderBusy
    from .core.objective import NonFiniteLoss
    from .models.checkpoints import CheckpointError
    from .world.vocab import VocabularyError
    try:  # every command's expected failures end as one line (GridError is a ValueError)
        args.func(args)
    except (CheckpointError, VocabularyError, NonFiniteLoss, RunFolderBusy, ValueError, OSError) as e:
        if os.environ.get("PULID_LAB_DEBUG"):  # the traceback, for a bug report
            raise
        sys.exit(f"error: {e}")


# arguments that must be positive (name -> what it is), checked before any work starts
_POSITIVE = {"seeds": "seeds", "steps": "sampler steps", "zoom": "zoom", "workers": "worker processes",
             "variants": "renders per identity", "pairs": "verification pairs", "generations": "generations",
             "ids": "identities"}


def _check_numbers(parser, args) -> None:
    import math
    for name, what in _POSITIVE.items():
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1 ({what}), got {value}")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and not math.isfinite(guidance):
        parser.error(f"--guidance must be a finite number, got {guidance}")
    for scale in getattr(args, "id_scales", None) or []:
        if not math.isfinite(scale):
            parser.error(f"--id-scales must be finite numbers, got {scale}")


if __name__ == "__main__":
    main()
