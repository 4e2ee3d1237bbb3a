"""Could the mini world refuse a reference without a face? Distance from face space (eigenfaces) as the check.

    .venv/bin/python scripts/face_space_check.py      # ~40 s on 2 cores; prints residuals per image kind

Eigenfaces of 2,000 training renders' aligned crops (grey, standardised); a crop's residual = the share of its
energy outside the top k eigenfaces. Faces: 400 renders of 25 validation identities. Faceless kinds: a render with
the head painted over, flat colour, noise, stripes, checkerboards, smooth gradients, a blurred render, a render with
its 8x8 blocks shuffled, an upside-down render. A usable check needs faces' residuals below every faceless kind's.
Result (docs/results.md, 2026-12-04): it is not (gradients and painted-over heads sit inside the faces' range).
"""
import numpy as np
import torch
import torch.nn.functional as F

from pulid_lab.core.imaging import align_faces, to_tensor
from pulid_lab.models import checkpoints
from pulid_lab.world import toyfaces as world
from pulid_lab.world.data import render_bank

torch.set_num_threads(1)
det = checkpoints.load_model("detector")
def feats(images_u8, size=24):
    x = to_tensor(images_u8)
    with torch.no_grad():
        boxes = det(x)
        c = align_faces(x, boxes, size=size)
    g = c.mean(1).flatten(1)  # grey (B, size*size)
    std = g.std(1, keepdim=True)
    z = (g - g.mean(1, keepdim=True)) / std.clamp_min(1e-6)
    return z.numpy(), std.squeeze(1).numpy()
train = render_bank(world.TRAIN_IDS[:1000], 2, seed=0, progress=False)
ztr, _ = feats(train.images)
mu = ztr.mean(0)
U, S, Vt = np.linalg.svd(ztr - mu, full_matrices=False)
val = render_bank(world.HELDOUT_IDS[150:], 8, seed=0, progress=False)
rng = np.random.default_rng(0)
n = 200
ims = val.images[:n]
bg = ims[:, 0, 0, :]
def paint(ims, boxes):
    out = ims.copy()
    for i, (cx, cy, s) in enumerate(boxes):
        y0, y1, x0, x1 = int(cy - 1.6*s), int(cy + 1.6*s), int(cx - 1.3*s), int(cx + 1.3*s)
        out[i, max(y0,0):y1, max(x0,0):x1] = out[i, 0, 0]
    return out
yy, xx = np.mgrid[:32, :32]
kinds = {
 "painted": paint(ims, val.boxes[:n]),
 "uniform": np.broadcast_to(bg[:, None, None, :], ims.shape).copy(),
 "noise": rng.integers(0, 256, ims.shape).astype(np.uint8),
 "stripes": np.stack([((np.sin(xx * f + yy * g) > 0)[..., None] * rng.integers(0, 256, 3) + (np.sin(xx*f+yy*g) <= 0)[..., None] * rng.integers(0, 256, 3)) for f, g in rng.uniform(0.2, 1.5, (n, 2))]).astype(np.uint8),
 "checker": np.stack([(((xx // k + yy // k) % 2)[..., None] * 200 + 30).repeat(3, -1) for k in rng.integers(2, 8, n)]).astype(np.uint8),
 "gradient": np.stack([np.clip(((xx * a + yy * b)[..., None] * rng.uniform(-8, 8, 3) + 128), 0, 255) for a, b in rng.uniform(-1, 1, (n, 2))]).astype(np.uint8),
 "blur": F.avg_pool2d(torch.tensor(ims).permute(0,3,1,2).float(), 5, 1, 2, count_include_pad=False).permute(0,2,3,1).round().byte().numpy(),
 "shuffled4x4": np.stack([im.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 8, 8, 3)[rng.permutation(16)].reshape(4, 4, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(32, 32, 3) for im in ims]),
 "upside_down": ims[:, ::-1].copy(),
}
def score(images, k):
    z, std = feats(images)
    d = z - mu
    p = d @ Vt[:k].T
    res = ((d ** 2).sum(1) - (p ** 2).sum(1)) / (d ** 2).sum(1).clip(1e-9)
    res = np.where(std < 0.02, 1.0, res)
    return res
faces_all = val.images
for k in (8, 16, 32, 64):
    f = score(faces_all, k)
    print(f"k={k}: faces (n={len(f)}) residual median {np.median(f):.3f} p99 {np.percentile(f, 99):.3f} max {f.max():.3f}")
    for name, x in kinds.items():
        r = score(x, k)
        print(f"   {name:12s} min {r.min():.3f} p1 {np.percentile(r, 1):.3f} median {np.median(r):.3f}")
