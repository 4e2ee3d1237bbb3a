"""phi of L_id on the real tier: insightface's ArcFace recognizer (antelopev2 ``glintr100.onnx``) as a
differentiable torch module.

    L_id = 1 - cos(phi(C_id), phi(x_0))        phi: image (B, 3, H, W) -> embedding (B, D)

insightface runs its recognizer in onnxruntime, which gives no gradient. Here:

- ``convert_recognizer(onnx_path)``: the ONNX graph run by torch functions (``OnnxGraph``: our converter of the
  few ops ArcFace ResNets use; frozen, but gradients flow to its input);
- ``FaceEmbedder(recognizer, detector)``: the pipeline of insightface's ``FaceAnalysis.get`` (detect -> 5
  keypoints -> similarity transform to the ArcFace template -> 112x112 crop -> normalise -> embed), made
  differentiable in the pixels: only the keypoints (detector, no gradient) are constants; the warp is
  ``affine_grid`` + ``grid_sample`` (bilinear, as ``cv2.warpAffine``);
- ``load_face_embedder(root)``: both from an antelopev2 pack folder.

``FaceEmbedder`` fits ``real.train``'s ``face_recognizer``: decoded images (B, 3, H, W), RGB in [-1, 1] in,
embeddings (B, D) out (raw, as ``ArcFaceONNX.get_feat``: not L2-normalised). Agreement with insightface is
checked in tests/test_real_recognizer.py (tiny stand-ins: the real antelopev2 weights are never loaded there).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .eva_input import similarity_lstsq
from .pipeline import RECOGNIZER_FILES, load_face_analysis

ARCFACE_SIZE = 112  # side of the aligned crop the ArcFace ResNets take
# insightface's arcface_dst: eyes, nose tip, mouth corners (x, y) in the 112x112 crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])
FALLBACK_BOX = 0.5  # no face found: the central square of side 0.5 * min(H, W), resized to 112x112


# ---------------------------------------------------------------------------------------------------------------
# ONNX -> torch
# ---------------------------------------------------------------------------------------------------------------

def _conv(a, x, w, b=None):
    pads = a.get("pads", [0, 0, 0, 0])  # ONNX: (top, left, bottom, right)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("Conv with auto_pad is not supported; re-export the model with explicit pads")
    if pads[:2] != pads[2:]:
        x, pads = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), [0, 0, 0, 0]
    return F.conv2d(x, w, b, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), tuple(a.get("dilations", [1, 1])),
                    a.get("group", 1))


def _gemm(a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)  # Y = alpha A'B' + beta C
    return y if c is None else y + a.get("beta", 1.0) * c


def _pool(kind):
    def pool(a, x):
        k, s, p = a["kernel_shape"], a.get("strides", a["kernel_shape"]), a.get("pads", [0, 0, 0, 0])
        if p[:2] != p[2:]:
            raise ValueError(f"{kind} with asymmetric pads is not supported")
        if kind == "max":
            return F.max_pool2d(x, k, s, p[:2], ceil_mode=bool(a.get("ceil_mode", 0)))
        return F.avg_pool2d(x, k, s, p[:2], ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return pool


def _reshape(a, x, shape):
    dims = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]  # 0: keep that dimension
    return x.reshape(dims)


def _unsqueeze(a, x, axes=None):
    for ax in sorted((axes.tolist() if axes is not None else a["axes"])):
        x = x.unsqueeze(ax)
    return x


# the ops of insightface's ArcFace ResNets (Conv, BatchNormalization, PRelu, Add, Flatten, Gemm) and the few more that
# ONNX exporters emit around them; each maps (attributes, *inputs) -> output
ONNX_OPS = {
    "Conv": _conv,
    "BatchNormalization": lambda a, x, g, b, m, v: F.batch_norm(x, m, v, g, b, False, 0.0, a.get("epsilon", 1e-5)),
    "PRelu": lambda a, x, slope: torch.where(x >= 0, x, x * slope),
    "Relu": lambda a, x: F.relu(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Flatten": lambda a, x: x.reshape(int(np.prod(x.shape[:a.get("axis", 1)])), -1),
    "Gemm": _gemm,
    "MatMul": lambda a, x, y: x @ y,
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "GlobalAveragePool": lambda a, x: x.mean((2, 3), keepdim=True),
    "Reshape": _reshape,
    "Transpose": lambda a, x: x.permute(*a["perm"]),
    "Identity": lambda a, x: x,
    "Dropout": lambda a, x, *rest: x,
    "Constant": lambda a: torch.from_numpy(np.array(__import__("onnx").numpy_helper.to_array(a["value"]))),
    "Shape": lambda a, x: torch.tensor(x.shape),
    "Gather": lambda a, x, i: x.index_select(a.get("axis", 0), i.reshape(-1).long()).reshape(
        *x.shape[:a.get("axis", 0)], *i.shape, *x.shape[a.get("axis", 0) + 1:]),
    "Unsqueeze": _unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, a["axis"]),
}


class OnnxGraph(nn.Module):
    """An ONNX graph run node by node with torch functions (``ONNX_OPS``): its initializers become buffers, so
    ``.to(device, dtype)`` moves it and gradients flow to its input. Only what ArcFace recognizers need is
    supported; any other op is a ``ValueError`` naming it, at load time."""

    def __init__(self, model):
        super().__init__()
        from onnx import helper, numpy_helper
        graph = model.graph
        self._buffers_of = {}  # ONNX tensor name -> buffer name
        for i, t in enumerate(graph.initializer):
            self.register_buffer(f"t{i}", torch.from_numpy(numpy_helper.to_array(t).copy()))
            self._buffers_of[t.name] = f"t{i}"
        inputs = [i.name for i in graph.input if i.name not in self._buffers_of]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError(f"expected one image input and one output, got inputs {inputs} and "
                             f"{len(graph.output)} outputs")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.nodes = [(n.op_type, list(n.input), list(n.output), {a.name: helper.get_attribute_value(a)
                                                                 for a in n.attribute}) for n in graph.node]
        unknown = sorted({op for op, *_ in self.nodes} - set(ONNX_OPS))
        if unknown:
            raise ValueError(f"ONNX ops {unknown} are not supported by pulid_lab.real.recognizer.OnnxGraph "
                             f"(supported: {', '.join(sorted(ONNX_OPS))})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {name: getattr(self, buf) for name, buf in self._buffers_of.items()}
        values[self.input_name] = x
        for op, ins, outs, attrs in self.nodes:
            out = ONNX_OPS[op](attrs, *[values[i] if i else None for i in ins])
            values[outs[0]] = out
        return values[self.output_name]


def arcface_normalisation(model) -> tuple[float, float]:
    """(input_mean, input_std) as insightface's ``ArcFaceONNX`` picks them: Sub and Mul among the first 8 nodes
    -> an mxnet model that normalises inside (0, 1); else 127.5, 127.5 (glintr100, w600k_r50)."""
    names = [n.name for n in model.graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


def convert_recognizer(onnx_path: str | Path) -> nn.Module:
    """An insightface recognizer ONNX (ArcFace ResNet, input (B, 3, 112, 112)) as a frozen torch module.

    Returns an ``OnnxGraph`` (no parameters: the weights are buffers, so nothing trains; gradients reach its
    input), with ``input_mean`` / ``input_std`` attributes: the normalisation ``ArcFaceONNX`` applies
    to its RGB input in [0, 255] (``arcface_normalisation``)."""
    import onnx
    path = Path(onnx_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recognizer ONNX {path} not found; expected an insightface recognition model "
                                f"(e.g. {', '.join(RECOGNIZER_FILES)} of the antelopev2 pack)")
    model = onnx.load(str(path))
    module = OnnxGraph(model).eval().requires_grad_(False)
    module.input_mean, module.input_std = arcface_normalisation(model)
    return module


# ---------------------------------------------------------------------------------------------------------------
# alignment: 5 keypoints -> 2x3 pixel matrix -> affine_grid's theta
# ---------------------------------------------------------------------------------------------------------------

def _detector(detector):
    """insightface's SCRFD (a ``FaceAnalysis``'s ``det_model``) or anything with its ``detect`` API."""
    det = getattr(detector, "det_model", detector)
    if not callable(getattr(det, "detect", None)):
        raise TypeError(f"{type(detector).__name__} is not a face detector: expected a FaceAnalysis or an object "
                        f"with insightface's detect(img, max_num=0, metric='default') -> (bboxes, kpss)")
    return det


def largest_face_keypoints(detector, img_bgr: np.ndarray) -> np.ndarray | None:
    """5 keypoints (5, 2) px of the largest face box (as ``reference_face``) in a uint8 BGR image; None if none."""
    bboxes, kpss = detector.detect(img_bgr, max_num=0, metric="default")  # (n, 5) x0 y0 x1 y1 score, (n, 5, 2)
    if bboxes is None or len(bboxes) == 0 or kpss is None:
        return None
    area = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
    return np.asarray(kpss[int(np.argmax(area))], np.float64)


def keypoints_matrix(kps: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """2x3 similarity (image px -> crop px) taking ``kps`` (5, 2) onto the ArcFace template: the matrix of
    insightface's ``face_align.estimate_norm`` / ``norm_crop`` (for sizes that are multiples of 112)."""
    return similarity_lstsq(np.asarray(kps, np.float64), ARCFACE_TEMPLATE * size / ARCFACE_SIZE)


