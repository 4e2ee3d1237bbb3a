"""The PuLID ID adapter: what trains (ID encoder + the ID key/value projections of every attn2 layer), and the
frozen conditioning path that feeds it (phi_cond through insightface + the image-feature encoder)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoints
from .attention import IDAttnSettings, IDProcessors, install
from .data import align_faces, as_image_batch, to_tensor
from .id_encoder import IDEncoder, IDEncoderConfig
from .identity import FaceAnalysis


class PuLIDAdapter(nn.Module):
    """ID encoder + ID projections. ``tokens(embedding, features)`` -> ID tokens; ``installed(unet)`` patches the UNet.

    ``encoder`` is an ``IDEncoderConfig`` (the mini world's encoder) or any encoder module with ``cfg.token_dim``,
    ``forward`` and ``uncond`` (the real tier passes its PuLID-v1-shaped encoder). ``reference_view`` is what
    its image features were trained on ('crop' or 'full', see ``IDConditioner``); evaluation conditions it the same way.
    """

    def __init__(self, unet, encoder: IDEncoderConfig | nn.Module | None = None, settings: IDAttnSettings | None = None,
                 reference_view: str = "crop"):
        super().__init__()
        if reference_view not in VIEWS:
            raise ValueError(f"reference_view must be one of {VIEWS}, got {reference_view!r}")
        self.reference_view = reference_view
        cross_dim = unet.config.cross_attention_dim
        module = encoder if isinstance(encoder, nn.Module) else IDEncoder(encoder or IDEncoderConfig(token_dim=cross_dim))
        token_dim = module.cfg.token_dim
        if token_dim != cross_dim:
            raise ValueError(f"ID tokens must have the UNet's cross_attention_dim {cross_dim}, got {token_dim}")
        self.encoder = module
        self.processors = IDProcessors(unet, token_dim, settings)

    @property
    def settings(self) -> IDAttnSettings:
        return self.processors.settings

    def tokens(self, id_embedding, features):
        return self.encoder(id_embedding, features)

    def uncond_tokens(self, id_embedding, features):
        return self.encoder.uncond(id_embedding, features)

    def use_settings(self, settings: IDAttnSettings) -> None:
        """Inference options (num_zero, ortho, ortho_v2) for every ID processor at once."""
        self.processors.settings = settings
        for proc in self.processors.procs.values():
            proc.settings = settings

    def installed(self, unet):
        """Context manager: our processors on ``unet`` (ID in attn2, hooks everywhere); originals restored after."""
        return install(unet, self.processors)


VIEWS = ("crop", "full")


class IDConditioner:
    """Reference image(s) -> (phi_cond embedding (B, 512), image-encoder hidden states) — all frozen.

    ``view='crop'`` feeds the image encoder the aligned face crop (as the official code feeds EVA-CLIP the
    aligned face); ``view='full'`` feeds the whole reference image (more non-ID information leaks in).
    """

    def __init__(self, models_dir: Path | None = None, view: str = "crop", device=None):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.view = view
        self.device = torch.device(device or "cpu")
        self.faces = FaceAnalysis(models_dir)
        self.image_encoder = checkpoints.load_model("image_encoder", models_dir, self.device).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images = as_image_batch(images)
        boxes = self.faces.detect(images)
        emb = torch.from_numpy(self.faces.embed(images, boxes)).float().to(self.device)
        x = to_tensor(images).to(self.device)
        if self.view == "crop":
            x = align_faces(x, torch.from_numpy(boxes).to(self.device))
        return emb, self.image_encoder.hidden_states(x)


def embedding_dim_and_channels(models_dir: Path | None = None) -> tuple[int, tuple[int, ...]]:
    """(phi_cond embedding width, image-encoder hidden-state channels) of a models folder, for IDEncoderConfig."""
    manifest = checkpoints.read_manifest(Path(models_dir) if models_dir else checkpoints.default_models_dir())
    enc = manifest["models"]["image_encoder"]["config"]
    return manifest["models"]["phi_cond"]["config"].get("dim", 512), tuple(enc["widths"]) + (enc.get("dim", 256),)

