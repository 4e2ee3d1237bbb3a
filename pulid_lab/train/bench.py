"""`pulid-lab bench --json`: measured ratios for the PuLID core on the mini model (not timed tests).

Peak memory on CPU: each Lightning configuration runs in a fresh subprocess; the figure is the growth of the
process's peak resident set (VmHWM) during one training step over its resident set just before it (VmRSS),
read from /proc/self/status. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves
tensor-sized blocks with mmap and returns them to the OS when freed; otherwise freed memory stays in the
heap and the high-water mark measures the allocator's fragmentation rather than live tensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from ..core import losses
from ..core.adapter import PuLIDAdapter
from ..core.attention import Capture, install
from ..core.branches import lightning_branch, unet_fn
from ..core.id_encoder import IDEncoderConfig
from ..models.base import BaseModelConfig, OriginalModel, initial_noise


def _timeit(fn, repeat=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def _setup(batch, seed=0):
    torch.manual_seed(seed)
    base = OriginalModel(BaseModelConfig()).requires_grad_(False)
    adapter = PuLIDAdapter(base.unet, IDEncoderConfig(token_dim=base.cfg.text_hidden))
    emb = torch.randn(batch, 512)
    feats = [torch.randn(batch, c, s, s) for c, s in zip((32, 64, 128, 256, 256), (32, 16, 8, 4, 1))]
    text = base.encode(["a portrait, sketch, blue background"] * batch).detach()
    return base, adapter, emb, feats, text


def hook_overhead(batch=16) -> float:
    base, adapter, emb, feats, text = _setup(batch)
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    with torch.no_grad():
        plain = _timeit(lambda: base.unet(x, t, encoder_hidden_states=text))
        with install(base.unet):
            def captured():
                cap = Capture()
                base.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"capture": cap, "step": 0})
            hooked = _timeit(captured)
    return hooked / plain


def lightning_step(k: int, use_checkpoint: bool, batch: int = 8, every_step: bool = False) -> dict:
    """One Lightning-branch training step (both paths, L_align + an image loss, backward); memory growth and time.
    ``every_step``: the alignment loss trains at every step (``graph_every_step``), the image loss through the last k."""
    base, adapter, emb, feats, text = _setup(batch)
    x_T = initial_noise(batch, 0)
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    with adapter.installed(base.unet):
        out = lightning_branch(base.unet, text, adapter.tokens(emb, feats), x_T, grad_steps=k, use_checkpoint=use_checkpoint,
                               graph_every_step=every_step)
        loss = losses.align_loss(out.capture_id, out.capture_plain)[0] + out.image_id.square().mean()
        loss.backward()
    return {"seconds": time.perf_counter() - t0, "peak_growth_mib": (_peak_kib() - rss0) / 1024}


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _rss_kib():
    return _status("VmRSS:")


def _peak_kib():
    return _status("VmHWM:")


# the allocator setting under which a process's peak resident set measures live tensors (module docstring)
MEMORY_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _reset_peak() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux: /proc/self/clear_refs, '5')."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _json_from_subprocess(code: str, for_memory: bool = True) -> dict:
    """Run ``code`` in a fresh interpreter; its last line's JSON. ``for_memory``: the allocator returns freed tensors
    to the OS (every large allocation an mmap: right for peak memory, about twice as slow, so not for timing)."""
    env = {**os.environ, **MEMORY_ALLOCATOR_ENV} if for_memory else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_subprocess(k, use_checkpoint, every_step=False):
    return _json_from_subprocess(f"import json, torch; torch.manual_seed(0); from pulid_lab.train.bench import "
                                 f"lightning_step; print(json.dumps(lightning_step({k}, {use_checkpoint}, "
                                 f"every_step={every_step})))")


def align_loss_fraction(batch=8) -> float:
    """Time of L_align (forward + backward, all layers, one step) / time of that step's UNet forward + backward."""
    base, adapter, emb, feats, text = _setup(batch)
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    with adapter.installed(base.unet):
        tokens = adapter.tokens(emb, feats).detach()
        cap_plain = Capture()
        with torch.no_grad():
            unet_fn(base.unet, text, None, 0.0, cap_plain)(x, t, 0)

        def unet_step():
            out = unet_fn(base.unet, text, tokens.requires_grad_(True), 1.0, Capture())(x, t, 0)
            out.square().mean().backward()
        cap_id = Capture()
        unet_fn(base.unet, text, tokens, 1.0, cap_id)(x, t, 0)
        qs = {k: v.detach() for k, v in cap_id.q.items()}

        def align_only():
            cap = Capture()
            for key, q in qs.items():
                cap.q[key], cap.k[key] = q.clone().requires_grad_(True), cap_id.k[key].detach()
            losses.align_loss(cap, cap_plain)[0].backward()
        return _timeit(align_only) / _timeit(unet_step)


