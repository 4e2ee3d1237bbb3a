"""Training PuLID on real models (docs/real_tier.md): stages 1-3 on a folder of face photos, with a diffusers
SD1.5 / SDXL pipeline (``pulid_lab.real.pipeline.load_pipeline``), the official-shape ``RealAdapter``, insightface and an
image feature extractor (EVA02-CLIP through ``pulid_lab.real.pipeline.load_eva_clip``, or any ``FeatureExtractor``).

- **Data** (``FaceFolder``): ``image.jpg`` (+ optional ``image.txt`` caption; missing -> ``default_caption``),
  resized (shorter side) and centre-cropped to the model resolution. The ID condition is computed from the same
  image (stage 1 as in the paper: the source of contamination) with ``reference_face`` + the feature extractor,
  once per image (kept in memory as float16, optionally cached on disk). Images without a face are skipped with
  a warning.
- **Two UNets**: the diffusion branch (``L_diff``) runs on the pipeline's UNet, the *base* model (stage 1 trains on
  the non-distilled SDXL, as the paper); the Lightning branch runs on ``lightning_unet``, a few-step UNet
  (SDXL-Lightning 4-step, ``pulid_lab.real.pipeline.load_unet``). The VAE, the text encoders and the
  adapter are shared: the same ID projections are installed in both UNets. Stages 2 and 3 refuse to run without
  a few-step UNet: the base UNet at 4 DDIM steps gives blurred faces, and L_id on them would train the adapter on
  noise.
- **Stage 1**: ``L_diff`` on the diffusion branch: VAE latents, noise, a ``DDPMScheduler`` built from the
  pipeline's scheduler config (its ``prediction_type``: epsilon or v), the SDXL ``added_cond_kwargs``
  (``text_embeds`` = pooled text embedding, ``time_ids`` = original size + crop top-left + target size, as
  diffusers' SDXL training scripts). With ``id_dropout`` a share of the samples gets the unconditional ID tokens
  (the encoder on zeros, what classifier-free guidance over the ID uses at generation), so that path is trained.
- **Stage 2**: ``+ lambda_id L_id`` on the Lightning branch: 4 DDIM steps with trailing timesteps from the
  pipeline's scheduler config (deterministic Euler/DDIM, the sampler SDXL-Lightning is distilled for) from pure
  noise with the neutral prompt, the last ``grad_steps`` steps differentiable, decoded by the VAE and embedded
  by ``face_recognizer`` (``pulid_lab.real.recognizer``: antelopev2's recognizer converted to torch, on the face
  the detector finds, aligned by a differentiable warp).
- **Stage 3**: ``+ L_align`` (``pulid_lab.core.losses``) over the two Lightning paths (with / without ID, same x_T
  and prompt) captured with ``pulid_lab.core.attention.Capture``, for prompts chosen to reveal contamination. With
  ``align_every_step`` (the default, as the paper) the alignment loss trains the adapter at *every* step (each
  step's graph from a detached input, recomputed in backward when ``checkpoint_lightning``); L_id still
  backpropagates through the last ``grad_steps`` steps only. The terms are averaged over (layer, step) pairs
  (``align_reduction='mean'``, what the mini world measured) over all text tokens, padding included, as there.

``face_recognizer`` (phi of L_id) must be a **differentiable torch module**: insightface's ONNX recognizers
(antelopev2 ``glintr100.onnx``) run in onnxruntime and give no gradient (``pulid_lab.real.recognizer`` converts one).
It receives the decoded images ``(B, 3, H, W)``, RGB in [-1, 1] at the training resolution, and must return
embeddings ``(B, D)``; face detection and alignment happen inside it. The reference embedding is the same module
applied to the training image, without gradient.

Only the adapter trains (ID encoder + ``id_to_k``/``id_to_v``); the pipeline's models and phi stay frozen.
Memory options (``RealTrainConfig``): bf16 autocast on CUDA, UNet/VAE gradient checkpointing, per-step
checkpointing of the Lightning branch and backprop through only its last ``grad_steps`` steps. Multi-GPU through
HF ``accelerate`` (``Accelerator.prepare`` of the training module, optimiser and data loader), imported lazily;
without it, a plain single-device loop (with a warning when ``use_accelerate`` asked for it).
Checkpoints (``out/checkpoints/step-NNNNNNN``: ``adapter.safetensors``, ``optimizer.pt``, ``state.json``) every
``checkpoint_every`` steps; ``resume=True`` continues from the latest one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core import losses
from ..core.attention import Capture, IDAttnSettings, cross_attention_layers, id_kwargs
from ..core.branches import LightningOutput, lightning_branch
from ..core.device import autocast
from ..core.files import atomic_write, plain_json, write_json
from ..core.objective import pulid_objective
from .pipeline import FeatureExtractor, RealAdapter, V1EncoderConfig, id_condition

DEFAULT_CAPTION = "a photo of a person"
NEUTRAL_PROMPT = "portrait, color, cinematic"  # C_txt of the ID loss, as the paper
ALIGN_PROMPTS = (  # styles and scenes that reveal contamination (docs/method.md)
    "a portrait of a person, anime style", "a portrait of a person, comic book illustration",
    "a portrait of a person, film noir, black and white", "a watercolor painting of a person",
    "a cyberpunk portrait of a person, neon lights", "an oil painting of a person, impressionism",
    "a pencil sketch of a person", "pixel art of a person", "a person on a beach at sunset",
    "a person in a snowy forest, winter clothes", "a person wearing sunglasses and a hat, street photo",
    "a person as an astronaut on the moon", "a 3d render of a person, pixar style",
    "a person in a medieval armour, castle background", "a close-up of a smiling person, studio lighting",
    "a person reading in a library, warm light",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class RealTrainConfig:
    stage: int = 1  # 1: L_diff; 2: + lambda_id L_id (Lightning branch); 3: + L_align
    steps: int = 1000
    batch: int = 1  # diffusion branch, per device
    lightning_batch: int = 1  # Lightning branch (<= batch)
    resolution: int = 1024
    lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lambda_id: float = losses.LAMBDA_ID
    lambda_sem: float = losses.LAMBDA_SEM
    lambda_layout: float = losses.LAMBDA_LAYOUT
    id_scale: float = 1.0
    lightning_steps: int = 4
    grad_steps: int = 1  # L_id backprops through the last k Lightning steps (paper: k=1 41 GB, k=4 63 GB on SDXL)
    align_every_step: bool = True  # L_align trains the adapter at every Lightning step (else only the last k)
    align_reduction: str = "mean"  # over (layer, step) pairs: "mean" (the mini world's measured choice) | "sum"
    id_dropout: float = 0.05  # share of diffusion-branch samples with the unconditional ID (trains the ID's CFG path)
    checkpoint_lightning: bool = True  # recompute each Lightning step in backward
    gradient_checkpointing: bool = False  # unet/vae.enable_gradient_checkpointing()
    mixed_precision: str = "bf16"  # "bf16" (autocast, CUDA only) | "no"
    use_accelerate: bool = True
    caption_dropout: float = 0.0  # probability of an empty caption (diffusion branch)
    neutral_prompt: str = NEUTRAL_PROMPT
    align_prompts: tuple[str, ...] = ALIGN_PROMPTS
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if not 0 <= self.grad_steps <= self.lightning_steps:
            raise ValueError(f"grad_steps must be in 0..{self.lightning_steps}, got {self.grad_steps}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be 'bf16' or 'no', got {self.mixed_precision!r}")
        if not 1 <= self.lightning_batch <= self.batch:
            raise ValueError(f"lightning_batch must be in 1..batch ({self.batch}), got {self.lightning_batch}")
        if self.steps < 1 or self.checkpoint_every < 1:
            raise ValueError("steps and checkpoint_every must be >= 1")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.align_reduction not in losses.REDUCTIONS:
            raise ValueError(f"align_reduction must be one of {losses.REDUCTIONS}, got {self.align_reduction!r}")
        self.align_prompts = tuple(self.align_prompts)


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"face dataset folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def read_caption(image_path: Path, default: str = DEFAULT_CAPTION) -> str:
    txt = Path(image_path).with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
        if text:
            return text
    return default


def resize_center_crop(image, resolution: int):
    """PIL image -> (uint8 (res, res, 3), original (h, w), crop top-left (top, left) in the resized image)."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    return np.asarray(crop, dtype=np.uint8), (h, w), (top, left)


