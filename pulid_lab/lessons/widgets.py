"""Interactive explorers for the lessons (ipywidgets).

A plain module of functions. Each explorer is a thin shell: the computation it shows is a plain function
(testable without Jupyter) and the figure a plain ``plot_*`` function; ipywidgets and IPython are imported
inside the explorer functions, so ``import pulid_lab.lessons.widgets`` works without them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.imaging import to_tensor, to_uint8
from ..core.metrics import cosine
from ..world import toyfaces as world
from ..world import vocab

REFERENCE_SEED = 51_000

# ----------------------------------------------------------------------------------------------------------
# ID insertion: one identity, one prompt, with and without the ID


def reference_for(identity: int, look: int = 0) -> tuple[np.ndarray, dict[str, str]]:
    """A fixed render of ``identity`` (random non-ID attributes, young; ``look`` draws another one):
    (image (32, 32, 3) uint8, its attributes)."""
    identity = int(identity)
    if not 0 <= identity < world.N_TRAIN + world.N_HELDOUT:
        raise ValueError(f"identity must be in 0..{world.N_TRAIN + world.N_HELDOUT - 1} (held-out: "
                         f"{world.HELDOUT_IDS[0]}..{world.HELDOUT_IDS[-1]}), got {identity}")
    labels = world.sample_attributes(np.random.default_rng((world.WORLD_SEED, 9, identity, int(look))), 1, old_prob=0.0)
    image = world.render([identity], labels, [REFERENCE_SEED + 1000 * identity + int(look)]).images[0]
    return image, {a: vocab.ATTRIBUTES[a][int(v[0])] for a, v in labels.items()}


@dataclass
class IDInsertion:
    identity: int
    prompt: str
    id_scale: float
    seed: int
    reference: np.ndarray  # (32, 32, 3) uint8
    reference_attributes: dict[str, str]
    without_id: np.ndarray  # (32, 32, 3) uint8, same prompt and noise
    with_id: np.ndarray  # (32, 32, 3) uint8
    face_sim: float  # cos(phi_eval(reference), phi_eval(with ID))
    face_sim_without_id: float  # the same for the image without ID: what a random face scores
    prompt_score: float  # probe accuracy on the prompt's attributes, with ID (nan if the prompt names none)
    prompt_score_without_id: float
    purity: float  # cos(probe features with ID, without ID)

    def metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("face_sim", "face_sim_without_id", "prompt_score",
                                                  "prompt_score_without_id", "purity")}


@torch.no_grad()
def id_insertion(lab, adapter, identity: int, prompt: str, id_scale: float = 1.0, seed: int = 0,
                 look: int = 0) -> IDInsertion:
    """Generate ``prompt`` without and with ``identity``'s ID (4-step sampler, same noise) and measure the three
    metrics of docs/metrics.md. ``adapter=None`` or ``id_scale=0`` inserts nothing."""
    from ..train.evaluate import generate
    asked = {a: v for a, v in vocab.parse(prompt).items() if v is not None}  # VocabularyError on unknown words
    ev = lab.evaluator
    ref, ref_attrs = reference_for(identity, look)
    refs = ref[None]
    without = generate(lab.base, None, refs, [prompt], [seed], ev)
    with_id = generate(lab.base, adapter, refs, [prompt], [seed], ev, id_scale)
    ref_emb = ev.face_embedding(to_tensor(refs).to(ev.device))

    def score(images):
        return float(ev.prompt_correct(images, [prompt])[0]) if asked else float("nan")
    return IDInsertion(
        identity=int(identity), prompt=prompt, id_scale=float(id_scale), seed=int(seed), reference=ref,
        reference_attributes=ref_attrs, without_id=to_uint8(without)[0], with_id=to_uint8(with_id)[0],
        face_sim=float(cosine(ref_emb, ev.face_embedding(with_id))[0]),
        face_sim_without_id=float(cosine(ref_emb, ev.face_embedding(without))[0]),
        prompt_score=score(with_id), prompt_score_without_id=score(without),
        purity=float(cosine(ev.probe.features(with_id), ev.probe.features(without))[0]))


def describe_id_insertion(r: IDInsertion) -> str:
    """One line with the three metrics (and the no-ID values they compare against)."""
    return (f"Face Sim {r.face_sim:.3f} (without ID {r.face_sim_without_id:.3f})  |  prompt score {r.prompt_score:.2f} "
            f"(without ID {r.prompt_score_without_id:.2f})  |  purity {r.purity:.3f}")


def plot_id_insertion(r: IDInsertion, out=None):
    """Reference, without ID, with ID, and the metrics."""
    import matplotlib.pyplot as plt

    from .plots import save
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.7))
    ref_caption = vocab.caption({a: v for a, v in r.reference_attributes.items() if a in vocab.NON_ID_ATTRIBUTES})
    titles = (f"reference (id {r.identity})", "without ID", f"with ID (id_scale {r.id_scale:g})")
    for ax, img, title in zip(axes, (r.reference, r.without_id, r.with_id), titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title, fontsize=8)
    axes[0].set_xlabel(ref_caption.replace(vocab.SUBJECT + ", ", "").replace(", ", "\n", 4), fontsize=5)
    axes[2].set_xlabel(f"Face Sim {r.face_sim:.3f}\nprompt score {r.prompt_score:.2f}\npurity {r.purity:.3f}", fontsize=7)
    axes[1].set_xlabel(f"Face Sim {r.face_sim_without_id:.3f}\nprompt score {r.prompt_score_without_id:.2f}", fontsize=7)
    fig.suptitle(f"{r.prompt}  (seed {r.seed})", fontsize=8)
    fig.tight_layout()
    return save(fig, out)


def id_insertion_explorer(lab, adapters: dict, prompts=None, identities=None):
    """Widget: identity, prompt (pick or type), id_scale, adapter, seed -> reference, images without and with
    the ID, and the three metrics. ``adapters``: {label: trained adapter}, e.g. ``{"Stage 1": lab.adapter(stage=1)}``.

    The returned box has ``controls`` (name -> widget) and ``refresh()``; the last result is ``box.result``."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from ..train.evaluate import EVAL_PROMPTS
    if not adapters:
        raise ValueError("adapters is empty; pass e.g. {'Stage 1': lab.adapter(stage=1)}")
    prompts = list(prompts or EVAL_PROMPTS)
    ids = np.asarray(identities if identities is not None else world.HELDOUT_IDS)
    controls = {
        "identity": w.IntSlider(value=int(ids[0]), min=int(ids.min()), max=int(ids.max()), description="identity",
                                continuous_update=False),
        "adapter": w.Dropdown(options=list(adapters), description="adapter"),
        "seed": w.IntText(value=0, description="seed", layout=w.Layout(width="160px")),
        "prompt": w.Combobox(value=prompts[0], options=prompts, description="prompt", ensure_option=False,
                             continuous_update=False, layout=w.Layout(width="520px")),
        "id_scale": w.FloatSlider(value=1.0, min=0.0, max=4.0, step=0.05, description="id_scale",
                                  continuous_update=False),
    }
    out = w.Output()
    box = w.VBox([w.HBox([controls["identity"], controls["adapter"], controls["seed"]]),
                  w.HBox([controls["prompt"], controls["id_scale"]]), out])
    box.controls, box.result = controls, None

    def refresh(_=None):
        with out:
            out.clear_output(wait=True)
            try:
                r = id_insertion(lab, adapters[controls["adapter"].value], controls["identity"].value,
                                 controls["prompt"].value, controls["id_scale"].value, controls["seed"].value)
            except ValueError as e:  # an unknown word (VocabularyError) or an identity out of range
                box.result = None
                print(e)
                return
            box.result = r
            fig = plot_id_insertion(r)
            display(fig)
            plt.close(fig)
            print(describe_id_insertion(r))

    for c in controls.values():
        c.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


