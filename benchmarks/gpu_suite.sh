#!/usr/bin/env bash
# Device calls for issue 3's figures, each under the 10-minute limit (results under $OUT):
#   tests   GPU tests + a step profile + the Qwen3-0.6B figures
#   A       Qwen3-0.6B: orbitllm and the transformers anchor on the same workload;
#           Llama-3.1-8B: orbitllm throughput, single request, 8k prefill
#   B       Llama-3.1-8B: the transformers anchor (with orbitllm again in the same run)
#   check   Qwen3-0.6B figures, 8B single request, step profile, GPU tests, 0.6B anchor
#   C       from an empty Triton cache: Qwen3-0.6B twice, 8B throughput, 8k prefill,
#           single requests, 8B anchor
#   D       from an empty Triton cache: Qwen3-0.6B and 8B throughput, 0.6B again, GPU tests
#   tp2     (two GPUs) GPU TP tests; 8B single request N=1, N=2 (NCCL), N=2 (peer all-reduce);
#           70B throughput N=2 with the peer all-reduce
#   tp3     (two GPUs) peer-reduce kernel + GPU TP tests; 8B single request N=1, N=2 (NCCL),
#           N=2 (--tp-all-reduce peer: fused peer-memory all-reduce + add + RMSNorm);
#           kernel profile of the N=2 peer decode step
#   gemv    (two GPUs) GEMV sweep; new-kernel + GPU engine tests (TP with faulthandler);
#           8B single request N=1 and N=2 peer, each with the Triton GEMV and with cuBLAS
#   final   (two GPUs) GEMV GPU tests and the qwen3 TP test; 8B single request N=1, N=2 (NCCL),
#           N=2 (default all-reduce: auto = peer here); kernel profile of the N=2 peer decode step
#   peer    (two GPUs) all-reduce + add + RMSNorm microbenchmark (NCCL, the fused peer
#           kernel); GPU TP tests (the peer engine twice in one process); 8B single request
#           N=1, N=2 (NCCL), N=2 (default: auto = peer here)
#   ab      (two GPUs) GEMV / argmax kernel tests and argmax timing; 8B single request N=1
#           and N=2, a step profile, GPU engine tests (llama); then the same 8B runs with
#           ab_revert.patch (untracked: the change under test) reverted: an A/B in one call
#   tp70ab  (two GPUs) Llama-3.1-70B throughput N=2, NCCL then the default (auto = peer)
#   pdl     (two GPUs) kernel tests; PDL on/off on a stand-in step (benchmarks/pdl_bench.py);
#           step profiles (host launch / wait, kernels) of the 8B single request at N=2
#           with and without PDL and at N=1; GPU TP test (llama)
#   preload (two GPUs) GEMV tests; benchmarks/pdl_bench.py; 8B single request N=1 and N=2
#           (also the fused SiLU GEMV: pdl_bench's variants)
#   verify  every GPU test (kernels, engine, tensor parallel, PDL on = off)
#   packets (two GPUs) kernel tests, GPU TP + PDL tests, 8B single request N=1 and N=2
#   all     (two GPUs) 8B single request N=1 and N=2; LM-head shapes by cuBLAS and by the GEMV;
#           every GPU test
#   parts   (two GPUs) 8B single request N=1 and N=2; the decode graph's parts at N=1 and N=2
#           (benchmarks/step_parts.py); step profiles with the kernels outside the graph
#   rope    (two GPUs) ORBITLLM_ROPE_GEMV (rotation + KV write in the QKV GEMV's epilogue):
#           kernel and engine tests, the QKV microbenchmark, 8B single request N=1 and N=2
#           with it off and on (an A/B in one call), the decode graph's parts at N=2
#   path    (two GPUs) step profiles with each kernel's share of the critical path, N=1 and N=2,
#           ORBITLLM_ROPE_GEMV off and on
#   tp      (two GPUs) Llama-3.1-8B single request N=1 / N=2, 8B throughput N=1,
#           Llama-3.1-70B throughput N=2
set -uo pipefail
MODE=${1:-tests}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/matmul_peak.py 2>&1 | tee -a "$OUT/gpu.txt"
B="python3 -m orbitllm bench throughput --random-weights --max-model-len 2048"
run() { local name=$1; shift; echo "== $name: $*"; timeout ${T:-400} "$@" --output-json "$OUT/$name.json" 2>&1 | grep -v Warning | tail -22; }
anchor() { echo "== anchor $1"; timeout 500 python3 benchmarks/anchor_hf.py --model "$1" --num-prompts ${NP:-256} \
  --orbitllm-json "$OUT/$2.json" --output-json "$OUT/anchor_$2.json" 2>&1 | grep -v Warning | tail -8; }
