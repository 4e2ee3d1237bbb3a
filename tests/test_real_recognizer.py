"""phi of L_id on the real tier (pulid_lab.real.recognizer): insightface's ONNX recognizer converted to torch
(our OnnxGraph) behind a differentiable ArcFace alignment, checked against insightface itself on the tiny antelopev2
stand-ins of pulid_lab.real.tiny (no real weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pulid_lab.real import pipeline as real
from pulid_lab.real import tiny as real_tiny
from pulid_lab.real.tiny import FACES

pytest.importorskip("insightface")
from pulid_lab.real import recognizer as R  # noqa: E402

SIZE = 128  # side of the drawn test images
PACKS = {"none": (), "one": FACES[1:], "two": FACES}  # what the tiny detector reports


class TinyIResNet(nn.Module):
    """The op set of insightface's IResNet (glintr100.onnx) in miniature: Conv, BatchNormalization (2-d, and 1-d
    on the features), PRelu, Add, Flatten, Gemm; BatchNorm statistics randomised so that none is an identity."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))  # 56
        self.block = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                   nn.PReLU(16), nn.Conv2d(16, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))  # 28
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 7 * 7, dim)
        self.features = nn.BatchNorm1d(dim)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.normal_(m.bias, 0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = self.bn2(self.block(x) + self.down(x))
        return self.features(self.fc(torch.flatten(F.avg_pool2d(x, 4), 1)))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """Two recognizer ONNX files: tiny.py's TinyRecognizer (the packs' glintr100.onnx) and a TinyIResNet."""
    tmp = tmp_path_factory.mktemp("rec")
    return {"tiny": real_tiny.export_onnx(real_tiny.TinyRecognizer(), tmp / "tiny.onnx", 112, dynamic=True),
            "iresnet": real_tiny.export_onnx(TinyIResNet(), tmp / "iresnet.onnx", 112, dynamic=True)}


@pytest.fixture(scope="module")
def packs(tmp_path_factory, onnx_files):
    """antelopev2-like folders: {(faces, recognizer): root}."""
    tmp = tmp_path_factory.mktemp("packs")
    return {(f, r): real_tiny.write_antelopev2(tmp / f"{f}_{r}", PACKS[f], recognizer=onnx_files[r])
            for f, r in (("one", "tiny"), ("one", "iresnet"), ("none", "tiny"), ("two", "iresnet"))}


def _tensor(img_rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> (1, 3, H, W) in [-1, 1], as decoded VAE output."""
    return torch.from_numpy(img_rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# (i) ONNX -> torch
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "iresnet"])
def test_converted_recognizer_matches_onnxruntime(onnx_files, which):
    """The converted module on aligned crops == ArcFaceONNX.get_feat (insightface's preprocessing + onnxruntime)."""
    import onnx
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils import face_align
    path = onnx_files[which]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if which == "iresnet":
        assert {"PRelu", "BatchNormalization", "Add", "Gemm"} <= ops, ops  # glintr100's op set is exercised
    rec = R.convert_recognizer(path)
    arc = ArcFaceONNX(str(path))
    assert (rec.input_mean, rec.input_std) == (arc.input_mean, arc.input_std) == (127.5, 127.5)
    assert not rec.training and not any(p.requires_grad for p in rec.parameters())
    crops_bgr = []
    for seed in range(3):  # aligned crops of drawn faces, as FaceAnalysis makes them
        img = real_tiny.draw_faces(SIZE, seed=seed)
        kps = real_tiny.face_keypoints(FACES[1], SIZE)
        crops_bgr.append(face_align.norm_crop(np.ascontiguousarray(img[:, :, ::-1]), kps, image_size=112))
    want = arc.get_feat(crops_bgr)  # (3, D)
    rgb = torch.from_numpy(np.stack(crops_bgr)[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        got = rec((rgb - rec.input_mean) / rec.input_std).numpy()
    cos = _cos(got, want)
    assert got.shape == want.shape and (1 - cos < 1e-6).all(), cos  # measured: 1 - cos < 1e-13, |diff| < 3e-7


# ---------------------------------------------------------------------------------------------------------------
# (ii) the whole embedder == insightface's FaceAnalysis.get
# ---------------------------------------------------------------------------------------------------------------

def test_keypoints_matrix_is_insightfaces_estimate_norm():
    import warnings

    from insightface.utils import face_align
    np.testing.assert_allclose(R.ARCFACE_TEMPLATE, face_align.arcface_dst, atol=1e-4)
    rng = np.random.default_rng(0)
    for face in FACES:
        kps = real_tiny.face_keypoints(face, SIZE) + rng.normal(0, 2, (5, 2)).astype(np.float32)  # not exact
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # skimage's SimilarityTransform.estimate
            want = face_align.estimate_norm(kps, image_size=112)
        np.testing.assert_allclose(R.keypoints_matrix(kps), want, atol=1e-4)


def test_warp_matches_cv2_warp_affine():
    """pixel_to_theta + affine_grid/grid_sample (align_corners=False) == cv2.warpAffine with the same 2x3 matrix,
    on a non-square image (the normalised coordinates of H and W differ)."""
    import cv2
    h, w = 60, 90
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([np.sin(xx / 7) + np.cos(yy / 5), xx / w, yy / h], -1).astype(np.float32)  # smooth (H, W, 3)
    a = 1.3 * np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    m = np.hstack([a, [[-20.0], [5.0]]])  # image px -> crop px
    want = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0.0)
    theta = torch.as_tensor(R.pixel_to_theta(m, h, w), dtype=torch.float32)[None]
    got = R.warp(torch.from_numpy(img).permute(2, 0, 1)[None], theta)[0].permute(1, 2, 0).numpy()
    inside = cv2.warpAffine(np.ones((h, w), np.float32), m, (112, 112), borderValue=0.0) == 1  # away from borders
    assert inside.mean() > 0.3
    assert np.abs(got - want)[inside].max() < 0.02  # cv2 quantises coordinates to 1/32 px


@pytest.mark.parametrize("which", ["tiny", "iresnet"])
def test_embedder_matches_face_analysis(packs, which):
    """FaceEmbedder on a drawn image (RGB, [-1, 1]) == FaceAnalysis.get's embedding of the same face (cv2
    norm_crop of the uint8 BGR image, then onnxruntime).

    Measured (draw_faces seeds 0-4, sides 128 / 256 / 1024): 1 - cos <= 4e-7 (cos >= 0.9999996) for both
    recognizers, crops within 0.18 / 255 of cv2's on average (cv2's fixed-point bilinear and uint8 rounding).
    A cos >= 0.99 bound would not see a misalignment: the tiny recognizers give 1 - cos ~ 3e-3 for keypoints
    off by 1 px and ~ 8e-3 for 2 px, hence the bound below and that control."""
    from insightface.utils import face_align
    root = packs[("one", which)]
    app = real.load_face_analysis(root)
    rec = app.models["recognition"]
    phi = R.load_face_embedder(root)
    for seed in range(2):
        img = real_tiny.draw_faces(SIZE, seed=seed)
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        (face,) = app.get(bgr)
        with torch.no_grad():
            x = _tensor(img)
            crop = phi.crops(x)[0].permute(1, 2, 0).numpy()  # RGB, 0..255
            emb = phi(x).numpy()
        want_crop = face_align.norm_crop(bgr, face.kps, image_size=112)[:, :, ::-1].astype(np.float32)
        assert np.abs(crop - want_crop).mean() < 0.5  # measured 0.18
        err = 1 - _cos(emb, face.embedding[None])[0]
        shifted = rec.get_feat(face_align.norm_crop(bgr, face.kps + [1.0, 0.0], image_size=112))  # control
        err_1px = 1 - _cos(shifted, face.embedding[None])[0]
        assert emb.shape == (1, face.embedding.size)
        assert err < 1e-5 and err < 0.01 * err_1px, (err, err_1px)
    assert phi.misses == 0 and phi.seen == 4  # crops() and forward() detect each


def test_largest_face_is_used(packs):
    """Two faces: the largest box, as reference_face and the official code."""
    root = packs[("two", "iresnet")]
    app, phi = real.load_face_analysis(root), R.load_face_embedder(root)
    img = real_tiny.draw_faces(SIZE, faces=FACES)
    faces = app.get(np.ascontiguousarray(img[:, :, ::-1]))
    largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    with torch.no_grad():
        got = phi(_tensor(img)).numpy()
    assert len(faces) == 2 and _cos(got, largest.embedding[None])[0] >= 0.99


# ---------------------------------------------------------------------------------------------------------------
# (iii) gradients, (iv) no face, (v) errors
# ---------------------------------------------------------------------------------------------------------------

def test_gradients_reach_the_face_pixels_only(packs):
    from pulid_lab.core import losses
    phi = R.load_face_embedder(packs[("one", "iresnet")])
    phi.train()
    assert not phi.recognizer.training  # frozen BatchNorm statistics
    assert not any(p.requires_grad for p in phi.parameters())
    img = real_tiny.draw_faces(SIZE, seed=3)
    ref = phi(_tensor(real_tiny.draw_faces(SIZE, seed=4))).detach()
    x = _tensor(img).requires_grad_(True)
    loss = losses.id_loss(phi, ref, x)  # L_id = 1 - cos(phi(ref), phi(x)), as real.train calls it
    loss.backward()
    g = x.grad[0].abs().sum(0)  # (H, W)
    cx, cy, half = (np.array(FACES[1]) * 8 * SIZE / real_tiny.DETECTOR_SIZE).astype(int)
    box = g[cy - half:cy + half, cx - half:cx + half]
    assert torch.isfinite(x.grad).all() and loss.item() > 0
    assert (box > 0).float().mean() > 0.9, (box > 0).float().mean()
    assert (g[:SIZE // 8, :SIZE // 8] == 0).all()  # top-left corner: outside the crop's footprint


def test_no_face_falls_back_to_the_central_box(packs):
    import cv2
    phi = R.load_face_embedder(packs[("none", "tiny")])
    imgs = [real_tiny.draw_faces(SIZE, seed=s) for s in (0, 1)]
    x = torch.cat([_tensor(i) for i in imgs])
    with pytest.warns(UserWarning, match="no face detected"), torch.no_grad():
        crops = phi.crops(x)
    emb = phi(x)
    assert phi.misses == 4 and phi.seen == 4 and emb.shape == (2, 512)
    # the central square of side FALLBACK_BOX * 128 = 64 px, resized to 112x112 (cv2's resize: the same pixel
    # centres; it replicates the square's border where the warp reads the pixels next to it: skip the rim)
    lo, hi = SIZE // 4, 3 * SIZE // 4
    want = cv2.resize(imgs[0][lo:hi, lo:hi].astype(np.float32), (112, 112), interpolation=cv2.INTER_LINEAR)
    assert np.abs(crops[0].permute(1, 2, 0).numpy() - want)[1:-1, 1:-1].max() < 0.01


def test_missing_files_and_package_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]glintr100\.onnx"):
        R.convert_recognizer(tmp_path / "nowhere" / "glintr100.onnx")
    with pytest.raises(FileNotFoundError, match="antelopev2"):
        R.load_face_embedder(tmp_path)
    with pytest.raises(TypeError, match="not a face detector"):
        R.FaceEmbedder(nn.Identity(), object())
    onnx = real_tiny.export_onnx(real_tiny.TinyRecognizer(dim=8), tmp_path / "rec.onnx", 112, dynamic=True)
    import onnx as onnx_lib
    model = onnx_lib.load(str(onnx))
    model.graph.node[1].op_type = "Erf"  # an op no ArcFace uses
    with pytest.raises(ValueError, match=r"ONNX ops \['Erf'\] are not supported"):
        R.OnnxGraph(model)
