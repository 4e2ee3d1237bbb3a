"""Images without a face, for the face check (the mini world's stand-in for a detector's face score).

insightface's detector gives every box a score and finds no face in a picture of a wall; the mini detector only
regresses a box. The face check learns the difference from two kinds of images: renders (faces) and the
``TRAINING_KINDS`` below, made from the same renders or from nothing. ``CHECK_KINDS`` are other faceless images,
never used in training: `pulid-lab check-models` and the pretrain report measure on them whether the check learnt
"no face" or only the kinds it saw. Images are float tensors (B, 3, 32, 32) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 32


def _rand(gen, *shape):
    return torch.rand(shape, generator=gen)


def painted_head(images: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The head (face box, hair and hat room) painted over with the background colour: a portrait with no one in it."""
    out = images.clone()
    for i, (cx, cy, s) in enumerate(boxes.tolist()):
        up = 1.2 + 0.6 * _rand(gen, 1).item()  # how much of the hair goes too
        y0, y1 = max(0, int(cy - up * s)), int(cy + 1.6 * s)
        x0, x1 = max(0, int(cx - 1.3 * s)), int(cx + 1.3 * s)
        out[i, :, y0:y1, x0:x1] = images[i, :, :1, :1]  # the top-left pixel is background in every render
    return out


def smooth_noise(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random colours on a k x k grid (k from 1 to 32) blown up to 32 x 32: flat colour, blobs, blocks, noise."""
    out = []
    for _ in range(n):
        k = (1, 2, 4, 8, 16, 32)[int(_rand(gen, 1).item() * 6)]
        mode = "bilinear" if _rand(gen, 1).item() < 0.5 else "nearest"
        out.append(F.interpolate(_rand(gen, 1, 3, k, k) * 2 - 1, size=SIZE, mode=mode))
    return torch.cat(out)


def shapes(n: int, gen: torch.Generator) -> torch.Tensor:
    """One to five ellipses and rectangles of random colours on a plain background."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    out = (_rand(gen, n, 3, 1, 1) * 2 - 1).expand(n, 3, SIZE, SIZE).clone()
    for i in range(n):
        for _ in range(1 + int(_rand(gen, 1).item() * 5)):
            cx, cy, a, b = (_rand(gen, 4) * torch.tensor([SIZE, SIZE, 10, 10]) + torch.tensor([0, 0, 2, 2])).tolist()
            if _rand(gen, 1).item() < 0.5:
                mask = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
            else:
                mask = ((xx - cx).abs() < a) & ((yy - cy).abs() < b)
            out[i][:, mask] = (_rand(gen, 3, 1) * 2 - 1)
    return out


def shuffled_blocks(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A render cut into 4, 8 or 16 px blocks put back in random order: a face's colours, not its layout."""
    out = []
    for img in images:
        b = (4, 8, 16)[int(_rand(gen, 1).item() * 3)]
        g = SIZE // b
        blocks = img.reshape(3, g, b, g, b).permute(1, 3, 0, 2, 4).reshape(g * g, 3, b, b)
        blocks = blocks[torch.randperm(g * g, generator=gen)]
        out.append(blocks.reshape(g, g, 3, b, b).permute(2, 0, 3, 1, 4).reshape(3, SIZE, SIZE))
    return torch.stack(out)


TRAINING_KINDS = ("painted_head", "smooth_noise", "shapes", "shuffled_blocks")


def training_faceless(images: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many faceless images as ``images`` (renders with their face ``boxes``), the training kinds mixed evenly."""
    n = len(images)
    kind = torch.randint(len(TRAINING_KINDS), (n,), generator=gen)
    out = torch.empty_like(images)
    made = {0: lambda m: painted_head(images[m], boxes[m], gen), 1: lambda m: smooth_noise(int(m.sum()), gen),
            2: lambda m: shapes(int(m.sum()), gen), 3: lambda m: shuffled_blocks(images[m], gen)}
    for k, make in made.items():
        m = kind == k
        if m.any():
            out[m] = make(m).to(out)
    return out


def check_faceless(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Faceless kinds the face check never trains on: {kind: (n, 3, 32, 32)}."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    colours = lambda: (_rand(gen, n, 3, 1, 1) * 2 - 1)  # noqa: E731
    freq = _rand(gen, n, 2, 1, 1) * 1.3 + 0.2
    wave = torch.sin(xx * freq[:, :1] + yy * freq[:, 1:]) > 0  # (n, 1, 32, 32)
    cell = (2 + (_rand(gen, n, 1, 1, 1) * 6).floor())
    checker = ((xx // cell + yy // cell) % 2).bool()
    slope = _rand(gen, n, 2, 1, 1) * 2 - 1
    ramp = (xx * slope[:, :1] + yy * slope[:, 1:]) / SIZE  # (n, 1, 32, 32) in about [-2, 2]
    return {
        "flat colour": colours().expand(n, 3, SIZE, SIZE).clone(),
        "stripes": torch.where(wave, colours(), colours()),
        "checkerboard": torch.where(checker, colours(), colours()),
        "gradient": (ramp * (_rand(gen, n, 3, 1, 1) * 2 - 1) + (_rand(gen, n, 3, 1, 1) - 0.5)).clamp(-1, 1),
        "gaussian noise": (torch.randn((n, 3, SIZE, SIZE), generator=gen) * 0.5).clamp(-1, 1),
    }
