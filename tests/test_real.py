"""The real tier on CPU with tiny randomly-initialised models of the real classes (no downloads, seconds); the
tiny builders live in pulid_lab.real.tiny (notebook 06 uses them too)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pulid_lab.core.attention import IDProcessors
from pulid_lab.lessons.real_models import short_layer
from pulid_lab.real import pipeline as real
from pulid_lab.real import tiny as real_tiny
from pulid_lab.real.tiny import DETECTOR_SIZE as DET
from pulid_lab.real.tiny import FACES, KPS, tiny_extractor, tiny_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------------
# tiny diffusers pipelines
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipes")
    return {kind: real_tiny.save_pipeline(kind, tmp / kind) for kind in ("sdxl", "sd15")}


def _unet_inputs(unet, kind, b=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 16, 16, generator=g)
    ctx = torch.randn(b, 7, unet.config.cross_attention_dim, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * b)}
    return x, torch.tensor([500] * b), ctx, added


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_load_pipeline_generates(saved, kind):
    from diffusers import DPMSolverMultistepScheduler
    pipe = real.load_pipeline(saved[kind], kind=kind, device="cpu")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.unet.dtype == torch.float32
    out = pipe("a face", num_inference_steps=2, height=64, width=64, guidance_scale=1.2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # the same pipeline call with the ID adapter installed: uncond + cond ID tokens (CFG), as the official code
    ctx = pipe.unet.config.cross_attention_dim
    adapter = real.RealAdapter(pipe.unet, real.V1EncoderConfig(id_dim=24, vit_dim=16, token_dim=ctx, hidden=16))
    x, hs = torch.randn(1, 24), [torch.randn(1, 5, 16) for _ in range(5)]
    with torch.no_grad():
        tokens = torch.cat([adapter.uncond_tokens(x, hs), adapter.tokens(x, hs)])
    with adapter.installed(pipe.unet):
        out_id = pipe("a face", num_inference_steps=2, height=64, width=64, guidance_scale=1.2, output_type="np",
                      generator=torch.Generator().manual_seed(0),
                      cross_attention_kwargs={"id_tokens": tokens, "id_scale": 0.8}).images
    assert out_id.shape == out.shape and np.isfinite(out_id).all()


def test_lightning_unet_replaces_weights(saved, tmp_path):
    from safetensors.torch import save_file
    other = tiny_unet("sdxl", seed=123)  # stands in for sdxl_lightning_4step_unet.safetensors
    path = tmp_path / "sdxl_lightning_4step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    pipe = real.load_pipeline(saved["sdxl"], lightning_unet=path, kind="sdxl", device="cpu")
    for k, v in other.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    # a UNet of another shape is a clear error
    sd15 = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet("sd15").state_dict().items()}, str(sd15))
    with pytest.raises(ValueError, match="does not fit"):
        real.load_pipeline(saved["sdxl"], lightning_unet=sd15, kind="sdxl", device="cpu")
    # for training: a second UNet with the Lightning weights, beside the base pipeline (which keeps its own)
    fast = real.load_unet(saved["sdxl"], path, device="cpu")
    for k, v in other.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        real.load_unet(saved["sdxl"], sd15, device="cpu")
    with pytest.raises(FileNotFoundError, match="ByteDance/SDXL-Lightning"):
        real.load_unet(saved["sdxl"], tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        real.load_unet(tmp_path, path)
    # the base weights as a second UNet, and a pipeline sharing everything else
    base = real.load_unet(saved["sdxl"], device="cpu")
    plain = real.load_pipeline(saved["sdxl"], kind="sdxl", device="cpu")
    for k, v in plain.unet.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k
    train_pipe = real.with_unet(pipe, base)
    assert train_pipe.unet is base and train_pipe.vae is pipe.vae and train_pipe.text_encoder_2 is pipe.text_encoder_2
    assert type(train_pipe.scheduler) is type(pipe.scheduler)


def test_missing_files_are_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*stabilityai/stable-diffusion-xl-base-1\.0"):
        real.load_pipeline(tmp_path / "nowhere", kind="sdxl")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        real.load_pipeline(tmp_path, kind="sd15")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors.*ByteDance/SDXL-Lightning"):
        real.load_pipeline(saved["sdxl"], lightning_unet=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="kind"):
        real.load_pipeline(saved["sdxl"], kind="sd3")


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_id_processors_at_scale_zero_match_unpatched(saved, kind):
    pipe = real.load_pipeline(saved[kind], kind=kind, device="cpu")
    unet = pipe.unet
    x, t, ctx, added = _unet_inputs(unet, kind)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        cfg = real.V1EncoderConfig(id_dim=24, vit_dim=16, token_dim=unet.config.cross_attention_dim, hidden=16)
        adapter = real.RealAdapter(unet, cfg)
        for p in adapter.processors.parameters():
            nn.init.normal_(p)  # non-zero projections: only id_scale=0 may silence them
        tokens = torch.randn(1, 10, unet.config.cross_attention_dim)
        with adapter.installed(unet):
            same = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                        cross_attention_kwargs={"id_tokens": tokens, "id_scale": 0.0}).sample
            moved = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                         cross_attention_kwargs={"id_tokens": tokens, "id_scale": 0.8}).sample
        after = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert (moved - ref).abs().max() > 1e-3
    torch.testing.assert_close(after, ref, atol=0, rtol=0)  # originals restored


# ---------------------------------------------------------------------------------------------------------------
# official PuLID v1 checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _official_encoder_shapes(width, vit, ctx, n_tok=5, hidden=1024):
    """The official IDEncoder's parameter names and shapes, written out from its description."""
    h1, h2 = min(ctx * n_tok // 4, hidden), min(ctx * n_tok // 2, hidden)
    shapes = {}

    def mlp(prefix, dims):
        for idx, (din, dout) in zip((0, 3, 6), zip(dims[:-1], dims[1:])):
            shapes[f"{prefix}.{idx}.weight"], shapes[f"{prefix}.{idx}.bias"] = (dout, din), (dout,)
        for idx, d in zip((1, 4), dims[1:3]):
            shapes[f"{prefix}.{idx}.weight"], shapes[f"{prefix}.{idx}.bias"] = (d,), (d,)

    mlp("body", (width, h1, h2, ctx * n_tok))
    for i in range(5):
        mlp(f"mapping_{i}", (vit, hidden, hidden, ctx))
        mlp(f"mapping_patch_{i}", (vit, hidden, hidden, ctx))
    return shapes


def _official_hidden_size(unet, name):  # as the official hack_unet_attn_layers computes it
    boc = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return boc[-1]
    block = int(name[len("up_blocks.")]) if name.startswith("up_blocks") else int(name[len("down_blocks.")])
    return list(reversed(boc))[block] if name.startswith("up_blocks") else boc[block]


def test_v1_encoder_default_shapes_are_official():
    with torch.device("meta"):
        enc = real.V1IDEncoder()
    official = _official_encoder_shapes(1280, 1024, 2048)
    mine = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert {real.official_v1_encoder_key(k): s for k, s in official.items()} == mine
    assert enc.cfg.n_tokens == 10


def _reference_forward(sd, x, hs, ctx, n_tok=5):
    """The official forward, written functionally over the official keys."""
    def mlp(p, h):
        for i in (0, 3):
            norm_w, norm_b = sd[f"{p}.{i + 1}.weight"], sd[f"{p}.{i + 1}.bias"]
            h = F.linear(h, sd[f"{p}.{i}.weight"], sd[f"{p}.{i}.bias"])
            h = F.leaky_relu(F.layer_norm(h, norm_w.shape, norm_w, norm_b))
        return F.linear(h, sd[f"{p}.6.weight"], sd[f"{p}.6.bias"])
    toks = [mlp("body", x).reshape(-1, n_tok, ctx)]
    for i, h in enumerate(hs):
        toks.append(mlp(f"mapping_{i}", h[:, :1]) + mlp(f"mapping_patch_{i}", h[:, 1:]).mean(1, keepdim=True))
    return torch.cat(toks, 1)


def test_official_v1_checkpoint_maps_into_adapter(saved):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(saved["sdxl"], subfolder="unet")
    ctx = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    enc_sd = {k: torch.randn(s, generator=g) for k, s in _official_encoder_shapes(24, 16, ctx, hidden=16).items()}
    state = {f"id_adapter.{k}": v for k, v in enc_sd.items()}
    names = list(unet.attn_processors)
    attn2 = {}
    for i, name in enumerate(names):  # the official ModuleList holds every processor; only attn2 have weights
        if name.endswith("attn2.processor"):
            hidden = _official_hidden_size(unet, name)
            for w in ("id_to_k", "id_to_v"):
                state[f"id_adapter_attn_layers.{i}.{w}.weight"] = torch.randn(hidden, ctx, generator=g)
            attn2[i] = name
    assert attn2 and all(i % 2 == 1 for i in attn2)  # attn1, attn2 alternate

    adapter = real.RealAdapter(unet, real.V1EncoderConfig(id_dim=24, vit_dim=16, token_dim=ctx, hidden=16))
    real.apply_official_v1(adapter, state)
    for i, name in attn2.items():
        proc = adapter.processors.procs[name.replace(".", "__")]
        assert torch.equal(proc.id_to_k.weight, state[f"id_adapter_attn_layers.{i}.id_to_k.weight"])
        assert torch.equal(proc.id_to_v.weight, state[f"id_adapter_attn_layers.{i}.id_to_v.weight"])
    assert len(attn2) == len(adapter.processors.procs)

    x, hs = torch.randn(2, 24), [torch.randn(2, 5, 16) for _ in range(5)]
    with torch.no_grad():
        torch.testing.assert_close(adapter.tokens(x, hs), _reference_forward(enc_sd, x, hs, ctx))
        assert adapter.uncond_tokens(x, hs).shape == (2, 10, ctx)

    # the (encoder, processors) form with the processor order from the UNet
    procs = IDProcessors(unet, id_dim=ctx)
    real.apply_official_v1((None, procs), state, unet=unet)
    name = attn2[min(attn2)]
    assert torch.equal(procs.processor(name).id_to_k.weight, state[f"id_adapter_attn_layers.{min(attn2)}.id_to_k.weight"])

    # errors: a missing layer, a shifted numbering, a foreign key
    broken = {k: v for k, v in state.items() if not k.startswith(f"id_adapter_attn_layers.{min(attn2)}.")}
    with pytest.raises(ValueError, match="do not match"):
        real.apply_official_v1(adapter, broken)
    shifted = {(k.replace(f"layers.{min(attn2)}.", f"layers.{min(attn2) - 1}.")): v for k, v in state.items()}
    with pytest.raises(ValueError, match="do not match"):
        real.apply_official_v1(adapter, shifted)
    with pytest.raises(KeyError, match="not an official"):
        real.apply_official_v1(adapter, {**state, "pulid_encoder.x": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# insightface: a tiny antelopev2-like folder (SCRFD-signature detector with fixed outputs + ArcFace-shaped ONNX)
# ---------------------------------------------------------------------------------------------------------------

PACKS = {"none": (), "one": FACES[1:], "two": FACES}  # what the tiny detector reports


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """The tiny recognizer exported once (every pack copies it)."""
    pytest.importorskip("insightface")
    return real_tiny.export_onnx(real_tiny.TinyRecognizer(), tmp_path_factory.mktemp("onnx") / "glintr100.onnx", 112,
                                 dynamic=True)


def _pack(tmp_path, onnx_models, faces):
    return real_tiny.write_antelopev2(tmp_path, PACKS[faces], recognizer=onnx_models)


def test_face_analysis_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"antelopev2.*scrfd_10g_bnkps\.onnx.*glintr100\.onnx"):
        real.load_face_analysis(tmp_path)
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "models" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="detection ONNX"):
        real.load_face_analysis(tmp_path)


def test_recognizer_loads_as_arcface(tmp_path, onnx_models):
    from insightface.model_zoo import get_model
    root = _pack(tmp_path, onnx_models, "one")
    rec = get_model(str(root / "models/antelopev2/glintr100.onnx"), providers=["CPUExecutionProvider"])
    assert type(rec).__name__ == "ArcFaceONNX"
    app = real.load_face_analysis(root)
    assert type(app.models["recognition"]).__name__ == "ArcFaceONNX"
    assert type(app.models["detection"]).__name__ == "SCRFD"


def _image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (DET, DET, 3), dtype=np.uint8)


