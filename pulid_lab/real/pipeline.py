"""The real tier (docs/real_tier.md): SDXL / SD1.5 from local weights, insightface antelopev2 from a local
folder, and the official PuLID v1 encoder shape — driven by the same processors and hooks as the mini world
(``pulid_lab.core.attention``).

Nothing here downloads: every loader checks its local files first and raises a ``FileNotFoundError`` that names
the expected path and where to get it. ``load_pipeline(..., allow_download=True)`` is the one opt-in.

What is tested offline (tests/test_real.py, notebook 06 without a GPU) uses tiny randomly-initialised models of the
same classes (``pulid_lab.real.tiny``); the real weights (SDXL, SDXL-Lightning, antelopev2, pulid_v1.bin, EVA02-CLIP)
have never been loaded by these tests.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from ..core.adapter import PuLIDAdapter
from ..core.attention import IDAttnSettings, id_kwargs
from .eva_input import FaceParser, align_face_512, parsed_face

SDXL_HINT = ("stabilityai/stable-diffusion-xl-base-1.0 from the Hugging Face hub "
             "(e.g. `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR`)")
SD15_HINT = ("an SD1.5 diffusers folder, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 from the Hugging Face hub "
             "(`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR`)")
LIGHTNING_HINT = ("ByteDance/SDXL-Lightning sdxl_lightning_4step_unet.safetensors from the Hugging Face hub "
                  "(`huggingface-cli download ByteDance/SDXL-Lightning sdxl_lightning_4step_unet.safetensors`)")
ANTELOPE_HINT = ("the antelopev2 model pack of insightface (e.g. the Hugging Face repo DIAMONIK7777/antelopev2, "
                 "which the official PuLID code uses); unpack it so that the .onnx files lie directly in that folder")
PULID_V1_HINT = ("pulid_v1.bin of the Hugging Face repo guozinan/PuLID "
                 "(`huggingface-cli download guozinan/PuLID pulid_v1.bin --local-dir DIR`)")
DETECTOR_FILES = ("scrfd_10g_bnkps.onnx",)
RECOGNIZER_FILES = ("glintr100.onnx",)


# ---------------------------------------------------------------------------------------------------------------
# diffusers pipeline
# ---------------------------------------------------------------------------------------------------------------

def _dtype_kwarg() -> str:
    """diffusers >= 0.36 takes ``dtype=`` (``torch_dtype`` is deprecated); older versions only ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
        return "dtype"
    except ImportError:
        return "torch_dtype"


