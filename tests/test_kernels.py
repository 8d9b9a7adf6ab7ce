"""Triton kernels against their PyTorch references.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported) on small shapes; ``gpu``-marked cases use long
contexts and bf16 and are skipped without CUDA. Caches and outputs are poisoned
with NaN, so a kernel that reads a slot it should not, or leaves an output
unwritten, fails loudly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from orbitllm.kernels.fused_ops import argmax, gumbel_sample  # noqa: E402
from orbitllm.kernels import (  # noqa: E402
    apply_rotary_emb,
    apply_rotary_emb_ref,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
    rotary_store_kv_cache,
    store_kv_cache,
)
from orbitllm.kernels.gemv import GemvConfig, PeerSend, gemv  # noqa: E402
from orbitllm.kernels.peer_reduce import (  # noqa: E402
    RELEASED,
    peer_reduce_add_norm,
    peer_reduce_add_norm_ref,
)
from orbitllm.layers.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from orbitllm.layers.triton_attention import TritonAttentionBackend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# float32 attention: exact-ish in the interpreter, tf32 tensor-core dots on the GPU.
FP32_REL = 2e-3 if CUDA else 1e-4
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}  # elementwise ops: summation order, fast exp/rsqrt
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# The interpreter evaluates log2(0) for empty decode splits (their lse is -inf by design).
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@dataclass
class Step:
    """One attention step: new q/k/v, a poisoned paged cache holding the context, metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_step(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
              head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
              spare_blocks: int = 3) -> Step:
    """Sequence i has ``seq_lens[i] - query_lens[i]`` tokens already cached (random K/V)
    and ``query_lens[i]`` new ones; blocks are scattered, unused slots hold NaN."""
    blocks_per_seq = [triton.cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(max(blocks_per_seq), 1) + 1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                         dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    used, ctx_slots, new_slots = 0, [], []
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        block_tables[i, :blocks_per_seq[i]] = perm[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        pos = torch.arange(seq_len)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        ctx_slots.append(slots[:seq_len - query_len])
        new_slots.append(slots[seq_len - query_len:])
    ctx_slots = torch.cat(ctx_slots).to(DEVICE)
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[ctx_slots] = torch.randn(
            ctx_slots.shape[0], num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    num_tokens = sum(query_lens)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(new_slots).to(DEVICE),
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl.tolist(),
        seq_lens_cpu=list(seq_lens),
    )

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(num_tokens, heads, head_dim, dtype=dtype, device=DEVICE)

    return Step(rand(num_heads), rand(num_kv_heads), rand(num_kv_heads), k_cache, v_cache, meta)


def reference(step: Step, scale: float, sliding_window: int | None) -> torch.Tensor:
    """The torch backend in float32 on copies of the cache (it writes the new K/V itself)."""
    return TorchAttentionBackend().forward(
        step.q.float(), step.k.float(), step.v.float(),
        step.k_cache.to(torch.float32, copy=True), step.v_cache.to(torch.float32, copy=True),
        step.meta, scale, sliding_window)


def store(step: Step) -> None:
    store_kv_cache(step.k, step.v, step.k_cache, step.v_cache, step.meta.slot_mapping)


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, step: Step, rel: float) -> None:
    """Rows of sequences with queries must be finite and within ``rel`` (relative L2)."""
    rows = torch.arange(step.meta.query_start_loc_cpu[-1])
    out, ref = out[rows.to(out.device)].float(), ref[rows.to(ref.device)].float()
    assert torch.isfinite(out).all(), "non-finite output (unwritten row or poisoned read)"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < rel, f"relative error {err:.2e}"


def prefill(step: Step, scale: float, window: int | None) -> torch.Tensor:
    out = poisoned_like(step.q)
    m = step.meta
    paged_prefill_attention(step.q, step.k_cache, step.v_cache, m.query_start_loc, m.seq_lens,
                            m.block_tables, m.max_query_len, scale, window, out=out)
    return out


def decode(step: Step, scale: float, window: int | None, num_splits: int | None) -> torch.Tensor:
    out = poisoned_like(step.q)
    m = step.meta
    paged_decode_attention(step.q, step.k_cache, step.v_cache, m.query_start_loc, m.seq_lens,
                           m.block_tables, m.max_seq_len, scale, window, num_splits=num_splits, out=out)
    return out


# ----------------------------------------------------------------------------- KV write


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_store_kv_cache(block_size: int, cache_dtype: torch.dtype) -> None:
    num_blocks, kv_heads, head_dim, tokens = 6, 3, 64, 20
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"),
                         dtype=cache_dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::4] = -1
    kv = torch.randn(tokens, 2, kv_heads, head_dim, device=DEVICE)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as from a fused projection
    store_kv_cache(k, v, k_cache, v_cache, slots)

    valid = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots[valid]], k[valid].to(cache_dtype), rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots[valid]], v[valid].to(cache_dtype), rtol=0, atol=0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[valid]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_rotary_store_kv_cache_matches_rotary_then_store(rotary_dim: int, cache_dtype) -> None:
    """The fused kernel writes what ``apply_rotary_emb`` then ``store_kv_cache`` would:
    q rotated in place, rotated k (all dims, partial rotary too) and v in their slots,
    padding slots skipped, k itself unchanged."""
    tokens, hq, hk, d, block_size, num_blocks = 12, 4, 2, 64, 16, 4
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEVICE)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    k_before = k.clone()
    cache = rope_cache(rotary_dim, 100)
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::5] = -1
    ref_q, ref_k = apply_rotary_emb_ref(q, k, positions, cache)
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=cache_dtype, device=DEVICE)
    v_cache = k_cache.clone()
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    store_kv_cache(ref_k, v, ref_k_cache, ref_v_cache, slots)
    rotary_store_kv_cache(q, k, v, k_cache, v_cache, slots, positions, cache)
    torch.testing.assert_close(q, ref_q, **FP32_TOL)
    assert torch.equal(k, k_before)
    torch.testing.assert_close(k_cache, ref_k_cache, equal_nan=True, **FP32_TOL)
    assert torch.equal(v_cache.nan_to_num(7.0), ref_v_cache.nan_to_num(7.0))


