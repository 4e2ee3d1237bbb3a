"""What EVA02-CLIP sees in the official PuLID v1 ID condition: an aligned, face-parsed 512x512 crop.

The antelopev2 embedding comes from insightface on the original image; the EVA-CLIP half of the condition is
computed from a different picture, built in three steps:

1. ``align_face_512``: a similarity transform (rotation, uniform scale, translation) moves the face's 5 keypoints
   onto ``FFHQ_TEMPLATE_512`` — the FFHQ-style 512x512 face template — and the image is warped into a 512x512 crop;
2. a BiSeNet face parser (``load_face_parser``: facexlib's ``parsing_bisenet.pth``, 19 classes) labels every
   pixel of that crop;
3. ``parsed_face``: pixels labelled as one of ``BACKGROUND_LABELS`` (background, ears, earring, neck, necklace,
   cloth, hat) become white, every other pixel becomes the crop's grey level (luma), repeated on 3 channels.

The result (B, 3, 512, 512) in [0, 1] is what ``OpenClipFeatures`` receives (it resizes to 336 and normalises).
Without a parser, ``pipeline.id_condition`` falls back to insightface's unparsed 112x112 colour crop, which the
official weights never saw.

Nothing here downloads: ``load_face_parser`` reads a local file only.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ALIGNED_SIZE = 512
# the 5 keypoints (left eye, right eye, nose tip, left and right mouth corners), in pixels of a 512x512 crop
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)
# RGB fill of the crop where the transform reaches outside the source image: a neutral-ish grey, the constant
# that facexlib's face helper (and so the official pipeline) uses (it writes it in BGR order: 135, 133, 132)
BORDER_RGB = (132, 133, 135)

PARSER_FILE = "parsing_bisenet.pth"
PARSER_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
PARSER_HINT = f"facexlib's BiSeNet face-parsing weights {PARSER_FILE} from its GitHub release v0.2.0 ({PARSER_URL})"
PARSER_CLASSES = 19
# labels of the 19-class face parser that are not the face itself: they become white in the EVA input
BACKGROUND_LABELS = {0: "background", 7: "left ear", 8: "right ear", 9: "earring", 14: "neck", 15: "necklace",
                     16: "cloth", 18: "hat"}
# the parser's input normalisation (ImageNet statistics), applied to the RGB crop in [0, 1]
PARSER_MEAN = (0.485, 0.456, 0.406)
PARSER_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # grey = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)

FaceParser = Callable[[torch.Tensor], tuple]  # (B, 3, H, W) normalised -> (logits (B, 19, H, W), ...)


# ---------------------------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------------------------

def alignment_matrix(kps: np.ndarray, template: np.ndarray = FFHQ_TEMPLATE_512) -> np.ndarray:
    """The 2x3 similarity matrix (no shear, no reflection) that maps ``kps`` (5, 2) onto ``template`` (5, 2).

    Estimated with ``cv2.estimateAffinePartial2D`` and least-median-of-squares (LMEDS), as facexlib's face
    helper does; if that fails (degenerate keypoints), the closed-form least-squares similarity is used."""
    import cv2

    src = np.asarray(kps, np.float32).reshape(-1, 2)
    dst = np.asarray(template, np.float32).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"expected keypoints of the template's shape {dst.shape}, got {np.asarray(kps).shape}")
    if not np.isfinite(src).all():
        raise ValueError("keypoints contain non-finite values")
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if matrix is None or not np.isfinite(matrix).all():
        matrix = similarity_lstsq(src, dst)
    return np.asarray(matrix, np.float64)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 [sR | t] minimising sum_i |s R src_i + t - dst_i|^2 over scale s, rotation R, translation t
    (Umeyama 1991; what skimage's SimilarityTransform.estimate solves). src, dst: (N, 2). Also the recognizer's
    alignment (``recognizer.keypoints_matrix``)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d  # (N, 2) centred
    if a.var(0).sum() <= 1e-12:
        raise ValueError("degenerate keypoints: all of them lie on one point")
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))  # cross-covariance (2, 2)
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])  # no reflection
    r = u @ np.diag(d) @ vt  # (2, 2) rotation
    s = (sig * d).sum() / a.var(0).sum()  # scale
    return np.hstack([s * r, (mu_d - s * r @ mu_s)[:, None]])


def align_face_512(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """uint8 RGB image (H, W, 3) and the face's 5 keypoints (5, 2) in its pixel coordinates (left eye, right eye,
    nose, left mouth corner, right mouth corner, as insightface and facexlib order them) -> the aligned uint8
    (512, 512, 3) RGB crop: the keypoints land on ``FFHQ_TEMPLATE_512`` (as well as a similarity can place them).

    Bilinear warp (``cv2.warpAffine``). Border handling: where the crop reaches beyond the image, the pixels are
    the constant ``BORDER_RGB`` grey (facexlib's choice; no mirroring, no smearing of edge pixels). The parser
    usually labels that fill as background, so it turns white in ``parsed_face``.
    """
    import cv2

    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    matrix = alignment_matrix(kps)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


# ---------------------------------------------------------------------------------------------------------------
# face parsing
# ---------------------------------------------------------------------------------------------------------------

def _parser_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / PARSER_FILE if path.is_dir() else path


def load_face_parser(path: str | Path, device=None) -> torch.nn.Module:
    """facexlib's BiSeNet face parser (``facexlib.parsing.bisenet.BiSeNet(num_class=19)``) with the weights of a
    local file: ``path`` is ``parsing_bisenet.pth`` itself or a folder that holds it. Eval mode, frozen, on
    ``device`` (default: CUDA when available).

    Missing file -> ``FileNotFoundError`` naming it and where to get it (nothing is downloaded; facexlib's own
    loader would fetch it). facexlib not installed -> ``ImportError`` (``pip install facexlib``). Weights that do
    not fit the 19-class BiSeNet -> ``ValueError``.
    """
    file = _parser_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"face parser weights {file} not found; get {PARSER_HINT}. (Nothing is downloaded.)")
    try:
        from facexlib.parsing.bisenet import BiSeNet
    except ImportError as e:
        raise ImportError("the official EVA-CLIP input needs facexlib's BiSeNet face parser: `pip install facexlib`"
                          ) from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    model = BiSeNet(num_class=PARSER_CLASSES)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit facexlib's BiSeNet(num_class={PARSER_CLASSES}): {e}") from e
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval().requires_grad_(False).to(device)


def _as_batch(crops) -> torch.Tensor:
    """uint8 (H, W, 3) / (B, H, W, 3) arrays -> float (B, 3, H, W) in [0, 1]; float tensors (B, 3, H, W) / (3, H, W)
    in [0, 1] pass through."""
    if isinstance(crops, torch.Tensor) and crops.is_floating_point():
        x = crops[None] if crops.ndim == 3 else crops
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(crops.shape)}")
        return x.float()
    arr = crops.cpu().numpy() if isinstance(crops, torch.Tensor) else np.asarray(crops)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 crop(s) (H, W, 3) / (B, H, W, 3) or a float tensor (B, 3, H, W), "
                         f"got {arr.dtype} {arr.shape}")
    arr = arr[None] if arr.ndim == 3 else arr
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


def _device_dtype(module) -> tuple[torch.device | None, torch.dtype]:
    try:
        p = next(module.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return None, torch.float32


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W): the luma 0.299 R + 0.587 G + 0.114 B on all three channels."""
    grey = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]
    return grey.expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def parse_labels(crops, parser: FaceParser) -> torch.Tensor:
    """The parser's argmax labels (B, H, W) (int64) for ``crops`` (as ``parsed_face`` takes them)."""
    x = _as_batch(crops)
    device, dtype = _device_dtype(parser)
    x = x.to(device) if device is not None else x
    mean = torch.tensor(PARSER_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PARSER_STD, device=x.device).view(1, 3, 1, 1)
    out = parser(((x - mean) / std).to(dtype))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if logits.ndim != 4 or logits.shape[0] != x.shape[0] or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
        raise ValueError(f"the face parser returned logits {tuple(logits.shape)}; expected (B, classes, H, W) = "
                         f"({x.shape[0]}, {PARSER_CLASSES}, {x.shape[2]}, {x.shape[3]})")
    return logits.argmax(dim=1)


@torch.no_grad()
def parsed_face(crops, parser: FaceParser) -> torch.Tensor:
    """The official EVA-CLIP input: float (B, 3, H, W) in [0, 1], white (1.0) where the parser labels
    ``BACKGROUND_LABELS``, the crop's grey luma (``to_grey``) everywhere else.

    ``crops``: aligned uint8 RGB crop(s) (512, 512, 3) / (B, 512, 512, 3) (``align_face_512``), or a float tensor
    (B, 3, 512, 512) in [0, 1]. ``parser``: ``load_face_parser(...)`` or any callable with BiSeNet's call signature
    (normalised (B, 3, H, W) in -> a tuple whose [0] is the logits (B, 19, H, W)); it runs under ``no_grad`` on its
    own device, and the result lies there too.
    """
    labels = parse_labels(crops, parser)
    x = _as_batch(crops).to(labels.device)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        background |= labels == label
    return torch.where(background[:, None], torch.ones_like(x), to_grey(x))
