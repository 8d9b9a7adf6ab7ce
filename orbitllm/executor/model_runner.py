"""Turns a SchedulerOutput into tensors, runs one forward pass and samples.

The runner owns the model, the KV cache tensors and the sampler. It makes no
scheduling decisions: which requests run and how many tokens each computes
arrive as plain data.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from orbitllm.engine.request import Request
from orbitllm.engine.scheduler import SchedulerOutput
from orbitllm.executor.cuda_graph import DecodeGraphs
from orbitllm.layers.attention import AttentionMetadata, get_attention_backend
from orbitllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from orbitllm.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step produced, keyed by request id."""

    sampled: dict[str, int] = field(default_factory=dict)
    # request id -> (logprob of the token, rank, [(top id, top logprob), ...])
    logprobs: dict[str, tuple[float, int, list[tuple[int, float]]]] = field(default_factory=dict)
    # request id -> per prompt position: (token id, logprob, rank, top list)
    prompt_logprobs: dict[str, list[tuple[int, float, int, list[tuple[int, float]]]]] = field(
        default_factory=dict)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 num_kv_blocks: int, block_size: int, seed: int, attention_backend: str,
                 eos_token_ids: set[int], max_num_seqs: int, max_model_len: int,
                 enforce_eager: bool) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.backend = get_attention_backend(attention_backend, device)
        self.sampler = Sampler(seed, device)
        self.eos_token_ids = eos_token_ids
        spec = model.spec
        self.kv_cache = torch.zeros(spec.num_layers, 2, num_kv_blocks, block_size,
                                    spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not enforce_eager and getattr(self.backend, "supports_cuda_graphs", False):
            max_blocks = -(-max_model_len // block_size)
            self.graphs = DecodeGraphs(model, self.backend, self.kv_cache, max_num_seqs,
                                       max_blocks, max_model_len)
            self.graphs.capture()

    @staticmethod
    def kv_bytes_per_block(spec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * elem

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        inputs = self._prepare(sched)
        hidden = self._forward(inputs)
        result = StepResult()
        sample_reqs = inputs["sample_reqs"]
        if sample_reqs:
            logits = self.model.compute_logits(hidden[self._to_device(inputs["sample_rows"])])
            batch = SamplingBatch.build(sample_reqs, logits.shape[-1], self.device, self.eos_token_ids)
            out = self.sampler(logits, batch)
            self._collect(result, sample_reqs, out)
        for req, rows, targets in inputs["prompt_logprob_rows"]:
            result.prompt_logprobs[req.request_id] = self._prompt_logprobs(req, hidden[rows], targets)
        return result

    def _prepare(self, sched: SchedulerOutput) -> dict:
        """Flatten the step into host arrays (vectorized: the per-request work is a
        few list reads), then move them to the device in one pinned copy each."""
        scheduled = sched.scheduled
        B = len(scheduled)
        starts = np.fromiter((s.request.num_computed_tokens for s in scheduled), np.int64, B)
        qlens = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, B)
        ends = starts + qlens
        qsl = np.zeros(B + 1, np.int64)
        np.cumsum(qlens, out=qsl[1:])
        T = int(qsl[-1])
        decode_only = T == B
        if decode_only:
            input_ids = np.fromiter((s.request.token_range(st, st + 1)[0]
                                     for s, st in zip(scheduled, starts.tolist())), np.int64, B)
        else:
            input_ids = np.fromiter(itertools.chain.from_iterable(
                s.request.token_range(st, st + s.num_new_tokens)
                for s, st in zip(scheduled, starts.tolist())), np.int64, T)
        positions = np.repeat(starts - qsl[:-1], qlens) + np.arange(T)
        width = max(len(s.block_ids) for s in scheduled)
        table = np.zeros((B, width), np.int32)
        for i, s in enumerate(scheduled):
            table[i, :len(s.block_ids)] = s.block_ids
        rows = np.repeat(np.arange(B), qlens)
        bs = self.block_size
        slots = table[rows, positions // bs].astype(np.int64) * bs + positions % bs

        sample_mask = ends == np.fromiter((s.request.num_tokens for s in scheduled), np.int64, B)
        sample_idx = np.nonzero(sample_mask)[0]
        sample_reqs = [scheduled[i].request for i in sample_idx.tolist()]
        prompt_rows = []
        for i, s in enumerate(scheduled):
            req, start, end = s.request, int(starts[i]), int(ends[i])
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                last = min(end, req.num_prompt_tokens - 1)   # position j predicts token j + 1
                first_row = int(qsl[i])
                prompt_rows.append((req, list(range(first_row, first_row + last - start)),
                                    req.prompt_token_ids[start + 1:last + 1]))
        seq_lens = ends.astype(np.int32)
        return {
            "decode_only": decode_only, "num_seqs": B,
            "input_ids": input_ids, "positions": positions, "slots": slots,
            "qsl": qsl.astype(np.int32), "seq_lens": seq_lens, "block_tables": table,
            "max_query_len": int(qlens.max()), "max_seq_len": int(seq_lens.max()),
            "sample_rows": qsl[1:][sample_idx] - 1, "sample_reqs": sample_reqs,
            "prompt_logprob_rows": prompt_rows,
        }

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _forward(self, inputs: dict) -> torch.Tensor:
        n = inputs["num_seqs"]
        dev = self._to_device
        if self.graphs is not None and inputs["decode_only"] and self.graphs.padded_size(n):
            return self.graphs.run(n, dev(inputs["input_ids"]), dev(inputs["positions"]),
                                   dev(inputs["slots"]), dev(inputs["seq_lens"]),
                                   dev(inputs["block_tables"]))
        meta = AttentionMetadata(
            slot_mapping=dev(inputs["slots"]), query_start_loc=dev(inputs["qsl"]),
            seq_lens=dev(inputs["seq_lens"]), block_tables=dev(inputs["block_tables"]),
            max_query_len=inputs["max_query_len"], max_seq_len=inputs["max_seq_len"],
            query_start_loc_cpu=inputs["qsl"].tolist(), seq_lens_cpu=inputs["seq_lens"].tolist())
        return self.model(dev(inputs["input_ids"]), dev(inputs["positions"]), self.kv_cache,
                          meta, self.backend)

    def _collect(self, result: StepResult, reqs: list[Request], out: SamplerOutput) -> None:
        ids = out.token_ids.tolist()   # the one device -> host sync of the step
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.ranks.tolist() if out.ranks is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, req in enumerate(reqs):
            result.sampled[req.request_id] = ids[i]
            n = req.params.logprobs
            if n is not None and lps is not None:
                tops = list(zip(top_ids[i][:n], top_lps[i][:n])) if n > 0 else []
                result.logprobs[req.request_id] = (lps[i], ranks[i], tops)

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, targets: list[int]):
        logprobs = self.model.compute_logits(hidden).float().log_softmax(-1)
        tgt = torch.tensor(targets, device=self.device)
        chosen = logprobs.gather(1, tgt[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        n = req.params.prompt_logprobs
        top_lp, top_id = logprobs.topk(n, dim=-1) if n > 0 else (None, None)
        out = []
        for j, t in enumerate(targets):
            tops = list(zip(top_id[j].tolist(), top_lp[j].tolist())) if n > 0 else []
            out.append((t, chosen[j].item(), int(ranks[j]), tops))
        return out
