# Sourced by the GPU scripts (paper_on_gpu.sh, screen_on_gpu.sh) once they have set `run`: the Python to use, the
# run folder, `stamp` (elapsed seconds into $run/timings.txt) and `prepare_bank`.
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$run"
t0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - t0 )) s" | tee -a "$run/timings.txt"; }
# prepare_bank PROFILE: the profile's training bank and its faces (boxes, phi_cond embeddings), rendered and computed
# in BANK_WORKERS processes (default 1), once, before the training processes read them from the cache
prepare_bank() {
  $py -c "from pulid_lab.train.config import REPRODUCE_PROFILES as P; from pulid_lab.world import data, toyfaces as w; \
from pulid_lab.models.identity import BankFaces, FaceAnalysis; \
bank = data.render_bank(w.TRAIN_IDS, P['$1'].bank_variants, seed=0, progress=False, workers=${BANK_WORKERS:-1}); \
BankFaces(bank.images, FaceAnalysis()).all(workers=${BANK_WORKERS:-1})" || { echo "the bank or its faces failed"; exit 1; }
}