def central_box_matrix(h: int, w: int, frac: float = FALLBACK_BOX, size: int = ARCFACE_SIZE) -> np.ndarray:
    """2x3 matrix (pixel -> crop pixel) of the central square of side ``frac * min(h, w)`` onto the whole crop."""
    side = frac * min(h, w)
    s = size / side  # crop px per image px
    x0, y0 = (w - side) / 2, (h - side) / 2  # top-left corner of the box (pixel edges)
    # pixel centres sit at integer + 0.5 in edge coordinates: u + 0.5 = s (x + 0.5 - x0)
    return np.array([[s, 0, s * (0.5 - x0) - 0.5], [0, s, s * (0.5 - y0) - 0.5]])


def pixel_to_theta(m: np.ndarray, h: int, w: int, size: int = ARCFACE_SIZE) -> np.ndarray:
    """cv2's 2x3 matrix M (image px -> crop px, pixel centres at integers) -> affine_grid's theta (crop
    normalised -> image normalised), for align_corners=False: normalised -1 / +1 are the outer pixel *edges*,
    so pixel x <-> (2x + 1) / W - 1, the same centre convention as cv2."""
    m3 = np.vstack([m, [0, 0, 1]])  # (3, 3) image px -> crop px
    crop_px = np.array([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])  # norm -> px
    img_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])  # px -> norm
    return (img_norm @ np.linalg.inv(m3) @ crop_px)[:2]  # (2, 3): crop norm -> image norm


