import json
import math

import numpy as np
import pytest
import torch

from pulid_lab.models import checkpoints, identity, nets
from pulid_lab.models.identity import (
    FaceAnalysis,
    IDConditioner,
    RowConditioner,
    crops_for_insightface,
    export_recognizer_onnx,
    load_insightface_recognizer,
)
from pulid_lab.train.check_models import THRESHOLDS, check_base_model, check_models
from pulid_lab.train.config import pretrain_config
from pulid_lab.train.pretrain import pretrain
from pulid_lab.world import toyfaces as world


def test_arcface_margin_matches_hand_formula():
    torch.manual_seed(0)
    head = nets.ArcFaceHead(4, 3, scale=10.0)
    emb = torch.randn(2, 4)
    target = torch.tensor([1, 2])
    logits = head(emb, target, margin=0.3)
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(head.weight).T
    for r, t in enumerate(target):
        for c in range(3):
            theta = math.acos(cos[r, c].item())
            want = 10 * (math.cos(theta + 0.3) if c == t else cos[r, c].item())
            assert logits[r, c].item() == pytest.approx(want, abs=1e-4)


def test_onnx_export_loads_through_insightface_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    rec = nets.FaceRecognizer((8, 16, 16, 32), "plain", dim=64).eval()
    path = export_recognizer_onnx(rec, tmp_path / "rec.onnx")
    model = load_insightface_recognizer(path)
    assert type(model).__name__ == "ArcFaceONNX"
    assert model.input_mean == 127.5 and model.input_size == (112, 112)
    r = world.render([0, 1, 2], world.sample_attributes(np.random.default_rng(0), 3), [0, 1, 2])
    crops = crops_for_insightface(r.images, r.boxes)
    onnx_emb = model.get_feat(crops)
    rgb = torch.from_numpy(np.stack([c[:, :, ::-1] for c in crops]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        torch_emb = rec(rgb).numpy()
    cos = (onnx_emb * torch_emb).sum(1) / np.linalg.norm(onnx_emb, axis=1) / np.linalg.norm(torch_emb, axis=1)
    assert cos.min() > 0.9999


def test_checkpoint_round_trip_and_corruption_errors(tmp_path):
    model = nets.FaceDetector((4, 8, 8, 8))
    checkpoints.save_model(tmp_path, "detector", "detector", {"widths": [4, 8, 8, 8]}, model, profile="smoke", seed=0)
    loaded = checkpoints.load_model("detector", tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-2, rtol=1e-2)  # stored as fp16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["models"]["detector"]["sha256"]) == 64
    with open(tmp_path / "detector.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(checkpoints.CheckpointError, match="corrupted.*pulid-lab pretrain --profile smoke"):
        checkpoints.load_model("detector", tmp_path)
    (tmp_path / "detector.safetensors").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="missing checkpoint file"):
        checkpoints.load_model("detector", tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="no model 'probe'"):
        checkpoints.load_model("probe", tmp_path)


def test_smoke_pretrain_writes_every_model_and_resumes(smoke_models):
    tmp_path, report = smoke_models
    cfg = pretrain_config("smoke")
    assert set(report) == set(cfg.nets) | {"base"}
    manifest = checkpoints.read_manifest(tmp_path)
    assert set(manifest["models"]) == set(cfg.nets) and "phi_cond_onnx" in manifest["files"] and "base" in manifest
    before = (tmp_path / "probe.safetensors").read_bytes()
    pretrain(cfg, tmp_path, resume=True, progress=False)  # nothing to redo
    assert (tmp_path / "probe.safetensors").read_bytes() == before
    out = check_models(tmp_path, variants=2, n_pairs=200, n_ids=20)
    for key in ("probe_accuracy", "phi_cond_verification", "phi_loss_verification", "phi_eval_verification",
                "phi_cond_onnx_vs_torch"):
        assert key in out
    assert out["phi_cond_onnx_vs_torch"] >= THRESHOLDS["onnx_vs_torch"]
    base = check_base_model(tmp_path, n=8, seeds_per_caption=2, base_steps=4, prototype_ids=world.TRAIN_IDS[:20])
    for key in ("base_prompt_score", "lightning_prompt_score", "base_identity_diversity", "identity_legibility",
                "probe_fd_lightning", "probe_fd_base"):
        assert key in base and np.isfinite(base[key]), key
    assert 0 <= base["base_prompt_score"] <= 1


def test_face_analysis_rejects_bad_references():
    analysis = FaceAnalysis()
    with pytest.raises(ValueError, match="32x32"):
        analysis.embed(np.zeros((3, 64, 64, 3), np.uint8))
    emb = analysis.embed(world.render([0], world.sample_attributes(np.random.default_rng(0), 1), [0]).images)
    assert emb.shape == (1, 512)


@pytest.mark.parametrize("view", ["full", "crop"])
def test_a_banks_faces_are_computed_once_and_a_rows_conditioning_does_not_depend_on_its_batch(view, monkeypatch,
                                                                                               tmp_path):
    monkeypatch.setenv("PULID_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(identity, "FACES_CHUNK", 4)
    n = 10
    images = world.render(np.arange(n), world.sample_attributes(np.random.default_rng(1), n), np.arange(n)).images
    rows = RowConditioner(IDConditioner(view=view), images)
    calls = []
    embed = rows.faces.faces.embed
    monkeypatch.setattr(rows.faces.faces, "embed", lambda imgs, boxes=None: calls.append(len(imgs)) or embed(imgs, boxes))
    direct = IDConditioner(view=view)
    emb, _ = rows(np.array([9, 1, 9]))  # rows of chunks 0 and 2 only
    assert calls == [4, 2] and not list(tmp_path.glob("faces-*.npz"))  # the bank is not complete: no cache file yet
    for lo in (8, 0, 4):  # the chunks, in any order: the direct path on the same batches gives the same bits
        emb0, feats0 = direct(images[lo:lo + 4])
        emb, feats = rows(np.arange(lo, min(lo + 4, n)))
        assert torch.equal(emb, emb0) and all(torch.equal(a, b) for a, b in zip(feats, feats0))
    assert calls == [4, 2, 4]  # each chunk embedded once
    assert len(list(tmp_path.glob("faces-*.npz"))) == 1  # complete: cached on disk
    monkeypatch.setattr(identity.FaceAnalysis, "embed", lambda *a: pytest.fail("cached faces computed again"))
    again = identity.BankFaces(images, FaceAnalysis()).all()  # a fresh FaceAnalysis: its embed now fails
    assert np.array_equal(again[0], rows.faces.boxes) and np.array_equal(again[1], rows.faces.embeddings)


def test_a_banks_faces_computed_in_worker_processes_are_the_same_faces(monkeypatch, tmp_path):
    monkeypatch.setenv("PULID_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(identity, "FACES_CHUNK", 4)
    n = 22  # six chunks, the last one short
    images = world.render(np.arange(n), world.sample_attributes(np.random.default_rng(2), n), np.arange(n)).images
    here = identity.BankFaces(images, FaceAnalysis())
    here.rows(np.arange(n))
    (cached,) = tmp_path.glob("faces-*.npz")
    cached.unlink()
    boxes, emb = identity.BankFaces(images, FaceAnalysis()).all(workers=2)
    np.testing.assert_allclose(boxes, here.boxes, atol=1e-5)
    np.testing.assert_allclose(emb, here.embeddings, atol=1e-4)
    assert (np.linalg.norm(emb, axis=1) > 0).all() and cached.exists()  # every row filled, and cached again


def test_shipped_models_meet_the_thresholds_on_a_small_sample():
    out = check_models(variants=3, n_pairs=1500, n_ids=120)
    assert out["profile"] == "paper"
    assert min(out["probe_accuracy"].values()) >= THRESHOLDS["probe_accuracy"], out["probe_accuracy"]
    for name in ("phi_cond", "phi_loss", "phi_eval"):
        assert out[f"{name}_verification"] >= THRESHOLDS["verification"], (name, out)
    assert out["phi_cond_onnx_vs_torch"] >= THRESHOLDS["onnx_vs_torch"]
    assert out["passed"]["face_check"], out["face_check"]  # faces kept, faceless kinds it never saw refused


def test_pretrain_resume_keeps_the_base_unless_its_recipe_changed(smoke_models, tmp_path):
    """The manifest records the base's training recipe; --resume keeps a finished base trained with the same
    recipe and retrains one whose recipe changed (here the face weighting of the loss)."""
    import shutil
    from dataclasses import replace
    shutil.copytree(smoke_models[0], tmp_path / "m")
    folder, cfg = tmp_path / "m", pretrain_config("smoke")
    unet = folder / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    assert checkpoints.read_manifest(folder)["base"]["training"]["face_weight"] == cfg.base.face_weight
    pretrain(cfg, folder, resume=True, only=["base"], progress=False)
    assert unet.read_bytes() == before
    changed = replace(cfg, base=replace(cfg.base, face_weight=cfg.base.face_weight + 1.0))
    pretrain(changed, folder, resume=True, only=["base"], progress=False)
    assert unet.read_bytes() != before
    assert checkpoints.read_manifest(folder)["base"]["training"]["face_weight"] == cfg.base.face_weight + 1.0


def test_finished_base_pretrain_leaves_no_resume_state(smoke_models):
    from pulid_lab.train.pretrain import train_state_dir
    out, _ = smoke_models
    assert not train_state_dir(out, "base").exists() and not train_state_dir(out, "base").parent.exists()


@pytest.fixture(scope="module")
def shipped_base_check():
    from pulid_lab.train.check_models import check_base_model
    return check_base_model(n=48, seeds_per_caption=4, base_steps=25)


def test_shipped_base_lightning_sampler_and_identity_legibility(shipped_base_check):
    from pulid_lab.train.check_models import BASE_THRESHOLDS
    r = shipped_base_check
    assert r["lightning_prompt_score"] >= BASE_THRESHOLDS["lightning_over_base"] * r["base_prompt_score"], r
    assert r["identity_legibility"] >= BASE_THRESHOLDS["identity_legibility"], r
    assert r["base_identity_diversity"] < 0.5 * r["same_identity_cosine_renders"], r


def test_shipped_base_prompt_score(shipped_base_check):
    from pulid_lab.train.check_models import BASE_THRESHOLDS
    assert shipped_base_check["base_prompt_score"] >= BASE_THRESHOLDS["base_prompt_score"], shipped_base_check
