"""Atomic file writes (tmp file + rename): a killed process never leaves a half-written JSON or CSV."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def plain_json(d):
    """Dataclass dicts -> JSON-ready values (tuples become lists, recursively)."""
    if isinstance(d, dict):
        return {k: plain_json(v) for k, v in d.items()}
    if isinstance(d, (tuple, list)):
        return [plain_json(v) for v in d]
    return d


def write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    """Write JSON atomically (tmp file + rename): a killed process never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(path: str | Path, rows: list[dict], keys: list[str]) -> Path:
    """Write rows as CSV atomically (tmp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def write_log(path: Path, log: list[dict]) -> None:
    """Every loss term of every step as CSV (atomically replaced)."""
    if not log:
        return
    write_csv(path, log, sorted({k for row in log for k in row}, key=lambda k: (k != "step", k)))