S8="$B --model llama3.1-8b --num-prompts 1 --input-len 512 --output-len 256"
case "$MODE" in
  check)
    run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run q06_single $B --model qwen3-0.6b --num-prompts 1 --input-len 512 --output-len 256
    run l8_single $S8
    timeout 100 python3 benchmarks/profile_step.py --steps 100 2>&1 | head -30
    timeout 150 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_gpu_engine.py 2>&1 | tail -8
    anchor qwen3-0.6b q06_throughput ;;
  C)
    rm -rf ~/.triton/cache
    run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run q06_throughput_warm $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256}
    run l8_prefill8k python3 -m orbitllm bench throughput --random-weights --max-model-len 8192 \
      --model llama3.1-8b --num-prompts 1 --input-len 8000 --output-len 1
    run q06_single $B --model qwen3-0.6b --num-prompts 1 --input-len 512 --output-len 256
    run l8_single $S8
    anchor llama3.1-8b l8_throughput ;;
  D)
    rm -rf ~/.triton/cache
    run q06_throughput $B --model qwen3-0.6b --num-prompts ${NP:-256}
    run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256}
    run q06_throughput_warm $B --model qwen3-0.6b --num-prompts ${NP:-256}
    timeout 200 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_kernels.py 2>&1 | tail -4 ;;
  ab)   # ab_revert.patch (untracked): the change under test, reverted for the B runs
    timeout 90 python3 -m pytest -q -x tests/test_kernels.py -k "gemv or argmax" 2>&1 | tail -2
    python3 -c "
