"""Real-tier training (pulid_lab.real.train) on CPU with tiny randomly-initialised SD1.5/SDXL pipelines, a fake
face analysis, a tiny fake ViT as the feature extractor and a tiny torch recognizer as phi (seconds)."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("insightface")

from pulid_lab.real import pipeline as real
from pulid_lab.real import train as real_train  # noqa: E402
from pulid_lab.real.tiny import TinyRecognizer, save_pipeline, tiny_extractor, tiny_unet  # noqa: E402

RES = 32


class FakeFaceAnalysis:
    """insightface-like ``.get(img_bgr)``: one face in the middle of any non-blank image; its 512-d embedding is a
    fixed random projection of the downsampled image. A blank (all-equal) image has no face."""

    def __init__(self):
        self.proj = np.random.default_rng(0).standard_normal((48, 512)).astype(np.float32)

    def get(self, img):
        if img.min() == img.max():
            return []
        h, w = img.shape[:2]
        from PIL import Image
        small = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((4, 4)), np.float32).reshape(-1) / 255
        kps = np.array([[0.38, 0.4], [0.62, 0.4], [0.5, 0.55], [0.4, 0.7], [0.6, 0.7]], np.float32) * [w, h]
        return [SimpleNamespace(bbox=np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h]), kps=kps,
                                embedding=small @ self.proj)]


def TinyPhi() -> nn.Module:
    """A differentiable stand-in for an ArcFace network: (B, 3, H, W) in [-1, 1] -> (B, 16)."""
    return TinyRecognizer(dim=16, stride=2, seed=3)


def _draw(path, bg, skin, size=(48, 40)):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    w, h = size
    d.ellipse([w * 0.25, h * 0.15, w * 0.75, h * 0.85], fill=skin)
    d.rectangle([w * 0.38, h * 0.38, w * 0.44, h * 0.44], fill=(20, 20, 20))
    d.rectangle([w * 0.56, h * 0.38, w * 0.62, h * 0.44], fill=(20, 20, 20))
    im.save(path)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    _draw(folder / "a.png", (200, 40, 40), (230, 190, 160))
    (folder / "a.txt").write_text("a photo of a man, red background\n")
    _draw(folder / "b.jpg", (40, 200, 40), (150, 100, 70), size=(40, 48))
    (folder / "b.txt").write_text("a woman smiling")
    _draw(folder / "c.png", (40, 40, 200), (250, 220, 200))  # no caption -> default
    from PIL import Image
    Image.new("RGB", (32, 32), (128, 128, 128)).save(folder / "blank.png")  # no face -> skipped
    (folder / "notes.md").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipes")
    return {kind: save_pipeline(kind, tmp / kind) for kind in ("sd15", "sdxl")}


def _pipe(saved, kind="sd15"):
    return real.load_pipeline(saved[kind], kind=kind, device="cpu")


def _lightning_unet(kind="sd15"):
    """A second UNet of the base's architecture (other weights): the few-step UNet of the Lightning branch."""
    return tiny_unet(kind, seed=7)


