"""Tensor parallelism on CPU (gloo): greedy tokens with N ranks equal N=1 and
transformers for every family, seeded sampling and logprobs do not depend on N,
a dead worker fails the engine fast, and no worker process outlives its engine."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace

import psutil
import pytest
import torch

from conftest import FAMILIES, assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.config import EngineConfig
from orbitllm.executor.tensor_parallel import WorkerDiedError

MAX_NEW = 20
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def _prompts(vocab: int, lens=(3, 17, 33, 58)) -> list[dict]:
    rng = random.Random(7)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lens]


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _transformers_greedy(path: str, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = p["prompt_token_ids"]
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(ids):].tolist())
    return outs


def _vocab(path: str) -> int:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path).vocab_size


@pytest.fixture(autouse=True)
def no_worker_left_behind():
    yield
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("family,size", [(f, 2) for f in FAMILIES] + [("qwen3", 4)])
def test_greedy_matches_one_rank_and_transformers(tiny_models, family, size):
    """qwen3 has one KV head: with 4 ranks each rank keeps a replica of it."""
    path = tiny_models[family]
    prompts = _prompts(_vocab(path))
    with LLM(path, num_kv_blocks=64) as one:
        single = _tokens(one, prompts)
    with LLM(path, num_kv_blocks=64, tensor_parallel_size=size) as llm:
        assert llm.engine.runner.kv_cache.shape[-2] == max(1, llm.engine.runner.model.spec.num_kv_heads // size)
        assert _tokens(llm, prompts) == single == _transformers_greedy(path, prompts)
        assert_all_blocks_free(llm)
        assert _tokens(llm, prompts) == single   # again, from the prefix cache
        assert_all_blocks_free(llm)


def test_chunked_prefill_preemption_and_large_steps(tiny_models):
    """Chunks, preemption and a step bigger than the broadcast buffer (sent in two parts)."""
    path = tiny_models["llama"]
    vocab = _vocab(path)
    small = _prompts(vocab)
    large = _prompts(vocab, (700, 700, 700, 701))
    with LLM(path, num_kv_blocks=256, max_num_batched_tokens=4096) as one:
        expected_large = _tokens(one, large)
        expected_small = _tokens(one, small)
    with LLM(path, num_kv_blocks=256, max_num_batched_tokens=4096, tensor_parallel_size=2) as llm:
        assert _tokens(llm, large) == expected_large
        assert_all_blocks_free(llm)
    with LLM(path, num_kv_blocks=7, max_num_batched_tokens=20, tensor_parallel_size=2) as llm:
        assert _tokens(llm, small) == expected_small
        assert llm.engine.scheduler.num_preemptions > 0
        assert_all_blocks_free(llm)


def test_overlapped_scheduling_matches_one_rank(tiny_models):
    """Overlap (GPU-only, forced on here): step n+1 is launched before step n's tokens
    are read, so workers fill the pending tokens from the driver's broadcast of the
    sampled ids, through mixed prefill/decode steps, chunks and preemption."""
    path = tiny_models["llama"]
    prompts = _prompts(_vocab(path), (3, 17, 33, 58, 9, 41))
    with LLM(path, num_kv_blocks=64) as one:
        expected = _tokens(one, prompts)
    for blocks, budget, preempts in ((64, 64, False), (7, 20, True)):
        with LLM(path, num_kv_blocks=blocks, max_num_batched_tokens=budget,
                 tensor_parallel_size=2) as llm:
            llm.engine.overlap = True
            channel, pending = llm.engine.runner.channel, []
            send = channel.send
            channel.send = lambda inputs: (pending.append(inputs.pending_rows.size), send(inputs))
            assert _tokens(llm, prompts) == expected
            assert sum(pending) > 0   # rows whose input token was still on the device
            assert (llm.engine.scheduler.num_preemptions > 0) == preempts
            assert_all_blocks_free(llm)


def test_seeded_sampling_and_logprobs_do_not_depend_on_ranks(tiny_models):
    path = tiny_models["qwen2"]
    prompts = _prompts(_vocab(path))
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=11, logprobs=3,
                            prompt_logprobs=2, ignore_eos=True)
    outs = {}
    for size in (1, 2):
        with LLM(path, num_kv_blocks=64, tensor_parallel_size=size) as llm:
            outs[size] = llm.generate(prompts, params, use_tqdm=False)
            assert_all_blocks_free(llm)
    for a, b in zip(outs[1], outs[2]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert pa.keys() == pb.keys()
            assert [v.logprob for v in pa.values()] == pytest.approx(
                [v.logprob for v in pb.values()], abs=1e-4)


def test_a_dead_worker_fails_the_engine_fast(tiny_models):
    path = tiny_models["mistral"]
    params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    with LLM(path, num_kv_blocks=512, tensor_parallel_size=2) as llm:
        worker = llm.engine.runner.workers.procs[0]
        killed_at = []

        def kill():
            killed_at.append(time.monotonic())
            os.kill(worker.pid, signal.SIGKILL)

        threading.Timer(1.0, kill).start()
        with pytest.raises(WorkerDiedError, match="exited with code -9"):
            llm.generate(_prompts(_vocab(path)), params, use_tqdm=False)
        assert time.monotonic() - killed_at[0] < 5
        assert_all_blocks_free(llm)
        with pytest.raises(WorkerDiedError):   # and it stays failed
            llm.generate(_prompts(_vocab(path)), params, use_tqdm=False)


_SCRIPT = """
import sys
from orbitllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], num_kv_blocks=64, tensor_parallel_size=2)
    print(" ".join(str(p.pid) for p in llm.engine.runner.workers.procs), flush=True)
    params = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0.0, ignore_eos=True)
    out = llm.generate("The quick brown fox", params, use_tqdm=False)
    print(len(out[0].outputs[0].token_ids), flush=True)
