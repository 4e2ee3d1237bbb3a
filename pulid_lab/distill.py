"""Progressive distillation of the original model into a few-step student (Salimans & Ho, 2022), the
route SDXL-Lightning takes (it adds an adversarial loss; we do not): for use when 4 plain DDIM steps lose
the fine structure that carries identity.

One round halves the number of DDIM steps: the student learns to do in one step (t -> t'') what the teacher
does in two (t -> t' -> t''). With v-prediction the student's target follows in closed form:
  x0_target = (x_t'' - (sigma_t''/sigma_t) x_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (DDIM, eta = 0)
  v_target  = alpha_t eps_target - sigma_t x0_target, with eps_target = (x_t - alpha_t x0_target) / sigma_t.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .base import OriginalModel
from .data import Bank, to_tensor
from .sampling import make_scheduler, training_scheduler
from .train_base import captions_for


@dataclass
class DistillRound:
    teacher_steps: int  # the student takes teacher_steps // 2
    steps: int = 500
    batch: int = 32
    lr: float = 1e-4
    seed: int = 0


def _alpha_sigma(abar: torch.Tensor):
    return abar.sqrt(), (1 - abar).sqrt()


def _ddim_to(x_t, v, abar_t, abar_s):
    """One DDIM step (eta = 0) from t to s given a v prediction."""
    a_t, s_t = _alpha_sigma(abar_t)
    a_s, s_s = _alpha_sigma(abar_s)
    x0 = a_t * x_t - s_t * v
    eps = s_t * x_t + a_t * v
    return a_s * x0 + s_s * eps


def student_targets(teacher: OriginalModel, x_t, t, t_mid, t_end, tokens, abar):
    """v target for the student's single step t -> t_end, from the teacher's two steps t -> t_mid -> t_end."""
    view = (-1, 1, 1, 1)
    ab_t, ab_m = abar[t].view(view), abar[t_mid].view(view)
    ab_e = torch.where(t_end >= 0, abar[t_end.clamp(min=0)], torch.ones_like(abar[0])).view(view)
    with torch.no_grad():
        x_mid = _ddim_to(x_t, teacher.predict(x_t, t, tokens), ab_t, ab_m)
        x_end = _ddim_to(x_mid, teacher.predict(x_mid, t_mid, tokens), ab_m, ab_e)
    a_t, s_t = _alpha_sigma(ab_t)
    a_e, s_e = _alpha_sigma(ab_e)
    ratio = s_e / s_t
    x0 = (x_end - ratio * x_t) / (a_e - ratio * a_t).clamp_min(1e-6)  # the x0 that lands one step on x_end
    eps = (x_t - a_t * x0) / s_t.clamp_min(1e-6)
    return a_t * eps - s_t * x0  # v = alpha eps - sigma x0


def distill_round(teacher: OriginalModel, bank: Bank, cfg: DistillRound, device=None, progress: bool = True) -> OriginalModel:
    """Train a student (initialised from the teacher) to take half the teacher's DDIM steps."""
    if cfg.teacher_steps < 2 or cfg.teacher_steps % 2:
        raise ValueError(f"teacher_steps must be even and >= 2, got {cfg.teacher_steps}")
    device = device or teacher.device
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    student.text_encoder.requires_grad_(False)
    student.unet.requires_grad_(True)
    opt = torch.optim.AdamW(student.unet.parameters(), lr=cfg.lr)
    abar = training_scheduler().alphas_cumprod.to(device)
    grid = make_scheduler("ddim", cfg.teacher_steps).timesteps.to(device)  # teacher's grid, trailing
    grid = torch.cat([grid, torch.tensor([-1], device=device)])  # -1 = the clean end (abar = 1)
    images = to_tensor(bank.images)
    for step in tqdm(range(cfg.steps), desc=f"distill {cfg.teacher_steps}->{cfg.teacher_steps // 2}", disable=not progress):
        rng = np.random.default_rng((cfg.seed, 7, step))
        idx = rng.integers(len(bank), size=cfg.batch)
        caps = captions_for(bank.labels, idx, rng, 0.3, 0.1)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        k = torch.from_numpy(rng.integers(cfg.teacher_steps // 2, size=cfg.batch) * 2).to(device)  # student steps
        t, t_mid, t_end = grid[k], grid[k + 1], grid[k + 2]
        x0 = images[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a, s = _alpha_sigma(abar[t].view(-1, 1, 1, 1))
        x_t = a * x0 + s * noise
        with torch.no_grad():
            tokens = teacher.encode(caps)
        v_target = student_targets(teacher, x_t, t, t_mid, t_end, tokens, abar)
        loss = F.mse_loss(student.predict(x_t, t, tokens), v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.unet.parameters(), 1.0)
        opt.step()
    return student.eval()
