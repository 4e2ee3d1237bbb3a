"""The one checkpoint format: a folder of ``<name>.safetensors`` plus ``manifest.json``.

manifest.json = {"command", "profile", "git_commit", "created", "models": {name: {"kind", "config", "file",
"sha256", "bytes", "seed", "metrics"}}}. Loading verifies sha256 and says how to rebuild what is wrong.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.files import atomic_write, write_json
from . import nets


def config_from_json(cls, d: dict):
    """A config dataclass back from its JSON form in a manifest (``asdict`` + json): lists become tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PACKAGE_DIR = Path(__file__).resolve().parents[1]
SHIPPED_DIR = PACKAGE_DIR / "shipped"  # the `paper` profile models, in the repository


class CheckpointError(RuntimeError):
    """A checkpoint is missing or corrupted; the message says how to rebuild it."""


def default_models_dir() -> Path:
    return Path(os.environ.get("PULID_LAB_MODELS", SHIPPED_DIR))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return {"models": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); " + rebuild_hint(folder, manifest={})) from None


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(Path(folder) / "manifest.json", manifest, sort_keys=True)


def save_model(folder: Path, name: str, kind: str, config: dict, model: torch.nn.Module, *, profile: str,
               seed: int, metrics: dict | None = None, command: str | None = None) -> dict:
    """Save one model atomically and record it in the folder's manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.safetensors"
    # floating tensors are stored as fp16 (half the size in the repository); loading casts back to fp32
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    atomic_write(file, lambda tmp: save_file(state, str(tmp)))
    manifest = read_manifest(folder)
    manifest.update(profile=profile, git_commit=git_commit(),
                    command=command or " ".join(["pulid-lab"] + sys.argv[1:]),
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    entry = dict(kind=kind, config=config, file=file.name, sha256=sha256_file(file), bytes=file.stat().st_size,
                 seed=seed, metrics=metrics or {})
    manifest.setdefault("models", {})[name] = entry
    write_manifest(folder, manifest)
    return entry


def record_file(folder: Path, name: str, kind: str, file: Path, source: str) -> dict:
    """Record a derived artefact (e.g. the ONNX export of a model) with its sha256 in the manifest."""
    folder, file = Path(folder), Path(file)
    manifest = read_manifest(folder)
    rel = file.resolve().relative_to(folder.resolve())  # files live inside the folder, maybe in a subfolder
    entry = dict(kind=kind, file=str(rel), sha256=sha256_file(file), bytes=file.stat().st_size, source=source)
    manifest.setdefault("files", {})[name] = entry
    write_manifest(folder, manifest)
    return entry


def verified_file(name: str, folder: Path | None = None) -> Path:
    """Path of a recorded artefact after checking its sha256 (clear error with the rebuild command)."""
    folder = Path(folder) if folder is not None else default_models_dir()
    entry = read_manifest(folder).get("files", {}).get(name)
    if entry is None:
        raise CheckpointError(f"no file {name!r} recorded in {folder / 'manifest.json'}; " + rebuild_hint(folder))
    path = folder / entry["file"]
    if not path.exists():
        raise CheckpointError(f"missing file {path}; " + rebuild_hint(folder))
    if sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"file {path} is corrupted (sha256 mismatch with the manifest); " + rebuild_hint(folder))
    return path


def rebuild_hint(folder: Path, profile: str | None = None, manifest: dict | None = None,
                 name: str | None = None) -> str:
    """The command that rebuilds what ``folder`` holds: the shipped models, a trained adapter stage, or pretrained
    models of a profile; ``name`` is the model asked for (an adapter asked of a folder that never held one is a
    wrong path, not something to pretrain)."""
    folder = Path(folder)
    if folder.resolve() == Path(SHIPPED_DIR).resolve():
        return f"restore the shipped files with: git checkout -- {folder} (or rebuild them: make pretrain)"
    manifest = read_manifest(folder) if manifest is None else manifest
    if "adapter" in manifest.get("models", {}) or (folder / "adapter.safetensors").exists():
        return (f"delete {folder} and rerun the command that trained it (pulid-lab reproduce, grid or curve retrain a "
                "missing stage)")
    if name == "adapter":
        return (f"no trained adapter in {folder}: give a stage folder such as runs/reproduce/stages/stage3-<key>, "
                "which `make demo` writes, or train one with `pulid-lab reproduce`")
    profile = profile or manifest.get("profile", "paper")
    return f"rebuild it with: pulid-lab pretrain --profile {profile} --out {folder}"


def load_state(name: str, folder: Path | None = None) -> tuple[dict, dict]:
    """(state dict as fp32, manifest entry) of model ``name`` in ``folder``, after checking its sha256."""
    folder = Path(folder) if folder is not None else default_models_dir()
    manifest = read_manifest(folder)
    entry = manifest.get("models", {}).get(name)
    if entry is None:
        raise CheckpointError(f"no model {name!r} in {folder} (manifest lists {sorted(manifest.get('models', {}))}); "
                              + rebuild_hint(folder, name=name))
    file = folder / entry["file"]
    if not file.exists():
        raise CheckpointError(f"missing checkpoint file {file}; " + rebuild_hint(folder, name=name))
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        raise CheckpointError(f"checkpoint {file} is corrupted (sha256 {digest[:12]}… != manifest "
                              f"{entry['sha256'][:12]}…); " + rebuild_hint(folder, name=name))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
    return state, entry


def load_model(name: str, folder: Path | None = None, device="cpu") -> torch.nn.Module:
    """Load network ``name`` (a nets.KINDS model) from ``folder`` (default: the shipped models); eval mode."""
    state, entry = load_state(name, folder)
    model = nets.build(entry["kind"], entry["config"])
    model.load_state_dict(state)
    return model.to(device).eval()
