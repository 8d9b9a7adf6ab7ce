"""Turns a SchedulerOutput into tensors, runs one forward pass and samples.

The runner owns the model, the KV cache tensors and the sampler. It makes no
scheduling decisions: which requests run and how many tokens each computes
arrive as plain data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from orbitllm.engine.request import Request
from orbitllm.engine.scheduler import SchedulerOutput
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
                 eos_token_ids: set[int]) -> None:
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

    @staticmethod
    def kv_bytes_per_block(spec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * elem

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        inputs = self._prepare(sched)
        hidden = self.model(inputs["input_ids"], inputs["positions"], self.kv_cache,
                            inputs["meta"], self.backend)
        result = StepResult()
        sample_rows, sample_reqs = inputs["sample_rows"], inputs["sample_reqs"]
        if sample_reqs:
            logits = self.model.compute_logits(hidden[sample_rows])
            batch = SamplingBatch.build(sample_reqs, logits.shape[-1], self.device, self.eos_token_ids)
            out = self.sampler(logits, batch)
            self._collect(result, sample_reqs, out)
        for req, rows, targets in inputs["prompt_logprob_rows"]:
            result.prompt_logprobs[req.request_id] = self._prompt_logprobs(req, hidden[rows], targets)
        return result

    def _prepare(self, sched: SchedulerOutput) -> dict:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        prompt_rows = []
        bs = self.block_size
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids += req.token_range(start, end)
            positions += range(start, end)
            blocks = s.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + s.num_new_tokens)
            seq_lens.append(end)
            if end == req.num_tokens:
                sample_rows.append(qsl[-1] - 1)
                sample_reqs.append(req)
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                last = min(end, req.num_prompt_tokens - 1)   # position j predicts token j + 1
                rows = list(range(qsl[-2], qsl[-2] + last - start))
                prompt_rows.append((req, rows, req.prompt_token_ids[start + 1:last + 1]))
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        table = torch.zeros((len(sched.scheduled), max_blocks), dtype=torch.int32)
        for i, s in enumerate(sched.scheduled):
            table[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table.to(dev),
            max_query_len=max(s.num_new_tokens for s in sched.scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.int64, device=dev),
            "positions": torch.tensor(positions, dtype=torch.int64, device=dev),
            "meta": meta,
            "sample_rows": torch.tensor(sample_rows, dtype=torch.int64, device=dev),
            "sample_reqs": sample_reqs,
            "prompt_logprob_rows": prompt_rows,
        }

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
