import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from pulid_lab.core import losses
from pulid_lab.core.adapter import PuLIDAdapter
from pulid_lab.core.attention import Capture, IDAttnSettings, IDProcessors, cross_attention_layers, heat_maps, install
from pulid_lab.core.branches import lightning_branch
from pulid_lab.core.id_encoder import IDEncoder, IDEncoderConfig
from pulid_lab.models.base import BaseModelConfig, OriginalModel, initial_noise


def tiny_unets():
    common = dict(layers_per_block=1, attention_head_dim=8, norm_num_groups=8)
    sd15 = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, **common)
    sdxl = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8, **common)
    mini = OriginalModel(BaseModelConfig(block_out_channels=(16, 32, 32), attention_head_dim=16, norm_num_groups=8,
                                         text_hidden=24, text_layers=1, text_heads=2)).unet
    return {"sd15": (sd15, 4, None), "sdxl": (sdxl, 4, {"text_embeds": torch.randn(2, 24), "time_ids": torch.randn(2, 6)}),
            "mini": (mini, 3, None)}


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "mini"])
def test_id_processor_is_exact_at_zero_scale_and_restores_originals(kind):
    torch.manual_seed(0)
    unet, ch, added = tiny_unets()[kind]
    unet.eval()
    size = unet.config.sample_size
    x, t, ctx = torch.randn(2, ch, size, size), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    kw = dict(added_cond_kwargs=added) if added else {}
    original = dict(unet.attn_processors)
    with torch.no_grad():
        ref = unet(x, t, ctx, **kw).sample
        procs = IDProcessors(unet, id_dim=24)
        tokens = torch.randn(2, 6, 24)
        with install(unet, procs):
            for args in ({"id_tokens": tokens, "id_scale": 0.0}, {"id_tokens": None, "id_scale": 1.0}):
                out = unet(x, t, ctx, cross_attention_kwargs=args, **kw).sample
                assert torch.allclose(out, ref, atol=1e-6)
            with_id = unet(x, t, ctx, cross_attention_kwargs={"id_tokens": tokens, "id_scale": 1.0}, **kw).sample
            assert (with_id - ref).abs().max() > 1e-3
        assert all(unet.attn_processors[k] is v for k, v in original.items())
    assert len(cross_attention_layers(unet)) == len(procs.procs) > 0


def test_ortho_adds_only_the_part_orthogonal_to_the_text_output():
    torch.manual_seed(0)
    proc = IDProcessors(tiny_unets()["sd15"][0], id_dim=24, settings=IDAttnSettings(ortho=True))
    p = next(iter(proc.procs.values()))

    class FakeAttn:
        heads = 2
    q = torch.randn(2, 2, 10, 8)
    text_out = torch.randn(2, 10, 16)
    term = p._id_term(FakeAttn(), q, text_out, torch.randn(2, 3, 24), 1.0)
    assert torch.allclose((term * text_out).sum(-2), torch.zeros(2, 16), atol=1e-4)
    with pytest.raises(ValueError):
        IDAttnSettings(ortho=True, ortho_v2=True)


@pytest.mark.parametrize("settings", [IDAttnSettings(num_zero=4), IDAttnSettings(ortho_v2=True, ortho_v2_tokens=2)])
def test_inference_options_change_the_output(settings):
    torch.manual_seed(0)
    unet = tiny_unets()["sd15"][0].eval()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 24)
    tokens = torch.randn(1, 3, 24)
    procs = IDProcessors(unet, id_dim=24)
    with torch.no_grad(), install(unet, procs):
        plain = unet(x, t, ctx, cross_attention_kwargs={"id_tokens": tokens}).sample
        procs.settings.__dict__.update(settings.__dict__)
        other = unet(x, t, ctx, cross_attention_kwargs={"id_tokens": tokens}).sample
    assert torch.isfinite(other).all() and (other - plain).abs().max() > 1e-4


def test_capture_keys_shapes_and_heat_maps():
    torch.manual_seed(0)
    unet = tiny_unets()["mini"][0].eval()
    cap = Capture(probs=True)
    with torch.no_grad(), install(unet):
        unet(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.randn(2, 7, 24),
             cross_attention_kwargs={"capture": cap, "step": 3})
    layers = {layer for layer, _ in cap.q}
    assert layers == {n.removesuffix(".processor") for n in cross_attention_layers(unet)}
    assert all(step == 3 for _, step in cap.q)
    sizes = {q.shape[1] for q in cap.q.values()}
    assert sizes == {256, 64}  # text cross-attention at 16x16 and 8x8
    assert all(k.shape == (2, 7, k.shape[-1]) for k in cap.k.values())
    assert not any(q.requires_grad for q in cap.q.values())
    assert heat_maps(cap, token=2).shape == (2, 32, 32)


