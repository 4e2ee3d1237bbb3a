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


def test_backpropagating_through_four_lightning_steps_does_more_work():
    from pulid_lab.train.bench import stage_step_breakdown
    k1, k4 = (stage_step_breakdown(stage=2, steps=1, batch=2, lightning_batch=1, grad_steps=k) for k in (1, 4))
    assert (k1["grad_steps"], k4["grad_steps"]) == (1, 4)
    # three more UNet steps in the backward pass (and their forward graphs): counted FLOPs, not time
    assert k4["gflop_per_step"] > k1["gflop_per_step"] * 1.2


def test_a_whole_iteration_at_k4_holds_more_memory_than_at_k1():
    from pulid_lab.train.bench import iteration_k4_over_k1
    r = iteration_k4_over_k1(stage=2, steps=1, batch=2, lightning_batch=2)
    if r["peak_growth_mib_k1"] is None:
        pytest.skip("this system cannot reset the peak resident set (/proc/self/clear_refs)")
    # the trainer keeps every backpropagated Lightning step's activations (no recomputation in the mini world)
    assert r["peak_growth_mib_k4"] > r["peak_growth_mib_k1"] > 0
    assert r["time_k4_over_k1"] > 0 and r["memory_k4_over_k1"] > 1
