import copy
import json

import pytest
import torch

from pulid_lab.core.sampling import diffusion_targets, lightning_sample, naive_x0, training_scheduler
from pulid_lab.models.base import BaseModelConfig, OriginalModel, initial_noise
from pulid_lab.models.text import build_tokenizer, load_text, tokenize
from pulid_lab.train.base_trainer import BaseTraining, train_base
from pulid_lab.world import toyfaces as world
from pulid_lab.world import vocab
from pulid_lab.world.data import render_bank

TINY = BaseModelConfig(block_out_channels=(16, 32, 32), attention_head_dim=16, norm_num_groups=8,
                       text_hidden=32, text_layers=1, text_heads=2)


def _assert_same_weights(a, b, atol=1e-8):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=atol), k


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return OriginalModel(TINY).eval()


def test_tokenizer_round_trip_and_vocabulary_error(tmp_path, tiny):
    tok = build_tokenizer()
    ids = tokenize(tok, ["a portrait, sketch, blue background, close-up"])
    assert tok.convert_ids_to_tokens(ids[0][:11].tolist()) == [
        "<bos>", "a", "portrait", ",", "sketch", ",", "blue", "background", ",", "close-up", "<eos>"]
    longest = vocab.caption({a: v[0] if a != "position" else "center" for a, v in vocab.ATTRIBUTES.items()})
    assert (tokenize(tok, [longest])[0] == 2).any()  # <eos> fits: nothing truncated
    with pytest.raises(vocab.VocabularyError, match="'anime'"):
        tokenize(tok, ["a portrait, anime"])
    tiny.save(tmp_path)
    tok2, enc2 = load_text(tmp_path)
    assert torch.equal(tokenize(tok2, ["a portrait, hat"]), tokenize(tok, ["a portrait, hat"]))
    mask = tiny.token_mask(["a portrait, sketch, blue background, close-up", "a portrait, hat"])
    assert mask.tolist()[0] == [True] * 11 + [False] * 21 and mask[1].sum() == 6  # <bos> ... <eos>, then padding
    loaded = OriginalModel.load(tmp_path, TINY)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(["a portrait, hat"]), tiny.encode(["a portrait, hat"]), atol=2e-2)  # fp16 storage
        x = initial_noise(1, 0)
        t = torch.tensor([500])
        tokens = tiny.encode(["a portrait"])
        assert torch.allclose(loaded.predict(x, t, tokens), tiny.predict(x, t, tokens), atol=2e-2)


def test_samplers_are_deterministic_given_a_seed(tiny):
    caps = ["a portrait, sketch", "a portrait, red background"]
    for solver, steps in (("dpm++", 6), ("ddim", 5), ("lightning", 4)):
        a = tiny.generate(caps, seed=3, steps=steps, solver=solver)
        b = tiny.generate(caps, seed=3, steps=steps, solver=solver)
        assert torch.equal(a, b), solver
        assert a.shape == (2, 3, 32, 32)
    single = tiny.generate(caps[1:], seed=[4], steps=4, solver="lightning")
    assert torch.allclose(single[0], tiny.generate(caps, seed=3, steps=4, solver="lightning")[1], atol=1e-5)


def test_few_step_sampler_output_stays_in_range(tiny):
    """The schedule trap (docs/method.md, "The noise schedule"): with v-prediction the first step from t=999 must not explode."""
    fn = tiny.model_fn(["a portrait"] * 2)
    with torch.no_grad():
        for solver in ("ddim", "dpm++"):
            from pulid_lab.core.sampling import sample
            x = sample(fn, initial_noise(2, 0), steps=4, solver=solver)
            assert x.abs().max() < 20, solver


def _adapter_fn(model, scale_param):
    tokens = model.encode(["a portrait, hat"] * 2)
    return lambda x, t, step: model.predict(x, t, tokens * (1 + scale_param))


def test_gradients_reach_noise_and_adapter_through_all_lightning_steps(tiny):
    p = torch.zeros((), requires_grad=True)  # stands in for an adapter parameter
    x_T = initial_noise(2, 0).requires_grad_(True)
    out = lightning_sample(_adapter_fn(tiny, p), x_T, steps=4)
    out.square().mean().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    assert p.grad is not None and p.grad.abs() > 0
    # only the last k steps carry gradients: with k=1, x_T gets none
    x_T2 = initial_noise(2, 0).requires_grad_(True)
    out = lightning_sample(_adapter_fn(tiny, p), x_T2, steps=4, grad_steps=1)
    out.square().mean().backward()
    assert x_T2.grad is None


