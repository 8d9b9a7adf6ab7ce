"""Engine configuration as plain dataclasses; every field is also a CLI flag."""
from __future__ import annotations

from dataclasses import dataclass, fields

from orbitllm.spec.config import SpeculativeConfig


@dataclass
class EngineConfig:
    """Options of ``LLM(...)`` and of every CLI command (``--max-num-seqs`` etc.)."""

    model: str | None = None            # folder, hub id, .gguf file; None: the built-in default
    tokenizer: str | None = None
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str = "auto"     # auto | torch | triton
    enforce_eager: bool = False         # True: no CUDA graphs
    async_scheduling: bool = True       # overlap host scheduling with the device's step (GPU)
    cpu_kv_cache_gib: float = 2.0       # KV pool size on CPU when num_kv_blocks is not given
    load_format: str = "auto"           # auto | dummy: random weights with the checkpoint's shapes
    tensor_parallel_size: int = 1       # N > 1: the model split over N processes (GPUs)
    max_n: int = 128                    # most choices (n, best_of) one request may ask for
    scheduling_policy: str = "fcfs"     # fcfs | priority (requests' priority is honoured)
    quantization: str | None = None     # None | fp8 (weights quantized at load); FP8 checkpoints are detected
    kv_cache_dtype: str = "auto"        # auto (the model's dtype) | fp8 | fp8_e4m3: E4M3 KV cache, twice the tokens
    # {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...} as a dict or its
    # JSON; parsed into a SpeculativeConfig here (orbitllm/spec/config.py)
    speculative_config: str | dict | SpeculativeConfig | None = None
    tp_all_reduce: str = "auto"         # auto | nccl | peer (decode all-reduces fused with add + RMSNorm, read from peer GPUs); auto: peer on one host of peer-connected GPUs

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tp_all_reduce not in ("auto", "nccl", "peer"):
            raise ValueError(f"tp_all_reduce must be auto, nccl or peer, got {self.tp_all_reduce!r}")
        if self.quantization is not None and self.quantization != "fp8":
            raise ValueError(f"quantization: unknown method {self.quantization!r} (fp8)")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {self.kv_cache_dtype!r}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
