"""`pulid-lab check-models`: re-measure the shipped models on freshly rendered held-out data.

Nothing here is read from the manifest: every number is measured now, on renders of held-out identities
made with a seed the training bank never used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.imaging import align_faces, to_tensor
from ..core.metrics import cosine, verification_accuracy, verification_pairs
from ..models import checkpoints
from ..models.identity import FACE_CHECK_QUALIFIES, FACE_THRESHOLD, FaceAnalysis, crops_for_insightface
from ..world import faceless, vocab
from ..world import toyfaces as world
from ..world.data import render_bank
from ..world.vocab import ATTRIBUTES

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


def colour_matched_renders(rng: np.random.Generator, n_ids: int, variants: int):
    """Renders (3n, ...) of held-out identities in three aligned blocks a, b, c: a and b the same identity
    (different attributes), c an impostor with a's colours (skin, hair, eyes) on another identity's structure."""
    ids = world.HELDOUT_IDS[:n_ids]
    donors = rng.choice(world.HELDOUT_IDS, n_ids)
    donors = np.where(donors == ids, world.HELDOUT_IDS[(np.arange(n_ids) + 1) % n_ids], donors)
    rep = np.repeat(np.arange(n_ids), variants)
    attrs = world.sample_attributes(rng, 3 * len(rep))
    seeds = rng.integers(0, 2**62, size=3 * len(rep)) + CHECK_SEED
    genuine = world.identity_factors(ids[rep])
    impostor = world.colour_matched_factors(ids[rep], donors[rep])
    factors = {k: np.concatenate([genuine[k], genuine[k], impostor[k]]) for k in genuine}
    return world.render_factors(factors, attrs, seeds)


def _colour_matched_verification(model, n_ids, variants, seed):
    """Same identity vs an impostor with the *same colours* (skin, hair, eyes) and another identity's structure."""
    rng = np.random.default_rng(seed)
    r = colour_matched_renders(rng, n_ids, variants)
    n = n_ids * variants
    emb = _embed_torch(model, r.images, r.boxes)
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
    if "face_check" in checkpoints.read_manifest(models_dir).get("models", {}):
        out["face_check"] = _face_check(models_dir, x)
    out["passed"] = passed(out)
    return out


@torch.no_grad()
def _face_check(models_dir: Path, faces: torch.Tensor, n: int = 400) -> dict:
    """The face check on the held-out renders (all faces) and on faceless kinds it never trained on."""
    model = checkpoints.load_model("face_check", models_dir)
    p_face = torch.cat([torch.sigmoid(model(faces[i:i + 512])) for i in range(0, len(faces), 512)])
    rejected = {kind: round(float((torch.sigmoid(model(x)) < FACE_THRESHOLD).float().mean()), 4)
                for kind, x in faceless.check_faceless(n, torch.Generator().manual_seed(CHECK_SEED)).items()}
    return {"faces_accepted": round(float((p_face >= FACE_THRESHOLD).float().mean()), 4),
            "lowest_face_score": round(float(p_face.min()), 4), "faceless_rejected_by_kind": rejected,
            "faceless_rejected": min(rejected.values())}


def passed(report: dict) -> dict:
    """Each threshold of THRESHOLDS, checked on a report."""
    res = {"probe_accuracy": all(v >= THRESHOLDS["probe_accuracy"] for v in report["probe_accuracy"].values())}
    for name in RECOGNIZERS:
        res[f"{name}_verification"] = report[f"{name}_verification"] >= THRESHOLDS["verification"]
    res["phi_cond_onnx_vs_torch"] = report["phi_cond_onnx_vs_torch"] >= THRESHOLDS["onnx_vs_torch"]
    if "face_check" in report:
        fc = report["face_check"]
        res["face_check"] = min(fc["faces_accepted"], fc["faceless_rejected"]) >= FACE_CHECK_QUALIFIES
    return res


# ----------------------------------------------------------------------------------------------------------
# The original model (base T2I + Lightning sampler)

BASE_THRESHOLDS = {"base_prompt_score": 0.85, "lightning_over_base": 0.9, "identity_legibility": 0.9}


def heldout_captions(n: int, seed: int = 11) -> tuple[list[str], dict[str, np.ndarray]]:
    """``n`` complete captions (every attribute named) drawn with a fixed seed; most combinations never
    appeared in training (captions there are incomplete)."""
    labels = world.sample_attributes(np.random.default_rng((world.WORLD_SEED, 5, seed)), n)
    caps = [vocab.caption_from_labels(labels, i) for i in range(n)]
    return caps, labels


def prompt_test_set(n_captions: int, seeds_per_caption: int) -> tuple[list[str], dict[str, np.ndarray], list[int]]:
    """The fixed prompt-following test: each held-out caption repeated ``seeds_per_caption`` times, its labels
    alike, and one noise seed per generation (from 100,000 on: never a training seed)."""
    caps, labels = heldout_captions(n_captions)
    caps = [c for c in caps for _ in range(seeds_per_caption)]
    labels = {a: np.repeat(v, seeds_per_caption) for a, v in labels.items()}
    return caps, labels, [100_000 + i for i in range(len(caps))]


