"""ID attention processors and attention hooks, on the diffusers processor API (docs/method.md).

Every attention layer of the UNet gets one of our processors while ``install`` is active:

- ``attn2`` (text cross-attention): ``IDAttnProcessor`` computes
  ``out = Attn(Q, K_txt, V_txt) + id_scale * Attn(Q, K_id, V_id)`` with its own ``id_to_k`` / ``id_to_v``
  (no bias), plus the official inference options ``num_zero``, ``ortho`` and ``ortho_v2``;
- every other attention layer keeps its own processor (plain, sliced, fused, added key/value, a custom one), behind
  a shim that drops the ID keyword arguments (``KeptLayer``): the UNet computes what it computed before.

What ``install`` puts on a layer is a plain callable, not an ``nn.Module``: the UNet's module tree, ``state_dict``
and ``save_pretrained`` stay those of the plain UNet while the ID is in, and the ID weights live in the adapter only.
Inside ``install``, the UNet methods that would silently swap our processors out (attention slicing, fused QKV,
the default processors, xformers) stop with a message instead (``GUARDED``).

The ID tokens, the scale and an optional ``Capture`` travel in ``cross_attention_kwargs`` — functional, so
gradient checkpointing recomputes exactly what ran. One processor both injects and captures: no attention is
computed twice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class IDAttnSettings:
    """How the ID attention output joins the text attention output (official inference options)."""
    num_zero: int = 0  # zero tokens appended to the ID tokens (dilutes the ID attention)
    ortho: bool = False  # add only the part of the ID output orthogonal to the text output
    ortho_v2: bool = False  # ortho, weighted by how much each position attends to the leading ID tokens
    ortho_v2_tokens: int = 5  # leading ID tokens counted by ortho_v2 (the official code counts 5)

    def __post_init__(self):
        if self.ortho and self.ortho_v2:
            raise ValueError("choose at most one of ortho and ortho_v2")
        if self.num_zero < 0:
            raise ValueError(f"num_zero must be >= 0, got {self.num_zero}")


@dataclass
class Capture:
    """Per-layer, per-step captures of Q (B, N_img, C), K (B, N_txt, C), optionally attention probabilities.

    ``q[(layer, step)]`` keeps the graph when gradients are on (the alignment losses use it) and is detached
    under ``torch.no_grad`` (visualisation). ``layers`` restricts what is kept (None = every attn2 layer).
    Probabilities (B, heads, N_img, N_txt) are off by default: they are the memory-hungry part.
    """
    probs: bool = False
    layers: set[str] | None = None
    q: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    k: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    p: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def wants(self, layer: str) -> bool:
        return self.layers is None or layer in self.layers

    def record(self, layer: str, step: int, q: torch.Tensor, k: torch.Tensor, probs=None) -> None:
        """First write wins: gradient checkpointing re-runs each step in backward, and the re-run must neither
        replace what the loss used nor keep its recomputed graph alive (that would undo the memory saving).
        Use a fresh Capture per sampling pass."""
        key = (layer, step)
        if key in self.q:
            return
        self.q[key], self.k[key] = q, k
        if probs is not None:
            self.p[key] = probs

    def keys(self) -> list[tuple[str, int]]:
        return sorted(self.q, key=lambda k: (k[1], k[0]))

    def clear(self):
        self.q.clear(), self.k.clear(), self.p.clear()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _project_out(attn, hidden_states, residual, input_ndim, shape):
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _prepare(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """Shared front half of diffusers' attention: norms, Q/K/V projections (merged heads)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim, shape = hidden_states.ndim, hidden_states.shape
    if input_ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attention_mask is not None:
        seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)  # (B, N_img, C)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)  # (B, N_txt, C)
    return residual, input_ndim, shape, attention_mask, query, key, value


