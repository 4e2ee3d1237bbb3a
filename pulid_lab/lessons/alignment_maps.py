"""Contrastive alignment made visible (lesson 04): per-layer, per-step maps and loss terms of the two paths.

The Lightning branch runs twice from the same x_T and prompt: with the ID (queries Q_tid) and without it (Q_t).
The alignment losses compare them at every cross-attention layer and every sampler step (``losses``):

- semantic: ``|| softmax(K Q_tid^T / sqrt d) Q_tid - softmax(K Q_t^T / sqrt d) Q_t ||_2`` per text token. The
  softmax row of token j is a distribution over image positions — *where* the token reads the image — so it
  is a map; the response is what it reads there (``losses.text_response``);
- layout: ``|| Q_tid - Q_t ||_2`` per image position, also a map.

Everything here works on two ``attention.Capture`` objects (``two_paths`` makes them with
``branches.lightning_branch``) and returns numpy arrays; the plots and ``widgets.attention_explorer`` only
draw what these functions compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.attention import Capture
from ..core.losses import LAMBDA_LAYOUT, LAMBDA_SEM, text_response
from ..core.objective import pulid_objective

PATHS = ("with ID", "prompt only")


# -- the two paths ------------------------------------------------------------------------------------------
@dataclass
class TwoPaths:
    """One run of the Lightning branch with and without the ID (same x_T, same prompts), fully captured."""
    prompts: list[str]
    tokens: list[list[str]]  # per item: the token strings of every text position (<bos> ... <eos>, <pad>...)
    image_id: torch.Tensor  # (B, 3, 32, 32) in [-1, 1]
    image_plain: torch.Tensor
    cap_id: Capture
    cap_plain: Capture
    heads: dict[str, int]  # layer -> attention heads (for the image-to-text attention maps)
    scales: dict[str, float]  # layer -> attention scale

    @property
    def layers(self) -> list[str]:
        return layers_of(self.cap_id)

    @property
    def steps(self) -> list[int]:
        return steps_of(self.cap_id)

    def real_tokens(self, item: int = 0) -> list[int]:
        """Positions of the prompt's tokens (<bos> through <eos>), without the padding."""
        return [j for j, w in enumerate(self.tokens[item]) if w != "<pad>"]

    def capture(self, path: str) -> Capture:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        return self.cap_id if path == "with ID" else self.cap_plain


def attention_layout(unet) -> tuple[dict[str, int], dict[str, float]]:
    """(heads, scale) of every attn2 layer, keyed as captures key them."""
    heads, scales = {}, {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "heads"):
            heads[name], scales[name] = int(module.heads), float(module.scale)
    return heads, scales


