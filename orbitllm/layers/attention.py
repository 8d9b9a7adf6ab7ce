"""Attention over a paged KV cache: the metadata the runner builds, and the backends.

The model runner builds one `AttentionMetadata` per step and passes it down
explicitly; backends see only tensors (block tables, slot mappings, lengths),
never requests.

KV cache layout (per layer): ``k_cache`` and ``v_cache`` each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a sequence
lives in block ``block_table[t // block_size]`` at offset ``t % block_size``;
its flat slot is ``block * block_size + offset``.

KV scales (an FP8 cache of a checkpoint with ``kv_cache_scheme``): ``kv_scales`` is
(k_scale, v_scale), each float32 ``[num_kv_heads]``; the cache holds K / k_scale and
V / v_scale per head, and attention multiplies them back. None: scale 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from orbitllm.layers.tensor_parallel import Shard, first_kv_head, kv_heads_per_rank
from orbitllm.layers.weight_loading import CheckpointTensor, check_shape, take


@dataclass
class AttentionMetadata:
    """Where the tokens of one step come from and where their K/V go.

    The step's tokens are packed: sequence ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``; those are its last
    ``query_len`` positions out of ``seq_lens[i]`` (context before the step
    plus the new tokens).
    """

    slot_mapping: torch.Tensor      # [num_tokens] int64, flat cache slot of each new token (-1: skip)
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32, prefix sums of query lengths
    seq_lens: torch.Tensor          # [num_seqs] int32, total length after this step
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so the reference backend can loop without device syncs.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Triton decode: context partitions per sequence (None: chosen from max_seq_len).
    # Pin it when capturing CUDA graphs so the grid is the same on every replay.
    num_kv_splits: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Computes attention for packed queries against a paged KV cache."""

    supports_cuda_graphs: bool   # forward needs no host data, so decode can be captured

    def forward(
        self,
        q: torch.Tensor,          # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,          # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,          # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:            # [num_tokens, num_heads, head_dim]
        ...


class Attention(nn.Module):
    """Attention of this rank's heads over its paged KV cache, with the rotary embedding
    applied where the backend wants it: a backend that ``fuses_rotary`` rotates q and k
    itself, in the kernel that writes the cache; otherwise ``rotary`` rotates them here.

    ``num_kv_heads``: the model's (all ranks'); ``shard`` says which this rank holds.
    ``add_kv_scales`` gives the layer the checkpoint's ``k_scale`` / ``v_scale``; they are
    applied only to an FP8 cache (as vLLM does: a 16-bit cache holds K/V as they are)."""

    keep_dtype = ("k_scale", "v_scale")   # float32 whatever the model's dtype

    def __init__(self, scale: float, rotary: nn.Module, sliding_window: int | None = None,
                 num_kv_heads: int = 1, shard: Shard = Shard()) -> None:
        super().__init__()
        self.scale, self.rotary, self.sliding_window = scale, rotary, sliding_window
        self.total_num_kv_heads, self.shard = num_kv_heads, shard
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, shard.size)
        for name in self.keep_dtype:
            self.register_parameter(name, None)

    def add_kv_scales(self) -> None:
        """Parameters for the checkpoint's KV scales, one float32 per KV head of this rank
        (a per-tensor scale is repeated), filled by ``load_weight``."""
        for name in self.keep_dtype:
            setattr(self, name, nn.Parameter(torch.ones(self.num_kv_heads), requires_grad=False))

    def load_weight(self, name: str, loaded: CheckpointTensor, shard_id=None) -> None:
        """A scalar (strategy ``tensor``) or one scale per KV head of the model (``attn_head``:
        this rank's slice, as ``QKVParallelLinear`` slices K and V); each must be > 0, as
        the KV write divides by it."""
        if tuple(loaded.shape) in ((), (1,)):
            value = take(loaded).reshape(()).expand(self.num_kv_heads)
        else:
            check_shape(loaded, (self.total_num_kv_heads,))
            value = take(loaded, {0: (first_kv_head(self.total_num_kv_heads, self.shard), self.num_kv_heads)})
        if not bool(((value > 0) & value.isfinite()).all()):
            raise ValueError(f"must be positive and finite, got {value.tolist()}")
        getattr(self, name).data.copy_(value)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """q ``[T, heads, D]``, k and v ``[T, kv_heads, D]``, ``kv_cache`` this layer's
        ``[2, blocks, block_size, kv_heads, D]``; returns ``[T, heads, D]``."""
        kv_scales = None
        if self.k_scale is not None and kv_cache.dtype == torch.float8_e4m3fn:
            kv_scales = (self.k_scale, self.v_scale)
        if getattr(backend, "fuses_rotary", False):
            return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                                   self.sliding_window, kv_scales, rope=(positions, self.rotary.cos_sin))
        q, k = self.rotary(positions, q, k)
        return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                               self.sliding_window, kv_scales)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Store the new tokens' K/V at their slots (slots < 0 are padding), divided by
    ``kv_scales`` (per KV head, in float32) where given and rounded to the cache's dtype
    (an FP8 cache: E4M3, saturating at +-448)."""
    nb, bs, h, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    for cache, new, kv_scale in zip((k_cache, v_cache), (k, v), kv_scales or (None, None)):
        cache = cache.view(nb * bs, h, d)
        if kv_scale is not None:
            new = new.float() / kv_scale[:, None]
        if cache.dtype == torch.float8_e4m3fn:   # CUDA's cast overflows to NaN: saturate first;
            fp8_max = torch.finfo(cache.dtype).max   # (no index_copy_ for FP8 on CPU): its bits
            new = new.float().clamp(-fp8_max, fp8_max).to(cache.dtype).view(torch.uint8)
            cache = cache.view(torch.uint8)
        else:
            new = new.to(cache.dtype)
        cache.index_copy_(0, slot_mapping, new)


def dequantize_kv(kv: torch.Tensor, kv_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cached K or V ``[..., kv_heads, d]`` in ``dtype``, times its head's scale (in float32)."""
    if kv_scale is None:
        return kv.to(dtype)
    return (kv.float() * kv_scale[:, None]).to(dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence, ``[seq_len, h, d]``."""
    nblocks = (seq_len + cache.shape[1] - 1) // cache.shape[1]
    blocks = cache[block_table[:nblocks].long()]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """Boolean mask ``[query_len, seq_len]``: True where a query may attend."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


class TorchAttentionBackend:
    """Plain PyTorch reference backend: correct on any device, one SDPA per sequence."""

    supports_cuda_graphs = False
    # Steps whose sequences all have at most this many query rows (decode, speculative
    # verify) run as one padded SDPA; longer ones (prefill chunks) one SDPA per sequence.
    MAX_BATCHED_QUERY_LEN = 8

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata,
                scale: float, sliding_window: int | None,
                kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        k_scale, v_scale = kv_scales or (None, None)
        qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        if meta.max_query_len <= self.MAX_BATCHED_QUERY_LEN and len(seq_lens) > 1 and min(seq_lens) > 0:
            return self._decode(q, k_cache, v_cache, meta, scale, sliding_window, qsl, k_scale, v_scale)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            if end == start:
                continue
            keys = dequantize_kv(gather_kv(k_cache, meta.block_tables[i], seq_len), k_scale, q.dtype)
            values = dequantize_kv(gather_kv(v_cache, meta.block_tables[i], seq_len), v_scale, q.dtype)
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            mask = causal_mask(end - start, seq_len, sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=mask, scale=scale)
            out[start:end] = o.transpose(0, 1)
        return out


    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, qsl: list[int],
                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
        """Few query rows per sequence (none with an empty context): gather every context
        padded to the longest and run a single masked SDPA, instead of one call per
        sequence. Queries sit right-aligned in a [B, Q] grid (a sequence's last query
        row at Q - 1), each masked causally at its own position."""
        num_seqs, length, page = meta.num_seqs, meta.max_seq_len, k_cache.shape[1]
        Q = meta.max_query_len
        tables = meta.block_tables[:, :-(-length // page)].long()
        keys = dequantize_kv(k_cache[tables].flatten(1, 2)[:, :length], k_scale, q.dtype)  # [B, L, h, d]
        values = dequantize_kv(v_cache[tables].flatten(1, 2)[:, :length], v_scale, q.dtype)
        lens = meta.seq_lens.to(q.device).long()[:, None, None]
        pos = torch.arange(length, device=q.device)[None, None, :]
        q_pos = lens - Q + torch.arange(Q, device=q.device)[None, :, None]   # [B, Q, 1]
        mask = pos <= q_pos
        if sliding_window is not None:
            mask &= pos > q_pos - sliding_window
        mask[..., 0] |= ~mask.any(-1)   # grid padding: no all-masked row (its output is dropped)
        # Padding reads other blocks' (or never written) slots: zero them so 0 * garbage
        # cannot leak into the weighted sum.
        keep = (pos < lens).squeeze(1)[:, :, None, None]
        keys, values = keys.where(keep, 0.0), values.where(keep, 0.0)
        dest = None
        if q.shape[0] != num_seqs * Q:   # not a full grid: place each sequence's rows
            dest = torch.tensor([b * Q + Q - (e - s) + j for b, (s, e) in enumerate(zip(qsl, qsl[1:]))
                                 for j in range(e - s)], device=q.device)
            grid = q.new_zeros(num_seqs * Q, *q.shape[1:])
            grid[dest] = q
            q = grid
        out = F.scaled_dot_product_attention(
            q.view(num_seqs, Q, -1, q.shape[-1]).transpose(1, 2), keys.transpose(1, 2),
            values.transpose(1, 2), attn_mask=mask[:, None], scale=scale, enable_gqa=True)
        out = out.transpose(1, 2).reshape(num_seqs * Q, -1, q.shape[-1])
        return out if dest is None else out[dest]


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA and the PyTorch backend elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from orbitllm.layers.triton_attention import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend: unknown backend {name!r} (use auto, torch or triton)")
