"""The two training branches of PuLID: the ordinary diffusion branch (with its naive one-step x0) and the
Lightning T2I branch (few-step sampling from pure noise, with and without the ID, same x_T and prompt)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import Capture, id_kwargs, installed_id_processor
from .sampling import LIGHTNING_STEPS, lightning_sample


def unet_fn(unet, text_tokens, id_tokens=None, id_scale: float = 1.0, capture: Capture | None = None,
            added_cond_kwargs: dict | None = None):
    """A sampler callable ``(x_t, t, step) -> model output`` for a UNet patched with our processors (``install``).

    ``added_cond_kwargs``: SDXL's pooled text and size conditioning (None for the mini UNet and SD1.5). The input
    is cast to the UNet's dtype and the output back to the input's dtype (a bf16 SDXL UNet under fp32 latents).

    It checks on every call that the processors are still installed: with gradient checkpointing the UNet is
    re-run during ``backward``, which must therefore also happen inside ``install`` / ``adapter.installed``."""
    probe = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    dtype = unet.dtype
    text_tokens = text_tokens.to(dtype)

    def fn(x, t, step):
        if installed_id_processor(probe) is None:
            raise RuntimeError("the UNet's ID processors are not installed (was backward called outside "
                               "`with adapter.installed(unet)`? checkpointed steps re-run the UNet in backward)")
        kwargs = id_kwargs(id_tokens, id_scale, capture, step)
        out = unet(x.to(dtype), t, encoder_hidden_states=text_tokens, added_cond_kwargs=added_cond_kwargs,
                   cross_attention_kwargs=kwargs).sample
        return out if out.dtype == x.dtype else out.to(x.dtype)
    return fn


@dataclass
class LightningOutput:
    image_id: torch.Tensor  # (B, 3, 32, 32) x0 with the ID, differentiable
    image_plain: torch.Tensor | None  # (B, 3, 32, 32) x0 without the ID (no gradient)
    capture_id: Capture | None
    capture_plain: Capture | None


def lightning_branch(unet, text_tokens, id_tokens, x_T, id_scale: float = 1.0, grad_steps: int | None = None,
                     with_plain: bool = True, steps: int = LIGHTNING_STEPS, use_checkpoint: bool = True,
                     layers: set[str] | None = None, capture: bool = True, scheduler=None,
                     added_cond_kwargs: dict | None = None, graph_every_step: bool = False
                     ) -> LightningOutput:
    """Run the Lightning sampler from ``x_T`` with the ID (gradients through the last ``grad_steps`` steps)
    and, if ``with_plain``, without it (no gradients: the prompt-only path is the alignment target).
    ``unet`` must have our processors installed. Captures (``capture=True``) hold Q and K of every attn2 layer
    at every step — only the alignment loss needs them; without them backprop memory hardly grows with k.
    ``graph_every_step``: the captures of *every* step carry gradients to the adapter (the alignment loss at every
    step, as the paper), while the image's gradient still flows through the last ``grad_steps`` steps only
    (``sampling.lightning_sample``); the captures of earlier steps are constants otherwise.
    ``scheduler`` (a DDIM scheduler with ``steps`` timesteps set) and ``added_cond_kwargs``: what the real tier's
    pipelines need (see ``sampling.lightning_sample`` and ``unet_fn``); the mini world uses the defaults."""
    cap_id = Capture(layers=layers) if capture else None
    image_id = lightning_sample(unet_fn(unet, text_tokens, id_tokens, id_scale, cap_id, added_cond_kwargs), x_T, steps,
                                grad_steps, use_checkpoint, scheduler, graph_every_step and capture)
    image_plain, cap_plain = None, None
    if with_plain:
        cap_plain = Capture(layers=layers) if capture else None
        with torch.no_grad():
            image_plain = lightning_sample(unet_fn(unet, text_tokens, None, 0.0, cap_plain, added_cond_kwargs), x_T,
                                           steps, scheduler=scheduler)
    return LightningOutput(image_id, image_plain, cap_id, cap_plain)
