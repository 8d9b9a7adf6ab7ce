"""The pool of KV blocks: free queue (LRU), reference counts and the hash -> block map."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str | None) -> bytes:
    """Chained SHA-256 of (parent hash, this block's tokens, salt).

    Chaining makes a hit on block i imply hits on 0..i-1; SHA-256 makes it
    infeasible for one tenant to forge another's block (unlike Python's hash()).
    """
    h = hashlib.sha256(parent or b"root")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if salt is not None:
        h.update(b"salt:" + salt.encode())
    return h.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Owns every block. Free blocks wait in an LRU queue; a freed block keeps its
    hash (so it can still be a cache hit) until it is handed out again."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # OrderedDict as an O(1) doubly linked list: popitem(last=False) evicts the
        # least recently freed block, `del` takes a cached block back on a hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests (cached-but-free count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict from the prefix cache
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero join the queue in the given order
        (pass a sequence's blocks tail first so its prefix is evicted last)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a full, computed block findable by its hash (first writer wins)."""
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def uncache(self, block: KVBlock) -> None:
        """Forget a block's hash (its KV was never computed)."""
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
