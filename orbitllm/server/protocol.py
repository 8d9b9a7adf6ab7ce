"""OpenAI request and response bodies as pydantic models, plus vLLM's sampling extras.

Requests are strict (``"5"`` is not an int) so a wrong type is a 400 rather than a
silent coercion; unknown fields are ignored so newer clients keep working.
Range checks live in ``SamplingParams``: the server and the offline API share them.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from orbitllm.sampling_params import BeamSearchParams, SamplingParams, check_text
from orbitllm.server.structured_request import structured_outputs_of
from orbitllm.server.tool_parsers import tool_choice_constraint

MAX_LOGPROBS = 20
# A chat template's variables that the server sets, and the options of the renderer
# (Hugging Face's ``apply_chat_template``): ``chat_template_kwargs`` may not name them.
_TEMPLATE_NAMES_TAKEN = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"})


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value, info: ValidationInfo):
        """JSON may carry lone surrogates (``"\\ud800"``), which no tokenizer can encode."""
        _check_strings(info.field_name, value)
        return value


def _check_strings(name: str, value) -> None:
    if isinstance(value, str):
        check_text(name, value)
    elif isinstance(value, list):
        for v in value:
            _check_strings(name, v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(name, k)
            _check_strings(name, v)


class StreamOptions(_Request):
    include_usage: bool = False


# ---- structured output and tool calling request parts (issue 22) -----------------------

class JsonSchemaFormat(_Request):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's ``structured_outputs`` field (one of these set)."""

    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class MessageFunctionCall(_Request):
    name: str
    arguments: str


class MessageToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall

    def as_template_input(self) -> dict:
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            raise ValueError(f"messages: a tool call's arguments are not JSON: "
                             f"{self.function.arguments[:80]!r}") from None
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


class _TopLevelRequest(_Request):
    """An endpoint's body. Unknown top-level fields are kept (``extra="allow"``) only
    so the server can log their names (vLLM ignores them too)."""

    model_config = ConfigDict(strict=True, extra="allow")

    def unknown_fields(self) -> list[str]:
        """Fields this server does not know (ignored, as vLLM does; the server logs them)."""
        return sorted(self.model_extra or ())