@torch.no_grad()
def prompt_scores(probe, images: torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Probe accuracy per attribute on generated images (B, 3, 32, 32) against the attributes asked for."""
    logits = probe(images)
    return {a: float(np.mean(logits[a].argmax(1).numpy() == labels[a])) for a in ATTRIBUTES}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def check_base_model(models_dir: Path | None = None, n: int = 256, seeds_per_caption: int = 8, batch: int = 64,
                     base_steps: int = 25, prototype_ids=None, progress: bool = False) -> dict:
    """Measure the original model: prompt following (standard vs Lightning sampler), identity diversity and
    legibility, probe-feature Fréchet distance to renders. Fixed captions and seeds."""
    from tqdm.auto import tqdm

    from ..models.base import load_base
    models_dir = Path(models_dir) if models_dir is not None else checkpoints.default_models_dir()
    base = load_base(models_dir)
    probe = checkpoints.load_model("probe", models_dir)
    phi = checkpoints.load_model("phi_eval", models_dir)
    detector = checkpoints.load_model("detector", models_dir)
    n_caps = max(1, n // seeds_per_caption)
    caps, labels, seeds = prompt_test_set(n_caps, seeds_per_caption)
    gens = {}
    for name, steps, solver in (("base", base_steps, "dpm++"), ("lightning", 4, "lightning")):
        out = []
        for i in tqdm(range(0, len(caps), batch), desc=f"sample {name}", disable=not progress, leave=False):
            out.append(base.generate(caps[i:i + batch], seed=seeds[i:i + batch], steps=steps, solver=solver))
        gens[name] = torch.cat(out)

    report: dict = {"generations": len(caps), "base_sampler": f"dpm++ {base_steps} steps", "lightning_sampler": "ddim 4 steps (trailing)"}
    for name, imgs in gens.items():
        per_attr = prompt_scores(probe, imgs, labels)
        report[f"{name}_prompt_score"] = round(float(np.mean(list(per_attr.values()))), 4)
        report[f"{name}_prompt_score_per_attribute"] = {a: round(v, 3) for a, v in per_attr.items()}

    def embed(images):
        return phi(align_faces(images, detector(images)))

    emb = embed(gens["lightning"]).view(n_caps, seeds_per_caption, -1)
    iu = np.triu_indices(seeds_per_caption, 1)
    sims = torch.stack([cosine(e[iu[0]], e[iu[1]]) for e in emb])
    report["base_identity_diversity"] = round(float(sims.mean()), 4)

    # the same figure for real renders: pairs of renders of one identity, and of different identities
    rend = render_bank(world.HELDOUT_IDS[:n_caps], seeds_per_caption, seed=CHECK_SEED + 1, cache=False, progress=False)
    rx = to_tensor(rend.images)
    r_emb = embed(rx).view(n_caps, seeds_per_caption, -1)
    report["same_identity_cosine_renders"] = round(float(torch.stack([cosine(e[iu[0]], e[iu[1]]) for e in r_emb]).mean()), 4)
    report["different_identity_cosine_renders"] = round(float(cosine(r_emb[:, 0], r_emb.roll(1, 0)[:, 0]).mean()), 4)

    # legibility: best match to a train-identity prototype, generated vs real (held-out) renders
    proto_ids = world.TRAIN_IDS if prototype_ids is None else np.asarray(prototype_ids)
    train = render_bank(proto_ids, 4, seed=CHECK_SEED + 2, progress=progress)
    t_emb = torch.nn.functional.normalize(torch.cat([embed(to_tensor(train.images[i:i + 512])) for i in range(0, len(train), 512)]), dim=-1)
    protos = torch.nn.functional.normalize(t_emb.view(len(proto_ids), 4, -1).mean(1), dim=-1)

    def best_match(e):
        return (torch.nn.functional.normalize(e.reshape(-1, e.shape[-1]), dim=-1) @ protos.T).max(1).values.mean()
    gen_best, real_best = best_match(emb), best_match(r_emb)
    report["best_prototype_cosine_generated"] = round(float(gen_best), 4)
    report["best_prototype_cosine_renders"] = round(float(real_best), 4)
    report["identity_legibility"] = round(float(gen_best / real_best), 4)

    feats_r = probe.features(rx).numpy()
    for name, imgs in gens.items():
        report[f"probe_fd_{name}"] = round(frechet_distance(feats_r, probe.features(imgs).numpy()), 3)
    report["passed"] = {
        "base_prompt_score": report["base_prompt_score"] >= BASE_THRESHOLDS["base_prompt_score"],
        "lightning_prompt_score": report["lightning_prompt_score"] >= BASE_THRESHOLDS["lightning_over_base"] * report["base_prompt_score"],
        "identity_legibility": report["identity_legibility"] >= BASE_THRESHOLDS["identity_legibility"],
        "base_identity_diversity_below_same_identity": report["base_identity_diversity"] < report["same_identity_cosine_renders"],
    }
    return report
