"""Prometheus metrics on one registry (vLLM names with the `alchemist_` prefix, label `model_name`).
Engine gauges and counters are read at scrape time; request metrics are updated as requests run."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# a grader's reward in [-1, 1] is counted in one of five buckets (bounded label values):
# [-1, -0.5) "-1..-0.5", [-0.5, 0) "-0.5..0", exactly 0 "0", (0, 0.5) "0..0.5", [0.5, 1] "0.5..1"
REWARD_BUCKETS = ("-1..-0.5", "-0.5..0", "0", "0..0.5", "0.5..1")
FEEDBACK_VALUES = {"thumbs": ("-1", "1"), "stars": ("1", "2", "3", "4", "5"), "reward": REWARD_BUCKETS}


def reward_bucket(reward: float) -> str:
    """The `value` label of a reward in [-1, 1] (REWARD_BUCKETS)."""
    if reward == 0:
        return "0"
    if reward < 0:
        return "-1..-0.5" if reward < -0.5 else "-0.5..0"
    return "0..0.5" if reward < 0.5 else "0.5..1"


class EngineCollector:
    """Scrape-time view of the engine: queue gauges, KV usage, cumulative engine counters, memory."""

    def __init__(self, model_name: str, llm_engine):
        self.model_name = model_name
        self.engine = llm_engine

    def describe(self):
        return []            # names are dynamic; registering must not call collect()

    def collect(self):
        s = self.engine.stats()
        name = [self.model_name]
        for metric, doc, value in (
                ("alchemist_num_requests_running", "Sequences in the running batch.", s.num_running),
                ("alchemist_num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
                ("alchemist_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                 s.kv_cache_usage)):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric(name, float(value))
            yield g
        for metric, doc, value in (
                ("alchemist_num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions),
                ("alchemist_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                ("alchemist_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 s.prefix_cache_hits)):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric(name, float(value))
            yield c
        mem = GaugeMetricFamily("alchemist_device_memory_bytes", "Accelerator memory of this process.",
                                labels=["model_name", "kind"])
        allocated, reserved = _device_memory(getattr(self.engine, "device", None))
        mem.add_metric(name + ["allocated"], float(allocated))
        mem.add_metric(name + ["reserved"], float(reserved))
        yield mem


def _device_memory(device) -> tuple[int, int]:
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return 0, 0
    import torch
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


class Metrics:
    def __init__(self, model_name: str, llm_engine):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        r.register(EngineCollector(model_name, llm_engine))
        lbl = ["model_name"]
        self.prompt_tokens = Counter("alchemist_prompt_tokens", "Prefill tokens processed.", lbl,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("alchemist_generation_tokens", "Tokens generated.", lbl,
                                         registry=r).labels(model_name)
        success = Counter("alchemist_request_success", "Finished choices by finish reason.",
                          lbl + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in ("stop", "length")}
        self._success_family, self._model_name = success, model_name
        self.ttft = Histogram("alchemist_time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("alchemist_inter_token_latency_seconds", "Time between output tokens.",
                             lbl, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("alchemist_e2e_request_latency_seconds", "Arrival to last token.",
                             lbl, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("alchemist_request_queue_time_seconds",
                                    "Arrival in the engine to first scheduled.", lbl,
                                    buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        feedback = Counter("alchemist_feedback", "Ratings accepted (new or replaced).",
                           lbl + ["kind", "value"], registry=r)
        self.feedback = {(kind, v): feedback.labels(model_name, kind, v)
                         for kind, values in FEEDBACK_VALUES.items() for v in values}

    def finished(self, reason: str) -> None:
        child = self.success.get(reason)
        if child is None:
            child = self.success[reason] = self._success_family.labels(self._model_name, reason)
        child.inc()

    def rated(self, rating: int | None, stars: int | None, reward: float | None = None) -> None:
        if reward is not None:
            key = ("reward", reward_bucket(reward))
        else:
            key = ("thumbs", str(rating)) if rating is not None else ("stars", str(stars))
        if key in self.feedback:
            self.feedback[key].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
