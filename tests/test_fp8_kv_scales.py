"""FP8 KV cache with a checkpoint's KV scales (compressed-tensors ``kv_cache_scheme``):
the cache holds K / k_scale and V / v_scale per KV head, attention multiplies them back.

Kernels (Triton in the interpreter without CUDA) and the torch backend against float32
attention over the dequantized cache; a tiny Llama whose K and V are made large (> 448,
so that scale 1.0 saturates) by rescaling its projections, which leaves the model's
function unchanged, against the same weights with a float32 cache.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import assert_all_blocks_free  # noqa: E402
from orbitllm import LLM  # noqa: E402
from orbitllm.kernels import paged_decode_attention, paged_prefill_attention  # noqa: E402
from orbitllm.kernels import rotary_store_kv_cache, store_kv_cache  # noqa: E402
from orbitllm.layers.attention import TorchAttentionBackend, write_kv_cache  # noqa: E402
from orbitllm.layers.quantization.fp8_kernels import FP8_DTYPE  # noqa: E402
from orbitllm.models.errors import ModelLoadError  # noqa: E402
from test_fp8 import _prompt, _prompt_logprobs  # noqa: E402
from test_kernels import (DEVICE, FP32_REL, assert_attention_close, make_step,  # noqa: E402
                          poisoned_like, reference, rope_cache)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

# Powers of two, so that K/V that are E4M3 values times their scale are written exactly
# (the interpreter rounds some float32 -> E4M3 casts wrongly: see test_fp8._fp8_step).
SCALES = {"tensor": ([2.0 ** -3] * 2, [2.0 ** 2] * 2),
          "head": ([2.0 ** -4, 2.0 ** 3], [2.0 ** 2, 2.0 ** -5])}


def _scales(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(s, dtype=torch.float32, device=DEVICE) for s in SCALES[kind])


def _on_grid(shape, scale: torch.Tensor) -> torch.Tensor:
    """Random E4M3 values times each head's (dim -2) scale."""
    return torch.randn(shape, device=DEVICE).mul(4).to(FP8_DTYPE).float() * scale[:, None]


def _expected_cache(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale[:, None]).clamp(-448, 448).to(FP8_DTYPE)


# ----------------------------------------------------------------------------- KV write


@pytest.mark.parametrize("kind", ["tensor", "head"])
@pytest.mark.parametrize("rotary", [False, True], ids=["store", "rotary_store"])
def test_kv_write_divides_by_the_scales(kind, rotary):
    """Triton's writes (plain and with the rotary embedding, here at position 0: the
    identity) and the torch backend's store K / k_scale and V / v_scale per head,
    saturated at +-448."""
    ks, vs = _scales(kind)
    tokens, hq, hk, d, block_size, num_blocks = 10, 4, 2, 64, 16, 4
    k, v = _on_grid((tokens, hk, d), ks), _on_grid((tokens, hk, d), vs)
    k[1, :, 0], v[2, :, 3] = 1000 * ks, -1000 * vs   # 1000 * scale saturates
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::4] = -1
    caches = [torch.zeros(2, num_blocks, block_size, hk, d, dtype=FP8_DTYPE, device=DEVICE) for _ in range(2)]
    if rotary:
        q = torch.randn(tokens, hq, d, device=DEVICE)
        positions = torch.zeros(tokens, dtype=torch.long, device=DEVICE)
        rotary_store_kv_cache(q, k, v, caches[0][0], caches[0][1], slots, positions,
                              rope_cache(d, 4), kv_scales=(ks, vs))
    else:
        store_kv_cache(k, v, caches[0][0], caches[0][1], slots, (ks, vs))
    write_kv_cache(k, v, caches[1][0], caches[1][1], slots, (ks, vs))
    ok = slots >= 0
    for cache in caches:
        got_k, got_v = (c.view(-1, hk, d)[slots[ok]].view(torch.uint8) for c in cache)
        assert torch.equal(got_k, _expected_cache(k[ok], ks).view(torch.uint8))
        assert torch.equal(got_v, _expected_cache(v[ok], vs).view(torch.uint8))
        assert cache[0].view(-1, hk, d)[slots[1], :, 0].float().tolist() == [448.0, 448.0]
        assert cache[1].view(-1, hk, d)[slots[2], :, 3].float().tolist() == [-448.0, -448.0]


# ----------------------------------------------------------------------------- attention