def sdpa_vs_explicit(n_img=4096, n_txt=77, channels=640, batch=1) -> dict:
    """The semantic term at SDXL-like sizes: SDPA(query=K, key=Q, value=Q) vs the explicit softmax formula."""
    q = torch.randn(batch, n_img, channels, requires_grad=True)
    k = torch.randn(batch, n_txt, channels)

    def sdpa():
        losses.text_response(q, k).sum().backward()

    def explicit():
        (torch.softmax(k @ q.transpose(1, 2) / channels ** 0.5, -1) @ q).sum().backward()
    return {"sdpa_seconds": _timeit(sdpa), "explicit_seconds": _timeit(explicit),
            "attention_matrix_mib": batch * n_img * n_txt * 4 / 2**20}


def adapter_train_throughput_ratio(batch=16) -> float:
    """Stage-1 adapter training images/s / plain base-UNet training images/s, equal batch."""
    torch.manual_seed(0)
    base, adapter, emb, feats, text = _setup(batch)
    x, t, v = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500), torch.randn(batch, 3, 32, 32)
    opt_a = torch.optim.AdamW(adapter.parameters(), 1e-4)

    def adapter_step():
        with adapter.installed(base.unet):
            pred = unet_fn(base.unet, text, adapter.tokens(emb, feats))(x, t, 0)
            loss = losses.diffusion_loss(pred, v)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()
    t_adapter = _timeit(adapter_step, repeat=4)
    base.unet.requires_grad_(True)
    opt_b = torch.optim.AdamW(base.unet.parameters(), 1e-4)

    def base_step():
        loss = losses.diffusion_loss(base.unet(x, t, encoder_hidden_states=text).sample, v)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
    t_base = _timeit(base_step, repeat=4)
    return t_base / t_adapter  # ratio of images/s


