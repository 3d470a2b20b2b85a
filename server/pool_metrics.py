"""Prometheus view of the activation pool's tiers (issue 18), read at scrape time from
`ActivationPool.stats()` and the trainer's totals: bytes per tier and kind, rows demoted per move and
kind, copy traffic each way, and where the rows of trained records came from (device, host, or
recomputed) per kind. Part of `server.training_metrics.TrainingCollector`'s scrape."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

KIND_TIERS = ("device", "retained", "cpu")
ROW_SOURCES = ("device", "retained", "cpu", "recomputed")


def pool_families(pool, trainer, name: list):
    """The families; zero-valued (no samples for per-kind ones) when there is no pool."""
    stats = pool.stats() if pool is not None else {}
    kinds = list(pool.layout.dims) if pool is not None else []
    by_kind = stats.get("bytes_by_kind", {})
    held = GaugeMetricFamily("alchemist_activation_pool_kind_bytes", "Bytes of captured activations held, by "
                             "tier (device, retained: the device's retention region, cpu: pinned host) and "
                             "projection kind.", labels=["model_name", "tier", "kind"])
    for tier in KIND_TIERS:
        for kind in kinds:
            held.add_metric(name + [tier, kind], float(by_kind.get(tier, {}).get(kind, 0)))
    yield held
    demoted = CounterMetricFamily("alchemist_activation_pool_demoted_rows", "Captured rows moved down a "
                                  "tier, by move (e.g. device->cpu, cpu->dropped) and kind.",
                                  labels=["model_name", "move", "kind"])
    for move, counts in stats.get("demoted_rows", {}).items():
        for kind, rows in counts.items():
            demoted.add_metric(name + [move, kind], float(rows))
    yield demoted
    traffic = CounterMetricFamily("alchemist_activation_pool_copy_bytes", "Bytes copied between the device "
                                  "and the pinned host tier (d2h: demotions, h2d: training fetches).",
                                  labels=["model_name", "direction"])
    for direction in ("d2h", "h2d"):
        traffic.add_metric(name + [direction], float(stats.get("traffic_bytes", {}).get(direction, 0)))
    yield traffic
    totals = trainer.totals if trainer is not None else {}
    rows = CounterMetricFamily("alchemist_train_pool_rows", "Rows of captured records in training steps, "
                               "summed over layers, by where they came from (device, retained: the retention "
                               "region, cpu: fetched from the host tier, recomputed) and kind.", labels=["model_name", "source", "kind"])
    for source in ROW_SOURCES:
        for kind in kinds:
            rows.add_metric(name + [source, kind], float(totals.get(f"pool_rows_{source}/{kind}", 0)))
    yield rows