class FaceFolder(Dataset):
    """A folder of face photos with optional captions, and their ID conditions (computed once, from the same image).

    Items: ``pixel_values`` (3, res, res) in [-1, 1], ``caption``, ``id_vec`` (D,), ``hidden_states``
    [(N, C)] * layers, ``original_size`` (2,), ``crop_top_left`` (2,), ``index``.
    """

    def __init__(self, folder: str | Path, face_analysis, extractor: FeatureExtractor, resolution: int,
                 default_caption: str = DEFAULT_CAPTION, cache_dir: str | Path | None = None, device=None,
                 progress: bool = False, parser=None):
        from PIL import Image
        self.resolution = resolution
        self.parsed = parser is not None  # EVA's input: the official parsed 512 crop, or the 112 crop (in the cache key)
        self.paths, self.captions, self.conditions, skipped = [], [], [], []
        cache = Path(cache_dir) if cache_dir is not None else None
        files = list_images(folder)
        for path in files:
            cond = self._cached(cache, path)
            if cond is None:
                image = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
                try:
                    id_vec, hidden = id_condition(image, face_analysis, extractor, name=path.name, device=device,
                                                  parser=parser)
                except ValueError as e:  # no face, no keypoints, ...
                    skipped.append(f"{path.name} ({e})")
                    continue
                cond = (id_vec[0].cpu().half(), [h[0].cpu().half() for h in hidden])
                if cache is not None:
                    cache.mkdir(parents=True, exist_ok=True)
                    saved = {"id_vec": cond[0], "hidden": cond[1]}
                    atomic_write(self._cache_file(cache, path), lambda tmp: torch.save(saved, tmp))
            self.paths.append(path)
            self.captions.append(read_caption(path, default_caption))
            self.conditions.append(cond)
        if skipped:
            warnings.warn(f"{len(skipped)} of {len(files)} images skipped: " + "; ".join(skipped[:5])
                          + (" ..." if len(skipped) > 5 else ""), stacklevel=2)
        if not self.paths:
            raise ValueError(f"no usable face image in {folder}")

    def _cache_file(self, cache: Path, path: Path) -> Path:
        st = path.stat()
        view = "parsed512" if self.parsed else "crop112"
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{view}".encode()).hexdigest()[:16]
        return cache / f"{path.stem}-{key}.pt"

    def _cached(self, cache: Path | None, path: Path):
        if cache is None:
            return None
        f = self._cache_file(cache, path)
        if not f.is_file():
            return None
        d = torch.load(f, map_location="cpu", weights_only=True)
        return d["id_vec"], d["hidden"]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            pixels, original, top_left = resize_center_crop(im, self.resolution)
        id_vec, hidden = self.conditions[i]
        return {"pixel_values": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1,
                "caption": self.captions[i], "id_vec": id_vec.float(), "hidden_states": [h.float() for h in hidden],
                "original_size": torch.tensor(original), "crop_top_left": torch.tensor(top_left), "index": i}


