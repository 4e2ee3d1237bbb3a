"""The one scheduler wrapper: noise schedule, the standard sampler and the differentiable Lightning sampler.

v-prediction with the cosine schedule (docs/method.md, "The noise schedule": with epsilon-prediction the first
few-step solver step explodes, since alpha_bar at t=999 is ~0). All arithmetic is diffusers' schedulers'.

``model_fn(x_t, t, step) -> v`` is any callable (the base UNet with text, or with text + ID); ``step`` is the
sampler step index, so attention hooks can key their captures by it.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch.utils.checkpoint import checkpoint

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
LIGHTNING_STEPS = 4
ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def training_scheduler() -> DDPMScheduler:
    """Forward process for training: ``add_noise`` and ``get_velocity`` (the v target)."""
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def make_scheduler(solver: str, steps: int):
    """``ddim`` or ``dpm++`` (DPM-Solver++ 2M), trailing timesteps (as SDXL-Lightning), ``steps`` steps."""
    if solver == "ddim":
        s = DDIMScheduler(**SCHEDULE, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)
    elif solver == "dpm++":
        s = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", final_sigmas_type="zero")
    else:
        raise ValueError(f"unknown solver {solver!r}; use 'ddim' or 'dpm++'")
    s.set_timesteps(steps)
    return s


def diffusion_targets(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps ; v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    return scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)


@torch.no_grad()
def sample(model_fn: ModelFn, x_T: torch.Tensor, steps: int = 25, solver: str = "dpm++") -> torch.Tensor:
    """Standard sampler (no gradients): x_T (B, 3, 32, 32) -> x0 in about [-1, 1]."""
    sched = make_scheduler(solver, steps)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        v = model_fn(x, t.expand(len(x)).to(x.device), i)
        x = sched.step(v, t, x).prev_sample
    return x


def lightning_sample(model_fn: ModelFn, x_T: torch.Tensor, steps: int = LIGHTNING_STEPS, grad_steps: int | None = None,
                     use_checkpoint: bool = True, scheduler=None, graph_every_step: bool = False) -> torch.Tensor:
    """The Lightning branch: ``steps`` DDIM steps (trailing) from pure noise, differentiable.

    Gradients flow through the last ``grad_steps`` steps (default: all) of the chain x_T -> x0. Earlier steps run
    without a graph — unless ``graph_every_step``: then each earlier step also keeps its own graph, from a detached
    input and to a detached output, so what a step computes inside the UNet (the attention captures the alignment
    loss reads) trains the adapter at every step while the image's gradient (L_id) still stops at the last
    ``grad_steps`` steps. With ``use_checkpoint`` each step's UNet activations are recomputed in backward
    (per-step gradient checkpointing), so memory does not grow with the number of steps that keep a graph.
    ``scheduler``: a DDIM scheduler with ``steps`` timesteps set (default: ours; the real tier passes its own).
    """
    grad_steps = steps if grad_steps is None else grad_steps
    if not 0 <= grad_steps <= steps:
        raise ValueError(f"grad_steps must be in 0..{steps}, got {grad_steps}")
    sched = scheduler if scheduler is not None else make_scheduler("ddim", steps)
    if len(sched.timesteps) != steps:
        raise ValueError(f"the scheduler has {len(sched.timesteps)} timesteps set, expected {steps}")
    x = x_T
    for i, t in enumerate(sched.timesteps):
        tt = t.expand(len(x)).to(x.device)

        def one_step(x_in, i=i, t=t, tt=tt):
            v = model_fn(x_in, tt, i)
            return sched.step(v, t, x_in).prev_sample  # DDIM, eta = 0

        chained = i >= steps - grad_steps  # on the image's gradient path (L_id)
        if not torch.is_grad_enabled() or not (chained or graph_every_step):
            with torch.no_grad():
                x = one_step(x)
            continue
        x_in = x if chained else x.detach()
        x = checkpoint(one_step, x_in, use_reentrant=False) if use_checkpoint else one_step(x_in)
        if not chained:
            x = x.detach()  # x_{t-1} enters the next step as a constant: the chain starts at step steps - grad_steps
    return x


def naive_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """One-step x0 estimate at timestep t from a v prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v
