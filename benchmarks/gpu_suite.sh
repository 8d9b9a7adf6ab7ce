#!/usr/bin/env bash
# Device calls for the current figure sets (benchmarks/README.md), each under the
# 10-minute limit of one call; results under $OUT.
#   tests              every GPU test (pytest -m gpu; the two-GPU ones skip on one GPU)
#   peers [MODEL ...]  the peer table: vLLM 0.25.1, then orbitllm, on the same requests
#                      (peer_bench.py; WORKLOADS, default "nano single prefix long"), then
#                      both side by side. Default model qwen3-0.6b; one model per call fits.
#                      Needs the vLLM bundle: calls 1 and 2 of ../shared/peers/README.md on
#                      the same warm machine, then this one carrying .peer/c.
#   ab [MODEL ...]     A/B of two trees in one call: orbitllm from this tree and from $OLD
#                      (default .old, carried: see benchmarks/README.md) on each model
#                      (default qwen3-0.6b llama3.1-8b; WORKLOADS default "nano single
#                      prefix"), then every figure against the old tree's (TOLERANCE, in %,
#                      default 3: the status is 1 when one is worse by more).
# PEER: the path of peer_bench.py (default .peer/c/peer_bench.py, where the bundle puts it,
# else ../shared/peers/peer_bench.py).
set -uo pipefail
MODE=${1:-tests}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
HERE=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/matmul_peak.py 2>&1 | tee -a "$OUT/gpu.txt"
git log -1 --format='tree under test: %h %s' 2>/dev/null | tee -a "$OUT/gpu.txt"

peer_script() {
  for p in "${PEER:-}" .peer/c/peer_bench.py ../shared/peers/peer_bench.py; do
    [ -n "$p" ] && [ -f "$p" ] && { echo "$p"; return; }; done
  echo "peer_bench.py not found: carry .peer/c or set PEER" >&2; exit 2
}

# orbitllm ENGINE_TREE MODEL OUTFILE: one peer_bench run of orbitllm from the tree ENGINE_TREE.
orbitllm_run() {
  local src; src=$(cd "$1" && pwd)
  echo "== orbitllm ($1) $2 $WORKLOADS"
  ORBITLLM_SRC=$src PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH} timeout ${T:-300} \
    python3 "$PEER_PY" orbitllm "$2" "$3" $WORKLOADS 2>&1 | grep -v Warning | tail -4
}

case "$MODE" in
  tests)
    timeout 560 python3 -m pytest -q -m gpu tests/ --durations=8 -o faulthandler_timeout=540 2>&1 \
      | grep -v "_pytest\|pluggy" | tee "$OUT/tests.txt" | tail -24 ;;
  peers)
    PEER_PY=$(peer_script); WORKLOADS=${WORKLOADS:-nano single prefix long}
    if [ ! -f /tmp/vsite/.peer_c_installed ] && ls .peer/c/*.whl >/dev/null 2>&1; then
      mkdir -p /tmp/vwhl && cp .peer/c/*.whl /tmp/vwhl/ && python3 -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --target /tmp/vsite /tmp/vwhl/*.whl && touch /tmp/vsite/.peer_c_installed
    fi
    export PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
    files=(); models=("$@"); [ ${#models[@]} -gt 0 ] || models=(qwen3-0.6b)
    for model in "${models[@]}"; do
      echo "== vllm $model $WORKLOADS"
      timeout ${T:-400} python3 "$PEER_PY" vllm "$model" "$OUT/vllm_$model.json" $WORKLOADS 2>&1 \
        | grep -v Warning | tail -4
      # a vLLM run cut short can leave its engine-core child holding the GPU: free it by PID
      for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill "$pid" 2>/dev/null; done
      orbitllm_run "$HERE" "$model" "$OUT/orbitllm_$model.json"
      files+=("vllm=$OUT/vllm_$model.json" "orbitllm=$OUT/orbitllm_$model.json")
    done
    python3 benchmarks/peer_compare.py "${files[@]}" ;;
  ab)
    PEER_PY=$(peer_script); WORKLOADS=${WORKLOADS:-nano single prefix}; OLD=${OLD:-.old}
    [ -d "$OLD/orbitllm" ] || { echo "no old tree at $OLD (carry it: benchmarks/README.md)" >&2; exit 2; }
    status=0; models=("$@"); [ ${#models[@]} -gt 0 ] || models=(qwen3-0.6b llama3.1-8b)
    for m in "${models[@]}"; do
      orbitllm_run "$HERE" "$m" "$OUT/new_$m.json"
      orbitllm_run "$OLD" "$m" "$OUT/old_$m.json"
      python3 benchmarks/peer_compare.py --tolerance "${TOLERANCE:-3}" "old=$OUT/old_$m.json" "new=$OUT/new_$m.json" \
        || status=1
    done
    exit $status ;;
  *)
    echo "unknown mode $MODE (tests | peers | ab)" >&2; exit 2 ;;
esac
