"""Atomic file writes (tmp file + rename): a killed process never leaves a half-written JSON or CSV."""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Callable


def plain_json(d):
    """Dataclass dicts -> JSON-ready values (tuples become lists, recursively)."""
    if isinstance(d, dict):
        return {k: plain_json(v) for k, v in d.items()}
    if isinstance(d, (tuple, list)):
        return [plain_json(v) for v in d]
    return d


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename tmp -> path: a killed process never leaves a half-written file. A failed write (a
    full disk) removes its tmp file and says so in one sentence; what was finished before stays on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers of one file never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}): free disk space (or fix permissions) and "
                               "rerun the same command; finished work is kept") from None
    return path


def _remove_stale_tmp(path: Path) -> None:
    """Remove the tmp files of ``path`` left by writers that died mid-write (kill -9: no handler runs)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_npz(path: str | Path, **arrays) -> Path:
    """``np.savez`` of ``arrays`` through ``atomic_write`` (the file keeps its name: no ``.npz`` is appended)."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


def write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    """Write JSON atomically (tmp file + rename)."""
    text = json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: str | Path, rows: list[dict], keys: list[str]) -> Path:
    """Write rows as CSV atomically (tmp file + rename)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    return atomic_write(path, write)


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True):
    """Hold an exclusive lock on ``path`` (holding our pid) for the duration; released even on kill -9. With
    ``wait=False`` a held lock raises ``RunFolderBusy`` naming the holder's pid instead of waiting."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunFolderBusy(f"{path.parent} is being written by another process (pid {holder}); wait for it to "
                                "finish, or give this run another --out") from None
        try:
            f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(folder: str | Path):
    """One writer per run folder (``folder/.lock``): a second writer gets ``RunFolderBusy`` at once, not a race."""
    return file_lock(Path(folder) / ".lock", wait=False)


def write_log(path: Path, log: list[dict]) -> None:
    """Every loss term of every step as CSV (atomically replaced)."""
    if not log:
        return
    write_csv(path, log, sorted({k for row in log for k in row}, key=lambda k: (k != "step", k)))
