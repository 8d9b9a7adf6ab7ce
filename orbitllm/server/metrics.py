"""Prometheus metrics named as vLLM's, with the ``orbitllm:`` prefix, so dashboards
built for vLLM work after a prefix swap. Each app owns its registry, so several
servers can live in one process (tests) without clashing."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orbitllm.server.async_engine import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """Request-level observations come from handlers; engine gauges and counters are
    refreshed from the engine's latest stats snapshot at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._model = model_name
        label = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"orbitllm:{name}", doc, label, buckets=buckets,
                             registry=self.registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"orbitllm:{name}", doc, label, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"orbitllm:{name}", doc, label, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first token.",
            _LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            _LATENCY_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from request arrival to its end.", _REQUEST_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited before it was first scheduled.",
            _REQUEST_BUCKETS)
        self.num_requests_running = gauge("num_requests_running", "Sequences being computed.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc",
                                         "Fraction of KV cache blocks in use (0 to 1).")
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self._prefix_queries = counter("prefix_cache_queries_total",
                                       "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self._preemptions = counter("num_preemptions_total", "Requests preempted by the scheduler.")
        self._spec_drafts = counter("spec_decode_num_drafts_total",
                                    "Speculative verify steps (one per sequence and step).")
        self._spec_draft_tokens = counter("spec_decode_num_draft_tokens_total",
                                          "Draft tokens proposed.")
        self._spec_accepted = counter("spec_decode_num_accepted_tokens_total",
                                      "Draft tokens accepted.")
        self._spec_per_pos = Counter("orbitllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft.",
                                     ["model_name", "position"], registry=self.registry)
        self._success = Counter("orbitllm:request_success_total", "Requests that ended, by reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._last = EngineStats()

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def refresh(self, stats: EngineStats) -> None:
        """Mirror the engine's snapshot: gauges as they are, counters by their increase."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_usage)
        last, self._last = self._last, stats
        self._prefix_queries.inc(max(0, stats.prefix_queries - last.prefix_queries))
        self._prefix_hits.inc(max(0, stats.prefix_hits - last.prefix_hits))
        self._preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self._spec_drafts.inc(max(0, stats.spec_num_drafts - last.spec_num_drafts))
        self._spec_draft_tokens.inc(max(0, stats.spec_num_draft_tokens - last.spec_num_draft_tokens))
        self._spec_accepted.inc(max(0, stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens))
        for pos, n in enumerate(stats.spec_accepted_per_pos):
            before = last.spec_accepted_per_pos[pos] if pos < len(last.spec_accepted_per_pos) else 0
            self._spec_per_pos.labels(self._model, str(pos)).inc(max(0, n - before))

    def render(self, stats: EngineStats) -> bytes:
        self.refresh(stats)
        return generate_latest(self.registry)
