"""Training the original model: text encoder + UNet jointly, v-prediction diffusion loss, EMA weights.

Batches are a pure function of (seed, step), and the full training state (weights, EMA, optimiser, step) is
saved every ``checkpoint_every`` steps, so an interrupted run resumes with ``resume=True`` and reaches the same
weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.device import autocast, default_device
from ..core.files import atomic_write
from ..core.imaging import to_tensor
from ..core.sampling import diffusion_targets, training_scheduler
from ..models.base import UNCONDITIONAL, BaseModelConfig, OriginalModel, base_config_dict
from ..world import vocab
from ..world.data import Bank


@dataclass
class BaseTraining:
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    steps: int = 20000
    batch: int = 32
    lr: float = 4e-4
    attribute_dropout: float = 0.3  # each attribute is left out of the caption with this probability
    uncond_prob: float = 0.1  # whole caption dropped (classifier-free guidance)
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    # weight of the caption-reading loss on the text tokens (CaptionReader); 0 = the diffusion loss alone
    caption_reading: float = 0.0
    # extra weight of the pixels inside the face box in the diffusion loss (face_weight_map); 0 = plain MSE
    face_weight: float = 0.0


def training_recipe(cfg: BaseTraining) -> dict:
    """What decides the trained weights, besides the architecture (``base_config_dict``): recorded in the manifest
    so that ``pretrain --resume`` retrains a base whose recipe changed."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("model", "checkpoint_every")}


def captions_for(labels: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator, attribute_dropout: float,
                 uncond_prob: float) -> list[str]:
    """Incomplete captions for bank rows ``idx``: each attribute kept with prob 1 - dropout; some captions empty."""
    out = []
    for i in idx:
        if rng.random() < uncond_prob:
            out.append(UNCONDITIONAL)
            continue
        attrs = {a: (vocab.ATTRIBUTES[a][int(labels[a][i])] if rng.random() >= attribute_dropout else None)
                 for a in vocab.ATTRIBUTES}
        out.append(vocab.caption(attrs))
    return out


class CaptionReader(nn.Module):
    """Training-only head: reads every attribute of the caption back from the text tokens (mean over the tokens).

    Joint training alone let the text encoder merge the words the UNet had not learned to use yet: in the shipped
    base, the tokens of "on the left" and "on the right" differ by 4-12% (relative L2) against 76% for two
    background colours, and the samples ignore position, glasses, hat and expression. Asking the tokens to name
    every attribute keeps those words apart. Alone it separates the tokens but not the samples (docs/results.md,
    "2026-12-01 — the original model that ships"); with coordinate channels, self-attention at 8x8 and face weighting it is part of
    every profile's recipe (``train.config``, weight 0.1). The dataclass default 0 is the plain diffusion loss."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v) + 1) for a, v in vocab.ATTRIBUTES.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = tokens.mean(1)  # (B, 32, D) -> (B, D)
        return {a: head(pooled) for a, head in self.heads.items()}  # logits: the values, then "not mentioned"


def caption_labels(captions: list[str], device=None) -> dict[str, torch.Tensor]:
    """Class per attribute for each caption: the value's index, or len(values) when the caption is silent."""
    parsed = [vocab.parse(c) for c in captions]
    return {a: torch.tensor([values.index(p[a]) if p[a] is not None else len(values) for p in parsed], device=device)
            for a, values in vocab.ATTRIBUTES.items()}


