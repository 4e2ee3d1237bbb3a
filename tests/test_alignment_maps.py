import math

import matplotlib
import numpy as np
import pytest
import torch

from pulid_lab.core import losses
from pulid_lab.core.adapter import PuLIDAdapter
from pulid_lab.core.attention import Capture, install
from pulid_lab.core.id_encoder import IDEncoderConfig
from pulid_lab.lessons import alignment_maps as A
from pulid_lab.models.base import BaseModelConfig, OriginalModel

matplotlib.use("Agg")

LAYERS = ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
          "mid_block.attentions.0.transformer_blocks.0.attn2")


def synthetic_captures(seed=0, batch=2, n_txt=5, channels=8):
    """Two captures over three layers (16, 4 and 4 positions) and two steps, with shared text keys."""
    g = torch.Generator().manual_seed(seed)
    a, b = Capture(), Capture()
    for layer, n in zip(LAYERS, (16, 4, 4)):
        for step in range(2):
            k = torch.randn(batch, n_txt, channels, generator=g)
            a.q[(layer, step)], a.k[(layer, step)] = torch.randn(batch, n, channels, generator=g), k
            b.q[(layer, step)], b.k[(layer, step)] = torch.randn(batch, n, channels, generator=g), k
    return a, b


def test_response_weights_times_q_is_the_text_response():
    q, k = torch.randn(2, 9, 8), torch.randn(2, 4, 8)
    w = A.response_weights(q, k)
    assert w.shape == (2, 4, 9)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(w @ q, losses.text_response(q, k), atol=1e-5)


def test_loss_terms_sum_to_the_alignment_losses_and_layout_maps_average_to_their_terms():
    a, b = synthetic_captures()
    terms = A.loss_terms(a, b)
    assert terms.layers == [LAYERS[1], LAYERS[2], LAYERS[0]]  # UNet order: down, mid, up
    assert terms.steps == [0, 1] and terms.semantic.shape == terms.layout.shape == (3, 2)
    assert terms.totals()["align_sem"] == pytest.approx(float(losses.align_semantic_loss(a, b)), rel=1e-5)
    assert terms.totals()["align_layout"] == pytest.approx(float(losses.align_layout_loss(a, b)), rel=1e-5)
    total, _ = losses.align_loss(a, b)
    assert terms.total() == pytest.approx(float(total), rel=1e-5)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, False, False]])
    masked = A.loss_terms(a, b, token_mask=mask)
    assert masked.totals()["align_sem"] == pytest.approx(float(losses.align_semantic_loss(a, b, mask)), rel=1e-5)
    maps = A.layout_maps(a, b)
    assert maps[(LAYERS[0], 1)].shape == (2, 4, 4) and maps[(LAYERS[1], 0)].shape == (2, 2, 2)
    for i, layer in enumerate(terms.layers):
        for j, step in enumerate(terms.steps):
            assert float(maps[(layer, step)].mean()) == pytest.approx(terms.layout[i, j], rel=1e-5)
    same = A.loss_terms(a, a)
    assert same.semantic.max() == 0 and same.layout.max() == 0


def test_layer_labels_and_square_maps():
    assert A.layer_label(LAYERS[0], 256) == "up1.0 16x16"
    assert A.layer_label(LAYERS[2], 64) == "mid 8x8"
    assert A.layer_label(LAYERS[1]) == "down1.0"
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 3, 16)
    assert torch.equal(A.to_square(x)[1, 2], x[1, 2].view(4, 4))
    assert A.to_square(x, 32).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="square"):
        A.to_square(torch.zeros(1, 15))


def tiny_model():
    torch.manual_seed(0)
    base = OriginalModel(BaseModelConfig(block_out_channels=(16, 32, 32), attention_head_dim=16, norm_num_groups=8,
                                         text_hidden=24, text_layers=1, text_heads=2)).eval()
    adapter = PuLIDAdapter(base.unet, IDEncoderConfig(id_dim=8, feature_channels=(4, 8), token_dim=24)).eval()
    return base, adapter


