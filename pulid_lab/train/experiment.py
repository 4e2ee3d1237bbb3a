"""One experiment = one configuration of the PuLID recipe, trained and evaluated (what a grid cell runs).

An ``Experiment`` names the stage it ends at and the knobs of each stage; ``run_experiment`` trains the chain
of stages it needs (stage 1 -> 2 -> 3, each starting from the previous one's weights), evaluates the last one
on the held-out test set, and returns the three metrics. Stages are cached in ``stages_dir`` under a key made
of everything that shapes them, so the twelve cells of a lambda_sem x lambda_layout grid share one Stage 1 and
one Stage 2, and a rerun after an interruption resumes the stage it was in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..core.attention import IDAttnSettings
from ..core.files import file_lock, plain_json, write_json
from ..models import checkpoints
from ..world import toyfaces as world
from ..world.data import render_bank
from .config import REPRODUCE_PROFILES, ReproduceProfile
from .evaluate import SPLITS, Evaluator, evaluate, reconstruction_set, test_set
from .pulid_trainer import PuLIDTrainer, PuLIDTraining, load_adapter

ORTHO_MODES = ("off", "ortho", "ortho_v2")
_TRAINING = PuLIDTraining()  # the defaults of every training knob


@dataclass
class Experiment:
    """Every knob a grid may turn. Training knobs act on the stage named in the comment and on later ones."""
    profile: str = "quick"  # step budgets and test-set size (reproduce.REPRODUCE_PROFILES)
    stage: int = 3  # the last stage trained (1, 2 or 3)
    seed: int = _TRAINING.seed
    # the training knobs' defaults are PuLIDTraining's (one place for each default)
    id_source: str = _TRAINING.id_source  # stage 1+: ID reference = the target itself, or another render of it
    reference_view: str = _TRAINING.reference_view  # stage 1+: what the image encoder sees of the reference: full | crop
    id_loss: str = _TRAINING.id_loss  # stage 2+: lightning | naive
    grad_steps: int = _TRAINING.grad_steps  # stage 2+: Lightning steps backpropagated (k)
    lambda_id: float = _TRAINING.lambda_id  # stage 2+
    lambda_sem: float = _TRAINING.lambda_sem  # stage 3
    lambda_layout: float = _TRAINING.lambda_layout  # stage 3
    # stage 3: L_align over the (layer, step) pairs: "sum" as the paper writes it, or "mean" (= sum / 28 pairs in the
    # mini UNet). Measured (quick budgets, 96 test rows): the sum at lambda 0.6/0.1 kept 65% of Stage 2's Face Sim,
    # the mean 87% (4 Lightning ID samples per step) and 79% (8, the main job's run)
    align_reduction: str = _TRAINING.align_reduction
    align_every_step: bool = _TRAINING.align_every_step  # stage 3: alignment gradients at every Lightning step
    align_token_mask: bool = _TRAINING.align_token_mask  # stage 3: L_align_sem over the caption's tokens, not padding
    lr: float = _TRAINING.lr  # every stage
    face_weight: float = _TRAINING.face_weight  # every stage: the face box weighs 1 + face_weight in L_diff
    id_dropout: float = _TRAINING.id_dropout  # every stage: unconditional ID tokens for this share of L_diff's samples
    # steps of each stage; 0 = the profile's budget
    stage1_steps: int = 0
    stage2_steps: int = 0
    stage3_steps: int = 0
    id_scale: float = 1.0  # inference
    num_zero: int = 0  # inference: zero tokens appended to the ID tokens
    ortho: str = "off"  # inference: off | ortho | ortho_v2
    eval_ids: int = 0  # held-out identities evaluated (x 8 prompts); 0 = the profile's number
    # which held-out identities: "test" (what the tables report) or "validation" (choose a recipe there)
    eval_split: str = "test"
    reconstruction: bool = False  # also evaluate with each reference's own caption (docs/metrics.md)

    def __post_init__(self):
        self._check_types()
        if self.profile not in REPRODUCE_PROFILES:
            raise ValueError(f"profile must be one of {tuple(REPRODUCE_PROFILES)}, got {self.profile!r}")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {tuple(SPLITS)}, got {self.eval_split!r}")
        if min(self.stage1_steps, self.stage2_steps, self.stage3_steps) < 0:
            raise ValueError("stage steps must be >= 0 (0 = the profile's budget)")
        if self.ortho not in ORTHO_MODES:
            raise ValueError(f"ortho must be one of {ORTHO_MODES}, got {self.ortho!r}")
        self.stage_training(self.stage)  # PuLIDTraining validates id_loss, id_source, grad_steps

    def _check_types(self):
        """Every knob of its declared type, before any work: YAML reads ``1e3`` as a string and ``5`` as an int, so
        numbers written either way are taken; anything else is a ValueError naming the knob."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind in ("int", "float") and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
            if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            elif kind == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            expected = {"int": int, "float": float, "str": str, "bool": bool}.get(kind)
            if expected and (not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))):
                raise ValueError(f"{f.name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
            if kind == "float" and value != value:
                raise ValueError(f"{f.name} must be a number, got nan")
            setattr(self, f.name, value)

    @classmethod
    def from_params(cls, params: dict) -> "Experiment":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown experiment parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)

    @property
    def budget(self) -> ReproduceProfile:
        return REPRODUCE_PROFILES[self.profile]

    def stage_training(self, stage: int) -> PuLIDTraining:
        """The training config of one stage of this experiment's chain (only the knobs that stage uses)."""
        b = self.budget
        kw = dict(stage=stage, seed=self.seed, id_source=self.id_source, reference_view=self.reference_view, batch=b.batch,
                  lightning_batch=b.lightning_batch, align_batch=b.align_batch, checkpoint_every=b.checkpoint_every,
                  lr=self.lr, face_weight=self.face_weight, id_dropout=self.id_dropout)
        if stage >= 2:
            kw.update(id_loss=self.id_loss, grad_steps=self.grad_steps, lambda_id=self.lambda_id)
        if stage == 3:
            kw.update(lambda_sem=self.lambda_sem, lambda_layout=self.lambda_layout, align_reduction=self.align_reduction,
                      align_every_step=self.align_every_step, align_token_mask=self.align_token_mask)
        asked = (self.stage1_steps, self.stage2_steps, self.stage3_steps)[stage - 1]
        kw["steps"] = asked or (b.stage1_steps, b.stage2_steps, b.stage3_steps)[stage - 1]
        return PuLIDTraining(**kw)

    def settings(self) -> IDAttnSettings:
        return IDAttnSettings(num_zero=self.num_zero, ortho=self.ortho == "ortho", ortho_v2=self.ortho == "ortho_v2")


