"""Our processors inside diffusers UNets of every attention block type: what diffusers users rely on keeps working.

Each tiny ``UNet2DConditionModel`` below has one kind of attention block: text cross-attention (SD 1.5- and
SDXL-shaped), simple cross-attention with added key/value projections (UnCLIP / Kandinsky-style), self-attention
blocks with a self-attention mid block, no mid block, and the mini world's UNet. ``make test-compat`` runs this file.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from pulid_lab.core.attention import GUARDED, IDProcessors, added_kv_layers, cross_attention_layers, install
from pulid_lab.models.base import BaseModelConfig, OriginalModel

CTX = 24  # cross_attention_dim of every tiny UNet


def _unet(**kw) -> UNet2DConditionModel:
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  attention_head_dim=8, norm_num_groups=8, cross_attention_dim=CTX)
    return UNet2DConditionModel(**{**common, **kw})


def _configs():
    """name -> (unet, added_cond_kwargs or None)."""
    torch.manual_seed(0)
    cross = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return {
        "sd15": (_unet(**cross), None),
        "sdxl": (_unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=CTX + 6 * 8),
                 {"text_embeds": torch.randn(2, CTX), "time_ids": torch.randn(2, 6)}),
        "added_kv": (_unet(down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                           up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                           mid_block_type="UNetMidBlock2DSimpleCrossAttn"), None),
        "self_attention": (_unet(down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"), mid_block_type="UNetMidBlock2D"),
                           None),
        "no_mid_block": (_unet(mid_block_type=None, **cross), None),
        "mini": (OriginalModel(BaseModelConfig(block_out_channels=(16, 32, 32), attention_head_dim=16, norm_num_groups=8,
                                               text_hidden=CTX, text_layers=1, text_heads=2)).unet, None),
    }


CONFIGS = _configs()
WITH_ATTN2 = [k for k, (u, _) in CONFIGS.items() if not added_kv_layers(u)]


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    ch, size = unet.config.in_channels, unet.config.sample_size
    return (torch.randn(2, ch, size, size, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, CTX, generator=g),
            torch.randn(2, 6, CTX, generator=g))


def _run(unet, added, x, t, ctx, **cross_attention_kwargs):
    kw = {"added_cond_kwargs": added} if added else {}
    with torch.no_grad():
        return unet(x, t, ctx, cross_attention_kwargs=cross_attention_kwargs or None, **kw).sample


@pytest.fixture(params=list(CONFIGS))
def case(request):
    unet, added = CONFIGS[request.param]
    unet.eval()
    yield request.param, unet, added
    unet.set_attn_processor(dict(unet.attn_processors))  # nothing leaks into the next test


def test_every_block_type_is_covered():
    kinds = {type(m).__name__ for u, _ in CONFIGS.values() for m in u.modules()}
    assert {"CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "AttnDownBlock2D", "UNetMidBlock2DCrossAttn",
            "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D"} <= kinds
    assert CONFIGS["no_mid_block"][0].mid_block is None


def test_hooks_keep_the_unet_bit_identical_and_capture_attn2(case):
    name, unet, added = case
    x, t, ctx, _ = _inputs(unet)
    ref = _run(unet, added, x, t, ctx)
    original = dict(unet.attn_processors)
    with install(unet):
        out = _run(unet, added, x, t, ctx, id_tokens=None, id_scale=0.0)
    assert torch.equal(out, ref)
    assert all(unet.attn_processors[k] is v for k, v in original.items())


@pytest.mark.parametrize("name", WITH_ATTN2)
def test_id_at_scale_zero_is_the_plain_unet_and_scale_one_changes_it(name):
    unet, added = CONFIGS[name]
    unet.eval()
    x, t, ctx, tokens = _inputs(unet)
    ref = _run(unet, added, x, t, ctx)
    procs = IDProcessors(unet, id_dim=CTX)
    with install(unet, procs):
        zero = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=0.0)
        with_id = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=1.0)
    assert torch.equal(zero, ref)
    assert torch.isfinite(with_id).all() and (with_id - ref).abs().max() > 1e-3


def test_added_kv_layers_are_refused_with_a_message():
    unet, _ = CONFIGS["added_kv"]
    assert not cross_attention_layers(unet)
    with pytest.raises(ValueError, match="added key/value projections .* SimpleCrossAttn"):
        IDProcessors(unet, id_dim=CTX)


@pytest.mark.parametrize("name", WITH_ATTN2)
@pytest.mark.parametrize("setup", ["set_attention_slice", "fuse_qkv_projections"])
def test_slicing_and_fused_qkv_set_before_keep_the_id(name, setup):
    unet, added = copy.deepcopy(CONFIGS[name])  # fusing adds modules that unfusing leaves behind
    unet.eval()
    x, t, ctx, tokens = _inputs(unet)
    procs = IDProcessors(unet, id_dim=CTX)
    with install(unet, procs):
        want = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=1.0)
    getattr(unet, setup)(*([1] if setup == "set_attention_slice" else []))
    changed = dict(unet.attn_processors)
    assert not any(changed[k] is v for k, v in CONFIGS[name][0].attn_processors.items())
    plain = _run(unet, added, x, t, ctx)
    with install(unet, procs):
        zero = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=0.0)
        got = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=1.0)
    torch.testing.assert_close(zero, plain, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # the ID is still there
    assert all(unet.attn_processors[k] is v for k, v in changed.items())  # the sliced / fused ones come back


@pytest.mark.parametrize("method", sorted(GUARDED))
def test_methods_that_would_drop_the_id_raise_inside_the_block(method):
    unet, _ = copy.deepcopy(CONFIGS["sd15"])
    with install(unet, IDProcessors(unet, id_dim=CTX)):
        with pytest.raises(RuntimeError, match=f"unet.{method}\\(\\) inside PuLID"):
            getattr(unet, method)(*([1] if method == "set_attention_slice" else []))
    assert method not in vars(unet)  # the UNet's own method is back
    unet.set_default_attn_processor()  # and works once the block is left


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_save_pretrained_inside_the_block_writes_the_plain_unet(tmp_path, name):
    unet, added = CONFIGS[name]
    unet.eval()
    x, t, ctx, _ = _inputs(unet)
    ref = _run(unet, added, x, t, ctx)
    plain_keys = set(unet.state_dict())
    procs = IDProcessors(unet, id_dim=CTX)
    with install(unet, procs):
        assert set(unet.state_dict()) == plain_keys  # the ID weights are the adapter's, not the UNet's
        unet.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(saved) == plain_keys and not any("id_to_" in k for k in saved)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_run(loaded, added, x, t, ctx), ref)


def test_torch_compile_traces_the_id_processors():
    unet, added = CONFIGS["sd15"]
    unet.eval()
    x, t, ctx, tokens = _inputs(unet)
    procs = IDProcessors(unet, id_dim=CTX)
    torch.nn.init.normal_(next(iter(procs.procs.values())).id_to_k.weight)
    with install(unet, procs):
        eager = _run(unet, added, x, t, ctx, id_tokens=tokens, id_scale=1.0)
        compiled = torch.compile(unet, backend="aot_eager")  # inductor needs a C++ toolchain; tracing is what we test
        out = _run(compiled, added, x, t, ctx, id_tokens=tokens, id_scale=1.0)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
