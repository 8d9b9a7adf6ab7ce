"""Build what an engine needs from its config: device, dtype, model, KV pool, runner."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from orbitllm.config import EngineConfig
from orbitllm.executor.model_runner import ModelRunner
from orbitllm.kv.kv_manager import KVCacheManager
from orbitllm.layers.attention import get_attention_backend
from orbitllm.layers.tensor_parallel import PeerAllReduce, Shard
from orbitllm.models.interface import CausalLM
from orbitllm.layers.quantization import cast_model, check_fp8_device, quantization_config, quantize_model
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.loader import Checkpoint, build_model, open_checkpoint, open_shape
from orbitllm.models.weights import hf_module_names
from orbitllm.spec.draft_model import DraftModelProposer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineParts:
    tokenizer: object
    runner: ModelRunner
    kv: KVCacheManager
    max_num_batched_tokens: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for, but no CUDA device is available")
    return device


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on GPU; float32 on CPU, where half types are slow."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype, torch.bfloat16)
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype: unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[name]


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: the model's dtype; ``fp8`` / ``fp8_e4m3``: E4M3, half the bytes of a
    16-bit cache, divided by the checkpoint's KV scales where it has them, else with
    scale 1.0 (see README, "FP8"). A checkpoint's scales do not switch the cache to FP8
    by themselves (as in vLLM, ``auto`` keeps a 16-bit cache and ignores them)."""
    if name == "auto":
        return dtype
    check_fp8_device(device, "kv_cache_dtype")
    return torch.float8_e4m3fn


def instantiate(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                shard: Shard = Shard(), qconfig=None) -> CausalLM:
    """Allocate the model (this rank's shard) on its device without initializing weights
    (they are loaded next); ``qconfig`` (``quantization_config``) swaps its projections'
    methods first, so quantized layers are allocated in FP8 from the start."""
    with torch.device("meta"):
        model = build_model(ckpt, shard)
        if qconfig is not None:
            quantize_model(model, qconfig, hf_module_names)
    # Cast on the meta device first: allocating in float32 and casting after would
    # take twice the weights' memory at once (a 70B shard would not fit). FP8 weights
    # and their float32 scales keep their dtype.
    model = cast_model(model, dtype).to_empty(device=device)
    model.build_caches(device)
    return model.eval()


