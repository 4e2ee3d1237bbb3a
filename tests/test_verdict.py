"""The verdict helper: a direction only when the interval says so."""
import numpy as np
import pytest

from pulid_lab.lessons.verdict import Verdict, compare


def _result(values, ids):
    return {"rows": {"face_sim": list(values), "ids": list(ids)}}


def test_a_clear_gap_is_a_direction_and_noise_is_not():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(24), 8)
    base = rng.normal(0.4, 0.1, len(ids))
    better = _result(base + 0.05 + rng.normal(0, 0.01, len(ids)), ids)
    same = _result(base + rng.normal(0, 0.05, len(ids)), ids)
    v = compare(better, _result(base, ids), "Lightning", "naive", label="Face Sim")
    assert v.direction == 1 and 0.04 < v.low < v.mean < v.high < 0.06
    assert str(v) == f"Lightning beats naive in Face Sim by {v.mean:.3f} (95% CI {v.low:+.3f} to {v.high:+.3f})"
    assert compare(_result(base, ids), better, "naive", "Lightning").direction == -1
    w = compare(same, _result(base, ids), "A", "B")
    assert w.direction == 0 and str(w).startswith("no measurable difference between A and B in face sim")


def test_weights_nan_rows_and_mismatched_rows():
    ids = np.repeat(np.arange(4), 2)
    a, b = _result([1.0] * 8, ids), _result([1.0, np.nan] * 4, ids)
    v = compare(a, b, "Stage 3", "Stage 2", weight=0.9)
    assert v.mean == pytest.approx(0.1) and "0.9 x Stage 2" in str(v)
    with pytest.raises(ValueError, match="same rows"):
        compare(a, _result([1.0] * 6, ids[:6]), "A", "B")
    with pytest.raises(ValueError, match="'purity'"):
        compare(a, b, "A", "B", metric="purity")



def test_an_interval_that_contains_zero_has_no_direction():
    assert Verdict("a", "b", "m", 0.0, -0.1, 0.1).direction == 0
