"""``orbitllm bench serve``: load any OpenAI-compatible server and measure it.

Requests leave at Poisson arrival times (or all at once), stream their answers,
and each one records when its chunks came. Only the OpenAI wire format is used,
so one run can measure orbitllm and a peer server alike. Token counts come from
the server's streamed ``usage`` when it sends one, else from the chunk count.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Common short English words: almost every tokenizer maps each to one token, so
# N random words make a prompt of about N tokens without knowing the tokenizer.
_WORDS = ("the of and to in is was for on are with as at be by this have from or one had not "
          "but what all were when we there can an your which their said if do will each about "
          "how up out them then she many some so these would other into has more her two like "
          "him see time could no make than first been its who now people my made over did down "
          "only way find use may water long little very after words called just where most know "
          "get through back much go good new write our me man too any day same right look think "
          "also around another came come work three word must because does part even place well "
          "such here take why things help put years different away again off went old number").split()


@dataclass
class BenchRequest:
    prompt: str
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)   # between content chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---- datasets ---------------------------------------------------------------------

def random_requests(num: int, input_len: int, output_len: int, range_ratio: float,
                    rng: random.Random) -> list[BenchRequest]:
    """Prompts of random words; lengths drawn uniformly within +-range_ratio."""
    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))
    return [BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(draw(input_len))),
                         draw(output_len)) for _ in range(num)]


def jsonl_requests(path: str | Path, num: int, output_len: int,
                   rng: random.Random) -> list[BenchRequest]:
    """One JSON object per line with a "prompt" (and optionally "max_tokens"); sampled
    with replacement when ``num`` exceeds the file."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{i}: expected an object with a string 'prompt'")
        rows.append(BenchRequest(row["prompt"], int(row.get("max_tokens", output_len))))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows[:num] if num <= len(rows) else rows + rng.choices(rows, k=num - len(rows))


# ---- one streamed request -------------------------------------------------------------

class OpenAIStreamClient:
    """Sends one streamed completion or chat request and times its chunks."""

    def __init__(self, client, base_url: str, endpoint: str, model: str | None,
                 api_key: str | None, ignore_eos: bool, temperature: float) -> None:
        self.client = client
        self.chat = endpoint == "chat"
        self.url = base_url.rstrip("/") + ("/chat/completions" if self.chat else "/completions")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.extra = {"ignore_eos": True} if ignore_eos else {}
        self.temperature = temperature

    def _body(self, req: BenchRequest) -> dict:
        body = {"model": self.model, "max_tokens": req.max_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}, **self.extra}
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    async def send(self, req: BenchRequest) -> RequestResult:
        start = time.perf_counter()
        result = RequestResult(ok=False)
        last = start
        chunks = 0
        try:
            async with self.client.stream("POST", self.url, json=self._body(req),
                                          headers=self.headers) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    result.error = f"HTTP {resp.status_code}: {body[:200]}"
                    return result
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        result.error = str(event["error"].get("message", event["error"]))
                        return result
                    if event.get("usage"):
                        result.output_tokens = event["usage"].get("completion_tokens", 0)
                        result.prompt_tokens = event["usage"].get("prompt_tokens")
                    if self._content(event):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.chunk_gaps.append(now - last)
                        last = now
                        chunks += 1
        except Exception as e:   # connection refused, reset, bad JSON: a failed request
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
        return result

    def _content(self, event: dict) -> bool:
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                return True
        return False


# ---- the run ------------------------------------------------------------------------

@dataclass
class BenchReport:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_latency_ms: dict[str, float]
    errors: list[str]
    # Speculative decoding, from the server's /metrics over the run (None: not speculating)
    spec_acceptance_rate: float | None = None
    spec_mean_accepted_length: float | None = None

    @classmethod
    def from_results(cls, results: list[RequestResult], duration: float) -> BenchReport:
        ok = [r for r in results if r.ok]
        inputs = sum(r.prompt_tokens or 0 for r in ok)
        outputs = sum(r.output_tokens for r in ok)
        return cls(
            completed=len(ok), failed=len(results) - len(ok), duration_s=duration,
            total_input_tokens=inputs, total_output_tokens=outputs,
            request_throughput=len(ok) / duration, output_throughput=outputs / duration,
            total_token_throughput=(inputs + outputs) / duration,
            ttft_ms=_summary([r.ttft for r in ok if r.ttft is not None]),
            tpot_ms=_summary([r.tpot for r in ok if r.tpot is not None]),
            itl_ms=_summary([g for r in ok for g in r.chunk_gaps]),
            e2e_latency_ms=_summary([r.latency for r in ok]),
            errors=sorted({r.error for r in results if r.error})[:10])

    def format(self) -> str:
        def row(label: str, value) -> str:
            return f"{label:<40}{value:>12.2f}" if isinstance(value, float) else f"{label:<40}{value:>12}"
        lines = [" Serving Benchmark Result ".center(52, "="),
                 row("Successful requests:", self.completed), row("Failed requests:", self.failed),
                 row("Benchmark duration (s):", self.duration_s),
                 row("Total input tokens:", self.total_input_tokens),
                 row("Total generated tokens:", self.total_output_tokens),
                 row("Request throughput (req/s):", self.request_throughput),
                 row("Output token throughput (tok/s):", self.output_throughput),
                 row("Total token throughput (tok/s):", self.total_token_throughput)]
        for title, name, stats in (("Time to First Token", "TTFT", self.ttft_ms),
                                   ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot_ms),
                                   ("Inter-token Latency", "ITL", self.itl_ms),
                                   ("End-to-end Latency", "E2EL", self.e2e_latency_ms)):
            lines.append(f" {title} ".center(52, "-"))
            lines += [row(f"Mean {name} (ms):", stats["mean"]),
                      row(f"Median (p50) {name} (ms):", stats["p50"]),
                      row(f"P90 {name} (ms):", stats["p90"]), row(f"P99 {name} (ms):", stats["p99"])]
        if self.spec_acceptance_rate is not None:
            lines.append(" Speculative Decoding ".center(52, "-"))
            lines += [row("Draft acceptance rate:", self.spec_acceptance_rate),
                      row("Mean accepted length:", self.spec_mean_accepted_length)]
        lines.append("=" * 52)
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def _summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    import numpy as np
    ms = np.asarray(seconds) * 1000.0
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))}


