"""The server's loose ends: ``/ready`` during a graceful drain, the bounds on the output
and command queues, request chat templates given the request's tools, and per-request
work kept off the event loop. One server subprocess (the drain); the rest in-process
on a tiny random model."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from orbitllm import LLM, SamplingParams  # noqa: E402
from orbitllm.server.async_engine import (AsyncEngine, ChoiceDelta, CoalescingQueue,  # noqa: E402
                                          EngineBusyError, RequestStream, StreamedOutput)
from orbitllm.server.metrics import ServerMetrics  # noqa: E402
from orbitllm.server.protocol import ChatCompletionRequest, DetokenizeRequest  # noqa: E402
from orbitllm.server.serving import (APIError, Generation, OpenAIServing, PromptInput,  # noqa: E402
                                     RequestTracker, ServerSettings)
from conftest import assert_all_blocks_free  # noqa: E402
from test_server import MAX_MODEL_LEN, MODEL, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)


def _serving(llm: LLM, **settings) -> OpenAIServing:
    return OpenAIServing(AsyncEngine(llm.engine), ServerSettings([MODEL], **settings),
                         ServerMetrics(MODEL))


# ---- /ready during a graceful drain --------------------------------------------------

def test_drain_ready_503_health_200_in_flight_completes(model_path, tmp_path):
    srv = ServerProcess(model_path, tmp_path, "--shutdown-timeout", "60",
                        "--max-model-len", "512").wait_ready()
    try:
        client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=300,
                                           extra_body={"ignore_eos": True}, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        assert httpx.get(srv.url + "/ready").status_code == 200
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/ready").status_code != 503:
            assert time.monotonic() < deadline, "/ready never turned 503"
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 503
        rest = list(chunks)
        assert rest, "the stream ended before the drain began; make it longer"
        assert rest[-1].choices[0].finish_reason == "length"
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
        assert text   # the in-flight request ran to its end during the drain
        # The drain ends once nothing is in flight, well before --shutdown-timeout.
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop()


# ---- bounded queues --------------------------------------------------------------------

def _delta(text: str, token: int, finish: str | None = None) -> StreamedOutput:
    return StreamedOutput([ChoiceDelta(0, text, [token], None, finish)], finish is not None,
                          time.monotonic())


def test_coalescing_queue_holds_one_output_per_prompt():
    async def run() -> None:
        queue = CoalescingQueue()
        for prompt in (0, 1):
            for t in range(500):
                queue.put(prompt, _delta(f"{t},", t, "length" if t == 499 else None))
            assert len(queue) == prompt + 1
        for _ in range(2):
            index, item = await queue.get(None, "r")
            assert item.finished and item.choices[0].finish_reason == "length"
            assert item.choices[0].token_ids == list(range(500))
            assert item.choices[0].text == "".join(f"{t}," for t in range(500))
        queue.put(0, _delta("late", 1))   # read already: a new entry, not a merge
        queue.put(0, RuntimeError("failed"))
        assert len(queue) == 2
    asyncio.run(run())


def test_plain_request_buffers_one_output_while_unread(llm):
    """A non-streaming call whose reader has not read yet holds one merged output, and
    the merged result is the offline one."""
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0)
    ids = llm.get_tokenizer().encode("Hello there")
    expected = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]

    async def run() -> None:
        ae = AsyncEngine(llm.engine)
        ae.start()
        gen = Generation(ae, "g", [PromptInput(ids)], params, 0, None, None,
                         RequestTracker(ServerMetrics(MODEL), time.monotonic()),
                         ServerSettings([MODEL]), stream=False)
        await gen.start()
        deadline = time.monotonic() + 30
        while not gen.streams[0].finished:
            assert len(gen.queue) <= 1
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        results = await gen.collect()
        assert results[0].choices[0].token_ids == expected.token_ids
        assert results[0].choices[0].text == expected.text
        assert gen.tracker.completion_tokens == 40
        await ae.stop()

    asyncio.run(run())
    assert_all_blocks_free(llm)


def test_command_queue_refuses_adds_past_its_bound(llm):
    """Adds the engine thread has not taken in are capped: one more is refused at once
    (503 server_busy), and the server serves again once the thread catches up."""
    engine = llm.engine
    real_add = engine.add_request
    gate = threading.Event()

    def slow_add(*args, **kwargs):
        gate.wait(30)   # the engine thread is stuck, as in a long step
        return real_add(*args, **kwargs)

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ids = llm.get_tokenizer().encode("Hello")

    async def run() -> None:
        ae = AsyncEngine(engine, max_pending_adds=2)
        ae.start()
        queues = [CoalescingQueue() for _ in range(3)]
        streams = [RequestStream(f"r{i}", 0, q, 1) for i, q in enumerate(queues)]
        adds = [asyncio.ensure_future(ae.add(s, {"prompt_token_ids": ids}, params))
                for s in streams[:2]]
        await asyncio.sleep(0.1)
        with pytest.raises(EngineBusyError):
            await ae.add(streams[2], {"prompt_token_ids": ids}, params)
        gate.set()
        await asyncio.gather(*adds)
        await ae.add(streams[2], {"prompt_token_ids": ids}, params)   # room again
        for q in queues:
            tokens = []
            while not tokens or not item.finished:
                _, item = await q.get(time.monotonic() + 30, "r")
                tokens += item.choices[0].token_ids if item.choices else []
            assert len(tokens) == 3
        await ae.stop()

    engine.add_request = slow_add
    try:
        asyncio.run(run())
    finally:
        engine.add_request = real_add
    assert_all_blocks_free(engine)
    busy = APIError.from_exception(EngineBusyError("too many"))
    assert busy.status == 503 and busy.info.code == "server_busy" and "Retry-After" in busy.headers


# ---- request chat templates -------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]
TOOL_NAMES_TEMPLATE = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ greeting }}|"
                       "{% for m in messages %}{{ m.content }}{% endfor %}")


def test_request_chat_template_gets_tools_and_kwargs_as_the_model_template(llm):
    serving = _serving(llm, trust_request_chat_template=True)
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
            "chat_template_kwargs": {"greeting": "hey"}}
    own = asyncio.run(serving._chat_prompt(ChatCompletionRequest.model_validate(
        {**body, "chat_template": TOOL_NAMES_TEMPLATE})))
    assert llm.get_tokenizer().decode(own.token_ids) == "[get_weather][get_time]hey|hi"
    tokenizer = serving.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = TOOL_NAMES_TEMPLATE
    try:
        model = asyncio.run(serving._chat_prompt(ChatCompletionRequest.model_validate(body)))
    finally:
        tokenizer.chat_template = saved
    assert model.token_ids == own.token_ids
    with pytest.raises(ValueError, match="chat_template_kwargs: 'tools'"):
        ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"tools": []}})
    serving.preprocessor.shutdown()


def test_prompt_work_runs_on_the_preprocess_threads(llm):
    """Decoding /detokenize's ids, and the prompt text logged with --log-prompts, happen
    on the preprocessing threads, never on the event loop."""
    serving = _serving(llm, log_prompts=True)
    tokenizer = serving.tokenizer
    threads: list[str] = []
    real_decode = tokenizer.decode

    def decode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_decode(*args, **kwargs)

    tokenizer.decode = decode
    try:
        text = asyncio.run(serving.detokenize(DetokenizeRequest(tokens=[5, 6, 7])))["prompt"]
        prompt = asyncio.run(serving._chat_prompt(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}]})))
        with pytest.raises(APIError, match="outside the vocabulary"):
            asyncio.run(serving.detokenize(DetokenizeRequest(tokens=[10 ** 6])))
    finally:
        del tokenizer.decode
        serving.preprocessor.shutdown()
    assert text == real_decode([5, 6, 7]) and prompt.text == real_decode(prompt.token_ids)
    assert len(threads) == 2 and all(t.startswith("orbitllm-preprocess") for t in threads)
