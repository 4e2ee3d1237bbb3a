"""ToyFaces: a seeded world of 32x32 portraits where identity lives in fine structure (docs/world.md).

An *identity* is a fixed draw of ID factors (face shape and width, skin, hair colour and style, eye colour,
spacing, height, size and shape, brows, nose, mouth). Everything else is named by the caption (vocab.py).
Rendering is vectorised over a batch with numpy: shapes are drawn as hard masks on a 4x supersampled canvas
(128x128) and box-averaged to 32x32, so sub-pixel geometry (eye spacing, mouth width) survives as
anti-aliased intensity. Each image is a pure function of (identity id, attributes, render seed).

Identity splits (fixed, by index): ids ``0 .. N_TRAIN-1`` are the train identities, ids
``N_TRAIN .. N_TRAIN+N_HELDOUT-1`` are held out. Identity ``i`` is drawn from ``np.random.default_rng((WORLD_SEED, i))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocab import ATTRIBUTES

WORLD_SEED = 20240416  # arXiv 2404.16022
N_TRAIN = 2000
N_HELDOUT = 200
TRAIN_IDS = np.arange(N_TRAIN)
HELDOUT_IDS = np.arange(N_TRAIN, N_TRAIN + N_HELDOUT)
SIZE = 32
SUPERSAMPLE = 4

SKIN_TONES = np.array([[0.98, 0.85, 0.74], [0.93, 0.76, 0.62], [0.84, 0.64, 0.48],
                       [0.70, 0.50, 0.35], [0.55, 0.38, 0.26], [0.40, 0.27, 0.19]], np.float32)
HAIR_COLOURS = np.array([[0.09, 0.07, 0.06], [0.30, 0.18, 0.10], [0.52, 0.34, 0.18],
                         [0.90, 0.78, 0.42], [0.78, 0.30, 0.10], [0.50, 0.12, 0.12]], np.float32)
EYE_COLOURS = np.array([[0.40, 0.22, 0.10], [0.20, 0.45, 0.85], [0.25, 0.62, 0.30],
                        [0.50, 0.52, 0.56]], np.float32)
GREY_HAIR = np.array([0.84, 0.84, 0.86], np.float32)
HAT_COLOUR = np.array([0.22, 0.20, 0.32], np.float32)
SHIRT_COLOUR = np.array([0.30, 0.34, 0.42], np.float32)
BACKGROUND_COLOURS = np.array([[0.85, 0.20, 0.18], [0.95, 0.55, 0.15], [0.95, 0.88, 0.25],
                               [0.25, 0.70, 0.30], [0.15, 0.60, 0.60], [0.20, 0.35, 0.85],
                               [0.55, 0.25, 0.70], [0.95, 0.55, 0.75]], np.float32)
FACE_SHAPES = ("round", "oval", "square", "heart")
HAIR_STYLES = ("short", "long", "curly", "side-part", "spiky", "bald")
BROW_SHAPES = ("straight", "angled", "arched")
NOSE_SHAPES = ("button", "long", "wide")
EYE_SHAPES = ("round", "narrow")

# Factors whose value is a colour; the rest is structure. Used to build colour-matched impostors.
COLOUR_FACTORS = ("skin", "skin_jitter", "hair_colour", "eye_colour")
# layout: position -> face centre x (px); scale -> face half-height s (px)
POSITION_X = np.array([10.0, 16.0, 22.0], np.float32)
SCALE_S = np.array([6.2, 8.6], np.float32)
FACE_Y = 17.0


def identity_factors(ids) -> dict[str, np.ndarray]:
    """ID factors of identities ``ids`` as a dict of arrays (struct of arrays, one row per id)."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    rows = []
    for i in ids:
        r = np.random.default_rng((WORLD_SEED, int(i)))
        rows.append(dict(
            face_shape=r.integers(len(FACE_SHAPES)),
            face_width=r.uniform(0.68, 0.86),
            skin=r.integers(len(SKIN_TONES)),
            skin_jitter=r.uniform(-0.04, 0.04),
            hair_colour=r.integers(len(HAIR_COLOURS)),
            hair_style=r.choice(len(HAIR_STYLES), p=[0.2, 0.2, 0.16, 0.18, 0.16, 0.1]),
            eye_colour=r.integers(len(EYE_COLOURS)),
            eye_spacing=r.uniform(0.24, 0.42),
            eye_height=r.uniform(-0.26, -0.04),
            eye_size=r.uniform(0.075, 0.12),
            eye_shape=r.integers(len(EYE_SHAPES)),
            brow_shape=r.integers(len(BROW_SHAPES)),
            brow_thickness=r.uniform(0.035, 0.08),
            nose_shape=r.integers(len(NOSE_SHAPES)),
            nose_length=r.uniform(0.18, 0.34),
            mouth_width=r.uniform(0.16, 0.34),
            mouth_offset=r.uniform(0.16, 0.30),
            lip=r.uniform(0.03, 0.055),
        ))
    return {k: np.array([row[k] for row in rows]) for k in rows[0]}