class IDAttnProcessor(nn.Module):
    """Text cross-attention plus ID cross-attention, with capture of Q, K (and probabilities) for the hooks."""

    def __init__(self, hidden_size: int, id_dim: int, name: str = "", settings: IDAttnSettings | None = None):
        super().__init__()
        self.name = name
        self.settings = settings or IDAttnSettings()
        self.id_to_k = nn.Linear(id_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(id_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens=None, id_scale=1.0, capture: Capture | None = None, step: int = 0, **kwargs):
        residual, ndim, shape, mask, query, key, value = _prepare(attn, hidden_states, encoder_hidden_states,
                                                                  attention_mask, temb)
        q = _heads(query, attn.heads)
        text_out = _merge(F.scaled_dot_product_attention(q, _heads(key, attn.heads), _heads(value, attn.heads),
                                                         attn_mask=mask)).to(query.dtype)  # Attn(Q, K_txt, V_txt)
        if capture is not None and capture.wants(self.name) and (self.name, step) not in capture.q:
            probs = None
            if capture.probs:
                probs = (q @ _heads(key, attn.heads).transpose(-1, -2) * attn.scale).softmax(-1).detach()
            capture.record(self.name, step, query, key, probs)
        out = text_out
        if id_tokens is not None and id_scale != 0:
            out = text_out + self._id_term(attn, q, text_out, id_tokens, id_scale)
        return _project_out(attn, out, residual, ndim, shape)

    def _id_term(self, attn, q, text_out, id_tokens, id_scale):
        s = self.settings
        if s.num_zero:
            zeros = id_tokens.new_zeros(id_tokens.shape[0], s.num_zero, id_tokens.shape[-1])
            id_tokens = torch.cat([id_tokens, zeros], 1)
        id_k = _heads(self.id_to_k(id_tokens).to(q.dtype), attn.heads)
        id_v = _heads(self.id_to_v(id_tokens).to(q.dtype), attn.heads)
        id_out = _merge(F.scaled_dot_product_attention(q, id_k, id_v)).to(q.dtype)  # Attn(Q, K_id, V_id)
        if not (s.ortho or s.ortho_v2):
            return id_scale * id_out
        h, i = text_out.float(), id_out.float()
        # projection of the ID output on the text output, per channel over the image tokens
        projection = (h * i).sum(-2, keepdim=True) / (h * h).sum(-2, keepdim=True).clamp_min(1e-12) * h
        if s.ortho:
            return (id_scale * (i - projection)).to(q.dtype)
        # ortho_v2: as the official code, unscaled Q K_id^T, softmax, mean over heads, mass on the leading tokens
        attn_mean = (q @ id_k.transpose(-1, -2)).float().softmax(-1).mean(1)  # (B, N_img, N_id)
        attn_mean = attn_mean[:, :, : s.ortho_v2_tokens].sum(-1, keepdim=True)
        return (id_scale * (i + (attn_mean - 1) * projection)).to(q.dtype)


def cross_attention_layers(unet) -> list[str]:
    """Names (as in ``unet.attn_processors``) of the text cross-attention layers (``attn2``)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def _layer_sizes(unet) -> dict[str, int]:
    sizes = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_q"):
            sizes[f"{name}.processor"] = module.to_q.out_features
    return sizes


def _attn2_processors(unet, id_dim: int, settings: IDAttnSettings | None = None) -> dict[str, IDAttnProcessor]:
    """A fresh ``IDAttnProcessor`` for every attn2 layer, keyed by its processor name."""
    sizes = _layer_sizes(unet)
    return {n: IDAttnProcessor(sizes[n], id_dim, layer_name(n), settings) for n in cross_attention_layers(unet)}


def added_kv_layers(unet) -> list[str]:
    """Attention layers that read the text through added key/value projections (diffusers' ``SimpleCrossAttn*``
    blocks, UnCLIP / Kandinsky-style UNets): the text joins the image tokens' own keys there, not an attn2 layer."""
    return [n for n, m in unet.named_modules() if getattr(m, "added_kv_proj_dim", None) is not None]


class IDProcessors(nn.Module):
    """The trainable ID projections of every attn2 layer: one ``IDAttnProcessor`` each (a ModuleDict).

    UNets whose text enters through added key/value projections are refused: PuLID's ID attention is a second
    cross-attention beside attn2's text attention, and in those layers there is no attn2 for it to join."""

    def __init__(self, unet, id_dim: int, settings: IDAttnSettings | None = None):
        super().__init__()
        added = added_kv_layers(unet)
        if added:
            raise ValueError(
                f"this UNet reads the text through added key/value projections in {len(added)} layer(s) (first: "
                f"{added[0]}; diffusers' SimpleCrossAttn blocks): PuLID's ID attention joins the text cross-attention of "
                f"attn2 layers, which these blocks do not have. Use a UNet of CrossAttn blocks (SD 1.5 / SDXL-shaped); "
                f"hooks alone (install(unet) without ID processors) do work on it.")
        self.settings = settings or IDAttnSettings()
        procs = _attn2_processors(unet, id_dim, self.settings)
        self.layer_names = list(procs)
        self.procs = nn.ModuleDict({_key(n): p for n, p in procs.items()})

    def processor(self, layer: str) -> IDAttnProcessor:
        return self.procs[_key(layer)]


class IDLayer:
    """What ``install`` puts on an attn2 layer: calls our ``IDAttnProcessor`` (a plain callable, so the UNet does
    not register the ID weights as its own). The signature names the ID arguments: diffusers passes a processor only
    the ``cross_attention_kwargs`` its ``__call__`` declares."""

    def __init__(self, processor: IDAttnProcessor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens=None, id_scale=1.0, capture=None, step=0):
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              id_tokens=id_tokens, id_scale=id_scale, capture=capture, step=step)