def load_pipeline(base: str | Path, lightning_unet: str | Path | None = None, kind: str = "sdxl", device=None,
                  dtype=None, allow_download: bool = False):
    """SDXL (``kind='sdxl'``) or SD1.5 (``'sd15'``) pipeline from a local diffusers folder.

    ``lightning_unet``: a SDXL-Lightning UNet safetensors file (e.g. ``sdxl_lightning_4step_unet.safetensors``)
    whose weights replace the base UNet's (strict ``load_state_dict``). The scheduler becomes DPM-Solver++ with
    ``timestep_spacing="trailing"``, as the official PuLID inference. ``dtype`` defaults to float16 on CUDA and
    float32 elsewhere. With ``allow_download=False`` (the default) nothing is fetched: ``local_files_only=True``.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"kind must be 'sdxl' or 'sd15', got {kind!r}")
    hint = SDXL_HINT if kind == "sdxl" else SD15_HINT
    base_path = Path(base).expanduser()
    if not allow_download:
        if not base_path.is_dir():
            raise FileNotFoundError(f"base model folder {base_path} not found; expected a diffusers pipeline folder "
                                    f"(with model_index.json): get {hint}")
        if not (base_path / "model_index.json").is_file():
            raise FileNotFoundError(f"{base_path / 'model_index.json'} not found: {base_path} is not a diffusers "
                                    f"pipeline folder; get {hint}")
    if lightning_unet is not None:
        lightning_unet = Path(lightning_unet).expanduser()
        if not lightning_unet.is_file():
            raise FileNotFoundError(f"Lightning UNet file {lightning_unet} not found; get {LIGHTNING_HINT}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    source = str(base_path) if base_path.is_dir() else str(base)
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(source, local_files_only=not allow_download, **{_dtype_kwarg(): dtype}, **extra)
    if lightning_unet is not None:
        _load_unet_weights(pipe.unet, lightning_unet, f"the UNet of {base} ({kind})")
        pipe.unet.to(dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    if hasattr(pipe, "watermark"):
        pipe.watermark = None  # as the official code
    return pipe.to(device)


def _load_unet_weights(unet, path: Path, what: str) -> None:
    from safetensors.torch import load_file
    try:
        unet.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit {what}: {e}") from e


def load_unet(base: str | Path, weights: str | Path | None = None, device=None, dtype=None):
    """One more UNet of the base pipeline's architecture (``base/unet``), frozen: with the base weights
    (``weights=None``) or with a few-step file such as SDXL-Lightning's ``sdxl_lightning_4step_unet.safetensors``.
    Training holds two UNets — L_diff on the base, the Lightning branch on the few-step one — and shares the VAE and
    text encoders (``with_unet``). Local files only."""
    from diffusers import UNet2DConditionModel

    base_path = Path(base).expanduser()
    if not (base_path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{base_path / 'unet' / 'config.json'} not found: {base_path} is not a diffusers "
                                f"pipeline folder; get {SDXL_HINT}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if weights is None:
        unet = UNet2DConditionModel.from_pretrained(str(base_path), subfolder="unet", local_files_only=True)
    else:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"Lightning UNet file {weights} not found; get {LIGHTNING_HINT}")
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(base_path / "unet")))
        _load_unet_weights(unet, weights, f"the UNet of {base_path}")
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def with_unet(pipe, unet):
    """A pipeline of ``pipe``'s class that shares every component of ``pipe`` (VAE, text encoders, tokenizers,
    scheduler) except the UNet: e.g. the base-UNet pipeline of training beside the Lightning one of generation,
    without loading the rest twice."""
    return type(pipe)(**{**pipe.components, "unet": unet})


DEMO_PROMPTS = ("portrait, color, cinematic", "a person as an astronaut, comic book style, pink background")


@torch.no_grad()
def generate(pipe, prompt: str, adapter=None, id_tokens: torch.Tensor | None = None,
             uncond_tokens: torch.Tensor | None = None, id_scale: float = 0.8, steps: int = 4,
             guidance_scale: float = 1.2, seed: int = 0, size: int | None = None):
    """One image (PIL) as the official PuLID inference: ``steps`` steps of the pipeline's scheduler (DPM-Solver++
    trailing after ``load_pipeline``), CFG ``guidance_scale`` 1.2, ``id_scale`` 0.8, noise from ``seed``.

    With ``adapter`` and ``id_tokens`` (1, N, D): with the ID; under CFG the unconditional half gets
    ``uncond_tokens`` (``adapter.uncond_tokens``: the encoder applied to zeros, as the official code). Without
    ``id_tokens``: the same call with the adapter installed at ``id_scale`` 0, which is the original model
    exactly — so the same ``seed`` gives the same noise with and without the ID. ``size``: image side (default:
    the UNet's sample size times the VAE scale factor, 1024 for SDXL)."""
    if id_tokens is not None and adapter is None:
        raise ValueError("id_tokens need the adapter that made them (adapter=...)")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    kwargs = None
    if id_tokens is not None:
        if cfg and uncond_tokens is None:
            raise ValueError(f"guidance_scale {guidance_scale} runs CFG: pass uncond_tokens "
                             f"(adapter.uncond_tokens(...)) for its unconditional half")
        tokens = torch.cat([uncond_tokens, id_tokens]) if cfg else id_tokens
        kwargs = id_kwargs(tokens, id_scale)
    elif adapter is not None:
        kwargs = id_kwargs(None, 0.0)
    installed = adapter.installed(pipe.unet) if adapter is not None else contextlib.nullcontext()
    with installed:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                    generator=torch.Generator(pipe.device).manual_seed(seed), cross_attention_kwargs=kwargs).images[0]


# ---------------------------------------------------------------------------------------------------------------
# insightface
# ---------------------------------------------------------------------------------------------------------------