# ----------------------------------------------------------------------------- prefill

# Fresh prompt, prefix hit, chunked-prefill chunk, a decode row riding along, an idle sequence.
MIXED_SEQ_LENS = [37, 49, 55, 41, 12]
MIXED_QUERY_LENS = [37, 9, 16, 1, 0]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_mixed_batch(group: int, head_dim: int, block_size: int) -> None:
    kv_heads = 2 if group < 8 else 1
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, kv_heads * group, kv_heads, head_dim, block_size)
    ref = reference(step, head_dim ** -0.5, None)
    store(step)
    assert_attention_close(prefill(step, head_dim ** -0.5, None), ref, step, FP32_REL)


@pytest.mark.parametrize("window", [1, 7, 20, 100])
def test_prefill_sliding_window(window: int) -> None:
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, 8, 2, 64, 16)
    ref = reference(step, 0.125, window)
    store(step)
    assert_attention_close(prefill(step, 0.125, window), ref, step, FP32_REL)


def test_prefill_fp16_and_group_not_power_of_two() -> None:
    step = make_step([30, 45], [30, 13], 6, 2, 64, 16, dtype=torch.float16)
    ref = reference(step, 0.125, None)
    store(step)
    assert_attention_close(prefill(step, 0.125, None), ref, step, 3e-3)


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_split_kv(group: int, head_dim: int, block_size: int) -> None:
    seq_lens = [200, 1, 77, 131]
    step = make_step(seq_lens, [1] * len(seq_lens), 2 * group, 2, head_dim, block_size)
    ref = reference(step, head_dim ** -0.5, None)
    store(step)
    for splits in (1, 4):
        assert_attention_close(decode(step, head_dim ** -0.5, None, splits), ref, step, FP32_REL)


@pytest.mark.parametrize("window", [1, 16, 50, 500])
def test_decode_sliding_window(window: int) -> None:
    seq_lens = [180, 5, 64]
    step = make_step(seq_lens, [1] * len(seq_lens), 8, 2, 64, 16)
    ref = reference(step, 0.125, window)
    store(step)
    for splits in (1, 3):
        assert_attention_close(decode(step, 0.125, window, splits), ref, step, FP32_REL)


