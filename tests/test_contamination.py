"""The leak measurement: prompts that contradict their reference, follow / copy rates per attribute."""
import numpy as np
import pytest

from pulid_lab.lessons import contamination
from pulid_lab.lessons.contamination import WITHOUT_ID
from pulid_lab.world import vocab


def test_leak_set_prompts_contradict_every_measured_attribute():
    lset = contamination.leak_set(40)
    assert len(lset) == 40 and lset.references.shape == (40, 32, 32, 3)
    assert list(lset.asked) == list(contamination.LEAK_ATTRIBUTES)
    for a, asked in lset.asked.items():
        assert np.all(asked != lset.reference_labels[a])
        assert len(np.unique(asked)) > 1
    for i, p in enumerate(lset.prompts):
        parsed = vocab.parse(p)
        assert {a: v for a, v in parsed.items() if v is not None} == {
            a: vocab.ATTRIBUTES[a][lset.asked[a][i]] for a in lset.asked}
    assert np.all(lset.reference_labels["age"] == 0)  # references are young: "old" is an edit
    again = contamination.leak_set(40)
    assert again.prompts == lset.prompts and np.array_equal(again.references, lset.references)
    assert contamination.leak_set(40, seed=1).prompts != lset.prompts
    sub = lset.subset([3, 5])
    assert sub.prompts == [lset.prompts[3], lset.prompts[5]] and sub.asked["style"].tolist() == lset.asked["style"][[3, 5]].tolist()


def test_leak_set_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="subset"):
        contamination.leak_set(4, attributes=("style", "mood"))
    with pytest.raises(ValueError, match="n must"):
        contamination.leak_set(0)


def test_rates_count_prompt_values_and_reference_values():
    lset = contamination.leak_set(4, attributes=("style", "hat"))
    pred = {a: lset.asked[a].copy() for a in lset.asked}
    pred["style"][:2] = lset.reference_labels["style"][:2]  # two outputs copy the reference's style
    r = contamination.rates(pred, lset)
    assert r["follow"] == {"style": 0.5, "hat": 1.0}
    assert r["copy"] == {"style": 0.5, "hat": 0.0}


@pytest.fixture(scope="module")
def smoke_lab(smoke_models):
    from pulid_lab.core.adapter import PuLIDAdapter
    from pulid_lab.models.base import load_base
    from pulid_lab.train.evaluate import Evaluator
    models, _ = smoke_models
    base = load_base(models)
    return base, Evaluator(models), PuLIDAdapter(base.unet).eval()  # untrained: random ID projections


def test_leak_rates_report(smoke_lab):
    base, evaluator, adapter = smoke_lab
    lset = contamination.leak_set(3)
    report = contamination.leak_rates(base, evaluator, lset, {"random adapter": adapter, "no adapter": None}, batch=2)
    assert list(report["conditions"]) == [WITHOUT_ID, "random adapter", "no adapter"]
    assert report["n"] == 3 and report["attributes"] == list(contamination.LEAK_ATTRIBUTES)
    for r in report["conditions"].values():
        for a in report["attributes"]:
            assert 0 <= r["follow"][a] <= 1 and 0 <= r["copy"][a] <= 1 and r["follow"][a] + r["copy"][a] <= 1
        assert r["follow_mean"] == pytest.approx(np.mean(list(r["follow"].values())))
    assert report["conditions"]["no adapter"] == report["conditions"][WITHOUT_ID]  # same prompt, same noise
    assert "follow  copy" in contamination.format_report(report)
    contamination.plot_leak(report)


def test_leak_examples_figure(smoke_lab, tmp_path):
    base, evaluator, adapter = smoke_lab
    fig = contamination.leak_examples(base, evaluator, contamination.leak_set(5), {"random": adapter}, n=2,
                                      out=tmp_path / "c.png")
    assert len(fig.axes) == 2 * 3 and (tmp_path / "c.png").exists()


def test_leak_by_scale_sweep(smoke_lab):
    base, evaluator, adapter = smoke_lab
    lset = contamination.leak_set(2)
    sweep = contamination.leak_by_scale(base, evaluator, lset, adapter, scales=(0.0, 1.0, 3.0))
    assert sweep["scales"] == [0.0, 1.0, 3.0] and len(sweep["by_scale"]) == 3
    assert sweep["by_scale"][0] == sweep[WITHOUT_ID]  # id_scale 0 is the original model
    report = contamination.leak_rates(base, evaluator, lset, {"a": adapter}, id_scale=3.0)
    assert sweep["by_scale"][2] == report["conditions"]["a"]  # same prompts, noise and scale
    for r in sweep["by_scale"]:
        assert all(0 <= r["follow"][a] + r["copy"][a] <= 1 for a in sweep["attributes"])
    contamination.plot_leak_by_scale(sweep)


def test_leak_verdicts_say_leaks_only_when_the_interval_is_above_zero():
    report = {"n": 96, "attributes": ["background", "lighting", "hat"], "conditions": {
        "without ID": {"copy": {"background": 0.10, "lighting": 0.20, "hat": 0.30}},
        "Stage 1": {"copy": {"background": 0.45, "lighting": 0.24, "hat": 0.05}}}}
    bg, light, hat = contamination.leak_verdicts(report, "Stage 1")
    assert bg.startswith("background: copied in 45% with Stage 1 vs 10% without ID (+35 points") and bg.endswith("leaks")
    assert light.endswith("no measurable leak")
    assert hat.endswith("copied less than by chance")