class StepBatchSampler(Sampler):
    """Batches as a pure function of (seed, step, replica): a resumed run sees the batches it would have seen.
    Yields ``replicas`` batches per step, one per process (accelerate's shard then gives process p the p-th)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, end: int, replicas: int = 1):
        self.n, self.batch, self.seed, self.start, self.end, self.replicas = n, batch, seed, start, end, replicas

    def __iter__(self):
        for step in range(self.start, self.end):
            for r in range(self.replicas):
                rng = np.random.default_rng((self.seed, step, r))
                yield rng.integers(self.n, size=self.batch).tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.replicas


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "id_vec", "original_size", "crop_top_left")}
    out["hidden_states"] = [torch.stack(hs) for hs in zip(*(it["hidden_states"] for it in items))]
    out["caption"] = [it["caption"] for it in items]
    out["index"] = torch.tensor([it["index"] for it in items])
    return out


# ---------------------------------------------------------------------------------------------------------------
# the pipeline's pieces
# ---------------------------------------------------------------------------------------------------------------

def is_sdxl(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def encode_text(pipeline, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings (B, 77, ctx), pooled (B, D) for SDXL else None), as the pipeline encodes them."""
    if is_sdxl(pipeline.unet):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipeline.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    return embeds, None


def sdxl_added_cond(pooled, original_size, crop_top_left, target_size, dtype, device) -> dict:
    """SDXL ``added_cond_kwargs`` as diffusers' SDXL training scripts build them:
    time_ids = original (h, w) + crop top-left (top, left) + target (h, w)."""
    b = pooled.shape[0]
    time_ids = torch.cat([torch.as_tensor(original_size).view(-1, 2).expand(b, 2),
                          torch.as_tensor(crop_top_left).view(-1, 2).expand(b, 2),
                          torch.tensor(target_size).view(1, 2).expand(b, 2)], 1)
    return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids.to(device=device, dtype=dtype)}