@pytest.mark.parametrize("window", [None, 20])
def test_head_dim_256_prefill_decode_and_rotary_write(window: int | None) -> None:
    """Gemma 3's head size (256) and group (4 query heads per KV head, as the 270M): the
    rotary + KV write, the prefill kernel and the split decode kernel, sliding window or not."""
    scale = 256 ** -0.5
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, 4, 1, 256, 16)
    cache = rope_cache(256, 100)
    positions = torch.randint(0, 100, (step.q.shape[0],), device=DEVICE)
    q = step.q.clone()
    ref_q, ref_k = apply_rotary_emb_ref(step.q, step.k, positions, cache)
    rotary_store_kv_cache(q, step.k, step.v, step.k_cache, step.v_cache, step.meta.slot_mapping,
                          positions, cache)
    torch.testing.assert_close(q, ref_q, **FP32_TOL)
    step = Step(ref_q, ref_k, step.v, step.k_cache, step.v_cache, step.meta)
    assert_attention_close(prefill(step, scale, window), reference(step, scale, window), step, FP32_REL)
    step = make_step([70, 9, 33], [1, 1, 1], 4, 1, 256, 16)
    ref = reference(step, scale, window)
    store(step)
    for splits in (1, 3):
        assert_attention_close(decode(step, scale, window, splits), ref, step, FP32_REL)


def test_decode_skips_padded_sequences() -> None:
    """CUDA-graph padding: extra sequences with seq_len 0 and slot -1 stay harmless."""
    step = make_step([90, 33], [1, 1], 4, 1, 64, 16)
    ref = reference(step, 0.125, None)
    m, pad = step.meta, 2
    m.seq_lens = torch.cat([m.seq_lens, m.seq_lens.new_zeros(pad)])
    m.query_start_loc = torch.arange(m.num_seqs + 1, dtype=torch.int32, device=DEVICE)
    m.block_tables = torch.cat([m.block_tables, m.block_tables.new_zeros(pad, m.block_tables.shape[1])])
    m.slot_mapping = torch.cat([m.slot_mapping, m.slot_mapping.new_full((pad,), -1)])
    step.q, step.k, step.v = (torch.cat([t, torch.randn(pad, *t.shape[1:], device=DEVICE)])
                              for t in (step.q, step.k, step.v))
    poisoned_before = step.k_cache.isnan().sum()
    store(step)
    assert step.k_cache.isnan().sum() == poisoned_before - 2 * 64, "padding must not be stored"
    for splits in (1, 3):
        out = decode(step, 0.125, None, splits)
        assert_attention_close(out[:2], ref, step, FP32_REL)
        assert (out[2:] == 0).all(), "padded sequences should produce zeros"


# ----------------------------------------------------------------------------- backend


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 12]])
def test_triton_backend_matches_torch(query_lens: list[int]) -> None:
    step = make_step([70, 20, 40], query_lens, 8, 2, 64, 16)
    ref = reference(step, 0.125, 30)
    out = TritonAttentionBackend().forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                                           step.meta, 0.125, 30)
    assert_attention_close(out, ref, step, FP32_REL)


# ----------------------------------------------------------------------------- fused ops


@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm(hidden: int) -> None:
    x = torch.randn(7, hidden, device=DEVICE)
    w = torch.randn(hidden, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **FP32_TOL)
    res = torch.randn_like(x)
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=res)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(new_res, ref_res, **FP32_TOL)


@pytest.mark.parametrize("inter", [48, 1500])
def test_silu_and_mul(inter: int) -> None:
    x = torch.randn(5, 2 * inter, device=DEVICE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **FP32_TOL)