def eos_ids(ckpt: Checkpoint, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(ckpt, "generation_config", None)
    for src in (gen, ckpt.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if value is not None:
            ids |= set(value) if isinstance(value, (list, tuple)) else {value}
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def open_model(cfg: EngineConfig) -> Checkpoint:
    if cfg.load_format == "dummy":
        if cfg.model is None:
            raise ValueError("model: load_format='dummy' needs a model shape, config.json or folder")
        return open_shape(cfg.model, cfg.tokenizer)
    return open_checkpoint(cfg.model, cfg.tokenizer)


# The fused peer-memory all-reduce pulls the peers' rows with loads over NVLink: it beats
# NCCL + RMSNorm at a few rows and loses at hundreds (docs/perf-log.md). Larger steps go
# through NCCL.
PEER_REDUCE_MAX_ROWS = 16


def resolve_tp_all_reduce(cfg: EngineConfig, device: torch.device) -> str:
    """``auto``: the fused peer-memory path when every rank is on this host and each
    pair of the ranks' GPUs can map each other's memory (NVLink or P2P), else NCCL.
    Every rank computes the same answer from the same facts."""
    size = cfg.tensor_parallel_size
    if cfg.tp_all_reduce == "peer" and size > 1 and device.type != "cuda":
        raise ValueError("tp_all_reduce: peer needs CUDA devices; use nccl (gloo on CPU)")
    if cfg.tp_all_reduce != "auto":
        return cfg.tp_all_reduce
    if size == 1 or device.type != "cuda":
        return "nccl"
    if int(os.environ.get("LOCAL_WORLD_SIZE", size)) < size:   # torchrun over several hosts
        return "nccl"
    first = device.index or 0
    gpus = range(first, first + size)
    if gpus.stop > torch.cuda.device_count():
        return "nccl"   # start-up reports the missing GPUs
    peers = all(torch.cuda.can_device_access_peer(a, b) for a in gpus for b in gpus if a != b)
    return "peer" if peers else "nccl"


def build_engine_parts(cfg: EngineConfig) -> EngineParts:
    device = resolve_device(cfg.device)
    cfg = replace(cfg, tp_all_reduce=resolve_tp_all_reduce(cfg, device))
    ckpt = open_model(cfg)
    launched = None   # (shard, local rank) when torchrun started this process
    if cfg.tensor_parallel_size > 1:
        from orbitllm.executor.tensor_parallel import start_driver, torchrun_shard
        launched = torchrun_shard(cfg)
    # A torchrun worker rank (rank > 0) turns into a worker inside start_driver: it
    # neither samples nor detokenizes, so it needs no tokenizer.
    tokenizer = None if launched is not None and launched[0].rank > 0 else ckpt.load_tokenizer()
    eos = eos_ids(ckpt, tokenizer)
    if cfg.tensor_parallel_size == 1:
        runner = build_rank_runner(cfg, Shard(), device, ckpt, eos)
    else:
        runner = start_driver(cfg, device, launched, lambda shard, rank_device, make: build_rank_runner(
            cfg, shard, rank_device, ckpt, eos, make))
    kv = KVCacheManager(runner.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
    log.info("model %s on %s (%s, %d rank(s)); %d KV blocks of %d tokens in %s; max_model_len %d",
             ckpt.source, runner.device, runner.dtype, cfg.tensor_parallel_size,
             runner.num_kv_blocks, cfg.block_size, runner.kv_cache.dtype, runner.max_model_len)
    return EngineParts(tokenizer, runner, kv, cfg.max_num_batched_tokens or 8192)


def build_rank_runner(cfg: EngineConfig, shard: Shard, device: torch.device,
                      ckpt: Checkpoint | None = None, eos_token_ids: set[int] = frozenset(),
                      make_runner: Callable[..., ModelRunner] = ModelRunner) -> ModelRunner:
    """One rank's model, KV cache and runner; every tensor-parallel rank runs this,
    and ranks agree on the number of KV blocks (the smallest any of them fits)."""
    ckpt = ckpt or open_model(cfg)
    dtype = resolve_dtype(cfg.dtype, ckpt.config, device)
    if cfg.tp_all_reduce == "peer" and shard.size > 1:
        # Steps of up to PEER_REDUCE_MAX_ROWS rows (small decode batches); larger ones use NCCL.
        shard = replace(shard, peer_reduce=PeerAllReduce(
            min(cfg.max_num_seqs, PEER_REDUCE_MAX_ROWS), ckpt.config.hidden_size, dtype, device))
    qconfig = quantization_config(cfg.quantization, ckpt.config)
    if qconfig is not None:
        check_fp8_device(device, "quantization")
    kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype, device)
    if getattr(qconfig, "kv_scales", False) and kv_dtype != torch.float8_e4m3fn and shard.rank == 0:
        log.warning("the checkpoint's KV scales (kv_cache_scheme) are ignored: they apply to "
                    "an FP8 KV cache only (kv_cache_dtype='fp8')")
    model = instantiate(ckpt, device, dtype, shard, qconfig)
    if cfg.load_format == "dummy":
        init_random_weights(model, cfg.seed)
    else:   # each layer's weight loaders take this rank's slices
        model.load_weights(ckpt.iter_weights(dtype), ckpt.source)
    spec = model.spec
    # A draft model lives on the driver alone (it runs unsharded, spec/draft_model.py);
    # loaded before the pool is sized, whose blocks hold its KV too.
    draft = None
    if shard.rank == 0 and cfg.speculative_config is not None and cfg.speculative_config.method == "draft_model":
        draft = load_draft_model(cfg, device, dtype, spec.vocab_size)
    bytes_per_block = ModelRunner.kv_bytes_per_block(model, cfg.block_size, kv_dtype)
    if draft is not None:
        bytes_per_block += ModelRunner.kv_bytes_per_block(draft, cfg.block_size, kv_dtype)
    num_blocks = cfg.num_kv_blocks or _auto_num_blocks(cfg, device, bytes_per_block)
    num_blocks = shard.min_over_ranks(num_blocks, device)
    capacity = num_blocks * cfg.block_size
    max_len = cfg.max_model_len or spec.max_position_embeddings
    if cfg.max_model_len is not None and cfg.max_model_len > capacity:
        raise ValueError(f"max_model_len: {cfg.max_model_len} tokens do not fit in the KV cache "
                         f"({num_blocks} blocks x {cfg.block_size} = {capacity} tokens)")
    if cfg.max_model_len is not None and cfg.max_model_len > spec.max_position_embeddings:
        raise ValueError(f"max_model_len: {cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({spec.max_position_embeddings})")
    max_len = min(max_len, capacity)
    proposer = None
    if draft is not None:
        backend = get_attention_backend(cfg.attention_backend, device)
        proposer = DraftModelProposer(
            draft, backend, device, num_blocks, cfg.block_size, kv_dtype, cfg.max_num_seqs, max_len,
            use_graphs=device.type == "cuda" and not cfg.enforce_eager
            and getattr(backend, "supports_cuda_graphs", False))
    return make_runner(model, device, dtype, num_blocks, cfg.block_size, cfg.seed,
                       cfg.attention_backend, set(eos_token_ids), cfg.max_num_seqs, max_len,
                       cfg.enforce_eager, kv_dtype, graph_query_lens=_graph_query_lens(cfg),
                       draft=proposer)


def load_draft_model(cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                     vocab_size: int) -> CausalLM:
    """``speculative_config.model``, loaded as the target is (a Hugging Face folder or a
    GGUF file; random weights of its shape with ``load_format='dummy'``, drawn with the
    target's seed: the target's shape as its own draft is then a benchmark at full
    acceptance), whole, in the target's dtype; its vocabulary must be the target's
    (drafts are target token ids)."""
    path = cfg.speculative_config.model
    try:
        ckpt = open_shape(path) if cfg.load_format == "dummy" else open_checkpoint(path)
    except ModelLoadError as e:
        raise ValueError(f"speculative_config.model: {e}") from None
    model = instantiate(ckpt, device, dtype, Shard(), quantization_config(cfg.quantization, ckpt.config))
    if model.spec.vocab_size != vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary has "
                         f"{model.spec.vocab_size} tokens, the model's {vocab_size}")
    if cfg.load_format == "dummy":
        init_random_weights(model, cfg.seed)
    else:
        model.load_weights(ckpt.iter_weights(dtype), ckpt.source)
    return model


def _graph_query_lens(cfg: EngineConfig) -> tuple[int, ...]:
    """Decode graphs for one query row, and with speculation for verify steps of every
    draft length 1..k (the adaptive length varies; a single request's step is always
    uniform, so it never runs eagerly)."""
    spec = cfg.speculative_config
    return (1,) if spec is None else tuple(range(1, spec.num_speculative_tokens + 2))


def _auto_num_blocks(cfg: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()   # blocks the allocator caches count as used
        free, total = torch.cuda.mem_get_info(device)
        # Leave room for activations: what is free after the weights, minus the
        # part of the card the user keeps for others, minus 1 GiB of headroom.
        budget = free - (1 - cfg.gpu_memory_utilization) * total - (1 << 30)
    else:
        budget = cfg.cpu_kv_cache_gib * (1 << 30)
    blocks = int(budget // bytes_per_block)
    if blocks < 1:
        raise ValueError("gpu_memory_utilization: no memory left for the KV cache; raise it or "
                         "set num_kv_blocks")
    return blocks


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Benchmark weights with the checkpoint's shapes (never presented as a real model)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.element_size() == 1:
            continue   # FP8: drawn by its layer's quant_method.init_random below
        if name.endswith(("norm.weight", "k_scale", "v_scale")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        init_random = getattr(getattr(module, "quant_method", None), "init_random", None)
        if init_random is not None:
            init_random(module, gen)