def attribute_labels(attributes, n: int | None = None) -> dict[str, np.ndarray]:
    """Normalise attributes to ``{name: int array (B,)}`` of value indices.

    Accepts a list of dicts of value names (``{"style": "sketch", ...}``) or a dict of index arrays.
    Every attribute must be set: renders are complete even when captions are not.
    """
    if isinstance(attributes, dict):
        out = {k: np.atleast_1d(np.asarray(attributes[k], np.int64)) for k in ATTRIBUTES}
    else:
        out = {}
        for k, values in ATTRIBUTES.items():
            col = []
            for a in attributes:
                v = a.get(k)
                if v is None:
                    raise ValueError(f"attribute {k!r} is unset; a render needs every attribute ({list(ATTRIBUTES)})")
                col.append(values.index(v) if isinstance(v, str) else int(v))
            out[k] = np.array(col, np.int64)
    if n is not None:
        out = {k: np.broadcast_to(v, (n,)).copy() for k, v in out.items()}
    return out


def sample_attributes(rng: np.random.Generator, n: int, old_prob: float = 0.15) -> dict[str, np.ndarray]:
    """Uniformly random attribute labels (the ``age`` edit with probability ``old_prob``)."""
    out = {k: rng.integers(len(v), size=n) for k, v in ATTRIBUTES.items()}
    out["age"] = (rng.random(n) < old_prob).astype(np.int64)
    return out


@dataclass
class Render:
    images: np.ndarray  # (B, 32, 32, 3) uint8
    boxes: np.ndarray  # (B, 3) float32: face centre x, centre y, half-height s (px)


def render(ids, attributes, seeds, chunk: int = 256) -> Render:
    """Render identities ``ids`` (B,) with attributes (see ``attribute_labels``) and per-image ``seeds`` (B,)."""
    return render_factors(identity_factors(ids), attributes, seeds, chunk)


def render_factors(factors: dict[str, np.ndarray], attributes, seeds, chunk: int = 256) -> Render:
    """Render from ID factors directly (e.g. ``colour_matched_factors``); see ``render``."""
    n = len(next(iter(factors.values())))
    labels = attribute_labels(attributes, n)
    seeds = np.broadcast_to(np.asarray(seeds, np.int64), (n,))
    images, boxes = [], []
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        im, bx = _render_chunk({k: v[sl] for k, v in factors.items()}, {k: v[sl] for k, v in labels.items()}, seeds[sl])
        images.append(im)
        boxes.append(bx)
    return Render(np.concatenate(images), np.concatenate(boxes))


def _col(x):  # (B,) -> (B,1,1) for broadcasting against (B,H,W)
    return np.asarray(x, np.float32)[:, None, None]


