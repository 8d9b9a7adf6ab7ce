"""The engine: add requests, step (schedule -> run -> postprocess), read outputs.

One step reads top to bottom: the scheduler picks requests and token counts,
the model runner computes them and samples, and postprocessing appends tokens,
detokenizes, checks stop conditions and frees finished requests' blocks. The
runner sees plain step data (``step_data``); the engine keeps each in-flight
step's Requests beside it to map the runner's results back by request id.
"""
from __future__ import annotations

import collections
import gc
import logging
import time
from dataclasses import dataclass, field, replace

from orbitllm.config import EngineConfig
from orbitllm.engine.detokenizer import IncrementalDetokenizer
from orbitllm.engine.request import PoolingRequest, Request, RequestStatus
from orbitllm.engine.scheduler import Scheduler
from orbitllm.engine.step_data import FatalStepError, RequestFault, SchedulerOutput
from orbitllm.engine.structured_output import StructuredOutputs, bad_words_token_ids
from orbitllm.executor.model_runner import LaunchedStep, ModelRunner, StepResult
from orbitllm.executor.setup import EngineParts, build_engine_parts
from orbitllm.outputs import CompletionOutput, Logprob, PoolingRequestOutput, RequestOutput
from orbitllm.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, check_text
from orbitllm.spec.adaptive import PROBE_EVERY, AdaptiveDraftLength
from orbitllm.spec.draft_model import DraftModelProposer, DraftSeq
from orbitllm.spec.ngram import NgramProposer
from orbitllm.spec.stats import SpecDecodeStats

log = logging.getLogger(__name__)

POOLING_TYPES = ("last", "mean")


@dataclass
class _InFlight:
    """A launched step: its plain data, the engine's Requests in the same order, and
    the runner's handle on the device work."""

    sched: SchedulerOutput
    requests: list[Request]
    launched: LaunchedStep


