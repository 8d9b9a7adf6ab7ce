"""GGUF checkpoints (llama.cpp's file format) as a Hugging Face config, weight stream and tokenizer.

The engine loads models from a transformers config, an iterator of tensors named as in Hugging Face
checkpoints, and a transformers tokenizer. This module produces those three from one .gguf file.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view for every
token and merge string, which takes about 3 s for SmolLM2's 98k-entry vocabulary on a small CPU,
against a few hundredths of a second for a plain struct walk. The gguf package still provides the
quantization tables and the dequantization kernels.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from transformers import PretrainedConfig

from orbitllm.models import registry
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.weight_cache import CheckpointCache

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 counted with 32-bit integers and is long gone from the wild
DEFAULT_ALIGNMENT = 32

# Storage types this loader accepts: the ones gguf.quants dequantizes and the engine has been tested on.
SUPPORTED_TENSOR_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_DENSE_LAYER = frozenset(
    f"{part}.weight"
    for part in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
)
_QKV_BIAS = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias"})
# Llama 3.1's rope frequency factors: transformers' GGUF loader drops this tensor, and so do we.
_DROPPED_TENSORS = frozenset({"rope_freqs.weight"})


class LlamaGGUFConfig(PretrainedConfig):
    """The fields of transformers' LlamaConfig, without importing it.

    Importing transformers' model config classes pulls in its kernel hub and torch._dynamo: 3.5 s on the
    2-core CPU machine, more than loading the whole default model from the weight cache. The engine only
    reads fields, and tests/test_gguf.py checks they equal what transformers reads from the same file.
    """

    model_type = "llama"


class Qwen2GGUFConfig(PretrainedConfig):
    """The fields of transformers' Qwen2Config (see LlamaGGUFConfig for why not that class)."""

    model_type = "qwen2"


class Qwen3GGUFConfig(PretrainedConfig):
    """The fields of transformers' Qwen3Config (see LlamaGGUFConfig for why not that class)."""

    model_type = "qwen3"


@dataclass(frozen=True)
class _Architecture:
    """What one GGUF `general.architecture` means in transformers terms."""

    config_class: type[PretrainedConfig]
    model_class: str
    layer_tensors: frozenset[str]
    optional_layer_tensors: frozenset[str]
    rotary_permuted: bool  # llama.cpp's converter interleaves the Q/K rows of this architecture