@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_in_place_on_fused_qkv_view(rotary_dim: int) -> None:
    tokens, hq, hk, d = 6, 4, 2, 64
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEVICE)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v_before = qkv[:, (hq + hk) * d:].clone()
    cache = rope_cache(rotary_dim, 100)
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)
    ref_q, ref_k = apply_rotary_emb_ref(q, k, positions, cache)
    apply_rotary_emb(q, k, positions, cache)
    torch.testing.assert_close(q, ref_q, **FP32_TOL)
    torch.testing.assert_close(k, ref_k, **FP32_TOL)
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter truncates float32 -> bfloat16 instead of rounding"))])
def test_peer_reduce_add_norm_as_one_rank_of_three(dtype: torch.dtype) -> None:
    """Rank 1 of a world of three simulated in one process: the peers' buffers and
    flag arrays are plain tensors whose addresses the kernel reads, the peers have
    already signalled call 1, so the wait passes. The sum, add and norm must match
    the reference, and rank 1 must have signalled every rank for each row."""
    world, rank, max_rows, hidden, rows, slot = 3, 1, 6, 96, 4, 1
    bufs = [torch.randn(2 * max_rows * hidden, device=DEVICE).to(dtype) for _ in range(world)]
    flags = [torch.zeros(max_rows * world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    flags[rank].view(max_rows, world)[:rows] = 1             # every peer reached call 1
    flags[rank].view(max_rows, world)[:rows, rank] = 0       # (rank 1 signals itself)
    buf_addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    flag_addrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64, device=DEVICE)
    epochs = torch.zeros(max_rows, dtype=torch.int32, device=DEVICE)
    residual = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    out, new_res = peer_reduce_add_norm(buf_addrs.data_ptr(), flag_addrs.data_ptr(), epochs, rank,
                                        world, slot * max_rows * hidden, rows, residual, weight, 1e-6)
    partials = [b[slot * max_rows * hidden:][:rows * hidden].view(rows, hidden) for b in bufs]
    ref_out, ref_res = peer_reduce_add_norm_ref(partials, residual, weight, 1e-6)
    tol = FP32_TOL if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 2e-2}   # 1 ulp
    torch.testing.assert_close(new_res, ref_res, **tol)
    torch.testing.assert_close(out, ref_out, **tol)
    assert epochs.tolist() == [1] * rows + [0] * (max_rows - rows)
    for f in flags:   # rank 1's announcement of call 1 reached every rank, for its rows only
        assert f.view(max_rows, world)[:, rank].tolist() == [1] * rows + [0] * (max_rows - rows)