import torch, triton.testing as tt
from orbitllm.kernels.fused_ops import argmax
x = torch.randn(1, 128256, device='cuda')
print('argmax 1x128256: torch %.1f us, triton %.1f us' % tuple(
    1e3 * tt.do_bench_cudagraph(f) for f in (lambda: x.argmax(-1), lambda: argmax(x))))"
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2
    timeout 100 python3 benchmarks/profile_tp.py --tp 2 --tp-all-reduce peer 2>&1 \
      | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | head -24
    timeout 150 python3 -m pytest -q -x tests/test_gpu_engine.py -k "llama" --durations=3 \
      -o faulthandler_timeout=140 2>&1 | grep -v "_pytest\|pluggy" | tail -6
    (git apply -R ab_revert.patch || patch -R -p1 < ab_revert.patch) && echo "== reverted"
    T=80 run l8_single_before $S8
    T=100 run l8_single_tp2_before $S8 --tensor-parallel-size 2 ;;
  pdl)
    timeout 120 python3 -m pytest -q -x tests/test_kernels.py -k "rms or peer or gemv or argmax or decode or rotary or silu" 2>&1 | tail -3
    timeout 100 python3 benchmarks/pdl_bench.py 2>&1 | grep -v Warning | tee "$OUT/pdl_bench.txt"
    P="python3 benchmarks/profile_tp.py --tp-all-reduce peer --rows 14"
    timeout 100 $P --tp 2 2>&1 | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | tee "$OUT/prof_tp2.txt" | head -22
    ORBITLLM_PDL=0 timeout 100 $P --tp 2 2>&1 | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | tee "$OUT/prof_tp2_nopdl.txt" | head -22
    timeout 80 $P --tp 1 2>&1 | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | tee "$OUT/prof_tp1.txt" | head -22
    timeout 150 python3 -m pytest -q -x tests/test_gpu_engine.py -k "tensor_parallel and llama" --durations=2 \
      -o faulthandler_timeout=140 2>&1 | grep -v "_pytest\|pluggy" | tail -6 ;;
  preload)
    timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k "gemv" 2>&1 | tail -2
    timeout 100 python3 benchmarks/pdl_bench.py 2>&1 | grep -v Warning | tee "$OUT/pdl_bench.txt"
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2 ;;
  verify)
    timeout 420 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_gpu_engine.py --durations=6 \
      -o faulthandler_timeout=400 2>&1 | grep -v "_pytest\|pluggy" | tail -16 ;;
  packets)
    timeout 90 python3 -m pytest -q -x tests/test_kernels.py -k "gemv or peer or packet or rms" 2>&1 | tail -2
    timeout 240 python3 -m pytest -q -x tests/test_gpu_engine.py -k "tensor_parallel or programmatic" --durations=3 \
      -o faulthandler_timeout=220 2>&1 | grep -v "_pytest\|pluggy" | tail -8
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2 ;;
  parts)
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2
    timeout 150 python3 benchmarks/step_parts.py 2>&1 | grep -v Warning | tee "$OUT/step_parts_tp1.txt"
    timeout 200 python3 benchmarks/step_parts.py --tp 2 2>&1 | grep -v Warning | tee "$OUT/step_parts_tp2.txt"
    for n in 1 2; do timeout 120 python3 benchmarks/profile_tp.py --tp $n --tp-all-reduce auto --rows 45 2>&1 \
      | grep -v Warning | tee "$OUT/profile_tp$n.txt" | cut -c1-150 | head -60; done ;;
  rope)
    timeout 120 python3 -m pytest -q -x tests/test_kernels.py -k "rope_epilogue or gemv" 2>&1 | tail -2
    timeout 150 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py -k "rope_and_kv_write" 2>&1 | tail -2
    timeout 60 python3 benchmarks/rope_gemv_bench.py 2>&1 | grep -v Warn
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2
    ORBITLLM_ROPE_GEMV=1 T=80 run l8_single_rope $S8
    ORBITLLM_ROPE_GEMV=1 T=100 run l8_single_tp2_rope $S8 --tensor-parallel-size 2
    timeout 150 python3 benchmarks/step_parts.py --tp 2 2>&1 | grep -v "Warning\|warn\|return func" \
      | tee "$OUT/step_parts_tp2.txt" ;;
  path)
    for r in 0 1; do for n in 1 2; do ORBITLLM_ROPE_GEMV=$r timeout 120 python3 benchmarks/profile_tp.py --tp $n \
      --tp-all-reduce auto --rows 40 2>&1 | grep -v "Warning\|warn\|return func" | tee "$OUT/path_tp${n}_rope$r.txt" \
      | cut -c1-150 | head -48; done; done ;;
  all)
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2
    python3 -c "
