#!/usr/bin/env bash
# A screen on one GPU: every line of SCREEN_FILE is one `pulid-lab curve` run (validation split, new prompts and
# own captions), all lines at once, one process each.
#   scripts/screen_on_gpu.sh SCREEN_FILE [SECONDS]     (default 3600: the whole script's wall-clock budget)
# A line:  NAME  MILESTONES  NAME=VALUE ...   e.g.  `other_1200  300,600,1200  stage=2 id_source=other stage2_steps=1200`
# ('#' starts a comment). The curves are stopped RESERVE seconds (60) before SECONDS are up, so the packing always
# runs; each curve's JSON is rewritten after every milestone, so a stopped line still reports the milestones it
# reached. Stages are shared between lines through $RUN/stages (a Stage 1 two lines need is trained once; stages that
# ship with the models are reused). With PACK set to a folder, the curves, logs and finished adapters are packed
# there (scripts/pack_stages.py). THREADS: torch threads per process (2). REQUIRE_CUDA=0 lets it run without a GPU
# (a check of the script itself); otherwise it stops at once when torch sees no CUDA device.
set -uo pipefail
file="$1"; budget="${2:-3600}"
run="${RUN:-runs/screen-gpu}"
source "$(dirname "$0")/gpu_common.sh"
pack() { if [ -n "${PACK:-}" ]; then $py scripts/pack_stages.py "$run" "$PACK"; fi; }
$py -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); \
sys.exit(0 if torch.cuda.is_available() or '${REQUIRE_CUDA:-1}' == '0' else 3)" \
  || { echo "torch sees no CUDA device (REQUIRE_CUDA=0 to run anyway)"; exit 1; }
lines=$(grep -v '^\s*#' "$file" | grep -v '^\s*$')
profiles=$(echo "$lines" | grep -o 'profile=[a-z]*' | sort -u | cut -d= -f2)
for p in ${profiles:-quick}; do prepare_bank "$p"; done
stamp "banks and faces"
left=$(( budget - ($(date +%s) - t0) - ${RESERVE:-60} ))
if [ "$left" -lt 30 ]; then echo "no time left for the curves ($left s)"; pack; exit 1; fi
echo "curves: $left s"
while read -r name milestones sets; do
  OMP_NUM_THREADS="${THREADS:-2}" timeout "$left" $py -m pulid_lab.cli curve --set $sets \
    --milestones ${milestones//,/ } --stages "$run/stages" --out "$run/$name.json" > "$run/$name.log" 2>&1 &
done <<< "$lines"
wait
stamp "curves"
for f in "$run"/*.json; do
  [ -e "$f" ] && $py -c "import json; d = json.load(open('$f')); print('$(basename "$f" .json)', d.get('device'), \
[(p['step'], round(p['recognized'], 3), round(p['face_sim'], 3), round(p['prompt_score'], 3), round(p['purity'], 3)) \
for p in d['points']])"
done
pack
