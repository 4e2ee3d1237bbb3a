"""The official EVA-CLIP input of the real tier's ID condition (pulid_lab.real.eva_input): 512x512 alignment on the
FFHQ template, face parsing (white background, grey face), and its wiring into id_condition — on CPU with the tiny
stand-ins (drawn faces, an antelopev2-like ONNX pack, TinyParser); no real weights, no downloads."""
from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pulid_lab.real import eva_input
from pulid_lab.real import pipeline as real
from pulid_lab.real import tiny as real_tiny
from pulid_lab.real.tiny import FACES, TinyParser, draw_faces, face_keypoints, tiny_extractor

TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])
MARKERS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], np.float64)


def _similar_keypoints(size: int, angle_deg: float = 12.0) -> np.ndarray:
    """The template moved by a known similarity onto the drawn face of ``draw_faces(size)`` (same eye distance and
    centre as its keypoints), rounded to whole pixels (so that markers can be painted centred on them)."""
    kps = face_keypoints(FACES[1], size).astype(np.float64)
    t = np.deg2rad(angle_deg)
    scale = np.linalg.norm(kps[1] - kps[0]) / np.linalg.norm(TEMPLATE[1] - TEMPLATE[0])
    rot = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    moved = (TEMPLATE - TEMPLATE.mean(0)) @ rot.T + kps.mean(0)
    return np.round(moved)


def test_alignment_maps_keypoints_onto_template():
    size = 512
    img = draw_faces(size).copy()
    kps = _similar_keypoints(size)
    for (x, y), colour in zip(kps.astype(int), MARKERS):
        img[y - 2:y + 3, x - 2:x + 3] = colour  # 5x5 markers centred on the keypoints
    crop = eva_input.align_face_512(img, kps)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    # the estimated similarity puts the keypoints on the template ...
    m = eva_input.alignment_matrix(kps)
    assert np.isclose(m[0, 0], m[1, 1]) and np.isclose(m[0, 1], -m[1, 0])  # rotation + uniform scale, no shear
    mapped = kps @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - TEMPLATE).max() < 1.0
    # ... and so does the warp itself: each marker's centroid in the crop lies on its template point
    pix = crop.reshape(-1, 3).astype(np.float64)
    ys, xs = np.divmod(np.arange(len(pix)), 512)
    for i, colour in enumerate(MARKERS):
        hit = np.linalg.norm(pix - colour, axis=1) < 40
        assert hit.sum() >= 9, f"marker {i} not found in the crop"
        centroid = np.array([xs[hit].mean(), ys[hit].mean()])
        assert np.abs(centroid - TEMPLATE[i]).max() < 1.0, (i, centroid, TEMPLATE[i])
    np.testing.assert_allclose(eva_input.FFHQ_TEMPLATE_512, TEMPLATE, atol=1e-5)


def test_alignment_border_and_errors():
    img = np.full((40, 40, 3), 200, np.uint8)  # a tiny image: most of the 512 crop lies outside it
    kps = _similar_keypoints(512) * (40 / 512)
    crop = eva_input.align_face_512(img, kps)
    assert (crop[0, 0] == eva_input.BORDER_RGB).all() and (crop[-1, -1] == eva_input.BORDER_RGB).all()
    with pytest.raises(ValueError, match="uint8"):
        eva_input.align_face_512(img.astype(np.float32), kps)
    with pytest.raises(ValueError, match="keypoints"):
        eva_input.align_face_512(img, kps[:3])


def _crop(seed: int = 0) -> np.ndarray:
    return eva_input.align_face_512(draw_faces(256, seed=seed), face_keypoints(FACES[1], 256))


def _expected(crop_u8: np.ndarray, parser) -> tuple[np.ndarray, np.ndarray]:
    """(expected EVA input (3, H, W), background mask (H, W)) computed here from the parser's argmax."""
    x = crop_u8.astype(np.float32) / 255.0
    norm = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    with torch.no_grad():
        logits = parser(torch.from_numpy(norm).permute(2, 0, 1)[None].contiguous())[0]
    labels = logits[0].argmax(0).numpy()
    bg = np.isin(labels, [0, 16, 18, 7, 8, 9, 14, 15])
    grey = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return np.where(bg, 1.0, grey)[None].repeat(3, 0), bg


def test_parsed_face_white_background_grey_face():
    assert set(eva_input.BACKGROUND_LABELS) == {0, 16, 18, 7, 8, 9, 14, 15}
    parser = TinyParser()
    crop = _crop()
    out = eva_input.parsed_face(crop, parser)
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float32
    want, bg = _expected(crop, parser)
    assert 0.05 < bg.mean() < 0.95, "the tiny parser should label some pixels background and some face"
    got = out[0].numpy()
    assert (got[:, bg] == 1.0).all()  # exactly white
    np.testing.assert_allclose(got[:, ~bg], want[:, ~bg], rtol=0, atol=1e-6)  # the grey luma
    assert (got[0] == got[1]).all() and (got[1] == got[2]).all()
    # a batch tensor (B, 3, H, W) in [0, 1] gives the same, image by image
    crops = np.stack([crop, _crop(seed=1)])
    batch = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    out2 = eva_input.parsed_face(batch, parser)
    assert out2.shape == (2, 3, 512, 512)
    torch.testing.assert_close(out2[:1], out, rtol=0, atol=0)
    torch.testing.assert_close(out2[1:], eva_input.parsed_face(crops[1], parser), rtol=0, atol=0)


