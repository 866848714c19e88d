"""Prometheus metrics: ours under qaa_, and the ones vLLM also has under vLLM's names.

qaa_ label values come from small fixed sets (tier, outcome, adapter type, endpoint), never
from adapter ids, so cardinality stays bounded however many adapters exist.

The vllm: series follow vLLM's names and semantics so that vLLM's Grafana dashboards and the
Kubernetes Gateway API Inference Extension's endpoint picker read them unchanged: gauges and
histograms carry `model_name` (the served base model: bounded), and
`vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` names the
adapters of running and waiting requests, comma-separated, with the time of the last update as
its value. vLLM adds a new series whenever the adapter set changes (the picker keeps the one
with the newest timestamp); ours is always exactly one series, so a scrape never grows.
That gauge is the one place adapter ids appear: anyone who can scrape /metrics sees which
adapters are in use (not who owns them, nor any content). `adapter_names` limits that: "all",
"none" (the labels stay empty and LoRA-affinity routing falls back to load), or a set of
tenants whose ids may appear.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# LLM latencies span milliseconds (a decode step) to minutes (a long generation).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ADAPTER_TYPES = ("base", "qaa", "lora", "sora", "prefix")
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")
"""'rejected': refused before it was queued (429 queue full, 503 shutting down)."""
LORA_INFO = "vllm:lora_requests_info"


class _Twin:
    """One metric observed under two names: ours (labelled by adapter type or not at all)
    and vLLM's (labelled by model_name), so the scheduler records each event once."""

    def __init__(self, ours, theirs):
        self.ours, self.theirs = ours, theirs

    def labels(self, **kw):
        return _Twin(self.ours.labels(**kw), self.theirs)

    def observe(self, v):
        self.ours.observe(v)
        self.theirs.observe(v)

    def set(self, v):
        self.ours.set(v)
        self.theirs.set(v)

    def inc(self, v=1):
        self.ours.inc(v)
        self.theirs.inc(v)


class _LoraInfo:
    """vllm:lora_requests_info as one series whose labels are replaced on each update."""

    def __init__(self, max_lora: int):
        self._lock = threading.Lock()
        self._labels = {"max_lora": str(max_lora), "running_lora_adapters": "", "waiting_lora_adapters": ""}
        self._stamp = time.time()

    def update(self, max_lora: int, running: str, waiting: str) -> None:
        with self._lock:
            new = {"max_lora": str(max_lora), "running_lora_adapters": running, "waiting_lora_adapters": waiting}
            if new != self._labels:
                self._labels = new
            self._stamp = time.time()

    def describe(self):
        return [GaugeMetricFamily(LORA_INFO, "Running and waiting LoRA adapters", labels=list(self._labels))]

    def collect(self):
        with self._lock:
            labels, stamp = dict(self._labels), self._stamp
        g = GaugeMetricFamily(LORA_INFO, "Running and waiting LoRA adapters", labels=list(labels))
        g.add_metric(list(labels.values()), stamp)
        yield g


class Metrics:
    def __init__(self, model_name: str = "qaa-serve", adapter_names: str | frozenset = "all", max_lora: int = 0):
        """model_name: the `model_name` label of the vllm: series. adapter_names: which adapter
        ids vllm:lora_requests_info may show: "all", "none", or a set of tenant names.
        max_lora: adapters the device holds at once (vLLM's max_loras)."""
        r = self.registry = CollectorRegistry()
        self.model_name, self.adapter_names = model_name, adapter_names
        m = {"labelnames": ["model_name"], "registry": r}

        def vllm_hist(name, doc, buckets):
            return Histogram(name, doc, buckets=buckets, **m).labels(model_name=model_name)

        def vllm_gauge(name, doc):
            return Gauge(name, doc, **m).labels(model_name=model_name)

        def vllm_counter(name, doc):
            return Counter(name, doc, **m).labels(model_name=model_name)

        self.ttft = _Twin(Histogram("qaa_time_to_first_token_seconds", "Time from arrival to the first generated token",
                                    ["adapter_type"], buckets=TTFT_BUCKETS, registry=r),
                          vllm_hist("vllm:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS))
        self.itl = _Twin(Histogram("qaa_inter_token_latency_seconds", "Time between consecutive generated tokens",
                                   ["adapter_type"], buckets=ITL_BUCKETS, registry=r),
                         vllm_hist("vllm:inter_token_latency_seconds", "Inter-token latency", ITL_BUCKETS))
        self.e2e = _Twin(Histogram("qaa_e2e_request_latency_seconds", "Time from arrival to the last token",
                                   ["adapter_type"], buckets=E2E_BUCKETS, registry=r),
                         vllm_hist("vllm:e2e_request_latency_seconds", "End-to-end request latency", E2E_BUCKETS))
        self.queue_time = _Twin(Histogram("qaa_queue_time_seconds", "Time a request waited before its prefill",
                                          ["adapter_type"], buckets=TTFT_BUCKETS, registry=r),
                                vllm_hist("vllm:request_queue_time_seconds", "Time in the waiting queue", TTFT_BUCKETS))
        self.adapter_load_seconds = Histogram("qaa_adapter_load_seconds", "Adapter load time into a tier",
                                              ["tier"], buckets=LOAD_BUCKETS, registry=r)
        self.adapter_hits = Counter("qaa_adapter_cache_hits", "Adapter found in a tier", ["tier"], registry=r)
        self.adapter_misses = Counter("qaa_adapter_cache_misses", "Adapter not found in a tier", ["tier"], registry=r)
        self.running = _Twin(Gauge("qaa_requests_running", "Requests decoding", registry=r),
                             vllm_gauge("vllm:num_requests_running", "Requests in the running batch"))
        self.waiting = _Twin(Gauge("qaa_requests_waiting", "Requests queued", registry=r),
                             vllm_gauge("vllm:num_requests_waiting", "Requests waiting to be admitted"))
        self.kv_usage = _Twin(Gauge("qaa_kv_cache_usage_ratio", "Share of KV-cache slots in use", registry=r),
                              vllm_gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1"))
        self.prompt_tokens = _Twin(Counter("qaa_prompt_tokens", "Prompt tokens prefilled", registry=r),
                                   vllm_counter("vllm:prompt_tokens", "Prompt tokens prefilled"))
        self.generation_tokens = _Twin(Counter("qaa_generation_tokens", "Tokens generated", registry=r),
                                       vllm_counter("vllm:generation_tokens", "Tokens generated"))
        self.requests = Counter("qaa_requests", "Finished requests", ["outcome", "adapter_type"], registry=r)
        self.adapters_resident = Gauge("qaa_adapters_resident", "Adapters held per tier", ["tier"], registry=r)
        self.adapters_pinned = Gauge("qaa_adapter_pins", "Adapter pins held by running requests", registry=r)
        self.lora_info = _LoraInfo(max_lora)
        r.register(self.lora_info)
        for tier in ("device", "host"):  # every tier's series exists from the start, at zero
            self.adapter_hits.labels(tier=tier)
            self.adapter_misses.labels(tier=tier)
            self.adapter_load_seconds.labels(tier=tier)

    def set_lora_requests(self, max_lora: int, running, waiting) -> None:
        """Publish the adapters of running and waiting requests, given as (tenant, name as the
        request sent it) pairs; each name appears once, in first-seen order."""
        self.lora_info.update(max_lora, self._names(running), self._names(waiting))

    def _names(self, pairs) -> str:
        allowed = self.adapter_names
        if allowed == "none":
            return ""
        names = dict.fromkeys(n for t, n in pairs if allowed == "all" or t in allowed)
        return ",".join(names)