"""


def _start(path: str, max_tokens: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SCRIPT), path, str(max_tokens)],
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids, "the engine did not start"
    return proc, pids


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_process_exits_by_itself_after_generate(tiny_models):
    proc, pids = _start(tiny_models["llama"], 4)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read().strip() == "4"
    assert _gone(pids, within=5)


def test_sigterm_leaves_no_worker(tiny_models):
    proc, pids = _start(tiny_models["llama"], 1000)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert _gone(pids, within=5)


TORCHRUN_SCRIPT = """
import json, sys
from orbitllm import LLM, SamplingParams
path, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
params = SamplingParams(max_tokens=%d, temperature=0.0, ignore_eos=True)
outs = llm.generate(prompts, params, use_tqdm=False)
with open(out, "w") as f:
    json.dump([o.outputs[0].token_ids for o in outs], f)
llm.shutdown()
""" % MAX_NEW


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_launch_matches_one_rank(tiny_models, tmp_path, nodes):
    """The same program under ``torchrun``: rank 0 drives, rank 1 becomes a worker inside
    LLM(...) and exits when the driver stops; tokens equal N=1. ``nodes=2`` launches as
    on two hosts (one torchrun agent per node, static rendezvous at node 0's address),
    here both on 127.0.0.1: the step broadcast then crosses "hosts" over TCP."""
    import json
    import socket
    path = tiny_models["llama"]
    prompts = _prompts(_vocab(path), lens=(5, 21, 40))
    script, out = tmp_path / "prog.py", tmp_path / "tokens.json"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    if nodes == 1:
        launches = [["--standalone", "--nproc-per-node", "2"]]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launches = [["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                     "--master-addr", "127.0.0.1", "--master-port", str(port)] for node in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, str(script), path,
                               str(out), json.dumps(prompts)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in launches]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    with LLM(path, device="cpu", dtype="float32", num_kv_blocks=64) as llm:
        assert json.loads(out.read_text()) == _tokens(llm, prompts)
        assert_all_blocks_free(llm)


def test_torchrun_world_size_must_match(monkeypatch):
    from orbitllm.executor.tensor_parallel import torchrun_shard
    cfg = EngineConfig(model="x", tensor_parallel_size=2)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_shard(cfg) is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        torchrun_shard(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard, local = torchrun_shard(cfg)
    assert (shard.rank, shard.size, local) == (1, 2, 1)


def test_peer_all_reduce_needs_cuda(tiny_models):
    with pytest.raises(ValueError, match="tp_all_reduce"):
        LLM(tiny_models["llama"], device="cpu", tensor_parallel_size=2, tp_all_reduce="peer")
    with pytest.raises(ValueError, match="tp_all_reduce"):
        LLM(tiny_models["llama"], device="cpu", tp_all_reduce="ring")


def test_tp_all_reduce_auto_picks_peer_memory_only_on_one_host_of_peer_gpus(monkeypatch):
    """auto: NCCL (gloo) on CPU and across hosts; peer when the ranks' GPUs all map
    each other's memory; explicit choices are kept."""
    import orbitllm.executor.setup as setup
    cuda = torch.device("cuda")
    cfg = EngineConfig(model="x", tensor_parallel_size=2)
    assert setup.resolve_tp_all_reduce(cfg, torch.device("cpu")) == "nccl"
    assert setup.resolve_tp_all_reduce(replace(cfg, tensor_parallel_size=1), cuda) == "nccl"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    links = {(0, 1): True, (1, 0): True}
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: links[(a, b)])
    assert setup.resolve_tp_all_reduce(cfg, cuda) == "peer"
    assert setup.resolve_tp_all_reduce(replace(cfg, tp_all_reduce="nccl"), cuda) == "nccl"
    assert setup.resolve_tp_all_reduce(replace(cfg, tensor_parallel_size=4), cuda) == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")   # torchrun, one rank per host
    assert setup.resolve_tp_all_reduce(cfg, cuda) == "nccl"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    links[(1, 0)] = False
    assert setup.resolve_tp_all_reduce(cfg, cuda) == "nccl"


class _ThreadAtExit:
    """A thread as Python >= 3.12 makes one during interpreter exit: it cannot start."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")


def test_teardown_never_hangs_on_a_peer_that_never_comes(monkeypatch):
    """NCCL's teardown can wait for the peers' teardown: when one never comes (killed),
    the communicators are aborted after the timeout instead of blocking forever; and at
    interpreter exit, where no thread starts, the teardown runs inline."""
    import torch.distributed as dist
    from orbitllm.executor import tensor_parallel as tp
    calls: list[str] = []
    never = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", never.wait)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    start = time.monotonic()
    tp.close_process_group(timeout=0.3)
    assert calls == ["abort"] and time.monotonic() - start < 5
    never.set()
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(tp.threading, "Thread", _ThreadAtExit)
    tp.close_process_group(timeout=0.3)
    assert calls == ["abort", "destroy"]