def run() -> dict:
    by_k = {k: _in_subprocess(k, True) for k in (1, 2, 3, 4)}
    k1, k4 = by_k[1], by_k[4]
    k1n, k4n = _in_subprocess(1, False), _in_subprocess(4, False)
    # alignment at every step (the paper) vs only through the last k = 1 step: both checkpointed per step
    every1 = _in_subprocess(1, True, every_step=True)
    report = {
        "hook_overhead": hook_overhead(),
        "lightning_memory_k4_over_k1": k4["peak_growth_mib"] / k1["peak_growth_mib"],
        "lightning_memory_k4_over_k1_no_checkpoint": k4n["peak_growth_mib"] / k1n["peak_growth_mib"],
        "lightning_time_k4_over_k1": k4["seconds"] / k1["seconds"],
        "lightning_step_mib": {**{f"k{k}": round(v["peak_growth_mib"], 1) for k, v in by_k.items()},
                               "k1_no_checkpoint": round(k1n["peak_growth_mib"], 1),
                               "k4_no_checkpoint": round(k4n["peak_growth_mib"], 1),
                               "k1_align_every_step": round(every1["peak_growth_mib"], 1)},
        "lightning_memory_align_every_step_over_last_step": every1["peak_growth_mib"] / k1["peak_growth_mib"],
        "lightning_time_align_every_step_over_last_step": every1["seconds"] / k1["seconds"],
        # k = 1 never needs gradients below the first attn2 layer (the full-resolution level); every k >= 2 does
        "lightning_memory_k4_over_k2": by_k[4]["peak_growth_mib"] / by_k[2]["peak_growth_mib"],
        "align_loss_fraction": align_loss_fraction(),
        "sdxl_semantic_term": sdpa_vs_explicit(),
        "adapter_train_throughput_ratio": adapter_train_throughput_ratio(),
        "threads": torch.get_num_threads(),
    }
    report["goals"] = {"hook_overhead <= 1.10": report["hook_overhead"] <= 1.10,
                       "lightning_memory_k4_over_k1 <= 1.15": report["lightning_memory_k4_over_k1"] <= 1.15,
                       "align_loss_fraction <= 0.10": report["align_loss_fraction"] <= 0.10,
                       "adapter_train_throughput_ratio >= 0.9": report["adapter_train_throughput_ratio"] >= 0.9}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}


