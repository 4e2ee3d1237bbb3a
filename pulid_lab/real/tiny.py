"""Tiny randomly-initialised stand-ins of the real models: for CPU tests and the CPU path of notebook 06; never a
substitute for real weights.

Same classes as the real tier (docs/real_tier.md), sizes of a few kB to a few MB, built in seconds on a CPU:

- ``save_pipeline(kind, folder)``: a tiny SDXL (``kind='sdxl'``) or SD1.5 (``'sd15'``) diffusers pipeline (CLIP
  tokenizer and text encoders, ``UNet2DConditionModel``, ``AutoencoderKL``, Euler scheduler) written with
  ``save_pretrained``, so that ``pulid_lab.real.pipeline.load_pipeline`` loads it as it loads SDXL;
  ``save_unet_weights`` writes a UNet safetensors file that stands in for ``sdxl_lightning_4step_unet.safetensors``;
- ``write_antelopev2(root, faces)``: a ``root/models/antelopev2`` folder that insightface's ``FaceAnalysis``
  loads: an ONNX detector with SCRFD's output signature and *fixed* outputs (it reports ``faces``, whatever the
  image), and an ONNX recognizer with a 112x112 input that insightface loads as ``ArcFaceONNX``;
- ``TinyViT`` / ``tiny_extractor()``: an open_clip-shaped ViT behind ``real.OpenClipFeatures`` (EVA02-CLIP's
  place in the ID condition);
- ``TinyParser``: a fixed 1x1-conv "face parser" with BiSeNet's call signature (facexlib's parser, which builds the
  official EVA-CLIP input in ``real.eva_input.parsed_face``);
- ``write_stand_ins(folder)``: all of the above at once, as notebook 06 uses them without a GPU.

What they prove: shapes, wiring, file formats and error paths. What they cannot: anything about image quality or
identity — every weight is random.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DETECTOR_SIZE = 64  # static input side of the tiny detector (insightface letterboxes any image into it)
# faces the tiny detector reports: (stride-8 cell x, cell y, half-size in strides), in DETECTOR_SIZE coordinates
FACES = ((2, 2, 1.0), (5, 5, 1.5))
# 5 keypoints (eyes, nose, mouth corners) relative to the face centre, in units of the box side
KPS = np.array([[-0.4, -0.3], [0.4, -0.3], [0.0, 0.05], [-0.3, 0.45], [0.3, 0.45]], np.float32)


# ---------------------------------------------------------------------------------------------------------------
# diffusers pipelines
# ---------------------------------------------------------------------------------------------------------------

def tiny_tokenizer(folder: str | Path):
    """A CLIP tokenizer over single letters (vocab.json + merges.txt written to ``folder``), max length 77."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_text_config(projection_dim: int = 32):
    """A 2-layer CLIP text config of width 32 (vocab 64)."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=64, projection_dim=projection_dim)


def tiny_unet(kind: str = "sdxl", seed: int = 0):
    """A 2-level ``UNet2DConditionModel`` (channels 32, 64; cross-attention at the second level).

    ``'sdxl'``: cross_attention_dim 64 (two text encoders of width 32), ``text_time`` added conditioning and two
    transformer layers in the attention block, as SDXL; ``'sd15'``: cross_attention_dim 32."""
    from diffusers import UNet2DConditionModel
    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"kind must be 'sdxl' or 'sd15', got {kind!r}")
    torch.manual_seed(seed)
    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if kind == "sdxl":
        return UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    cross_attention_dim=64)
    return UNet2DConditionModel(**common, attention_head_dim=8, cross_attention_dim=32)


def tiny_pipeline(kind: str = "sdxl"):
    """A tiny ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline`` (random weights, seed 0; a VAE with
    scale factor 2, so 64x64 images have 32x32 latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"kind must be 'sdxl' or 'sd15', got {kind!r}")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=64)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(tiny_text_config()),
                                         text_encoder_2=CLIPTextModelWithProjection(tiny_text_config()),
                                         tokenizer=tok, tokenizer_2=tok, unet=tiny_unet("sdxl"), scheduler=sched)
    return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(tiny_text_config()), tokenizer=tok,
                                   unet=tiny_unet("sd15"), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_pipeline(kind: str, folder: str | Path) -> Path:
    """``tiny_pipeline(kind).save_pretrained(folder)``: a diffusers folder (model_index.json, ...); returns it."""
    folder = Path(folder)
    tiny_pipeline(kind).save_pretrained(folder)
    return folder