def _check_model_pack(root: str | Path, name: str) -> Path:
    folder = Path(root).expanduser() / "models" / name
    expected = f"a detection ONNX (e.g. {', '.join(DETECTOR_FILES)}) and a recognition ONNX " \
               f"(e.g. {', '.join(RECOGNIZER_FILES)})"
    if not folder.is_dir():
        raise FileNotFoundError(f"insightface model folder {folder} not found; expected {expected} in it. "
                                f"Get {ANTELOPE_HINT}. (insightface would try to download it; pulid_lab does not.)")
    onnx = sorted(p.name for p in folder.glob("*.onnx"))
    det = [n for n in onnx if n.startswith(("scrfd", "det"))]
    rec = [n for n in onnx if n.startswith(("glint", "w600k", "arcface", "rec"))]
    if not det or not rec:
        raise FileNotFoundError(f"{folder} holds {onnx or 'no .onnx files'}; expected {expected}. Get {ANTELOPE_HINT}.")
    return folder


def load_face_analysis(root: str | Path, name: str = "antelopev2", det_size=(640, 640)):
    """``insightface.app.FaceAnalysis`` built only from ``root/models/<name>`` (checked first: insightface itself
    downloads a missing pack), on the CPU execution provider, prepared with ``det_size``.

    ``det_size`` only matters for detectors with a dynamic input size; a detector exported with a static input
    size keeps its own.
    """
    _check_model_pack(root, name)
    from insightface.app import FaceAnalysis
    app = FaceAnalysis(name=name, root=str(Path(root).expanduser()), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=det_size)
    return app


def reference_face(image: np.ndarray, face_analysis, name: str = "image", save_crop: str | Path | None = None,
                   bgr: bool = False, return_kps: bool = False) -> tuple[np.ndarray, ...]:
    """Detect the reference face: (512-d antelopev2 embedding, aligned 112x112 crop).

    ``image``: uint8 (H, W, 3), **RGB** (as PIL / imageio give it); pass ``bgr=True`` for cv2 images. The crop is
    returned in the same channel order as the input (``norm_crop`` with the face's 5 keypoints; insightface
    itself works in BGR). No face -> ``ValueError`` naming the image; several faces -> the largest box (as the
    official code) and a warning with the count. ``save_crop``: write the crop there as PNG.

    ``return_kps=True``: (embedding, crop, keypoints) with the face's 5 keypoints (5, 2) float32 in ``image``'s
    pixel coordinates (what ``eva_input.align_face_512`` takes for the official EVA-CLIP input).
    """
    from insightface.utils import face_align

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    img_bgr = np.ascontiguousarray(image if bgr else image[:, :, ::-1])
    faces = face_analysis.get(img_bgr)
    if len(faces) == 0:
        raise ValueError(f"no face detected in {name} ({image.shape[1]}x{image.shape[0]}); use a clear, frontal "
                         f"photo of one person")
    if len(faces) > 1:
        warnings.warn(f"{len(faces)} faces detected in {name}; using the largest", stacklevel=2)
    face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    if getattr(face, "embedding", None) is None:
        raise ValueError(f"{name}: the face analysis returned no embedding (no recognition model loaded?)")
    if face.kps is None:
        raise ValueError(f"{name}: the detector returned no keypoints; alignment needs a detector with kps")
    crop_bgr = face_align.norm_crop(img_bgr, landmark=np.asarray(face.kps), image_size=112)
    crop = crop_bgr if bgr else np.ascontiguousarray(crop_bgr[:, :, ::-1])
    if save_crop is not None:
        from PIL import Image
        save_crop = Path(save_crop)
        save_crop.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop_bgr[:, :, ::-1])).save(save_crop, format="PNG")
    emb = np.asarray(face.embedding, dtype=np.float32)
    if return_kps:
        return emb, crop, np.asarray(face.kps, dtype=np.float32).reshape(5, 2)
    return emb, crop


def face_similarity(image, reference_embedding: np.ndarray, face_analysis, name: str = "image") -> float | None:
    """Cosine of the antelopev2 embedding of the (largest) face in ``image`` (PIL or uint8 RGB) and
    ``reference_embedding``; None when no face is detected. The paper's Face Sim, with antelopev2 as the judge
    (the model that also made the condition: an optimistic judge)."""
    try:
        emb, _ = reference_face(np.asarray(image), face_analysis, name=name)
    except ValueError:
        return None
    ref = np.asarray(reference_embedding, np.float32)
    return float(np.dot(emb, ref) / (np.linalg.norm(emb) * np.linalg.norm(ref) + 1e-12))


