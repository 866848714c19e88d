"""Prometheus metrics, all prefixed qaa_. Label values come from small fixed sets (tier,
outcome, adapter type, endpoint), never from adapter ids, so cardinality stays bounded however
many adapters exist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies span milliseconds (a decode step) to minutes (a long generation).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ADAPTER_TYPES = ("base", "qaa", "lora", "sora", "prefix")
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")
"""'rejected': refused before it was queued (429 queue full, 503 shutting down)."""


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("qaa_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              ["adapter_type"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("qaa_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             ["adapter_type"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("qaa_e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["adapter_type"], buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("qaa_queue_time_seconds", "Time a request waited before its prefill",
                                    ["adapter_type"], buckets=TTFT_BUCKETS, registry=r)
        self.adapter_load_seconds = Histogram("qaa_adapter_load_seconds", "Adapter load time into a tier",
                                              ["tier"], buckets=LOAD_BUCKETS, registry=r)
        self.adapter_hits = Counter("qaa_adapter_cache_hits", "Adapter found in a tier", ["tier"], registry=r)
        self.adapter_misses = Counter("qaa_adapter_cache_misses", "Adapter not found in a tier", ["tier"], registry=r)
        self.running = Gauge("qaa_requests_running", "Requests decoding", registry=r)
        self.waiting = Gauge("qaa_requests_waiting", "Requests queued", registry=r)
        self.kv_usage = Gauge("qaa_kv_cache_usage_ratio", "Share of KV-cache slots in use", registry=r)
        self.prompt_tokens = Counter("qaa_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("qaa_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("qaa_requests", "Finished requests", ["outcome", "adapter_type"], registry=r)
        self.adapters_resident = Gauge("qaa_adapters_resident", "Adapters held per tier", ["tier"], registry=r)
        self.adapters_pinned = Gauge("qaa_adapter_pins", "Adapter pins held by running requests", registry=r)
        for tier in ("device", "host"):  # every tier's series exists from the start, at zero
            self.adapter_hits.labels(tier=tier)
            self.adapter_misses.labels(tier=tier)
            self.adapter_load_seconds.labels(tier=tier)