@dataclass
class _Group:
    """One user request: the prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    final_only: bool = False     # report only when finished (offline runs skip per-step copies)
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        parts = parts or build_engine_parts(config)
        self.tokenizer = parts.tokenizer
        self.runner: ModelRunner = parts.runner
        self.kv = parts.kv
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = self.runner.eos_token_ids
        self.vocab_size = self.runner.model.spec.vocab_size
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, parts.max_num_batched_tokens,
                                   self.max_model_len)
        # Overlap: schedule and launch step n+1 before reading step n's tokens (GPU only;
        # on CPU the "device" is this thread, so there is nothing to overlap with).
        self.overlap = config.async_scheduling and self.runner.device.type == "cuda"
        self._inflight: _InFlight | None = None
        # The step in flight's result, read inside launch for late grammar masks.
        self._read_ahead: tuple[_InFlight, StepResult] | None = None
        self._suspects: collections.deque[str] = collections.deque()   # to run alone, in turn
        self._groups: dict[str, _Group] = {}
        self._child_group: dict[str, _Group] = {}
        self._fork_pending: dict[str, list[Request]] = {}   # first sequence -> the n - 1 to fork
        self._keep: set[str] = set()                        # requests whose blocks outlive them
        self._kept: dict[str, Request] = {}                 # ... finished, blocks still held
        self._pooling: dict[str, PoolingRequest] = {}       # embedding requests in flight
        self.last_scheduled: SchedulerOutput | None = None   # the last step's, for stats
        spec = config.speculative_config
        self.proposer: NgramProposer | DraftModelProposer | None = None
        if spec is not None:
            self.proposer = (self.runner.draft if spec.method == "draft_model" else
                             NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max))
        self.spec_stats = SpecDecodeStats()
        self._spec_steps = 0   # the clock of the adaptive draft lengths' probes
        # Everything built so far (model, tokenizer, imported modules) lives as long as
        # the engine: out of the collector's sight, a step's short-lived objects no
        # longer make it rescan them (full collections cost whole milliseconds a step).
        gc.collect()
        gc.freeze()

    # ---- requests in -------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams | None = None, priority: int = 0,
                    cache_salt: str | None = None, final_only: bool = False,
                    fork_from: str | None = None, keep_blocks: bool = False) -> None:
        """Validate and queue a request; raises ValueError naming the bad field.

        ``keep_blocks``: when the request finishes its KV blocks stay held (until
        ``release_blocks``), so that later requests can ``fork_from`` it: they share its
        blocks of their common prefix instead of computing it (beam search)."""
        params = params or SamplingParams()
        if request_id in self._groups or request_id in self._kept:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if (fork_from is not None or keep_blocks) and params.n != 1:
            raise ValueError("n: fork_from and keep_blocks need n == 1")
        if fork_from is not None and fork_from not in self._kept:
            raise ValueError(f"fork_from: {fork_from!r} is not a finished request with kept blocks")
        self.check_params(params, priority)
        text, ids = self.tokenize(prompt)
        if params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens:
            text, ids = None, params.truncate(ids)
        self._validate(ids, params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(ids))
        if params.bad_words:
            params = replace(params)
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
            self._check_ids("bad_words", [t for w in params.bad_words_token_ids for t in w])
        # Compiled before admission (a cache hit when the server compiled it already).
        grammar = (self.structured.compile(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        children, detoks = [], []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else (params.seed if i == 0 else params.seed * 7919 + i)
            child = Request(child_id, ids, params, priority=priority, cache_salt=cache_salt,
                            seed=seed)
            if grammar is not None:
                child.grammar = self.structured.start(grammar)
            if self.proposer is not None and grammar is None:   # a grammar: one token a step
                child.draft_length = AdaptiveDraftLength(
                    self.config.speculative_config.num_speculative_tokens)
            children.append(child)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                                 params.stop_strings,
                                                 params.include_stop_str_in_output,
                                                 params.spaces_between_special_tokens))
        group = _Group(request_id, text, ids, children, detoks, final_only)
        self._groups[request_id] = group
        for child in children:
            self._child_group[child.request_id] = group
        first = children[0]
        if fork_from is not None:
            first.num_computed_tokens = self._fork_from_kept(self._kept[fork_from], first)
        if keep_blocks:
            self._keep.add(request_id)
        self.scheduler.add(first)
        if params.n > 1:
            # The other n - 1 sequences fork from the first once its prompt is computed,
            # so the prompt is computed once, with or without the prefix cache.
            self._fork_pending[first.request_id] = children[1:]

    def add_pooling_request(self, request_id: str, prompt: str | list[int] | dict,
                            pooling: str = "last") -> None:
        """Queue an embedding request: its prompt's final hidden states (after the final
        norm), pooled at the ``last`` token or by their ``mean``, L2-normalized. It
        samples nothing; its blocks are freed once the prompt is computed."""
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling: must be one of {list(POOLING_TYPES)}, got {pooling!r}")
        if request_id in self._groups or request_id in self._pooling or request_id in self._kept:
            raise ValueError(f"request_id: {request_id!r} is already running")
        _, ids = self.tokenize(prompt)
        params = SamplingParams(max_tokens=1)
        self._validate(ids, params)
        req = PoolingRequest(request_id, ids, params, pooling=pooling)
        self._pooling[request_id] = req
        self.scheduler.add(req)

    def _pooled(self, chunks: dict) -> list[PoolingRequestOutput]:
        """Fold a step's pooled chunks into their requests; the finished ones' outputs."""
        outputs = []
        for rid, chunk in chunks.items():
            req = self._pooling.get(rid)
            if req is None or req.is_finished:
                continue
            restart = chunk.start == 0 or req.pooled_total is None   # first chunk, or recomputed
            req.pooled_total = chunk.total if restart else req.pooled_total + chunk.total
            req.pooled_last = chunk.last
            if chunk.start + chunk.count < req.num_prompt_tokens:
                continue
            vec = req.pooled_total / req.num_prompt_tokens if req.pooling == "mean" else req.pooled_last
            vec = vec / vec.norm().clamp_min(1e-12)
            self._finish(req, "stop")
            del self._pooling[rid]
            outputs.append(PoolingRequestOutput(rid, req.prompt_token_ids, vec.tolist()))
        return outputs

    def _fork_from_kept(self, parent: Request, child: Request) -> int:
        """Share the kept parent's blocks of the prefix both have; returns the tokens shared.
        The child computes at least its last token (its logits)."""
        known = parent.token_range(0, parent.num_computed_tokens)
        ids = child.prompt_token_ids
        limit = min(len(known), len(ids) - 1)
        common = 0
        while common < limit and known[common] == ids[common]:
            common += 1
        return self.kv.fork(parent, child, common)

    def _fork_prompts(self, requests: list[Request]) -> None:
        """After a step is launched: the n > 1 requests whose prompt it completes hand their
        blocks to their other sequences (the step's KV writes come before any later read)."""
        for req in requests:
            children = self._fork_pending.get(req.request_id)
            if children is None or req.num_computed_tokens < req.num_prompt_tokens:
                continue
            del self._fork_pending[req.request_id]
            for child in children:
                if not child.is_finished:
                    child.num_computed_tokens = self.kv.fork(req, child, req.num_prompt_tokens - 1)
                    self.scheduler.add(child)

    def release_blocks(self, request_id: str) -> None:
        """Free the blocks a finished ``keep_blocks`` request still holds."""
        self._keep.discard(request_id)
        req = self._kept.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt as ``add_request`` reads it: its text (if any) and its token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer; pass prompt_token_ids")
            check_text("prompt", prompt)
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt: expected a string, token ids or a dict, got {type(prompt).__name__}")

    def check_params(self, params: SamplingParams, priority: int = 0) -> None:
        """What ``SamplingParams`` cannot check alone (it does not know the model):
        raises ValueError naming the field. Cheap and thread-safe, so the server runs
        it before it builds anything per choice."""
        if params.n > self.config.max_n:
            raise ValueError(f"n: at most {self.config.max_n} choices per request (max_n), got {params.n}")
        if isinstance(priority, bool) or not isinstance(priority, int) or not INT64_MIN <= priority <= INT64_MAX:
            raise ValueError(f"priority: must be an integer that fits in 64 bits, got {priority!r}")
        if priority and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority: {priority} asked for, but the engine schedules first come, "
                             "first served (start it with scheduling_policy='priority')")
        self._check_ids("stop_token_ids", params.stop_token_ids)
        if params.masks_logits:
            self._check_ids("logit_bias", params.logit_bias or ())
            self._check_ids("allowed_token_ids", params.allowed_token_ids or ())
            if (params.bad_words or params.structured_outputs is not None) and self.tokenizer is None:
                raise ValueError("bad_words: needs a tokenizer, and this engine has none"
                                 if params.bad_words else
                                 "structured_outputs: needs a tokenizer, and this engine has none")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > self.vocab_size:
                raise ValueError(f"{name}: {n} exceeds the vocabulary size {self.vocab_size}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")

    def _check_ids(self, name: str, ids) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                             "(the prompt must leave room for at least one generated token)")
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: {bad!r} is outside the vocabulary (0..{self.vocab_size - 1})")

    def abort_request(self, request_id: str) -> None:
        pooling = self._pooling.pop(request_id, None) if self._pooling else None
        if pooling is not None:
            self._finish(pooling, "abort")
            return
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self._child_group.pop(child.request_id, None)
            if not child.is_finished:
                self._finish(child, "abort")

    # ---- the step ----------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns outputs of the requests that progressed.

        With overlap, this schedules and launches step n+1, then reads back and
        postprocesses step n while the device runs n+1. Requests that need their
        latest token on the host (penalties, prompt logprobs) drain the pipeline first.
        """
        if self._suspects and self._inflight is not None:
            return self._drain()   # a solo step must not overlap the step before
        only = self._next_suspect()
        outputs: list[RequestOutput] = []
        if self.proposer is not None:
            outputs += self._propose()
        schedule = self.scheduler.schedule(only)
        if schedule.is_empty:
            self.last_scheduled = SchedulerOutput()
            return outputs + self._drain()
        if self._inflight is not None and schedule.needs_host_tokens:
            outputs += self._drain()
        # Built after any drain: it copies the tokens the host knows now.
        sched = self.last_scheduled = schedule.step_data()
        if self._pooling:
            sched.pooling = [i for i, r in enumerate(schedule.requests) if r.request_id in self._pooling]
        if self.structured.num_active:
            self._attach_bitmasks(sched, schedule.requests)
        prev = self._inflight.launched if self._inflight is not None else None
        try:
            launched = self.runner.launch(sched, prev)
        except FatalStepError:
            raise
        except Exception as e:
            self.runner.check_device(e)
            if only is not None:
                self._suspects.popleft()
            return outputs + self._drain() + self._step_failed(schedule.requests, e, only is not None)
        if only is not None:
            self._suspects.popleft()   # it runs fine alone
        now = time.monotonic()
        for s, req in zip(sched.scheduled, schedule.requests):
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.num_computed_tokens += s.num_new_tokens
            req.num_pending += s.num_sampled
        if self._fork_pending:
            self._fork_prompts(schedule.requests)
        outputs += self._drain()
        self._inflight = _InFlight(sched, schedule.requests, launched)
        if not self.overlap:
            outputs += self._drain()
        return outputs

    def _attach_bitmasks(self, sched: SchedulerOutput, requests: list[Request]) -> None:
        """Give constrained sequences their grammar masks. With no step in flight the
        grammars are current; with one, the masks wait for its tokens: the runner asks
        for them after queuing this step's forward. Then the step in flight is read back
        and only the constrained sequences' grammars take its tokens (early); the rest
        of its postprocessing runs after the launch, as always, so every request keeps
        the overlap."""
        pairs = self.structured.sampled_rows(sched.scheduled, requests)
        sched.num_constrained = len(pairs)
        if self._inflight is None or not pairs:
            if pairs:
                masks = self.structured.next_bitmasks([r.grammar for _, r in pairs])
                for (s, _), mask in zip(pairs, masks):
                    s.token_bitmask = mask
            return
        inflight = self._inflight

        def late_bitmasks() -> dict:
            result = self.runner.finish(inflight.launched)
            self._read_ahead = (inflight, result)
            grammars, tokens = [], []
            for _, r in pairs:
                for token in result.sampled.get(r.request_id, ()):
                    grammars.append(r.grammar)
                    tokens.append(token)
            self.structured.accept_early(grammars, tokens)
            # A grammar complete with this token ends its request: the row is discarded.
            live = [(s, r) for s, r in pairs if not r.grammar.is_terminated]
            if not live:
                return {}
            masks = self.structured.next_bitmasks([r.grammar for _, r in live])
            return {s.request_id: mask for (s, _), mask in zip(live, masks)}

        sched.late_bitmasks = late_bitmasks

    # ---- speculative decoding ----------------------------------------------------
    def _propose(self) -> list[RequestOutput]:
        """Drafts for this step's decoding requests. Proposals read the latest tokens
        and a verify step's outcome moves the request back, so verify steps do not
        overlap: the step in flight is drained first whenever one is involved (a
        request whose draft length adapted down to 0 keeps overlapping)."""
        running = self.scheduler.running
        self._spec_steps += 1
        probe = self._spec_steps % PROBE_EVERY == 0
        outputs = []
        if self._inflight is not None and (self._inflight.sched.drafts or probe or any(
                r.draft_length is not None and r.draft_length.k for r in running)):
            outputs = self._drain()
        asks: list[tuple[Request, int]] = []
        for req in running:
            req.spec_token_ids = []
            if req.num_pending or req.num_computed_tokens != req.num_tokens - 1:
                continue   # a prompt chunk still to go, or its last token not on the host
            if req.draft_length is None:
                continue   # an embedding, or a grammar-constrained request: never speculates
            k = req.draft_length.next_k(probe)
            if not k:
                continue
            room = min(req.params.max_tokens - req.num_output_tokens - 1,
                       self.max_model_len - req.num_tokens)
            if room > 0:
                asks.append((req, min(k, room)))
        if isinstance(self.proposer, DraftModelProposer):
            self._propose_with_draft(asks)
            return outputs
        for req, k in asks:
            req.spec_token_ids = drafts = self.proposer.propose(req.all_token_ids, k)
            if not drafts:   # nothing to propose counts as a miss: stop asking so often
                req.draft_length.update(k, 0)
        return outputs

    def _propose_with_draft(self, asks: list[tuple[Request, int]]) -> None:
        """One draft-model round for every asking request. The verify step's slots (the
        last token and k drafts) are reserved first, since the draft writes its KV of
        the same positions; a request whose slots do not fit proposes nothing this step
        (not a miss: the pool was full, not the draft wrong). The round's catch-up
        tokens share the step's token budget (``max_num_batched_tokens``): a request
        whose catch-up does not fit catches up one chunk (k = 0) and proposes in a later
        step, so many long prompts never make one huge draft forward."""
        draft = self.proposer
        budget = self.scheduler.max_num_batched_tokens
        seqs, reqs, ends = [], [], []
        for req, k in asks:
            k = min(k, draft.room(req.num_tokens))
            start = min(req.draft_computed, req.num_tokens - 1)
            if k <= 0 or budget <= 0:
                continue
            end = req.num_tokens
            if end - start > budget:   # a chunk of positions below n, all computed already
                end, k = start + budget, 0
            elif not self.kv.reserve(req, k + 1):
                continue
            budget -= end - start
            seqs.append(DraftSeq(req.all_token_ids[:end], start, k, self.kv.block_ids(req.request_id)))
            reqs.append(req)
            ends.append(end)
        for req, end, drafts in zip(reqs, ends, draft.propose(seqs)):
            req.spec_token_ids = drafts
            req.draft_computed = end   # positions 0 .. end - 1 hold emitted tokens' KV

    def _verified(self, req: Request, num_proposed: int, num_emitted: int) -> None:
        """A verify step landed: the KV of its rejected drafts is stale, so the request's
        computed length moves back to just before the last emitted token."""
        num_accepted = num_emitted - 1
        req.num_computed_tokens -= num_proposed - num_accepted
        if isinstance(self.proposer, DraftModelProposer):
            # The draft wrote KV of its inputs d1 .. d(k-1) past position n: those of the
            # accepted drafts are emitted tokens' (the correction's position is not).
            req.draft_computed = min(req.draft_computed + num_proposed - 1, req.num_computed_tokens)
        req.draft_length.update(num_proposed, num_accepted)
        self.spec_stats.record(num_proposed, num_accepted)

    # ---- a step that fails -------------------------------------------------------
    def _step_failed(self, requests: list[Request], error: Exception,
                     solo: bool) -> list[RequestOutput]:
        """Fail only the requests the failure is tied to; the others lose nothing (their
        counters did not move, so the next step computes the same positions again).

        A ``RequestFault`` names its requests. Any other failure of a step with several
        requests is narrowed down first: each of them then runs one step alone
        (``_suspects``), and a request whose solo step fails is the one failed."""
        if isinstance(error, RequestFault):
            culprits = [r for r in requests if r.request_id in set(error.request_ids)]
        elif solo or len(requests) == 1:
            culprits = requests
        else:
            log.error("a step of %d requests failed (%s: %s); running each alone to find which",
                      len(requests), type(error).__name__, error)
            self._drop_unwritten_blocks(requests)
            self._suspects.extend(r.request_id for r in requests)
            return []
        log.error("failing request(s) %s: the step failed", [r.request_id for r in culprits],
                  exc_info=error)
        self._drop_unwritten_blocks(culprits)
        touched, failed = {}, []
        for req in culprits:
            if req.request_id in self._pooling:   # an embedding request: no group
                self._finish(self._pooling.pop(req.request_id), "error")
                failed.append(PoolingRequestOutput(req.request_id, req.prompt_token_ids, [],
                                                   finish_reason="error"))
                continue
            group = self._child_group.get(req.request_id)
            if group is not None and not req.is_finished:
                self._finish(req, "error")
                touched[group.request_id] = group
        return self._outputs(touched.values()) + failed

    def _drop_unwritten_blocks(self, failed: list[Request]) -> None:
        """Blocks that requests of a failed step were to fill are in the prefix cache
        already (registered at allocation), and another request may have taken them as
        cached. Their KV may never have been written, so such a request starts over."""
        bs = self.kv.block_size
        doomed = {b for r in failed for b in self.kv.forget_unwritten(r)}
        for req in list(self.scheduler.running):
            if doomed.intersection(self.kv.block_ids(req.request_id)[:req.num_computed_tokens // bs]):
                self.scheduler.preempt(req)

    def _next_suspect(self) -> str | None:
        """The request to run alone this step, while a failed step is narrowed down."""
        while self._suspects:
            rid = self._suspects[0]
            group = self._child_group.get(rid)
            req = (next((c for c in group.children if c.request_id == rid), None) if group
                   else self._pooling.get(rid))
            if req is not None and req in self.scheduler.running:
                return rid
            self._suspects.popleft()   # finished, aborted or preempted meanwhile
        return None

    def _drain(self) -> list[RequestOutput]:
        """Read back the step in flight (if any) and postprocess it."""
        if self._inflight is None:
            return []
        step, self._inflight = self._inflight, None
        ahead, self._read_ahead = self._read_ahead, None
        result = ahead[1] if ahead is not None and ahead[0] is step else self.runner.finish(step.launched)
        touched: dict[str, _Group] = {}
        now = time.monotonic()
        for s, req in zip(step.sched.scheduled, step.requests):
            req.num_pending -= s.num_sampled
            group = self._child_group.get(req.request_id)
            if group is None or req.is_finished:
                continue
            touched[group.request_id] = group
            drafts = s.draft_token_ids
            if drafts:
                self._verified(req, len(drafts), len(result.sampled[req.request_id]))
            try:
                self._postprocess(req, group, result, now)
            except Exception:   # one request's detokenizing or stop check: fail it alone
                log.exception("postprocessing request %s failed", req.request_id)
                if not req.is_finished:
                    self._finish(req, "error")
            if drafts and not req.is_finished:
                self.kv.trim(req)
        outputs = self._outputs(touched.values())
        if result.pooled:
            outputs += self._pooled(result.pooled)
        return outputs

    def _postprocess(self, req: Request, group: _Group, result, now: float) -> None:
        rid = req.request_id
        if rid in result.prompt_logprobs:
            self._add_prompt_logprobs(req, result.prompt_logprobs[rid])
        tokens = result.sampled.get(rid)
        if tokens is not None:
            logprobs = result.logprobs.get(rid)
            for k, token in enumerate(tokens):
                if req.is_finished:   # a stop among several tokens drops the rest
                    break
                self._append_token(req, group, token, logprobs[k] if logprobs else None, now)

    def _outputs(self, groups) -> list[RequestOutput]:
        """The outputs of the groups a step touched; finished groups are forgotten."""
        outputs = []
        for group in groups:
            finished = group.finished
            if finished or not group.final_only:
                outputs.append(self._make_output(group, finished))
            if finished:
                self._groups.pop(group.request_id, None)
                for c in group.children:
                    self._child_group.pop(c.request_id, None)
        return outputs

    def _append_token(self, req: Request, group: _Group, token: int, logprob: tuple | None,
                      now: float) -> None:
        """``logprob``: (the token's logprob, its rank, [(top id, top logprob), ...]), if asked."""
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        if logprob is not None:
            lp, rank, tops = logprob
            req.cumulative_logprob += lp
            entry = {tid: Logprob(l, r + 1, self._piece(tid)) for r, (tid, l) in enumerate(tops)}
            entry[token] = Logprob(lp, rank, self._piece(token))
            req.logprobs.append(entry)
        detok = group.detoks[group.children.index(req)]
        p = req.params
        stop_str = detok.add_token(token)
        if req.grammar is not None and stop_str is None and self._grammar_ended(req, token):
            detok.flush()
            return
        if stop_str is not None:
            req.stop_reason = stop_str
            self._finish(req, "stop")
        elif req.num_output_tokens >= p.min_tokens and token in p.stop_token_ids:
            req.stop_reason = token
            self._finish(req, "stop")
        elif not p.ignore_eos and token in self.eos_token_ids and req.num_output_tokens >= p.min_tokens:
            self._finish(req, "stop")
        elif (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens
              or req.num_known_tokens >= self.max_model_len):
            self._finish(req, "length")
        if req.is_finished and stop_str is None:
            detok.flush()

    def _grammar_ended(self, req: Request, token: int) -> bool:
        """Advance the grammar; True when it ended the request: it refused the token
        (an error: the mask should have made that impossible) or it is complete."""
        if not req.grammar.accept(token):
            log.error("request %s: the grammar refused token %d", req.request_id, token)
            self._finish(req, "error")
            return True
        if req.grammar.is_terminated and not (token in self.eos_token_ids and not req.params.ignore_eos):
            self._finish(req, "stop")   # complete without EOS (ignore_eos, or no EOS in the mask)
            return True
        return False

    def _add_prompt_logprobs(self, req: Request, rows) -> None:
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)   # the first prompt token has no logprob
        for tok, lp, rank, tops in rows:
            entry = {tid: Logprob(l, r + 1, self._piece(tid)) for r, (tid, l) in enumerate(tops)}
            entry[tok] = Logprob(lp, rank, self._piece(tok))
            req.prompt_logprobs.append(entry)

    def _piece(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _finish(self, req: Request, reason: str) -> None:
        if req.grammar is not None:
            req.grammar = None
            self.structured.stop()
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        keep = bool(self._keep) and req.request_id in self._keep
        self.scheduler.remove(req, free_blocks=not keep)
        if keep:
            self._kept[req.request_id] = req
        if self._fork_pending:   # its prompt never completed (aborted, failed): nor do they
            for child in self._fork_pending.pop(req.request_id, ()):
                if not child.is_finished:
                    self._finish(child, reason)

    def _make_output(self, group: _Group, finished: bool) -> RequestOutput:
        outs = []
        for i, (c, d) in enumerate(zip(group.children, group.detoks)):
            outs.append(CompletionOutput(
                index=i, text=d.text, token_ids=list(c.output_token_ids),
                cumulative_logprob=c.cumulative_logprob if c.params.logprobs is not None else None,
                logprobs=c.logprobs if c.params.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        first = group.children[0]
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids, outputs=outs, finished=finished,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_tokens,
            metrics={"arrival_time": group.arrival_time, "first_token_time": first.first_token_time,
                     "first_scheduled_time": first.first_scheduled_time})

    def detokenizers(self, request_id: str) -> list[IncrementalDetokenizer]:
        return self._groups[request_id].detoks if request_id in self._groups else []

    # ---- stats ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv.pool.num_blocks

    def kv_usage(self) -> float:
        return self.kv.usage

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now (otherwise at interpreter exit)."""
        self.runner.shutdown()


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return replace(params, max_tokens=max_tokens)