def test_text_response_equals_the_explicit_softmax_formula():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 8), torch.randn(2, 4, 8)
    explicit = torch.softmax(k @ q.transpose(1, 2) / math.sqrt(8), -1) @ q  # softmax(K Q^T / sqrt d) Q
    assert torch.allclose(losses.text_response(q, k), explicit, atol=1e-6)


def test_alignment_losses_against_hand_computation():
    torch.manual_seed(0)
    a, b = Capture(), Capture()
    hand_sem, hand_lay = 0.0, 0.0
    for layer in ("l0", "l1"):
        for step in range(2):
            k = torch.randn(1, 3, 4)
            qa, qb = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
            a.q[(layer, step)], a.k[(layer, step)] = qa, k
            b.q[(layer, step)], b.k[(layer, step)] = qb, k
            ra = torch.softmax(k[0] @ qa[0].T / 2, -1) @ qa[0]
            rb = torch.softmax(k[0] @ qb[0].T / 2, -1) @ qb[0]
            hand_sem += sum(math.sqrt(((ra[i] - rb[i]) ** 2).sum()) for i in range(3)) / 3
            hand_lay += sum(math.sqrt(((qa[0, i] - qb[0, i]) ** 2).sum()) for i in range(5)) / 5
    assert losses.align_semantic_loss(a, b).item() == pytest.approx(hand_sem, rel=1e-5)
    assert losses.align_layout_loss(a, b).item() == pytest.approx(hand_lay, rel=1e-5)
    total, terms = losses.align_loss(a, b)
    assert total.item() == pytest.approx(0.6 * hand_sem + 0.1 * hand_lay, rel=1e-5)
    assert losses.align_semantic_loss(a, a).item() == 0
    # 'mean' divides by the 4 (layer, step) pairs
    assert losses.align_semantic_loss(a, b, reduction="mean").item() == pytest.approx(hand_sem / 4, rel=1e-5)
    assert losses.align_layout_loss(a, b, reduction="mean").item() == pytest.approx(hand_lay / 4, rel=1e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.align_layout_loss(a, b, reduction="max")


def test_diffusion_and_id_losses_against_hand_computation():
    v, w = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert losses.diffusion_loss(v, w).item() == pytest.approx(((v - w) ** 2).mean().item(), rel=1e-6)

    class Phi(torch.nn.Module):
        def forward(self, crops):
            return crops.mean((2, 3))

    class Det(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[16.0, 16.0, 16 / 1.2]]).repeat(len(images), 1)  # the whole image
    imgs = torch.rand(2, 3, 32, 32)
    ref = torch.randn(2, 3)
    emb = imgs.mean((2, 3))
    want = (1 - F.cosine_similarity(ref, emb)).mean().item()
    got = losses.id_loss(Phi(), ref, imgs, Det()).item()
    assert got == pytest.approx(want, abs=2e-3)  # bilinear resampling of the crop
    # without a detector (the real tier: phi does its own cropping) phi sees the images as they are
    assert losses.id_loss(Phi(), ref, imgs).item() == pytest.approx(want, rel=1e-5)


def test_pulid_objective_weighs_the_terms_and_refuses_unknown_ones():
    from pulid_lab.core.objective import pulid_objective
    terms = {"diff": torch.tensor(1.0), "id": torch.tensor(0.5), "align_sem": torch.tensor(2.0),
             "align_layout": torch.tensor(4.0)}
    out = pulid_objective(terms, lambda_id=1.0, lambda_sem=0.6, lambda_layout=0.1)
    assert out["total"].item() == pytest.approx(1.0 + 0.5 + 0.6 * 2.0 + 0.1 * 4.0)
    assert pulid_objective({"diff": torch.tensor(1.0)})["total"].item() == 1.0  # absent terms count 0
    assert pulid_objective({"align_sem": 2.0, "align_layout": 4.0}, lambda_sem=0.5, lambda_layout=0.0)["total"] == 1.0
    with pytest.raises(ValueError, match="unknown loss terms"):
        pulid_objective({"diff": torch.tensor(1.0), "idd": torch.tensor(1.0)})


@pytest.mark.parametrize("kind", ["mlp", "idformer"])
def test_id_encoder_shapes_and_unconditional_path(kind):
    torch.manual_seed(0)
    cfg = IDEncoderConfig(kind=kind, id_dim=16, feature_channels=(4, 8, 12), token_dim=24, width=32, n_global=2, n_queries=5)
    enc = IDEncoder(cfg)
    feats = [torch.randn(2, 4, 32, 32), torch.randn(2, 8, 16, 16), torch.randn(2, 12, 1, 1)]
    tok = enc(torch.randn(2, 16), feats)
    assert tok.shape == (2, cfg.n_tokens, 24)
    u = enc.uncond(torch.randn(2, 16), feats)
    assert torch.allclose(u[0], u[1], atol=1e-5)  # zeros in: the same tokens for every row (up to float noise)
    assert not torch.allclose(u, tok, atol=1e-3)
    with pytest.raises(ValueError, match="id_embedding"):
        enc(torch.randn(2, 15), feats)


