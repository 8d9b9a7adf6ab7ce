"""Batched sampling on the device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

All rows are processed together. On the GPU, without top-k/top-p/min-p, one
kernel draws every row by the Gumbel-max trick (argmax of logits / T plus Gumbel
noise), its noise keyed by a seed per row: the request's own, else one drawn from
the sampler's generator. Otherwise the rows go through the exponential race (argmax
of p / E, E ~ Exp(1)) after the filters, drawing noise for each seeded row (one call
per such row, not per token). Both draw exactly from p.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from orbitllm.layers.fused import argmax, fused_ops_for
from orbitllm.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


@dataclass
class SamplingRows:
    """The sampled rows' settings as plain host lists, one entry per row (the runner
    lays them out from the step's scheduled requests; several rows may belong to one)."""

    request_ids: list[str]              # whose row it is: an error in a row names its request
    params: list[SamplingParams]
    seeds: list[int | None]             # the request's own seed (None: unseeded)
    output_index: list[int]             # the drawn token's place in its request's output
    histories: list[list[int] | None]   # prompt + output ids on rows with penalties, else None
    num_prompt_tokens: list[int]        # where each history's output part starts
    # Per row: the grammar's allowed tokens as a packed int32 bitmask ([ceil(V / 32)],
    # bit set: allowed), or None; the whole list is None when no row is constrained.
    token_bitmasks: list | None = None

    def __len__(self) -> int:
        return len(self.params)

    def subset(self, rows: list[int]) -> "SamplingRows":
        """These rows alone (to find which row of a failed batch fails by itself)."""
        return SamplingRows(*(None if (v := getattr(self, f.name)) is None else [v[i] for i in rows]
                              for f in fields(self)))