class CallCounter:
    """Counts the forward calls of a module (a forward pre-hook)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def _adapter(pipe, seed=0):
    torch.manual_seed(seed)
    ctx = pipe.unet.config.cross_attention_dim
    return real.RealAdapter(pipe.unet, real.V1EncoderConfig(id_dim=512 + 16, vit_dim=8, token_dim=ctx, hidden=16))


@pytest.fixture(scope="module")
def dataset(faces, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cond_cache")
    with pytest.warns(UserWarning, match=r"1 of 4 images skipped: blank\.png"):
        ds = real_train.FaceFolder(faces, FakeFaceAnalysis(), tiny_extractor(), RES, cache_dir=cache)
    return ds, cache


def _frozen_state(pipe, phi=None):
    mods = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        mods["text_encoder_2"] = pipe.text_encoder_2
    if phi is not None:
        mods["phi"] = phi
    return {f"{m}.{k}": v.detach().clone() for m, mod in mods.items() for k, v in mod.state_dict().items()}


def _assert_only_adapter_changed(pipe, before_frozen, adapter, before_adapter, phi=None):
    after = _frozen_state(pipe, phi)
    assert after.keys() == before_frozen.keys()
    assert all(torch.equal(after[k], before_frozen[k]) for k in after), "a frozen model changed"
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before_adapter[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("processors.") for k in changed)


def _finite(log):
    return all(np.isfinite(v) for row in log for k, v in row.items() if k != "step")


# ---------------------------------------------------------------------------------------------------------------

def test_face_folder_items_captions_and_cache(dataset, faces, tmp_path):
    ds, cache = dataset
    assert [p.name for p in ds.paths] == ["a.png", "b.jpg", "c.png"]
    assert ds.captions == ["a photo of a man, red background", "a woman smiling", real_train.DEFAULT_CAPTION]
    item = ds[1]  # 40x48 portrait: shorter side -> 32, centre crop
    assert item["pixel_values"].shape == (3, RES, RES)
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["original_size"].tolist() == [48, 40] and item["crop_top_left"].tolist() == [(38 - 32) // 2, 0]
    assert item["id_vec"].shape == (512 + 16,) and len(item["hidden_states"]) == 5
    assert item["hidden_states"][0].shape == (17, 8)
    # the condition is the one of the same (full) image, cached on disk: a second dataset does not recompute
    assert len(list(cache.glob("*.pt"))) == 3

    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the cached condition should have been used")
    with warnings.catch_warnings():  # blank.png is not cached, but it fails at detection, before the extractor
        warnings.simplefilter("ignore")
        ds2 = real_train.FaceFolder(faces, FakeFaceAnalysis(), Boom(), RES, cache_dir=cache)
    torch.testing.assert_close(ds2[0]["id_vec"], ds[0]["id_vec"])
    batch = real_train.collate([ds[0], ds[2]])
    assert batch["pixel_values"].shape == (2, 3, RES, RES) and batch["hidden_states"][4].shape == (2, 17, 8)
    assert batch["caption"][1] == real_train.DEFAULT_CAPTION
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        real_train.FaceFolder(empty, FakeFaceAnalysis(), Boom(), RES)
    with pytest.raises(FileNotFoundError, match="not found"):
        real_train.FaceFolder(empty / "missing", FakeFaceAnalysis(), Boom(), RES)


def test_config_and_inputs_are_checked(saved, dataset, tmp_path):
    with pytest.raises(ValueError, match="stage"):
        real_train.RealTrainConfig(stage=4)
    with pytest.raises(ValueError, match="grad_steps"):
        real_train.RealTrainConfig(grad_steps=5)
    with pytest.raises(ValueError, match="id_dropout"):
        real_train.RealTrainConfig(id_dropout=1.0)
    with pytest.raises(ValueError, match="align_reduction"):
        real_train.RealTrainConfig(align_reduction="max")
    pipe = _pipe(saved)
    with pytest.raises(ValueError, match="differentiable torch"):
        real_train.train_real(real_train.RealTrainConfig(stage=2, steps=1), pipe, _adapter(pipe), dataset[0], tmp_path)
    # stages 2 and 3 need a few-step UNet beside the base one, of the same architecture
    for stage in (2, 3):
        with pytest.raises(ValueError, match="few-step UNet.*load_unet"):
            real_train.train_real(real_train.RealTrainConfig(stage=stage, steps=1), pipe, _adapter(pipe), dataset[0],
                                  tmp_path, face_recognizer=TinyPhi())
    with pytest.raises(ValueError, match="the pipeline's own UNet"):
        real_train.train_real(real_train.RealTrainConfig(stage=2, steps=1), pipe, _adapter(pipe), dataset[0], tmp_path,
                              face_recognizer=TinyPhi(), lightning_unet=pipe.unet)
    with pytest.raises(ValueError, match="attention layers"):
        real_train.train_real(real_train.RealTrainConfig(stage=2, steps=1), pipe, _adapter(pipe), dataset[0], tmp_path,
                              face_recognizer=TinyPhi(), lightning_unet=_lightning_unet("sdxl"))
    # SDXL added_cond_kwargs as diffusers' training scripts
    added = real_train.sdxl_added_cond(torch.zeros(2, 32), torch.tensor([[48, 40], [32, 32]]),
                                       torch.tensor([[3, 0], [0, 0]]), (32, 32), torch.float32, "cpu")
    assert added["time_ids"].tolist() == [[48, 40, 3, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    sched = real_train.lightning_scheduler(pipe, 4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]


def test_stage1_two_steps_checkpoint_and_resume(saved, dataset, tmp_path):
    ds, _ = dataset
    cfg = real_train.RealTrainConfig(stage=1, steps=2, batch=2, resolution=RES, lr=1e-3, checkpoint_every=1,
                                     mixed_precision="no")
    # uninterrupted reference run
    pipe = _pipe(saved)
    ref_adapter = _adapter(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = real_train.train_real(cfg, pipe, ref_adapter, ds, tmp_path / "ref", progress=False)

    pipe = _pipe(saved)
    adapter = _adapter(pipe)
    frozen, start = _frozen_state(pipe), {k: v.clone() for k, v in adapter.state_dict().items()}
    ctx = pytest.warns(UserWarning, match="accelerate is not installed")
    try:
        import accelerate  # noqa: F401
        ctx = warnings.catch_warnings()
    except ImportError:
        pass
    with ctx:
        first = real_train.train_real(cfg, pipe, adapter, ds, tmp_path / "run", progress=False, stop_after=1)
    assert first["steps_done"] == 1 and len(first["log"]) == 1
    assert real_train.latest_checkpoint(tmp_path / "run").name == "step-0000001"
    assert not (tmp_path / "run" / "adapter.safetensors").exists()  # not finished yet

    pipe2 = _pipe(saved)
    adapter2 = _adapter(pipe2, seed=99)  # resume must overwrite these weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = real_train.train_real(cfg, pipe2, adapter2, ds, tmp_path / "run", resume=True, progress=False)
    assert second["resumed_from_step"] == 1 and second["steps_done"] == 2
    assert [r["step"] for r in second["log"]] == [0, 1] and _finite(second["log"])
    for a, b in zip(second["log"], ref["log"]):
        assert a["diff"] == pytest.approx(b["diff"], rel=1e-4, abs=1e-6)
    for k, v in ref_adapter.state_dict().items():
        torch.testing.assert_close(adapter2.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    _assert_only_adapter_changed(pipe, frozen, adapter, start)
    # files: final adapter + json, checkpoints (keep 2), losses.csv; and the adapter loads back
    out = tmp_path / "run"
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["steps"] == 2 and meta["training"]["stage"] == 1 and meta["encoder"]["id_dim"] == 528
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]
    assert (out / "losses.csv").read_text().count("\n") == 3
    loaded = real_train.load_real_adapter(out, pipe2.unet)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, adapter2.state_dict()[k].cpu())


@pytest.mark.parametrize("kind,stage", [("sd15", 2), ("sd15", 3), ("sdxl", 3)])
def test_stage_2_and_3_one_step(saved, dataset, tmp_path, kind, stage):
    ds, _ = dataset
    pipe = _pipe(saved, kind)
    adapter = _adapter(pipe)
    phi = TinyPhi()
    fast = _lightning_unet(kind)
    fast_before = {k: v.clone() for k, v in fast.state_dict().items()}
    frozen, start = _frozen_state(pipe, phi), {k: v.clone() for k, v in adapter.state_dict().items()}
    cfg = real_train.RealTrainConfig(stage=stage, steps=1, batch=2, lightning_batch=1, resolution=RES, lr=1e-3,
                                     grad_steps=2, gradient_checkpointing=(stage == 3), mixed_precision="no",
                                     use_accelerate=False, checkpoint_every=1)
    base_calls, fast_calls = CallCounter(pipe.unet), CallCounter(fast)
    res = real_train.train_real(cfg, pipe, adapter, ds, tmp_path, face_recognizer=phi, lightning_unet=fast,
                                progress=False)
    # L_diff on the base UNet (one forward); the Lightning branch on the few-step UNet: 4 steps for L_id, 4 + 4 more
    # for the two paths of L_align, plus what checkpointing re-runs in backward
    assert base_calls.calls == 1
    assert fast_calls.calls >= (4 if stage == 2 else 12)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, fast_before[k]), f"the Lightning UNet changed: {k}"
    assert fast.attn_processors.keys() == pipe.unet.attn_processors.keys()  # processors restored in both
    assert not any(type(p).__name__ == "IDLayer" for p in fast.attn_processors.values())
    row = res["log"][0]
    assert _finite(res["log"]) and 0 <= row["id"] <= 2
    if stage == 3:
        # the two paths share x_T and prompt: they differ only through the ID, from the second step on
        assert row["align_layout"] > 0 and row["align_sem"] > 0
        assert row["total"] == pytest.approx(row["diff"] + row["id"] + 0.6 * row["align_sem"] + 0.1 * row["align_layout"],
                                             rel=1e-4)
    else:
        assert "align_sem" not in row
    _assert_only_adapter_changed(pipe, frozen, adapter, start, phi)
    assert (tmp_path / "checkpoints" / "step-0000001" / "adapter.safetensors").is_file()


def test_stage1_uses_the_base_unet_only(saved, dataset, tmp_path):
    ds, _ = dataset
    pipe, fast = _pipe(saved), _lightning_unet()
    base_calls, fast_calls = CallCounter(pipe.unet), CallCounter(fast)
    cfg = real_train.RealTrainConfig(stage=1, steps=1, batch=2, resolution=RES, mixed_precision="no",
                                     use_accelerate=False, checkpoint_every=1)
    real_train.train_real(cfg, pipe, _adapter(pipe), ds, tmp_path, lightning_unet=fast, progress=False)
    assert (base_calls.calls, fast_calls.calls) == (1, 0)


def _per_step_align_grad_norms(saved, dataset, every: bool) -> list[float]:
    """The gradient norm that each Lightning step's alignment term alone gives the adapter (stage 3, k = 1)."""
    from pulid_lab.core import losses
    from pulid_lab.core.attention import Capture
    ds, _ = dataset
    pipe, fast = _pipe(saved), _lightning_unet()
    adapter = _adapter(pipe)
    cfg = real_train.RealTrainConfig(stage=3, steps=1, batch=1, resolution=RES, grad_steps=1, mixed_precision="no",
                                     align_every_step=every, use_accelerate=False)
    step = real_train.RealPuLIDStep(adapter, pipe, cfg, TinyPhi().requires_grad_(False), fast)
    batch = real_train.collate([ds[0]])
    tokens = adapter.tokens(batch["id_vec"], batch["hidden_states"])
    text, pooled = real_train.encode_text(pipe, ["a watercolor painting of a person"], "cpu")
    x_T = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    norms = []
    with adapter.installed(fast):
        paths = step.lightning(text, pooled, tokens, x_T, with_plain=True)
        for s in range(cfg.lightning_steps):
            one = [Capture(), Capture()]
            for cap, full in zip(one, (paths.capture_id, paths.capture_plain)):
                for key in full.keys():
                    if key[1] == s:
                        cap.q[key], cap.k[key] = full.q[key], full.k[key]
            loss = 0.6 * losses.align_semantic_loss(*one) + 0.1 * losses.align_layout_loss(*one)
            if not loss.requires_grad:  # the step ran without a graph: its term is a constant
                norms.append(0.0)
                continue
            grads = torch.autograd.grad(loss, list(adapter.parameters()), retain_graph=True, allow_unused=True)
            norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))))
    return norms


