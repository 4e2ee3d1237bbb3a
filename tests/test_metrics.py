"""Recognition threshold, bootstrap intervals, the oracle row and the claims' verdicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pulid_lab.core.metrics import bootstrap_interval, impostor_scores, threshold_at_far


def test_impostor_scores_take_every_pair_of_different_identities_once():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ids = np.array([0, 0, 1, 2])
    scores = impostor_scores(emb, ids)
    assert len(scores) == 5  # 6 pairs minus the one same-identity pair
    assert sorted(np.round(scores, 3)) == [0.0, 0.0, 0.6, 0.6, 0.8]
    with pytest.raises(ValueError, match="two different identities"):
        impostor_scores(emb[:2], ids[:2])


def test_threshold_accepts_the_asked_fraction_of_impostors():
    scores = np.random.default_rng(0).normal(size=100_000)
    t = threshold_at_far(scores, 0.01)
    assert (scores >= t).mean() == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(ValueError):
        threshold_at_far(scores, 1.5)


def test_bootstrap_interval_resamples_identities_not_rows():
    ids = np.repeat(np.arange(20), 8)
    rng = np.random.default_rng(1)
    identity_effect = np.repeat(rng.normal(size=20), 8)
    # every row of an identity shares its effect: 160 rows but only 20 independent draws
    values = identity_effect + 0.01 * rng.normal(size=160)
    mean, lo, hi = bootstrap_interval(values[None], ids)
    assert lo < mean < hi
    naive_half_width = 1.96 * values.std() / np.sqrt(len(values))  # as if the 160 rows were independent
    assert (hi - lo) / 2 > 2 * naive_half_width
    # a clear positive difference is decided, a pure-noise one is not
    assert bootstrap_interval((0.5 + 0.1 * rng.normal(size=160))[None], ids)[1] > 0
    noise = rng.normal(size=(3, 160))
    _, lo, hi = bootstrap_interval(noise - noise.mean(), ids)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="rows per seed"):
        bootstrap_interval(values[None], ids[:10])


def _runs(values_by_seed, ids):
    return [{"rows": {"face_sim": list(v), "prompt_score": list(v), "purity": list(v), "recognized": list(v),
                      "ids": list(ids)}, "phi_gap": 0.0} for v in values_by_seed]


def test_claims_are_decided_by_their_intervals():
    from pulid_lab.train.reproduce import claims, markdown_table, summarise
    ids = np.repeat(np.arange(12), 8)
    rng = np.random.default_rng(0)
    noise = lambda: 0.02 * rng.normal(size=(2, len(ids)))  # noqa: E731
    results = {"stage1": _runs(0.2 + noise(), ids), "naive": _runs(0.5 + noise(), ids),
               "stage2": _runs(0.5 + noise(), ids), "stage3": _runs(0.1 + noise(), ids)}
    out = claims(results)
    assert out["1_naive_raises_face_sim_over_stage1"]["verdict"] == "held"
    assert out["2_lightning_raises_face_sim_over_naive"]["verdict"] == "undecided"  # equal means
    assert out["5_stage3_keeps_90pct_of_stage2_face_sim"]["verdict"] == "failed"
    diff = out["1_naive_raises_face_sim_over_stage1"]["differences"][0]
    assert diff["mean"] == pytest.approx(0.3, abs=0.01) and len(diff["per_seed"]) == 2
    table = summarise(results)
    table["claims"] = out
    md = markdown_table(table)
    assert "**held**" in md and "**undecided**" in md and "**failed**" in md
    assert table["rows"]["stage1"]["face_sim"]["ci"][0] < 0.2 < table["rows"]["stage1"]["face_sim"]["ci"][1]


def test_the_oracle_renders_the_reference_identity_with_the_prompted_attributes():
    from pulid_lab.train.evaluate import Evaluator, oracle, oracle_images, test_set
    from pulid_lab.world import vocab
    tests = test_set(n_ids=3)
    images = oracle_images(tests)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    ev = Evaluator()
    labels = {a: ev.probe(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1))[a].argmax(1)
              for a in ("style", "background")}
    for i, prompt in enumerate(tests.prompts):
        asked = vocab.parse(prompt)
        assert vocab.ATTRIBUTES["background"][int(labels["background"][i])] == asked["background"]
    report = oracle(ev, tests)
    assert report["face_sim"] > 0.8 and report["recognized"] >= 0.9 and report["purity"] is None
    assert 0 < ev.recognition_threshold < 1
    assert len(report["rows"]["face_sim"]) == 24 and report["rows"]["ids"][:8] == [int(tests.ids[0])] * 8


def test_reconstruction_prompts_each_reference_with_its_own_caption():
    from pulid_lab.train.evaluate import reconstruction_set, test_set
    from pulid_lab.world import vocab
    own, new = reconstruction_set(3, "validation", seeds_per_id=2), test_set(3, split="validation")
    assert len(own.prompts) == 6 and list(own.ids) == [int(i) for i in np.repeat(new.ids[::8], 2)]
    assert (own.references[::2] == new.references[::8]).all()  # the same references
    for prompt in own.prompts:
        assert all(v is not None for v in vocab.parse(prompt).values())  # a complete caption
    assert own.prompts[0] == own.prompts[1] != own.prompts[2] and own.seeds[0] != own.seeds[1]
    assert not set(own.seeds) & set(new.seeds)
