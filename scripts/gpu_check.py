#!/usr/bin/env python
"""End-to-end check of pulid_lab's real tier on one GPU, from local weights only (nothing is downloaded).

Environment variables (paths on the GPU machine):

  SDXL_DIR         diffusers folder of stabilityai/stable-diffusion-xl-base-1.0 (with model_index.json)   required
  LIGHTNING_UNET   ByteDance/SDXL-Lightning sdxl_lightning_4step_unet.safetensors                          required
  ANTELOPEV2_ROOT  folder holding models/antelopev2/*.onnx (insightface antelopev2 pack)                   required
  EVA_CLIP         open_clip EVA02-L-14-336 checkpoint (open_clip_pytorch_model.bin); needs open_clip_torch optional
                   (without it the EVA part of the condition is zeros: shapes and timings only)
  PULID_V1         the official pulid_v1.bin (needs EVA_CLIP to be meaningful)                             optional
  FACE_IMAGE       reference photo (default: insightface's bundled Tom_Hanks_54745.png)                    optional
  FACE_DIR         tiny folder of face photos (+ .txt captions) for a 3-step stage-1 training smoke        optional
  OUT              output folder (default ./gpu_check_out)                                                 optional

What it does, timing each phase and recording torch.cuda.max_memory_allocated: loads the SDXL pipeline in bf16
with the Lightning UNet, loads the official v1 weights if given, detects the reference face, generates 4-step
images (DPM-Solver++ trailing, CFG 1.2, id_scale 0.8, as the official inference) with and without the ID for two
prompts, runs the training Lightning branch (4 DDIM trailing steps) with and without the ID with
pulid_lab.attention.Capture on every attn2 and reports the alignment losses between the two paths, optionally
a 3-step stage-1 training smoke (and, with --stage23, one step of stage 2 and one of stage 3 with a random
stand-in recognizer: memory and time only). Writes OUT/grid.png and OUT/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REQUIRED = ("SDXL_DIR", "LIGHTNING_UNET", "ANTELOPEV2_ROOT")
PROMPTS = ("portrait, color, cinematic", "a person as an astronaut, comic book style, pink background")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024, help="image side (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-scale", type=float, default=0.8)
    p.add_argument("--train-steps", type=int, default=3, help="stage-1 smoke steps when FACE_DIR is set")
    p.add_argument("--train-resolution", type=int, default=1024)
    p.add_argument("--stage23", action="store_true", help="also one step of stage 2 and one of stage 3 (k=1)")
    p.add_argument("--check-only", action="store_true", help="only check the variables and files, then exit")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (very slow; for debugging only)")
    return p.parse_args(argv)


def fail(msg: str, code: int = 2):
    print(f"gpu_check: {msg}", file=sys.stderr)
    sys.exit(code)


def check_env() -> dict:
    env = {k: os.environ.get(k) for k in (*REQUIRED, "EVA_CLIP", "PULID_V1", "FACE_IMAGE", "FACE_DIR", "OUT")}
    missing = [k for k in REQUIRED if not env[k]]
    if missing:
        fail(f"set {', '.join(missing)} (see --help): e.g. SDXL_DIR=/w/sdxl-base LIGHTNING_UNET="
             f"/w/sdxl_lightning_4step_unet.safetensors ANTELOPEV2_ROOT=/w/insightface")
    checks = [("SDXL_DIR", Path(env["SDXL_DIR"]) / "model_index.json"), ("LIGHTNING_UNET", Path(env["LIGHTNING_UNET"])),
              ("ANTELOPEV2_ROOT", Path(env["ANTELOPEV2_ROOT"]) / "models" / "antelopev2")]
    for key in ("EVA_CLIP", "PULID_V1", "FACE_IMAGE"):
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

    from pulid_lab import losses, real, real_train
    from pulid_lab.attention import Capture

    if not torch.cuda.is_available() and not args.allow_cpu:
        fail("no CUDA device (pass --allow-cpu to try anyway)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(env["OUT"] or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    phase = Phases()
    report = phase.report
    report.update(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, resolution=args.resolution, id_scale=args.id_scale, prompts=PROMPTS)
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
            class ZeroEVA(torch.nn.Module):  # right shapes, no information
                def forward(self, crops):
                    b = len(crops)
                    return (torch.zeros(b, 768, device=crops.device),
                            [torch.zeros(b, 577, 1024, device=crops.device) for _ in range(5)])
            extractor = ZeroEVA()
            report["eva_clip"] = None
            print("[gpu_check] EVA_CLIP not set: the EVA part of the ID condition is zeros", flush=True)
    with phase("adapter"):
        adapter = real.RealAdapter(pipe.unet).to(device)
        if env["PULID_V1"]:
            path = Path(env["PULID_V1"])
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            real.apply_official_v1(adapter, state)
        report["pulid_v1"] = env["PULID_V1"]
        adapter.eval()

    with phase("reference_face"):
        ref_path = Path(env["FACE_IMAGE"]) if env["FACE_IMAGE"] else None
        if ref_path is None:
            import insightface
            ref_path = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
        ref = np.asarray(Image.open(ref_path).convert("RGB"))
        ref_emb, crop = real.reference_face(ref, app, name=ref_path.name)
        id_vec, hidden = real.id_condition(ref, app, extractor, name=ref_path.name, device=device)
        with torch.no_grad():
            cond = adapter.tokens(id_vec, hidden)
            uncond = adapter.uncond_tokens(id_vec, hidden)
        report["reference"] = str(ref_path)

    images = {}
    with phase("generate_4step"):
        with adapter.installed(pipe.unet), torch.no_grad():
            for i, prompt in enumerate(PROMPTS):
                for with_id in (False, True):
                    kwargs = {"id_tokens": torch.cat([uncond, cond]), "id_scale": args.id_scale} if with_id else \
                        {"id_tokens": None, "id_scale": 0.0}
                    img = pipe(prompt, num_inference_steps=4, guidance_scale=1.2, height=res, width=res,
                               generator=torch.Generator(device).manual_seed(args.seed + i),
                               cross_attention_kwargs=kwargs).images[0]
                    images[(i, with_id)] = img
                    img.save(out / f"prompt{i}_{'id' if with_id else 'plain'}.png")

    sims = {}
    for (i, with_id), img in images.items():
        try:
            emb, _ = real.reference_face(np.asarray(img), app, name=f"prompt{i}")
            sims[f"prompt{i}_{'id' if with_id else 'plain'}"] = round(float(
                np.dot(emb, ref_emb) / (np.linalg.norm(emb) * np.linalg.norm(ref_emb))), 4)
        except ValueError:
            sims[f"prompt{i}_{'id' if with_id else 'plain'}"] = None
    report["face_sim_antelopev2"] = sims

    with phase("align_capture"):
        cfg = real_train.RealTrainConfig(resolution=res, id_scale=args.id_scale, use_accelerate=False)
        step = real_train.RealPuLIDStep(adapter, pipe, cfg)
        align = {}
        with adapter.installed(pipe.unet), torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                                                           enabled=device.type == "cuda"):
            for i, prompt in enumerate(PROMPTS):
                text, pooled = real_train.encode_text(pipe, [prompt], device)
                g = torch.Generator().manual_seed(args.seed + 100 + i)
                side = res // real_train.vae_scale_factor(pipe.vae)
                x_T = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=g).to(device)
                cap_id, cap_plain = Capture(), Capture()
                step.lightning(text, pooled, cond, x_T, cap_id)
                step.lightning(text, pooled, None, x_T, cap_plain)
                align[prompt] = {"align_sem": float(losses.align_semantic_loss(cap_id, cap_plain)),
                                 "align_layout": float(losses.align_layout_loss(cap_id, cap_plain)),
                                 "layers_x_steps": len(cap_id.keys())}
                del cap_id, cap_plain
        report["align_losses"] = align

    if env["FACE_DIR"]:
        with phase("train_stage1_smoke"):
            ds = real_train.FaceFolder(env["FACE_DIR"], app, extractor, args.train_resolution, device=device)
            tcfg = real_train.RealTrainConfig(stage=1, steps=args.train_steps, resolution=args.train_resolution,
                                              gradient_checkpointing=True, use_accelerate=False,
                                              checkpoint_every=args.train_steps)
            r = real_train.train_real(tcfg, pipe, adapter, ds, out / "train_stage1", progress=False)
            report["train_stage1"] = r["log"]
        if args.stage23:
            phi = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, 64, 3, stride=2),
                                      torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(1),
                                      torch.nn.Linear(64 * 16, 512)).to(device)  # random stand-in: memory/time only
            for stage in (2, 3):
                with phase(f"train_stage{stage}_smoke_k1"):
                    tcfg = real_train.RealTrainConfig(stage=stage, steps=1, resolution=args.train_resolution,
                                                      grad_steps=1, gradient_checkpointing=True, use_accelerate=False)
                    r = real_train.train_real(tcfg, pipe, adapter, ds, out / f"train_stage{stage}", face_recognizer=phi,
                                              progress=False)
                    report[f"train_stage{stage}"] = r["log"]

    # grid: rows = prompts; columns = reference crop, without ID, with ID
    cell = 256
    grid = Image.new("RGB", (3 * cell, len(PROMPTS) * cell), "white")
    crop_img = Image.fromarray(crop).resize((cell, cell))
    for i in range(len(PROMPTS)):
        grid.paste(crop_img, (0, i * cell))
        grid.paste(images[(i, False)].resize((cell, cell)), (cell, i * cell))
        grid.paste(images[(i, True)].resize((cell, cell)), (2 * cell, i * cell))
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
