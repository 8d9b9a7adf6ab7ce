"""Beam search as vLLM does it, over plain engine requests.

Each step, every live beam is one engine request of ``max_tokens=1`` that reports its
top ``2 * beam_width`` next-token logprobs; the best ``beam_width`` continuations per
prompt become the next step's beams. A beam's request forks from its parent beam's
(``fork_from``), so the beams share the prompt's and their common prefix's KV blocks
and each step computes about one new token per beam. This module only decides: the
driver (``LLM.beam_search``) runs the requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from orbitllm.outputs import BeamSearchOutput, BeamSearchSequence, PositionLogprobs
from orbitllm.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class Beam:
    tokens: list[int]                  # prompt + generated
    cum_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    request_id: str | None = None      # the engine request whose kept blocks hold its KV
    ended_by_eos: bool = False


def beam_score(beam: Beam, length_penalty: float) -> float:
    """vLLM's ``get_beam_search_score``: cumulative logprob over length^penalty, the
    length counting the prompt and not a final EOS."""
    length = len(beam.tokens) - (1 if beam.ended_by_eos else 0)
    return beam.cum_logprob / (length ** length_penalty)


class BeamSearchState:
    """The beams of one prompt."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: set[int]) -> None:
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.beams = [Beam(list(prompt_token_ids))]
        self.completed: list[Beam] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def step_params(self) -> SamplingParams:
        """One token, with the logprobs of the 2 * beam_width best candidates."""
        return SamplingParams(max_tokens=1, logprobs=2 * self.params.beam_width,
                              temperature=self.params.temperature, ignore_eos=True)

    def advance(self, step_logprobs: list[PositionLogprobs], request_ids: list[str]) -> None:
        """``step_logprobs[i]``: the next-token logprobs of ``self.beams[i]``, computed by
        request ``request_ids[i]``. Keeps the best ``beam_width`` continuations."""
        candidates = []
        for beam, entry, rid in zip(self.beams, step_logprobs, request_ids):
            for tid, lp in entry.items():
                new = Beam(beam.tokens + [tid], beam.cum_logprob + lp.logprob,
                           beam.logprobs + [entry], rid)
                if tid in self.eos_token_ids and not self.params.ignore_eos:
                    new.ended_by_eos = True
                    self.completed.append(new)
                else:
                    candidates.append(new)
        key = self._key
        self.beams = sorted(candidates, key=key, reverse=True)[:self.params.beam_width]
        self.steps += 1

    def _key(self, beam: Beam) -> float:
        return beam_score(beam, self.params.length_penalty)

    def output(self, decode) -> BeamSearchOutput:
        """The best ``beam_width`` of the ended and the still-live beams, best first."""
        ranked = sorted(self.completed + self.beams, key=self._key, reverse=True)
        sequences = []
        for beam in ranked[:self.params.beam_width]:
            generated = beam.tokens[self.num_prompt_tokens:]
            if beam.ended_by_eos:
                generated = generated[:-1]
            sequences.append(BeamSearchSequence(
                tokens=beam.tokens, cum_logprob=beam.cum_logprob, logprobs=beam.logprobs,
                text=decode(generated) if decode is not None else None,
                finish_reason="stop" if beam.ended_by_eos else "length"))
        return BeamSearchOutput(sequences)