def _render_chunk(f, a, seeds):
    b = len(seeds)
    ss, n = SUPERSAMPLE, SIZE * SUPERSAMPLE
    jitter = np.array([np.random.default_rng((WORLD_SEED, 1, int(s))).uniform(-1, 1, 4) for s in seeds], np.float32)
    noise = np.stack([np.random.default_rng((WORLD_SEED, 2, int(s))).standard_normal((SIZE, SIZE, 3)) for s in seeds])

    cx = POSITION_X[a["position"]] + 0.6 * jitter[:, 0]
    cy = FACE_Y + 0.6 * jitter[:, 1] - 0.5 * (a["hat"] == 1)
    s = SCALE_S[a["scale"]] * (1 + 0.05 * jitter[:, 2])
    grid = (np.arange(n, dtype=np.float32) + 0.5) / ss
    U = (grid[None, None, :] - _col(cx)) / _col(s)  # (B,1,N) face units, x
    V = (grid[None, :, None] - _col(cy)) / _col(s)  # (B,N,1) face units, y (down)

    old = _col(a["age"] == 1) > 0
    skin = SKIN_TONES[f["skin"]] + f["skin_jitter"][:, None]
    hair = np.where(old[:, :, 0], GREY_HAIR, HAIR_COLOURS[f["hair_colour"]])
    brow_colour = np.where(old[:, :, 0], GREY_HAIR * 0.8, HAIR_COLOURS[f["hair_colour"]] * 0.8)
    bg = BACKGROUND_COLOURS[a["background"]]

    col = np.broadcast_to(bg[:, None, None, :], (b, n, n, 3)).astype(np.float32)
    label = np.zeros((b, n, n), np.int8)

    def paint(mask, colour, lab):
        nonlocal col, label
        mask = np.broadcast_to(mask, (b, n, n))
        colour = np.asarray(colour, np.float32)
        colour = colour[:, None, None, :] if colour.ndim == 2 else colour
        col = np.where(mask[..., None], colour, col)
        label = np.where(mask, np.int8(lab), label)

    fw = _col(f["face_width"])
    shape = f["face_shape"]
    # shoulders and neck
    paint(((U / (fw + 0.9)) ** 2 + ((V - 1.95) / 0.95) ** 2) < 1, np.broadcast_to(SHIRT_COLOUR, (b, 3)), 1)
    paint((np.abs(U) < 0.3) & (V > 0.4) & (V < 1.3), skin * 0.85, 2)
    # hair behind the head: long and curly styles
    hs = f["hair_style"]
    long_back = ((U / (fw + 0.18)) ** 2 + ((V - 0.25) / 1.08) ** 2 < 1) & (V > -0.3)
    theta = np.arctan2(V + 0.15, U)
    curly_back = (U / (fw + 0.32)) ** 2 + ((V + 0.15) / 1.22) ** 2 < (1 + 0.07 * np.sin(12 * theta)) ** 2
    paint((_col(hs == 1) > 0) & long_back | (_col(hs == 2) > 0) & curly_back, hair, 3)
    # face: superellipse; square has a high exponent, oval is taller, heart tapers to the chin
    p = _col(np.where(shape == 2, 3.6, 2.0))
    height = _col(np.where(shape == 1, 1.08, 1.0))
    width = fw * np.where(_col(shape == 3) > 0, 1 - 0.28 * np.clip(V, 0, None), 1.0)
    face = np.abs(U / width) ** p + np.abs(V / height) ** p < 1
    paint(face, skin, 4)
    # hair in front: a cap above a hairline that depends on the style
    cap = (U / (fw + 0.09)) ** 2 + ((V + 0.06) / 1.1) ** 2 < 1
    hairline = np.where(_col(hs == 3) > 0, -0.62 + 0.32 * np.clip((U + 0.25) / 0.8, 0, 1), -0.5 + 0.12 * U ** 2)
    spiky_cap = (U / (fw + 0.09)) ** 2 + ((V + 0.06) / (1.1 + 0.2 * np.abs(np.sin(9 * U)))) ** 2 < 1
    cap = np.where(_col(hs == 4) > 0, spiky_cap, cap) & (V < hairline) & (_col(hs != 5) > 0)
    sideburns = (np.abs(np.abs(U) - fw * 0.95) < 0.08) & (V > -0.5) & (V < -0.1) & (_col((hs != 5) & (hs != 4)) > 0)
    paint(cap | sideburns, hair, 3)
    # wrinkles for "old"
    forehead = (np.abs(U) < 0.3) & ((np.abs(V + 0.42) < 0.018) | (np.abs(V + 0.34) < 0.018)) & old & face & ~cap
    paint(forehead, skin * 0.7, 4)
    # eyes: white, iris (eye colour), pupil
    d, ey, er = _col(f["eye_spacing"]), _col(f["eye_height"]), _col(f["eye_size"])
    narrow = _col(f["eye_shape"] == 1) > 0
    rx, ry = np.where(narrow, er * 1.6, er * 1.2), np.where(narrow, er * 0.8, er * 1.1)
    for side in (-1, 1):
        du, dv = U - side * d, V - ey
        paint((du / rx) ** 2 + (dv / ry) ** 2 < 1, np.ones((b, 3), np.float32) * 0.97, 5)
        paint(du ** 2 + dv ** 2 < (0.8 * ry) ** 2, EYE_COLOURS[f["eye_colour"]], 6)
        paint(du ** 2 + dv ** 2 < (0.35 * ry) ** 2, np.full((b, 3), 0.05, np.float32), 6)
    # brows: a band above each eye; surprise raises them
    bt = _col(f["brow_thickness"])
    lift = _col(np.where(a["expression"] == 2, 0.1, 0.0))
    for side in (-1, 1):
        du = U - side * d
        along = du / 0.15
        offset = np.select([_col(f["brow_shape"] == 1) > 0, _col(f["brow_shape"] == 2) > 0],
                           [-side * 0.3 * du, -0.07 * (1 - along ** 2)], 0 * du)
        centre = ey - 0.19 - lift + offset
        paint((np.abs(along) < 1) & (np.abs(V - centre) < bt), brow_colour, 7)
    # nose
    ny = ey + _col(f["nose_length"])
    ns = f["nose_shape"]
    nose = np.select(
        [_col(ns == 0) > 0, _col(ns == 1) > 0],
        [(U / 0.07) ** 2 + ((V - ny) / 0.06) ** 2 < 1, (np.abs(U) < 0.035) & (V > ey + 0.06) & (V < ny + 0.03)],
        (U / 0.14) ** 2 + ((V - ny) / 0.05) ** 2 < 1)
    paint(nose, skin * 0.72, 8)
    # mouth: neutral line, smiling open half-ellipse with teeth, surprised "O"
    my, mw, lip = ny + _col(f["mouth_offset"]), _col(f["mouth_width"]), _col(f["lip"])
    lip_colour = 0.5 * skin + 0.5 * np.array([0.65, 0.15, 0.2], np.float32)
    ex = a["expression"]
    neutral = (np.abs(U) < mw) & (np.abs(V - my) < np.maximum(lip, 0.045))
    smile_w = mw * 1.2 + 0.05
    smile_out = ((U / smile_w) ** 2 + ((V - my + 0.03) / 0.2) ** 2 < 1) & (V > my - 0.05)
    smile_in = ((U / (smile_w - 0.06)) ** 2 + ((V - my + 0.03) / 0.14) ** 2 < 1) & (V > my - 0.01)
    o_mouth = (U / (0.35 * mw + 0.07)) ** 2 + ((V - my) / 0.15) ** 2 < 1
    paint(np.select([_col(ex == 0) > 0, _col(ex == 1) > 0], [neutral, smile_out], o_mouth), lip_colour, 9)
    paint((_col(ex == 1) > 0) & smile_in, np.full((b, 3), 0.96, np.float32), 10)
    paint((_col(ex == 2) > 0) & ((U / (0.35 * mw + 0.04)) ** 2 + ((V - my) / 0.1) ** 2 < 1),
          np.full((b, 3), 0.18, np.float32) * np.array([1.4, 0.5, 0.5], np.float32), 10)
    # a smile lifts rosy cheeks
    cheeks = ((np.abs(U) - 0.5 * fw) / 0.13) ** 2 + ((V - my + 0.16) / 0.08) ** 2 < 1
    paint((_col(ex == 1) > 0) & cheeks & face, 0.6 * skin + 0.4 * np.array([0.95, 0.35, 0.4], np.float32), 13)
    # glasses: two rims and a bridge
    rim = np.maximum(0.19, 1.9 * er)
    glasses = ((np.abs(np.sqrt((U - d) ** 2 + (V - ey) ** 2) - rim) < 0.045)
               | (np.abs(np.sqrt((U + d) ** 2 + (V - ey) ** 2) - rim) < 0.045)
               | ((np.abs(V - ey) < 0.03) & (np.abs(U) < d - rim + 0.02)))
    paint(glasses & (_col(a["glasses"] == 1) > 0), np.full((b, 3), 0.08, np.float32), 11)
    # hat: brim and crown
    hat = (((np.abs(U) < fw + 0.32) & (V > -1.0) & (V < -0.86))
           | ((np.abs(U) < fw - 0.02) & (V > -1.6) & (V < -0.86)))
    paint(hat & (_col(a["hat"] == 1) > 0), np.broadcast_to(HAT_COLOUR, (b, 3)), 12)

    img = _stylise(col, label, U, V, a["style"], fw, noise)
    img = _light(img, a["lighting"])
    pixel = (a["style"] == 2)[:, None, None, None]
    img = np.where(pixel, np.round(np.clip(img, 0, 1) * 6) / 6, img)  # pixel art: a 7-level palette
    img = img * (1 + 0.04 * jitter[:, 3])[:, None, None, None] + 0.012 * noise * ~pixel
    images = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, np.stack([cx, cy, s], 1).astype(np.float32)


