"""`pulid-lab check-models`: re-measure the shipped models on freshly rendered held-out data.

Nothing here is read from the manifest: every number is measured now, on renders of held-out identities
made with a seed the training bank never used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoints, world
from .data import align_faces, render_bank, to_tensor
from .identity import FaceAnalysis, crops_for_insightface
from .metrics import cosine, verification_accuracy, verification_pairs
from .vocab import ATTRIBUTES

THRESHOLDS = {"probe_accuracy": 0.97, "verification": 0.95, "onnx_vs_torch": 0.9999}
RECOGNIZERS = ("phi_cond", "phi_loss", "phi_eval")
CHECK_SEED = 7_000  # render seed of the check bank (the training bank uses seed 0)


@torch.no_grad()
def _embed_torch(model, images_u8, boxes, batch=512):
    x, b = to_tensor(images_u8), torch.as_tensor(boxes, dtype=torch.float32)
    return torch.cat([model(align_faces(x[i:i + batch], b[i:i + batch])) for i in range(0, len(x), batch)])


def _verification(emb, ids, n_pairs, seed):
    rng = np.random.default_rng(seed)
    i, j, same = verification_pairs(ids, n_pairs, rng)
    return verification_accuracy(cosine(emb[i], emb[j]).numpy(), same, rng)


def _colour_matched_verification(model, n_ids, variants, seed):
    """Same identity vs an impostor with the *same colours* (skin, hair, eyes) and another identity's structure."""
    rng = np.random.default_rng(seed)
    ids = world.HELDOUT_IDS[:n_ids]
    donors = rng.choice(world.HELDOUT_IDS, n_ids)
    donors = np.where(donors == ids, world.HELDOUT_IDS[(np.arange(n_ids) + 1) % n_ids], donors)
    rep = np.repeat(np.arange(n_ids), variants)
    attrs = world.sample_attributes(rng, 3 * len(rep))
    seeds = rng.integers(0, 2**62, size=3 * len(rep)) + CHECK_SEED
    genuine = world.identity_factors(ids[rep])
    impostor = world.colour_matched_factors(ids[rep], donors[rep])
    factors = {k: np.concatenate([genuine[k], genuine[k], impostor[k]]) for k in genuine}
    r = world.render_factors(factors, attrs, seeds)
    emb = _embed_torch(model, r.images, r.boxes) if model is not None else None
    n = len(rep)
    a, b, c = emb[:n], emb[n:2 * n], emb[2 * n:]
    scores = torch.cat([cosine(a, b), cosine(a, c)]).numpy()
    same = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return verification_accuracy(scores, same, rng)


def check_models(models_dir: Path | None = None, variants: int = 8, n_pairs: int = 4000, n_ids: int | None = None,
                 progress: bool = False) -> dict:
    """Measure the models in ``models_dir`` (default: shipped) on held-out renders; returns one JSON-able dict."""
    models_dir = Path(models_dir) if models_dir is not None else checkpoints.default_models_dir()
    ids = world.HELDOUT_IDS if n_ids is None else world.HELDOUT_IDS[:n_ids]
    bank = render_bank(ids, variants, seed=CHECK_SEED, cache=False, progress=progress)
    x = to_tensor(bank.images)
    out: dict = {"models_dir": str(models_dir), "profile": checkpoints.read_manifest(models_dir).get("profile"),
                 "heldout_renders": len(bank), "heldout_identities": len(ids)}

    probe = checkpoints.load_model("probe", models_dir)
    with torch.no_grad():
        logits = [probe(x[i:i + 512]) for i in range(0, len(x), 512)]
    out["probe_accuracy"] = {a: round(float(np.mean(torch.cat([l[a] for l in logits]).argmax(1).numpy() == bank.labels[a])), 4)
                             for a in ATTRIBUTES}

    analysis = FaceAnalysis(models_dir)
    boxes = analysis.detect(bank.images)
    out["detector_box_error_px"] = round(float(np.abs(boxes - bank.boxes).mean()), 3)

    for name in RECOGNIZERS:
        model = checkpoints.load_model(name, models_dir)
        emb = _embed_torch(model, bank.images, boxes)
        out[f"{name}_verification"] = round(_verification(emb, bank.ids, n_pairs, seed=1), 4)
        out[f"{name}_verification_colour_matched"] = round(
            _colour_matched_verification(model, min(len(ids), 100), max(2, variants // 2), seed=2), 4)
        if name == "phi_cond":  # the insightface/ONNX path against torch, on the very same 112x112 crops
            crops = crops_for_insightface(bank.images, boxes)
            onnx_emb = torch.from_numpy(np.concatenate([analysis.recognizer.get_feat(crops[i:i + 256])
                                                        for i in range(0, len(crops), 256)]))
            rgb = to_tensor(np.stack([c[:, :, ::-1] for c in crops]))
            with torch.no_grad():
                torch_emb = torch.cat([model(rgb[i:i + 256]) for i in range(0, len(rgb), 256)])
            out["phi_cond_onnx_vs_torch"] = round(float(cosine(onnx_emb, torch_emb).mean()), 6)
            out["phi_cond_embedding_dim"] = int(onnx_emb.shape[1])
    out["passed"] = passed(out)
    return out


def passed(report: dict) -> dict:
    """Each requirement of the foundation issue, checked on a report."""
    res = {"probe_accuracy": all(v >= THRESHOLDS["probe_accuracy"] for v in report["probe_accuracy"].values())}
    for name in RECOGNIZERS:
        res[f"{name}_verification"] = report[f"{name}_verification"] >= THRESHOLDS["verification"]
    res["phi_cond_onnx_vs_torch"] = report["phi_cond_onnx_vs_torch"] >= THRESHOLDS["onnx_vs_torch"]
    return res
