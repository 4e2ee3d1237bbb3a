#!/usr/bin/env python
"""End-to-end check of pulid_lab's real tier on one GPU, from local weights only (nothing is downloaded).

Environment variables (paths on the GPU machine):

  SDXL_DIR         diffusers folder of stabilityai/stable-diffusion-xl-base-1.0 (with model_index.json)   required
  LIGHTNING_UNET   ByteDance/SDXL-Lightning sdxl_lightning_4step_unet.safetensors                          required
  ANTELOPEV2_ROOT  folder holding models/antelopev2/*.onnx (insightface antelopev2 pack)                   required
  EVA_CLIP         open_clip EVA02-L-14-336 checkpoint (open_clip_pytorch_model.bin); needs open_clip_torch optional
                   (without it the EVA part of the condition is zeros: shapes and timings only)
  PULID_V1         the official pulid_v1.bin (needs EVA_CLIP to be meaningful)                             optional
  FACE_PARSER      facexlib's parsing_bisenet.pth (needs facexlib): EVA sees the official parsed face      optional
  FACE_IMAGE       reference photo (default: insightface's bundled Tom_Hanks_54745.png, padded)            optional
  FACE_DIR         folder of face photos (+ .txt captions) to train on (default: the reference alone)     optional
  OUT              output folder (default ./gpu_check_out)                                                 optional

What it does, timing each phase and recording torch.cuda.max_memory_allocated: loads the SDXL pipeline in bf16
with the Lightning UNet, loads the official v1 weights if given, detects the reference face, generates 4-step
images (DPM-Solver++ trailing, CFG 1.2, id_scale 0.8, as the official inference) with and without the ID for two
prompts, runs the training Lightning branch (4 DDIM trailing steps) with and without the ID with
pulid_lab.core.attention.Capture on every attn2 and reports the alignment losses between the two paths, then trains
a few steps of stage 1 (L_diff on the base SDXL UNet) and, unless --stage1-only, one step each of stages 2 and 3
(the Lightning branch on the Lightning UNet, L_id through antelopev2's recognizer converted to torch, alignment at
every step), and generates again with the trained adapter. Face Sim is reported twice: by insightface
(onnxruntime) and by the converted recognizer. Writes OUT/grid.png and OUT/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REQUIRED = ("SDXL_DIR", "LIGHTNING_UNET", "ANTELOPEV2_ROOT")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024, help="image side (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-scale", type=float, default=0.8)
    p.add_argument("--train-steps", type=int, default=3, help="stage-1 steps")
    p.add_argument("--train-resolution", type=int, default=1024)
    p.add_argument("--stage1-only", action="store_true", help="skip the one step of stage 2 and of stage 3 (k=1)")
    p.add_argument("--check-only", action="store_true", help="only check the variables and files, then exit")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (very slow; for debugging only)")
    return p.parse_args(argv)


def fail(msg: str, code: int = 2):
    print(f"gpu_check: {msg}", file=sys.stderr)
    sys.exit(code)


def check_env() -> dict:
    env = {k: os.environ.get(k) for k in (*REQUIRED, "EVA_CLIP", "PULID_V1", "FACE_PARSER", "FACE_IMAGE", "FACE_DIR",
                                          "OUT")}
    missing = [k for k in REQUIRED if not env[k]]
    if missing:
        fail(f"set {', '.join(missing)} (see --help): e.g. SDXL_DIR=/w/sdxl-base LIGHTNING_UNET="
             f"/w/sdxl_lightning_4step_unet.safetensors ANTELOPEV2_ROOT=/w/insightface")
    checks = [("SDXL_DIR", Path(env["SDXL_DIR"]) / "model_index.json"), ("LIGHTNING_UNET", Path(env["LIGHTNING_UNET"])),
              ("ANTELOPEV2_ROOT", Path(env["ANTELOPEV2_ROOT"]) / "models" / "antelopev2")]
    for key in ("EVA_CLIP", "PULID_V1", "FACE_PARSER", "FACE_IMAGE"):
        if env[key]:
            checks.append((key, Path(env[key])))
    if env["FACE_DIR"]:
        checks.append(("FACE_DIR", Path(env["FACE_DIR"])))
    for key, path in checks:
        if not path.expanduser().exists():
            fail(f"{key}: {path} does not exist")
    return env


class Phases:
    def __init__(self):
        self.report = {"phases": {}}

    def __call__(self, name):
        import contextlib

        import torch

        @contextlib.contextmanager
        def phase():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            yield
            if cuda:
                torch.cuda.synchronize()
            rec = {"seconds": round(time.time() - t0, 2)}
            if cuda:
                rec["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.report["phases"][name] = rec
            print(f"[gpu_check] {name}: {rec}", flush=True)
        return phase()


def main(argv=None):
    args = parse(argv)
    env = check_env()
    if args.check_only:
        print("gpu_check: variables and files OK")
        return 0
    t_start = time.time()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch
    from PIL import Image

    from pulid_lab.core import losses
    from pulid_lab.real import eva_input, recognizer
    from pulid_lab.real import pipeline as real
    from pulid_lab.real import train as real_train

    if not torch.cuda.is_available() and not args.allow_cpu:
        fail("no CUDA device (pass --allow-cpu to try anyway)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(env["OUT"] or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    phase = Phases()
    report = phase.report
    prompts = real.DEMO_PROMPTS
    report.update(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, resolution=args.resolution, id_scale=args.id_scale, prompts=prompts)
    res = args.resolution

    with phase("load_pipeline"):
        pipe = real.load_pipeline(env["SDXL_DIR"], lightning_unet=env["LIGHTNING_UNET"], kind="sdxl", device=device,
                                  dtype=dtype)
    with phase("load_face_analysis"):
        app = real.load_face_analysis(env["ANTELOPEV2_ROOT"])
    with phase("load_feature_extractor"):
        if env["EVA_CLIP"]:
            extractor = real.load_eva_clip(env["EVA_CLIP"], device=device)
            report["eva_clip"] = env["EVA_CLIP"]
        else:
            extractor = real.ZeroFeatures()  # right shapes, no information
            report["eva_clip"] = None
            print("[gpu_check] EVA_CLIP not set: the EVA part of the ID condition is zeros", flush=True)
    with phase("adapter"):
        adapter = real.RealAdapter(pipe.unet).to(device)
        if env["PULID_V1"]:
            real.apply_official_v1(adapter, real.read_checkpoint(env["PULID_V1"]))
        report["pulid_v1"] = env["PULID_V1"]
        adapter.eval()

    with phase("reference_face"):
        if env["FACE_IMAGE"]:
            ref_path = Path(env["FACE_IMAGE"])
            ref = real.read_image(ref_path)
        else:  # insightface's Tom_Hanks_54745.png, padded so that the detector finds the face
            ref_path, ref = real.default_reference()
        ref_emb, crop = real.reference_face(ref, app, name=ref_path.name)
        parser = eva_input.load_face_parser(env["FACE_PARSER"], device=device) if env["FACE_PARSER"] else None
        report["face_parser"] = env["FACE_PARSER"]
        id_vec, hidden = real.id_condition(ref, app, extractor, name=ref_path.name, device=device, parser=parser)
        with torch.no_grad():
            cond = adapter.tokens(id_vec, hidden)
            uncond = adapter.uncond_tokens(id_vec, hidden)
        report["reference"] = str(ref_path)

    images = {}
    with phase("generate_4step"):
        for i, prompt in enumerate(prompts):
            for with_id in (False, True):
                img = real.generate(pipe, prompt, adapter, cond if with_id else None, uncond, id_scale=args.id_scale,
                                    steps=4, guidance_scale=1.2, seed=args.seed + i, size=res)
                images[(i, with_id)] = img
                img.save(out / f"prompt{i}_{'id' if with_id else 'plain'}.png")

    sims = {}
    for (i, with_id), img in images.items():
        sim = real.face_similarity(img, ref_emb, app, name=f"prompt{i}")
        sims[f"prompt{i}_{'id' if with_id else 'plain'}"] = None if sim is None else round(sim, 4)
    report["face_sim_antelopev2"] = sims

    with phase("align_capture"):
        align = {}
        for i, prompt in enumerate(prompts):
            paths = real_train.lightning_paths(pipe, adapter, cond, prompt, res, seed=args.seed + 100 + i,
                                               id_scale=args.id_scale)
            align[prompt] = {"align_sem": float(losses.align_semantic_loss(paths.cap_id, paths.cap_plain)),
                             "align_layout": float(losses.align_layout_loss(paths.cap_id, paths.cap_plain)),
                             "layers_x_steps": len(paths.cap_id.keys())}
            del paths
        report["align_losses"] = align

    with phase("load_training_models"):
        base_unet = real.load_unet(env["SDXL_DIR"], device=device, dtype=dtype)  # L_diff trains on the base UNet
        train_pipe = real.with_unet(pipe, base_unet)  # shares the VAE and the text encoders with `pipe`
        phi = recognizer.load_face_embedder(env["ANTELOPEV2_ROOT"]).to(device)  # differentiable antelopev2
    face_dir = Path(env["FACE_DIR"]) if env["FACE_DIR"] else out / "faces"
    if not env["FACE_DIR"]:
        face_dir.mkdir(exist_ok=True)
        Image.fromarray(ref).save(face_dir / f"{ref_path.stem}.png")
    ds = real_train.FaceFolder(face_dir, app, extractor, args.train_resolution, device=device, parser=parser)
    adapter.train()
    train = dict(resolution=args.train_resolution, gradient_checkpointing=True, use_accelerate=False, lr=1e-5)
    with phase("train_stage1"):
        tcfg = real_train.RealTrainConfig(stage=1, steps=args.train_steps, checkpoint_every=args.train_steps, **train)
        r = real_train.train_real(tcfg, train_pipe, adapter, ds, out / "train_stage1", progress=False)
        report["train_stage1"] = r["log"]
    if not args.stage1_only:
        for stage in (2, 3):
            with phase(f"train_stage{stage}_k1"):
                tcfg = real_train.RealTrainConfig(stage=stage, steps=1, grad_steps=1, checkpoint_every=1, **train)
                r = real_train.train_real(tcfg, train_pipe, adapter, ds, out / f"train_stage{stage}",
                                          face_recognizer=phi, lightning_unet=pipe.unet, progress=False)
                report[f"train_stage{stage}"] = r["log"]
    adapter.eval()
    del base_unet, train_pipe

    with phase("generate_after_training"):
        with torch.no_grad():
            cond, uncond = adapter.tokens(id_vec, hidden), adapter.uncond_tokens(id_vec, hidden)
        for i, prompt in enumerate(prompts):
            img = real.generate(pipe, prompt, adapter, cond, uncond, id_scale=args.id_scale, steps=4,
                                guidance_scale=1.2, seed=args.seed + i, size=res)
            images[(i, "trained")] = img
            img.save(out / f"prompt{i}_trained.png")

    with phase("face_sim_converted_recognizer"):
        def pixels(im):  # PIL / uint8 RGB -> (1, 3, H, W) in [-1, 1]
            return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            ref_feat = phi(pixels(ref))
            for key, img in images.items():
                i, kind = key
                name = f"prompt{i}_{kind if isinstance(kind, str) else ('id' if kind else 'plain')}"
                report.setdefault("face_sim_converted", {})[name] = round(
                    float(torch.nn.functional.cosine_similarity(phi(pixels(img)), ref_feat)), 4)
        report["face_sim_converted_misses"] = int(phi.misses)
        for i in range(len(prompts)):
            sim = real.face_similarity(images[(i, "trained")], ref_emb, app, name=f"prompt{i}_trained")
            sims[f"prompt{i}_trained"] = None if sim is None else round(sim, 4)

    # grid: rows = prompts; columns = reference crop, without ID, with ID, with the adapter after the training steps
    cell = 256
    grid = Image.new("RGB", (4 * cell, len(prompts) * cell), "white")
    crop_img = Image.fromarray(crop).resize((cell, cell))
    for i in range(len(prompts)):
        grid.paste(crop_img, (0, i * cell))
        grid.paste(images[(i, False)].resize((cell, cell)), (cell, i * cell))
        grid.paste(images[(i, True)].resize((cell, cell)), (2 * cell, i * cell))
        grid.paste(images[(i, "trained")].resize((cell, cell)), (3 * cell, i * cell))
    grid.save(out / "grid.png")
    report["total_seconds"] = round(time.time() - t_start, 1)
    peaks = [p["max_memory_allocated_gb"] for p in report["phases"].values() if "max_memory_allocated_gb" in p]
    if peaks:
        report["max_memory_allocated_gb_overall"] = max(peaks)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"gpu_check: wrote {out / 'grid.png'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
