"""`pulid-lab pretrain`: train the mini world's foundation models (docs/models.md).

Every network trains on a cached bank of train-identity renders with random attributes. A finished network
is saved at once, so an interrupted pretrain resumes (``resume=True``) at the first unfinished network.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.device import autocast, default_device
from ..core.imaging import align_faces, to_tensor
from ..models import checkpoints, nets
from ..models.base import base_config_dict, save_base
from ..models.identity import export_recognizer_onnx, face_check_rates
from ..world import faceless
from ..world import toyfaces as world
from ..world.data import Bank, cache_dir, render_bank
from .base_trainer import train_base, training_recipe
from .config import NetTraining, PretrainConfig


def train_state_dir(out: Path, name: str) -> Path:
    """Where resumable training state (weights, EMA, optimiser) lives: in the cache folder, outside the
    repository (hundreds of MB, never shipped), keyed by the output folder so that --resume finds it."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:10]
    return cache_dir() / "train_state" / f"{Path(out).name}-{key}" / name
from ..world.vocab import ATTRIBUTES


def _lr_at(step, steps, lr):
    """Linear warm-up over 5% then cosine decay."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator, amount: float = 0.04) -> torch.Tensor:
    """Perturb face boxes by a few percent of s (robustness to detector error)."""
    noise = torch.randn(boxes.shape, generator=gen) * amount
    s = boxes[:, 2:3]
    return boxes + torch.cat([noise[:, :2] * s, noise[:, 2:] * s], 1)


class _Batches:
    """Random batches from a bank, as tensors on ``device``."""

    def __init__(self, bank: Bank, batch: int, seed: int, device):
        self.images = to_tensor(bank.images)
        self.ids = torch.from_numpy(bank.ids)
        self.boxes = torch.from_numpy(bank.boxes)
        self.labels = {k: torch.from_numpy(v) for k, v in bank.labels.items()}
        self.batch, self.device = batch, device
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self):
        idx = torch.randint(len(self.ids), (self.batch,), generator=self.gen)
        d = self.device
        return (self.images[idx].to(d), self.ids[idx].to(d), self.boxes[idx].to(d),
                {k: v[idx].to(d) for k, v in self.labels.items()})


def train_net(spec: NetTraining, bank: Bank, device=None, progress: bool = True, desc: str = "") -> tuple[torch.nn.Module, dict]:
    """Train one network of the mini world; returns (model in eval mode, training stats)."""
    device = default_device(device)
    torch.manual_seed(spec.seed)
    model = nets.build(spec.kind, spec.model_config()).to(device)
    n_classes = world.N_TRAIN
    head = None
    if spec.kind == "recognizer":
        head = nets.ArcFaceHead(model.dim, n_classes).to(device)
    elif spec.kind == "image_encoder":
        head = nets.ArcFaceHead(model.dim, n_classes).to(device)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=5e-4)
    batches = _Batches(bank, spec.batch, spec.seed, device)
    model.train()
    t0, ema = time.time(), None
    bar = tqdm(range(spec.steps), desc=desc or spec.kind, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.steps, spec.lr)
        images, ids, boxes, labels = batches()
        margin = spec.margin * min(1.0, step / max(1, spec.steps * 0.3))  # margin ramps up over the first 30%
        with autocast(device):
            loss = _loss(spec.kind, model, head, images, ids, boxes, labels, margin, batches.gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc or spec.kind}: loss became {loss.item()} at step {step}; "
                                     f"lower lr (now {spec.lr}) or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return model, {"train_loss": round(float(ema), 4), "train_seconds": round(time.time() - t0, 1),
                   "steps": spec.steps, "batch": spec.batch}


def _loss(kind, model, head, images, ids, boxes, labels, margin, gen):
    if kind == "recognizer":
        crops = align_faces(images, jitter_boxes(boxes.cpu(), gen).to(images.device))
        return F.cross_entropy(head(model(crops), ids, margin), ids)  # ArcFace
    if kind == "detector":
        pred = model(images)
        return F.smooth_l1_loss(pred, boxes)
    if kind == "face_presence":  # renders are faces; the same number of faceless images are not
        x = torch.cat([images, faceless.training_faceless(images.cpu(), boxes.cpu(), gen).to(images)])
        target = torch.cat([torch.ones(len(images)), torch.zeros(len(images))]).to(images)
        return F.binary_cross_entropy_with_logits(model(x).float(), target)
    if kind == "probe":
        logits = model(images)
        return sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)
    if kind == "image_encoder":  # attributes and identity: its hidden states carry both
        g, logits = model(images)
        ident = F.cross_entropy(head(g, ids, margin), ids)
        return sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES) + 0.5 * ident
    raise ValueError(kind)


def pretrain(cfg: PretrainConfig, out: Path, device=None, resume: bool = False, only=None, progress: bool = True) -> dict:
    """Train every network in ``cfg`` (or those in ``only``) and save each into ``out`` as soon as it is done."""
    out = Path(out)
    known = list(cfg.nets) + (["base"] if cfg.base is not None else [])
    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}; choose from {known}")
    manifest = checkpoints.read_manifest(out)
    bank = render_bank(world.TRAIN_IDS, cfg.train_variants, seed=0, progress=progress)
    report = {}
    names = [n for n in cfg.nets if only is None or n in only]
    for name in tqdm(names, desc=f"pretrain ({cfg.profile})", disable=not progress):
        spec = cfg.nets[name]
        done = manifest.get("models", {}).get(name)
        model = None
        if resume and done and done.get("config") == spec.model_config() and done.get("metrics", {}).get("steps") == spec.steps:
            report[name] = done["metrics"]
        else:
            model, stats = train_net(spec, bank, device, progress, desc=name)
            if spec.kind == "face_presence":  # measured where it never trained: does it know "no face"?
                stats.update(face_check_rates(model))
            checkpoints.save_model(out, name, spec.kind, spec.model_config(), model, profile=cfg.profile,
                                   seed=spec.seed, metrics=stats)
            report[name] = stats
        if name == "phi_cond" and (model is not None or "phi_cond_onnx" not in manifest.get("files", {})):
            # the ID condition goes through insightface, as antelopev2's recognizer does; exported from the
            # stored (fp16-rounded) weights, so that the ONNX and torch paths hold the same numbers
            model = checkpoints.load_model(name, out)
            onnx = export_recognizer_onnx(model, out / "phi_cond.onnx")
            checkpoints.record_file(out, "phi_cond_onnx", "onnx", onnx, source="phi_cond")
    if cfg.base is not None and (only is None or "base" in only):
        report["base"] = pretrain_base(cfg, out, bank, device, resume, progress)
    return report


def pretrain_base(cfg: PretrainConfig, out: Path, bank: Bank, device=None, resume=False, progress=True) -> dict:
    """Train the original model (checkpointing its training state, see ``train_state_dir``) and save it."""
    done = checkpoints.read_manifest(out).get("base")
    if resume and done and done.get("config") == base_config_dict(cfg.base.model) \
            and done.get("training") == training_recipe(cfg.base):
        return done["metrics"]
    state_dir = train_state_dir(out, "base")
    model, stats = train_base(cfg.base, bank, state_dir, device, resume=resume, progress=progress)
    save_base(out, model.cpu(), stats, cfg.profile, training_recipe(cfg.base))
    shutil.rmtree(state_dir, ignore_errors=True)  # only an unfinished run needs its resume state (~100+ MB)
    with contextlib.suppress(OSError):
        state_dir.parent.rmdir()  # the output folder's own state folder, once nothing else of it is left
    return stats
