"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, sampling_params)``."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm import tqdm

from orbitllm.config import EngineConfig
from orbitllm.engine.beam_search import BeamSearchState
from orbitllm.engine.llm_engine import LLMEngine
from orbitllm.outputs import BeamSearchOutput, PoolingRequestOutput, RequestOutput
from orbitllm.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """Batch generation. Every ``EngineConfig`` field is a keyword (``dtype``,
    ``num_kv_blocks``, ``max_num_batched_tokens``, ...); ``model=None`` uses the
    built-in default model."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"LLM: unknown option(s) {sorted(unknown)}")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes now (otherwise at interpreter exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs come back in input order."""
        prompts = _prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts), "sampling_params")
        prios = _per_prompt(priority, len(prompts), "priority") if priority is not None else [0] * len(prompts)
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, prios):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p or SamplingParams(), priority=prio, final_only=True)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:   # a bad prompt, a dead worker, Ctrl-C: free the others' blocks
            for rid in ids:
                self.engine.abort_request(rid)
            raise

    def embed(self, prompts, pooling: str = "last", use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """One embedding per prompt (vLLM's ``LLM.embed`` for a decoder model): the final
        hidden state after the final norm at the ``last`` token, or the ``mean`` over the
        prompt, L2-normalized."""
        prompts = _prompt_list(prompts)
        ids = []
        try:
            for prompt in prompts:
                rid = f"embed-{next(self._ids)}"
                self.engine.add_pooling_request(rid, prompt, pooling)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise

    def beam_search(self, prompts, params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: one output per prompt (text, token ids or a dict
        with ``prompt_token_ids``), its ``beam_width`` best sequences first.

        Every beam of a step is one engine request; all prompts' beams run batched. A
        request keeps its KV blocks after it finishes, so that the next step's beams fork
        from it instead of computing their prefix again; they are released a step later."""
        prompts = _prompt_list(prompts)
        engine = self.engine
        states = [BeamSearchState(engine.tokenize(p)[1], params, engine.eos_token_ids)
                  for p in prompts]
        for s in states:
            if s.num_prompt_tokens + params.max_tokens > engine.max_model_len:
                raise ValueError(f"max_tokens: a prompt of {s.num_prompt_tokens} tokens and "
                                 f"{params.max_tokens} more exceed max_model_len {engine.max_model_len}")
        held: list[str] = []
        try:
            with tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm) as bar:
                while not all(s.done for s in states):
                    live = [s for s in states if not s.done]
                    ids = [[f"beam-{next(self._ids)}" for _ in s.beams] for s in live]
                    for s, rids in zip(live, ids):
                        for beam, rid in zip(s.beams, rids):
                            engine.add_request(rid, {"prompt_token_ids": beam.tokens},
                                               s.step_params(), final_only=True, keep_blocks=True,
                                               fork_from=beam.request_id)
                            held.append(rid)
                    outs = {o.request_id: o for o in self._run([r for rs in ids for r in rs], False)}
                    for s, rids in zip(live, ids):
                        s.advance([outs[r].outputs[0].logprobs[0] for r in rids], rids)
                    # A request's blocks stay only while a live beam may fork from it.
                    wanted = {b.request_id for s in states for b in s.beams}
                    for rid in [r for r in held if r not in wanted]:
                        engine.release_blocks(rid)
                    held = [r for r in held if r in wanted]
                    bar.update(1)
        finally:
            for rid in held:
                engine.abort_request(rid)
                engine.release_blocks(rid)
        decode = engine.tokenizer.decode if engine.tokenizer is not None else None
        return [s.output(decode) for s in states]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(
            c, chat_template, add_generation_prompt, continue_final_message)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation, chat_template: str | None = None,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> list[int]:
        tok = self.engine.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("messages: this model's tokenizer has no chat template; pass chat_template")
        out = tok.apply_chat_template(
            conversation, chat_template=chat_template, tokenize=True,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            while len(final) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]


def _prompt_list(prompts) -> list:
    """One prompt (text, token ids or a dict) as a list of one; a list as it is."""
    if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return prompts


def _per_prompt(value, n: int, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} given for {n} prompts")
    return list(value)