def save_unet_weights(path: str | Path, kind: str = "sdxl", seed: int = 123) -> Path:
    """A ``tiny_unet(kind, seed)`` state dict as safetensors: the stand-in of the SDXL-Lightning UNet file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_unet(kind, seed=seed).state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# insightface: an antelopev2-like folder
# ---------------------------------------------------------------------------------------------------------------

class FixedSCRFD(nn.Module):
    """SCRFD's output signature (scores, boxes, keypoints for strides 8/16/32, 2 anchors per cell) with constant
    outputs: it reports ``faces`` ((cell x, cell y, half-size) at stride 8) whatever the image."""

    def __init__(self, faces=FACES[1:], size: int = DETECTOR_SIZE):
        super().__init__()
        outs = {}
        for s in (8, 16, 32):
            n = 2 * (size // s) ** 2
            outs[f"score_{s}"] = torch.full((n, 1), 0.01)
            outs[f"bbox_{s}"] = torch.ones(n, 4)
            outs[f"kps_{s}"] = torch.zeros(n, 10)
        for cx, cy, half in faces:
            a = 2 * (cy * (size // 8) + cx)
            outs["score_8"][a] = 0.9
            outs["bbox_8"][a] = half
            outs["kps_8"][a] = torch.from_numpy(KPS.reshape(-1) * 2 * half)
        self.names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
        for k, v in outs.items():
            self.register_buffer(k, v)

    def forward(self, x):
        z = x.mean() * 0
        return tuple(getattr(self, n) + z for n in self.names)


class TinyRecognizer(nn.Module):
    """A tiny face recognizer: (B, 3, H, W) -> (B, dim) (one strided conv, pooled to 4x4, one linear).

    Exported to ONNX it stands in for antelopev2's ``glintr100.onnx``; as a torch module it is a differentiable
    stand-in for phi of L_id (random: its L_id values mean nothing)."""

    def __init__(self, dim: int = 512, stride: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=stride)
        self.fc = nn.Linear(8 * 16, dim)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1))


def export_onnx(model: nn.Module, path: str | Path, size: int, dynamic: bool) -> Path:
    """``torch.onnx.export`` (TorchScript exporter, opset 17) of a (B, 3, size, size) -> ... model; ``dynamic``:
    a dynamic batch axis (a recognizer), else fully static (the detector)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(dynamic_axes={"input": {0: "batch"}}) if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), str(path), input_names=["input"],
                          opset_version=17, dynamo=False, **kw)
    return path


def write_antelopev2(root: str | Path, faces=FACES[1:], recognizer: nn.Module | str | Path | None = None) -> Path:
    """``root/models/antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx}``: a ``FixedSCRFD(faces)`` detector and a
    recognizer (``TinyRecognizer()`` by default; a module is exported, a path to an ONNX file is copied).
    Returns ``root`` (what ``real.load_face_analysis`` takes)."""
    root = Path(root)
    folder = root / "models" / "antelopev2"
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(FixedSCRFD(faces), folder / "scrfd_10g_bnkps.onnx", DETECTOR_SIZE, dynamic=False)
    if isinstance(recognizer, (str, Path)):
        shutil.copyfile(recognizer, folder / "glintr100.onnx")
    else:
        export_onnx(recognizer if recognizer is not None else TinyRecognizer(), folder / "glintr100.onnx", 112,
                    dynamic=True)
    return root


def face_keypoints(face, image_size: int = DETECTOR_SIZE) -> np.ndarray:
    """The 5 keypoints (5, 2) the tiny detector reports for ``face`` in a square image of side ``image_size``."""
    cx, cy, half = face
    scale = image_size / DETECTOR_SIZE
    return ((np.array([cx * 8, cy * 8], np.float32) + KPS * 2 * half * 8) * scale).astype(np.float32)


def draw_faces(size: int = 128, faces=FACES[1:], seed: int = 0, background=None) -> np.ndarray:
    """A uint8 RGB (size, size, 3) picture with a cartoon face (skin, eyes, nose, mouth) where the tiny detector
    reports each of ``faces``, on a noisy background: a reference photo for the tiny pack (the detector ignores
    the pixels; this only makes the aligned crop look like a face)."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    bg = np.asarray(background if background is not None else rng.integers(60, 200, 3), np.float32)
    noise = rng.normal(0, 12, (size, size, 3))
    im = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    scale = size / DETECTOR_SIZE
    for face in faces:
        cx, cy, half = face
        c, r = np.array([cx * 8, cy * 8]) * scale, half * 8 * scale
        skin = tuple(int(v) for v in rng.integers(150, 240, 3))
        d.ellipse([c[0] - 1.1 * r, c[1] - 1.35 * r, c[0] + 1.1 * r, c[1] + 1.3 * r], fill=skin)
        d.chord([c[0] - 1.15 * r, c[1] - 1.45 * r, c[0] + 1.15 * r, c[1] - 0.2 * r], 180, 360,
                fill=tuple(int(v) for v in rng.integers(20, 120, 3)))  # hair
        k = face_keypoints(face, size)
        e = max(1.0, 0.12 * r)
        for x, y in k[:2]:
            d.ellipse([x - e, y - e, x + e, y + e], fill=(30, 30, 30))
        d.line([tuple(k[2] - [0, 0.25 * r]), tuple(k[2])], fill=(120, 70, 60), width=max(1, int(0.08 * r)))
        d.line([tuple(k[3]), tuple(k[4])], fill=(150, 40, 40), width=max(1, int(0.1 * r)))
    return np.asarray(im, dtype=np.uint8)


def write_face_folder(folder: str | Path, n: int = 3, size: int = 96, seed: int = 0) -> Path:
    """``n`` synthetic face photos (``face_i.png``, ``draw_faces``) with captions (``face_i.txt``; the last one
    has none, so it gets ``real_train.DEFAULT_CAPTION``): a face folder for ``real_train.FaceFolder``."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = ("a photo of a person, studio light", "a person smiling, outdoors", "a portrait, film grain")
    for i in range(n):
        Image.fromarray(draw_faces(size, seed=seed + i)).save(folder / f"face_{i}.png")
        if i < n - 1:
            (folder / f"face_{i}.txt").write_text(captions[i % len(captions)] + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# image features: an open_clip-shaped ViT (EVA02-CLIP's place)
# ---------------------------------------------------------------------------------------------------------------

class TinyViT(nn.Module):
    """Shaped like an open_clip visual tower: ``blocks`` of a ViT, forward -> projected CLS (B, out_dim)."""

    def __init__(self, width: int = 8, depth: int = 10, out_dim: int = 16, patch: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.proj = nn.Linear(width, out_dim)

    def tokens(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), t], 1)

    def forward(self, x):
        h = self.tokens(x)
        for b in self.blocks:
            h = h + b(h)
        return self.proj(h[:, 0])


