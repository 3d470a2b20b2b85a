"""`alchemist_memory_bytes{model_name, component}`: where this process's memory goes, read at scrape
time from what the engine already holds (no per-token work). Components (always all exported, 0
where not applicable, e.g. device_* on CPU):

- weights: bytes of the model's parameters (LoRA included), counted once (they do not change size)
- kv_cache: bytes of the KV-cache tensors, counted once
- activation_pool_device / activation_pool_cpu: captured activations held, by tier (pool.stats())
- training_peak: peak device memory allocated beyond the resident weights, KV cache and device pool
  (torch.cuda.max_memory_allocated: the transients of training steps and serving); 0 on CPU or with
  training off
- device_allocated / device_reserved: torch.cuda.memory_allocated / memory_reserved
- process_rss: resident set size of the process (/proc/self/statm; 0 where that does not exist)
"""
from __future__ import annotations

import os

from prometheus_client.core import GaugeMetricFamily

COMPONENTS = ("weights", "kv_cache", "activation_pool_device", "activation_pool_cpu", "training_peak",
              "device_allocated", "device_reserved", "process_rss")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def device_bytes(device) -> tuple[int, int, int]:
    """(allocated, reserved, peak allocated) of a CUDA device; zeros for any other device."""
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return 0, 0, 0
    import torch
    return (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device),
            torch.cuda.max_memory_allocated(device))


class MemoryCollector:
    """Scrape-time memory by component. `llm` is an engine.llm_engine.LLMEngine; `training` says
    whether a trainer runs in this process (training_peak is 0 without one)."""

    def __init__(self, model_name: str, llm, training: bool):
        self.model_name, self.llm, self.training = model_name, llm, training
        runner = llm.runner
        self._weights = tensor_bytes(runner.model.parameters())
        self._kv = tensor_bytes(t for pair in runner.kv_caches for t in pair)

    def describe(self):
        return []            # names are dynamic; registering must not call collect()

    def sizes(self) -> dict[str, int]:
        pool = self.llm.activation_pool
        pooled = pool.stats()["bytes"] if pool is not None else {}
        allocated, reserved, peak = device_bytes(self.llm.device)
        resident = self._weights + self._kv + pooled.get("device", 0)
        return {"weights": self._weights, "kv_cache": self._kv,
                "activation_pool_device": pooled.get("device", 0),
                "activation_pool_cpu": pooled.get("cpu", 0),
                "training_peak": max(0, peak - resident) if self.training and peak else 0,
                "device_allocated": allocated, "device_reserved": reserved,
                "process_rss": process_rss_bytes()}

    def collect(self):
        family = GaugeMetricFamily("alchemist_memory_bytes", "Memory of this process by component.",
                                   labels=["model_name", "component"])
        for component, value in self.sizes().items():
            family.add_metric([self.model_name, component], float(value))
        yield family