@torch.no_grad()
def two_paths(base, adapter, id_tokens: torch.Tensor, prompts: list[str], seeds: list[int],
              id_scale: float = 1.0) -> TwoPaths:
    """Run ``branches.lightning_branch`` (with the ID and without, captures on) for ``prompts`` from the
    initial noise of ``seeds``; ``id_tokens`` (B, N_id, D) from ``adapter.tokens``."""
    from ..core.branches import lightning_branch
    from ..models.base import initial_noise
    dev = base.device
    x_T = initial_noise(len(prompts), list(seeds), dev)
    text = base.encode(list(prompts))
    with adapter.installed(base.unet):
        br = lightning_branch(base.unet, text, id_tokens.to(dev), x_T, id_scale=id_scale, with_plain=True, capture=True)
    ids = base.token_ids(list(prompts))  # in the order the text encoder saw them (base.encode)
    tokens = [base.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    heads, scales = attention_layout(base.unet)
    return TwoPaths(list(prompts), tokens, br.image_id.clamp(-1, 1), br.image_plain.clamp(-1, 1), br.capture_id,
                    br.capture_plain, heads, scales)


@torch.no_grad()
def lab_two_paths(lab, adapter, references, prompts, seeds, id_scale: float = 1.0) -> TwoPaths:
    """``two_paths`` with the ID tokens of ``references`` (the lab's frozen conditioning path)."""
    tokens = adapter.tokens(*lab.evaluator.condition(references, adapter))
    return two_paths(lab.base, adapter, tokens, prompts, seeds, id_scale)


# -- layers, steps, maps ------------------------------------------------------------------------------------
def layers_of(cap: Capture) -> list[str]:
    """Captured layers in UNet order (down blocks, mid block, up blocks)."""
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted({layer for layer, _ in cap.q}, key=lambda n: (order.get(n.split(".")[0], 3), n))


def steps_of(cap: Capture) -> list[int]:
    return sorted({step for _, step in cap.q})


def layer_label(layer: str, n_img: int | None = None) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``down1.0 16x16``."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        name = "mid"
    else:
        name = parts[0].replace("_blocks", "") + parts[1] + (f".{parts[3]}" if len(parts) > 3 else "")
    if n_img:
        side = int(round(math.sqrt(n_img)))
        name += f" {side}x{side}"
    return name


def to_square(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(..., N) with N = h*h -> (..., h, h), bilinearly resized to ``size`` if given."""
    n = x.shape[-1]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{n} image positions are not a square")
    lead = x.shape[:-1]
    sq = x.reshape(-1, 1, side, side).float()
    if size is not None and size != side:
        sq = F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False)
    return sq.reshape(*lead, sq.shape[-2], sq.shape[-1])


def response_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(K Q^T / sqrt d): (B, N_txt, N_img), each token's distribution over image positions. Times Q it
    is ``losses.text_response``."""
    return torch.softmax(k.float() @ q.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)


def cross_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """The UNet's own attention, image positions to text tokens: softmax(Q K^T * scale) per head, averaged
    over heads -> (B, N_img, N_txt) (what ``Capture(probs=True)`` records, without recording it)."""
    b, n, c = q.shape
    d = c // heads
    scale = d ** -0.5 if scale is None else scale
    qh = q.float().view(b, n, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1).mean(1)


def token_maps(paths: TwoPaths, path: str, layer: str, step: int, kind: str = "response") -> torch.Tensor:
    """Per-token maps of one layer at one step: (B, N_txt, h, w).

    ``kind='response'``: softmax(K Q^T / sqrt d), where each token reads the image in the semantic alignment
    term (each map sums to 1). ``kind='cross'``: the UNet's image-to-text attention to each token (DAAM-style
    heat map; the maps of all tokens sum to 1 at every position)."""
    cap = paths.capture(path)
    q, k = cap.q[(layer, step)], cap.k[(layer, step)]
    if kind == "response":
        w = response_weights(q, k)
    elif kind == "cross":
        w = cross_attention_probs(q, k, paths.heads[layer], paths.scales.get(layer)).transpose(1, 2)
    else:
        raise ValueError(f"kind must be 'response' or 'cross', got {kind!r}")
    return to_square(w.detach().cpu())


def mean_token_maps(paths: TwoPaths, path: str, step: int | None = None, layer: str | None = None,
                    kind: str = "response", size: int = 32) -> torch.Tensor:
    """``token_maps`` resized to ``size`` and averaged over layers (or one ``layer``) and steps (or one
    ``step``): (B, N_txt, size, size)."""
    keys = [(la, s) for la in paths.layers for s in paths.steps
            if (step is None or s == step) and (layer is None or la == layer)]
    if not keys:
        raise ValueError(f"nothing captured for layer={layer!r}, step={step!r}; layers {paths.layers}, steps {paths.steps}")
    maps = [F.interpolate(token_maps(paths, path, la, s, kind), size=(size, size), mode="bilinear", align_corners=False)
            for la, s in keys]
    return torch.stack(maps).mean(0)


def response_differences(cap_id: Capture, cap_plain: Capture) -> dict[tuple[str, int], torch.Tensor]:
    """Per layer and step: || text_response(Q_tid) - text_response(Q_t) ||_2 per token, (B, N_txt)."""
    out = {}
    for key in cap_id.keys():
        diff = text_response(cap_id.q[key], cap_id.k[key]) - text_response(cap_plain.q[key], cap_plain.k[key])
        out[key] = torch.linalg.vector_norm(diff.float(), dim=-1).detach().cpu()
    return out


def layout_maps(cap_id: Capture, cap_plain: Capture) -> dict[tuple[str, int], torch.Tensor]:
    """Per layer and step: || Q_tid - Q_t ||_2 at every image position, (B, h, w). Its mean is the layout term."""
    return {key: to_square(torch.linalg.vector_norm((cap_id.q[key] - cap_plain.q[key]).float(), dim=-1).detach().cpu())
            for key in cap_id.keys()}


@dataclass
class LossTerms:
    """The alignment loss terms of every layer (rows) and step (columns), averaged over the batch as the
    trainer averages them. Their sums are ``losses.align_semantic_loss`` / ``align_layout_loss`` (the trainer's
    default ``align_reduction='mean'`` divides those by the number of (layer, step) pairs)."""
    layers: list[str]
    steps: list[int]
    semantic: np.ndarray  # (L, S)
    layout: np.ndarray  # (L, S)
    sizes: dict[str, int]  # layer -> image positions

    def totals(self) -> dict[str, float]:
        return {"align_sem": float(self.semantic.sum()), "align_layout": float(self.layout.sum())}

    def total(self, lambda_sem: float = LAMBDA_SEM, lambda_layout: float = LAMBDA_LAYOUT) -> float:
        """L_align = lambda_sem L_align_sem + lambda_layout L_align_layout."""
        terms = {"align_sem": float(self.semantic.sum()), "align_layout": float(self.layout.sum())}
        return pulid_objective(terms, lambda_sem=lambda_sem, lambda_layout=lambda_layout)["total"]

    def labels(self) -> list[str]:
        return [layer_label(la, self.sizes[la]) for la in self.layers]


def loss_terms(cap_id: Capture, cap_plain: Capture, token_mask: torch.Tensor | None = None) -> LossTerms:
    """Semantic and layout terms per layer and per step (``token_mask`` (B, N_txt) as in ``losses``)."""
    layers, steps = layers_of(cap_id), steps_of(cap_id)
    sem, lay = np.zeros((len(layers), len(steps))), np.zeros((len(layers), len(steps)))
    diffs, maps = response_differences(cap_id, cap_plain), layout_maps(cap_id, cap_plain)
    for i, la in enumerate(layers):
        for j, s in enumerate(steps):
            d = diffs[(la, s)]
            sem[i, j] = float(d[token_mask.cpu()].mean() if token_mask is not None else d.mean())
            lay[i, j] = float(maps[(la, s)].mean())
    sizes = {la: cap_id.q[(la, steps[0])].shape[1] for la in layers}
    return LossTerms(layers, steps, sem, lay, sizes)


def paths_loss_terms(paths: TwoPaths) -> LossTerms:
    return loss_terms(paths.cap_id, paths.cap_plain)


ALL = "all (mean)"


def explorer_view(paths: TwoPaths, layer: str | None, step: int | None, token: int, item: int = 0,
                  kind: str = "cross", size: int = 32) -> dict:
    """What the attention explorer shows for one (layer, step, token): the token's heat map on both paths,
    their difference, and the layout map |Q_tid - Q_t| — numpy (size, size) each — plus the images and the
    token's semantic difference. ``layer`` / ``step`` None (or ``ALL``) average over layers / steps."""
    layer = None if layer in (None, ALL) else layer
    step = None if step in (None, ALL) else step
    maps = {p: mean_token_maps(paths, p, step, layer, kind, size)[item, token].numpy() for p in PATHS}
    keys = [(la, s) for la in paths.layers for s in paths.steps
            if (step is None or s == step) and (layer is None or la == layer)]
    lay = layout_maps(paths.cap_id, paths.cap_plain)
    layout = torch.stack([F.interpolate(lay[k][item][None, None], size=(size, size), mode="bilinear",
                                        align_corners=False)[0, 0] for k in keys]).mean(0).numpy()
    diffs = response_differences(paths.cap_id, paths.cap_plain)
    from ..core.imaging import to_uint8
    return {"token": paths.tokens[item][token], "maps": maps, "difference": maps["with ID"] - maps["prompt only"],
            "layout": layout, "semantic_difference": float(np.mean([float(diffs[k][item, token]) for k in keys])),
            "image_id": to_uint8(paths.image_id[item:item + 1])[0],
            "image_plain": to_uint8(paths.image_plain[item:item + 1])[0], "prompt": paths.prompts[item]}


# -- plots --------------------------------------------------------------------------------------------------
def _short(prompt: str) -> str:
    return prompt.replace("a portrait, ", "")


def plot_token_maps(paths_by_name: dict[str, TwoPaths], item: int = 0, step: int | None = None,
                    kind: str = "response", out=None):
    """Rows: the prompt-only path, then the with-ID path of each adapter; columns: the image, then one map per
    prompt token (averaged over layers, and over steps unless ``step``). Under each with-ID map: the token's
    semantic difference || response_tid - response_t || summed over layers and steps."""
    import matplotlib.pyplot as plt

    from ..core.imaging import to_uint8
    from .plots import save
    first = next(iter(paths_by_name.values()))
    toks = first.real_tokens(item)
    rows = [("prompt only", first, "prompt only")] + [(f"{n}\nwith ID", p, "with ID") for n, p in paths_by_name.items()]
    maps = [mean_token_maps(p, path, step, None, kind)[item, toks].numpy() for _, p, path in rows]
    vmax = max(float(m.max()) for m in maps)
    fig, axes = plt.subplots(len(rows), len(toks) + 1, figsize=(0.95 * (len(toks) + 1), 1.05 * len(rows) + 0.5), squeeze=False)
    for r, ((title, p, path), m) in enumerate(zip(rows, maps)):
        img = p.image_id if path == "with ID" else p.image_plain
        axes[r, 0].imshow(to_uint8(img[item:item + 1])[0], interpolation="nearest")
        axes[r, 0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
        diffs = response_differences(p.cap_id, p.cap_plain) if path == "with ID" else None
        for c, j in enumerate(toks):
            ax = axes[r, c + 1]
            ax.imshow(m[c], cmap="magma", vmin=0, vmax=vmax)
            if r == 0:
                ax.set_title(p.tokens[item][j], fontsize=7)
            if diffs is not None:
                total = sum(float(d[item, j]) for (la, s), d in diffs.items() if step is None or s == step)
                ax.set_xlabel(f"{total:.2f}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    what = "softmax(K Q^T/sqrt d): where each token reads the image" if kind == "response" else "image-to-text attention"
    fig.suptitle(f"{what} ({'all steps' if step is None else f'step {step}'}, mean over layers) - "
                 f"'{_short(first.prompts[item])}'", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.3)
    return save(fig, out)


def plot_layout_maps(paths_by_name: dict[str, TwoPaths], item: int = 0, out=None):
    """|Q_tid - Q_t| per image position: rows = layers, columns = steps, one block per adapter, one colour scale."""
    import matplotlib.pyplot as plt

    from .plots import save
    names = list(paths_by_name)
    first = paths_by_name[names[0]]
    layers, steps = first.layers, first.steps
    maps = {n: layout_maps(p.cap_id, p.cap_plain) for n, p in paths_by_name.items()}
    vmax = max(float(m[item].max()) for mm in maps.values() for m in mm.values())
    cols = len(steps) * len(names)
    fig, axes = plt.subplots(len(layers), cols, figsize=(0.85 * cols + 1, 0.85 * len(layers) + 0.6), squeeze=False)
    im = None
    for b, n in enumerate(names):
        for i, la in enumerate(layers):
            for j, s in enumerate(steps):
                ax = axes[i, b * len(steps) + j]
                m = maps[n][(la, s)][item]
                im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{n}\nstep {s}", fontsize=7)
                if b == 0 and j == 0:
                    ax.set_ylabel(layer_label(la, m.numel()), fontsize=6, rotation=0, ha="right", va="center")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="||Q_tid - Q_t||_2")
    fig.suptitle(f"layout maps |Q_tid - Q_t| - '{_short(first.prompts[item])}'", fontsize=9)
    return save(fig, out)


def plot_loss_terms(terms_by_name: dict[str, LossTerms], lambda_sem: float = LAMBDA_SEM,
                    lambda_layout: float = LAMBDA_LAYOUT, out=None):
    """Heat maps of the semantic (top) and layout (bottom) terms, layers x steps, one column per adapter,
    one colour scale per term; titles carry the sums and L_align."""
    import matplotlib.pyplot as plt

    from .plots import save
    names = list(terms_by_name)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.2), squeeze=False)
    for r, attr in enumerate(("semantic", "layout")):
        vmax = max(float(getattr(t, attr).max()) for t in terms_by_name.values())
        for c, n in enumerate(names):
            t, ax = terms_by_name[n], axes[r, c]
            v = getattr(t, attr)
            ax.imshow(v, cmap="Reds", vmin=0, vmax=vmax, aspect="auto")
            for (i, j), x in np.ndenumerate(v):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(t.steps)), [f"step {s}" for s in t.steps], fontsize=7)
            ax.set_yticks(range(len(t.layers)), t.labels() if c == 0 else [""] * len(t.layers), fontsize=7)
            title = f"{n}: L_align-{'sem' if r == 0 else 'layout'} = {v.sum():.2f}"
            if r == 0:
                title += f"\nL_align = {t.total(lambda_sem, lambda_layout):.2f}"
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save(fig, out)