def training_noise_scheduler(pipeline):
    """DDPM forward process from the pipeline's scheduler config (betas, prediction_type)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(pipeline.scheduler.config)


def lightning_scheduler(pipeline, steps: int = 4):
    """Deterministic DDIM (= Euler for the probability-flow ODE) with trailing timesteps from the pipeline's
    config, ``steps`` steps. Its ``step`` is stateless, so checkpointed steps can be re-run in backward."""
    from diffusers import DDIMScheduler
    s = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                  clip_sample=False, thresholding=False)
    s.set_timesteps(steps)
    return s


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in about [-1, 1], differentiable."""
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z.to(vae.dtype)).sample


# ---------------------------------------------------------------------------------------------------------------
# one training step, as a module (what accelerate wraps)
# ---------------------------------------------------------------------------------------------------------------

class RealPuLIDStep(nn.Module):
    """``forward(batch, step) -> {loss terms}``. Only the adapter is a registered submodule (it is what DDP syncs);
    the frozen pipeline, the Lightning UNet and phi are kept outside the module tree. Must run inside
    ``adapter.installed(unet)`` and ``adapter.installed(lightning_unet)`` (forward *and* backward: checkpointed
    steps re-run the UNet in backward); ``lightning_unet=None``: the Lightning branch on the pipeline's UNet
    (what ``lightning_paths`` does with a pipeline loaded with Lightning weights)."""

    def __init__(self, adapter: RealAdapter, pipeline, cfg: RealTrainConfig, face_recognizer: nn.Module | None = None,
                 lightning_unet=None):
        super().__init__()
        self.adapter = adapter
        self.cfg = cfg
        self._frozen = {"pipeline": pipeline, "phi": face_recognizer, "noise": training_noise_scheduler(pipeline),
                        "lightning": lightning_scheduler(pipeline, cfg.lightning_steps),
                        "lightning_unet": lightning_unet if lightning_unet is not None else pipeline.unet}
        self.rank = 0

    @property
    def pipeline(self):
        return self._frozen["pipeline"]

    @property
    def lightning_unet(self):
        return self._frozen["lightning_unet"]

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, pipe = self.cfg, self.pipeline
        unet, vae = pipe.unet, pipe.vae
        device = next(self.adapter.parameters()).device
        rng = np.random.default_rng((cfg.seed, step, self.rank, 1))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        id_vec, hidden = batch["id_vec"].to(device), [h.to(device) for h in batch["hidden_states"]]
        tokens = self.adapter.tokens(id_vec, hidden)  # (B, N_id, C)
        diff_tokens = tokens
        if cfg.id_dropout:  # the unconditional ID for some samples: trains the path of CFG over the ID
            kept = torch.from_numpy(rng.random(len(tokens)) >= cfg.id_dropout).to(device)
            diff_tokens = torch.where(kept[:, None, None], tokens, self.adapter.uncond_tokens(id_vec, hidden))

        # -- diffusion branch: L_diff --------------------------------------------------------------------
        pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            latents = latents * vae.config.scaling_factor
        sched = self._frozen["noise"]
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
        noisy = sched.add_noise(latents, noise, t)
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r}")
        captions = [c if rng.random() >= cfg.caption_dropout else "" for c in batch["caption"]]
        text, pooled = encode_text(pipe, captions, device)
        added = None
        if is_sdxl(unet):
            added = sdxl_added_cond(pooled, batch["original_size"], batch["crop_top_left"],
                                    (cfg.resolution, cfg.resolution), unet.dtype, device)
        pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype), added_cond_kwargs=added,
                    cross_attention_kwargs=id_kwargs(diff_tokens, cfg.id_scale)).sample
        out = {"diff": losses.diffusion_loss(pred, target)}

        # -- Lightning branch: L_id (neutral prompt) and L_align (contamination prompts) ----------------------
        n = cfg.lightning_batch
        if cfg.stage >= 2:
            phi = self._frozen["phi"]
            text_n, pooled_n = encode_text(pipe, [cfg.neutral_prompt] * n, device)
            image = decode(vae, self.lightning(text_n, pooled_n, tokens[:n], self._noise(n, rng, device)).image_id)
            with torch.no_grad():
                ref = phi(batch["pixel_values"][:n].to(device=device, dtype=image.dtype))
            out["id"] = losses.id_loss(phi, ref, image)
        if cfg.stage == 3:
            prompts = [cfg.align_prompts[j] for j in rng.integers(len(cfg.align_prompts), size=n)]
            text_a, pooled_a = encode_text(pipe, prompts, device)
            paths = self.lightning(text_a, pooled_a, tokens[:n], self._noise(n, rng, device), with_plain=True)
            zero = pred.sum() * 0
            red = cfg.align_reduction
            out["align_sem"] = (losses.align_semantic_loss(paths.capture_id, paths.capture_plain, reduction=red)
                                if cfg.lambda_sem else zero)
            out["align_layout"] = (losses.align_layout_loss(paths.capture_id, paths.capture_plain, reduction=red)
                                   if cfg.lambda_layout else zero)
        return pulid_objective(out, cfg.lambda_id, cfg.lambda_sem, cfg.lambda_layout)

    def _noise(self, n, rng, device):
        unet, vae = self.lightning_unet, self.pipeline.vae
        side = self.cfg.resolution // vae_scale_factor(vae)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return torch.randn(n, unet.config.in_channels, side, side, generator=g).to(device)

    def lightning(self, text, pooled, id_tokens, x_T, with_plain: bool = False) -> LightningOutput:
        """The core's Lightning branch on latents, on the few-step UNet: sampling from x_T with the ID,
        differentiable through the last ``grad_steps`` steps, and with ``with_plain`` also without it (captures for
        L_align, with gradients at every step when ``align_every_step``)."""
        cfg, unet = self.cfg, self.lightning_unet
        sched = self._frozen["lightning"]
        added = None
        if is_sdxl(unet):
            r = cfg.resolution
            added = sdxl_added_cond(pooled, (r, r), (0, 0), (r, r), unet.dtype, x_T.device)
        return lightning_branch(unet, text, id_tokens, x_T.float(), cfg.id_scale, cfg.grad_steps, with_plain,
                                len(sched.timesteps), cfg.checkpoint_lightning, capture=with_plain, scheduler=sched,
                                added_cond_kwargs=added, graph_every_step=cfg.align_every_step)