def test_alignment_trains_at_every_lightning_step(saved, dataset):
    """With align_every_step (the default) each of the 4 steps' alignment term gives the adapter a gradient; without
    it only the last (k = 1) step does: the earlier steps ran without a graph."""
    every = _per_step_align_grad_norms(saved, dataset, True)
    last = _per_step_align_grad_norms(saved, dataset, False)
    print("\nper-step alignment gradient norms (steps 0..3), every step:", [f"{g:.3e}" for g in every],
          "\n                                       last step only:", [f"{g:.3e}" for g in last])
    assert all(g > 0 for g in every)
    assert last[:3] == [0.0, 0.0, 0.0] and last[3] > 0
    assert last[3] == pytest.approx(every[3], rel=1e-4)  # the last step is the same computation either way


def test_id_dropout_gives_some_samples_the_unconditional_id(saved, dataset):
    """The diffusion branch's ID tokens: a share id_dropout of the rows are the encoder's unconditional tokens."""
    ds, _ = dataset
    pipe = _pipe(saved)
    adapter = _adapter(pipe)
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["cross_attention_kwargs"]["id_tokens"].detach()), with_kwargs=True)
    batch = real_train.collate([ds[i % len(ds)] for i in range(8)])
    with torch.no_grad():
        tokens = adapter.tokens(batch["id_vec"], batch["hidden_states"])
        uncond = adapter.uncond_tokens(batch["id_vec"], batch["hidden_states"])
    dropped = {}
    for p in (0.0, 0.5):
        cfg = real_train.RealTrainConfig(stage=1, steps=1, batch=8, resolution=RES, id_dropout=p, mixed_precision="no")
        step = real_train.RealPuLIDStep(adapter, pipe, cfg)
        seen.clear()
        with adapter.installed(pipe.unet), torch.no_grad():
            step(batch, 0)
        used = seen[0]
        is_uncond = [torch.allclose(used[i], uncond[i]) for i in range(8)]
        is_cond = [torch.allclose(used[i], tokens[i]) for i in range(8)]
        assert all(a != b for a, b in zip(is_uncond, is_cond))  # every row is one or the other
        dropped[p] = sum(is_uncond)
    print(f"\nrows with the unconditional ID out of 8: id_dropout 0 -> {dropped[0.0]}, 0.5 -> {dropped[0.5]}")
    assert dropped[0.0] == 0 and 0 < dropped[0.5] < 8


