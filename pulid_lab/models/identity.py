"""The ID embedding path, as in real pipelines: detect the face, align a 112x112 crop, embed it with an
insightface ``ArcFaceONNX`` (here: phi_cond exported to ONNX, loaded exactly as antelopev2's recognizer)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.adapter import VIEWS
from ..core.files import atomic_write
from ..core.imaging import align_faces, to_tensor, to_uint8
from ..world.data import as_image_batch
from . import checkpoints

ONNX_SIZE = 112


def export_recognizer_onnx(recognizer: nn.Module, path: Path) -> Path:
    """Export a FaceRecognizer so that ``insightface.model_zoo.get_model(path)`` returns an ``ArcFaceONNX``.

    The graph takes (N, 3, 112, 112) normalised RGB, as insightface feeds it, and resizes to 32x32 inside.
    The module must be in eval mode: the exporter traces BatchNorm in the mode of the module it is given.
    """
    path = Path(path)
    recognizer = recognizer.eval().cpu()
    dummy = torch.zeros(1, 3, ONNX_SIZE, ONNX_SIZE)

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(recognizer, (dummy,), str(tmp), input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    return atomic_write(path, write)


def load_insightface_recognizer(path: Path):
    """insightface's own loader; the returned object is an ``ArcFaceONNX``, as for antelopev2's glintr100."""
    from insightface.model_zoo import get_model
    model = get_model(str(path), providers=["CPUExecutionProvider"])
    if model is None or type(model).__name__ != "ArcFaceONNX":
        raise RuntimeError(f"insightface did not load {path} as an ArcFaceONNX recognizer (got {type(model).__name__})")
    return model


def crops_for_insightface(images_u8: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Aligned 112x112 crops as insightface wants them: BGR uint8 (what ``norm_crop`` would return)."""
    crops = align_faces(to_tensor(images_u8), torch.as_tensor(boxes, dtype=torch.float32), size=ONNX_SIZE)
    return [c[:, :, ::-1].copy() for c in to_uint8(crops)]


class FaceAnalysis:
    """detector + phi_cond through insightface: ``embed(images) -> (B, 512)`` ID embeddings.

    ``images``: a PIL image, a uint8 array (H, W, 3) or (B, H, W, 3), or a float tensor (B, 3, H, W) in [-1, 1].
    """

    def __init__(self, models_dir: Path | None = None, recognizer: str = "phi_cond"):
        self.models_dir = Path(models_dir) if models_dir is not None else checkpoints.default_models_dir()
        self.detector = checkpoints.load_model("detector", self.models_dir)
        self.recognizer = load_insightface_recognizer(checkpoints.verified_file(f"{recognizer}_onnx", self.models_dir))

    @torch.no_grad()
    def detect(self, images) -> np.ndarray:
        """Face boxes (B, 3) = centre x, centre y, half-height s in pixels."""
        images = as_image_batch(images)
        return self.detector(to_tensor(images)).numpy()

    def embed(self, images, boxes: np.ndarray | None = None) -> np.ndarray:
        images = as_image_batch(images)
        boxes = self.detect(images) if boxes is None else boxes
        crops = crops_for_insightface(images, boxes)
        out = [self.recognizer.get_feat(crops[i:i + 256]) for i in range(0, len(crops), 256)]
        return np.concatenate(out)


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
