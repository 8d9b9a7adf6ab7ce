"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, sampling_params)``."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm import tqdm

from orbitllm.config import EngineConfig
from orbitllm.engine.llm_engine import LLMEngine
from orbitllm.outputs import RequestOutput
from orbitllm.sampling_params import SamplingParams


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
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
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


def _per_prompt(value, n: int, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} given for {n} prompts")
    return list(value)
