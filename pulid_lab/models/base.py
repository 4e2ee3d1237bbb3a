"""The original model: tokenizer + text encoder + a pixel-space diffusers UNet2DConditionModel (docs/models.md).

This is the model PuLID must not disturb. Text cross-attention lives at 16x16 and 8x8, so attention maps exist at
two scales; self-attention, the expensive part at 16x16 (docs/models.md), is off by default and every profile's
recipe adds it at 8x8 only (``only_cross_attention=(True, True, False)``).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel

from ..core.device import default_device
from ..core.sampling import ModelFn, lightning_sample, sample
from ..world import vocab
from . import text

UNCONDITIONAL = ""  # the empty caption (<bos><eos>) is the unconditional prompt for classifier-free guidance


@dataclass
class BaseModelConfig:
    block_out_channels: tuple[int, ...] = (48, 96, 160)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 16
    only_cross_attention: bool | tuple[bool, ...] = True  # per down block (up blocks mirror it); the mid block follows the last
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    # two extra input channels holding the pixel's x and y in [-1, 1]: the UNet otherwise knows where it is only
    # through zero padding, and "on the left" is a statement about absolute place. Every profile turns it on
    # (train.config); the default here keeps a plain 3-channel UNet for tests and other uses.
    coord_channels: bool = False

    def unet_kwargs(self) -> dict:
        return dict(sample_size=32, in_channels=5 if self.coord_channels else 3, out_channels=3, block_out_channels=tuple(self.block_out_channels),
                    down_block_types=tuple(self.down_block_types), up_block_types=tuple(self.up_block_types),
                    mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=self.layers_per_block,
                    attention_head_dim=self.attention_head_dim, norm_num_groups=self.norm_num_groups,
                    cross_attention_dim=self.text_hidden, only_cross_attention=self.only_cross_attention,
                    mid_block_only_cross_attention=(self.only_cross_attention if isinstance(self.only_cross_attention, bool)
                                                    else self.only_cross_attention[-1]))


class OriginalModel(nn.Module):
    """Text-to-image: ``encode(captions)`` -> text tokens (B, 32, D); ``predict(x_t, t, tokens)`` -> v."""

    def __init__(self, cfg: BaseModelConfig | None = None, tokenizer=None, text_encoder=None, unet=None):
        super().__init__()
        self.cfg = cfg or BaseModelConfig()
        self.tokenizer = tokenizer or text.build_tokenizer()
        self.text_encoder = text_encoder or text.build_text_encoder(self.cfg.text_hidden, self.cfg.text_layers, self.cfg.text_heads)
        self.unet = unet or UNet2DConditionModel(**self.cfg.unet_kwargs())
        if self.cfg.coord_channels:
            # in the UNet itself, so every caller (samplers, the PuLID branches, real-model code) feeds 3 channels
            self.unet.conv_in.register_forward_pre_hook(append_coordinates)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """(B, 32) token ids, padded. Phrase order carries no meaning in ToyFaces captions; training captions come
        in the vocabulary's order, so every caption is put in that order before the tokenizer sees it."""
        return text.tokenize(self.tokenizer, [vocab.canonical(c) for c in captions], self.device)

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(self.token_ids(captions)).last_hidden_state  # (B, 32, text_hidden)

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        """(B, 32) bool: True at the caption's own tokens (with <bos> and <eos>), False at the padding."""
        return self.token_ids(captions) != self.tokenizer.pad_token_id

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=tokens).sample

    def model_fn(self, captions: list[str], guidance: float = 1.0) -> ModelFn:
        """A sampler callable for these captions, with classifier-free guidance when ``guidance != 1``."""
        cond = self.encode(captions)
        if guidance == 1.0:
            return lambda x, t, step: self.predict(x, t, cond)
        uncond = self.encode([UNCONDITIONAL] * len(captions))

        def guided(x, t, step):
            v_u, v_c = self.predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            return v_u + guidance * (v_c - v_u)  # CFG: v = v_u + w (v_c - v_u)
        return guided

    @torch.no_grad()
    def generate(self, captions: list[str], seed: int | list[int] = 0, steps: int = 25, solver: str = "dpm++",
                 guidance: float = 1.0) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1]; ``steps == 4`` with ``solver='lightning'`` is the Lightning sampler."""
        x_T = initial_noise(len(captions), seed, self.device)
        fn = self.model_fn(captions, guidance)
        if solver == "lightning":
            return lightning_sample(fn, x_T, steps).clamp(-1, 1)
        return sample(fn, x_T, steps, solver).clamp(-1, 1)

    def save(self, folder: Path) -> list[Path]:
        """save_pretrained of tokenizer, text encoder and UNet into ``folder``; returns the files written."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        # weights are stored in fp16 (half the size in the repository) and loaded back as fp32
        copy.deepcopy(self.text_encoder).half().save_pretrained(folder / "text_encoder")
        copy.deepcopy(self.unet).half().save_pretrained(folder / "unet")
        return sorted(p for sub in ("tokenizer", "text_encoder", "unet") for p in (folder / sub).iterdir() if p.is_file())

    @classmethod
    def load(cls, folder: Path, cfg: BaseModelConfig | None = None) -> "OriginalModel":
        folder = Path(folder)
        tokenizer, text_encoder = text.load_text(folder)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        return cls(cfg, tokenizer, text_encoder, unet).eval()


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each pixel's x and y in [-1, 1], matching ``x``'s batch, size, dtype and device."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                            torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
    return torch.stack([xs, ys]).expand(b, 2, h, w)


