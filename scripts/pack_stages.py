"""Pack a screen's results for the trip back from a remote machine that returns a few files of limited size.

    python scripts/pack_stages.py RUN OUT [--bin-mb 15] [--max-bins 7]

OUT/results.tar.gz: every JSON, log and timings file of RUN and each stage's losses.csv. OUT/stages_<n>.tar: the
finished adapters (adapter.safetensors, manifest.json, losses.csv) of RUN/stages, in the order the curves name
them (a curve's last stage first, then its parents), in bins of at most --bin-mb MB; what does not fit is listed.
"""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

KEEP = ("adapter.safetensors", "manifest.json", "losses.csv")


def stage_order(run: Path) -> list[Path]:
    """Finished stage folders: those named by the curves first (in the curves' file order), then the rest."""
    finished = sorted(p.parent.resolve() for p in (run / "stages").glob("*/adapter.safetensors"))
    named = [Path(a).resolve() for c in sorted(run.glob("*.json")) if (a := json.loads(c.read_text()).get("adapter"))]
    return list(dict.fromkeys([f for f in named if f in finished] + finished))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bin-mb", type=float, default=15)
    ap.add_argument("--max-bins", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
        for p in sorted(args.run.rglob("*")):
            if p.is_file() and (p.suffix in (".json", ".log", ".txt") or p.name == "losses.csv"):
                tar.add(p, arcname=str(p.relative_to(args.run)))
    limit = args.bin_mb * 1e6
    bins: list[list[Path]] = []
    left = []
    for folder in stage_order(args.run):
        size = sum((folder / n).stat().st_size for n in KEEP if (folder / n).exists())
        fit = next((b for b in bins if sum(s for _, s in b) + size <= limit), None)
        if fit is None and len(bins) < args.max_bins and size <= limit:
            bins.append(fit := [])
        if fit is None:
            left.append(folder.name)
            continue
        fit.append((folder, size))
    for n, b in enumerate(bins):
        with tarfile.open(args.out / f"stages_{n}.tar", "w") as tar:
            for folder, _ in b:
                for name in KEEP:
                    if (folder / name).exists():
                        tar.add(folder / name, arcname=f"stages/{folder.name}/{name}")
        print(f"stages_{n}.tar: {', '.join(f.name for f, _ in b)}")
    if left:
        print(f"not packed (no room): {', '.join(left)}")


if __name__ == "__main__":
    main()