def test_parsed_face_takes_any_callable_and_checks_its_output():
    crop = _crop()
    def everything_background(x):
        return (torch.zeros(len(x), 19, *x.shape[2:]),)

    assert (eva_input.parsed_face(crop, everything_background) == 1).all()
    face_logits = torch.zeros(1, 19, 512, 512)
    face_logits[:, 1] = 1.0  # everything skin
    out = eva_input.parsed_face(crop, lambda x: (face_logits,))
    x = torch.from_numpy(crop).float().permute(2, 0, 1) / 255
    torch.testing.assert_close(out[0, 0], 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
    with pytest.raises(ValueError, match="logits"):
        eva_input.parsed_face(crop, lambda x: (torch.zeros(1, 19, 64, 64),))


class Recording(nn.Module):
    """A feature extractor that records what it is given (the tiny open_clip-shaped ViT underneath)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_extractor()
        self.seen: list[torch.Tensor] = []

    def forward(self, crops):
        self.seen.append(crops.clone())
        return self.inner(crops)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("insightface")
    root = real_tiny.write_antelopev2(tmp_path_factory.mktemp("antelopev2"), FACES[1:])
    return real.load_face_analysis(root)


def test_id_condition_with_parser_feeds_the_official_input(app, monkeypatch):
    img = draw_faces(256)
    emb, crop112, kps = real.reference_face(img, app, return_kps=True)
    np.testing.assert_allclose(kps, face_keypoints(FACES[1], 256), atol=1e-3)  # where the tiny detector put it
    assert crop112.shape == (112, 112, 3)
    parser, fx = TinyParser(), Recording()
    id_vec, hidden = real.id_condition(img, app, fx, name="ref.png", parser=parser)
    (seen,) = fx.seen
    assert seen.shape == (1, 3, 512, 512)
    torch.testing.assert_close(seen, eva_input.parsed_face(eva_input.align_face_512(img, kps), parser))
    assert id_vec.shape == (1, 512 + 16) and len(hidden) == 5 and all(h.shape == (1, 17, 8) for h in hidden)

    monkeypatch.setattr(real, "_UNPARSED_WARNED", True)  # (the warning has its own test)
    fx0 = Recording()
    id_vec0, hidden0 = real.id_condition(img, app, fx0, name="ref.png")
    (seen0,) = fx0.seen
    assert seen0.shape == (1, 3, 112, 112)  # the unparsed 112 crop
    torch.testing.assert_close(seen0, real.crops_to_tensor(crop112))
    assert id_vec0.shape == id_vec.shape and [h.shape for h in hidden0] == [h.shape for h in hidden]
    torch.testing.assert_close(id_vec0[:, :512], id_vec[:, :512])  # antelopev2 embedding: unchanged
    torch.testing.assert_close(id_vec[:, :512], torch.from_numpy(emb)[None])
    # EVA saw another picture (the tiny ViT's CLS ignores the patches; its hidden states do not)
    assert not torch.allclose(hidden0[0], hidden[0])


def test_unparsed_warning_once(app, monkeypatch):
    monkeypatch.setattr(real, "_UNPARSED_WARNED", False)
    img = draw_faces(256)
    with pytest.warns(UserWarning, match=r"unparsed 112x112.*load_face_parser"):
        real.id_condition(img, app, tiny_extractor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real.id_condition(img, app, tiny_extractor())  # once is enough
        real.id_condition(img, app, tiny_extractor(), parser=TinyParser())
    assert not [w for w in caught if "face parser" in str(w.message)]


def test_load_face_parser_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*v0\.2\.0/parsing_bisenet\.pth"):
        eva_input.load_face_parser(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=r"parsing_bisenet\.pth not found"):
        eva_input.load_face_parser(tmp_path)  # a folder without the file
    torch.save(TinyParser().state_dict(), tmp_path / "parsing_bisenet.pth")
    monkeypatch.setitem(sys.modules, "facexlib", None)  # not installed
    with pytest.raises(ImportError, match="pip install facexlib"):
        eva_input.load_face_parser(tmp_path)


def test_load_face_parser_builds_bisenet_from_local_weights(tmp_path, monkeypatch):
    """facexlib is stood in for by a module whose BiSeNet is TinyParser: the loader's own path (file, strict
    load, eval, frozen, device) runs; facexlib's network itself is not exercised here."""
    fake = types.ModuleType("facexlib.parsing.bisenet")
    fake.BiSeNet = lambda num_class: TinyParser(num_class)
    for name, mod in (("facexlib", types.ModuleType("facexlib")),
                      ("facexlib.parsing", types.ModuleType("facexlib.parsing")),
                      ("facexlib.parsing.bisenet", fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    state = {k: v + 1 for k, v in TinyParser().state_dict().items()}
    torch.save(state, tmp_path / "parsing_bisenet.pth")
    parser = eva_input.load_face_parser(tmp_path, device="cpu")
    assert not parser.training and not any(p.requires_grad for p in parser.parameters())
    for k, v in parser.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth does not fit"):
        eva_input.load_face_parser(tmp_path / "wrong.pth", device="cpu")
