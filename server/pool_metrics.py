"""Prometheus view of the activation pool's tiers (issue 18), read at scrape time from
`ActivationPool.stats()` and the trainer's totals: bytes per tier and kind, rows demoted per move and
kind, copy traffic each way, and where the rows of trained records came from (device, host, or
recomputed) per kind. Part of `server.training_metrics.TrainingCollector`'s scrape."""
from __future__ import annotations

from server.metric_families import counter, gauge

KIND_TIERS = ("device", "retained", "cpu")
ROW_SOURCES = ("device", "retained", "cpu", "recomputed")


def pool_families(pool, trainer, name: list):
    """The families; zero-valued (no samples for per-kind ones) when there is no pool."""
    stats = pool.stats() if pool is not None else {}
    kinds = list(pool.layout.dims) if pool is not None else []
    by_kind = stats.get("bytes_by_kind", {})
    yield gauge("alchemist_activation_pool_kind_bytes", "Bytes of captured activations held, by tier (device, "
                "retained: the device's retention region, cpu: pinned host) and projection kind.", name,
                [((tier, kind), by_kind.get(tier, {}).get(kind, 0)) for tier in KIND_TIERS for kind in kinds],
                ["tier", "kind"])
    yield counter("alchemist_activation_pool_demoted_rows", "Captured rows moved down a tier, by move (e.g. "
                  "device->cpu, cpu->dropped) and kind.", name,
                  [((move, kind), rows) for move, counts in stats.get("demoted_rows", {}).items()
                   for kind, rows in counts.items()], ["move", "kind"])
    traffic = stats.get("traffic_bytes", {})
    yield counter("alchemist_activation_pool_copy_bytes", "Bytes copied between the device and the pinned host "
                  "tier (d2h: demotions, h2d: training fetches).", name,
                  [((direction,), traffic.get(direction, 0)) for direction in ("d2h", "h2d")], ["direction"])
    totals = trainer.totals if trainer is not None else {}
    yield counter("alchemist_train_pool_rows", "Rows of captured records in training steps, summed over layers, "
                  "by where they came from (device, retained: the retention region, cpu: fetched from the "
                  "host tier, recomputed) and kind.", name,
                  [((source, kind), totals.get(f"pool_rows_{source}/{kind}", 0))
                   for source in ROW_SOURCES for kind in kinds], ["source", "kind"])
