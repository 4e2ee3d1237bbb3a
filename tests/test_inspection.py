"""ROC helpers (metrics), the lessons' measurements of the recognizers/probe, heat maps and loss curves."""
import numpy as np
import pytest
import torch

from pulid_lab.core.attention import IDLayer, KeptLayer
from pulid_lab.core.metrics import roc_auc, roc_curve
from pulid_lab.lessons import inspection


def _pairwise_auc(scores, same):
    pos, neg = scores[same], scores[~same]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_roc_curve_ends_monotone_and_auc_is_the_ranking_probability():
    rng = np.random.default_rng(0)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(same * 1.0, 1.0), 1)  # rounding makes ties
    fpr, tpr, thr = roc_curve(scores, same)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert roc_auc(scores, same) == pytest.approx(_pairwise_auc(scores, same), abs=1e-12)


def test_roc_auc_extremes_and_errors():
    same = np.array([True, True, False, False])
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), same) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), same) == 0.0
    assert roc_auc(np.ones(4), same) == 0.5
    with pytest.raises(ValueError, match="both genuine"):
        roc_curve(np.ones(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="1-d"):
        roc_curve(np.ones(3), np.ones(4, bool))


def test_colour_matched_renders_share_colours_not_structure():
    a, b, c = inspection.colour_matched_renders(n_ids=3, variants=2)
    assert a.shape == b.shape == c.shape == (6, 32, 32, 3) and a.dtype == np.uint8


def test_verification_scores_and_probe_accuracy_on_smoke_models(smoke_models):
    models, _ = smoke_models
    bank = inspection.heldout_bank(n_ids=4, variants=2)
    scores = inspection.verification_scores(bank, models, n_pairs=40)
    assert set(scores) == {"phi_cond", "phi_loss", "phi_eval"}
    for sets in scores.values():
        s, same = sets["random impostors"]
        assert s.shape == same.shape == (40,) and same.sum() == 20 and np.all(np.abs(s) <= 1 + 1e-5)
        s, same = sets["colour-matched impostors"]
        assert s.shape == (16,) and same.sum() == 8
    table = inspection.auc_table(scores)
    assert all(0 <= v <= 1 for sets in table.values() for v in sets.values())
    from pulid_lab.models import checkpoints
    acc = inspection.probe_accuracy(checkpoints.load_model("probe", models), bank)
    assert set(acc) == set(bank.labels) and all(0 <= v <= 1 for v in acc.values())
    inspection.plot_roc(scores), inspection.plot_probe_accuracy(acc)


def test_caption_heat_maps_one_map_per_word_per_resolution(smoke_models):
    from pulid_lab.models.base import load_base
    models, _ = smoke_models
    base = load_base(models)
    before = {k: type(v) for k, v in base.unet.attn_processors.items()}
    tm = inspection.caption_heat_maps(base, "a portrait, sketch, red background, on the left", seed=3)
    # phrases in the vocabulary's order, as base.encode feeds them to the text encoder
    assert tm.caption == "a portrait, red background, sketch, on the left"
    assert tm.words == ["a", "portrait", "red", "background", "sketch", "on", "the", "left"]
    assert sorted(tm.maps) == [8, 16]  # cross-attention lives at 16x16 and 8x8
    for side, m in tm.maps.items():
        assert m.shape == (8, 32, 32) and np.all(m >= 0)
        np.testing.assert_allclose(tm.total[side], 1.0, atol=1e-4)  # softmax over the text tokens
    assert tm.image.shape == (32, 32, 3) and tm.image.dtype == np.uint8
    assert {k: type(v) for k, v in base.unet.attn_processors.items()} == before  # hooks removed
    assert not any(isinstance(v, (IDLayer, KeptLayer)) for v in base.unet.attn_processors.values())
    inspection.plot_heat_maps([tm, tm])


def test_losses_csv_roundtrip_smooth_and_plot(tmp_path):
    from pulid_lab.core.files import write_log
    log = [{"step": i, "diff": 1.0 / (i + 1), "total": 1.0 / (i + 1)} for i in range(10)]
    write_log(tmp_path / "losses.csv", log)
    losses = inspection.read_losses(tmp_path / "losses.csv")
    assert list(losses) == ["step", "diff", "total"]
    np.testing.assert_allclose(losses["diff"], [r["diff"] for r in log], rtol=1e-6)
    np.testing.assert_allclose(inspection.smooth(np.array([1.0, 3, 5, 7]), 2), [1, 2, 4, 6])
    fig = inspection.plot_losses(tmp_path / "losses.csv", out=tmp_path / "loss.png")
    assert len(fig.axes) == 1 and (tmp_path / "loss.png").exists()  # total == diff: one panel


def test_adapter_parts_counts_what_trains(smoke_models):
    from pulid_lab.core.adapter import PuLIDAdapter
    from pulid_lab.models.base import load_base
    models, _ = smoke_models
    base = load_base(models)
    adapter = PuLIDAdapter(base.unet)
    rows = inspection.adapter_parts(adapter, base)
    trains = sum(r["parameters"] for r in rows if r["trains"])
    assert trains == sum(p.numel() for p in adapter.parameters())
    assert not {id(p) for p in adapter.parameters()} & {id(p) for p in base.parameters()}
    text = inspection.format_table(rows)
    assert "id_to_k, id_to_v of 7 attn2 layers" in text and text.count("\n") == len(rows) + 1
    assert torch.is_tensor(next(adapter.parameters()))