def test_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for use_checkpoint in (True, False):
        p = torch.zeros((), requires_grad=True)
        x_T = initial_noise(2, 1).requires_grad_(True)
        lightning_sample(_adapter_fn(tiny, p), x_T, steps=4, use_checkpoint=use_checkpoint).square().mean().backward()
        grads.append((p.grad.clone(), x_T.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_naive_x0_inverts_the_forward_process():
    sched = training_scheduler()
    x0, noise = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    t = torch.tensor([10, 500, 990])
    x_t, v = diffusion_targets(x0, noise, t, sched)
    assert torch.allclose(naive_x0(x_t, v, t, sched), x0, atol=1e-4)


def test_base_training_resumes_to_the_same_weights(tmp_path):
    bank = render_bank(world.TRAIN_IDS[:16], 2, seed=0, progress=False)
    cfg = BaseTraining(model=TINY, steps=6, batch=4, checkpoint_every=2)
    full, _ = train_base(cfg, bank, tmp_path / "a", progress=False)
    train_base(cfg, bank, tmp_path / "b", progress=False, stop_after=4)  # "interrupted" after step 4
    resumed, stats = train_base(cfg, bank, tmp_path / "b", progress=False, resume=True)
    assert stats["resumed_from_step"] == 4
    _assert_same_weights(full, resumed, atol=1e-6)


def test_caption_labels_name_each_attribute_or_silence():
    from pulid_lab.train.base_trainer import caption_labels
    labels = caption_labels(["a portrait, blue background, glasses, on the right", ""])
    assert labels["background"].tolist() == [vocab.ATTRIBUTES["background"].index("blue"), len(vocab.ATTRIBUTES["background"])]
    assert labels["glasses"].tolist() == [1, 2] and labels["position"].tolist() == [2, 3]
    assert labels["hat"].tolist() == [2, 2]  # silent in both


def test_resume_refuses_a_state_written_by_another_recipe(tmp_path):
    """An interrupted run resumes only under the recipe that wrote its state: a changed loss weight or
    architecture gets a clear error instead of a model trained half one way and half the other."""
    from dataclasses import replace
    bank = render_bank(world.TRAIN_IDS[:16], 2, seed=0, progress=False)
    cfg = BaseTraining(model=TINY, steps=4, batch=4, checkpoint_every=2)
    train_base(cfg, bank, tmp_path, progress=False, stop_after=2)
    for changed in (replace(cfg, face_weight=4.0), replace(cfg, model=replace(TINY, coord_channels=True))):
        with pytest.raises(ValueError, match="another training recipe"):
            train_base(changed, bank, tmp_path, progress=False, resume=True)
    _, stats = train_base(cfg, bank, tmp_path, progress=False, resume=True)
    assert stats["resumed_from_step"] == 2


def test_caption_reading_trains_a_reader_and_resumes_with_it(tmp_path):
    """The reading loss joins the total, its head's state travels with the resume state, and a run continued
    from a trained model (init) starts from that model's weights."""
    bank = render_bank(world.TRAIN_IDS[:16], 2, seed=0, progress=False)
    cfg = BaseTraining(model=TINY, steps=6, batch=4, checkpoint_every=2, caption_reading=0.5)
    plain, plain_stats = train_base(BaseTraining(model=TINY, steps=6, batch=4), bank, tmp_path / "p", progress=False)
    full, stats = train_base(cfg, bank, tmp_path / "a", progress=False)
    assert stats["final_loss"] > plain_stats["final_loss"] + 0.1  # + 0.5 x cross-entropy over 9 attributes
    train_base(cfg, bank, tmp_path / "b", progress=False, stop_after=4)
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["reader"] is not None
    resumed, _ = train_base(cfg, bank, tmp_path / "b", progress=False, resume=True)
    _assert_same_weights(full, resumed, atol=1e-6)
    continued, _ = train_base(BaseTraining(model=TINY, steps=1, batch=4, lr=0.0), bank, tmp_path / "c",
                              progress=False, init=full)
    _assert_same_weights(full, continued)  # lr 0: the continued run keeps the init weights


def test_face_weight_map_weights_the_face_box_and_changes_the_loss(tmp_path):
    """Inside the face box the weight is (1 + w) times the weight outside, each image's map averages 1, the box
    sits where the renderer drew the face (the face's pixels differ from the background's), and a run with the
    weighting trains on a different loss than plain MSE from the same batches."""
    from pulid_lab.train.base_trainer import face_weight_map
    bank = render_bank(world.TRAIN_IDS[:16], 2, seed=0, progress=False)
    w = face_weight_map(torch.tensor(bank.boxes), 4.0)[:, 0]
    assert w.shape == (32, 32, 32) and torch.allclose(w.mean((1, 2)), torch.ones(32))
    inside = w > w.amin((1, 2), keepdim=True)
    assert torch.allclose(w.amax((1, 2)) / w.amin((1, 2)), torch.full((32,), 5.0))
    assert 0.1 < inside.float().mean() < 0.5
    cx, cy = bank.boxes[0, 0], bank.boxes[0, 1]
    assert inside[0, int(cy), int(cx)] and not inside[0, 0, 0] and not inside[0, 31, 31]
    assert torch.equal(face_weight_map(torch.tensor(bank.boxes), 0.0), torch.ones(32, 1, 32, 32))
    _, plain = train_base(BaseTraining(model=TINY, steps=3, batch=4), bank, tmp_path / "p", progress=False)
    _, weighted = train_base(BaseTraining(model=TINY, steps=3, batch=4, face_weight=4.0), bank, tmp_path / "w",
                             progress=False)
    assert abs(weighted["final_loss"] - plain["final_loss"]) > 1e-4


def test_coordinate_channels_and_per_block_self_attention_survive_save_and_load(tmp_path):
    """``coord_channels`` feeds each pixel's x and y (x = -1 at the left edge, +1 at the right) as two extra
    input channels the UNet really reads; ``only_cross_attention`` per block puts self-attention at 8x8 only.
    Both come back from the saved config."""
    from dataclasses import replace

    from pulid_lab.models.base import base_config_dict, base_config_from_dict, coordinate_grid
    grid = coordinate_grid(torch.zeros(2, 3, 4, 5))
    assert grid.shape == (2, 2, 4, 5)
    assert grid[0, 0, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and grid[0, 1, :, 0].tolist()[0] == -1.0
    cfg = replace(TINY, coord_channels=True, only_cross_attention=(True, True, False))
    torch.manual_seed(0)
    model = OriginalModel(cfg).eval()
    assert model.unet.conv_in.in_channels == 5
    self_attention = [tb.only_cross_attention is False for b in model.unet.down_blocks if hasattr(b, "attentions")
                      for a in b.attentions for tb in a.transformer_blocks]
    assert self_attention == [False, True]  # 16x16 cross-attention only, 8x8 self- and cross-attention
    x, t, tokens = initial_noise(1, 0), torch.tensor([500]), model.encode(["a portrait, on the left"])
    with torch.no_grad():
        before = model.predict(x, t, tokens)
        model.unet.conv_in.weight[:, 3:].add_(0.5)  # change only what the coordinate channels feed in
        assert (model.predict(x, t, tokens) - before).abs().max() > 1e-3
        model.save(tmp_path)
        loaded_cfg = base_config_from_dict(json.loads(json.dumps(base_config_dict(cfg))))  # as the manifest stores it
        assert loaded_cfg == cfg
        loaded = OriginalModel.load(tmp_path, loaded_cfg)
        assert torch.allclose(loaded.predict(x, t, tokens), model.predict(x, t, tokens), atol=2e-2)
        # the coordinates are appended inside the UNet: the PuLID branches call it with 3 channels, as any caller
        from pulid_lab.core.attention import install
        from pulid_lab.core.branches import unet_fn
        with install(model.unet):
            assert torch.equal(unet_fn(model.unet, tokens)(x, t, 0), model.predict(x, t, tokens))
        again = OriginalModel(cfg, model.tokenizer, model.text_encoder, copy.deepcopy(model.unet))  # hook twice
        assert torch.equal(again.predict(x, t, tokens), model.predict(x, t, tokens))