def _setup_branch(seed=0):
    torch.manual_seed(seed)
    base = OriginalModel(BaseModelConfig(block_out_channels=(16, 32, 32), attention_head_dim=16, norm_num_groups=8,
                                         text_hidden=24, text_layers=1, text_heads=2))
    base.requires_grad_(False)
    cfg = IDEncoderConfig(id_dim=16, feature_channels=(4, 8), token_dim=24, width=32, n_global=2)
    adapter = PuLIDAdapter(base.unet, cfg)
    torch.nn.init.normal_(next(iter(adapter.processors.procs.values())).id_to_v.weight, std=0.5)
    feats = [torch.randn(2, 4, 32, 32), torch.randn(2, 8, 1, 1)]
    return base, adapter, torch.randn(2, 16), feats


def test_gradients_reach_the_adapter_and_not_the_frozen_base():
    base, adapter, emb, feats = _setup_branch()
    text = base.encode(["a portrait, sketch", "a portrait, hat"])
    with adapter.installed(base.unet):
        out = lightning_branch(base.unet, text, adapter.tokens(emb, feats), initial_noise(2, 0))
        loss, _ = losses.align_loss(out.capture_id, out.capture_plain)
        loss = loss + out.image_id.square().mean()
        loss.backward()
    assert len(out.capture_id.q) == 4 * len(out.capture_id.layers or cross_attention_layers(base.unet))
    enc_grads = [p.grad for p in adapter.encoder.parameters()]
    assert all(g is not None for g in enc_grads) and sum(g.abs().sum() for g in enc_grads) > 0
    assert all(p.grad is not None for p in adapter.processors.parameters())
    assert all(p.grad is None for p in base.parameters())


def test_alignment_gradients_are_the_same_with_and_without_checkpointing():
    grads = []
    for use_checkpoint in (True, False):
        base, adapter, emb, feats = _setup_branch(seed=1)
        text = base.encode(["a portrait, comic", "a portrait"])
        with adapter.installed(base.unet):
            out = lightning_branch(base.unet, text, adapter.tokens(emb, feats), initial_noise(2, 5),
                                   use_checkpoint=use_checkpoint)
            (losses.align_loss(out.capture_id, out.capture_plain)[0] + out.image_id.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def _align_grad(every: bool, use_checkpoint: bool, k: int = 1, with_image: bool = False):
    base, adapter, emb, feats = _setup_branch(seed=2)
    text = base.encode(["a portrait, comic", "a portrait"])
    with adapter.installed(base.unet):
        out = lightning_branch(base.unet, text, adapter.tokens(emb, feats), initial_noise(2, 3), grad_steps=k,
                               use_checkpoint=use_checkpoint, graph_every_step=every)
        steps_with_graph = sorted({s for (_, s), q in out.capture_id.q.items() if q.requires_grad})
        loss = losses.align_loss(out.capture_id, out.capture_plain)[0]
        (loss + out.image_id.mean() if with_image else loss).backward()
    return steps_with_graph, torch.cat([p.grad.flatten() for p in adapter.parameters() if p.grad is not None])


def test_graph_every_step_trains_alignment_at_every_step_and_keeps_l_id_on_the_last_k():
    """k = 1: without graph_every_step only step 3's captures have a graph; with it all four do (each step from a
    detached input), with the same gradients whether the steps are checkpointed or not. The image's gradient is
    unchanged: the chain to x0 still starts at the last k steps."""
    last_steps, last = _align_grad(False, False)
    every_steps, every = _align_grad(True, False)
    _, every_ckpt = _align_grad(True, True)
    assert last_steps == [3] and every_steps == [0, 1, 2, 3]
    assert not torch.allclose(every, last)
    torch.testing.assert_close(every, every_ckpt, rtol=1e-4, atol=1e-6)
    # the image path alone: identical with and without graph_every_step
    base, adapter, emb, feats = _setup_branch(seed=2)
    text = base.encode(["a portrait, comic", "a portrait"])
    grads = []
    for every_step in (False, True):
        adapter.zero_grad(set_to_none=True)
        with adapter.installed(base.unet):
            out = lightning_branch(base.unet, text, adapter.tokens(emb, feats), initial_noise(2, 3), grad_steps=1,
                                   with_plain=False, graph_every_step=every_step)
            out.image_id.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_capture_keeps_the_first_write_of_a_layer_and_step():
    """Checkpoint recomputation re-runs the processors in backward; the capture must keep what the loss used."""
    cap = Capture()
    first, second = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    cap.record("l", 0, first, first)
    cap.record("l", 0, second, second)
    assert cap.q[("l", 0)] is first and cap.keys() == [("l", 0)]
