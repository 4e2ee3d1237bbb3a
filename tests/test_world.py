import numpy as np
import pytest
import torch

from pulid_lab.core.imaging import align_faces, to_tensor
from pulid_lab.world import toyfaces as world
from pulid_lab.world import vocab
from pulid_lab.world.data import ToyFacesDataset, as_image_batch

BASE = dict(background="blue", style="photo", lighting="front", glasses="no", hat="no",
            expression="neutral", position="center", scale="close-up", age="young")


def look(**change):
    return [{**BASE, **change}]


def test_render_is_deterministic_and_batch_independent():
    rng = np.random.default_rng(0)
    attrs = world.sample_attributes(rng, 6)
    a = world.render(np.arange(6), attrs, np.arange(6))
    b = world.render(np.arange(6), attrs, np.arange(6))
    assert a.images.shape == (6, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    single = world.render([3], {k: v[3:4] for k, v in attrs.items()}, [3])
    assert np.array_equal(single.images[0], a.images[3])
    other_seed = world.render([3], {k: v[3:4] for k, v in attrs.items()}, [99])
    assert not np.array_equal(other_seed.images[0], a.images[3])


def test_background_colour_is_controlled():
    for name, rgb in zip(vocab.ATTRIBUTES["background"], world.BACKGROUND_COLOURS):
        img = world.render([5], look(background=name), [0]).images[0].astype(float) / 255
        corner = img[1:4, 1:4].reshape(-1, 3).mean(0)
        assert np.abs(corner - rgb * 1.07).max() < 0.12, (name, corner, rgb)


@pytest.mark.parametrize("attribute", [a for a in vocab.ATTRIBUTES if a != "background"])
def test_every_attribute_changes_the_image(attribute):
    base = world.render([7], look(), [0]).images[0].astype(int)
    for value in vocab.ATTRIBUTES[attribute]:
        if value == BASE[attribute]:
            continue
        img = world.render([7], look(**{attribute: value}), [0]).images[0].astype(int)
        assert (np.abs(img - base).max(-1) > 25).sum() >= 3, (attribute, value)  # a visible change


def test_identity_changes_the_image_and_survives_attribute_changes():
    a = world.render([0, 1], look() * 2, [0, 0]).images.astype(int)
    assert np.abs(a[0] - a[1]).mean() > 3


def test_colour_matched_impostor_differs_only_in_structure():
    f = world.colour_matched_factors([10], [11])
    g, h = world.identity_factors([10]), world.identity_factors([11])
    for k in world.COLOUR_FACTORS:
        assert f[k][0] == g[k][0]
    structural = [k for k in f if k not in world.COLOUR_FACTORS]
    assert all(f[k][0] == h[k][0] for k in structural)
    imgs = world.render_factors({k: np.r_[g[k], f[k]] for k in f}, look() * 2, [0, 0]).images.astype(int)
    assert (np.abs(imgs[0] - imgs[1]).max(-1) > 25).sum() >= 3


def test_identity_splits():
    assert len(world.TRAIN_IDS) >= 2000 and len(world.HELDOUT_IDS) >= 200
    assert not set(world.TRAIN_IDS) & set(world.HELDOUT_IDS)
    f = world.identity_factors(np.arange(300))
    keys = np.stack([f[k] for k in ("face_shape", "hair_style", "hair_colour", "skin", "eye_spacing")], 1)
    assert len({tuple(r) for r in keys}) == 300  # identities are distinct draws
    assert np.array_equal(world.identity_factors([42])["eye_spacing"], world.identity_factors([42])["eye_spacing"])


def test_caption_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(50):
        attrs = {a: (rng.choice(v) if rng.random() < 0.6 else None) for a, v in vocab.ATTRIBUTES.items()}
        text = vocab.caption(attrs)
        assert vocab.parse(text) == attrs
    assert vocab.parse("a portrait, sketch, blue background, glasses") == {
        **{a: None for a in vocab.ATTRIBUTES}, "style": "sketch", "background": "blue", "glasses": "yes"}


def test_unknown_word_names_the_word_and_the_vocabulary():
    with pytest.raises(vocab.VocabularyError) as e:
        vocab.parse("a portrait, anime, blue background")
    msg = str(e.value)
    assert "'anime'" in msg and "sketch" in msg and "background" in msg
    with pytest.raises(vocab.VocabularyError, match="not understood"):
        vocab.parse("a portrait, blue light")
    with pytest.raises(vocab.VocabularyError, match="two values"):
        vocab.parse("a portrait, sketch, comic")


def test_dataset_items_and_incomplete_captions():
    ds = ToyFacesDataset("heldout", variants=2, seed=3, caption_dropout=0.5, ids=world.HELDOUT_IDS[:20], progress=False)
    img, cap, ident, attrs = ds[5]
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    assert ident in world.HELDOUT_IDS and set(attrs) == set(vocab.ATTRIBUTES)
    parsed = vocab.parse(cap)
    assert all(v is None or v == attrs[a] for a, v in parsed.items())
    n_mentioned = np.mean([sum(v is not None for v in vocab.parse(ds.caption(i)).values()) for i in range(len(ds))])
    assert 2 < n_mentioned < 7  # about half of the 9 attributes


def test_align_faces_centres_the_face():
    r = world.render([0, 0], look(position="left", scale="distant") + look(position="right"), [0, 1])
    crops = align_faces(to_tensor(r.images), torch.from_numpy(r.boxes))
    assert crops.shape == (2, 3, 32, 32)
    # the aligned crops of one identity at different layouts are much closer than the raw images
    raw = (to_tensor(r.images[:1]) - to_tensor(r.images[1:])).abs().mean()
    aligned = (crops[0] - crops[1]).abs().mean()
    assert aligned < 0.6 * raw


def test_bad_reference_images_get_clear_errors():
    with pytest.raises(ValueError, match="32x32"):
        as_image_batch(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="expected an image"):
        as_image_batch("face.png")
    with pytest.raises(ValueError, match="uint8"):
        as_image_batch(np.zeros((32, 32, 3), np.float64))


def test_canonical_caption_order():
    from pulid_lab.world import vocab
    assert vocab.canonical("a portrait, sketch, red background, glasses") == "a portrait, red background, sketch, glasses"
    assert vocab.canonical("a portrait, red background, sketch, glasses") == "a portrait, red background, sketch, glasses"
    assert vocab.canonical("") == ""
    with pytest.raises(vocab.VocabularyError):
        vocab.canonical("a portrait, purple hat")


def test_a_bank_rendered_in_worker_processes_is_the_same_bank():
    from pulid_lab.world.data import render_bank
    one = render_bank(world.TRAIN_IDS[:40], 16, seed=3, cache=False, progress=False)  # 640 faces: two chunks
    two = render_bank(world.TRAIN_IDS[:40], 16, seed=3, cache=False, progress=False, workers=2)
    assert np.array_equal(one.images, two.images) and np.array_equal(one.boxes, two.boxes)
    assert all(np.array_equal(one.labels[k], two.labels[k]) for k in one.labels)
