"""The activation pool's numbers (`ActivationPool.stats`): bytes per tier and per tier and kind,
records per tier, demotions per kind, copy traffic. Metrics and dashboards read this dict."""
from __future__ import annotations

from store.pool_layout import TIERS


def pool_stats(layout, records, used_rows: int, num_slots: int, block_size: int, host, counts,
               demotions) -> dict:
    """`records`: the pool's ActivationRecords; `used_rows`: device rows handed out (blocks in use);
    `host`: its HostTier; `counts`, `demotions`: store.pool_tiers.TierMover's."""
    records = list(records)
    by_tier = {tier: 0 for tier in TIERS}
    by_kind = {"device": dict.fromkeys(layout.dims, 0), "cpu": dict.fromkeys(layout.dims, 0)}
    for record in records:
        by_tier[record.tier] += 1
        for kind in layout.dims:
            tier = record.tier_of(kind)
            if tier == "device":        # the rows held for it (reserved, whether written yet or not)
                by_kind["device"][kind] += layout.kind_bytes(kind, len(record.blocks) * block_size)
            elif tier == "cpu":
                by_kind["cpu"][kind] += layout.kind_bytes(kind, record.captured)
    bpt = layout.bytes_per_token
    return {"bytes": {"device": used_rows * bpt, "cpu": host.bytes_used},
            "bytes_by_kind": by_kind,
            "records": by_tier,
            "pinned_records": sum(r.pinned for r in records),
            "evictions_to_cpu": counts["evictions_to_cpu"], "drops": counts["drops"],
            "demoted_rows": {move: dict(kinds) for move, kinds in demotions.items()},
            "traffic_bytes": {"d2h": host.bytes_stored, "h2d": host.bytes_fetched},
            "capacity_bytes": {"device": num_slots * bpt, "cpu": host.budget_bytes}}