# Training options added after stages had been trained: at these values they change nothing, so they stay out of
# the key and stages trained before the option existed keep their key (and are reused).
KEY_NEUTRAL = {"face_weight": 0.0, "id_dropout": 0.0, "align_every_step": False, "align_token_mask": False}
# Knobs only Stage 3 uses: earlier stages are keyed with these fixed values (the defaults they had when the shipped
# stages were trained), so a change of Stage 3's defaults leaves Stage 1's and Stage 2's keys as they were
STAGE3_ONLY = {"lambda_sem": 0.6, "lambda_layout": 0.1, "align_reduction": "mean", "align_every_step": False,
               "align_token_mask": False}
# Knobs of the ID loss, which Stage 1 never computes: Stage 1 is keyed with these fixed values, so a change of
# their defaults (lambda_id 1 -> 3 on 2026-12-04) leaves Stage 1's key as it was
STAGE2_ON = {"lambda_id": 1.0, "id_loss": "lightning"}


# models that no stage's training or evaluation reads: the face check looks only at references a user gives
SHAPES_NO_STAGE = ("face_check",)


def stage_key(cfg: PuLIDTraining, parent: str | None, models_dir: Path | None, bank_variants: int) -> str:
    """A short hash of everything that shapes a trained stage: its config, its parent, the models it uses, the
    training bank (renders per identity)."""
    folder = Path(models_dir) if models_dir else checkpoints.default_models_dir()
    manifest = checkpoints.read_manifest(folder)
    models = {k: v.get("sha256", "") for k, v in manifest.get("models", {}).items() if k not in SHAPES_NO_STAGE}
    models.update({k: v.get("sha256", "") for k, v in manifest.get("files", {}).items()})  # the base model's files
    config = {k: v for k, v in plain_json(asdict(cfg)).items() if not (k in KEY_NEUTRAL and v == KEY_NEUTRAL[k])}
    if cfg.stage == 1 or (cfg.stage == 2 and cfg.id_loss == "naive"):  # k shapes only the Lightning branch, which
        config.pop("grad_steps")  # Stage 1 and the naive row never run
    if cfg.stage == 1:  # Stage 1 has no ID loss
        config.update(STAGE2_ON)
    if cfg.stage != 3:  # only Stage 3 aligns
        for k, v in STAGE3_ONLY.items():
            config.pop(k, None)
            if not (k in KEY_NEUTRAL and v == KEY_NEUTRAL[k]):
                config[k] = v
    blob = json.dumps([config, parent, models, {"bank_variants": bank_variants}], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def stage_dirs(exp: Experiment, stages_dir: Path, models_dir: Path | None = None) -> list[Path]:
    """The folder of each stage of ``exp``'s chain, trained or not: ``stages_dir/stage<k>-<key>``."""
    dirs, parent_key = [], None
    for stage in range(1, exp.stage + 1):
        parent_key = stage_key(exp.stage_training(stage), parent_key, models_dir, exp.budget.bank_variants)
        dirs.append(Path(stages_dir) / f"stage{stage}-{parent_key}")
    return dirs


def shipped_stages_dir(models_dir: Path | None = None) -> Path:
    """Where trained stages ship beside the models they were trained on (``<models>/stages/stage<k>-<key>``)."""
    return (Path(models_dir) if models_dir else checkpoints.default_models_dir()) / "stages"


SHIPPED_FILES = ("adapter.safetensors", "manifest.json", "losses.csv")  # what a shipped stage holds (no optimiser)


def _take_shipped(folder: Path, models_dir: Path | None) -> bool:
    """Copy the shipped stage with ``folder``'s key (same recipe, parent, models and bank) into ``folder``."""
    shipped = shipped_stages_dir(models_dir) / folder.name
    if not (shipped / "adapter.safetensors").exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (shipped / name).exists():
            shutil.copy2(shipped / name, folder / name)
    checkpoints.load_state("adapter", folder)  # checks the sha256 recorded in its manifest
    return True


def _drop_if_corrupted(folder: Path) -> None:
    """A trained stage whose adapter fails its sha256 (or whose manifest is unreadable) is set aside and rebuilt:
    from its final checkpoint in seconds when that survives, else by training it again."""
    if not (folder / "adapter.safetensors").exists():
        return
    try:
        checkpoints.load_state("adapter", folder)
    except checkpoints.CheckpointError as e:
        import warnings
        warnings.warn(f"{e} -- rebuilding {folder.name}", stacklevel=3)
        for name in ("adapter.safetensors", "manifest.json"):
            (folder / name).replace(folder / f"{name}.corrupt")


def train_chain(exp: Experiment, stages_dir: Path, models_dir: Path | None = None, base=None, device=None,
                progress: bool = True, pretrained: bool = True) -> Path:
    """Train (or reuse) stages 1..exp.stage; returns the folder of the last stage's adapter. With ``pretrained``, a
    stage that ships with the models under the same key (``shipped_stages_dir``) is copied instead of trained."""
    from ..models.base import load_base
    stages_dir = Path(stages_dir)
    base = base or load_base(models_dir, device)
    bank = None
    parent_dir = None
    for stage, folder in enumerate(stage_dirs(exp, stages_dir, models_dir), start=1):
        cfg = exp.stage_training(stage)
        with file_lock(stages_dir / f".{folder.name}.lock"):  # one trainer per stage; the others wait, then reuse it
            _drop_if_corrupted(folder)
            if not (folder / "adapter.safetensors").exists() and not (pretrained and _take_shipped(folder, models_dir)):
                if bank is None:
                    bank = render_bank(world.TRAIN_IDS, exp.budget.bank_variants, seed=0, progress=progress)
                trainer = PuLIDTrainer(cfg, bank, folder, models_dir, base=base, init_adapter=parent_dir, device=device)
                trainer.fit(resume=True, progress=progress)
        parent_dir = folder
    return parent_dir


def run_experiment(exp: Experiment, stages_dir: Path, models_dir: Path | None = None, device=None,
                   progress: bool = True) -> dict:
    """Train what ``exp`` needs, evaluate it, return {params, face_sim, recognized, prompt_score, purity, n, rows,
    adapter, seconds, train_seconds}; with ``exp.reconstruction`` also the same metrics when every reference is
    prompted with its own caption (``reconstruction``)."""
    from ..core.device import default_device
    from ..models.base import load_base
    t0 = time.time()
    device = default_device(device)
    base = load_base(models_dir, device)
    adapter_dir = train_chain(exp, stages_dir, models_dir, base, device, progress)
    train_seconds = time.time() - t0
    adapter = load_adapter(adapter_dir, base.unet).to(device)
    adapter.use_settings(exp.settings())
    n_ids = exp.eval_ids or exp.budget.eval_ids
    evaluator = Evaluator(models_dir, device)
    metrics = evaluate(base, adapter, evaluator, test_set(n_ids, split=exp.eval_split), (exp.id_scale,), progress=progress)
    result = {"params": asdict(exp), **metrics[float(exp.id_scale)], "adapter": str(adapter_dir)}
    if exp.reconstruction:
        own = evaluate(base, adapter, evaluator, reconstruction_set(n_ids, exp.eval_split), (exp.id_scale,),
                       progress=progress)[float(exp.id_scale)]
        result["reconstruction"] = {k: v for k, v in own.items() if k != "rows"}
    return {**result, "seconds": round(time.time() - t0, 1), "train_seconds": round(train_seconds, 1)}


def write_result(path: str | Path, result: dict) -> Path:
    """Atomically write ``result.json`` (a killed run never leaves a half-written one). The adapter's path is
    stored relative to the file's folder, so a run folder moved or copied to another machine stays whole
    (``adapter_of`` reads it back)."""
    path = Path(path)
    if result.get("adapter"):
        result = {**result, "adapter": os.path.relpath(Path(result["adapter"]).resolve(), path.parent.resolve())}
    return write_json(path, plain_json(result))


def adapter_of(result_path: str | Path) -> Path:
    """The adapter folder a ``result.json`` written by ``write_result`` names (relative paths resolved from it)."""
    result_path = Path(result_path)
    return result_path.parent / json.loads(result_path.read_text())["adapter"]
