"""KV cache manager: three verbs for the scheduler (find cached prefix, allocate, free)."""
from __future__ import annotations

from typing import Protocol

from orbitllm.kv.block_pool import BlockPool, KVBlock, hash_block


class CacheRequest(Protocol):
    """What the manager reads of a request (the engine's ``Request`` has it): the KV
    layer sits below the engine and does not import it."""

    request_id: str
    cache_salt: str | None
    num_computed_tokens: int
    block_hashes: list[bytes]   # full blocks' hashes, extended here as blocks fill

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_known_tokens(self) -> int: ...

    @property
    def uses_prefix_cache(self) -> bool: ...

    def token_range(self, start: int, end: int) -> list[int]: ...


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._ids: dict[str, list[int]] = {}     # the same, as ids, kept in step for the runner
        self._num_cached: dict[str, int] = {}   # leading blocks of a request already hashed
        self.prefix_queries = 0                  # prompt tokens looked up
        self.prefix_hits = 0                     # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read it, do not keep it)."""
        return self._ids.get(request_id, [])

    def _update_hashes(self, req: CacheRequest, num_tokens: int) -> None:
        bs = self.block_size
        hashes = req.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else None
            salt = req.cache_salt if i == 0 else None
            hashes.append(hash_block(parent, req.token_range(i * bs, (i + 1) * bs), salt))

    def get_computed_blocks(self, req: CacheRequest) -> tuple[list[KVBlock], int]:
        """Cached blocks of the request's longest cached prefix, and their token count.

        The last token is never taken from the cache: the step must compute at
        least one position to produce logits.
        """
        if not (self.enable_prefix_caching and req.uses_prefix_cache):
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._update_hashes(req, max_blocks * self.block_size)
        hits: list[KVBlock] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: CacheRequest, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Reserve blocks so ``num_new_tokens`` more tokens fit; False (and no change) if not."""
        if not computed_blocks:
            blocks = self._blocks.get(req.request_id)
            total = req.num_computed_tokens + num_new_tokens
            if blocks and total <= len(blocks) * self.block_size:   # decode within the last block
                # (a verify step's known tokens may fill a block short of ``total``)
                if self.enable_prefix_caching and (total % self.block_size == 0 or num_new_tokens > 1):
                    self._cache_full_blocks(req, blocks, total)
                return True
        computed_blocks = computed_blocks or []
        blocks = self._blocks.setdefault(req.request_id, [])
        ids = self._ids.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(blocks) - len(computed_blocks)
        reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimed:
            if not blocks:
                del self._blocks[req.request_id], self._ids[req.request_id]
            return False
        self.pool.touch(computed_blocks)
        new = computed_blocks + (self.pool.allocate(need) if need > 0 else [])
        blocks.extend(new)
        ids.extend(b.block_id for b in new)
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, blocks, total)
        return True

    def reserve(self, req: CacheRequest, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` positions past the request's computed ones ahead of
        the step that computes them (a draft model writes its KV of a verify step's
        positions before that step); False (and no change) if they do not fit. Unlike
        ``allocate_slots`` nothing is registered in the prefix cache: the target's KV
        of these positions is not there yet, and the step that writes it may come later
        than this one (``allocate_slots`` registers them when it is scheduled)."""
        blocks = self._blocks.get(req.request_id, [])
        need = -(-(req.num_computed_tokens + num_tokens) // self.block_size) - len(blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        new = self.pool.allocate(need)
        self._blocks.setdefault(req.request_id, blocks).extend(new)
        self._ids.setdefault(req.request_id, []).extend(b.block_id for b in new)
        return True

    def _cache_full_blocks(self, req: CacheRequest, blocks: list[KVBlock], num_tokens: int) -> None:
        # Registered at allocation: a request scheduled later in the same step may hit
        # these blocks, which is safe because every layer writes all new K/V before
        # any attention reads the cache.
        num_full = min(num_tokens, req.num_known_tokens) // self.block_size
        start = self._num_cached.get(req.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(req, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        self._num_cached[req.request_id] = num_full

    def forget_unwritten(self, req: CacheRequest) -> list[int]:
        """Take the request's blocks past its computed tokens out of the prefix cache (a
        failed step registered them but may not have written them); they are registered
        again once a step fills them. Returns their ids."""
        blocks = self._blocks.get(req.request_id, [])
        first = req.num_computed_tokens // self.block_size
        for block in blocks[first:]:
            self.pool.uncache(block)
        if self._num_cached.get(req.request_id, 0) > first:
            self._num_cached[req.request_id] = first
        return [b.block_id for b in blocks[first:]]

    def fork(self, parent: CacheRequest, child: CacheRequest, num_tokens: int) -> int:
        """Copy-on-write fork: the child's block table starts with the parent's full blocks
        of its first ``num_tokens`` tokens, shared by reference count, with or without the
        prefix cache. Returns the tokens shared (a multiple of the block size).

        Full blocks are never written again, so sharing them needs no copy. The block the
        parent is still writing into (the partial last one) is not shared: the child
        recomputes those < block_size tokens into a block of its own when it is scheduled.
        Recompute instead of a device block copy keeps the runner, CUDA graphs and
        tensor-parallel workers unchanged, and costs at most one block of prefill per child.
        """
        if child.request_id in self._blocks:
            raise ValueError(f"fork: {child.request_id!r} already holds KV blocks")
        k = min(num_tokens, parent.num_computed_tokens) // self.block_size
        shared = self._blocks.get(parent.request_id, [])[:k]
        self.pool.touch(shared)
        self._blocks[child.request_id] = list(shared)
        self._ids[child.request_id] = [b.block_id for b in shared]
        if self.enable_prefix_caching:
            self._num_cached[child.request_id] = min(k, self._num_cached.get(parent.request_id, 0))
        child.block_hashes[:] = parent.block_hashes[:k]
        return len(shared) * self.block_size

    def trim(self, req: CacheRequest) -> None:
        """Give back the blocks past the request's known tokens: the lookahead of a
        verify step whose drafts were rejected. They were never registered in the
        prefix cache (only blocks of known tokens are), so they go straight back."""
        blocks = self._blocks.get(req.request_id)
        keep = -(-req.num_known_tokens // self.block_size)
        if blocks is None or len(blocks) <= keep:
            return
        self.pool.free(reversed(blocks[keep:]))
        del blocks[keep:]
        del self._ids[req.request_id][keep:]

    def free(self, req: CacheRequest) -> None:
        """Return a finished, aborted or preempted request's blocks (tail first)."""
        blocks = self._blocks.pop(req.request_id, [])
        self._ids.pop(req.request_id, None)
        self._num_cached.pop(req.request_id, None)
        # Blocks registered for tokens this step was going to compute hold no KV
        # yet (a request preempted in the step that allocated them).
        for block in blocks[req.num_computed_tokens // self.block_size:]:
            if block.ref_cnt == 1:
                self.pool.uncache(block)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
