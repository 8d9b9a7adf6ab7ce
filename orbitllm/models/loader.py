"""Find a checkpoint and turn it into (config, weight iterator, tokenizer).

Sources: a Hugging Face folder (config.json + *.safetensors + tokenizer files),
a hub id (through huggingface_hub, when a network exists), a .gguf file or a
folder holding one, and None for the built-in default model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from orbitllm.layers.quantization import keeps_stored_dtype
from orbitllm.layers.tensor_parallel import Shard
from orbitllm.layers.weight_loading import CheckpointTensor, LazyTensor
from orbitllm.models import registry
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.interface import CausalLM


@dataclass
class Checkpoint:
    """A located model: its config, a lazy weight stream and a tokenizer loader. The
    stream's tensors may be ``LazyTensor``s (safetensors): a tensor-parallel rank's
    weight loaders then read only its slices from disk."""

    source: str
    config: object                                            # transformers PretrainedConfig
    iter_weights: Callable[[torch.dtype], Iterator[tuple[str, CheckpointTensor]]]
    load_tokenizer: Callable[[], object]


# Shapes that need no checkpoint, for benchmarks with random weights (load_format="dummy").
_LLAMA31_COMMON = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_id=128001)
BUILTIN_SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, torch_dtype="bfloat16", eos_token_id=151645),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, **_LLAMA31_COMMON),
    "llama3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, **_LLAMA31_COMMON),
    # Llama 3.1's vocabulary: a draft model for the two above.
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, head_dim=64, **{
                            **_LLAMA31_COMMON, "tie_word_embeddings": True, "rope_scaling": {
                                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
}


def open_shape(model: str, tokenizer: str | None = None) -> Checkpoint:
    """A config without weights: a built-in shape name, a config.json, or any checkpoint
    whose config is readable. Tokenizer only if one is given or lies beside the config."""
    from transformers import AutoConfig, CONFIG_MAPPING
    if model in BUILTIN_SHAPES:
        spec = dict(BUILTIN_SHAPES[model])
        config = CONFIG_MAPPING[spec.pop("model_type")](**spec)
        source, tok_path = f"shape {model}", tokenizer
    elif model.endswith(".json"):
        config = AutoConfig.from_pretrained(str(Path(model).parent))
        source, tok_path = model, tokenizer
    else:
        ckpt = open_checkpoint(model, tokenizer)
        return Checkpoint(ckpt.source, ckpt.config, _no_weights, ckpt.load_tokenizer)
    _check_architecture(config, source)
    return Checkpoint(source, config, _no_weights,
                      (lambda: _hf_tokenizer(tok_path)) if tok_path else (lambda: None))


def _no_weights(dtype):
    raise ModelLoadError("random-weight models have no checkpoint to read")


def open_checkpoint(model: str | None, tokenizer: str | None = None) -> Checkpoint:
    if model is None:
        from orbitllm.models.default_model import find_default_model
        model = str(find_default_model())
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                  and list(path.glob("*.gguf"))):
        ckpt = _open_gguf(path)
    elif path.is_dir():
        ckpt = _open_hf_folder(path)
    elif path.exists() or not _HUB_ID.fullmatch(model):
        raise ModelLoadError(f"model: {model!r} is neither a Hugging Face model folder "
                             "(config.json + *.safetensors) nor a .gguf file")
    else:
        ckpt = _open_hf_folder(_download(model))
    if tokenizer is not None:
        ckpt.load_tokenizer = lambda: _hf_tokenizer(tokenizer)
    return ckpt


def _check_architecture(config, source: str) -> None:
    registry.architecture_of(config, source)


def build_model(ckpt: Checkpoint, shard: Shard = Shard()) -> CausalLM:
    """The registered class of the checkpoint's architecture, built from its config."""
    arch = registry.architecture_of(ckpt.config, ckpt.source)
    return registry.model_class(arch).from_config(ckpt.config, shard)


# "org/name" or "name" (the hub's repo ids); anything else is taken as a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What a safetensors checkpoint needs: weights, configs, tokenizer files; never other
# formats' weights (.bin, .pt, .gguf, ONNX), which can be many times the size.
_HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
              "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model",
              "chat_template*"]


def _download(repo_id: str) -> Path:
    """A hub id with no local folder of that name: its snapshot from the Hugging Face hub
    (or the hub's local cache), safetensors and tokenizer files only."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # no network, HF_HUB_OFFLINE, unknown or gated repo, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(
            f"model: {repo_id!r} is not a local path, and fetching it from the Hugging Face hub "
            f"failed ({type(e).__name__}{': ' + reason[:200] if reason else ''}); pass a local "
            "model folder (config.json + *.safetensors) or a .gguf file instead") from None


def _hf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _open_hf_folder(path: Path) -> Checkpoint:
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}/config.json: cannot read config ({e})") from None
    _check_architecture(config, str(path))
    shards = _safetensors_shards(path)
    return Checkpoint(str(path), config, lambda dtype: _iter_safetensors(shards, dtype),
                      lambda: _hf_tokenizer(path))


def _safetensors_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise ModelLoadError(f"{path}: missing checkpoint shard(s) {missing} listed in {index.name}")
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    return shards


# safetensors' dtype names of the tensors a checkpoint may hold.
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _iter_safetensors(shards: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, LazyTensor]]:
    """One tensor at a time (memory-mapped), so the file is never held twice; each is
    read when its weight loader asks, and only as far as it asks (a rank's slice).
    FP8 weights and their scales are read as stored, the rest in ``dtype``."""
    from safetensors import safe_open
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                lazy = f.get_slice(name)
                stored = _ST_DTYPES.get(lazy.get_dtype())
                load_dtype = stored if stored is not None and keeps_stored_dtype(name, stored) else dtype
                yield name, LazyTensor(
                    tuple(lazy.get_shape()),
                    lambda name=name, d=load_dtype: f.get_tensor(name).to(d),
                    lambda index, lazy=lazy, d=load_dtype: lazy[index].to(d), load_dtype)


def _open_gguf(path: Path) -> Checkpoint:
    from orbitllm.models.gguf import GGUFCheckpoint
    g = GGUFCheckpoint(path)
    _check_architecture(g.config, str(g.path))
    return Checkpoint(str(g.path), g.config, g.iter_weights, g.load_tokenizer)