def _edges(label, width: int):
    e = np.zeros(label.shape, bool)
    e[:, :, 1:] |= label[:, :, 1:] != label[:, :, :-1]
    e[:, 1:, :] |= label[:, 1:, :] != label[:, :-1, :]
    for _ in range(width - 1):
        e[:, :, 1:] |= e[:, :, :-1]
        e[:, 1:, :] |= e[:, :-1, :]
    return e


def _downsample(x):
    b, n = x.shape[0], x.shape[1]
    k = SUPERSAMPLE
    return x.reshape(b, n // k, k, n // k, k, -1).mean((2, 4))


def _stylise(col, label, U, V, style, fw, noise):
    """Style = how the painted regions become pixels; each style leaves a clear texture on the background."""
    n = col.shape[1]
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / SUPERSAMPLE  # output-pixel coordinates
    bgmask = (label == 0)[..., None]
    out = np.empty((col.shape[0], SIZE, SIZE, 3), np.float32)
    for k, name in enumerate(ATTRIBUTES["style"]):
        idx = np.flatnonzero(style == k)
        if len(idx) == 0:
            continue
        c, lab, bgm = col[idx], label[idx], bgmask[idx]
        if name == "photo":  # soft spherical shading on the head, a gentle vertical gradient behind
            r2 = np.clip((U[idx] / fw[idx]) ** 2 + V[idx] ** 2, 0, 1.5)
            shade = np.where(lab >= 3, 1.08 - 0.2 * r2, 1.0)
            c = c * shade[..., None] * np.where(bgm, 1.08 - 0.16 * ys[None, :, :, None] / SIZE, 1.0)
            out[idx] = _downsample(c)
        elif name == "comic":  # saturated flat colours, black outlines, halftone dots
            grey = c.mean(-1, keepdims=True)
            c = np.clip(grey + 1.5 * (c - grey), 0, 1)
            dots = ((xs % 3 - 1.5) ** 2 + (ys % 3 - 1.5) ** 2 < 0.55)[None, :, :, None]
            c = np.where(bgm & dots, c * 0.55, c)
            c = np.where(_edges(lab, 3)[..., None], 0.04, c)
            out[idx] = _downsample(c)
        elif name == "sketch":  # pale paper tint, graphite lines, diagonal hatching
            c = 0.5 * c + 0.5 * 0.96
            hatch = (((xs + ys) % 2.5) < 0.5)[None, :, :, None]
            c = np.where(bgm & hatch, c * 0.78, c)
            c = np.where(_edges(lab, 2)[..., None], 0.22, c)
            out[idx] = _downsample(c)
        elif name == "pixel":  # nearest sampling (no anti-aliasing) and a checker dither behind
            o = SUPERSAMPLE // 2
            c = c[:, o::SUPERSAMPLE, o::SUPERSAMPLE]
            checker = ((np.arange(SIZE)[:, None] + np.arange(SIZE)[None, :]) % 2 == 0)[None, :, :, None]
            out[idx] = np.where(bgm[:, o::SUPERSAMPLE, o::SUPERSAMPLE] & checker, c * 0.8, c)
        else:  # painting: soft blur, boosted colour, horizontal brush streaks
            c = _downsample(c)
            blur = 0.6 * c + 0.1 * (np.roll(c, 1, 1) + np.roll(c, -1, 1) + np.roll(c, 1, 2) + np.roll(c, -1, 2))
            grey = blur.mean(-1, keepdims=True)
            c = grey + 1.25 * (blur - grey)
            streak = noise[idx].mean(-1, keepdims=True)
            streak = (streak + np.roll(streak, 1, 2) + np.roll(streak, 2, 2) + np.roll(streak, -1, 2)) / 4
            out[idx] = c * (1 + 0.12 * streak)
    return out


def _light(img, lighting):
    """Lighting direction as a brightness ramp over the whole image (front = even)."""
    t = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE - 0.5  # -0.5 .. 0.5
    ramps = np.stack([np.ones((SIZE, SIZE), np.float32),
                      np.broadcast_to(1 - 0.9 * t[None, :], (SIZE, SIZE)),
                      np.broadcast_to(1 + 0.9 * t[None, :], (SIZE, SIZE)),
                      np.broadcast_to(1 - 0.9 * t[:, None], (SIZE, SIZE))])
    return img * ramps[lighting][..., None]


def colour_matched_factors(ids, donors) -> dict[str, np.ndarray]:
    """Impostors for the colour-held-equal check: the colours of ``ids`` on the structure of ``donors``."""
    f, g = identity_factors(ids), identity_factors(donors)
    return {k: (f[k] if k in COLOUR_FACTORS else g[k]) for k in f}
