"""The step breakdown of `pulid-lab bench --breakdown` (a measurement, not a timed test)."""
from __future__ import annotations

import pytest


def test_stage_step_breakdown_accounts_for_the_whole_step():
    from pulid_lab.train.bench import stage_step_breakdown
    r = stage_step_breakdown(stage=3, steps=1, batch=2, lightning_batch=1, align_batch=1)
    s = r["seconds"]
    assert {"conditioning", "diffusion_forward", "lightning_forward", "id_loss_forward", "backward", "optimiser",
            "other_forward", "total"} <= set(s)
    assert sum(v for k, v in s.items() if k != "total") == pytest.approx(s["total"], abs=5e-4)  # each rounded to 1e-4
    assert all(v >= 0 for v in s.values()) and s["lightning_forward"] > 0 and s["backward"] > 0
    assert r["gflop_per_step"] > 0 and 0 < r["flop_limited_fraction"]