def insightface_image(name: str = "Tom_Hanks_54745.png") -> Path:
    """A photo that ships with insightface (``Tom_Hanks_54745.png``: one face; ``t1.jpg``: a group of six)."""
    import insightface
    path = Path(insightface.__file__).parent / "data" / "images" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (this insightface ships "
                                f"{sorted(p.name for p in path.parent.glob('*'))})")
    return path


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def pad_image(image: np.ndarray, factor: float = 3.0) -> np.ndarray:
    """``image`` (uint8 (H, W, 3)) centred on a canvas ``factor`` times its size, filled with its mean border colour.

    A face that fills the whole frame (an aligned 112x112 crop, a tight portrait) is often missed by insightface's
    detector; with context around it, it is found (the usual workaround)."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).mean(0)
    H, W = int(round(h * factor)), int(round(w * factor))
    canvas = np.empty((H, W, 3), np.uint8)
    canvas[:] = border.round().astype(np.uint8)
    top, left = (H - h) // 2, (W - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas


def default_reference() -> tuple[Path, np.ndarray]:
    """(path, image) of the reference photo used when none is given: insightface's ``Tom_Hanks_54745.png``, an
    aligned 112x112 crop, padded to 336x336 (``pad_image``) so that the detector finds the face."""
    path = insightface_image()
    return path, pad_image(read_image(path))


def id_vector(antelope_embedding: torch.Tensor, eva_cls: torch.Tensor) -> torch.Tensor:
    """The official 1280-d ID condition: antelopev2 embedding (as is) ++ L2-normalised EVA02-CLIP-L CLS."""
    return torch.cat([antelope_embedding, torch.nn.functional.normalize(eva_cls, dim=-1)], -1)


# ---------------------------------------------------------------------------------------------------------------
# the official PuLID v1 ID encoder shape, and its checkpoint
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class V1EncoderConfig:
    id_dim: int = 1280  # antelopev2 512 ++ EVA02-CLIP-L CLS 768
    vit_dim: int = 1024  # EVA02-CLIP-L hidden width
    token_dim: int = 2048  # SDXL cross_attention_dim
    n_global: int = 5
    n_layers: int = 5  # EVA hidden states used (one local token each)
    hidden: int = 1024  # width of the local MLPs and cap of the global MLP widths

    @property
    def n_tokens(self) -> int:
        return self.n_global + self.n_layers


def _mlp3(din, h1, h2, dout):
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear (indices 0, 1, 3, 4, 6 hold weights)."""
    return nn.Sequential(nn.Linear(din, h1), nn.LayerNorm(h1), nn.LeakyReLU(), nn.Linear(h1, h2), nn.LayerNorm(h2),
                         nn.LeakyReLU(), nn.Linear(h2, dout))