# ----------------------------------------------------------------------------------------------------------
# Attention explorer (lesson 04): the two Lightning paths, per layer, step and token


def attention_explorer(paths_by_name, kind: str = "cross"):
    """Widget: adapter, example, layer, step, token, map kind -> the token's heat map on the prompt-only and the
    with-ID path, their difference and the layout map |Q_tid - Q_t|. ``paths_by_name``: {label: TwoPaths}
    (``alignment_maps.lab_two_paths``) or one ``TwoPaths``. The computation is ``alignment_maps.explorer_view``.

    The returned box has ``controls`` (name -> widget) and ``refresh()``; the last view is ``box.result``."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .alignment_maps import ALL, TwoPaths, explorer_view, layer_label, plot_explorer_view
    if isinstance(paths_by_name, TwoPaths):
        paths_by_name = {"adapter": paths_by_name}
    if not paths_by_name:
        raise ValueError("paths_by_name is empty; pass e.g. {'Stage 3': alignment_maps.lab_two_paths(...)}")
    first = next(iter(paths_by_name.values()))
    sizes = {la: first.cap_id.q[(la, first.steps[0])].shape[1] for la in first.layers}
    controls = {
        "adapter": w.Dropdown(options=list(paths_by_name), description="adapter"),
        "item": w.Dropdown(options=[(f"{i}: {p.replace('a portrait, ', '')}", i) for i, p in enumerate(first.prompts)],
                           description="example", layout=w.Layout(width="420px")),
        # every option a (label, value) pair: ipywidgets reads a list mixing bare values with pairs as labels only
        "layer": w.Dropdown(options=[(ALL, ALL)] + [(layer_label(la, sizes[la]), la) for la in first.layers],
                            description="layer"),
        "step": w.Dropdown(options=[(ALL, ALL)] + [(str(s), s) for s in first.steps], description="step"),
        "token": w.Dropdown(description="token"),
        "kind": w.ToggleButtons(options=[("image-to-text attention", "cross"), ("semantic softmax(K Q^T)", "response")],
                                value=kind, description="map"),
    }
    out = w.Output()
    box = w.VBox([w.HBox([controls["adapter"], controls["item"]]), w.HBox([controls["layer"], controls["step"],
                                                                          controls["token"]]), controls["kind"], out])
    box.controls, box.result = controls, None

    quiet = {"on": False}  # no redraw while the token list is being replaced

    def set_tokens(_=None):
        paths = paths_by_name[controls["adapter"].value]
        item = controls["item"].value
        old = controls["token"].value
        options = [(f"{j}: {paths.tokens[item][j]}", j) for j in paths.real_tokens(item)]
        keep = [j for _, j in options]
        quiet["on"] = True
        try:
            controls["token"].options = options
            # default: the first word after "<bos> a portrait ," (the first attribute the prompt names)
            controls["token"].value = old if old in keep else (keep[4] if len(keep) > 4 else keep[-1])
        finally:
            quiet["on"] = False

    def refresh(_=None):
        if quiet["on"]:
            return
        with out:
            out.clear_output(wait=True)
            c = {k: v.value for k, v in controls.items()}
            paths = paths_by_name[c["adapter"]]
            view = explorer_view(paths, c["layer"], c["step"], c["token"], c["item"], c["kind"])
            box.result = view
            layer = "all layers" if c["layer"] == ALL else layer_label(c["layer"], sizes[c["layer"]])
            step = "all steps" if c["step"] == ALL else f"step {c['step']}"
            fig = plot_explorer_view(view, f"{c['adapter']} - '{view['token']}' - {layer}, {step} - {view['prompt']}")
            display(fig)
            plt.close(fig)

    set_tokens()
    controls["item"].observe(lambda ch: (set_tokens(), refresh()), names="value")
    controls["adapter"].observe(lambda ch: (set_tokens(), refresh()), names="value")
    for k in ("layer", "step", "token", "kind"):
        controls[k].observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box