@pytest.mark.parametrize("n,k,bias,config", [
    (64, 256, False, GemvConfig(8, 64, 4, 1)),     # even: unmasked loads
    (37, 200, True, GemvConfig(4, 64, 2, 2)),      # ragged rows and chunks, bias
    (37, 200, True, GemvConfig(4, 64, 2, 2, preload=False)),   # no peeled first chunk
    (16, 96, False, None),                          # default config, chunk wider than K
])
def test_gemv_matches_linear(n: int, k: int, bias: bool, config) -> None:
    x = torch.randn(1, k, device=DEVICE)
    w = torch.randn(n, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if bias else None
    out = torch.full((1, n), float("nan"), device=DEVICE)
    assert gemv(x, w, b, out=out, config=config) is out
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k,config", [
    (64, 256, GemvConfig(8, 64, 4, 1)),                  # even
    (37, 200, GemvConfig(4, 64, 2, 2)),                  # ragged
    (37, 200, GemvConfig(4, 64, 2, 2, preload=False)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_fused_silu_mul_equals_the_two_kernels(n: int, k: int, config, dtype) -> None:
    """The activation fused into the product's input gives the bits of
    ``silu_and_mul`` followed by the GEMV (and matches PyTorch)."""
    gate_up = torch.randn(1, 2 * k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) * 0.05).to(dtype)
    fused = gemv(gate_up, w, config=config, silu_mul=True)
    assert torch.equal(fused, gemv(silu_and_mul(gate_up), w, config=config))
    ref = torch.nn.functional.linear(silu_and_mul_ref(gate_up.float()), w.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused.float(), ref, rtol=tol, atol=tol)


def test_argmax_matches_torch() -> None:
    """Rows over several blocks with a ragged end: random values, a maximum repeated in
    two blocks (the first wins), a row of -inf (index 0), a NaN (it wins), a maximum in
    the last, partial block."""
    n = 5000
    x = torch.randn(6, n, device=DEVICE)
    x[1, [700, 3000]] = 9.0
    x[2] = float("-inf")
    x[3, 4321] = float("nan")
    x[4, n - 1] = 9.0
    x[5, [10, 11]] = 9.0
    got = argmax(x)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(-1).tolist() == [got[0].item(), 700, 0, 4321, n - 1, 10]
    assert argmax(x[:, ::2]).tolist() == x[:, ::2].argmax(-1).tolist()   # strided rows


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return (((counts.double() - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_sample_draws_from_the_softmax(temperature: float) -> None:
    """Rows of the same logits, each with its own seed: the tokens' frequencies match
    softmax(logits / T) (chi-square; every token at least 1.7% likely, so each expected
    count is large enough for the test)."""
    rows = 4000 if CUDA else 600
    logits = torch.tensor([1.0, 0.5, 0.2, 0.0, -0.3, -0.5, 0.8, 0.6], device=DEVICE)
    temp = torch.full((rows,), temperature, device=DEVICE)
    seeds = torch.arange(rows, device=DEVICE) * 7919 + 12345
    got = gumbel_sample(logits.expand(rows, -1), temp, seeds)
    chi2 = _chi2(torch.bincount(got, minlength=8).cpu(), (logits / temperature).softmax(-1).cpu())
    assert chi2 < 24.3, chi2   # 99.9th percentile of chi-square with 7 degrees of freedom


def test_gumbel_sample_blocks_of_a_row_compete_fairly() -> None:
    """Three likely tokens in the three blocks of a 5,000-token row, the rest near zero:
    drawn in proportion 0.2 : 0.3 : 0.5 (chi-square)."""
    rows = 2000 if CUDA else 200
    wide = torch.full((rows, 5000), -40.0, device=DEVICE)
    cols = [100, 2500, 4999]
    wide[:, cols] = torch.tensor([0.2, 0.3, 0.5], device=DEVICE).log()
    got = gumbel_sample(wide, torch.ones(rows, device=DEVICE), torch.arange(rows, device=DEVICE) + 99)
    assert set(got.tolist()) <= set(cols)
    counts = torch.tensor([(got == c).sum().item() for c in cols])
    assert _chi2(counts, torch.tensor([0.2, 0.3, 0.5])) < 13.8   # 2 degrees of freedom, 99.9th


def test_gumbel_sample_rows_depend_on_their_seed_alone() -> None:
    """A row's draw is the same in any batch and at any row; another seed draws
    differently; a temperature of 0 takes the argmax (bf16 logits read as they are)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3000, device=DEVICE).to(torch.bfloat16)
    temp = torch.tensor([1.0, 0.0, 1.0, 0.7, 0.0, 1.0], device=DEVICE)
    seeds = torch.tensor([5, 6, 7, 8, 9, 5], device=DEVICE)
    got = gumbel_sample(x, temp, seeds)
    assert got[[1, 4]].tolist() == x[[1, 4]].float().argmax(-1).tolist()
    assert got[0] == got[5] or not torch.equal(x[0], x[5])
    for i in range(6):
        assert gumbel_sample(x[i:i + 1], temp[i:i + 1], seeds[i:i + 1]).item() == got[i].item()
    flipped = gumbel_sample(x.flip(0), temp.flip(0), seeds.flip(0))
    assert flipped.flip(0).tolist() == got.tolist()
    other = [gumbel_sample(x[:1], temp[:1], torch.tensor([s], device=DEVICE)).item() for s in range(20)]
    assert len(set(other)) > 10   # 3,000 near-even choices: new seeds, new draws


def rope_cache(rotary_dim: int, max_position: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=DEVICE).float() / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, device=DEVICE).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


# ----------------------------------------------------------------------------- GPU: long contexts, bf16


def random_lengths(n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,)).tolist()


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_prefill_long_bf16(group: int, head_dim: int, block_size: int) -> None:
    # A 16k sequence whose last 1k is new (prefix hit), a fresh 3k prompt, chunks, decodes.
    seq_lens = [16384, 3000, 5000, 700, 2048]
    query_lens = [1024, 3000, 512, 1, 2048]
    step = make_step(seq_lens, query_lens, 4 * group, 4, head_dim, block_size, torch.bfloat16)
    for window in (None, 1000):
        ref = reference(step, head_dim ** -0.5, window)
        store(step)
        assert_attention_close(prefill(step, head_dim ** -0.5, window), ref, step, 1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_decode_long_bf16(group: int, head_dim: int, block_size: int) -> None:
    seq_lens = [16384, 1] + random_lengths(14, 2, 16384)
    step = make_step(seq_lens, [1] * len(seq_lens), 8 * group, 8, head_dim, block_size, torch.bfloat16)
    for window in (None, 4096):
        ref = reference(step, head_dim ** -0.5, window)
        store(step)
        for splits in (None, 1, 7, 32):
            assert_attention_close(decode(step, head_dim ** -0.5, window, splits), ref, step, 1e-2)


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph_replay() -> None:
    """Capture one decode step at full length, replay it with other lengths, slots and inputs."""
    batch, hq, hkv, d, bs, max_len = 16, 16, 8, 128, 16, 4000
    scale = d ** -0.5
    captured = make_step([max_len] * batch, [1] * batch, hq, hkv, d, bs, torch.bfloat16)
    meta = captured.meta
    meta.num_kv_splits = 8
    backend = TritonAttentionBackend()

    def step_fn() -> torch.Tensor:
        return backend.forward(captured.q, captured.k, captured.v, captured.k_cache,
                               captured.v_cache, meta, scale, None)

    step_fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step_fn()

    for _ in range(2):
        new = make_step(random_lengths(batch, 1, max_len), [1] * batch, hq, hkv, d, bs, torch.bfloat16)
        used = new.k_cache.shape[0]
        for dst, src in ((captured.q, new.q), (captured.k, new.k), (captured.v, new.v),
                         (captured.k_cache[:used], new.k_cache), (captured.v_cache[:used], new.v_cache),
                         (meta.seq_lens, new.meta.seq_lens), (meta.slot_mapping, new.meta.slot_mapping)):
            dst.copy_(src)
        captured.k_cache[used:] = float("nan")
        captured.v_cache[used:] = float("nan")
        meta.block_tables.zero_()
        meta.block_tables[:, :new.meta.block_tables.shape[1]] = new.meta.block_tables
        static_out.fill_(float("nan"))
        graph.replay()
        assert_attention_close(static_out, reference(new, scale, None), new, 1e-2)


@gpu
@needs_cuda
def test_gpu_fused_ops_bf16() -> None:
    x = torch.randn(513, 4096, device=DEVICE, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=res)
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(out, ref_out, rtol=1.6e-2, atol=1e-2)

    gate_up = torch.randn(513, 2 * 11008, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), rtol=1.6e-2, atol=1e-2)

    q = torch.randn(513, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(513, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, 32768, (513,), device=DEVICE)
    cache = rope_cache(128, 32768, 1e6)
    ref_q, ref_k = apply_rotary_emb_ref(q, k, positions, cache)
    apply_rotary_emb(q, k, positions, cache)
    torch.testing.assert_close(q, ref_q, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(k, ref_k, rtol=1.6e-2, atol=2e-2)


# ----------------------------------------------------------------------------- whole model


@pytest.mark.skipif(CUDA, reason="test_gpu_engine.py covers the model on GPUs")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_triton_backend_model_matches_torch_backend(tiny_models, family: str) -> None:
    """The model on the Triton backend (rotary fused into the KV write, prefill and
    decode kernels) in the interpreter gives the PyTorch backend's greedy tokens."""
    from conftest import assert_all_blocks_free
    from orbitllm import LLM, SamplingParams
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 19)]
    tokens = {}
    for backend in ("torch", "triton"):
        with LLM(tiny_models[family], dtype="float32", num_kv_blocks=32, max_model_len=256,
                 attention_backend=backend, enforce_eager=True) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens[backend] = [o.outputs[0].token_ids for o in outs]
            assert_all_blocks_free(llm)
    assert tokens["triton"] == tokens["torch"]


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(3072, 4096), (4096, 2048), (28672, 4096), (4096, 14336), (4100, 1000)])
def test_gemv_bf16_shapes_of_an_8b_model(n: int, k: int) -> None:
    """Llama-8B's projections, whole and halved, plus a ragged one: within bf16
    rounding of a float32 product of the same bf16 inputs."""
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k ** 0.5
    ref = (x.float() @ w.float().t()).to(torch.bfloat16)
    torch.testing.assert_close(gemv(x, w), ref, rtol=1.6e-2, atol=1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 64])