def stage_step_breakdown(stage: int = 2, id_loss: str = "lightning", steps: int = 4, models_dir=None,
                         batch: int = 16, lightning_batch: int = 8, align_batch: int = 4, grad_steps: int = 1,
                         lightning_checkpoint: bool = False) -> dict:
    """Where one PuLID training step of the shipped models spends its time (seconds per step, median over
    ``steps`` after one warm-up step): the frozen conditioning path, the diffusion branch's UNet forward, the
    Lightning branch's forward, the recognizers of L_id, the backward pass and the optimiser; plus the step's
    floating-point work and the time this machine's matrix multiply would need for it, and the growth of the
    process's peak resident set during the last step (``peak_growth_mib``: only in a process started with
    MALLOC_MMAP_THRESHOLD_ set, as ``iteration_k4_over_k1`` starts it -- otherwise glibc keeps freed tensors and the
    figure reads near 0 -- and where /proc can reset the peak; else None).
    ``grad_steps``: the Lightning steps backpropagated (k); ``lightning_checkpoint``: recompute each Lightning
    step's activations in backward (SDXL's setting; the mini trainer's default keeps them)."""
    import tempfile
    from collections import defaultdict

    from torch.utils.flop_counter import FlopCounterMode

    from ..world import toyfaces as world
    from ..world.data import render_bank
    from . import pulid_trainer as T

    bank = render_bank(world.TRAIN_IDS[:64], 4, seed=0, progress=False)
    cfg = T.PuLIDTraining(stage=stage, id_loss=id_loss, steps=steps + 1, batch=batch, lightning_batch=lightning_batch,
                          align_batch=align_batch, grad_steps=grad_steps,
                          lightning_checkpoint=lightning_checkpoint, checkpoint_every=10_000)
    timers: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            timers[name] += time.perf_counter() - t0
            return out
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        tr = T.PuLIDTrainer(cfg, bank, tmp, models_dir)
        condition = tr.conditioner
        originals = {"unet_fn": T.unet_fn, "lightning_branch": T.lightning_branch, "id_loss": T.losses.id_loss}
        T.unet_fn = lambda *a, **k: timed("diffusion_forward", originals["unet_fn"](*a, **k))
        T.lightning_branch = timed("lightning_forward", originals["lightning_branch"])
        T.losses.id_loss = timed("id_loss_forward", originals["id_loss"])
        tr.conditioner = timed("conditioning", condition.__call__)
        try:
            per_step, peak_mib = [], None
            with tr.adapter.installed(tr.base.unet):
                for step in range(steps + 1):
                    timers.clear()
                    measure = step == steps and MEMORY_ALLOCATOR_ENV.keys() <= os.environ.keys() and _reset_peak()
                    rss0 = _rss_kib()
                    t0 = time.perf_counter()
                    terms = tr.step_losses(step)
                    t1 = time.perf_counter()
                    tr.opt.zero_grad(set_to_none=True)
                    terms["total"].backward()
                    t2 = time.perf_counter()
                    tr.opt.step()
                    t3 = time.perf_counter()
                    per_step.append({**timers, "other_forward": t1 - t0 - sum(timers.values()), "backward": t2 - t1,
                                     "optimiser": t3 - t2, "total": t3 - t0})
                    if measure:
                        peak_mib = (_peak_kib() - rss0) / 1024
                with FlopCounterMode(display=False) as counter:
                    terms = tr.step_losses(steps + 1)
                    terms["total"].backward()
                flops = counter.get_total_flops()
        finally:
            T.unet_fn, T.lightning_branch, T.losses.id_loss = originals["unet_fn"], originals["lightning_branch"], originals["id_loss"]
    keys = per_step[-1].keys()
    median = {k: sorted(s.get(k, 0.0) for s in per_step[1:])[len(per_step[1:]) // 2] for k in keys}
    a = torch.randn(2048, 2048)
    matmul = _timeit(lambda: a @ a, repeat=5)
    rate = 2 * 2048 ** 3 / matmul  # FLOP/s of this machine's sgemm
    return {"stage": stage, "id_loss": id_loss, "grad_steps": grad_steps, "lightning_checkpoint": lightning_checkpoint,
            "seconds": {k: round(v, 4) for k, v in median.items()},
            "fraction": {k: round(v / median["total"], 3) for k, v in median.items() if k != "total"},
            "gflop_per_step": round(flops / 1e9, 2), "sgemm_gflops": round(rate / 1e9, 1),
            "flop_limited_seconds": round(flops / rate, 4),
            "flop_limited_fraction": round(flops / rate / median["total"], 3),
            "peak_growth_mib": None if peak_mib is None else round(peak_mib, 1)}


def iteration_k4_over_k1(stage: int = 2, models_dir=None, steps: int = 4, lightning_checkpoint: bool = False,
                         **batches) -> dict:
    """The paper's s/iter figure in the mini world (SDXL: 2.6 s/iter at k = 1, 3.3 at k = 4, i.e. 1.27x; 41 vs 63 GB):
    one whole training iteration of ``stage`` on the shipped models (conditioning, diffusion branch, Lightning
    branch, recognizers, backward, optimiser) with the last 4 Lightning steps backpropagated over the last 1 --
    time (median step, in a process with the usual allocator) and peak memory growth (one step, in a process whose
    allocator returns freed memory), each k and each figure in a fresh subprocess. ``batches``: batch sizes, as in
    ``stage_step_breakdown`` (default: the trainer's)."""
    def measured(k, for_memory):
        return _json_from_subprocess(
            f"import json; from pulid_lab.train.bench import stage_step_breakdown; print(json.dumps("
            f"stage_step_breakdown(stage={stage}, steps={1 if for_memory else steps}, models_dir="
            f"{str(models_dir) if models_dir else None!r}, grad_steps={k}, lightning_checkpoint={lightning_checkpoint}, "
            f"**{batches!r})))", for_memory)
    seconds = {k: measured(k, False)["seconds"]["total"] for k in (1, 4)}
    peak = {k: measured(k, True)["peak_growth_mib"] for k in (1, 4)}
    memory = peak[4] / peak[1] if peak[1] and peak[4] is not None else None
    return {"stage": stage, "lightning_checkpoint": lightning_checkpoint, "seconds_k1": seconds[1],
            "seconds_k4": seconds[4], "time_k4_over_k1": round(seconds[4] / seconds[1], 3),
            "peak_growth_mib_k1": peak[1], "peak_growth_mib_k4": peak[4],
            "memory_k4_over_k1": None if memory is None else round(memory, 3)}