@dataclass
class LogitsMasks:
    """The per-row edits a few requests ask for, as device tensors (each None if no row
    asks): OpenAI's logit_bias, vLLM's allowed_token_ids, and grammar bitmasks."""

    bias: tuple | None = None          # (row idx, token idx, bias) added to the logits
    allowed: tuple | None = None       # (row idx [R], keep [R, V] bool): all else is -inf
    bitmask: tuple | None = None       # (packed int32 [B, ceil(V / 32)], constrained rows [C] int32)

    @classmethod
    def build(cls, rows: SamplingRows, masked: list[int], vocab_size: int,
              upload: Callable) -> "LogitsMasks":
        """``masked``: the rows whose params set ``masks_logits``."""
        ps = rows.params
        out = cls()
        bias = [(i, t, b) for i in masked if ps[i].logit_bias for t, b in ps[i].logit_bias.items()]
        if bias:
            r, t, b = zip(*bias)
            idx = upload([np.asarray(r, np.int64), np.asarray(t, np.int64)], "sampling_bias_idx")
            (vals,) = upload([np.asarray(b, np.float32)], "sampling_bias_f32")
            out.bias = (idx[0], idx[1], vals)
        allowed = [i for i in masked if ps[i].allowed_token_ids]
        if allowed:
            pairs = [(k, t) for k, i in enumerate(allowed) for t in ps[i].allowed_token_ids]
            local, cols, which = upload([np.asarray([k for k, _ in pairs], np.int64),
                                         np.asarray([t for _, t in pairs], np.int64),
                                         np.asarray(allowed, np.int64)], "sampling_allowed")
            keep = torch.zeros((len(allowed), vocab_size), dtype=torch.bool, device=local.device)
            keep[local, cols] = True
            out.allowed = (which, keep)
        if rows.token_bitmasks is not None:
            constrained = [i for i in masked if rows.token_bitmasks[i] is not None]
            if constrained:
                # One row per batch row (xgrammar's indices address both tensors); the
                # free rows' are never read, so they stay all-ones.
                width = np.asarray(rows.token_bitmasks[constrained[0]]).shape[-1]
                packed = np.full((len(rows), width), -1, np.int32)
                for i in constrained:
                    packed[i] = rows.token_bitmasks[i]
                packed_d, rows_d = upload([packed, np.asarray(constrained, np.int32)], "sampling_bitmask")
                out.bitmask = (packed_d, rows_d)
        return out

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits``: float32 [B, V], a tensor the sampler owns (edited in place)."""
        if self.bias is not None:
            logits.index_put_(self.bias[:2], self.bias[2], accumulate=True)
        if self.allowed is not None:
            which, keep = self.allowed
            logits[which] = logits[which].masked_fill(~keep, float("-inf"))
        if self.bitmask is not None:
            from xgrammar import apply_token_bitmask_inplace   # only constrained batches need it
            packed, rows = self.bitmask
            apply_token_bitmask_inplace(logits, packed, vocab_size=logits.shape[-1], indices=rows)
        return logits


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors, built from the step's SamplingRows."""

    temperature: torch.Tensor | None  # [B] float32, 0 on greedy rows; None if all greedy
    seeds: torch.Tensor | None        # [B] int64 noise seeds (the request's, else drawn); None if all greedy
    row_seeds: list[int | None]       # the requests' own seeds per step (None: unseeded or greedy)
    top_k: torch.Tensor | None        # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None        # [B] float32
    min_p: torch.Tensor | None        # [B] float32
    penalties: tuple | None           # (token ids [B, L] padded with -1, output mask [B, L], rep, pres, freq)
    banned: tuple | None              # (row idx, token idx) tensors: EOS/stop ids before min_tokens, bad words
    masks: LogitsMasks | None         # logit bias, allowed ids, grammar bitmasks (None: no row has any)
    num_logprobs: int                 # max top-N asked (-1: none)
    all_greedy: bool
    any_greedy: bool

    @property
    def filtered(self) -> bool:
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    @classmethod
    def build(cls, rows: SamplingRows, vocab_size: int, device: torch.device,
              eos_token_ids: set[int], upload: Callable | None = None,
              rng: np.random.Generator | None = None) -> "SamplingBatch":
        """``upload(arrays, name)`` moves host arrays to the device without a blocking
        copy (a pageable ``torch.tensor(..., device=cuda)`` would wait for the step
        in flight and undo the overlap). ``rng`` draws the noise seeds of rows that
        have none of their own (the sampler's, so a run repeats under the engine seed)."""
        upload = upload or (lambda arrays, name: [torch.from_numpy(a).to(device) for a in arrays])
        ps = rows.params
        greedy = np.fromiter((p.greedy for p in ps), bool, len(ps))
        masked = [i for i, p in enumerate(ps) if p.masks_logits]
        ban_rows, ban_cols = _banned(rows, eos_token_ids, masked)
        banned = None
        if ban_rows.size:
            banned = tuple(upload([ban_rows, ban_cols], "sampling_ban"))
        masks = LogitsMasks.build(rows, masked, vocab_size, upload) if masked else None
        penalties = None
        if any(h is not None and p.has_penalties for h, p in zip(rows.histories, ps)):
            penalties = _penalty_tensors(rows, device)
        nlp = max((p.logprobs for p in ps if p.logprobs is not None), default=-1)
        if greedy.all():   # nothing else to move to the device
            return cls(temperature=None, seeds=None, row_seeds=[None] * len(ps), top_k=None,
                       top_p=None, min_p=None, penalties=penalties, banned=banned, masks=masks,
                       num_logprobs=nlp, all_greedy=True, any_greedy=True)
        floats = np.empty((3, len(ps)), np.float32)   # temperature (0: greedy), top_p, min_p
        floats[0] = [0.0 if g else p.temperature for p, g in zip(ps, greedy)]
        floats[1] = [p.top_p for p in ps]
        floats[2] = [p.min_p for p in ps]
        top_k = np.fromiter((p.top_k if p.top_k > 0 else vocab_size for p in ps), np.int64, len(ps))
        # A seeded row's noise depends on its seed and its place in the output alone.
        row_seeds = [None if seed is None or p.greedy else (seed * 1_000_003 + k) & _MASK64
                     for seed, p, k in zip(rows.seeds, ps, rows.output_index)]
        rng = rng or np.random.default_rng()
        drawn = rng.integers(0, _MASK64, len(ps), dtype=np.int64)
        seeds = np.asarray([d if s is None else s for s, d in zip(row_seeds, drawn.tolist())], np.int64)
        (floats_d,) = upload([floats], "sampling_f32")
        top_k_d, seeds_d = upload([top_k, seeds], "sampling_i64")
        return cls(
            temperature=floats_d[0], seeds=seeds_d, row_seeds=row_seeds,
            top_k=top_k_d if any(p.top_k > 0 for p in ps) else None,
            top_p=floats_d[1] if any(p.top_p < 1 for p in ps) else None,
            min_p=floats_d[2] if any(p.min_p > 0 for p in ps) else None,
            penalties=penalties, banned=banned, masks=masks, num_logprobs=nlp, all_greedy=False,
            any_greedy=bool(greedy.any()))


def _penalty_tensors(rows: SamplingRows, device: torch.device) -> tuple:
    """Rows without a history get an empty one; their penalties are neutral anyway."""
    width = max(len(h) for h in rows.histories if h is not None)
    ids = torch.full((len(rows), width), -1, dtype=torch.int64)
    is_out = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (h, p) in enumerate(zip(rows.histories, rows.num_prompt_tokens)):
        if h is not None:
            ids[i, :len(h)] = torch.tensor(h, dtype=torch.int64)
            is_out[i, p:len(h)] = True
    ps = rows.params
    rep = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32)
    pres = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32)
    freq = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32)
    return tuple(t.to(device) for t in (ids, is_out, rep, pres, freq))