def test_reference_face_one_face(tmp_path, onnx_models):
    from insightface.utils import face_align
    app = real.load_face_analysis(_pack(tmp_path, onnx_models, "one"))
    img = _image()
    emb, crop = real.reference_face(img, app, name="ref.png", save_crop=tmp_path / "crop.png")
    cx, cy, half = FACES[1]
    kps = np.array([cx * 8, cy * 8], np.float32) + KPS * 2 * half * 8
    expected_bgr = face_align.norm_crop(np.ascontiguousarray(img[:, :, ::-1]), kps, image_size=112)
    assert emb.shape == (512,) and crop.shape == (112, 112, 3)
    np.testing.assert_array_equal(crop, expected_bgr[:, :, ::-1])  # RGB in, RGB out
    np.testing.assert_allclose(emb, app.models["recognition"].get_feat(expected_bgr)[0], rtol=1e-5, atol=1e-5)
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "crop.png")), crop)


def test_reference_face_no_face_and_several(tmp_path, onnx_models):
    app_none = real.load_face_analysis(_pack(tmp_path / "a", onnx_models, "none"))
    with pytest.raises(ValueError, match="no face detected in empty.jpg"):
        real.reference_face(_image(), app_none, name="empty.jpg")
    app_two = real.load_face_analysis(_pack(tmp_path / "b", onnx_models, "two"))
    with pytest.warns(UserWarning, match="2 faces detected in group.jpg"):
        emb, crop = real.reference_face(_image(), app_two, name="group.jpg")
    one = real.load_face_analysis(_pack(tmp_path / "c", onnx_models, "one"))
    emb1, crop1 = real.reference_face(_image(), one, name="solo.jpg")  # the largest face alone
    np.testing.assert_array_equal(crop, crop1)
    np.testing.assert_allclose(emb, emb1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# image features (EVA02-CLIP through open_clip; a tiny fake ViT here) and the full ID condition
# ---------------------------------------------------------------------------------------------------------------

def test_evenly_spaced_blocks_match_official():
    assert real.evenly_spaced_blocks(24) == [4, 8, 12, 16, 20]  # EVA02-L: the official PuLID's blocks
    assert len(real.evenly_spaced_blocks(10)) == 5


def test_eva_clip_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.bin.*eva02_large_patch14_clip_336"):
        real.load_eva_clip(tmp_path / "nowhere.bin")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        ckpt = tmp_path / "open_clip_pytorch_model.bin"
        ckpt.write_bytes(b"")
        with pytest.raises(ImportError, match="pip install open_clip_torch"):
            real.load_eva_clip(ckpt)


def test_open_clip_features_hidden_states_are_block_inputs():
    fx = tiny_extractor()
    assert isinstance(fx, real.FeatureExtractor)
    crops = torch.rand(2, 3, 112, 112)
    cls, hidden = fx(crops)
    assert cls.shape == (2, 16) and len(hidden) == 5 and all(h.shape == (2, 1 + 16, 8) for h in hidden)
    # by hand: resize + normalise, run the blocks, keep the inputs of the evenly spaced ones
    x = F.interpolate(crops, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    h = fx.visual.tokens((x - 0.5) / 0.25)
    expected = []
    for i, b in enumerate(fx.visual.blocks):
        if i in fx.layers:
            expected.append(h)
        h = h + b(h)
    for got, want in zip(hidden, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(cls, fx.visual.proj(h[:, 0]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fx(torch.rand(3, 112, 112))


def test_full_condition_path_to_tokens(tmp_path, onnx_models):
    """reference image -> reference_face (insightface) -> id vector (512 ++ CLS) + 5 hidden states -> tokens."""
    app = real.load_face_analysis(_pack(tmp_path, onnx_models, "one"))
    fx = tiny_extractor()
    img = _image()
    id_vec, hidden = real.id_condition(img, app, fx, name="ref.png")
    emb, crop = real.reference_face(img, app)
    cls, _ = fx(real.crops_to_tensor(crop))
    assert id_vec.shape == (1, 512 + 16) and len(hidden) == 5 and hidden[0].shape == (1, 17, 8)
    torch.testing.assert_close(id_vec[:, :512], torch.from_numpy(emb)[None])
    torch.testing.assert_close(id_vec[:, 512:], F.normalize(cls, dim=-1))
    from diffusers import UNet2DConditionModel
    unet = tiny_unet("sd15")
    adapter = real.RealAdapter(unet, real.V1EncoderConfig(id_dim=512 + 16, vit_dim=8, token_dim=32, hidden=16))
    tokens = adapter.tokens(id_vec, hidden)
    assert tokens.shape == (1, 10, 32) and torch.isfinite(tokens).all()
    assert isinstance(unet, UNet2DConditionModel)


def test_tiny_detector_reports_faces_where_drawn(tmp_path, onnx_models):
    """real_tiny.draw_faces puts each face where the tiny detector reports it, at any image size (insightface
    letterboxes the image into the detector's static input)."""
    app = real.load_face_analysis(_pack(tmp_path, onnx_models, "two"))
    img = real_tiny.draw_faces(128, FACES)
    found = sorted(app.get(np.ascontiguousarray(img[:, :, ::-1])), key=lambda f: f.bbox[0])
    assert len(found) == 2
    for face, want in zip(found, FACES):
        np.testing.assert_allclose(face.kps, real_tiny.face_keypoints(want, 128), atol=0.5)


def test_official_v1_state_dict_round_trip(saved, tmp_path):
    """official_v1_state_dict writes the official key names and shapes; apply_official_v1 reads them back."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(saved["sdxl"], subfolder="unet")
    ctx = unet.config.cross_attention_dim
    cfg = real.V1EncoderConfig(id_dim=24, vit_dim=16, token_dim=ctx, hidden=16)
    torch.manual_seed(0)
    src, dst = real.RealAdapter(unet, cfg), real.RealAdapter(unet, cfg)
    state = real.official_v1_state_dict(src)
    enc = {k.removeprefix("id_adapter."): tuple(v.shape) for k, v in state.items() if k.startswith("id_adapter.")}
    assert enc == _official_encoder_shapes(24, 16, ctx, hidden=16)
    attn = sorted(int(k.split(".")[1]) for k in state if k.startswith("id_adapter_attn_layers."))
    assert attn and all(i % 2 == 1 for i in attn) and len(attn) == 2 * len(src.processors.procs)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "v1.safetensors"))
    torch.save(state, tmp_path / "pulid_v1.bin")
    for f in ("v1.safetensors", "pulid_v1.bin"):
        real.apply_official_v1(dst, real.read_checkpoint(tmp_path / f))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin.*guozinan/PuLID"):
        real.read_checkpoint(tmp_path / "nothing.bin")


def test_generate_with_and_without_id(saved):
    pipe = real.load_pipeline(saved["sdxl"], kind="sdxl", device="cpu")
    ctx = pipe.unet.config.cross_attention_dim
    adapter = real.RealAdapter(pipe.unet, real.V1EncoderConfig(id_dim=24, vit_dim=16, token_dim=ctx, hidden=16))
    x, hs = torch.randn(1, 24), [torch.randn(1, 5, 16) for _ in range(5)]
    with torch.no_grad():
        cond, uncond = adapter.tokens(x, hs), adapter.uncond_tokens(x, hs)
    kw = dict(steps=2, size=64, seed=3)
    original = np.asarray(real.generate(pipe, "a face", **kw)).astype(int)
    plain = np.asarray(real.generate(pipe, "a face", adapter, **kw)).astype(int)
    with_id = np.asarray(real.generate(pipe, "a face", adapter, cond, uncond, **kw)).astype(int)
    assert original.shape == (64, 64, 3)
    assert np.abs(plain - original).max() <= 1  # adapter installed at id_scale 0 = the original model
    assert np.abs(with_id - plain).max() > 0
    with pytest.raises(ValueError, match="uncond_tokens"):
        real.generate(pipe, "a face", adapter, cond, **kw)
    with pytest.raises(ValueError, match="adapter"):
        real.generate(pipe, "a face", None, cond, uncond, **kw)


def test_zero_features_face_similarity_and_labels(tmp_path, onnx_models):
    cls, hidden = real.ZeroFeatures()(torch.rand(2, 3, 112, 112))
    assert cls.shape == (2, 768) and [tuple(h.shape) for h in hidden] == [(2, 577, 1024)] * 5
    assert isinstance(real.ZeroFeatures(), real.FeatureExtractor)
    img = real_tiny.draw_faces(96)
    app = real.load_face_analysis(_pack(tmp_path / "one", onnx_models, "one"))
    emb, _ = real.reference_face(img, app)
    assert real.face_similarity(img, emb, app) == pytest.approx(1.0, abs=1e-5)
    none = real.load_face_analysis(_pack(tmp_path / "none", onnx_models, "none"))
    assert real.face_similarity(img, emb, none) is None
    assert short_layer("down_blocks.2.attentions.1.transformer_blocks.7.attn2") == "down2.a1.t7"
    assert short_layer("mid_block.attentions.0.transformer_blocks.0.attn2.processor") == "mid.a0.t0"
