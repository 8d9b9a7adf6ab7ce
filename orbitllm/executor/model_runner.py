"""Turns a SchedulerOutput into tensors, runs one forward pass and samples.

The runner owns the model, the KV cache tensors and the sampler. It makes no
scheduling decisions: which requests run, how many tokens each computes and how
each is sampled arrive as plain data (``orbitllm.engine.step_data``), which
``prepare`` turns into the step's one input type, ``StepInputs``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from orbitllm.engine.step_data import FatalStepError, RequestFault, SchedulerOutput
from orbitllm.executor.cuda_graph import DecodeGraphs, ForwardOutput
from orbitllm.executor.step_inputs import PromptLogprobGroup, StepInputs
from orbitllm.layers.attention import AttentionMetadata, get_attention_backend
from orbitllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRows
from orbitllm.models.interface import CausalLM
from orbitllm.spec.rejection import num_accepted

if TYPE_CHECKING:
    from orbitllm.spec.draft_model import DraftModelProposer


@dataclass
class StepResult:
    """What one step produced, keyed by request id; a request sampled at several rows
    has their tokens (and logprobs) in row order."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    # request id -> per sampled token: (its logprob, its rank, [(top id, top logprob), ...])
    logprobs: dict[str, list[tuple[float, int, list[tuple[int, float]]]]] = field(
        default_factory=dict)
    # request id -> per prompt position: (token id, logprob, rank, top list)
    prompt_logprobs: dict[str, list[tuple[int, float, int, list[tuple[int, float]]]]] = field(
        default_factory=dict)
    # request id -> (first position, hidden-state sum over the step's rows, last row), on the host
    pooled: dict[str, "PooledChunk"] = field(default_factory=dict)