ARCHITECTURES = {
    "llama": _Architecture(LlamaGGUFConfig, "LlamaForCausalLM", _DENSE_LAYER, _QKV_BIAS | {"attn_output.bias"}, True),
    "qwen2": _Architecture(Qwen2GGUFConfig, "Qwen2ForCausalLM", _DENSE_LAYER | _QKV_BIAS, frozenset(), False),
    "qwen3": _Architecture(
        Qwen3GGUFConfig,
        "Qwen3ForCausalLM",
        _DENSE_LAYER | {"attn_q_norm.weight", "attn_k_norm.weight"},
        frozenset(),
        False,
    ),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: its names, shape in torch order, storage type and byte range in the file."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    start: int
    nbytes: int


def resolve_gguf_file(path: str | os.PathLike) -> Path:
    """The .gguf file that `path` names: the file itself, or the only .gguf inside a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            problem = "holds no .gguf file" if not found else f"holds {len(found)} .gguf files; name one of them"
            raise ModelLoadError(problem, path)
        return found[0]
    if not path.is_file():
        raise ModelLoadError("no such file", path)
    return path


class GGUFCheckpoint:
    """A validated GGUF file: config, weights and tokenizer in Hugging Face form.

    Everything that could make loading fail halfway (header, architecture, tensor names, shapes, storage
    types, truncation) is checked when the checkpoint is opened, before any weight is produced.
    """

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.path = resolve_gguf_file(path)
        self._cache_dir = cache_dir
        self._mmap = _map_file(self.path)
        self.metadata, self.tensors = _parse(self.path, self._mmap)
        self.architecture = _architecture(self.path, self.metadata)
        _check_tensors(self.path, self.architecture, self.tensors, self._block_count())
        self.config = _build_config(self.path, self.architecture, self.metadata, self.tensors)
        _check_shapes(self.path, self.config, self.tensors)

    @property
    def weight_names(self) -> list[str]:
        """The Hugging Face names `iter_weights` yields, in file order."""
        return [info.hf_name for info in self._loaded_tensors()]

    def iter_weights(
        self, dtype: torch.dtype = torch.float32, use_cache: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` one at a time, dequantized to `dtype`.

        With `use_cache`, a previous run's dequantized weights are read back from the user's cache folder,
        or this run's are written there as they stream past (see weight_cache.py).
        """
        if not dtype.is_floating_point:
            raise ValueError(f"iter_weights: dtype must be a floating point type, got {dtype}")
        infos = self._loaded_tensors()
        if not use_cache:
            return self._dequantized(infos, dtype)
        cache = self._cache()
        cached = cache.read_weights(dtype, [info.hf_name for info in infos])
        if cached is not None:
            return cached
        layout = [(info.hf_name, info.shape) for info in infos]
        return cache.write_weights_through(dtype, layout, self._dequantized(infos, dtype))

    def load_tokenizer(self, use_cache: bool = True):
        """The tokenizer described by the file's tokenizer.* metadata, with its chat template.

        Built by transformers' GGUF tokenizer conversion, which takes seconds; with `use_cache` the result
        is saved in the cache folder and later runs load it from there.
        """
        from transformers import PreTrainedTokenizerFast

        cache = self._cache() if use_cache else None
        if cache is not None and (saved := cache.tokenizer_folder()) is not None:
            try:
                return PreTrainedTokenizerFast.from_pretrained(str(saved))
            except Exception as e:  # a damaged entry: rebuild it below
                logger.warning("ignoring unreadable tokenizer cache %s (%s)", saved, e)
                shutil.rmtree(saved, ignore_errors=True)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers raises several types for metadata it cannot convert
            problem = f"cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: {e})"
            raise ModelLoadError(problem, self.path) from e
        if tokenizer.chat_template is None and "tokenizer.chat_template" in self.metadata:
            tokenizer.chat_template = self.metadata["tokenizer.chat_template"]
        if cache is not None:
            cache.save_tokenizer(tokenizer)
        return tokenizer

    def _cache(self) -> CheckpointCache:
        return CheckpointCache(self.path, self._cache_dir)

    def _block_count(self) -> int:
        return _metadata_value(self.path, self.metadata, f"{self.architecture}.block_count", int)

    def _loaded_tensors(self) -> list[TensorInfo]:
        return [info for info in self.tensors if info.gguf_name not in _DROPPED_TENSORS]

    def _dequantized(self, infos: list[TensorInfo], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for info in infos:
            yield info.hf_name, self._dequantize(info).to(dtype)

    def _dequantize(self, info: TensorInfo) -> torch.Tensor:
        """One tensor in float32 and Hugging Face layout, as transformers' GGUF loader produces it."""
        raw = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.start)
        values = dequantize(raw.reshape(*info.shape[:-1], -1), info.ggml_type)
        tensor = torch.from_numpy(values if values.flags.writeable else values.copy())
        if ARCHITECTURES[self.architecture].rotary_permuted:
            if info.gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
                tensor = _unpermute_rotary(tensor, self.config.num_attention_heads)
            elif info.gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
                tensor = _unpermute_rotary(tensor, self.config.num_key_value_heads)
        return tensor


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    llama.cpp rotates adjacent pairs of each head's rows, Hugging Face rotates the two halves (rotate_half),
    so the converter interleaves the halves; this splits them again, exactly as transformers does.
    """
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


# --- header parsing ---------------------------------------------------------------------------------


def _map_file(path: Path) -> mmap.mmap:
    """Memory-map the file read-only, so tensors are paged in one at a time as they are dequantized."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise ModelLoadError("not a GGUF file (too short for a GGUF header)", path)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"cannot read the file ({e.strerror or e})", path) from e


class _Truncated(Exception):
    """The header claims more bytes than the file has."""


class _Cursor:
    """Reads little-endian GGUF values from a buffer, refusing to run past its end."""

    def __init__(self, buffer: mmap.mmap, position: int = 0) -> None:
        self.buffer = buffer
        self.position = position

    def take(self, size: int) -> int:
        """Claim `size` bytes and return where they start."""
        start = self.position
        if size < 0 or start + size > len(self.buffer):
            raise _Truncated
        self.position = start + size
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.scalar("<Q")
        start = self.take(size)
        return self.buffer[start : start + size].decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self.scalar(_SCALAR_FORMATS[value_type])

    def array(self) -> list:
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            start = self.take(count * dtype.itemsize)
            return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start).tolist()
        if item_type == _STRING:
            return self.strings(count)
        return [self.value(item_type) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: the vocabulary and merges, so this loop is kept tight."""
        buffer, position, end, out = self.buffer, self.position, len(self.buffer), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if position + 8 > end:
                raise _Truncated
            (size,) = unpack(buffer, position)
            position += 8
            out.append(buffer[position : position + size].decode("utf-8", errors="replace"))
            position += size
        self.take(position - self.position)
        return out


def _parse(path: Path, buffer: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor table of a GGUF file, with every tensor's bytes checked to lie inside it."""
    if buffer[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF file (magic bytes {bytes(buffer[:4])!r}, expected {GGUF_MAGIC!r})", path)
    cursor = _Cursor(buffer, 4)
    version, tensor_count, kv_count = cursor.scalar("<I"), cursor.scalar("<Q"), cursor.scalar("<Q")
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"unsupported GGUF version {version} (supported: {GGUF_VERSIONS})", path)
    try:
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        entries = [_tensor_entry(cursor) for _ in range(tensor_count)]
    except _Truncated:
        raise ModelLoadError("truncated or corrupted GGUF header (it runs past the end of the file)", path) from None
    except ValueError as e:
        raise ModelLoadError(f"corrupted GGUF header ({e})", path) from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ModelLoadError(f"corrupted GGUF header (general.alignment = {alignment!r})", path)
    data_start = -(-cursor.position // alignment) * alignment
    return metadata, [_tensor_info(path, len(buffer), data_start, *entry) for entry in entries]


def _tensor_entry(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """One raw tensor-table entry: name, ggml dimensions (innermost first), type id, data offset."""
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    if not 1 <= n_dims <= 4:
        raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
    dims = tuple(cursor.scalar("<Q") for _ in range(n_dims))
    return name, dims, cursor.scalar("<I"), cursor.scalar("<Q")


def _tensor_info(
    path: Path, file_size: int, data_start: int, name: str, dims: tuple[int, ...], type_id: int, offset: int
) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise ModelLoadError(f"tensor {name!r} has unknown storage type id {type_id} (corrupted file?)", path) from None
    if ggml_type not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        problem = f"tensor {name!r} is stored as {ggml_type.name}, which is not supported ({supported})"
        raise ModelLoadError(problem, path)
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block_size or min(dims) <= 0:
        raise ModelLoadError(f"tensor {name!r} has shape {dims} that does not fit {ggml_type.name} blocks", path)
    nbytes = int(np.prod(dims, dtype=np.int64)) // block_size * block_bytes
    start = data_start + offset
    if start + nbytes > file_size:
        raise ModelLoadError(
            f"truncated file: tensor {name!r} needs bytes up to {start + nbytes}, the file has {file_size}", path
        )
    return TensorInfo(name, _hf_name(name), tuple(reversed(dims)), ggml_type, start, nbytes)


def _hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor, or "" for a name this loader does not know."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return ""


# --- validation and config --------------------------------------------------------------------------


def _architecture(path: Path, metadata: dict[str, Any]) -> str:
    """The file's architecture, when this module can map it and the model registry runs its class."""
    architecture = metadata.get("general.architecture")
    supported = sorted(name for name, arch in ARCHITECTURES.items() if registry.is_supported(arch.model_class))
    if architecture not in supported:
        raise ModelLoadError(f"unsupported architecture {architecture!r} (supported: {', '.join(supported)})", path)
    return architecture


def _check_tensors(path: Path, architecture: str, tensors: list[TensorInfo], block_count: int) -> None:
    """Every tensor is one the model uses, and every tensor the model needs is there."""
    arch = ARCHITECTURES[architecture]
    known_layer = arch.layer_tensors | arch.optional_layer_tensors
    names = {info.gguf_name for info in tensors}
    for name in sorted(names):
        parts = name.split(".", 2)
        in_layer = (
            len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit()
            and int(parts[1]) < block_count and parts[2] in known_layer
        )
        if not (in_layer or name in _TOP_LEVEL_NAMES or (arch.rotary_permuted and name in _DROPPED_TENSORS)):
            raise ModelLoadError(f"unexpected tensor {name!r} for architecture {architecture!r}", path)
    required = {"token_embd.weight", "output_norm.weight"}
    required |= {f"blk.{i}.{part}" for i in range(block_count) for part in arch.layer_tensors}
    if missing := sorted(required - names):
        raise ModelLoadError(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}", path)
    if names & _DROPPED_TENSORS:
        logger.warning("%s: ignoring rope_freqs.weight (Llama 3.1 rope scaling), as transformers does", path)


def _metadata_value(path: Path, metadata: dict[str, Any], key: str, kind: type) -> Any:
    """A required scalar metadata value, so a missing or malformed key fails with its name."""
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"metadata key {key!r} is missing or not a number (got {value!r})", path)
    return kind(value)


def _build_config(
    path: Path, architecture: str, metadata: dict[str, Any], tensors: list[TensorInfo]
) -> PretrainedConfig:
    """The config a Hugging Face checkpoint of this model would carry, in transformers 5's field names."""

    def required(key: str, kind: type = int) -> Any:
        return _metadata_value(path, metadata, f"{architecture}.{key}", kind)

    def optional(key: str, default: int | float) -> Any:
        return required(key, type(default)) if f"{architecture}.{key}" in metadata else default

    by_name = {info.gguf_name: info for info in tensors}
    num_heads = required("attention.head_count")
    rope = {"rope_type": "default", "rope_theta": optional("rope.freq_base", 10000.0)}
    arch = ARCHITECTURES[architecture]
    return arch.config_class(
        architectures=[arch.model_class],
        vocab_size=by_name["token_embd.weight"].shape[0],
        hidden_size=required("embedding_length"),
        intermediate_size=required("feed_forward_length"),
        num_hidden_layers=required("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=optional("attention.head_count_kv", num_heads),
        head_dim=by_name["blk.0.attn_q.weight"].shape[0] // num_heads,
        hidden_act="silu",
        max_position_embeddings=required("context_length"),
        rms_norm_eps=required("attention.layer_norm_rms_epsilon", float),
        rope_parameters=rope | _rope_scaling(path, architecture, metadata),
        tie_word_embeddings="output.weight" not in by_name,
        attention_bias="blk.0.attn_q.bias" in by_name,
        mlp_bias=False,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        dtype=_natural_dtype(tensors),
    )


def _rope_scaling(path: Path, architecture: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's rope.scaling.* keys as transformers rope_parameters entries (none when unscaled)."""
    prefix = f"{architecture}.rope.scaling."
    legacy_factor = f"{architecture}.rope.scale_linear"
    kind = metadata.get(prefix + "type", "linear" if legacy_factor in metadata else "none")
    if kind == "none":
        return {}
    factor = float(metadata.get(prefix + "factor", metadata.get(legacy_factor, 1.0)))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = metadata.get(prefix + "original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: none, linear, yarn)", path)


def _natural_dtype(tensors: list[TensorInfo]) -> torch.dtype:
    """The precision the weight matrices were stored in: float16/bfloat16 when all are, float32 otherwise
    (every quantized type dequantizes exactly to float32)."""
    matrix_types = {info.ggml_type for info in tensors if len(info.shape) == 2}
    if matrix_types == {GGMLQuantizationType.F16}:
        return torch.float16
    if matrix_types == {GGMLQuantizationType.BF16}:
        return torch.bfloat16
    return torch.float32


def _check_shapes(path: Path, config, tensors: list[TensorInfo]) -> None:
    """Each tensor has the shape the config implies, so a bad file fails here rather than mid-load."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    expected = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "lm_head.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "q_proj.weight": (q_rows, hidden),
        "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden),
        "o_proj.weight": (hidden, q_rows),
        "q_proj.bias": (q_rows,),
        "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,),
        "o_proj.bias": (hidden,),
        "q_norm.weight": (head_dim,),
        "k_norm.weight": (head_dim,),
        "gate_proj.weight": (inter, hidden),
        "up_proj.weight": (inter, hidden),
        "down_proj.weight": (hidden, inter),
    }
    for info in tensors:
        if info.gguf_name in _DROPPED_TENSORS:
            continue
        key = info.hf_name if info.hf_name in expected else ".".join(info.hf_name.split(".")[-2:])
        if info.shape != expected[key]:
            raise ModelLoadError(
                f"tensor {info.gguf_name!r} has shape {info.shape}, the metadata implies {expected[key]}", path
            )
    if head_dim % 2:
        raise ModelLoadError(f"head size {head_dim} is not even, which rotary embedding needs", path)