@dataclass
class LightningPaths:
    """The training Lightning branch run twice from the same x_T and prompt: with the ID and without it."""
    prompt: str
    cap_id: Capture  # Q (B, N_img, C) and K (B, N_txt, C) of every attn2 layer at every step, with the ID
    cap_plain: Capture  # the same without the ID
    latents_id: torch.Tensor  # x_0 latents
    latents_plain: torch.Tensor


@torch.no_grad()
def lightning_paths(pipeline, adapter: RealAdapter, id_tokens: torch.Tensor, prompt: str, resolution: int,
                    seed: int = 0, id_scale: float = 1.0, steps: int = 4, lightning_unet=None) -> LightningPaths:
    """What ``L_align`` compares, without training: ``RealPuLIDStep.lightning`` (``steps`` trailing DDIM steps, the
    sampler of the training branch; no CFG) from one x_T (``seed``) for ``prompt``, once with ``id_tokens``
    (1, N, D) and once without, with a ``Capture`` on every attn2 layer. Installs ``adapter`` itself; bf16
    autocast on CUDA, as training. ``lightning_unet``: the few-step UNet (default: the pipeline's own, e.g. a pipeline
    loaded with Lightning weights). ``alignment_maps.loss_terms(p.cap_id, p.cap_plain)`` breaks the losses down
    per layer and step."""
    device = id_tokens.device
    cfg = RealTrainConfig(resolution=resolution, id_scale=id_scale, lightning_steps=steps, use_accelerate=False)
    step = RealPuLIDStep(adapter, pipeline, cfg, lightning_unet=lightning_unet)
    text, pooled = encode_text(pipeline, [prompt], device)
    side = resolution // vae_scale_factor(pipeline.vae)
    x_T = torch.randn(1, step.lightning_unet.config.in_channels, side, side,
                      generator=torch.Generator().manual_seed(seed)).to(device)
    with adapter.installed(step.lightning_unet), autocast(device):
        out = step.lightning(text, pooled, id_tokens, x_T, with_plain=True)
    return LightningPaths(prompt, out.capture_id, out.capture_plain, out.image_id, out.image_plain)


