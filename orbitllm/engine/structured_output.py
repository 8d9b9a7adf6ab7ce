"""Structured output on the engine side: grammars compiled by xgrammar, one matcher per
constrained sequence, and the per-step token bitmasks the sampler applies on the device.

Compiling a grammar takes milliseconds to seconds, so it happens before a request is
admitted (the server does it on its preprocessing threads, the offline API in
``add_request``) and is cached per constraint in a bounded LRU. Per step, only the
constrained sequences are touched: the engine keeps a count of them and skips this
module entirely when it is zero. A constrained sequence's next mask needs its previous
token on the host; under overlapped scheduling the engine hands the runner a callback
(``SchedulerOutput.late_bitmasks``) that reads the step in flight back once the next
step's forward is queued, so the pipeline keeps running for every request.
"""
from __future__ import annotations

import collections
import json
import re
import threading
from typing import TYPE_CHECKING

import numpy as np

from orbitllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:   # xgrammar is imported when the first constraint arrives
    import xgrammar

DEFAULT_CACHE_SIZE = 128
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def constraint_key(spec: StructuredOutputsParams) -> tuple[str, str]:
    """What identifies a compiled grammar: the kind and its canonical text."""
    kind = spec.kind
    if kind == "json":
        value = spec.json if isinstance(spec.json, str) else json.dumps(spec.json, sort_keys=True)
    elif kind == "choice":
        value = json.dumps(spec.choice)
    elif kind == "json_object":
        value = ""
    else:
        value = getattr(spec, kind)
    return kind, value


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe, with a bounded LRU cache.
    Two threads compiling the same new constraint may both compile it (rare, harmless)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._cache: collections.OrderedDict[tuple[str, str], xgrammar.CompiledGrammar] = (
            collections.OrderedDict())
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None

    def _xgr_compiler(self) -> "xgrammar.GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids)
                # Our LRU is the cache: xgrammar's own would hold a second copy.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> "xgrammar.CompiledGrammar":
        """The compiled grammar; ValueError naming the field if the constraint is invalid."""
        key = constraint_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec, key[0])
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams, kind: str) -> "xgrammar.CompiledGrammar":
        import xgrammar as xgr
        compiler = self._xgr_compiler()
        try:
            if kind == "json":
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                # Compact separators: a model may otherwise emit whitespace for ever.
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "json_object":   # an object (OpenAI's json_object), any members
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                    strict_mode=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in spec.choice)
                return compiler.compile_grammar(xgr.Grammar.from_ebnf(f"root ::= {alternatives}"))
            return compiler.compile_grammar(spec.grammar)
        except Exception as e:   # xgrammar raises RuntimeError / ValueError / its own
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar (EBNF)",
                    "choice": "choice list", "json_object": "JSON grammar"}[kind]
            text = str(e).strip() or type(e).__name__
            first_line = _XGR_PREFIX.sub("", text.splitlines()[0])   # "[time] file.cc:line: "
            raise ValueError(f"structured_outputs.{kind}: invalid {what}: {first_line[:300]}") from None

    def __len__(self) -> int:
        return len(self._cache)


class SequenceGrammar:
    """One sequence's matcher: its state after each token it took."""

    def __init__(self, compiled: "xgrammar.CompiledGrammar") -> None:
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self._early: collections.deque[tuple[int, bool]] = collections.deque()

    def accept(self, token_id: int) -> bool:
        """Take the request's next token (or report what ``StructuredOutputs.accept_early``
        found for it)."""
        if self._early:
            early, accepted = self._early.popleft()
            if early == token_id:
                return accepted
            if accepted:   # not the token read ahead (the engine never does this): undo it
                self.matcher.rollback(1)
            self._early.clear()
        return self.matcher.accept_token(token_id)

    def took_early(self, token_id: int, accepted: bool) -> None:
        """``StructuredOutputs.accept_early`` advanced the matcher by this token."""
        self._early.append((token_id, accepted))

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class StructuredOutputs:
    """The engine's structured-output state: the compiler and how many sequences are
    constrained now (zero: the step does nothing here)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids) if tokenizer else None
        self.num_active = 0
        self._batch = None   # xgrammar's BatchGrammarMatcher, made with the first grammar

    def compile(self, spec: StructuredOutputsParams) -> "xgrammar.CompiledGrammar":
        if self.compiler is None:
            raise ValueError("structured_outputs: needs a tokenizer, and this engine has none")
        return self.compiler.compile(spec)

    def start(self, compiled: "xgrammar.CompiledGrammar") -> SequenceGrammar:
        if self._batch is None:
            import xgrammar as xgr
            # One thread: a step's masks take microseconds in all, no pool needed.
            self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self.num_active += 1
        return SequenceGrammar(compiled)

    def next_bitmasks(self, grammars: list[SequenceGrammar]) -> np.ndarray:
        """The grammars' next packed masks, ``[len(grammars), ceil(V / 32)]`` int32, in
        one call into one array (no tensor per grammar). A fresh array each step: the
        sampler's upload of the last one may still be reading it."""
        masks = np.empty((len(grammars), (self.vocab_size + 31) // 32), np.int32)
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], masks)
        return masks

    def accept_early(self, grammars: list[SequenceGrammar], tokens: list[int]) -> None:
        """Advance the grammars by their sequences' tokens before the engine postprocesses
        them (overlapped scheduling needs the next masks sooner); each grammar's
        ``accept`` then reports its result once."""
        accepted = self._batch.batch_accept_token([g.matcher for g in grammars], tokens)
        for g, token, ok in zip(grammars, tokens, accepted):
            g.took_early(token, ok)

    def stop(self) -> None:
        self.num_active -= 1

    @staticmethod
    def sampled_rows(scheduled, requests) -> list:
        """(scheduled part, request) of the constrained sequences sampled this step. A
        sequence sampled at several positions (speculative decoding) must not be
        constrained: its later positions would need the grammar's state after the drafts."""
        pairs = [(s, r) for s, r in zip(scheduled, requests) if r.grammar is not None and s.num_sampled]
        if any(s.num_sampled != 1 for s, _ in pairs):
            raise RuntimeError("structured output samples one token per step; a constrained "
                               "sequence was scheduled to sample several")
        return pairs


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word alone, and with a leading space when
    that makes a different first token of the same length (a word inside a text)."""
    if tokenizer is None:
        raise ValueError("bad_words: needs a tokenizer, and this engine has none")
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out