def _scaled_step(query_lens: list[int], kind: str):
    """An E4M3 cache (context: random E4M3 values, i.e. K / k_scale) with new K/V on the
    scales' grid, and the float32 reference over the dequantized cache."""
    ks, vs = _scales(kind)
    step = make_step([70, 20, 40], query_lens, 8, 2, 64, 16)
    step.k_cache, step.v_cache = step.k_cache.to(FP8_DTYPE), step.v_cache.to(FP8_DTYPE)
    step.k, step.v = _on_grid(step.k.shape, ks), _on_grid(step.v.shape, vs)
    dequantized = replace(step, k_cache=step.k_cache.float() * ks[:, None],
                          v_cache=step.v_cache.float() * vs[:, None])
    return step, (ks, vs), reference(dequantized, 0.125, 30)


@pytest.mark.parametrize("kind", ["tensor", "head"])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 1, 12]], ids=["decode", "prefill"])
def test_attention_over_a_scaled_fp8_cache(kind, query_lens):
    """Both Triton kernels (decode with and without splits) and the torch backend equal
    float32 attention over the cache dequantized with its scales."""
    step, scales, ref = _scaled_step(query_lens, kind)
    k_torch, v_torch = step.k_cache.clone(), step.v_cache.clone()
    out = TorchAttentionBackend().forward(step.q, step.k, step.v, k_torch, v_torch,
                                          step.meta, 0.125, 30, scales)
    assert_attention_close(out, ref, step, FP32_REL)
    store_kv_cache(step.k, step.v, step.k_cache, step.v_cache, step.meta.slot_mapping, scales)
    assert torch.equal(step.k_cache.view(torch.uint8), k_torch.view(torch.uint8))
    m = step.meta
    if m.max_query_len == 1:
        for splits in (1, 3):
            out = poisoned_like(step.q)
            paged_decode_attention(step.q, step.k_cache, step.v_cache, m.query_start_loc, m.seq_lens,
                                   m.block_tables, m.max_seq_len, 0.125, 30, num_splits=splits,
                                   out=out, kv_scales=scales)
            assert_attention_close(out, ref, step, FP32_REL)
    else:
        out = poisoned_like(step.q)
        paged_prefill_attention(step.q, step.k_cache, step.v_cache, m.query_start_loc, m.seq_lens,
                                m.block_tables, m.max_query_len, 0.125, 30, out=out, kv_scales=scales)
        assert_attention_close(out, ref, step, FP32_REL)


# ----------------------------------------------------------------------------- checkpoints

# Per layer (and per KV head): how much larger the checkpoint's K and V are made. The
# tiny Llama's K/V stay below KV_BOUND (about 7 after the rotary embedding), so 400x
# saturates at scale 1.0 and 1/16 falls towards E4M3's subnormals at a 400x head's scale.
GAIN = {"tensor": {"k": [[400, 400], [1 / 16, 1 / 16]], "v": [[1 / 16, 1 / 16], [400, 400]]},
        "head": {"k": [[400, 1 / 16], [1 / 16, 400]], "v": [[1 / 16, 400], [400, 1 / 16]]}}
KV_BOUND = 10.0
SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
HEAD_DIM, GROUP = 16, 2   # the tiny Llama's (conftest.tiny_config)