@torch.no_grad()
def to_images(pipeline, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 RGB (B, H, W, 3) through the pipeline's VAE (a float16 VAE that asks to upcast, as SDXL's,
    decodes in float32 and is put back)."""
    vae = pipeline.vae
    dtype = vae.dtype
    upcast = getattr(vae.config, "force_upcast", False) and dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    try:
        x = decode(vae, latents.to(vae.dtype)).float().clamp(-1, 1)
    finally:
        if upcast:
            vae.to(dtype)
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------

def save_adapter_file(folder: Path, adapter: RealAdapter, info: dict, name: str = "adapter") -> Path:
    """``<name>.safetensors`` (fp32) + ``<name>.json`` (encoder config, ID settings, ``info``), atomically."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(state, str(tmp)))
    meta = {"encoder": asdict(adapter.encoder.cfg), "settings": asdict(adapter.processors.settings), **plain_json(info)}
    write_json(folder / f"{name}.json", plain_json(meta))
    return folder / f"{name}.safetensors"


def load_real_adapter(folder: str | Path, unet, name: str = "adapter") -> RealAdapter:
    """A ``RealAdapter`` saved by ``train_real`` (final folder or a ``checkpoints/step-*`` folder) for ``unet``."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta_path, weights = folder / f"{name}.json", folder / f"{name}.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (expected an adapter saved by pulid_lab.real.train.train_real)")
    meta = json.loads(meta_path.read_text())
    adapter = RealAdapter(unet, V1EncoderConfig(**meta["encoder"]), IDAttnSettings(**meta["settings"]))
    adapter.load_state_dict(load_file(str(weights)))
    return adapter


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    folder = Path(out) / "checkpoints" / json.loads(pointer.read_text())["folder"]
    return folder if folder.is_dir() else None


def _save_checkpoint(out: Path, adapter, opt, step: int, cfg: RealTrainConfig, log: list) -> Path:
    root = out / "checkpoints"
    folder = root / f"step-{step:07d}"
    save_adapter_file(folder, adapter, {"step": step, "training": asdict(cfg)})
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, "stage": cfg.stage, "log": log}) + "\n")
    write_json(root / "latest.json", {"folder": folder.name, "step": step}, indent=None)
    olds = sorted(p for p in root.glob("step-*") if p.is_dir() and p != folder)
    for old in olds[: max(0, len(olds) - (cfg.keep_checkpoints - 1))]:
        shutil.rmtree(old)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def _make_accelerator(cfg: RealTrainConfig):
    if not cfg.use_accelerate:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        warnings.warn("accelerate is not installed: training on one device in a plain loop "
                      "(`pip install accelerate` for multi-GPU)", stacklevel=3)
        return None
    mp = cfg.mixed_precision if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mp)


def _autocast(cfg: RealTrainConfig, device: torch.device, accelerator):
    if accelerator is not None:
        return accelerator.autocast()
    if cfg.mixed_precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_lightning_unet(cfg: RealTrainConfig, unet, lightning_unet) -> None:
    """Stages 2 and 3 need a few-step UNet of the base UNet's architecture, distinct from it (``ValueError`` else)."""
    if cfg.stage == 1:
        return
    get = ("load it with pulid_lab.real.pipeline.load_unet(base_dir, 'sdxl_lightning_4step_unet.safetensors') "
           "and pass lightning_unet=")
    if lightning_unet is None:
        raise ValueError(f"stage {cfg.stage} runs the Lightning branch (L_id, L_align) on a few-step UNet: {get}. The "
                         f"base UNet at {cfg.lightning_steps} DDIM steps gives blurred faces, and L_id on them would "
                         f"train the adapter on noise.")
    if lightning_unet is unet:
        raise ValueError(f"lightning_unet is the pipeline's own UNet: stage {cfg.stage} trains L_diff on the base "
                         f"UNet and the Lightning branch on a second, few-step UNet; {get}")
    ours, theirs = cross_attention_layers(unet), cross_attention_layers(lightning_unet)
    if ours != theirs or unet.config.cross_attention_dim != lightning_unet.config.cross_attention_dim:
        raise ValueError(f"lightning_unet does not have the base UNet's attention layers ({len(theirs)} attn2 layers "
                         f"vs {len(ours)}): it must be the few-step UNet distilled from this base model")