def _banned(rows: SamplingRows, eos_ids: set[int],
            masked: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) pairs masked out: EOS and stop ids of rows still under min_tokens,
    and bad words' last tokens where the output ends with the rest of the word."""
    ban_rows, cols = [], []
    for i, (p, k) in enumerate(zip(rows.params, rows.output_index)):
        if k < p.min_tokens:
            toks = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
            ban_rows += [i] * len(toks)
            cols += sorted(toks)
    for i in masked:
        toks = _bad_word_tokens(rows.params[i].bad_words_token_ids, rows.histories[i],
                                rows.num_prompt_tokens[i])
        ban_rows += [i] * len(toks)
        cols += toks
    return np.asarray(ban_rows, np.int64), np.asarray(cols, np.int64)


def _bad_word_tokens(words: list[list[int]], history: list[int] | None, num_prompt: int) -> list[int]:
    """vLLM's rule: a word's last token is banned when the output so far ends with the
    word's other tokens (always, for a one-token word)."""
    banned = set()
    for word in words:
        prefix = word[:-1]
        if not prefix:
            banned.add(word[-1])
        elif history is not None and len(history) - num_prompt >= len(prefix) \
                and history[len(history) - len(prefix):] == prefix:
            banned.add(word[-1])
    return sorted(banned)


def apply_penalties(logits: torch.Tensor, penalties: tuple) -> torch.Tensor:
    """Repetition penalty over prompt+output tokens (as in CTRL / transformers);
    presence and frequency penalties over output tokens (as OpenAI defines them)."""
    ids, is_out, rep, pres, freq = penalties
    B, V = logits.shape
    valid = ids >= 0
    safe = ids.clamp(min=0)
    seen = torch.zeros((B, V), dtype=torch.bool, device=logits.device)
    seen.scatter_(1, safe, valid)
    counts = torch.zeros((B, V), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, safe, (valid & is_out).to(logits.dtype))
    r = rep[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                            top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) what the filters drop. Ties at the k-th value are all kept out
    beyond rank k: ranks come from one stable descending sort."""
    if top_k is not None or top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if top_k is not None:
            drop |= ranks >= top_k[:, None]
        if top_p is not None:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            mass_before = probs.cumsum(-1) - probs
            drop |= mass_before >= top_p[:, None]   # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    if min_p is not None:
        probs = logits.softmax(-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                  # [B] int64
    logprobs: torch.Tensor | None = None     # [B] logprob of the sampled token
    ranks: torch.Tensor | None = None        # [B] its rank (1 = most likely)
    top_ids: torch.Tensor | None = None      # [B, N]
    top_logprobs: torch.Tensor | None = None  # [B, N]


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.rng = np.random.default_rng(seed)   # noise seeds of unseeded rows (GPU path)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch,
                 greedy_ids: torch.Tensor | None = None) -> SamplerOutput:
        """``greedy_ids``: ``logits.argmax(-1)`` when the caller has it already (the
        decode graph's); used unless banned tokens or penalties change the logits."""
        edits = batch.banned is not None or batch.penalties is not None or batch.masks is not None
        if edits:
            greedy_ids = None
        if batch.num_logprobs >= 0 or edits:
            logits = logits.float()   # (the kernels below read 16-bit logits as they are)
        raw_logprobs = logits.log_softmax(-1) if batch.num_logprobs >= 0 else None
        if batch.banned is not None:
            # new_full fills on the device: a host tensor here would be a blocking copy.
            logits = logits.index_put(batch.banned, logits.new_full((), float("-inf")))
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        if batch.masks is not None:
            if batch.banned is None and batch.penalties is None:
                logits = logits.clone()   # the caller's logits (or the graph's) stay as they were
            logits = batch.masks.apply(logits)
        out = SamplerOutput(self._draw(logits, batch, greedy_ids))
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, out.token_ids[:, None]).squeeze(1)
            out.ranks = (raw_logprobs > out.logprobs[:, None]).sum(-1) + 1
            if batch.num_logprobs > 0:
                out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return out

    def _draw(self, logits: torch.Tensor, batch: SamplingBatch,
              greedy_ids: torch.Tensor | None) -> torch.Tensor:
        if batch.all_greedy:
            return greedy_ids if greedy_ids is not None else argmax(logits)
        ops = fused_ops_for(logits)
        if ops is not None and not batch.filtered:
            # On the GPU: the Gumbel-max draw in one pass over the logits (greedy rows too).
            return ops.gumbel_sample(logits, batch.temperature, batch.seeds)
        # The exponential race: argmax of p / E with E ~ Exp(1) draws exactly from p.
        logits = logits.float()
        if greedy_ids is None and batch.any_greedy:
            greedy_ids = argmax(logits)   # a full-vocab pass
        greedy = batch.temperature == 0
        logits = logits / torch.where(greedy, 1.0, batch.temperature)[:, None]
        logits = apply_top_k_top_p_min_p(logits, batch.top_k, batch.top_p, batch.min_p)
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seed in enumerate(batch.row_seeds):
            if seed is not None:
                noise[i].exponential_(generator=torch.Generator(probs.device).manual_seed(seed))
        sampled = argmax(probs / noise)
        return sampled if greedy_ids is None else torch.where(greedy, greedy_ids, sampled)