def to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) RGB in [-1, 1] -> (H, W, 3) uint8 BGR, what insightface's detector takes."""
    rgb = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(1, 2, 0).cpu().numpy()[:, :, ::-1])


def warp(pixels: torch.Tensor, theta: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Differentiable cv2.warpAffine: (B, 3, H, W) -> (B, 3, size, size), bilinear, zeros outside (cv2's
    borderValue 0). float32 throughout: the grid's coordinates need it at 1024 px."""
    grid = F.affine_grid(theta.float(), [len(pixels), 3, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# phi: decoded images -> ArcFace embeddings
# ---------------------------------------------------------------------------------------------------------------

def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating weight (float32 if none)."""
    ts = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return ts[0].dtype if ts else torch.float32


class FaceEmbedder(nn.Module):
    """phi of L_id: images (B, 3, H, W), RGB in [-1, 1] (differentiable) -> ArcFace embeddings (B, D).

    Per image, without gradient: uint8 BGR -> ``detector`` -> 5 keypoints of the largest face -> similarity
    matrix to the ArcFace template. Then, differentiably: bilinear warp to 112x112 (zeros outside = black, as
    cv2) -> ``(pixel - input_mean) / input_std`` in RGB (``ArcFaceONNX.get_feat``: blobFromImages with
    swapRB=True on a BGR crop feeds RGB) -> ``recognizer``. The pixels are not clamped: values outside
    [-1, 1] (VAE overshoot) keep their gradient, where insightface would see them clipped.

    No face in an image: the central square of side ``fallback_box * min(H, W)`` is used instead, counted in
    ``self.misses`` (``self.seen`` counts all images), with a warning the first time.
    """

    def __init__(self, recognizer: nn.Module, detector, fallback_box: float = FALLBACK_BOX,
                 input_mean: float | None = None, input_std: float | None = None, size: int = ARCFACE_SIZE):
        super().__init__()
        self.recognizer = recognizer.eval().requires_grad_(False)
        self._det = {"detector": _detector(detector)}  # onnxruntime, outside the module tree
        self.fallback_box, self.size = fallback_box, size
        self.input_mean = float(input_mean if input_mean is not None else getattr(recognizer, "input_mean", 127.5))
        self.input_std = float(input_std if input_std is not None else getattr(recognizer, "input_std", 127.5))
        self.misses, self.seen = 0, 0

    @property
    def detector(self):
        return self._det["detector"]

    def train(self, mode: bool = True):
        super().train(mode)
        self.recognizer.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    @torch.no_grad()
    def matrices(self, images: torch.Tensor) -> np.ndarray:
        """(B, 2, 3) pixel matrices (image px -> crop px), one per image; counts misses."""
        h, w = images.shape[-2:]
        out = []
        for img in images:
            kps = largest_face_keypoints(self.detector, to_bgr_uint8(img))
            if kps is None:
                self._miss(h, w)
                out.append(central_box_matrix(h, w, self.fallback_box, self.size))
            else:
                out.append(keypoints_matrix(kps, self.size))
        self.seen += len(images)
        return np.stack(out)

    def _miss(self, h, w):
        if self.misses == 0:
            warnings.warn(f"FaceEmbedder: no face detected in a {w}x{h} image; using the central box of side "
                          f"{self.fallback_box} * min(H, W) (counted in .misses)", stacklevel=3)
        self.misses += 1

    def crops(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> aligned crops (B, 3, 112, 112), RGB pixel values (0..255 scale)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        theta = np.stack([pixel_to_theta(m, h, w, self.size) for m in self.matrices(images)])  # (B, 2, 3)
        pixels = (images.float() + 1) * 127.5  # [-1, 1] -> [0, 255]: pad with black, as cv2's borderValue 0
        return warp(pixels, torch.as_tensor(theta, dtype=torch.float32, device=images.device), self.size)

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Aligned RGB crops (B, 3, 112, 112), 0..255 -> embeddings (B, D), as ``ArcFaceONNX.get_feat``."""
        blob = (crops - self.input_mean) / self.input_std
        return self.recognizer(blob.to(_float_dtype(self.recognizer)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_crops(self.crops(images))  # (B, D)


def load_face_embedder(antelopev2_root: str | Path, name: str = "antelopev2", det_size=(640, 640),
                       fallback_box: float = FALLBACK_BOX) -> FaceEmbedder:
    """``FaceEmbedder`` from an insightface pack folder ``root/models/<name>`` (``load_face_analysis``: checked,
    nothing downloaded): its detector and its recognizer (``glintr100.onnx`` for antelopev2) converted to torch."""
    app = load_face_analysis(antelopev2_root, name=name, det_size=det_size)
    folder = Path(antelopev2_root).expanduser() / "models" / name
    path = folder / RECOGNIZER_FILES[0]
    rec = app.models.get("recognition")
    if not path.is_file() and rec is not None:
        path = Path(rec.model_file)  # another recognizer file (w600k_r50.onnx, ...): the one insightface uses
    return FaceEmbedder(convert_recognizer(path), app, fallback_box=fallback_box)
