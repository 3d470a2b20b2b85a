"""The activation pool's numbers (`ActivationPool.stats`): bytes per tier and per tier and kind,
records per tier, demotions per kind, copy traffic. Metrics and dashboards read this dict."""
from __future__ import annotations

from store.pool_layout import TIERS


def pool_stats(layout, records, used_rows: int, num_slots: int, block_size: int, host, tiers) -> dict:
    """`records`: the pool's ActivationRecords; `used_rows`: capture rows handed out (blocks in use);
    `host`: its HostTier; `tiers`: its store.pool_tiers.TierMover (counts, demotions, region)."""
    records = list(records)
    by_tier = {tier: 0 for tier in TIERS}
    by_kind = {tier: dict.fromkeys(layout.dims, 0) for tier in ("device", "retained", "cpu")}
    for record in records:
        by_tier[record.tier] += 1
        if record.tier == "dropped":              # nothing held
            continue
        for kind in layout.dims:
            tier = record.tier_of(kind)     # device: the rows held for it (reserved, written yet or not)
            held = {"device": len(record.blocks) * block_size, "cpu": record.captured,
                    "retained": len(record.retained_blocks) * block_size}.get(tier, 0)
            if held:
                by_kind[tier][kind] += layout.kind_bytes(kind, held)
    bpt = layout.bytes_per_token
    region, counts = tiers.region, tiers.counts
    retained_rows = (region.num_rows - len(region.free) * block_size) if region else 0
    retained_row_bytes = layout.num_layers * layout.width(region.group) * layout.element_size if region else 0
    return {"bytes": {"device": used_rows * bpt + retained_rows * retained_row_bytes, "cpu": host.bytes_used},
            "bytes_by_kind": by_kind,
            "records": by_tier,
            "pinned_records": sum(r.pinned for r in records),
            "evictions_to_cpu": counts["evictions_to_cpu"], "drops": counts["drops"],
            "demoted_rows": {move: dict(kinds) for move, kinds in tiers.demotions.items()},
            "traffic_bytes": {"d2h": host.bytes_stored, "h2d": host.bytes_fetched},
            "capacity_bytes": {"device": num_slots * bpt + (region.num_rows if region else 0) * retained_row_bytes,
                               "cpu": host.budget_bytes}}
