"""Where a single request's decode time goes, step by step (peer_bench's `single`).

Runs peer_bench's single-request workload (512-token prompt, 256 new tokens,
temperature 0.6) a few times and records, per engine step: its wall time, the part
spent waiting in ``ModelRunner.finish`` (the one device sync), and garbage-collector
pauses. Works on any tree with ``LLM.engine.step`` and ``engine.runner.finish``
(``ORBITLLM_SRC=dir PYTHONPATH=dir``); ``AFTER_NANO=1`` first runs the nano
workload in the same process, as peer_bench does. Prints medians and percentiles of the step, host
and wait times, for the first steps after the prefill and the steady part.
"""
import gc, json, os, random, statistics, sys, time

sys.path.insert(0, os.environ.get("ORBITLLM_SRC", "."))
from orbitllm import LLM, SamplingParams  # noqa: E402

MODEL, OUT = sys.argv[1], sys.argv[2]
llm = LLM(MODEL, load_format="dummy", dtype="bfloat16", max_model_len=4096,
          gpu_memory_utilization=0.90, seed=0, enable_prefix_caching=True)
eng = llm.engine
steps, waits, gcs = [], [], []
orig_step, orig_finish = eng.step, eng.runner.finish


def step():
    t = time.perf_counter(); out = orig_step(); steps.append(time.perf_counter() - t); return out


def finish(s):
    t = time.perf_counter(); r = orig_finish(s); waits.append(time.perf_counter() - t); return r


gc_t0 = [0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_t0[0] = time.perf_counter()
    else:
        gcs.append((info["generation"], time.perf_counter() - gc_t0[0]))


eng.step, eng.runner.finish = step, finish
gc.callbacks.append(on_gc)
rng = random.Random(3)
ids = [rng.randint(0, 10000) for _ in range(512)]
SP = lambda n: SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n)
llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], [SP(16)], use_tqdm=False)
llm.generate([{"prompt_token_ids": ids}], [SP(256)], use_tqdm=False)
if os.environ.get("AFTER_NANO"):   # peer_bench runs nano before single in the same process
    nrng = random.Random(0)
    prompts = [[nrng.randint(0, 10000) for _ in range(nrng.randint(100, 1024))] for _ in range(256)]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 [SP(nrng.randint(100, 1024)) for _ in prompts], use_tqdm=False)
runs = []
for _ in range(5):
    eng.reset_prefix_cache()
    steps.clear(); waits.clear(); gcs.clear()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], [SP(256)], use_tqdm=False)
    wall = time.perf_counter() - t
    st = [x * 1e3 for x in steps]; wt = [x * 1e3 for x in waits[:len(steps)]]
    host = [a - b for a, b in zip(st, wt)]
    q = lambda v, p: sorted(v)[int(p * (len(v) - 1))]
    runs.append({
        "wall_ms": wall * 1e3, "num_steps": len(st), "first5_ms": [round(x, 3) for x in st[:5]],
        "steady_step_med": statistics.median(st[5:]), "steady_step_p90": q(st[5:], 0.9),
        "steady_step_max": max(st[5:]), "host_med": statistics.median(host[5:]),
        "host_p90": q(host[5:], 0.9), "wait_med": statistics.median(wt[5:]),
        "gc": [(g, round(d * 1e3, 3)) for g, d in gcs],
        "slow_steps": [(i, round(x, 3)) for i, x in enumerate(st) if i >= 5 and x > 1.5 * statistics.median(st[5:])][:20]})
    print(json.dumps(runs[-1]))
json.dump(runs, open(OUT, "w"), indent=1)
os._exit(0)