def append_coordinates(conv_in: torch.nn.Conv2d, args: tuple) -> tuple | None:
    """Forward pre-hook of a ``coord_channels`` UNet's conv_in: (B, 3, H, W) -> (B, 3 + 2, H, W), x and y appended.
    An input that already has them passes unchanged (so a second registration is harmless)."""
    x = args[0]
    if x.shape[1] == conv_in.in_channels - 2:
        return (torch.cat([x, coordinate_grid(x)], 1), *args[1:])
    return None


def initial_noise(n: int, seed: int | list[int], device=None) -> torch.Tensor:
    """x_T (n, 3, 32, 32): one generator per image, so image i depends only on its own seed."""
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    x = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return x.to(device) if device is not None else x


def base_config_dict(cfg: BaseModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def base_config_from_dict(d: dict) -> BaseModelConfig:
    """The inverse of ``base_config_dict``: JSON lists back to the config's tuples."""
    from . import checkpoints
    return checkpoints.config_from_json(BaseModelConfig, d)


BASE_SUBDIR = "base"


def save_base(folder: Path, model: OriginalModel, stats: dict, profile: str, training: dict | None = None) -> None:
    """Save the original model under ``folder/base`` and record every file's sha256 in the manifest
    (with ``training``, the recipe it was trained with: ``train_base.training_recipe``)."""
    from . import checkpoints
    folder = Path(folder)
    files = model.save(folder / BASE_SUBDIR)
    manifest = checkpoints.read_manifest(folder)
    manifest["base"] = {"config": base_config_dict(model.cfg), "metrics": stats, "profile": profile,
                        **({"training": training} if training is not None else {})}
    checkpoints.write_manifest(folder, manifest)
    for f in files:
        rel = f.relative_to(folder)
        checkpoints.record_file(folder, str(rel), "base", f, source="base")


def load_base(folder: Path | None = None, device=None) -> OriginalModel:
    """The shipped (or ``folder``'s) original model, every file checked against the manifest, on ``device``
    (default: CUDA when available, else CPU: what every caller that passes no device expects)."""
    from . import checkpoints
    folder = Path(folder) if folder is not None else checkpoints.default_models_dir()
    manifest = checkpoints.read_manifest(folder)
    if "base" not in manifest:
        raise checkpoints.CheckpointError(f"no base model recorded in {folder / 'manifest.json'}; "
                                          + checkpoints.rebuild_hint(folder))
    for name, entry in manifest.get("files", {}).items():
        if entry.get("source") == "base":
            checkpoints.verified_file(name, folder)
    cfg = base_config_from_dict(manifest["base"]["config"])
    model = OriginalModel.load(folder / BASE_SUBDIR, cfg)
    return model.to(default_device(device))