def test_cross_attention_probs_match_what_capture_records():
    base, _ = tiny_model()
    cap = Capture(probs=True)
    with torch.no_grad(), install(base.unet):
        base.unet(torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), base.encode(["a portrait, comic", "a portrait"]),
                  cross_attention_kwargs={"capture": cap, "step": 0})
    heads, scales = A.attention_layout(base.unet)
    assert set(heads) == {layer for layer, _ in cap.q}
    for key, p in cap.p.items():
        mine = A.cross_attention_probs(cap.q[key], cap.k[key], heads[key[0]], scales[key[0]])
        assert torch.allclose(mine, p.mean(1), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_paths():
    base, adapter = tiny_model()
    tokens = torch.randn(2, 3, 24)
    prompts = ["a portrait, comic, green background", "a portrait, sketch"]
    return {"with ID": A.two_paths(base, adapter, tokens, prompts, [1, 2]),
            "scale 0": A.two_paths(base, adapter, tokens, prompts, [1, 2], id_scale=0.0)}


def test_two_paths_captures_every_layer_and_step_of_both_paths(tiny_paths):
    p = tiny_paths["with ID"]
    assert p.steps == [0, 1, 2, 3] and set(p.layers) == set(p.heads)
    # the tokens in the order the text encoder saw them: captions are put in the vocabulary's order first
    assert p.tokens[0][:9] == ["<bos>", "a", "portrait", ",", "green", "background", ",", "comic", "<eos>"]
    assert p.real_tokens(1) == [0, 1, 2, 3, 4, 5] and p.tokens[1][5] == "<eos>"
    assert set(p.cap_id.q) == set(p.cap_plain.q) and not any(q.requires_grad for q in p.cap_id.q.values())
    assert p.image_id.shape == (2, 3, 32, 32) and p.image_id.abs().max() <= 1
    terms = A.paths_loss_terms(p)
    assert terms.semantic.sum() > 0 and terms.layout.sum() > 0
    first = p.layers[0]  # the first attn2 layer at step 0 sees the same x_T on both paths: nothing differs yet
    assert terms.layout[0, 0] == pytest.approx(0, abs=1e-6) and A.layer_label(first).startswith("down")
    zero = A.paths_loss_terms(tiny_paths["scale 0"])
    assert zero.semantic.max() < 1e-5 and zero.layout.max() < 1e-5
    assert torch.allclose(tiny_paths["scale 0"].image_id, tiny_paths["scale 0"].image_plain, atol=1e-5)


@pytest.mark.parametrize("kind", ["response", "cross"])
def test_token_maps_and_explorer_view(tiny_paths, kind):
    p = tiny_paths["with ID"]
    layer = p.layers[-1]
    m = A.token_maps(p, "with ID", layer, 2, kind)
    n = p.cap_id.q[(layer, 2)].shape[1]
    side = int(math.sqrt(n))
    assert m.shape == (2, 32, side, side)
    sums = m.sum((-1, -2)) if kind == "response" else m.sum(1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    mean = A.mean_token_maps(p, "prompt only", kind=kind)
    assert mean.shape == (2, 32, 32, 32)
    view = A.explorer_view(p, layer, 2, 4, item=0, kind=kind)
    assert view["token"] == "green" and view["maps"]["with ID"].shape == (32, 32) and view["layout"].shape == (32, 32)
    assert np.allclose(view["difference"], view["maps"]["with ID"] - view["maps"]["prompt only"])
    assert view["semantic_difference"] > 0
    every = A.explorer_view(p, A.ALL, None, 4, item=1, kind=kind)
    assert every["token"] == "sketch" and every["image_id"].shape == (32, 32, 3)
    flat = A.explorer_view(tiny_paths["scale 0"], A.ALL, A.ALL, 4, kind=kind)
    assert np.abs(flat["difference"]).max() < 1e-5 and flat["layout"].max() < 1e-5
    with pytest.raises(ValueError, match="nothing captured"):
        A.mean_token_maps(p, "with ID", step=7)


def test_plots_return_figures(tiny_paths):
    import matplotlib.pyplot as plt
    paths = {"a": tiny_paths["with ID"], "b": tiny_paths["scale 0"]}
    terms = {k: A.paths_loss_terms(v) for k, v in paths.items()}
    results = {"Stage 2": {"face_sim": 0.7, "prompt_score": 0.5, "purity": 0.6},
               "full": {"face_sim": 0.5, "prompt_score": 0.7, "purity": 0.8},
               "semantic only": {"face_sim": 0.6, "prompt_score": 0.6, "purity": 0.7}}
    figs = [A.plot_token_maps(paths), A.plot_token_maps(paths, step=3, kind="cross"), A.plot_layout_maps(paths, item=1),
            A.plot_loss_terms(terms), A.plot_explorer_view(A.explorer_view(paths["a"], None, None, 4)),
            A.plot_tradeoff(results), A.plot_tradeoff(results, origin="Stage 2")]
    assert all(isinstance(f, plt.Figure) for f in figs)
    with pytest.raises(ValueError, match="origin"):
        A.plot_tradeoff(results, origin="Stage 1")
    plt.close("all")


def test_attention_explorer_widget_updates_without_a_frontend(tiny_paths):
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    from pulid_lab.lessons.widgets import attention_explorer
    box = attention_explorer({"a": tiny_paths["with ID"], "b": tiny_paths["scale 0"]})
    c = box.controls
    assert box.result["token"] == "green"
    for name in ("layer", "step"):  # every option of both dropdowns can be chosen (a layer's value is its name)
        for _, value in c[name].options:
            c[name].value = value
            assert box.result is not None
    c["layer"].value, c["step"].value = c["layer"].options[0][1], c["step"].options[0][1]
    mean_map = box.result["maps"]["with ID"]
    c["layer"].value = c["layer"].options[1][1]  # one layer's map is not the mean over layers
    assert not np.allclose(box.result["maps"]["with ID"], mean_map)
    c["layer"].value = c["layer"].options[0][1]
    c["step"].value = 3
    c["token"].value = 7
    assert box.result["token"] == "comic"
    c["adapter"].value = "b"
    assert np.abs(box.result["difference"]).max() < 1e-5
    c["item"].value = 1  # the token list follows the example; token 7 is padding there, so it resets
    assert box.result["prompt"] == "a portrait, sketch" and box.result["token"] == "sketch"
    assert [j for _, j in c["token"].options] == tiny_paths["scale 0"].real_tokens(1)
    plt.close("all")
