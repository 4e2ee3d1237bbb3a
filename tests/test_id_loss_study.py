import matplotlib
import numpy as np
import pytest
import torch

from pulid_lab.core.imaging import to_tensor
from pulid_lab.core.sampling import training_scheduler
from pulid_lab.lessons import id_loss_study as S
from pulid_lab.world import vocab

matplotlib.use("Agg")


def flat(images):  # a stand-in for phi: the pixels themselves
    return images.flatten(1)


def renders(n=4):
    images, captions = S.heldout_renders(n)
    return images, captions, to_tensor(images)


def test_heldout_renders_are_fixed_and_captioned_in_the_vocabulary():
    a, caps = S.heldout_renders(5, seed=1)
    b, caps_b = S.heldout_renders(5, seed=1)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps == caps_b
    assert all(vocab.parse(c)["age"] in (None, "young") for c in caps)
    full = S.heldout_renders(5, seed=1, caption_dropout=0.0)[1]
    assert all(all(v is not None for v in vocab.parse(c).values()) for c in full)


def test_an_oracle_denoiser_makes_x0_hat_exact_at_every_t():
    _, _, x0 = renders()
    sched = training_scheduler()
    noise = S._noise(x0.shape, 3)

    def oracle(x_t, t, rows):  # the true v for the noise naive_x0_hat draws
        return sched.get_velocity(x0[rows], noise[rows], t)
    ts = [0, 300, 999]
    for t in ts:
        assert torch.allclose(S.naive_x0_hat(oracle, x0, t, seed=3, batch=3), x0, atol=1e-4)
    cos = S.naive_cosines(oracle, flat, x0, ts, seed=3)
    assert cos.shape == (3, 4) and np.allclose(cos, 1, atol=1e-5)


def test_a_blind_denoiser_loses_the_image_as_t_grows_with_the_same_noise_at_every_t():
    _, _, x0 = renders()
    sched = training_scheduler()
    seen = {}

    def blind(x_t, t, rows):  # predicts v = 0: x0_hat = sqrt(abar_t) x_t
        seen[int(t[0])] = x_t
        return torch.zeros_like(x_t)
    ts = [0, 250, 500, 750, 999]
    cos, images = S.naive_cosines(blind, flat, x0, ts, seed=0, keep=2)
    assert cos.shape == (5, 4) and images.shape == (2, 5, 32, 32, 3) and images.dtype == np.uint8
    assert np.all(np.diff(cos.mean(1)) < 0) and cos[0].min() > 0.99
    noises = []
    for t in (250, 750):
        abar = sched.alphas_cumprod[t]
        noises.append((seen[t] - abar.sqrt() * x0) / (1 - abar).sqrt())
    assert torch.allclose(noises[0], noises[1], atol=1e-4)


def synthetic_study():
    ts = np.array([0, 500, 999])
    naive = {"no ID": np.array([[1.0, 0.98], [0.4, 0.3], [0.1, 0.0]]), "Stage 2": np.array([[1.0, 1.0], [0.7, 0.5], [0.2, 0.3]])}
    light = {"no ID": np.array([0.0, 0.1]), "Stage 2": np.array([0.6, 0.7])}
    img = np.zeros((2, 32, 32, 3), np.uint8)
    return S.IDLossStudy(ts, naive, light, img, ["a portrait"] * 2,
                         {k: np.zeros((1, 3, 32, 32, 3), np.uint8) for k in naive}, {k: img for k in naive})


def test_study_summary_and_crossover():
    s = synthetic_study()
    assert s.crossover_t("no ID", "Stage 2") == 500  # mean 0.35 < 0.65
    assert s.crossover_t("Stage 2", "Stage 2") == 500
    assert s.crossover_t("no ID", "no ID") is None  # 0.05 is not below 0.05
    summ = s.summary()
    assert summ["naive no ID t=0"] == pytest.approx(0.99) and summ["lightning Stage 2"] == pytest.approx(0.65)


def test_plots_return_figures():
    import matplotlib.pyplot as plt
    s = synthetic_study()
    report = {1.0: {"face_sim": 0.5, "recognized": 0.25, "prompt_score": 0.6, "purity": 0.7, "n": 16}}
    assert S.metrics_of(report) == {"face_sim": 0.5, "recognized": 0.25, "prompt_score": 0.6, "purity": 0.7}
    figs = [S.plot_study(s), S.plot_strip(s, "Stage 2", columns=3),
            S.plot_metric_bars({"a": S.metrics_of(report), "b": S.metrics_of(report)}, title="t")]
    assert all(isinstance(f, plt.Figure) for f in figs)
    plt.close("all")


def test_study_on_the_smoke_models(smoke_models):
    from pulid_lab.lessons.lab import open_lab
    lab = open_lab("smoke", smoke_models[0], "cpu", progress=False)
    s = S.study(lab, {"no ID": None}, n=3, timesteps=[0, 500, 999], examples=2)
    assert s.naive["no ID"].shape == (3, 3) and s.lightning["no ID"].shape == (3,)
    assert s.x0_hat_images["no ID"].shape == (2, 3, 32, 32, 3) and s.lightning_images["no ID"].shape == (3, 32, 32, 3)
    # at t = 0 the one-step estimate is the image itself, whatever the model
    assert s.naive["no ID"][0].min() > 0.95 and s.mean_curve("no ID")[0] > s.mean_curve("no ID")[-1]
    assert np.all(np.abs(s.lightning["no ID"]) <= 1 + 1e-5)
