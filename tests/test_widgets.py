"""The ID-insertion explorer: its computation headless, and the widget built without a browser."""
import math
import subprocess
import sys

import numpy as np
import pytest

from pulid_lab.lessons import widgets
from pulid_lab.world import toyfaces as world
from pulid_lab.world.vocab import VocabularyError


def test_importing_widgets_does_not_import_ipywidgets():
    code = "import sys, pulid_lab.lessons.widgets; assert 'ipywidgets' not in sys.modules and 'IPython' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reference_for_is_a_fixed_young_render():
    img, attrs = widgets.reference_for(world.HELDOUT_IDS[3])
    again, _ = widgets.reference_for(world.HELDOUT_IDS[3])
    other, _ = widgets.reference_for(world.HELDOUT_IDS[3], look=1)
    assert img.shape == (32, 32, 3) and np.array_equal(img, again) and not np.array_equal(img, other)
    assert attrs["age"] == "young"
    with pytest.raises(ValueError, match="identity must be"):
        widgets.reference_for(world.N_TRAIN + world.N_HELDOUT)


@pytest.fixture(scope="module")
def lab(smoke_models):
    from pulid_lab.lessons.lab import open_lab
    models, _ = smoke_models
    return open_lab("smoke", models, "cpu", progress=False)


@pytest.fixture(scope="module")
def adapter(lab):
    from pulid_lab.core.adapter import PuLIDAdapter
    return PuLIDAdapter(lab.base.unet).eval()  # untrained: random ID projections change the output


def test_id_insertion_metrics(lab, adapter):
    r = widgets.id_insertion(lab, adapter, world.HELDOUT_IDS[0], "a portrait, comic, green background", 1.0, seed=4)
    assert r.with_id.shape == r.without_id.shape == r.reference.shape == (32, 32, 3)
    assert not np.array_equal(r.with_id, r.without_id)
    m = r.metrics()
    assert -1 <= m["face_sim"] <= 1 and -1 <= m["face_sim_without_id"] <= 1 and -1 <= m["purity"] <= 1 + 1e-6
    assert m["prompt_score"] in (0.0, 0.5, 1.0) and m["prompt_score_without_id"] in (0.0, 0.5, 1.0)
    off = widgets.id_insertion(lab, adapter, world.HELDOUT_IDS[0], "a portrait, comic, green background", 0.0, seed=4)
    assert np.array_equal(off.with_id, off.without_id) and off.purity == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(off.without_id, r.without_id)  # same prompt and noise
    assert "Face Sim" in widgets.describe_id_insertion(r)
    widgets.plot_id_insertion(r)


def test_id_insertion_prompt_errors_and_empty_prompts(lab, adapter):
    with pytest.raises(VocabularyError, match="unknown word 'moustache'"):
        widgets.id_insertion(lab, adapter, world.HELDOUT_IDS[0], "a portrait, moustache")
    r = widgets.id_insertion(lab, None, world.HELDOUT_IDS[0], "a portrait")
    assert math.isnan(r.prompt_score) and np.array_equal(r.with_id, r.without_id)


def test_explorer_builds_and_reacts(lab, adapter):
    pytest.importorskip("ipywidgets")
    box = widgets.id_insertion_explorer(lab, {"random": adapter, "none": None})
    assert set(box.controls) == {"identity", "prompt", "id_scale", "adapter", "seed"}
    first = box.result
    assert first is not None and first.identity == world.HELDOUT_IDS[0]
    box.controls["id_scale"].value = 0.0
    assert box.result.id_scale == 0.0 and np.array_equal(box.result.with_id, box.result.without_id)
    box.controls["prompt"].value = "a portrait, moustache"
    assert box.result is None  # the vocabulary error is shown, not raised
    box.controls["prompt"].value = "a portrait, hat"
    box.controls["adapter"].value = "none"
    assert box.result.prompt == "a portrait, hat"
    with pytest.raises(ValueError, match="adapters is empty"):
        widgets.id_insertion_explorer(lab, {})
