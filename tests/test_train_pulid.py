import numpy as np
import pytest
import torch

from pulid_lab.core.id_encoder import IDEncoderConfig
from pulid_lab.core.objective import NonFiniteLoss
from pulid_lab.models.base import load_base
from pulid_lab.train.pulid_trainer import (
    PuLIDTrainer,
    PuLIDTraining,
    load_adapter,
    reference_indices,
)
from pulid_lab.world import toyfaces as world
from pulid_lab.world.data import render_bank

SMALL = dict(batch=4, lightning_batch=2, align_batch=2, checkpoint_every=1, encoder=IDEncoderConfig(width=32, n_global=2))


@pytest.fixture(scope="module")
def bank():
    return render_bank(world.TRAIN_IDS[:12], 3, seed=0, progress=False)


def trainer(smoke_models, bank, out, **kw):
    models, _ = smoke_models
    return PuLIDTrainer(PuLIDTraining(**{**SMALL, **kw}), bank, out, models_dir=models)


@pytest.mark.parametrize("kw,terms", [
    (dict(stage=1), {"diff"}),
    (dict(stage=1, id_source="other"), {"diff"}),
    (dict(stage=2, id_loss="lightning", grad_steps=1), {"diff", "id"}),
    (dict(stage=2, id_loss="naive"), {"diff", "id"}),
    (dict(stage=3), {"diff", "id", "align_sem", "align_layout"}),
])
def test_each_stage_trains_only_the_adapter(smoke_models, bank, tmp_path, kw, terms):
    tr = trainer(smoke_models, bank, tmp_path, steps=2, **kw)
    base_before = {k: v.clone() for k, v in tr.base.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in tr.adapter.state_dict().items()}
    result = tr.fit(progress=False)
    assert terms | {"total"} <= set(result["log"][-1])
    assert all(np.isfinite(v) for v in result["log"][-1].values())
    assert all(torch.equal(v, tr.base.state_dict()[k]) for k, v in base_before.items())
    assert any(not torch.equal(v, tr.adapter.state_dict()[k]) for k, v in adapter_before.items())
    assert (tmp_path / "losses.csv").read_text().startswith("step,")
    loaded = load_adapter(tmp_path, load_base(smoke_models[0]).unet)
    assert all(torch.allclose(v, tr.adapter.state_dict()[k], atol=1e-2) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("masked", [False, True])
def test_stage3_masks_the_padding_out_of_the_semantic_term_only_when_asked(smoke_models, bank, tmp_path, monkeypatch,
                                                                           masked):
    from pulid_lab.core import losses
    seen, real = [], losses.align_semantic_loss

    def spy(cap_id, cap_plain, token_mask=None, reduction="sum"):
        seen.append(token_mask)
        return real(cap_id, cap_plain, token_mask, reduction)
    monkeypatch.setattr(losses, "align_semantic_loss", spy)
    trainer(smoke_models, bank, tmp_path, steps=1, stage=3, align_token_mask=masked).fit(progress=False)
    (mask,) = seen
    if not masked:
        assert mask is None
    else:  # (align_batch, 32): the short alignment prompts' own tokens, the rest padding
        assert mask.shape == (SMALL["align_batch"], 32) and mask[:, 0].all() and not mask[:, -1].any()


def test_resume_after_interruption_gives_the_same_weights(smoke_models, bank, tmp_path):
    full = trainer(smoke_models, bank, tmp_path / "full", steps=4)
    full.fit(progress=False)
    part = trainer(smoke_models, bank, tmp_path / "part", steps=4)
    part.fit(progress=False, stop_after=2)  # killed after step 2's checkpoint
    again = trainer(smoke_models, bank, tmp_path / "part", steps=4)
    result = again.fit(progress=False, resume=True)
    assert result["resumed_from_step"] == 2
    for k, v in full.adapter.state_dict().items():
        assert torch.allclose(v, again.adapter.state_dict()[k], atol=1e-6), k


def _poison_total(tr, at_step: int, poison) -> None:
    """Make the trainer's total loss ``poison(total)`` at one step."""
    real = tr.step_losses

    def poisoned(step):
        out = real(step)
        if step == at_step:
            out["total"] = poison(out["total"])
        return out
    tr.step_losses = poisoned


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(smoke_models, bank, tmp_path):
    tr = trainer(smoke_models, bank, tmp_path, steps=5)
    _poison_total(tr, 2, lambda total: total * float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"step 2 .*finite weights, step 2\) is .*train_state.pt.*--set lr=0.0005"):
        tr.fit(progress=False)
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["step"] == 2


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose step would poison the weights."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_nan_gradient_stops_before_the_weights_change(smoke_models, bank, tmp_path):
    tr = trainer(smoke_models, bank, tmp_path, steps=5)
    _poison_total(tr, 1, _NaNGradient.apply)
    with pytest.raises(NonFiniteLoss, match=r"gradient norm became nan at step 1 .*finite weights, step 1\)"):
        tr.fit(progress=False)
    assert all(torch.isfinite(v).all() for v in tr.adapter.state_dict().values())


def test_reference_indices_pick_another_render_of_the_same_identity(bank):
    rng = np.random.default_rng(0)
    idx = np.arange(len(bank))
    other = reference_indices(bank, idx, "other", rng)
    assert (bank.ids[other] == bank.ids[idx]).all() and (other != idx).all()
    assert (reference_indices(bank, idx, "same", rng) == idx).all()


def test_evaluate_on_a_tiny_set(smoke_models, bank, tmp_path):
    from pulid_lab.train.evaluate import Evaluator, evaluate, test_set
    tr = trainer(smoke_models, bank, tmp_path, steps=1)
    tr.fit(progress=False)
    tests = test_set(n_ids=2)
    assert len(tests.prompts) == 16 and len(set(tests.seeds)) == 16
    ev = Evaluator(smoke_models[0])
    report = evaluate(tr.base, tr.adapter, ev, tests, id_scales=(1.0, 0.0), batch=8, progress=False)
    for scale in (1.0, 0.0):
        r = report[scale]
        assert -1 <= r["face_sim"] <= 1 and 0 <= r["prompt_score"] <= 1 and r["n"] == 16
        assert set(r["rows"]) == {"face_sim", "recognized", "face_sim_phi_loss", "prompt_score", "purity", "ids"}
        assert all(len(v) == 16 for v in r["rows"].values()) and set(r["rows"]["recognized"]) <= {0.0, 1.0}
        assert r["recognized"] == pytest.approx(np.mean(np.array(r["rows"]["face_sim"]) >= ev.recognition_threshold))
        assert r["phi_gap"] == pytest.approx(np.mean(r["rows"]["face_sim_phi_loss"]) - r["face_sim"], abs=1e-5)
    assert report[0.0]["purity"] == pytest.approx(1.0, abs=1e-5)  # no ID: identical images


def test_adapter_remembers_its_reference_view_and_evaluation_follows_it(smoke_models, bank, tmp_path):
    from pulid_lab.train.evaluate import Evaluator
    models, _ = smoke_models
    tr = trainer(smoke_models, bank, tmp_path, steps=1, reference_view="full")
    tr.fit(progress=False)
    loaded = load_adapter(tmp_path, load_base(models).unet)
    assert loaded.reference_view == "full"
    ev = Evaluator(models)
    refs = bank.images[:2]
    full_feats, crop_feats = ev.condition(refs, loaded)[1], ev.condition(refs, None)[1]
    assert ev.conditioner_for(loaded).view == "full" and ev.conditioner_for(None).view == "crop"
    assert not torch.allclose(full_feats[-1], crop_feats[-1])  # the image encoder saw different pixels
    with pytest.raises(ValueError, match="reference_view must be one of"):
        PuLIDTraining(reference_view="face")
    with pytest.raises(ValueError, match="align_reduction must be one of"):
        PuLIDTraining(align_reduction="max")


def test_spread_rows_differ_in_identity_and_prompt():
    from pulid_lab.train.evaluate import spread_rows, test_set
    tests = test_set(n_ids=25)
    pick = spread_rows(tests, 6)
    assert len(set(tests.ids[pick])) == 6 and len(set(tests.prompts[i] for i in pick)) == 6
    small = test_set(n_ids=2)
    assert len(set(small.prompts[i] for i in spread_rows(small, 6))) == 6  # identities repeat, prompts do not


def test_validation_split_shares_nothing_with_the_test_set():
    """A recipe chosen on the validation split never saw a test identity, reference or noise seed; the test set
    is what it was before the split existed (the first held-out identities, noise from EVAL_SEED)."""
    from pulid_lab.train.evaluate import EVAL_SEED, test_set
    from pulid_lab.world import toyfaces as world
    test, val = test_set(150), test_set(50, split="validation")
    assert not set(test.ids) & set(val.ids) and not set(test.seeds) & set(val.seeds)
    assert list(test_set(3).ids[::8]) == list(world.HELDOUT_IDS[:3]) and test_set(3).seeds[0] == EVAL_SEED
    assert not any((val.references == r).all((1, 2, 3)).any() for r in test.references[::8])
    with pytest.raises(ValueError, match="validation split has 50 identities"):
        test_set(51, split="validation")
    with pytest.raises(ValueError, match="split must be one of"):
        test_set(2, split="train")


def test_prompt_score_needs_a_prompt_that_names_an_attribute(smoke_models):
    from pulid_lab.train.evaluate import Evaluator
    ev = Evaluator(smoke_models[0])
    images = torch.zeros(1, 3, 32, 32)
    assert ev.prompt_correct(images, ["a portrait, sketch"]).shape == (1,)
    with pytest.raises(ValueError, match="names no attribute"):
        ev.prompt_correct(images, ["a portrait"])


def test_reproduce_smoke_writes_table_claims_and_figures(smoke_models, tmp_path):
    import json

    from pulid_lab.lessons.plots import reproduction_figures
    from pulid_lab.train.reproduce import ROWS, reproduce
    models, _ = smoke_models
    table = reproduce(tmp_path / "run", "smoke", seeds=1, models_dir=models, progress=False)
    assert reproduction_figures(tmp_path / "run", tmp_path / "fig", models) == [tmp_path / "fig" / "table2.png",
                                                                              tmp_path / "fig" / "id_insertion.png"]
    assert set(table["rows"]) == set(ROWS) and len(table["claims"]) == 5
    saved = json.loads((tmp_path / "run" / "table2.json").read_text())
    assert saved["rows"]["stage3"]["face_sim"]["runs"] == table["rows"]["stage3"]["face_sim"]["runs"]
    assert "0.733" in (tmp_path / "run" / "table2.md").read_text()  # the paper's numbers beside ours
    assert (tmp_path / "fig" / "table2.png").exists() and (tmp_path / "fig" / "id_insertion.png").exists()
    # four rows, three trained stages shared along the chain: stage1 -> {naive, stage2 -> stage3}
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "stages").iterdir() if p.is_dir())
    assert stages == ["stage1", "stage2", "stage2", "stage3"]
    adapters = {r: json.loads((tmp_path / "run" / "seed0" / r / "result.json").read_text())["adapter"] for r in ROWS}
    assert len(set(adapters.values())) == 4
    assert saved["overrides"] == {}
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "run" / "stages").glob("*/adapter.safetensors")}
    reproduce(tmp_path / "run", "smoke", seeds=1, models_dir=models, progress=False)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime for p in (tmp_path / "run" / "stages").glob("*/adapter.safetensors")} == stamps
    _a_changed_recipe_retrains_only_what_it_changes(models, tmp_path, a=tmp_path / "run")


