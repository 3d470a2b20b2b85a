"""Shared helpers of the activation-pool tests: a small layout, a pool of a given number of blocks,
rows written as the model writes them, and the pool's invariants."""
import torch

from store.activation_pool import ActivationPool, PoolLayout

BS = 4
LAYOUT = PoolLayout(num_layers=2, dims={"q": 3, "k": 2, "down": 5}, dtype=torch.float32,
                    groups=(("q", "k"),),     # q and k side by side in one buffer, as q|k|v on CUDA
                    input_dims={"q": 4, "k": 4, "down": 6})    # down saves the most per byte
BPT = LAYOUT.bytes_per_token                   # 2 layers * 10 floats * 4 bytes = 80


def make_pool(num_blocks=4, cpu_tokens=0, block_size=BS, retained_tokens=0, **options):
    """A pool whose capture slots are exactly `num_blocks` blocks (plus the scratch row), with a
    retention region of `retained_tokens` down rows (rounded down to blocks)."""
    capture_bytes = (num_blocks * block_size + 1) * BPT
    retained_bytes = retained_tokens * LAYOUT.kind_bytes("down", 1)
    total = capture_bytes + retained_bytes
    return ActivationPool(LAYOUT, total, block_size=block_size, cpu_budget_bytes=cpu_tokens * BPT,
                          retention_fraction=(retained_bytes + 0.5) / total, **options)


def capture(pool, key, start, count, version=0, seed=0):
    """Write rows like the model does (one index_copy_ per layer and kind); returns them."""
    layout = pool.layout
    slots = torch.tensor(pool.slot_mapping(key, start, count), dtype=torch.long,
                         device=layout.device)                               # [count]
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for layer in range(layout.num_layers):
        for kind, dim in layout.dims.items():
            rows = torch.randn(count, dim, generator=gen).to(layout.device, layout.dtype)  # [count, dim]
            pool.buffer(layer, kind).index_copy_(0, slots, rows)
            written[(layer, kind)] = rows
    pool.mark_captured(key, start + count, version)
    return written


def assert_gathers(pool, key, written, positions=None):
    """Every kind still held (device or host) gathers exactly what was written."""
    record = pool.get(key)
    for (layer, kind), rows in written.items():
        if record.tier_of(kind) != "dropped":
            assert torch.equal(pool.gather(key, layer, kind, positions), rows)


def check_invariants(pool):
    owned = [b for r in pool._records.values() for b in r.blocks]
    assert len(owned) == len(set(owned))
    assert sorted(owned + list(pool._free_blocks)) == list(range(pool.num_blocks))
    region = pool._tiers.region
    retained = [b for r in pool._records.values() for b in r.retained_blocks]
    free = list(region.free) if region else []
    assert sorted(retained + free) == list(range(region.num_blocks if region else 0))
    for r in pool._records.values():
        assert bool(r.retained_blocks) == bool(r.kinds_on("retained", pool.layout.dims))
    stats = pool.stats()
    assert stats["bytes"]["device"] <= pool.budget_bytes
    assert stats["bytes"]["cpu"] <= pool.cpu_budget_bytes
    cpu_bytes = sum(pool.layout.kind_bytes(kind, r.captured) for r in pool._records.values()
                    for kind in r.kinds_on("cpu", pool.layout.dims))
    assert stats["bytes"]["cpu"] == cpu_bytes == sum(stats["bytes_by_kind"]["cpu"].values())
    for r in pool._records.values():
        assert len(r.versions) == r.captured <= r.num_tokens
        assert (r.tier == "device") == bool(r.blocks) or r.num_tokens == 0
        on_host = r.kinds_on("cpu", pool.layout.dims)
        assert bool(on_host) == (r.cpu_rows is not None)
        layers = range(pool.layout.num_layers)
        assert set(r.cpu_rows or {}) == {(layer, kind) for layer in layers for kind in on_host}
        tiers = [r.tier_of(kind) for kind in pool.layout.dims]
        assert r.tier == min(tiers, key=["device", "retained", "cpu", "dropped"].index)
        if r.tier == "device":
            assert len(r.blocks) == -(-r.num_tokens // pool.block_size)


def evictable_blocks(pool, exclude=None):
    return pool.num_free_blocks + sum(len(r.blocks) for r in pool._records.values()
                                      if r.tier == "device" and not r.pinned and r.key != exclude)
