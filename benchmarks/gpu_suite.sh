#!/usr/bin/env bash
# One device call: GPU tests, then the issue-3 figures with the anchor in the same run.
# Usage: bash benchmarks/gpu_suite.sh [quick|full]   (results under $OUT)
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/matmul_peak.py 2>&1 | tee -a "$OUT/gpu.txt"
if [ "$MODE" != bench ]; then
  timeout 300 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_gpu_engine.py 2>&1 | tail -15
fi
B="python3 -m orbitllm bench throughput --random-weights --max-model-len 2048"
run() { local name=$1; shift; echo "== $name: $*"; timeout 400 "$@" --output-json "$OUT/$name.json" 2>&1 | grep -v Warning | tail -25; }
python3 benchmarks/profile_step.py --steps 100 2>&1 | head -45
run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
run q06_single $B --model qwen3-0.6b --num-prompts 1 --input-len 512 --output-len 256
if [ "$MODE" = full ]; then
  run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256}
  run l8_single $B --model llama3.1-8b --num-prompts 1 --input-len 512 --output-len 256
  run l8_prefill8k python3 -m orbitllm bench throughput --random-weights --max-model-len 8192 --model llama3.1-8b --num-prompts 1 --input-len 8000 --output-len 1
  timeout 400 python3 benchmarks/anchor_hf.py --model qwen3-0.6b --num-prompts ${NP:-256} --orbitllm-json "$OUT/q06_throughput.json" --output-json "$OUT/anchor_q06.json" 2>&1 | tail -8
  timeout 400 python3 benchmarks/anchor_hf.py --model llama3.1-8b --num-prompts ${NP:-256} --orbitllm-json "$OUT/l8_throughput.json" --output-json "$OUT/anchor_l8.json" 2>&1 | tail -8
fi
