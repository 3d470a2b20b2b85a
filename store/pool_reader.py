"""A training step's reads of its records' pool rows, from every tier (DESIGN §2-§3).

Each record of the batch brings a span of batch rows whose projection outputs the pool captured. Per
(layer, kinds) projection call a span's rows are injected when every one of those kinds is still held
(on the device: one gather over the device spans' slots, or from the device's retention region; on
the host: copied in when the forward reaches that layer, the next layer's copies queued behind, so
they overlap this layer's compute);
otherwise, or when the fetch planner chose to recompute that (span, layer, kind), they are multiplied
with the batch's other fresh rows. Either way the layer computes the same function, exactly.

Spans must be of records the caller pinned (a pinned record does not move between tiers)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

HELD = ("device", "retained", "cpu")


@dataclass(frozen=True)
class Span:
    key: object            # the pool record
    rows: int              # its pool rows [0, rows) ...
    batch_start: int       # ... are batch rows [batch_start, batch_start + rows)


@dataclass(frozen=True)
class HostUnit:
    """One (span, layer, kind) of host rows: what the fetch planner decides on."""
    span: int
    layer: int
    kind: str
    rows: int
    nbytes: int


class BatchRows:
    def __init__(self, pool, spans: list[Span], num_rows: int, device: torch.device, uniform: bool = False):
        """`num_rows`: the batch's rows (padding included). `uniform`: inject a span only where every
        layer and kind of it is held, so every projection call injects the same rows (`stored_idx`,
        `fresh_idx`, `rows`: the compiled layer's interface); else per (layer, kinds): `select`."""
        self.pool, self.spans, self.num_rows, self.device = pool, spans, num_rows, device
        self.views = [pool.tier_view(span.key, 0, span.rows) for span in spans]
        self.num_layers = pool.layout.num_layers
        self.recompute: set[tuple[int, int, str]] = set()          # (span, layer, kind) the planner gave up
        self.counts: Counter = Counter()          # "device/q", "retained/down", "cpu/q", "recomputed/q": rows
        self.plan_summary: dict = {}                                  # the fetch planner's, when one chose
        self._counted: set[tuple[int, tuple[str, ...]]] = set()
        self._indices: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}   # spans -> stored, fresh
        self._prefetched: dict[tuple[int, int, str], object] = {}   # (span, layer, kind) -> PendingRows
        self._run_slots: dict[tuple[int, ...], torch.Tensor] = {}             # run of device spans -> slots
        self._last_layer, self._descending = -1, False   # prefetch only while layers come in ascending order
        self.uniform = uniform
        self._uniform_spans: tuple[int, ...] | None = None

    # -- what is where ---------------------------------------------------------------
    def host_units(self) -> list[HostUnit]:
        """Every (span, layer, kind) whose rows are on the host."""
        layout = self.pool.layout
        return [HostUnit(i, layer, kind, span.rows, span.rows * layout.dims[kind] * layout.element_size)
                for i, (span, view) in enumerate(zip(self.spans, self.views))
                for kind, tier in view.tiers.items() if tier == "cpu" for layer in range(self.num_layers)]

    def plan_recompute(self, units) -> None:
        """Host rows the planner chose not to fetch this step: multiplied, like dropped rows."""
        self.recompute.update((u.span, u.layer, u.kind) for u in units)
        self._uniform_spans = None

    def _held(self, i: int, layer: int, kinds: tuple[str, ...]) -> bool:
        tiers = self.views[i].tiers
        return all(tiers[kind] in HELD and (i, layer, kind) not in self.recompute for kind in kinds)

    def injected_spans(self, layer: int, kinds: tuple[str, ...]) -> tuple[int, ...]:
        """The spans whose rows of `kinds` at `layer` are injected (uniform: of every layer and kind)."""
        if not self.uniform:
            return tuple(i for i in range(len(self.spans)) if self._held(i, layer, kinds))
        if self._uniform_spans is None:
            every = tuple(self.pool.layout.dims)
            self._uniform_spans = tuple(i for i in range(len(self.spans))
                                        if all(self._held(i, l, every) for l in range(self.num_layers)))
        return self._uniform_spans

    # -- the compiled layer's interface (uniform) --------------------------------------
    @property
    def stored_idx(self) -> torch.Tensor:
        return self._index(self.injected_spans(0, ()))[0]            # [S]

    @property
    def fresh_idx(self) -> torch.Tensor:
        return self._index(self.injected_spans(0, ()))[1]            # [F]

    def rows(self, layer: int, kinds: tuple[str, ...]) -> torch.Tensor:
        """Injected rows of `kinds` at `layer` [S, sum(dims)] in batch order (a copy)."""
        chosen = self.injected_spans(layer, kinds)
        self._count(layer, kinds, chosen)
        return self._gather(layer, kinds, chosen)

    # -- per (layer, kinds) ----------------------------------------------------------------
    def select(self, layer: int, kinds: tuple[str, ...]):
        """(stored_idx [S], fresh_idx [F], stored [S, sum(dims)]) of one projection call, or None when
        no row of it is injected (the call multiplies every row)."""
        chosen = self.injected_spans(layer, kinds)
        self._count(layer, kinds, chosen)
        if not chosen:
            return None
        stored_idx, fresh_idx = self._index(chosen)
        return stored_idx, fresh_idx, self._gather(layer, kinds, chosen)

    def _index(self, chosen: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored_idx [S], fresh_idx [F]) of the batch when the spans `chosen` are injected, cached."""
        cached = self._indices.get(chosen)
        if cached is None:
            stored = [r for i in chosen for r in range(self.spans[i].batch_start,
                                                       self.spans[i].batch_start + self.spans[i].rows)]
            taken = set(stored)
            fresh = [r for r in range(self.num_rows) if r not in taken]
            as_index = lambda rows: torch.tensor(rows, dtype=torch.int64, device=self.device)
            cached = (as_index(stored), as_index(fresh))
            self._indices[chosen] = cached
        return cached

    def _gather(self, layer: int, kinds: tuple[str, ...], chosen: tuple[int, ...]) -> torch.Tensor:
        """Rows of the chosen spans in batch order: runs of spans wholly on the device as one gather
        each, the others copied in (prefetched by the previous layer's call where it could)."""
        parts, run = [], []
        for i in chosen:
            if self._on_device(i, kinds):
                run.append(i)
                continue
            if run:
                parts.append(self._device_rows(layer, kinds, tuple(run)))
                run = []
            parts.append(self._span_rows(i, layer, kinds))
        if run:
            parts.append(self._device_rows(layer, kinds, tuple(run)))
        if layer != self._last_layer:                  # a checkpointed backward asks in descending order
            self._descending, self._last_layer = layer < self._last_layer, layer
        if not self._descending and layer < self.num_layers - 1:
            self._prefetch(layer + 1, kinds)
        return parts[0] if len(parts) == 1 else torch.cat(parts)     # [S, sum(dims)]

    def _on_device(self, i: int, kinds: tuple[str, ...]) -> bool:
        return all(self.views[i].tiers[kind] == "device" for kind in kinds)

    def _device_rows(self, layer: int, kinds: tuple[str, ...], run: tuple[int, ...]) -> torch.Tensor:
        slots = self._run_slots.get(run)
        if slots is None:                  # made once per run of spans, not per layer
            slots = self.views[run[0]].slots if len(run) == 1 else torch.cat([self.views[i].slots for i in run])
            self._run_slots[run] = slots                                   # [n]
        return self.pool.gather_slots(layer, kinds, slots)                # [n, sum(dims)]

    def _span_rows(self, i: int, layer: int, kinds: tuple[str, ...]) -> torch.Tensor:
        """One span's rows of `kinds` at `layer` [n, sum(dims)], kind by kind from where each is: host
        copies prefetched (by the previous layer's call, or `prefetch_layer`) else started now, and
        waited for here."""
        self._start_copies(i, layer, kinds)
        view = self.views[i]
        slots = lambda kind: view.retained_slots if view.tiers[kind] == "retained" else view.slots
        parts = [self._prefetched.pop((i, layer, kind)).wait() if view.tiers[kind] == "cpu"
                 else self.pool.gather_slots(layer, (kind,), slots(kind)) for kind in kinds]   # [n, dim] each
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _start_copies(self, i: int, layer: int, kinds) -> None:
        """The span's host rows of `kinds` at `layer` in flight to the device, unless they already are."""
        view = self.views[i]
        for kind in kinds:
            if view.tiers[kind] == "cpu" and (i, layer, kind) not in self._prefetched:
                self._prefetched[(i, layer, kind)] = self.pool.fetch(view.host[(layer, kind)])

    def _prefetch(self, layer: int, kinds: tuple[str, ...]) -> None:
        """Start the host copies of `layer` now, so they run while this layer computes."""
        for i in self.injected_spans(layer, kinds):
            self._start_copies(i, layer, kinds)

    def prefetch_layer(self, layer: int = 0) -> None:
        """Start every host copy `layer` will inject, now: e.g. layer 0 of the next step's batch while
        the current step's backward runs (the fetch planner's `head_start_s`)."""
        for kind in self.pool.layout.dims:
            self._prefetch(layer, (kind,))

    def _count(self, layer: int, kinds: tuple[str, ...], chosen: tuple[int, ...]) -> None:
        if (layer, kinds) in self._counted:            # a checkpointed layer asks again in backward
            return
        self._counted.add((layer, kinds))
        for i, span in enumerate(self.spans):
            for kind in kinds:
                where = self.views[i].tiers[kind] if i in chosen else "recomputed"
                self.counts[f"{where}/{kind}"] += span.rows