def test_argmax_of_llama3_sized_logits(rows: int) -> None:
    """A 128,256-token vocabulary, float32 logits as the sampler holds them."""
    x = torch.randn(rows, 128256, device=DEVICE)
    x[0, [5, 128000]] = 50.0   # a tie across blocks: the first wins
    assert torch.equal(argmax(x), x.argmax(-1))


def test_gemv_sends_its_output_to_the_peers_as_packets() -> None:
    """Rank 1 of three: the GEMV's output also lands in ranks 0 and 2's packet buffers,
    each element with the coming call's epoch in the high half; its own is untouched."""
    world, rank, n, k, offset = 3, 1, 40, 64, 7
    x = torch.randn(1, k, device=DEVICE).half()
    w = (torch.randn(n, k, device=DEVICE) / 8).half()
    packets = [torch.zeros(offset + world * n, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    addrs = torch.tensor([p.data_ptr() for p in packets], dtype=torch.int64, device=DEVICE)
    epochs = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    out = gemv(x, w, send=PeerSend(addrs, offset, epochs, rank, world))
    bits = out[0].view(torch.int16).to(torch.int64) & 0xFFFF
    for p in (0, 2):
        assert torch.equal(packets[p][offset + rank * n:offset + (rank + 1) * n], (5 << 32) | bits)
        assert not packets[p][:offset + rank * n].any() and not packets[p][offset + (rank + 1) * n:].any()
    assert not packets[rank].any()


@pytest.mark.parametrize("calls", [1, 3])
def test_packet_all_reduce_between_two_simulated_ranks(calls: int, monkeypatch) -> None:
    """Both ranks of a world of two in one process, through the real protocol: each
    rank's GEMV writes its partial to its buffer and sends it to the other; each
    rank's fused all-reduce reads its own partial and the other's packets. Both get
    the reference's bits; over several calls the epochs advance. A wait that never
    passes (packets with the wrong epoch) gives up after a few polls here and reads
    stale values, so the comparison fails instead of hanging."""
    import orbitllm.kernels.peer_reduce as peer_reduce
    monkeypatch.setattr(peer_reduce, "MAX_POLLS", 50)
    world, hidden, k, slot = 2, 96, 64, 1
    bufs = [torch.zeros(2 * hidden, device=DEVICE).half() for _ in range(world)]
    flags = [torch.zeros(world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    packets = [torch.zeros(2 * world * hidden, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    addr = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEVICE)  # noqa: E731
    buf_addrs, flag_addrs, pk_addrs = addr(bufs), addr(flags), addr(packets)
    epochs = [torch.zeros(1, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    weight = torch.randn(hidden, device=DEVICE).half()
    for call in range(calls):
        xs = [torch.randn(1, k, device=DEVICE).half() for _ in range(world)]
        ws = [(torch.randn(hidden, k, device=DEVICE) / 8).half() for _ in range(world)]
        residual = torch.randn(1, hidden, device=DEVICE).half()
        for r in range(world):
            gemv(xs[r], ws[r], out=bufs[r][slot * hidden:(slot + 1) * hidden].view(1, hidden),
                 send=PeerSend(pk_addrs, slot * world * hidden, epochs[r], r, world))
        results = [peer_reduce_add_norm(buf_addrs.data_ptr(), flag_addrs.data_ptr(), epochs[r], r, world,
                                        slot * hidden, 1, residual, weight, 1e-6, pk_addrs.data_ptr(),
                                        slot * world * hidden) for r in range(world)]
        partials = [bufs[r][slot * hidden:(slot + 1) * hidden].view(1, hidden) for r in range(world)]
        ref_out, ref_res = peer_reduce_add_norm_ref(partials, residual, weight, 1e-6)
        for out, res in results:
            torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
            torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-3)
        assert torch.equal(results[0][0], results[1][0])
        assert [int(e) for e in epochs] == [call + 1] * world
    assert not any(f.any() for f in flags)   # the packet path never touches the flags


def test_packet_wait_ends_when_released() -> None:
    """A peer that never sends (its packets keep an old epoch): the wait ends once
    this rank's own flag holds RELEASED, as PeerAllReduce.release writes it."""
    world, rank, hidden = 2, 0, 32
    bufs = [torch.zeros(hidden, device=DEVICE).half() for _ in range(world)]
    flags = [torch.full((world,), RELEASED.value, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    packets = [torch.zeros(world * hidden, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    addr = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEVICE)  # noqa: E731
    buf_addrs, flag_addrs, pk_addrs = addr(bufs), addr(flags), addr(packets)
    residual = torch.randn(1, hidden, device=DEVICE).half()
    epochs = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    peer_reduce_add_norm(buf_addrs.data_ptr(), flag_addrs.data_ptr(), epochs, rank, world, 0, 1,
                         residual, torch.ones(hidden, device=DEVICE).half(), 1e-6,
                         pk_addrs.data_ptr(), 0)
    assert int(epochs) == 1