def train_real(cfg: RealTrainConfig, pipeline, adapter: RealAdapter, dataset: Dataset, out: str | Path,
               face_recognizer: nn.Module | None = None, lightning_unet=None, resume: bool = False,
               progress: bool = True, stop_after: int | None = None) -> dict:
    """Train ``adapter`` (stage ``cfg.stage``) on ``dataset`` (a ``FaceFolder``) with the frozen ``pipeline``.

    ``face_recognizer``: a differentiable torch module for L_id (stages 2 and 3; see the module docstring).
    ``lightning_unet``: the few-step UNet of the Lightning branch (stages 2 and 3; the diffusion branch stays on the
    pipeline's base UNet).
    ``stop_after``: stop after that many total steps (to interrupt and ``resume`` later). Returns
    ``{"steps_done", "resumed_from_step", "log", "out"}``; writes ``out/adapter.safetensors`` + ``adapter.json``
    at the end, ``out/losses.csv``, and checkpoints under ``out/checkpoints``.
    """
    from tqdm.auto import tqdm

    from ..core.files import write_log
    from ..core.objective import NonFiniteLoss

    if cfg.stage >= 2 and face_recognizer is None:
        raise ValueError("stages 2 and 3 need face_recognizer: a differentiable torch face-embedding module, e.g. "
                         "pulid_lab.real.recognizer.load_face_embedder(antelopev2_root) (insightface's ONNX recognizer "
                         "gives no gradients)")
    out = Path(out)
    unet, vae = pipeline.unet, pipeline.vae
    check_lightning_unet(cfg, unet, lightning_unet)
    if cfg.stage == 1:
        lightning_unet = None  # stage 1 has no Lightning branch
    for m in (unet, lightning_unet, vae, getattr(pipeline, "text_encoder", None),
              getattr(pipeline, "text_encoder_2", None), face_recognizer):
        if m is not None:
            m.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        for u in (unet, lightning_unet):
            if u is not None:
                u.enable_gradient_checkpointing()
        if getattr(vae, "_supports_gradient_checkpointing", False):
            vae.enable_gradient_checkpointing()
    accelerator = _make_accelerator(cfg)
    device = accelerator.device if accelerator is not None else unet.device
    if unet.device != device:  # one process per GPU: each holds its own copy of the frozen pipeline
        pipeline.to(device)
    for m in (lightning_unet, face_recognizer):
        if m is not None:
            m.to(device)
    adapter.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, log = 0, []
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            from safetensors.torch import load_file
            adapter.load_state_dict(load_file(str(ckpt / "adapter.safetensors")))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            state = json.loads((ckpt / "state.json").read_text())
            start, log = state["step"], state["log"]
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    module = RealPuLIDStep(adapter, pipeline, cfg, face_recognizer, lightning_unet)
    replicas = accelerator.num_processes if accelerator is not None else 1
    loader = DataLoader(dataset, batch_sampler=StepBatchSampler(len(dataset), cfg.batch, cfg.seed, start, end, replicas),
                        collate_fn=collate, num_workers=cfg.num_workers)
    main = True
    if accelerator is not None:
        module.rank = accelerator.process_index
        module, opt, loader = accelerator.prepare(module, opt, loader)
        main = accelerator.is_main_process
    bar = tqdm(range(start, end), desc=f"stage {cfg.stage}", initial=start, total=cfg.steps,
               disable=not (progress and main))
    with contextlib.ExitStack() as installed:
        for u in (unet, lightning_unet):  # the same ID projections in both UNets
            if u is not None:
                installed.enter_context(adapter.installed(u))
        for step, batch in zip(bar, loader):
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) if cfg.warmup_steps else cfg.lr
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(cfg, device, accelerator):
                terms = module(batch, step)
            total = terms["total"]
            if not torch.isfinite(total):
                raise NonFiniteLoss(f"stage {cfg.stage}: loss became {float(total)} at step {step} "
                                    f"({ {k: float(v) for k, v in terms.items()} }); the last checkpoint is kept in "
                                    f"{out / 'checkpoints'}. Lower the learning rate (now {cfg.lr}) and resume.")
            opt.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(total)
                accelerator.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm)
            else:
                total.backward()
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm)
            opt.step()
            log.append({"step": step, **{k: round(float(v.detach()), 6) for k, v in terms.items()}})
            bar.set_postfix({k: f"{float(v.detach()):.4f}" for k, v in terms.items()})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                if accelerator is not None:
                    accelerator.wait_for_everyone()
                if main:
                    _save_checkpoint(out, adapter, opt, step + 1, cfg, log)
                    write_log(out / "losses.csv", log)
    if end == cfg.steps and main:
        save_adapter_file(out, adapter, {"steps": cfg.steps, "training": asdict(cfg),
                                         "final": log[-1] if log else {}})
    return {"steps_done": end, "resumed_from_step": start, "log": log, "out": str(out)}