def _a_changed_recipe_retrains_only_what_it_changes(models, tmp_path, a):
    """(part of the smoke reproduction's test: it reuses that run as the default recipe ``a``)"""
    import json
    import shutil

    from pulid_lab.train.reproduce import reproduce
    tmp_path = tmp_path / "recipes"
    shutil.copytree(a / "stages", tmp_path / "b" / "stages")
    table = reproduce(tmp_path / "b", "smoke", seeds=1, models_dir=models, progress=False, lambda_layout=0.0)
    assert json.loads((tmp_path / "b" / "table2.json").read_text())["overrides"] == {"lambda_layout": 0.0}
    assert "lambda_layout = 0.0" in (tmp_path / "b" / "table2.md").read_text()
    # stages 1 and 2 are reused (their configs do not contain the Stage 3 weight); Stage 3 is new
    old = {r: json.loads((a / "seed0" / r / "result.json").read_text())["adapter"] for r in table["rows"]}
    new = {r: json.loads((tmp_path / "b" / "seed0" / r / "result.json").read_text())["adapter"] for r in table["rows"]}
    for row in ("stage1", "naive", "stage2"):
        assert old[row].split("/")[-1] == new[row].split("/")[-1]
    assert old["stage3"].split("/")[-1] != new["stage3"].split("/")[-1]
    with pytest.raises(ValueError, match="cannot override"):
        reproduce(tmp_path / "c", "smoke", seeds=1, models_dir=models, progress=False, eval_split="validation")
    with pytest.raises(ValueError, match="row of another recipe"):  # b's Stage 3 row is not the default recipe's
        reproduce(tmp_path / "b", "smoke", seeds=1, models_dir=models, progress=False)