def test_id_loss_gradient_reaches_the_encoder(saved, dataset):
    """L_id alone (through Lightning steps, the VAE decoder and phi) gives the ID encoder a gradient."""
    ds, _ = dataset
    pipe = _pipe(saved)
    adapter = _adapter(pipe)
    cfg = real_train.RealTrainConfig(stage=2, steps=1, batch=1, resolution=RES, grad_steps=1, mixed_precision="no")
    step = real_train.RealPuLIDStep(adapter, pipe, cfg, TinyPhi().requires_grad_(False))
    batch = real_train.collate([ds[0]])
    with adapter.installed(pipe.unet):
        terms = step(batch, 0)
        terms["id"].backward()
    g = adapter.encoder.global_mlp[0].weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lightning_paths_capture_every_layer_and_step(saved, kind):
    """The two Lightning paths of L_align, without training: same x_T, captures of every attn2 layer and step;
    the per-layer terms of alignment_maps.loss_terms sum to the losses."""
    from pulid_lab.core import losses
    from pulid_lab.core.attention import cross_attention_layers, layer_name
    from pulid_lab.lessons import alignment_maps
    pipe = _pipe(saved, kind)
    adapter = _adapter(pipe)
    with torch.no_grad():
        tokens = adapter.tokens(torch.randn(1, 528), [torch.randn(1, 17, 8) for _ in range(5)])
    p = real_train.lightning_paths(pipe, adapter, tokens, "a face", RES, seed=1)
    layers = [layer_name(n) for n in cross_attention_layers(pipe.unet)]
    assert sorted(p.cap_id.keys()) == sorted((la, s) for la in layers for s in range(4)) == sorted(p.cap_plain.keys())
    first = alignment_maps.layers_of(p.cap_id)[0]
    torch.testing.assert_close(p.cap_id.q[(first, 0)], p.cap_plain.q[(first, 0)])  # the ID enters after layer 1
    terms = alignment_maps.loss_terms(p.cap_id, p.cap_plain)
    assert terms.totals()["align_sem"] == pytest.approx(float(losses.align_semantic_loss(p.cap_id, p.cap_plain)), rel=1e-5)
    assert terms.totals()["align_layout"] == pytest.approx(float(losses.align_layout_loss(p.cap_id, p.cap_plain)), rel=1e-5)
    assert terms.layout.sum() > 0
    images = real_train.to_images(pipe, torch.cat([p.latents_id, p.latents_plain]))
    assert images.shape == (2, RES, RES, 3) and images.dtype == np.uint8
    again = real_train.lightning_paths(pipe, adapter, tokens, "a face", RES, seed=1)
    torch.testing.assert_close(again.latents_plain, p.latents_plain)


def test_face_folder_with_a_parser_caches_separately(faces, dataset):
    """With a face parser, EVA sees the parsed 512 crop: other hidden states, cached under another key."""
    from pulid_lab.real.tiny import TinyParser
    ds, cache = dataset
    before = set(cache.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = real_train.FaceFolder(faces, FakeFaceAnalysis(), tiny_extractor(), RES, cache_dir=cache,
                                       parser=TinyParser())
    assert len(set(cache.iterdir()) - before) == len(parsed) == len(ds)
    assert not torch.allclose(parsed[0]["hidden_states"][0], ds[0]["hidden_states"][0])
    torch.testing.assert_close(parsed[0]["id_vec"][:512], ds[0]["id_vec"][:512])  # antelopev2's half is the same
