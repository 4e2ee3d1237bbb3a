#!/usr/bin/env bash
# The `paper` profile's Table 2 (3 seeds) on one GPU, with its seeds' stages trained in parallel processes.
#   scripts/paper_on_gpu.sh [PROFILE] [SEEDS] [TRAIN_SECONDS]     (defaults: paper 3 3600)
# 1. a smoke reproduction first (a broken CUDA path fails in seconds, not after the budget is spent; SMOKE=0 skips it);
# 2. the training bank and its faces (boxes, phi_cond embeddings) computed once, before the trainers read them;
# 3. every seed's chains trained at once, two processes per seed (Stage 1 -> 2 -> 3, and the naive row, which waits
#    for the same Stage 1), each stage checkpointed (a rerun resumes); stopped after TRAIN_SECONDS;
# 4. `pulid-lab reproduce` over the seeds whose stages all finished: it only evaluates, and draws the figures.
# Output in ${RUN:-runs/reproduce-$PROFILE} (figures in its figures/), timings in timings.txt there; BANK_WORKERS
# processes render the bank and compute its faces (default 1). Measured times: docs/profiles.md#measured-times.
set -uo pipefail
profile="${1:-paper}"; seeds="${2:-3}"; budget="${3:-3600}"
run="${RUN:-runs/reproduce-$profile}"
source "$(dirname "$0")/gpu_common.sh"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
if [ "${SMOKE:-1}" = 1 ]; then
  $py -m pulid_lab.cli reproduce --profile smoke --seeds 1 --out "$run-smoke" > "$run/smoke.log" 2>&1 \
    || { tail -n 40 "$run/smoke.log"; echo "smoke reproduction failed: see $run/smoke.log"; exit 1; }
  stamp "smoke reproduction"
fi
prepare_bank "$profile"
stamp "bank and faces"
for s in $(seq 0 $((seeds - 1))); do
  for row in stage3 naive; do
    OMP_NUM_THREADS="${THREADS:-2}" timeout "$budget" $py -c "
from pathlib import Path
from pulid_lab.train.experiment import train_chain
from pulid_lab.train.reproduce import row_experiment
train_chain(row_experiment('$row', '$profile', $s), Path('$run') / 'stages', progress=False)
Path('$run', 'trained_${row}_seed$s').touch()
" > "$run/train_${row}_seed$s.log" 2>&1 &
  done
done
wait
stamp "training"
done_seeds=0
while [ -e "$run/trained_stage3_seed$done_seeds" ] && [ -e "$run/trained_naive_seed$done_seeds" ]; do
  done_seeds=$((done_seeds + 1))
done
if [ "$done_seeds" -eq 0 ]; then tail -n 20 "$run"/train_*_seed*.log; echo "no seed finished training"; exit 1; fi
$py -m pulid_lab.cli reproduce --profile "$profile" --seeds "$done_seeds" --out "$run" 2>&1 | tee "$run/reproduce.log"
stamp "evaluation of $done_seeds seeds"