class _SamplingRequest(_TopLevelRequest):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    cache_salt: str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # ---- issue 22: more vLLM fields -------------------------------------------------
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    spaces_between_special_tokens: bool = True
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # ---- issue 22: OpenAI features orbitllm does not implement (400 naming them) -----
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    service_tier: str | None = None
    store: bool | None = None
    # -----------------------------------------------------------------------------------
    # ---- structured output and logits masks (issue 22: orbitllm/server/structured_request.py) ----
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # ---- end of the structured-output block ----

    def refuse_unsupported(self) -> None:
        """A known OpenAI feature that orbitllm lacks is refused by name, never ignored:
        the client would otherwise get a 200 without what it asked for."""
        if self.audio is not None:
            raise ValueError("audio: audio output is not supported by this server")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ValueError(f"modalities: only ['text'] is supported, got {self.modalities}")
        if self.prediction is not None:
            raise ValueError("prediction: predicted outputs are not supported by this server")
        if self.web_search_options is not None:
            raise ValueError("web_search_options: web search is not supported by this server")
        if self.service_tier not in (None, "auto", "default"):
            raise ValueError(f"service_tier: only 'auto' and 'default' are supported, "
                             f"got {self.service_tier!r}")
        if self.store:
            raise ValueError("store: this server does not store completions")

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """``use_beam_search``: ``best_of`` (else ``n``) beams; the best ``n`` are returned."""
        if self.stream:
            raise ValueError("use_beam_search: streaming is not supported with beam search")
        return BeamSearchParams(beam_width=max(self.best_of or self.n, self.n), max_tokens=max_tokens,
                                ignore_eos=self.ignore_eos, temperature=_or(self.temperature, 0.0),
                                length_penalty=self.length_penalty)

    @property
    def engine_n(self) -> int:
        """Sequences the engine generates per prompt: ``best_of`` of them, of which the
        ``n`` with the highest cumulative logprob are returned (vLLM's best_of)."""
        return self.n if self.best_of is None or self.use_beam_search else max(self.best_of, self.n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError naming the field when a value is out of range."""
        self.refuse_unsupported()
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs: at most {MAX_LOGPROBS} are supported, got {logprobs}")
        if self.best_of is not None:
            if isinstance(self.best_of, bool) or self.best_of < self.n:
                raise ValueError(f"best_of: must be >= n ({self.n}), got {self.best_of}")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of: streaming is not supported with best_of > n")
        if self.prompt_logprobs is not None and self.prompt_logprobs > MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs: at most {MAX_LOGPROBS} are supported, "
                             f"got {self.prompt_logprobs}")
        if self.prompt_logprobs is not None:
            prompt_logprobs = self.prompt_logprobs
        if self.engine_n > self.n and logprobs is None:
            logprobs = 0   # the sampler's logprob of each token ranks the best_of candidates
        return SamplingParams(
            n=self.engine_n, temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0),
            top_k=_or(self.top_k, 0), min_p=_or(self.min_p, 0.0), seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=_or(self.repetition_penalty, 1.0), max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, structured_outputs=self.structured_constraint())

    def structured_constraint(self):
        """The output constraint the request's fields ask for (None: free text)."""
        return structured_outputs_of(self)


def _or(value, default):
    return default if value is None else value


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs: must be >= 0, got {self.logprobs}")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class TextPart(_Request):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        """Images, audio and files are OpenAI features this server lacks: refused by name."""
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported (text only)")
        return value


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # ---- tool calling (issue 22: orbitllm/server/tool_parsers.py) ----
    tool_calls: list[MessageToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None                   # a tool result's call

    def as_template_input(self) -> dict:
        content = self.content if not isinstance(self.content, list) else "".join(
            part.text for part in self.content)
        message = {"role": self.role, "content": content or ""}
        if self.tool_calls:   # templates read the arguments as a mapping, OpenAI sends JSON text
            message["tool_calls"] = [c.as_template_input() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None   # more variables for the template
    # ---- tool calling (issue 22: orbitllm/server/tool_parsers.py) ----
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("chat_template_kwargs")
    @classmethod
    def _free_template_names(cls, value: dict | None) -> dict | None:
        """The variables the server sets itself (and the renderer's options) are not the
        client's to change."""
        taken = sorted(set(value or ()) & _TEMPLATE_NAMES_TAKEN)
        if taken:
            raise ValueError(f"chat_template_kwargs: {', '.join(map(repr, taken))} "
                             "is set by the server, not by these kwargs")
        return value

    def structured_constraint(self):
        """Free text, the client's constraint, or the tool call that tool_choice forces."""
        forced, asked = tool_choice_constraint(self), structured_outputs_of(self)
        if forced is not None and asked is not None:
            raise ValueError("tool_choice: cannot force a tool call together with response_format "
                             "or structured_outputs")
        return forced or asked

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = _or(self.max_completion_tokens, self.max_tokens)
        return self._sampling_params(max_tokens, logprobs)


# ---- issue 22: /tokenize and /detokenize (vLLM's shapes) ---------------------------

class TokenizeRequest(_TopLevelRequest):
    """Either ``prompt`` or ``messages`` (rendered with the model's chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(_TopLevelRequest):
    model: str | None = None
    tokens: list[int]


# ---- issue 22: /v1/embeddings --------------------------------------------------------

class EmbeddingRequest(_TopLevelRequest):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    priority: int = 0


# ---- responses ----------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0    # prompt tokens found in the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape of one prompt position's entry (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)   # (issue 22: tool calling)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None   # (issue 22) OpenAI's deltas: id, type, name first, then arguments

    @model_serializer(mode="wrap")
    def _only_present(self, handler) -> dict:
        # OpenAI deltas carry only what changed: no "role": null after the first chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "orbitllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