def tiny_extractor(size: int = 32):
    """``real.OpenClipFeatures`` over a ``TinyViT``: crops -> (CLS (B, 16), 5 hidden states (B, 1 + (size/8)^2, 8))."""
    from .pipeline import OpenClipFeatures
    return OpenClipFeatures(TinyViT(), image_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ---------------------------------------------------------------------------------------------------------------
# face parsing: BiSeNet's place (the official EVA-CLIP input)
# ---------------------------------------------------------------------------------------------------------------

class TinyParser(nn.Module):
    """A deterministic stand-in of facexlib's 19-class BiSeNet face parser: the same call signature
    (ImageNet-normalised (B, 3, H, W) -> a tuple of 3 logit maps (B, 19, H, W), as BiSeNet's (out, out16, out32))
    from one 1x1 convolution with fixed weights — no randomness, no training:

    - label 0 (background): ``1.5 - (r + g + b)`` of the normalised channels — pixels darker than a grey of about
      143/255 (the crop's border fill, ``eva_input.BORDER_RGB``, included);
    - label 1 (skin): ``(r + g + b) - 1.5`` — brighter pixels;
    - label 17 (hair): ``2 (b - r) - 1`` — clearly bluish pixels;
    - every other label: -10 (never chosen). Ties go to the lowest label (argmax), so a pixel exactly at the
      threshold is background.

    On a drawn face (``draw_faces``) both background-like and face labels occur, which is all the tests need; the
    labels mean nothing about real faces."""

    def __init__(self, num_class: int = 19):
        super().__init__()
        if num_class < 18:
            raise ValueError(f"num_class must be at least 18 (labels 0, 1, 17 are used), got {num_class}")
        self.conv = nn.Conv2d(3, num_class, 1)
        w = torch.zeros(num_class, 3)
        b = torch.full((num_class,), -10.0)
        w[0], b[0] = torch.tensor([-1.0, -1.0, -1.0]), 1.5
        w[1], b[1] = torch.tensor([1.0, 1.0, 1.0]), -1.5
        w[17], b[17] = torch.tensor([-2.0, 0.0, 2.0]), -1.0
        with torch.no_grad():
            self.conv.weight.copy_(w[:, :, None, None])
            self.conv.bias.copy_(b)
        self.eval().requires_grad_(False)

    def forward(self, x):
        logits = self.conv(x)
        return logits, logits, logits


# ---------------------------------------------------------------------------------------------------------------
# everything at once (notebook 06 without a GPU)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StandIns:
    """Paths of the tiny stand-ins, in the places of the real tier's parameters."""
    sdxl_dir: Path  # in place of stabilityai/stable-diffusion-xl-base-1.0
    lightning_unet: Path  # in place of sdxl_lightning_4step_unet.safetensors
    antelopev2_root: Path  # detector reports one face
    no_face_root: Path  # detector reports none
    two_faces_root: Path  # detector reports two (the larger is FACES[1])
    face_image: Path  # a drawn reference photo, its face where the detector reports it
    face_dir: Path  # a few drawn face photos with captions, for real_train.FaceFolder


def write_stand_ins(folder: str | Path) -> StandIns:
    """Write a tiny SDXL pipeline, a Lightning-UNet stand-in, three antelopev2-like packs (one face, none, two),
    a reference image and a face folder under ``folder`` (a few seconds, a few MB)."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = save_pipeline("sdxl", folder / "sdxl")
    lightning = save_unet_weights(folder / "sdxl_lightning_4step_unet.safetensors", "sdxl", seed=123)
    rec = export_onnx(TinyRecognizer(), folder / "glintr100.onnx", 112, dynamic=True)
    packs = {name: write_antelopev2(folder / f"insightface_{name}", faces, recognizer=rec)
             for name, faces in (("one", FACES[1:]), ("none", ()), ("two", FACES))}
    face = folder / "reference.png"
    Image.fromarray(draw_faces(128)).save(face)
    faces = write_face_folder(folder / "faces", n=3)
    return StandIns(sdxl, lightning, packs["one"], packs["none"], packs["two"], face, faces)