class V1IDEncoder(nn.Module):
    """PuLID v1 encoder shape: ``(id_vector (B, 1280), [5 x (B, 577, 1024)]) -> (B, 10, 2048)``.

    - 5 global tokens: an MLP over the ID vector (hidden widths min(token_dim * n_global / 4, hidden) and
      min(token_dim * n_global / 2, hidden)), reshaped to (n_global, token_dim);
    - 5 local tokens, one per EVA hidden state: MLP(CLS token) + mean over patches of MLP(patch tokens).

    Parameter names differ from the official ones; ``official_v1_encoder_key`` maps them.
    """

    def __init__(self, cfg: V1EncoderConfig | None = None):
        super().__init__()
        self.cfg = c = cfg or V1EncoderConfig()
        total = c.token_dim * c.n_global
        self.global_mlp = _mlp3(c.id_dim, min(total // 4, c.hidden), min(total // 2, c.hidden), total)
        self.cls_maps = nn.ModuleList(_mlp3(c.vit_dim, c.hidden, c.hidden, c.token_dim) for _ in range(c.n_layers))
        self.patch_maps = nn.ModuleList(_mlp3(c.vit_dim, c.hidden, c.hidden, c.token_dim) for _ in range(c.n_layers))

    def forward(self, id_vec: torch.Tensor, hidden_states) -> torch.Tensor:
        c = self.cfg
        if id_vec.ndim != 2 or id_vec.shape[1] != c.id_dim:
            raise ValueError(f"id vector must be (B, {c.id_dim}), got {tuple(id_vec.shape)}")
        if len(hidden_states) != c.n_layers:
            raise ValueError(f"expected {c.n_layers} hidden states, got {len(hidden_states)}")
        glob = self.global_mlp(id_vec).view(-1, c.n_global, c.token_dim)
        local = [cls_map(h[:, :1]) + patch_map(h[:, 1:]).mean(1, keepdim=True)
                 for h, cls_map, patch_map in zip(hidden_states, self.cls_maps, self.patch_maps)]
        return torch.cat([glob, *local], 1)

    def uncond(self, id_vec, hidden_states) -> torch.Tensor:
        """Unconditional tokens, as the official code: the encoder applied to zeros."""
        return self(torch.zeros_like(id_vec), [torch.zeros_like(h) for h in hidden_states])


class RealAdapter(PuLIDAdapter):
    """V1 ID encoder + pulid_lab's ID processors (``id_to_k``/``id_to_v`` in every attn2) for a real UNet."""

    def __init__(self, unet, encoder: V1EncoderConfig | None = None, settings: IDAttnSettings | None = None):
        encoder = encoder or V1EncoderConfig(token_dim=unet.config.cross_attention_dim)
        super().__init__(unet, V1IDEncoder(encoder), settings)
        # the official checkpoint numbers processors by their position in unet.attn_processors (attn1 included)
        self.processor_names = list(unet.attn_processors)


OFFICIAL_ENCODER_PREFIX = "id_adapter."
OFFICIAL_ATTN_PREFIX = "id_adapter_attn_layers."


def official_v1_encoder_key(key: str) -> str:
    """Official ``IDEncoder`` key (without ``id_adapter.``) -> ``V1IDEncoder`` key (see ``apply_official_v1``)."""
    head, _, rest = key.partition(".")
    if head == "body":
        return f"global_mlp.{rest}"
    if head.startswith("mapping_patch_"):
        return f"patch_maps.{head.removeprefix('mapping_patch_')}.{rest}"
    if head.startswith("mapping_"):
        return f"cls_maps.{head.removeprefix('mapping_')}.{rest}"
    raise KeyError(f"unknown official PuLID v1 encoder key {OFFICIAL_ENCODER_PREFIX}{key}")


def load_official_v1(state_dict: dict) -> tuple[dict, dict]:
    """Split an official PuLID v1 checkpoint (``pulid_v1.bin``) into
    (encoder state for ``V1IDEncoder``, ``{processor index: {'id_to_k.weight': W, 'id_to_v.weight': W}}``).

    Any key outside ``id_adapter.*`` / ``id_adapter_attn_layers.*`` is an error (a v1.1 checkpoint, for example,
    has another encoder). See ``apply_official_v1`` for the key table.
    """
    encoder, kv = {}, {}
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_ATTN_PREFIX):
            index, _, rest = key[len(OFFICIAL_ATTN_PREFIX):].partition(".")
            if rest not in ("id_to_k.weight", "id_to_v.weight") or not index.isdigit():
                raise KeyError(f"unexpected key {key} in the official PuLID v1 attention layers")
            kv.setdefault(int(index), {})[rest] = value
        elif key.startswith(OFFICIAL_ENCODER_PREFIX):
            encoder[official_v1_encoder_key(key[len(OFFICIAL_ENCODER_PREFIX):])] = value
        else:
            raise KeyError(f"unexpected key {key}: not an official PuLID v1 checkpoint (expected only "
                           f"{OFFICIAL_ENCODER_PREFIX}* and {OFFICIAL_ATTN_PREFIX}*)")
    for index, pair in kv.items():
        if set(pair) != {"id_to_k.weight", "id_to_v.weight"}:
            raise KeyError(f"{OFFICIAL_ATTN_PREFIX}{index} has {sorted(pair)}; expected id_to_k.weight and id_to_v.weight")
    return encoder, kv


def apply_official_v1(target, state_dict: dict, unet=None) -> None:
    """Load an official PuLID v1 checkpoint into ``target``: a ``RealAdapter``, or ``(encoder, processors)``
    (``V1IDEncoder`` or None, ``IDProcessors``) together with ``unet`` (or its ordered processor names).

    Key mapping (official -> pulid_lab):

    ===================================================  =========================================================
    official key                                          pulid_lab
    ===================================================  =========================================================
    ``id_adapter.body.{i}.*``                             ``encoder.global_mlp.{i}.*``
    ``id_adapter.mapping_{j}.{i}.*``                      ``encoder.cls_maps.{j}.{i}.*``
    ``id_adapter.mapping_patch_{j}.{i}.*``                ``encoder.patch_maps.{j}.{i}.*``
    ``id_adapter_attn_layers.{n}.id_to_k.weight``         ``processors.procs[key(name_n)].id_to_k.weight``
    ``id_adapter_attn_layers.{n}.id_to_v.weight``         ``processors.procs[key(name_n)].id_to_v.weight``
    ===================================================  =========================================================

    ``name_n`` is the n-th name of ``unet.attn_processors`` (attn1 *and* attn2 counted: the official code wraps
    every processor in one ``nn.ModuleList``, and the attn1 ones have no parameters, so only attn2 indices —
    the odd ones on SDXL — appear); ``key(name)`` replaces '.' by '__'. Every attn2 layer must receive both
    weights with the right shapes, and the encoder loads with ``strict=True``.
    """
    if isinstance(target, RealAdapter):
        encoder, processors, names = target.encoder, target.processors, target.processor_names
    else:
        encoder, processors = target
        if unet is None:
            raise ValueError("pass unet= (or its ordered processor names) with (encoder, processors)")
        names = list(unet) if isinstance(unet, (list, tuple)) else list(unet.attn_processors)
    encoder_state, kv = load_official_v1(state_dict)
    if encoder is not None:
        encoder.load_state_dict(encoder_state, strict=True)
    expected = {i for i, n in enumerate(names) if n in processors.layer_names}
    if set(kv) != expected:
        raise ValueError(f"official attention indices {sorted(kv)} do not match this UNet's attn2 indices "
                         f"{sorted(expected)} (wrong base model, or another processor order)")
    for index, pair in kv.items():
        proc = processors.processor(names[index])
        for attr in ("id_to_k", "id_to_v"):
            w, lin = pair[f"{attr}.weight"], getattr(proc, attr)
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise ValueError(f"{OFFICIAL_ATTN_PREFIX}{index}.{attr}.weight has shape {tuple(w.shape)}; "
                                 f"{names[index]} needs {tuple(lin.weight.shape)}")
            with torch.no_grad():
                lin.weight.copy_(w)


def official_v1_state_dict(adapter: RealAdapter) -> dict:
    """The inverse of ``apply_official_v1``: ``adapter``'s weights under the official PuLID v1 key names
    (``id_adapter.*``, ``id_adapter_attn_layers.{n}.id_to_k/v.weight``), e.g. to save a trained adapter for the
    official inference code (``torch.save(state, 'pulid_v1.bin')``)."""
    inverse = {"global_mlp": "body", "cls_maps": "mapping_", "patch_maps": "mapping_patch_"}
    state = {}
    for key, value in adapter.encoder.state_dict().items():
        head, _, rest = key.partition(".")
        if head == "global_mlp":
            state[f"{OFFICIAL_ENCODER_PREFIX}body.{rest}"] = value.detach().clone()
        else:
            index, _, rest = rest.partition(".")
            state[f"{OFFICIAL_ENCODER_PREFIX}{inverse[head]}{index}.{rest}"] = value.detach().clone()
    for n, name in enumerate(adapter.processor_names):
        if name in adapter.processors.layer_names:
            proc = adapter.processors.processor(name)
            for attr in ("id_to_k", "id_to_v"):
                state[f"{OFFICIAL_ATTN_PREFIX}{n}.{attr}.weight"] = getattr(proc, attr).weight.detach().clone()
    return state


def read_checkpoint(path: str | Path) -> dict:
    """A state dict from ``.safetensors`` or a torch pickle (``pulid_v1.bin``; ``weights_only=True``), on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; for the official PuLID v1 weights get {PULID_V1_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# EVA02-CLIP image features (through open_clip) and the full ID condition
# ---------------------------------------------------------------------------------------------------------------

EVA_MODEL = "EVA02-L-14-336"
EVA_HINT = ("the open_clip EVA02-L-14-336 weights (merged2b_s6b_b61k), e.g. `huggingface-cli download "
            "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k open_clip_pytorch_model.bin --local-dir DIR` "
            "(the same model as EVA02_CLIP_L_336_psz14_s6B.pt of QuanSun/EVA-CLIP, which the official PuLID uses)")
EVA_LAYERS = 5  # hidden states taken at evenly spaced blocks: 4, 8, 12, 16, 20 of EVA02-L's 24


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the ID condition needs from an image model (EVA02-CLIP-L in the official code).

    ``extractor(crops)`` with crops a float tensor (B, 3, H, W), RGB in [0, 1] (aligned face crops; the extractor
    resizes and normalises itself) returns ``(cls (B, D), [hidden state (B, N, C)] * n_layers)``. Any module with
    this call signature fits (the tests plug in a tiny fake ViT).
    """

    def __call__(self, crops: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


class ZeroFeatures(nn.Module):
    """A ``FeatureExtractor`` with EVA02-CLIP-L's output shapes (CLS (B, 768), 5 x (B, 577, 1024)) and no
    information: zeros. Stands in when no EVA checkpoint is at hand: the official encoder shape still runs, for
    shapes, memory and timing — not for fidelity (the ID vector keeps antelopev2's 512-d part)."""

    def __init__(self, cls_dim: int = 768, tokens: int = 577, width: int = 1024, n_layers: int = EVA_LAYERS):
        super().__init__()
        self.cls_dim, self.tokens, self.width, self.n_layers = cls_dim, tokens, width, n_layers

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, dev = len(crops), crops.device
        return (torch.zeros(b, self.cls_dim, device=dev),
                [torch.zeros(b, self.tokens, self.width, device=dev) for _ in range(self.n_layers)])


def evenly_spaced_blocks(depth: int, n: int = EVA_LAYERS) -> list[int]:
    """Indices of the blocks whose *input* is kept: depth 24, n 5 -> [4, 8, 12, 16, 20] (as the official code)."""
    return [round(depth * (i + 1) / (n + 1)) for i in range(n)]


def _require_open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as e:
        raise ImportError("EVA02-CLIP features need open_clip (and timm for the EVA towers): "
                          "`pip install open_clip_torch timm`") from e
    return open_clip


def _blocks(visual) -> nn.ModuleList:
    """The transformer blocks of an open_clip visual tower (timm trunk or open_clip's own ViT)."""
    for path in ("trunk.blocks", "transformer.resblocks", "blocks"):
        obj = visual
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise TypeError(f"{type(visual).__name__}: no transformer blocks found (expected trunk.blocks, "
                    f"transformer.resblocks or blocks)")


class OpenClipFeatures(nn.Module):
    """An open_clip visual tower as a ``FeatureExtractor``: (B, 3, H, W) RGB in [0, 1] -> (CLS embedding (B, D),
    the inputs of ``layers`` blocks (B, 1 + patches, width)). Frozen, eval mode.

    The crops are resized (bicubic) to the tower's input size and normalised with its mean/std. The official code
    feeds EVA-CLIP a 512x512 aligned, face-parsed crop (white background, grey face); that picture is built before
    this wrapper, by ``eva_input.parsed_face`` (``id_condition(..., parser=...)``), and passed in as the crops.
    """

    def __init__(self, visual: nn.Module, image_size: int, mean, std, layers: list[int] | None = None):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        blocks = _blocks(visual)
        self.layers = layers if layers is not None else evenly_spaced_blocks(len(blocks))
        self._blocks = [blocks[i] for i in self.layers]

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"expected crops (B, 3, H, W) in [0, 1], got {tuple(crops.shape)}")
        dtype = next(self.visual.parameters()).dtype
        x = torch.nn.functional.interpolate(crops.float(), size=(self.image_size, self.image_size), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(dtype)
        hidden: list[torch.Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda m, args: hidden.append(args[0])) for b in self._blocks]
        try:
            cls = self.visual(x)
        finally:
            for h in hooks:
                h.remove()
        if isinstance(cls, (tuple, list)):
            cls = cls[0]
        return cls, hidden


def load_eva_clip(path_or_name: str | Path, allow_download: bool = False, model_name: str = EVA_MODEL,
                  device=None, dtype=None) -> OpenClipFeatures:
    """The EVA02-CLIP-L-14-336 visual tower (open_clip) as a ``FeatureExtractor``: CLS embedding (B, 768) and the
    hidden states (B, 577, 1024) entering blocks 4, 8, 12, 16 and 20, as the official PuLID.

    ``path_or_name``: a local open_clip checkpoint file of ``model_name`` (``open_clip_pytorch_model.bin`` or
    ``.safetensors``). With ``allow_download=True`` a name that is not a file is passed to open_clip as a
    pretrained tag (e.g. ``'merged2b_s6b_b61k'``) and may download. Not installed -> ``ImportError``; missing
    file -> ``FileNotFoundError`` naming it and where to get it.
    """
    path = Path(path_or_name).expanduser()
    if not path.is_file() and not allow_download:
        raise FileNotFoundError(f"EVA02-CLIP checkpoint {path} not found; get {EVA_HINT}. "
                                f"(Nothing is downloaded unless allow_download=True.)")
    open_clip = _require_open_clip()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pretrained = str(path) if path.is_file() else str(path_or_name)
    model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    visual = model.visual
    size = getattr(visual, "image_size", 336)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    feats = OpenClipFeatures(visual, size, mean, std)
    return feats.to(device=device, dtype=dtype) if dtype is not None else feats.to(device)


def crops_to_tensor(crops) -> torch.Tensor:
    """uint8 RGB crop(s) (H, W, 3) / (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    arr = np.asarray(crops)
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


_UNPARSED_WARNED = False  # id_condition warns once per process about the unparsed 112x112 EVA input


@torch.no_grad()
def id_condition(image: np.ndarray, face_analysis, extractor: FeatureExtractor, name: str = "image",
                 device=None, parser: FaceParser | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference image (uint8 RGB (H, W, 3)) -> the official ID condition: (id vector (1, 512 + D) = antelopev2
    embedding ++ normalised CLS, [hidden states (1, N, C)]) — feed both to ``RealAdapter.tokens``.

    The antelopev2 embedding always comes from insightface on ``image``. What the extractor (EVA-CLIP) sees:

    - ``parser`` given (``eva_input.load_face_parser(path)``, or any callable with BiSeNet's call signature): the
      official input — the face aligned to the 512x512 FFHQ template with its 5 keypoints
      (``eva_input.align_face_512``) and parsed (``eva_input.parsed_face``): white background, grey face,
      (1, 3, 512, 512);
    - ``parser=None``: insightface's aligned 112x112 colour crop, unparsed — not what the official weights were
      trained on (a warning says so, once per process).
    """
    global _UNPARSED_WARNED
    emb, crop, kps = reference_face(image, face_analysis, name=name, return_kps=True)
    device = torch.device(device) if device is not None else _module_device(extractor)
    if parser is not None:
        eva_in = parsed_face(align_face_512(np.asarray(image), kps), parser)
    else:
        if not _UNPARSED_WARNED:
            _UNPARSED_WARNED = True
            warnings.warn("id_condition without a face parser: EVA-CLIP sees insightface's unparsed 112x112 colour "
                          "crop, not the official input (a 512x512 aligned crop, background white, face grey). "
                          "Pass parser=pulid_lab.real.eva_input.load_face_parser('parsing_bisenet.pth') "
                          "(facexlib's BiSeNet weights; `pip install facexlib`) for the official input.",
                          stacklevel=3)  # the caller of id_condition (past the no_grad wrapper)
        eva_in = crops_to_tensor(crop)
    cls, hidden = extractor(eva_in.to(device))
    id_vec = id_vector(torch.from_numpy(emb)[None].to(device=device, dtype=torch.float32), cls.float())
    return id_vec, [h.float() for h in hidden]


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# figures (notebook 06)
# ---------------------------------------------------------------------------------------------------------------