import torch, torch.nn.functional as F, triton.testing as tt
from orbitllm.kernels.gemv import gemv
for n in (64128, 128256):
    x = torch.randn(1, 4096, device='cuda', dtype=torch.bfloat16)
    w = torch.randn(n, 4096, device='cuda', dtype=torch.bfloat16)
    print('LM head %d x 4096: cuBLAS %.1f us, GEMV %.1f us' % ((n,) + tuple(
        1e3 * tt.do_bench_cudagraph(f) for f in (lambda: F.linear(x, w), lambda: gemv(x, w)))))"
    timeout 400 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_gpu_engine.py --durations=4 \
      -o faulthandler_timeout=380 2>&1 | grep -v "_pytest\|pluggy" | tail -10 ;;
  tp70)
    T=300 run l70_throughput_tp2 $B --model llama3.1-70b --num-prompts ${NP:-256} --tensor-parallel-size 2 ;;
  tp70ab)
    T=250 run l70_throughput_tp2_nccl $B --model llama3.1-70b --num-prompts ${NP:-256} --tensor-parallel-size 2 --tp-all-reduce nccl
    T=250 run l70_throughput_tp2_auto $B --model llama3.1-70b --num-prompts ${NP:-256} --tensor-parallel-size 2 ;;
  tp2)
    timeout 200 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py -k tensor_parallel 2>&1 | tail -4
    T=80 run l8_single $S8
    T=120 run l8_single_tp2 $S8 --tensor-parallel-size 2
    T=120 run l8_single_tp2_peer $S8 --tensor-parallel-size 2 --tp-all-reduce peer
    T=200 run l70_throughput_tp2_peer $B --model llama3.1-70b --num-prompts ${NP:-256} \
      --tensor-parallel-size 2 --tp-all-reduce peer ;;
  tp3)
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2
    T=100 run l8_single_tp2_peer $S8 --tensor-parallel-size 2 --tp-all-reduce peer
    timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k peer_reduce > "$OUT/tests.txt" 2>&1
    timeout 200 python3 -m pytest -q -x tests/test_gpu_engine.py -k tensor_parallel --durations=3 \
      -o faulthandler_timeout=170 >> "$OUT/tests.txt" 2>&1
    grep -v "_pytest\|pluggy" "$OUT/tests.txt" | tail -40
    timeout 120 python3 benchmarks/profile_tp.py --tp 2 --tp-all-reduce peer 2>&1 \
      | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | head -36 ;;
  gemv)
    timeout 150 python3 benchmarks/gemv_bench.py 2>&1 | grep -v Warning | tee "$OUT/gemv.txt"
    timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k "gemv or rotary" > "$OUT/tests.txt" 2>&1
    timeout 170 python3 -m pytest -q -x tests/test_gpu_engine.py --durations=4 \
      -o faulthandler_timeout=140 >> "$OUT/tests.txt" 2>&1
    grep -v "_pytest\|pluggy" "$OUT/tests.txt" | tail -30
    T=80 run l8_single $S8
    ORBITLLM_GEMV=cublas T=80 run l8_single_cublas $S8
    T=100 run l8_single_tp2_peer $S8 --tensor-parallel-size 2 --tp-all-reduce peer
    ORBITLLM_GEMV=cublas T=100 run l8_single_tp2_peer_cublas $S8 --tensor-parallel-size 2 --tp-all-reduce peer ;;
  final)
    timeout 40 python3 -m pytest -q -x tests/test_kernels.py -k gemv > "$OUT/tests.txt" 2>&1
    timeout 150 python3 -m pytest -q -x tests/test_gpu_engine.py -k "tensor_parallel and qwen3" \
      --durations=2 -o faulthandler_timeout=120 >> "$OUT/tests.txt" 2>&1
    grep -v "_pytest\|pluggy" "$OUT/tests.txt" | tail -20
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2 --tp-all-reduce nccl
    T=100 run l8_single_tp2_auto $S8 --tensor-parallel-size 2
    timeout 100 python3 benchmarks/profile_tp.py --tp 2 --tp-all-reduce peer 2>&1 \
      | grep -v "Warning\|warn\|USDT" | cut -c1-72,170-215 | head -30 ;;
  peer)
    timeout 60 python3 -m pytest -q -x tests/test_kernels.py -k peer 2>&1 | tail -2
    timeout 100 python3 benchmarks/peer_reduce_bench.py --rows 1 2 4 8 16 2>&1 | grep -v Warning | tee "$OUT/peer_reduce.txt"
    timeout 240 python3 -m pytest -q -x tests/test_gpu_engine.py -k tensor_parallel --durations=2 \
      -o faulthandler_timeout=220 2>&1 | grep -v "_pytest\|pluggy" | tail -14
    T=80 run l8_single $S8
    T=100 run l8_single_tp2 $S8 --tensor-parallel-size 2 --tp-all-reduce nccl
    T=100 run l8_single_tp2_auto $S8 --tensor-parallel-size 2 ;;
  tp)
    nvidia-smi topo -m
    T=80 run l8_single $S8
    T=120 run l8_single_tp2 $S8 --tensor-parallel-size 2
    [ -f "$OUT/l8_single_tp2.json" ] || T=90 run l8_single_tp2_eager $S8 --tensor-parallel-size 2 --enforce-eager
    T=200 run l70_throughput_tp2 $B --model llama3.1-70b --num-prompts ${NP:-256} --tensor-parallel-size 2
    T=80 run l8_throughput $B --model llama3.1-8b --num-prompts ${NP:-256} ;;
esac
