"""alchemist_memory_bytes{component}: every component exported, each the size it claims to be."""
from __future__ import annotations

import pytest
import torch

from server.memory_metrics import COMPONENTS, MemoryCollector, device_bytes, process_rss_bytes, tensor_bytes
from server.testing import tiny_state


@pytest.fixture()
def state(tiny_model, tmp_path):
    state = tiny_state(tiny_model, tmp_path / "alchemist.db")
    try:
        yield state
    finally:
        state.close()


def scraped(state) -> dict[str, float]:
    values = {}
    for family in state.metrics.registry.collect():
        if family.name == "alchemist_memory_bytes":
            for sample in family.samples:
                assert sample.labels["model_name"] == state.model_name
                values[sample.labels["component"]] = sample.value
    return values


def test_memory_by_component_on_cpu(state):
    values = scraped(state)
    assert set(values) == set(COMPONENTS)
    runner = state.llm.runner
    params = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert values["weights"] == params > 0
    k, v = runner.kv_caches[0]
    assert values["kv_cache"] == len(runner.kv_caches) * 2 * k.numel() * k.element_size() > 0
    pool = state.llm.activation_pool.stats()["bytes"]
    assert (values["activation_pool_device"], values["activation_pool_cpu"]) == (pool["device"], pool["cpu"])
    assert values["device_allocated"] == values["device_reserved"] == values["training_peak"] == 0
    assert values["process_rss"] > params            # the weights are resident (on CPU)


def test_pool_bytes_follow_the_pool(state):
    collector = MemoryCollector(state.model_name, state.llm, training=False)

    class Pool:
        def stats(self):
            return {"bytes": {"device": 4096, "cpu": 123}}

    state.llm.activation_pool, real = Pool(), state.llm.activation_pool
    try:
        sizes = collector.sizes()
    finally:
        state.llm.activation_pool = real
    assert (sizes["activation_pool_device"], sizes["activation_pool_cpu"]) == (4096, 123)


def test_helpers():
    assert tensor_bytes([torch.zeros(3, 4, dtype=torch.float16), torch.zeros(5)]) == 3 * 4 * 2 + 5 * 4
    assert device_bytes(torch.device("cpu")) == (0, 0, 0) and device_bytes(None) == (0, 0, 0)
    rss = process_rss_bytes()
    assert rss > 1 << 20                             # a Python process with torch holds far more