def test_face_weight_and_id_dropout_change_only_what_they_name(smoke_models, bank, tmp_path):
    """face_weight reweighs L_diff's pixels; id_dropout hands L_diff's samples the unconditional ID tokens, and the
    naive ID loss then compares only samples that kept their ID (none here: every ID is dropped)."""
    plain = trainer(smoke_models, bank, tmp_path / "a", stage=2, id_loss="naive")
    with plain.adapter.installed(plain.base.unet):
        base_terms = plain.step_losses(0)
    weighted = trainer(smoke_models, bank, tmp_path / "b", stage=2, id_loss="naive", face_weight=4.0)
    with weighted.adapter.installed(weighted.base.unet):
        w_terms = weighted.step_losses(0)
    assert w_terms["diff"].item() != pytest.approx(base_terms["diff"].item(), rel=1e-4)
    assert w_terms["id"].item() == pytest.approx(base_terms["id"].item(), rel=1e-5)  # same images, same ID loss
    dropped = trainer(smoke_models, bank, tmp_path / "c", stage=2, id_loss="naive", id_dropout=0.999999)
    with dropped.adapter.installed(dropped.base.unet):
        d_terms = dropped.step_losses(0)
    assert d_terms["id"].item() == 0.0
    assert d_terms["diff"].item() != pytest.approx(base_terms["diff"].item(), rel=1e-4)
    with pytest.raises(ValueError, match="id_dropout"):
        PuLIDTraining(id_dropout=1.0)
    with pytest.raises(ValueError, match="face_weight"):
        PuLIDTraining(face_weight=-1.0)