async def run_benchmark(requests: list[BenchRequest], client: OpenAIStreamClient,
                        request_rate: float, max_concurrency: int | None,
                        rng: random.Random) -> BenchReport:
    """Send every request at its (Poisson) arrival time; returns once all have ended."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: BenchRequest) -> RequestResult:
        if gate is None:
            return await client.send(req)
        async with gate:
            return await client.send(req)

    start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        if i and request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    return BenchReport.from_results(list(results), time.perf_counter() - start)


_SPEC_COUNTERS = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                  "spec_decode_num_accepted_tokens_total")


def parse_spec_counters(text: str) -> tuple[float, float, float]:
    """(drafts, draft tokens, accepted tokens) from a Prometheus exposition, summed over
    labels; zeros when the server does not speculate."""
    totals = dict.fromkeys(_SPEC_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("orbitllm:")
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return tuple(totals[n] for n in _SPEC_COUNTERS)


async def _spec_counters(http, base_url: str, api_key: str | None) -> tuple[float, float, float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await http.get(base_url.removesuffix("/v1") + "/metrics", headers=headers)
        resp.raise_for_status()
    except Exception:   # a server without metrics (not ours): no acceptance figures
        return (0.0, 0.0, 0.0)
    return parse_spec_counters(resp.text)


def with_spec(report: BenchReport, before: tuple, after: tuple) -> BenchReport:
    from orbitllm.spec.stats import SpecDecodeStats
    st = SpecDecodeStats(*(int(a - b) for a, b in zip(after, before)))
    if st.num_drafts <= 0:
        return report
    return replace(report, spec_acceptance_rate=st.acceptance_rate,
                   spec_mean_accepted_length=st.mean_accepted_length)


async def _detect_model(http, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await http.get(base_url.rstrip("/") + "/models", headers=headers)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _main_async(args: argparse.Namespace) -> BenchReport:
    import httpx
    rng = random.Random(args.seed)
    if args.dataset == "random":
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, rng)
    else:
        requests = jsonl_requests(args.dataset, args.num_prompts, args.max_tokens, rng)
    base_url = args.base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    limits = httpx.Limits(max_connections=args.max_concurrency or len(requests) or 1,
                          max_keepalive_connections=args.max_concurrency or len(requests) or 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as http:
        model = args.model or await _detect_model(http, base_url, args.api_key)
        client = OpenAIStreamClient(http, base_url, args.endpoint, model, args.api_key,
                                    args.ignore_eos, args.temperature)
        before = await _spec_counters(http, base_url, args.api_key)
        report = await run_benchmark(requests, client, args.request_rate, args.max_concurrency, rng)
        return with_spec(report, before, await _spec_counters(http, base_url, args.api_key))


def main(args: argparse.Namespace) -> int:
    from orbitllm.deps import HTTP_CLIENT_PACKAGES, require
    require(HTTP_CLIENT_PACKAGES, "orbitllm bench serve")
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    report = asyncio.run(_main_async(args))
    print(report.format())
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.completed else 1


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root or its /v1 URL (default: http://127.0.0.1:8000)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default="random",
                   help="'random' or a JSONL file of {\"prompt\": ...} lines")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight")
    p.add_argument("--random-input-len", type=int, default=128, help="words per random prompt")
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128, help="output length for JSONL prompts")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send vLLM's ignore_eos so every request generates max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--result-json", default=None, help="also write the report here")



def register(subparsers, add_engine_args=None, engine_config_from_args=None) -> None:
    """``bench serve`` talks HTTP only, so it takes no engine flags."""
    parser = subparsers.add_parser("serve", help="load a running OpenAI-compatible server",
                                   description=__doc__)
    add_args(parser)
    parser.set_defaults(func=main)
