"""Scrape-time metric families with the server's `model_name` label first (the custom collectors of
server/training_metrics.py and server/pool_metrics.py)."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def family(cls, metric: str, doc: str, name: list, samples, labels=()):
    """`samples`: (label values after model_name, value) pairs; `name`: [model_name]."""
    metric_family = cls(metric, doc, labels=["model_name", *labels])
    for values, value in samples:
        metric_family.add_metric(name + list(values), float(value))
    return metric_family


def counter(metric, doc, name, samples, labels=()):
    return family(CounterMetricFamily, metric, doc, name, samples, labels)


def gauge(metric, doc, name, samples, labels=()):
    return family(GaugeMetricFamily, metric, doc, name, samples, labels)
