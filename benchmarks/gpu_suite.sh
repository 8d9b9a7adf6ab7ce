#!/usr/bin/env bash
# Device calls for issue 3's figures, each under the 10-minute limit (results under $OUT):
#   tests   GPU tests + a step profile + the Qwen3-0.6B figures
#   A       Qwen3-0.6B: orbitllm and the transformers anchor on the same workload;
#           Llama-3.1-8B: orbitllm throughput, single request, 8k prefill
#   B       Llama-3.1-8B: the transformers anchor (with orbitllm again in the same run)
set -uo pipefail
MODE=${1:-tests}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/matmul_peak.py 2>&1 | tee -a "$OUT/gpu.txt"
B="python3 -m orbitllm bench throughput --random-weights --max-model-len 2048"
run() { local name=$1; shift; echo "== $name: $*"; timeout 400 "$@" --output-json "$OUT/$name.json" 2>&1 | grep -v Warning | tail -22; }
anchor() { echo "== anchor $1"; timeout 500 python3 benchmarks/anchor_hf.py --model "$1" --num-prompts ${NP:-256} \
  --orbitllm-json "$OUT/$2.json" --output-json "$OUT/anchor_$2.json" 2>&1 | grep -v Warning | tail -8; }
case "$MODE" in
  tests)
    timeout 300 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_gpu_engine.py 2>&1 | tail -15
    python3 benchmarks/profile_step.py --steps 100 2>&1 | head -30
    run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run q06_single $B --model qwen3-0.6b --num-prompts 1 --input-len 512 --output-len 256 ;;
  A)
    run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run q06_single $B --model qwen3-0.6b --num-prompts 1 --input-len 512 --output-len 256
    anchor qwen3-0.6b q06_throughput
    run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256}
    run l8_single $B --model llama3.1-8b --num-prompts 1 --input-len 512 --output-len 256
    run l8_prefill8k python3 -m orbitllm bench throughput --random-weights --max-model-len 8192 \
      --model llama3.1-8b --num-prompts 1 --input-len 8000 --output-len 1 ;;
  B)
    run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256}
    anchor llama3.1-8b l8_throughput ;;
esac