class KeptLayer:
    """What ``install`` puts on every other layer: the layer's own processor, called without the ID arguments."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens=None, id_scale=1.0, capture=None, step=0):
        extra = {} if temb is None else {"temb": temb}  # not every processor takes temb
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)


# UNet methods that replace every layer's processor: inside ``install`` they would drop the ID without a word
GUARDED = {
    "set_attention_slice": "attention slicing replaces the ID processors: call it before entering the block (the "
                           "layers without ID keep their slicing; the ID layers use PyTorch's memory-efficient "
                           "scaled_dot_product_attention)",
    "fuse_qkv_projections": "fusing the QKV projections replaces the ID processors: call it before entering the block "
                            "(the layers without ID keep the fused projections)",
    "unfuse_qkv_projections": "unfusing restores the processors saved at fusing time, which drops the ID processors: "
                              "call it after leaving the block",
    "set_default_attn_processor": "the default processors would drop the ID: leave the block first (it restores "
                                  "the UNet's own processors), then call it",
    "enable_xformers_memory_efficient_attention": "xformers replaces the ID processors: enable it before entering "
                                                  "the block (the layers without ID keep it)",
    "disable_xformers_memory_efficient_attention": "this replaces the ID processors: call it after leaving the block",
}


def _guard(name: str, why: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"unet.{name}() inside PuLID's `installed(...)` / `install(...)` block: {why}.")
    return refuse


def layer_name(processor_name: str) -> str:
    """``down_blocks.1....attn2.processor`` -> ``down_blocks.1....attn2`` (the key of captures)."""
    return processor_name.removesuffix(".processor")


def _key(layer: str) -> str:
    return layer.replace(".", "__")


def id_kwargs(id_tokens: torch.Tensor | None, id_scale: float, capture: Capture | None = None,
              step: int | None = None) -> dict:
    """The ``cross_attention_kwargs`` our processors read: ID tokens (B, N_id, C), their scale, and optionally a
    ``Capture`` with the sampler step it keys its entries by. ``id_tokens=None`` (or scale 0): the original model."""
    kwargs = {"id_tokens": id_tokens, "id_scale": id_scale if id_tokens is not None else 0.0}
    if capture is not None or step is not None:
        kwargs.update(capture=capture, step=step)
    return kwargs


@contextlib.contextmanager
def install(unet, id_processors: IDProcessors | None = None):
    """Install our processors on every attention layer of ``unet``; restore the exact originals on exit.

    attn2 layers get ``id_processors``' ID attention; every other layer keeps its own processor (``KeptLayer``).
    Without ``id_processors`` (hooks only), attn2 layers get ID processors whose projections are never used
    (``id_tokens`` must then stay None). The methods in ``GUARDED`` raise while the block is open.
    """
    original = dict(unet.attn_processors)
    if id_processors is None:
        hooks = _attn2_processors(unet, id_dim=1)
    else:
        hooks = {n: id_processors.processor(n) for n in id_processors.layer_names}
    unet.set_attn_processor({n: IDLayer(hooks[n]) if n in hooks else KeptLayer(p) for n, p in original.items()})
    guarded = [name for name in GUARDED if hasattr(unet, name) and name not in vars(unet)]
    for name in guarded:
        setattr(unet, name, _guard(name, GUARDED[name]))  # an instance attribute shadows the method
    try:
        yield unet
    finally:
        for name in guarded:
            vars(unet).pop(name, None)
        unet.set_attn_processor(original)


def installed_id_processor(module) -> IDAttnProcessor | None:
    """The ID processor ``install`` put on an attention module, or None when ours are not installed there."""
    proc = getattr(module, "processor", None)
    return proc.processor if isinstance(proc, IDLayer) else None


def heat_maps(capture: Capture, token: int, size: int = 32, step: int | None = None) -> torch.Tensor:
    """DAAM-style per-token heat map: the attention probability of ``token`` at every image position,
    upsampled to ``size`` and averaged over heads, layers (and steps unless ``step`` is given). (B, size, size)."""
    maps = []
    for (layer, s), p in capture.p.items():
        if step is not None and s != step:
            continue
        b, _, n, _ = p.shape
        side = int(round(n ** 0.5))
        m = p[..., token].mean(1).view(b, 1, side, side)  # (B, 1, h, w)
        maps.append(F.interpolate(m.float(), size=(size, size), mode="bilinear", align_corners=False))
    if not maps:
        raise ValueError("no attention probabilities captured; use Capture(probs=True)")
    return torch.stack(maps).mean(0)[:, 0]
