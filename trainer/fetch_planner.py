"""Hedged fetch (DESIGN §3): which host-tier rows a training step copies in, and which it recomputes.

A host row of a projection with input width `d_in` saves `d_in` FLOPs per byte copied, but a copy
pays only when it lands before the forward needs it: at 44.5 GB/s pinned H2D a whole token's rows
take longer to copy than to recompute. The planner models the step's forward as layers of GEMM time
(from the measured GEMM rate), each layer's host rows copied on one copy stream (in layer order, at
the measured H2D bandwidth), a layer's copies starting no earlier than the previous layer starts (the
reader prefetches one layer ahead; `head_start_s` lets layer 0's start earlier, e.g. behind the
previous step's backward). It takes units highest FLOPs-saved per byte first and keeps each one
whose copy, with everything chosen before it, still lands before its layer starts, the layers
starting earlier by the GEMMs the chosen rows skip. Everything else is recomputed, so the forward
never waits on a copy: a planned step is never slower than recomputing it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from common.errors import ConfigError


@dataclass(frozen=True)
class Rates:
    h2d_bytes_per_s: float          # pinned host -> device copy bandwidth
    flops_per_s: float              # the training forward's GEMM rate

    def __post_init__(self):
        if not (self.h2d_bytes_per_s > 0 and self.flops_per_s > 0):
            raise ConfigError(f"fetch planning needs positive rates, got {self}")


@dataclass(frozen=True)
class Candidate:
    unit: object                    # what the caller decides on (store.pool_reader.HostUnit)
    layer: int
    nbytes: int                     # bytes to copy
    flops: float                    # GEMM FLOPs the copy saves


@dataclass
class FetchPlan:
    fetch: list = field(default_factory=list)          # units copied in
    recompute: list = field(default_factory=list)      # units multiplied
    transfer_s: float = 0.0                            # copy time of `fetch`
    recompute_s: float = 0.0                           # the step's forward GEMM time with nothing fetched
    planned_s: float = 0.0                             # ... with this plan (never more than recompute_s)

    @property
    def summary(self) -> dict:
        return {"fetched_units": len(self.fetch), "recomputed_units": len(self.recompute),
                "fetched_bytes": sum(c.nbytes for c in self.fetch), "transfer_s": self.transfer_s,
                "recompute_s": self.recompute_s, "planned_s": self.planned_s}


def plan_fetches(candidates: list[Candidate], layer_s: list[float], rates: Rates,
                 head_start_s: float = 0.0) -> FetchPlan:
    """`layer_s`: each layer's forward GEMM time when nothing is fetched. Returns the plan, its units
    being the candidates' `unit`s."""
    num_layers = len(layer_s)
    load = [0.0] * num_layers                   # copy seconds chosen per layer
    saved = [0.0] * num_layers                  # GEMM seconds the chosen copies skip per layer
    order = sorted(candidates, key=lambda c: (-c.flops / max(c.nbytes, 1), c.layer))
    plan = FetchPlan(recompute_s=sum(layer_s))
    for c in order:
        copy_s, skip_s = c.nbytes / rates.h2d_bytes_per_s, c.flops / rates.flops_per_s
        load[c.layer] += copy_s
        saved[c.layer] += skip_s
        if _lands_in_time(layer_s, load, saved, head_start_s):
            plan.fetch.append(c.unit)
            plan.transfer_s += copy_s
        else:
            load[c.layer] -= copy_s
            saved[c.layer] -= skip_s
            plan.recompute.append(c.unit)
    plan.planned_s = sum(max(s - skip, 0.0) for s, skip in zip(layer_s, saved))
    return plan


def _lands_in_time(layer_s: list[float], load: list[float], saved: list[float], head_start_s: float) -> bool:
    """Whether one copy stream, taking the layers' loads in order, each no earlier than the previous
    layer's start (layer 0's: `head_start_s` before it), finishes each before its layer starts."""
    start, copy_end, previous_start = 0.0, float("-inf"), -head_start_s
    for layer in range(len(layer_s)):
        if load[layer]:
            copy_end = max(copy_end, previous_start) + load[layer]
            if copy_end > start + 1e-15:
                return False
        previous_start = start
        start += max(layer_s[layer] - saved[layer], 0.0)
    return True


class FetchPlanner:
    """What the training step asks (trainer/step.py: build_injection): `plan(units, layout, num_rows)`
    over store.pool_reader.HostUnit's. Rates are measured at start-up (`measure_rates`) and may be
    replaced as they are re-measured (`rates` is a plain attribute)."""

    def __init__(self, rates: Rates, head_start_s: float = 0.0):
        self.rates, self.head_start_s = rates, head_start_s

    def plan(self, units: list, layout, num_rows: int) -> FetchPlan:
        """`layout`: the pool's PoolLayout (widths per kind); `num_rows`: the step's batch rows (every
        row of every projection is multiplied when nothing is injected)."""
        per_row = sum(2.0 * layout.input_dims[kind] * dim for kind, dim in layout.dims.items())
        layer_s = [num_rows * per_row / self.rates.flops_per_s] * layout.num_layers
        saved = lambda u: 2.0 * u.rows * layout.input_dims[u.kind] * layout.dims[u.kind]   # GEMM FLOPs
        candidates = [Candidate(u, u.layer, u.nbytes, saved(u)) for u in units]
        return plan_fetches(candidates, layer_s, self.rates, self.head_start_s)


def measure_rates(device: torch.device, dtype: torch.dtype = torch.bfloat16, mib: int = 64,
                  gemm: int = 2048) -> Rates:
    """H2D bandwidth from a pinned buffer of `mib` MiB and the GEMM rate of a `gemm`-square matmul on
    `device`, each the best of three timed runs after a warm-up."""
    cuda = device.type == "cuda"
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=cuda)
    a = torch.randn(gemm, gemm, device=device).to(dtype)

    def best(run) -> float:
        times = []
        for _ in range(4):
            if cuda:
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - begin)
        return max(min(times[1:]), 1e-9)
    copy_s = best(lambda: host.to(device, non_blocking=cuda, copy=True))
    gemm_s = best(lambda: a @ a)
    return Rates(host.numel() / copy_s, 2.0 * gemm ** 3 / gemm_s)


def planner_for(pool, device: torch.device) -> FetchPlanner | None:
    """The trainer's planner: on CUDA with a host tier, rates measured now (start-up); else None (every
    host row is fetched: on the CPU a "copy" is a read of the same memory)."""
    if pool is None or device.type != "cuda" or not pool.stats()["capacity_bytes"]["cpu"]:
        return None
    return FetchPlanner(measure_rates(device, pool.layout.dtype))