def plot_tradeoff(results: dict[str, dict], origin: str | None = None, out=None,
                  title: str = "lambda_sem / lambda_layout trade-off"):
    """Face Sim (x) against prompt score and against purity (y), one point per adapter; with ``origin`` (a key
    of ``results``, e.g. the Stage 2 adapter they all start from) an arrow from it to every other point."""
    import matplotlib.pyplot as plt

    from .plots import save
    if origin is not None and origin not in results:
        raise ValueError(f"origin {origin!r} is not one of {list(results)}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, y in zip(axes, ("prompt_score", "purity")):
        for i, (n, r) in enumerate(results.items()):
            ax.scatter(r["face_sim"], r[y], s=40, color=colours[i % len(colours)], label=n, zorder=3)
            if origin is not None and n != origin:
                o = results[origin]
                ax.annotate("", (r["face_sim"], r[y]), (o["face_sim"], o[y]),
                            arrowprops=dict(arrowstyle="->", color=colours[i % len(colours)], alpha=0.5, lw=1))
        ax.set_xlabel("Face Sim (ID fidelity)")
        ax.set_ylabel(y.replace("_", " ") + (" (CLIP-T analog)" if y == "prompt_score" else " (CLIP-I analog)"))
        ax.margins(0.25)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, out)


def plot_explorer_view(view: dict, title: str = "", out=None):
    """One ``explorer_view``: each path's image and the token's heat map, their difference, the layout map."""
    import matplotlib.pyplot as plt

    from .plots import save
    fig, axes = plt.subplots(1, 6, figsize=(11, 2.3))
    vmax = max(float(m.max()) for m in view["maps"].values())
    dmax = float(np.abs(view["difference"]).max()) or 1.0
    panels = [(view["image_plain"], "prompt only", {}), (view["maps"]["prompt only"], f"'{view['token']}' prompt only",
              dict(cmap="magma", vmin=0, vmax=vmax)), (view["image_id"], "with ID", {}),
              (view["maps"]["with ID"], f"'{view['token']}' with ID", dict(cmap="magma", vmin=0, vmax=vmax)),
              (view["difference"], "with ID - prompt only", dict(cmap="RdBu_r", vmin=-dmax, vmax=dmax)),
              (view["layout"], "|Q_tid - Q_t| (layout)", dict(cmap="viridis", vmin=0))]
    for ax, (img, t, kw) in zip(axes, panels):
        im = ax.imshow(img, interpolation="nearest" if img.ndim == 3 else "bilinear", **kw)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(t, fontsize=7)
        if img.ndim == 2:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    axes[4].set_xlabel(f"semantic difference {view['semantic_difference']:.3f}", fontsize=7)
    fig.suptitle(title or view["prompt"], fontsize=8)
    fig.tight_layout()
    return save(fig, out)