@dataclass
class PooledChunk:
    """A pooling sequence's part of one step: enough for last-token and mean pooling."""

    start: int              # the chunk's first position (0: the sequence starts over)
    count: int
    total: torch.Tensor     # [hidden] float32 sum of the chunk's final hidden states
    last: torch.Tensor      # [hidden] the chunk's last row


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampled rows, and where the result lands."""

    rows: SamplingRows | None                  # None: the step samples no row
    out: SamplerOutput | None = None
    host_ids: torch.Tensor | None = None       # sampled ids, copied back without blocking
    ready: torch.cuda.Event | None = None
    prompt_logprobs: dict = field(default_factory=dict)
    pooled: dict = field(default_factory=dict)
    drafts: dict[str, list[int]] = field(default_factory=dict)   # verify rows' proposals

    @functools.cached_property
    def rows_of(self) -> dict[str, range]:
        """Request id -> its rows among the sampled ids (a request's rows are adjacent)."""
        rows: dict[str, range] = {}
        for i, rid in enumerate(self.rows.request_ids if self.rows is not None else ()):
            r = rows.get(rid)
            rows[rid] = range(i, i + 1) if r is None else range(r.start, i + 1)
        return rows


class Staging:
    """Host -> device transfer of a step's small arrays: packed into one pinned
    buffer per call site and copied in one non-blocking transfer. Each site has two
    buffers used in turn, and a buffer is refilled only after its last copy is done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, int], tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._turns: dict[str, int] = {}

    def upload(self, arrays: list[np.ndarray], name: str) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        # Each array starts 16-byte aligned: Triton compiles a kernel variant per
        # pointer alignment, which would otherwise change with the arrays' lengths.
        align = 16 // arrays[0].itemsize
        offsets = [0]
        for a in arrays:
            offsets.append(offsets[-1] + -(-a.size // align) * align)
        total = offsets[-1]
        turn = self._turns[name] = self._turns.get(name, 1) ^ 1
        host, done = self._buffers.get((name, turn), (None, None))
        if host is None or host.numel() < total:
            host = torch.empty(max(total, 1 << 14) * 2, dtype=_TORCH_DTYPES[arrays[0].dtype.str],
                               pin_memory=True)
        elif done is not None:
            done.synchronize()
        view = host.numpy()
        for a, off in zip(arrays, offsets):
            view[off:off + a.size] = a.ravel()
        dev = host[:total].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[(name, turn)] = (host, event)
        return [dev[o:o + a.size].view(a.shape) for a, o in zip(arrays, offsets)]


_TORCH_DTYPES = {np.dtype(np.int64).str: torch.int64, np.dtype(np.int32).str: torch.int32,
                 np.dtype(np.float32).str: torch.float32}


@torch.inference_mode()
def compile_prefill_path(model: CausalLM, backend, kv_cache: torch.Tensor, T: int) -> None:
    """Run one dummy prefill of ``T`` tokens now, so its kernels compile at start-up
    rather than in the first request's step (seconds on a machine whose kernel cache is
    empty). Called on every tensor-parallel rank alike; slots of -1 write no KV."""
    if T < 2:
        return
    dev = kv_cache.device
    meta = AttentionMetadata(
        slot_mapping=torch.full((T,), -1, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor([0, T], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
        block_tables=torch.zeros((1, -(-T // kv_cache.shape[3])), dtype=torch.int32, device=dev),
        max_query_len=T, max_seq_len=T, query_start_loc_cpu=[0, T], seq_lens_cpu=[T])
    hidden = model(torch.zeros(T, dtype=torch.int64, device=dev), torch.arange(T, device=dev),
                   kv_cache, meta, backend)
    model.compute_logits(hidden[-1:])


class ModelRunner:
    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype,
                 num_kv_blocks: int, block_size: int, seed: int, attention_backend: str,
                 eos_token_ids: set[int], max_num_seqs: int, max_model_len: int,
                 enforce_eager: bool, kv_dtype: torch.dtype | None = None,
                 graph_query_lens: tuple[int, ...] = (1,),
                 draft: "DraftModelProposer | None" = None) -> None:
        """``kv_dtype``: the KV cache's (default: ``dtype``; E4M3 for an FP8 cache).
        ``graph_query_lens``: the query rows per sequence decode graphs are captured for.
        ``draft``: the draft model's proposer (speculative method draft_model), on the
        driver only; the engine calls it."""
        self.model = model
        self.draft = draft
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = max_model_len
        self.backend = get_attention_backend(attention_backend, device)
        self.sampler = Sampler(seed, device)
        self.eos_token_ids = eos_token_ids
        spec = model.spec
        self.kv_cache = torch.zeros(spec.num_layers, 2, num_kv_blocks, block_size,
                                    model.num_kv_heads, spec.head_dim, dtype=kv_dtype or dtype,
                                    device=device)
        self.staging = Staging(device)
        self._prev_tokens: torch.Tensor | None = None   # a worker's copy of the last sampled ids
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not enforce_eager and getattr(self.backend, "supports_cuda_graphs", False):
            max_blocks = -(-max_model_len // block_size)
            self.graphs = DecodeGraphs(model, self.backend, self.kv_cache, max_num_seqs,
                                       max_blocks, max_model_len, graph_query_lens)
            self.graphs.capture()
        if device.type == "cuda":
            compile_prefill_path(model, self.backend, self.kv_cache, min(2 * block_size, max_model_len))

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block in this process's cache (its shard's KV heads only)."""
        elem = torch.empty((), dtype=dtype).element_size()
        spec = model.spec
        return spec.num_layers * 2 * block_size * model.num_kv_heads * spec.head_dim * elem

    def shutdown(self) -> None:
        """Release the CUDA graphs (they hold the KV cache's and NCCL's resources) and
        the peers' mapped memory; DriverRunner also stops the workers."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.draft is not None:
            self.draft.release()
        if self.model.shard.peer_reduce is not None:
            self.model.shard.peer_reduce.close()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: "LaunchedStep | None" = None) -> "LaunchedStep":
        """Queue a step's forward pass and sampling on the device without waiting.

        Tokens still pending from ``prev`` (the step before, not yet read back) are
        fed to this step's input straight from ``prev``'s device tensor.
        """
        inputs = self.prepare(sched, prev)
        prev_tokens = prev.out.token_ids if inputs.pending_rows.size else None
        fwd, sample_rows = self._forward(inputs, prev_tokens)
        rows = inputs.sampling.rows
        if sched.late_bitmasks is not None:   # grammars that had to see the step in flight first
            masks = sched.late_bitmasks()
            rows.token_bitmasks = [masks.get(rid) for rid in rows.request_ids]
        step = LaunchedStep(rows if len(rows) else None, drafts=sched.drafts)
        if len(rows):
            logits, greedy_ids = self._sample_logits(fwd, sample_rows, len(rows))
            try:
                step.out = self._sample(logits, rows, greedy_ids)
            except Exception as e:
                # The workers wait for this step's ids: give them some, then name the rows.
                self.model.shard.broadcast(torch.zeros(len(rows), dtype=torch.int64, device=self.device))
                raise RequestFault(self._failing_rows(logits, rows), e) from e
            self.model.shard.broadcast(step.out.token_ids)   # for the workers' next step
            step.host_ids = step.out.token_ids
            if self.device.type == "cuda":
                step.host_ids = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
                step.host_ids.copy_(step.out.token_ids, non_blocking=True)
                step.ready = torch.cuda.Event()
                step.ready.record()
        if sched.pooling:
            step.pooled = self._pool(fwd.hidden, inputs.query_start_loc, sched)
        for group, hidden_rows in zip(inputs.sampling.prompt_logprobs, inputs.prompt_groups()):
            try:
                step.prompt_logprobs[group.request_id] = self._prompt_logprobs(group, fwd.hidden[hidden_rows])
            except Exception as e:
                raise RequestFault([group.request_id], e) from e
        return step

    def check_device(self, error: BaseException) -> None:
        """After a failed step: a device that cannot even synchronize is lost (CUDA
        errors of one kernel poison the whole context), and that is no request's fault."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as lost:
            raise FatalStepError(f"the device failed ({error}); the engine must be recreated") from lost

    def _sample(self, logits: torch.Tensor, rows: SamplingRows,
                greedy_ids: torch.Tensor | None) -> SamplerOutput:
        batch = SamplingBatch.build(rows, logits.shape[-1], self.device, self.eos_token_ids,
                                    self.staging.upload, self.sampler.rng)
        return self.sampler(logits, batch, greedy_ids)

    def _failing_rows(self, logits: torch.Tensor, rows: SamplingRows) -> list[str]:
        """After a batch failed to sample: the requests whose rows fail alone (all of the
        batch's if none does, as then the failure lies in how they combine). Rare, so
        the cost of one draw per row does not matter; the retried draws are discarded."""
        failing = []
        for i, rid in enumerate(rows.request_ids):
            try:
                self._sample(logits[i:i + 1], rows.subset([i]), None)
            except Exception:
                failing.append(rid)
        return sorted(set(failing or rows.request_ids))

    def _sample_logits(self, fwd: ForwardOutput, sample_rows: torch.Tensor,
                       num_sampled: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled rows' logits, and their argmax where the decode graph took it.
        A decode step's rows usually all sample; one holding a one-token prompt chunk
        does not, so then the graph's rows are picked out."""
        if fwd.logits is None:
            return self.model.compute_logits(fwd.hidden[sample_rows]), None
        if num_sampled == fwd.logits.shape[0]:
            return fwd.logits, fwd.greedy_ids
        return fwd.logits[sample_rows], fwd.greedy_ids[sample_rows]

    @torch.inference_mode()
    def mirror_step(self, inputs: StepInputs) -> None:
        """A tensor-parallel worker's half of the driver's ``launch``: the same forward
        and the same collectives in the same order (``compute_logits`` gathers land on
        the driver; the sampled ids come back, to fill the next step's pending tokens)."""
        fwd, sample_rows = self._forward(inputs, self._prev_tokens)
        self._prev_tokens = None
        if sample_rows.numel():
            self.model.compute_logits(fwd.hidden[sample_rows])
            self._prev_tokens = self.model.shard.broadcast(
                torch.empty(sample_rows.numel(), dtype=torch.int64, device=self.device))
        for rows in inputs.prompt_groups():
            self.model.compute_logits(fwd.hidden[rows])

    def finish(self, step: "LaunchedStep") -> StepResult:
        """Wait for a launched step and read its sampled tokens (the step's one sync)."""
        result = StepResult(prompt_logprobs=step.prompt_logprobs)
        if step.pooled:
            result.pooled = {rid: PooledChunk(c.start, c.count, c.total.cpu(), c.last.cpu())
                             for rid, c in step.pooled.items()}
        if step.rows is not None:
            if step.ready is not None:
                step.ready.synchronize()
            self._collect(result, step.rows, step.out, step.host_ids.tolist())
            if step.drafts:
                self._accept(result, step.drafts)
        return result

    @staticmethod
    def _accept(result: StepResult, drafts: dict[str, list[int]]) -> None:
        """Keep each verified sequence's tokens up to its first rejected draft, plus
        the target's own token there (the correction, or the bonus after all k)."""
        for rid, proposed in drafts.items():
            keep = num_accepted(result.sampled[rid], proposed) + 1
            del result.sampled[rid][keep:]
            if rid in result.logprobs:
                del result.logprobs[rid][keep:]

    def prepare(self, sched: SchedulerOutput, prev: "LaunchedStep | None" = None) -> StepInputs:
        """The step's inputs; ``prev``: the step in flight, whose sampled ids feed
        the inputs still pending."""
        return StepInputs.build(sched, self.block_size, prev.rows_of if prev is not None else None)

    def _forward(self, inputs: StepInputs,
                 prev_tokens: torch.Tensor | None) -> tuple[ForwardOutput, torch.Tensor]:
        """Upload the step's arrays (two copies in all) and run the model; returns its
        output and the device index of the rows to sample. ``prev_tokens``: the
        previous step's sampled ids, still on the device, for the rows in ``pending_rows``."""
        input_ids, positions, slots, sample_rows, pending_rows, pending_src = self.staging.upload(
            [inputs.input_ids, inputs.positions, inputs.slots, inputs.sample_rows,
             inputs.pending_rows, inputs.pending_src], "inputs_i64")
        if inputs.pending_rows.size:
            input_ids.index_copy_(0, pending_rows, prev_tokens[pending_src])
        qsl, seq_lens, tables = self.staging.upload(
            [inputs.query_start_loc, inputs.seq_lens, inputs.block_tables], "inputs_i32")
        n, q = inputs.num_seqs, inputs.uniform_query_len
        if self.graphs is not None and q is not None and self.graphs.fits(n, q):
            return self.graphs.run(n, q, input_ids, positions, slots, seq_lens, tables), sample_rows
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
            max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
            query_start_loc_cpu=inputs.query_start_loc.tolist(),
            seq_lens_cpu=inputs.seq_lens.tolist())
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        return ForwardOutput(hidden), sample_rows

    @staticmethod
    def _collect(result: StepResult, rows: SamplingRows, out: SamplerOutput,
                 ids: list[int]) -> None:
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.ranks.tolist() if out.ranks is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        sampled = result.sampled
        for i, rid in enumerate(rows.request_ids):
            sampled.setdefault(rid, []).append(ids[i])
            n = rows.params[i].logprobs
            if n is not None and lps is not None:
                tops = list(zip(top_ids[i][:n], top_lps[i][:n])) if n > 0 else []
                result.logprobs.setdefault(rid, []).append((lps[i], ranks[i], tops))

    @staticmethod
    def _pool(hidden: torch.Tensor, query_start_loc: np.ndarray,
              sched: SchedulerOutput) -> dict[str, PooledChunk]:
        """The pooling sequences' final hidden states (after the final norm), reduced on
        the device to what pooling needs; only steps that hold such a sequence pay."""
        out = {}
        for i in sched.pooling:
            s = sched.scheduled[i]
            rows = hidden[int(query_start_loc[i]):int(query_start_loc[i + 1])].float()
            out[s.request_id] = PooledChunk(s.num_computed_tokens, s.num_new_tokens,
                                            rows.sum(0), rows[-1])
        return out

    def _prompt_logprobs(self, group: PromptLogprobGroup, hidden: torch.Tensor):
        targets = group.targets
        logprobs = self.model.compute_logits(hidden).float().log_softmax(-1)
        tgt = torch.tensor(targets, device=self.device)
        chosen = logprobs.gather(1, tgt[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        n = group.num_top
        top_lp, top_id = logprobs.topk(n, dim=-1) if n > 0 else (None, None)
        out = []
        for j, t in enumerate(targets):
            tops = list(zip(top_id[j].tolist(), top_lp[j].tolist())) if n > 0 else []
            out.append((t, chosen[j].item(), int(ranks[j]), tops))
        return out

