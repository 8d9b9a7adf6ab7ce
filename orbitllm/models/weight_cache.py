"""A per-user cache of what is slow to derive from a GGUF file: dequantized weights and the tokenizer.

Measured on the 2-core CPU machine with SmolLM2-135M-Instruct Q4_1: dequantizing every tensor to float32
takes 1.1-1.5 s and transformers' GGUF tokenizer conversion 0.8-2 s, against 0.05 s to read the weights
back from a memory-mapped safetensors file (copy into the model included) and 0.2-0.3 s to load a saved
tokenizer. benchmarks/startup.py measures the whole cold start with and without the cache.

Layout: `<root>/<key>/weights-<dtype>.safetensors` and `<root>/<key>/tokenizer-transformers-<version>/`.
`<root>` is `$ORBITLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/orbitllm`, else `~/.cache/orbitllm`.
`<key>` identifies the file's contents cheaply: a BLAKE2b hash of its size, its modification time (ns),
and its first and last MiB (the first covers the whole header: architecture, shapes and quantization
types). Rewriting or replacing the file changes the key, so stale entries are never read; they are just
left behind, and deleting the cache folder is always safe.

Files are published atomically (written under a temporary name in the same folder, then renamed), so a
crash or a concurrent writer never leaves a partial entry under the final name. A cache that cannot be
written (read-only home, full disk) only costs the speed-up: loading goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import torch

from orbitllm.envs import envs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is cached for a given file changes meaning
_SAMPLE_BYTES = 1 << 20
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def cache_root() -> Path:
    """The user's orbitllm cache folder (created lazily, on first write)."""
    return envs().cache_dir


def file_key(path: Path) -> str:
    """A cheap content key for a large file: size, mtime and its first and last MiB."""
    stat = path.stat()
    digest = hashlib.blake2b(f"v{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE_BYTES))
        f.seek(max(stat.st_size - _SAMPLE_BYTES, 0))
        digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


class CheckpointCache:
    """The cache entry of one GGUF file."""

    def __init__(self, gguf_path: Path, root: str | os.PathLike | None = None) -> None:
        self.key = file_key(gguf_path)
        self.folder = (Path(root) if root is not None else cache_root()) / self.key

    def weights_file(self, dtype: torch.dtype) -> Path:
        return self.folder / f"weights-{str(dtype).removeprefix('torch.')}.safetensors"

    def read_weights(self, dtype: torch.dtype, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]] | None:
        """The cached weights one tensor at a time, or None when there is no usable entry.

        The file is opened and checked (header, size, tensor names, key) before this returns, so a damaged
        entry is dropped and rebuilt instead of failing halfway through a load.
        """
        from safetensors import safe_open

        path = self.weights_file(dtype)
        if not path.is_file():
            return None
        try:
            handle = safe_open(str(path), framework="pt")
            usable = (handle.metadata() or {}).get("key") == self.key and set(handle.keys()) == set(names)
        except Exception as e:  # safetensors reports damage with its own error type
            logger.warning("ignoring unreadable weight cache %s (%s)", path, e)
            usable = False
        if not usable:
            path.unlink(missing_ok=True)
            return None
        return ((name, handle.get_tensor(name)) for name in names)

    def write_weights_through(
        self,
        dtype: torch.dtype,
        layout: Sequence[tuple[str, tuple[int, ...]]],
        weights: Iterable[tuple[str, torch.Tensor]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass `weights` through unchanged while streaming them into the cache.

        Streaming keeps memory at one tensor: the safetensors header is written first from `layout` (the
        names and shapes `weights` will produce, in order), then each tensor's bytes as it goes by. The
        entry is published only if the stream ran to the end.
        """
        writer = _StreamingSafetensors.create(self.weights_file(dtype), dtype, layout, {"key": self.key})
        try:
            for name, tensor in weights:
                if writer is not None and not writer.add(tensor):
                    writer = None
                yield name, tensor
            if writer is not None:
                writer.publish()
        finally:
            if writer is not None:
                writer.discard()

    def tokenizer_folder(self) -> Path | None:
        """The saved tokenizer, if there is one."""
        folder = self._tokenizer_folder()
        return folder if (folder / "tokenizer_config.json").is_file() else None

    def save_tokenizer(self, tokenizer) -> None:
        """Save a transformers tokenizer into the entry, atomically; failures only cost the speed-up."""
        final = self._tokenizer_folder()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{final.name}."))
        except OSError as e:
            logger.warning("not caching the tokenizer in %s (%s)", self.folder, e)
            return
        try:
            tokenizer.save_pretrained(str(staging))
            os.rename(staging, final)
        except OSError as e:  # includes a concurrent writer having published first
            logger.debug("tokenizer not cached in %s (%s)", final, e)
            shutil.rmtree(staging, ignore_errors=True)

    def _tokenizer_folder(self) -> Path:
        import transformers

        return self.folder / f"tokenizer-transformers-{transformers.__version__}"


class _StreamingSafetensors:
    """A safetensors file written one tensor at a time, under a temporary name until published."""

    def __init__(self, final: Path, file: IO[bytes], total_bytes: int) -> None:
        self.final = final
        self.file = file
        self.total_bytes = total_bytes

    @classmethod
    def create(
        cls, final: Path, dtype: torch.dtype, layout: Sequence[tuple[str, tuple[int, ...]]], metadata: dict[str, str]
    ) -> "_StreamingSafetensors | None":
        if dtype not in _SAFETENSORS_DTYPES:
            return None
        header, total_bytes = _safetensors_header(dtype, layout, metadata)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            file = tempfile.NamedTemporaryFile(dir=final.parent, prefix=f".{final.name}.", delete=False)
            file.write(header)
        except OSError as e:
            logger.warning("not caching weights in %s (%s)", final.parent, e)
            return None
        return cls(final, file, len(header) + total_bytes)

    def add(self, tensor: torch.Tensor) -> bool:
        """Append one tensor's bytes; False (and the partial file removed) if the disk refuses."""
        try:
            self.file.write(tensor.contiguous().view(torch.uint8).numpy())
            return True
        except OSError as e:
            logger.warning("not caching weights in %s (%s)", self.final.parent, e)
            self.discard()
            return False

    def publish(self) -> None:
        """Rename the finished file into place, unless it came out the wrong size."""
        try:
            size = self.file.tell()
            self.file.close()
            if size == self.total_bytes:
                os.replace(self.file.name, self.final)
        except OSError as e:
            logger.warning("not caching weights in %s (%s)", self.final.parent, e)

    def discard(self) -> None:
        """Remove the temporary file if it is still there (an interrupted or failed write; no-op once published)."""
        self.file.close()
        Path(self.file.name).unlink(missing_ok=True)


def _safetensors_header(
    dtype: torch.dtype, layout: Sequence[tuple[str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, int]:
    """The length-prefixed JSON header of a safetensors file whose tensors follow in `layout` order."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
    for name, shape in layout:
        size = itemsize * int(torch.Size(shape).numel())
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offset
