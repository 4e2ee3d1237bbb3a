"""The three-stage PuLID trainer (docs/method.md): only the ID encoder and the ID key/value
projections train; the original model and every recognizer stay frozen.

- Stage 1: L_diff, the ID condition taken from the target image itself (``id_source='same'``: the source of
  contamination) or from another render of the same identity (``'other'``).
- Stage 2: + lambda_id L_id, on the Lightning branch with the neutral prompt (``id_loss='lightning'``) or on
  the one-step x0_hat of the diffusion branch (``id_loss='naive'``, the baseline row).
- Stage 3: + L_align (lambda_sem, lambda_layout) on the two Lightning paths (with and without ID, same x_T and
  prompt) for prompts chosen to reveal contamination, over all attn2 layers and all sampler steps; its gradient
  comes from every step with ``align_every_step``, else only from the last ``grad_steps`` steps (the earlier
  steps' captures are then constants).

Batches are a pure function of (seed, step); the adapter, optimiser and log are checkpointed every
``checkpoint_every`` steps, so ``resume=True`` continues an interrupted run and loses at most that many steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import losses
from ..core.adapter import VIEWS, PuLIDAdapter
from ..core.attention import IDAttnSettings
from ..core.branches import lightning_branch, unet_fn
from ..core.device import autocast, default_device
from ..core.files import atomic_write, plain_json, write_log
from ..core.id_encoder import IDEncoderConfig
from ..core.imaging import align_faces, to_tensor
from ..core.objective import NonFiniteLoss, pulid_objective
from ..core.sampling import diffusion_targets, naive_x0, training_scheduler
from ..models import checkpoints
from ..models.base import OriginalModel, initial_noise, load_base
from ..models.identity import IDConditioner, RowConditioner, embedding_dim_and_channels
from ..world.data import Bank
from .base_trainer import captions_for, face_weight_map

NEUTRAL_PROMPT = "a portrait, photo"  # C_txt of the ID loss (the paper: "portrait, color, cinematic")
# Prompts that reveal contamination: each names attributes a reference image may carry (docs/world.md).
ALIGN_PROMPTS = (
    "a portrait, comic", "a portrait, sketch", "a portrait, pixel art", "a portrait, painting",
    "a portrait, photo, red background", "a portrait, photo, green background", "a portrait, blue background",
    "a portrait, yellow background, left light", "a portrait, purple background, right light",
    "a portrait, comic, pink background", "a portrait, sketch, teal background", "a portrait, top light",
    "a portrait, glasses", "a portrait, hat", "a portrait, no glasses, no hat", "a portrait, smiling",
    "a portrait, on the left, distant", "a portrait, on the right, close-up", "a portrait, old",
    "a portrait, painting, orange background, glasses",
)


@dataclass
class PuLIDTraining:
    stage: int = 1
    id_loss: str = "lightning"  # lightning | naive (stages 2 and 3)
    id_source: str = "same"  # same | other
    # alignment weights: a quarter of the paper's 0.6 / 0.1. With alignment at every Lightning step (below) the paper's
    # weights erased two thirds of the identity Stage 2 had gained (validation, quick: Face Sim 0.514 -> 0.358); of
    # 1, 1/4 and 1/8 of them, lesson 05's rule (prompt score within 0.03 of the best, then the highest Face Sim)
    # picked 1/4 (docs/results.md, 2026-12-03); on the 1,200-step Stage 2 no weight of the 3 x 3 grid beats it on
    # validation in every metric: they trade identity for prompt score along one front (2026-12-04)
    lambda_sem: float = losses.LAMBDA_SEM / 4
    lambda_layout: float = losses.LAMBDA_LAYOUT / 4
    # weight of L_id: three times the paper's 1.0. Measured (quick, validation split, Stage 2 600 steps from the shipped
    # Stage 1): the same identity as lambda_id 1 (recognized 61.5% vs 57.3%, Face Sim 0.645 vs 0.624) with a prompt
    # score 0.068 higher (0.778 vs 0.710): L_id outweighs L_diff's pull toward copying the reference (docs/results.md)
    lambda_id: float = 3.0
    # L_align over the (layer, step) pairs: 'sum' as the paper writes it, or 'mean' (sum / pairs): the mini
    # world's default, see experiment.Experiment.align_reduction for the measurement behind it
    align_reduction: str = "mean"
    # Lightning steps backpropagated (k). Measured (quick, validation split, from the 1,500-step Stage 1): at 100 steps
    # k = 1 and k = 4 reach the same Face Sim (0.41) while a k = 1 step costs ~0.6x; the paper allows k = 1 (41 GB vs
    # 63 GB on SDXL) and its authors advise backpropagating only through the last steps
    grad_steps: int = 1
    # stage 3: the alignment loss trains the adapter at every Lightning step (each step's graph from a detached input),
    # as the paper's sum over steps says; False: only through the last grad_steps steps (the earlier steps' captures
    # are then constants: with k = 1, Stage 3 hardly moved prompt score or purity). L_id stays on the last k steps
    align_every_step: bool = True
    # stage 3: L_align_sem averages over the caption's own tokens only (<bos>, words, <eos>), not the padding that
    # fills about three quarters of the 32 text positions; False: over all 32. Measured (quick, validation, Stage 3):
    # the same within one seed's noise (recognized 71.9% vs 74.0%, prompt score 0.747 vs 0.752): padding responses
    # move with the caption's own (docs/method.md)
    align_token_mask: bool = False
    steps: int = 1000
    batch: int = 16  # diffusion branch
    lightning_batch: int = 8  # Lightning branch of the ID loss
    align_batch: int = 4  # Lightning paths of the alignment loss (stage 3; each runs with and without the ID)
    lr: float = 1e-3  # measured: 1e-4 leaves the adapter near its initialisation within the profiles' budgets
    # extra weight of the face-box pixels in L_diff (as the original model was trained; face_weight_map); 0 = plain
    face_weight: float = 0.0
    # probability that a diffusion-branch sample gets the unconditional ID tokens (the encoder on zeros) instead of
    # its reference's: trains the path classifier-free guidance uses, and asks the ID tokens to carry what L_diff needs
    id_dropout: float = 0.0
    caption_dropout: float = 0.5  # incomplete captions: the shortcut through the ID path
    checkpoint_every: int = 50
    seed: int = 0
    encoder: IDEncoderConfig = field(default_factory=IDEncoderConfig)
    settings: IDAttnSettings = field(default_factory=IDAttnSettings)
    # what the image encoder sees of the reference: 'full' (the whole render, background and all: the channel
    # through which Stage 1's contamination enters in the mini world) or 'crop' (the aligned face, as the official
    # code feeds EVA-CLIP; measured: weaker contamination, Face Sim no better)
    reference_view: str = "full"
    # per-step gradient checkpointing of the Lightning branch: what makes k=4 affordable on SDXL; a 32x32 mini
    # UNet's activations at batch 4 are a few MB, so the mini world skips the recomputation (one extra forward per step)
    lightning_checkpoint: bool = False

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.id_loss not in ("lightning", "naive"):
            raise ValueError(f"id_loss must be 'lightning' or 'naive', got {self.id_loss!r}")
        if self.id_source not in ("same", "other"):
            raise ValueError(f"id_source must be 'same' or 'other', got {self.id_source!r}")
        if self.reference_view not in VIEWS:
            raise ValueError(f"reference_view must be one of {VIEWS}, got {self.reference_view!r}")
        if self.align_reduction not in losses.REDUCTIONS:
            raise ValueError(f"align_reduction must be one of {losses.REDUCTIONS}, got {self.align_reduction!r}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.face_weight < 0:
            raise ValueError(f"face_weight must be >= 0, got {self.face_weight}")
        if not 1 <= self.grad_steps <= 4:
            raise ValueError(f"grad_steps must be 1..4, got {self.grad_steps}")


def reference_indices(bank: Bank, idx: np.ndarray, source: str, rng: np.random.Generator) -> np.ndarray:
    """Bank rows of the ID reference for targets ``idx``: the target itself, or another render of its identity."""
    if source == "same":
        return idx
    ids = bank.ids
    out = []
    for i in idx:
        same = np.flatnonzero(ids == ids[i])
        others = same[same != i]
        out.append(rng.choice(others) if len(others) else i)
    return np.array(out)


class PuLIDTrainer:
    """Holds the frozen models and the adapter; ``fit`` runs (or resumes) one stage."""

    def __init__(self, cfg: PuLIDTraining, bank: Bank, out: Path, models_dir: Path | None = None,
                 base: OriginalModel | None = None, init_adapter: Path | None = None, device=None):
        self.cfg, self.bank, self.out = cfg, bank, Path(out)
        self.device = default_device(device)
        self.base = (base or load_base(models_dir)).to(self.device).eval().requires_grad_(False)
        id_dim, channels = embedding_dim_and_channels(models_dir)
        enc = IDEncoderConfig(**{**asdict(cfg.encoder), "id_dim": id_dim, "feature_channels": channels,
                                 "token_dim": self.base.unet.config.cross_attention_dim})
        torch.manual_seed(cfg.seed)
        self.adapter = PuLIDAdapter(self.base.unet, enc, cfg.settings, cfg.reference_view).to(self.device)
        if init_adapter is not None:  # stage n starts from stage n-1
            self.adapter.load_state_dict(load_adapter_state(init_adapter))
        self.conditioner = RowConditioner(IDConditioner(models_dir, cfg.reference_view, self.device), bank.images)
        self.phi = checkpoints.load_model("phi_loss", models_dir, self.device).requires_grad_(False)
        self.detector = checkpoints.load_model("detector", models_dir, self.device).requires_grad_(False)
        self.scheduler = training_scheduler()
        self.images = to_tensor(bank.images)
        self.opt = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.lr, weight_decay=1e-2)

    # -- one step -------------------------------------------------------------------------------------
    def step_losses(self, step: int) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.device
        rng = np.random.default_rng((cfg.seed, step))
        idx = rng.integers(len(self.bank), size=cfg.batch)
        ref_idx = reference_indices(self.bank, idx, cfg.id_source, rng)
        caps = captions_for(self.bank.labels, idx, rng, cfg.caption_dropout, 0.0)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        emb, feats = self.conditioner(ref_idx)
        tokens = self.adapter.tokens(emb, feats)
        x0 = self.images[idx].to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen).to(dev)
        x_t, v = diffusion_targets(x0, noise, t, self.scheduler)
        text = self.base.encode(caps)
        out: dict[str, torch.Tensor] = {}
        # runs inside fit()'s `adapter.installed`: backward re-runs the checkpointed Lightning steps
        diff_tokens, kept = tokens, None
        if cfg.id_dropout:  # the unconditional ID for some samples of the diffusion branch
            kept = torch.from_numpy(rng.random(cfg.batch) >= cfg.id_dropout).to(dev)
            diff_tokens = torch.where(kept[:, None, None], tokens, self.adapter.uncond_tokens(emb, feats))
        weights = face_weight_map(torch.from_numpy(self.bank.boxes[idx]).to(dev), cfg.face_weight) if cfg.face_weight else None
        v_hat = unet_fn(self.base.unet, text, diff_tokens)(x_t, t, 0)
        out["diff"] = losses.diffusion_loss(v_hat, v, weights)  # L_diff
        if cfg.stage >= 2:
            ref_emb = self._reference_embedding(ref_idx)
            if cfg.id_loss == "naive":  # phi on x0_hat at the training timestep
                x0_hat = naive_x0(x_t, v_hat, t, self.scheduler).clamp(-1, 1)
                if kept is not None:  # a sample without its ID has no identity to be compared with
                    ref_emb, x0_hat = ref_emb[kept], x0_hat[kept]
                out["id"] = (losses.id_loss(self.phi, ref_emb, x0_hat, self.detector) if len(x0_hat)
                             else v_hat.sum() * 0)
            else:  # phi on the Lightning branch's x0 from pure noise, neutral prompt
                n = cfg.lightning_batch
                x_T = initial_noise(n, [int(s) for s in rng.integers(2**31, size=n)], dev)
                lt = lightning_branch(self.base.unet, self.base.encode([NEUTRAL_PROMPT] * n), tokens[:n], x_T,
                                      grad_steps=cfg.grad_steps, with_plain=False, capture=False,
                                      use_checkpoint=cfg.lightning_checkpoint)
                out["id"] = losses.id_loss(self.phi, ref_emb[:n], lt.image_id, self.detector)
        if cfg.stage == 3 and (cfg.lambda_sem or cfg.lambda_layout):  # both lambdas 0: nothing to align
            n = cfg.align_batch
            prompts = [ALIGN_PROMPTS[j] for j in rng.integers(len(ALIGN_PROMPTS), size=n)]
            x_T = initial_noise(n, [int(s) for s in rng.integers(2**31, size=n)], dev)
            br = lightning_branch(self.base.unet, self.base.encode(prompts), tokens[:n], x_T, grad_steps=cfg.grad_steps,
                                  use_checkpoint=cfg.lightning_checkpoint, graph_every_step=cfg.align_every_step)
            red = cfg.align_reduction
            mask = self.base.token_mask(prompts) if cfg.align_token_mask else None  # (n, 32) or all tokens
            out["align_sem"] = (losses.align_semantic_loss(br.capture_id, br.capture_plain, mask, reduction=red)
                                if cfg.lambda_sem else v_hat.sum() * 0)
            out["align_layout"] = (losses.align_layout_loss(br.capture_id, br.capture_plain, reduction=red)
                                   if cfg.lambda_layout else v_hat.sum() * 0)
        return pulid_objective(out, cfg.lambda_id, cfg.lambda_sem, cfg.lambda_layout)

    @torch.no_grad()
    def _reference_embedding(self, ref_idx):
        x = self.images[ref_idx].to(self.device)
        return self.phi(align_faces(x, self.detector(x)))

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
        cfg = self.cfg
        state_path = self.out / "train_state.pt"
        start, log = 0, []
        if resume and state_path.exists():
            st = torch.load(state_path, map_location=self.device, weights_only=False)
            self.adapter.load_state_dict(st["adapter"]), self.opt.load_state_dict(st["opt"])
            start, log = st["step"], st["log"]
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        bar = tqdm(range(start, end), desc=f"stage {cfg.stage}", initial=start, total=cfg.steps, disable=not progress)
        t0 = time.time()
        with self.adapter.installed(self.base.unet):
            self._loop(bar, end, state_path, log)
        if end == cfg.steps:
            save_adapter(self.out, self.adapter, cfg, {"steps": cfg.steps, "seconds": round(time.time() - t0, 1),
                                                       "final": log[-1] if log else {}})
        return {"steps_done": end, "resumed_from_step": start, "log": log}

    def _loop(self, bar, end, state_path, log):
        cfg = self.cfg
        for step in bar:
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * (0.5 + 0.5 * math.cos(math.pi * step / cfg.steps))
            with autocast(self.device):
                terms = self.step_losses(step)
            total = terms["total"]
            if not torch.isfinite(total):
                raise self._non_finite(f"the loss became {total.item()}", step, terms, state_path)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), 1.0)
            if not torch.isfinite(grad_norm):  # stop before the step: the weights on disk and in memory stay finite
                raise self._non_finite(f"the gradient norm became {grad_norm.item()}", step, terms, state_path)
            self.opt.step()
            log.append({"step": step, **{k: round(float(v.detach()), 6) for k, v in terms.items()}})
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in terms.items()})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                self._checkpoint(state_path, step + 1, log)

    def _non_finite(self, what: str, step: int, terms: dict, state_path: Path) -> NonFiniteLoss:
        cfg = self.cfg
        kept = (f"the last checkpoint (finite weights, step {torch.load(state_path, weights_only=False)['step']}) is "
                f"{state_path}" if state_path.exists() else "no checkpoint was written yet")
        parts = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
        return NonFiniteLoss(f"stage {cfg.stage}: {what} at step {step} ({parts}); {kept}. Lower the learning rate "
                             f"(now {cfg.lr:g}): rerun the same command with --set lr={cfg.lr / 2:g} (the stages before "
                             f"this one are reused).")

    def _checkpoint(self, path: Path, step: int, log: list):
        state = {"adapter": self.adapter.state_dict(), "opt": self.opt.state_dict(), "step": step, "log": log}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        write_log(path.parent / "losses.csv", log)


def save_adapter(folder: Path, adapter: PuLIDAdapter, cfg: PuLIDTraining, metrics: dict) -> None:
    config = {"training": plain_json(asdict(cfg)), "encoder": plain_json(asdict(adapter.encoder.cfg)),
              "settings": plain_json(asdict(adapter.settings))}
    checkpoints.save_model(folder, "adapter", "adapter", config, adapter, profile=config["training"].get("profile", "custom"),
                           seed=cfg.seed, metrics=metrics)


def load_adapter_state(folder: Path) -> dict:
    return checkpoints.load_state("adapter", folder)[0]


def load_adapter(folder: Path, unet) -> PuLIDAdapter:
    """A trained adapter (sha256 checked) for ``unet``."""
    state, entry = checkpoints.load_state("adapter", folder)
    enc = checkpoints.config_from_json(IDEncoderConfig, entry["config"]["encoder"])
    view = entry["config"].get("training", {}).get("reference_view", "crop")
    adapter = PuLIDAdapter(unet, enc, IDAttnSettings(**entry["config"]["settings"]), view)
    adapter.load_state_dict(state)
    return adapter.eval()