def _write_scaled_llama(src: str, dst: Path, kind: str | None, gain: dict) -> str:
    """``src`` with K and V multiplied per layer and KV head by ``gain`` and the queries /
    o_proj divided by it (the same model); with ``kind``, a ``kv_cache_scheme`` of that
    strategy and ``k_scale`` / ``v_scale`` = gain * KV_BOUND / 448 (per tensor: shape ()
    for layer 0, (1,) for layer 1, as checkpoints write either)."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(Path(src) / "model.safetensors"))
    for layer, (gk, gv) in enumerate(zip(gain["k"], gain["v"])):
        pre = f"model.layers.{layer}.self_attn."
        gk, gv = torch.tensor(gk), torch.tensor(gv)
        per_row = lambda g, group: g.repeat_interleave(group * HEAD_DIM)[:, None]  # noqa: E731
        tensors[pre + "k_proj.weight"] *= per_row(gk, 1)
        tensors[pre + "q_proj.weight"] /= per_row(gk, GROUP)
        tensors[pre + "v_proj.weight"] *= per_row(gv, 1)
        tensors[pre + "o_proj.weight"] /= per_row(gv, GROUP).T
        if kind is not None:
            for name, g in (("k_scale", gk), ("v_scale", gv)):
                scale = (g * KV_BOUND / 448).float()
                tensors[pre + name] = scale if kind == "head" else scale[0].reshape((1,) * layer)
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    if kind is not None:
        config = json.loads((dst / "config.json").read_text())
        strategy = {"head": "attn_head", "tensor": "tensor"}[kind]
        config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {},
                                         "kv_cache_scheme": {**SCHEME, "strategy": strategy}}
        (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def scaled_llamas(tiny_models, tmp_path_factory):
    """kind -> (checkpoint with KV scales, the same weights without them)."""
    root = tmp_path_factory.mktemp("kvscale")
    src = tiny_models["llama"]
    return {kind: (_write_scaled_llama(src, root / kind, kind, GAIN[kind]),
                   _write_scaled_llama(src, root / f"{kind}-plain", None, GAIN[kind]))
            for kind in GAIN}


@pytest.mark.parametrize("kind", ["tensor", "head"])
def test_checkpoint_kv_scales_keep_large_kv_accurate(scaled_llamas, kind):
    """With kv_cache_dtype='fp8' the scaled checkpoint is as close to its float32-cache run
    as an FP8 cache of K/V in range is; without its scales (scale 1.0) the large K/V
    saturate and the small ones round away. kv_cache_dtype='auto' ignores the scales."""
    scaled, plain = scaled_llamas[kind]
    prompt = _prompt()
    want = _prompt_logprobs(LLM(plain, dtype="float32", num_kv_blocks=16), prompt)
    llm = LLM(scaled, dtype="float32", num_kv_blocks=16, kv_cache_dtype="fp8")
    attn = llm.engine.runner.model.layers[1].self_attn.attn
    assert attn.k_scale.dtype == torch.float32 and attn.k_scale.shape == (2,)
    got = _prompt_logprobs(llm, prompt)
    assert_all_blocks_free(llm)
    assert (got - want).abs().max() < 0.1   # 0.038 here
    unscaled = _prompt_logprobs(LLM(plain, dtype="float32", num_kv_blocks=16, kv_cache_dtype="fp8"), prompt)
    assert (unscaled - want).abs().max() > 0.4   # 0.6 / 0.7 here
    ignored = _prompt_logprobs(LLM(scaled, dtype="float32", num_kv_blocks=16), prompt)
    torch.testing.assert_close(ignored, want, rtol=0, atol=1e-4)


def test_per_head_kv_scales_over_two_ranks(scaled_llamas):
    """Tensor parallelism (gloo): each rank takes its KV head's scales."""
    scaled, _ = scaled_llamas["head"]
    prompt = _prompt()
    kw = {"dtype": "float32", "num_kv_blocks": 16, "kv_cache_dtype": "fp8"}
    want = _prompt_logprobs(LLM(scaled, **kw), prompt)
    with LLM(scaled, tensor_parallel_size=2, **kw) as two:
        got = _prompt_logprobs(two, prompt)
        assert_all_blocks_free(two)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- bad input


def _edit(path: str, dst: Path, drop: str | None = None, scheme: dict | None = None) -> str:
    from safetensors.torch import load_file, save_file
    shutil.copytree(path, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"].update(scheme or {})
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize("change", [{"dynamic": True}, {"num_bits": 4}, {"type": "int"},
                                    {"strategy": "channel"}, {"symmetric": False}])
def test_unsupported_kv_cache_scheme_is_named(scaled_llamas, tmp_path, change):
    bad = _edit(scaled_llamas["head"][0], tmp_path / "bad", scheme=change)
    key, value = next(iter(change.items()))
    words = rf'kv_cache_scheme .*"{key}": {json.dumps(value)}.* is not supported'
    with pytest.raises(ValueError, match=words):
        LLM(bad, num_kv_blocks=8, kv_cache_dtype="fp8")


def test_missing_kv_scale_tensor_is_named(scaled_llamas, tmp_path):
    bad = _edit(scaled_llamas["head"][0], tmp_path / "bad", drop="model.layers.1.self_attn.v_scale")
    with pytest.raises(ModelLoadError, match=r"lacks weights for \['layers.1.self_attn.v_scale'\]"):
        LLM(bad, num_kv_blocks=8, kv_cache_dtype="fp8")


@pytest.mark.parametrize("value,words", [(torch.ones(3), r"has shape \(3,\), expected \(2,\)"),
                                         (torch.tensor([0.5, 0.0]), r"must be positive and finite")])
def test_bad_kv_scale_tensor_is_named(scaled_llamas, tmp_path, value, words):
    from safetensors.torch import load_file, save_file
    bad = _edit(scaled_llamas["head"][0], tmp_path / "bad")
    tensors = load_file(str(Path(bad) / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = value
    save_file(tensors, str(Path(bad) / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.self_attn.k_scale' " + words):
        LLM(bad, num_kv_blocks=8, kv_cache_dtype="fp8")
