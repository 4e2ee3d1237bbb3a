"""The PuLID ID adapter: what trains (ID encoder + the ID key/value projections of every attn2 layer).

What feeds it is outside the core: the mini world's conditioning path (``models.identity.IDConditioner``) or the
real tier's (insightface antelopev2 + EVA-CLIP, ``real.pipeline``)."""
from __future__ import annotations

import torch.nn as nn

from .attention import IDAttnSettings, IDProcessors, install
from .id_encoder import IDEncoder, IDEncoderConfig

VIEWS = ("crop", "full")


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

