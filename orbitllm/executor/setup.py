"""Build what an engine needs from its config: device, dtype, model, KV pool, runner."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from orbitllm.config import EngineConfig
from orbitllm.executor.model_runner import ModelRunner
from orbitllm.kv.kv_manager import KVCacheManager
from orbitllm.models.llama import LlamaForCausalLM
from orbitllm.models.loader import Checkpoint, build_model, open_checkpoint, open_shape

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineParts:
    tokenizer: object
    runner: ModelRunner
    kv: KVCacheManager
    max_model_len: int
    max_num_batched_tokens: int
    eos_token_ids: set[int]


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


def instantiate(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Allocate the model on its device without initializing weights (they are loaded next)."""
    with torch.device("meta"):
        model = build_model(ckpt)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build_cache(device)
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


def build_engine_parts(cfg: EngineConfig) -> EngineParts:
    device = resolve_device(cfg.device)
    random_weights = cfg.load_format == "dummy"
    if random_weights and cfg.model is None:
        raise ValueError("model: load_format='dummy' needs a model shape, config.json or folder")
    ckpt = open_shape(cfg.model, cfg.tokenizer) if random_weights else open_checkpoint(
        cfg.model, cfg.tokenizer)
    dtype = resolve_dtype(cfg.dtype, ckpt.config, device)
    tokenizer = ckpt.load_tokenizer()
    model = instantiate(ckpt, device, dtype)
    if random_weights:
        init_random_weights(model, cfg.seed)
    else:
        model.load_weights(ckpt.iter_weights(dtype), ckpt.source)
    spec = model.spec
    bytes_per_block = ModelRunner.kv_bytes_per_block(spec, cfg.block_size, dtype)
    num_blocks = cfg.num_kv_blocks or _auto_num_blocks(cfg, device, bytes_per_block)
    capacity = num_blocks * cfg.block_size
    max_len = cfg.max_model_len or spec.max_position_embeddings
    if cfg.max_model_len is not None and cfg.max_model_len > capacity:
        raise ValueError(f"max_model_len: {cfg.max_model_len} tokens do not fit in the KV cache "
                         f"({num_blocks} blocks x {cfg.block_size} = {capacity} tokens)")
    if cfg.max_model_len is not None and cfg.max_model_len > spec.max_position_embeddings:
        raise ValueError(f"max_model_len: {cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({spec.max_position_embeddings})")
    max_len = min(max_len, capacity)
    runner = ModelRunner(model, device, dtype, num_blocks, cfg.block_size, cfg.seed,
                         cfg.attention_backend, eos_ids(ckpt, tokenizer), cfg.max_num_seqs,
                         max_len, cfg.enforce_eager)
    kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    log.info("model %s on %s (%s); %d KV blocks of %d tokens; max_model_len %d",
             ckpt.source, device, dtype, num_blocks, cfg.block_size, max_len)
    return EngineParts(tokenizer, runner, kv, max_len, cfg.max_num_batched_tokens or 8192,
                       runner.eos_token_ids)


def _auto_num_blocks(cfg: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
    if device.type == "cuda":
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
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