def caption_reading_loss(reader: CaptionReader, tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
    labels = caption_labels(captions, tokens.device)
    logits = reader(tokens.float())
    return torch.stack([F.cross_entropy(logits[a], labels[a]) for a in logits]).mean()  # mean CE over attributes


def face_weight_map(boxes: torch.Tensor, weight: float, size: int = 32) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, size, size): 1 + weight inside each face box, 1 outside, mean 1 per image.

    Glasses and the mouth are 0.2% and 0.03% of the renders' pixel variance, so under a plain MSE the words that
    name them can save the model almost nothing; weighting the face box makes the face's fine structure count.
    ``boxes``: (B, 3) face centre x, centre y, half-height s in pixels (Bank.boxes)."""
    c = torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5
    cx, cy, s = (boxes[:, k, None, None] for k in range(3))
    inside = ((c[None, None, :] - cx).abs() <= s) & ((c[None, :, None] - cy).abs() <= s)  # (B, H, W)
    w = 1 + weight * inside.float()
    return (w / w.mean((1, 2), keepdim=True))[:, None]


def _lr(step, cfg):
    warm = 200
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm))))


def train_base(cfg: BaseTraining, bank: Bank, state_dir: Path, device=None, resume: bool = False,
               progress: bool = True, stop_after: int | None = None,
               init: OriginalModel | None = None) -> tuple[OriginalModel, dict]:
    """Train (or resume) the original model; returns the EMA model in eval mode and training stats.

    ``stop_after`` ends the run early at that step (after checkpointing) — used by tests of resumption.
    ``init`` starts from a trained model's weights (continued training) instead of a fresh initialisation.
    """
    device = default_device(device)
    state_dir = Path(state_dir)
    state_path = state_dir / "train_state.pt"
    torch.manual_seed(cfg.seed)
    model = OriginalModel(cfg.model).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())
    ema = copy.deepcopy(model).requires_grad_(False)
    reader = CaptionReader(cfg.model.text_hidden).to(device) if cfg.caption_reading else None
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    if reader is not None:
        params += list(reader.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, losses, seconds = 0, [], 0.0
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        _check_same_recipe(st.get("recipe"), _state_recipe(cfg), state_path)
        model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        if reader is not None:
            reader.load_state_dict(st["reader"])
        start, losses, seconds = st["step"], st["losses"], st["seconds"]
    sched = training_scheduler()
    images = to_tensor(bank.images)
    boxes = torch.from_numpy(np.asarray(bank.boxes, np.float32))
    model.train()
    t0 = time.time()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), desc="base model", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        rng = np.random.default_rng((cfg.seed, step))  # the batch is a function of (seed, step) only
        idx = rng.integers(len(bank), size=cfg.batch)
        caps = captions_for(bank.labels, idx, rng, cfg.attribute_dropout, cfg.uncond_prob)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = images[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen).to(device)
        x_t, v = diffusion_targets(x0, noise, t, sched)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        with autocast(device):
            tokens = model.encode(caps)
            err = (model.predict(x_t, t, tokens).float() - v) ** 2  # L_diff = ||v_hat - v||^2
            if cfg.face_weight:
                err = err * face_weight_map(boxes[idx].to(device), cfg.face_weight)  # face pixels count (1 + w)x
            loss = err.mean()
            if reader is not None:
                loss = loss + cfg.caption_reading * caption_reading_loss(reader, tokens, caps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"base model: loss {loss.item()} at step {step}; the last good state is {state_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_state(state_path, model, ema, opt, step + 1, losses, seconds + time.time() - t0, reader,
                        _state_recipe(cfg))
    seconds += time.time() - t0
    stats = {"steps": cfg.steps, "batch": cfg.batch, "final_loss": round(float(np.mean(losses[-200:])), 5) if losses else None,
             "train_seconds": round(seconds, 1), "images_per_second": round(cfg.batch * len(losses) / max(seconds, 1e-9), 1),
             "resumed_from_step": start}
    return ema.eval(), stats


def _state_recipe(cfg: BaseTraining) -> dict:
    return {"model": base_config_dict(cfg.model), **training_recipe(cfg)}


def _check_same_recipe(saved: dict | None, current: dict, state_path: Path) -> None:
    """A resume state continues only the recipe that wrote it (states from before the check carry none)."""
    if saved is None or saved == current:
        return
    diff = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
    raise ValueError(f"the resume state {state_path} was written by another training recipe (saved, now): {diff}; "
                     "restore that recipe to continue it, or delete the file to start over")


def _save_state(path: Path, model, ema, opt, step, losses, seconds, reader=None, recipe=None):
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "losses": losses, "seconds": seconds, "reader": reader.state_dict() if reader is not None else None,
             "recipe": recipe}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
