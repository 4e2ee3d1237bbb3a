"""Rendered data: cached banks of renders, the torch Dataset, image conversion, face alignment."""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..core.files import write_npz
from ..core.imaging import to_tensor, to_uint8
from . import toyfaces as world
from . import vocab

WORLD_VERSION = hashlib.sha256(inspect.getsource(world).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("PULID_LAB_CACHE", Path.home() / ".cache" / "pulid_lab"))


@dataclass
class Bank:
    """A batch of renders with everything the renderer knows about them."""
    images: np.ndarray  # (N, 32, 32, 3) uint8
    ids: np.ndarray  # (N,) identity ids
    labels: dict[str, np.ndarray]  # attribute -> (N,) value index
    boxes: np.ndarray  # (N, 3) face centre x, centre y, half-height s
    seeds: np.ndarray  # (N,) render seeds

    def __len__(self):
        return len(self.ids)

    def subset(self, idx) -> "Bank":
        return Bank(self.images[idx], self.ids[idx], {k: v[idx] for k, v in self.labels.items()},
                    self.boxes[idx], self.seeds[idx])


def _render_chunk(args):
    ids, labels, seeds = args
    r = world.render(ids, labels, seeds)
    return r.images, r.boxes


def render_bank(ids, variants: int, seed: int, old_prob: float = 0.15, cache: bool = True,
                progress: bool = True, workers: int = 1) -> Bank:
    """``variants`` renders of every identity in ``ids`` with random attributes; cached on disk by content.
    ``workers`` > 1 renders its chunks in that many processes (the same bank: each face has its own seed)."""
    ids = np.asarray(ids, np.int64)
    key = hashlib.sha256(f"{WORLD_VERSION}|{ids.tobytes().hex()}|{variants}|{seed}|{old_prob}".encode()).hexdigest()[:16]
    path = cache_dir() / f"bank-{key}.npz"
    if cache and path.exists():
        z = np.load(path)
        return Bank(z["images"], z["ids"], {k: z[f"label_{k}"] for k in vocab.ATTRIBUTES}, z["boxes"], z["seeds"])
    rng = np.random.default_rng((world.WORLD_SEED, 3, seed))
    all_ids = np.repeat(ids, variants)
    labels = world.sample_attributes(rng, len(all_ids), old_prob)
    seeds = rng.integers(0, 2**62, size=len(all_ids))
    chunk = 512
    chunks = [(all_ids[lo:lo + chunk], {k: v[lo:lo + chunk] for k, v in labels.items()}, seeds[lo:lo + chunk])
              for lo in range(0, len(all_ids), chunk)]
    bar = dict(total=len(chunks), desc=f"render {len(all_ids)} faces", disable=not progress, leave=False)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(tqdm(pool.map(_render_chunk, chunks), **bar))
    else:
        rendered = [_render_chunk(c) for c in tqdm(chunks, **bar)]
    images, boxes = [r[0] for r in rendered], [r[1] for r in rendered]
    bank = Bank(np.concatenate(images), all_ids, labels, np.concatenate(boxes), seeds)
    if cache:
        write_npz(path, images=bank.images, ids=bank.ids, boxes=bank.boxes, seeds=bank.seeds,
                  **{f"label_{k}": v for k, v in labels.items()})
    return bank


def as_image_batch(x, name: str = "reference") -> np.ndarray:
    """Accept a PIL image, a (H, W, 3) / (B, H, W, 3) uint8 array or a (B, 3, H, W) float tensor in [-1, 1];
    return uint8 (B, 32, 32, 3). Anything else is a clear error."""
    try:
        from PIL import Image
        if isinstance(x, Image.Image):
            x = np.asarray(x.convert("RGB"))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, torch.Tensor):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name}: expected a float tensor (B, 3, 32, 32) in [-1, 1], got shape {tuple(x.shape)}")
        x = to_uint8(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected an image (PIL image, uint8 array (H, W, 3) or tensor (B, 3, H, W)), got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1:3] != (world.SIZE, world.SIZE):
        raise ValueError(f"{name}: expected RGB images of {world.SIZE}x{world.SIZE} pixels, shape (B, 32, 32, 3); "
                         f"got shape {x.shape}. ToyFaces images are 32x32 RGB (pulid_lab.world.toyfaces.render makes them).")
    if x.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels 0..255, got dtype {x.dtype}")
    return x


class ToyFacesDataset(Dataset):
    """(image (3, 32, 32) in [-1, 1], caption, identity id, attributes) over a cached bank of renders.

    Captions are incomplete on purpose: each non-ID attribute (and the age edit) is mentioned with
    probability ``1 - caption_dropout``, a fixed draw per item (docs/world.md).
    """

    def __init__(self, split: str = "train", variants: int = 8, seed: int = 0, caption_dropout: float = 0.5,
                 ids=None, progress: bool = True):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if ids is None:
            ids = world.TRAIN_IDS if split == "train" else world.HELDOUT_IDS
        self.bank = render_bank(ids, variants, seed, progress=progress)
        self.images = to_tensor(self.bank.images)
        self.caption_dropout = caption_dropout
        rng = np.random.default_rng((world.WORLD_SEED, 4, seed))
        self.mention = rng.random((len(self.bank), len(vocab.ATTRIBUTES))) >= caption_dropout

    def __len__(self):
        return len(self.bank)

    def attributes(self, i: int) -> dict[str, str]:
        return {a: vocab.ATTRIBUTES[a][int(self.bank.labels[a][i])] for a in vocab.ATTRIBUTES}

    def caption(self, i: int) -> str:
        attrs = self.attributes(i)
        return vocab.caption({a: (v if m else None) for (a, v), m in zip(attrs.items(), self.mention[i])})

    def __getitem__(self, i):
        return self.images[i], self.caption(i), int(self.bank.ids[i]), self.attributes(i)
