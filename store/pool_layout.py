"""The activation pool's shapes and records: which projections it stores and how they are grouped,
what one captured token costs, one record's bookkeeping, and the small pure helpers the pool uses
(budget -> slots, position ranges, the fetch-vs-recompute hedge)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from common.errors import ConfigError, InvalidRequestError
from common.model_shape import head_dim

TIERS = ("device", "cpu", "dropped")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")      # the base projections of a decoder layer
GROUPS = (("q", "k", "v"), ("gate", "up"))   # one GEMM each on CUDA (engine/packing.py): one pool buffer each


def projection_dims(hf_config) -> dict[str, int]:
    """kind -> output width of that projection in a model of `hf_config` (a Llama-family config)."""
    heads, kv, d = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    return {"q": heads * d, "k": kv * d, "v": kv * d, "o": h, "gate": i, "up": i, "down": h}


class ActivationMissingError(LookupError):
    """An internal signal, not a client error: the rows asked for are not in the pool (unknown,
    released, dropped or never captured), so the trainer recomputes them."""


@dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    dims: dict[str, int]                     # kind -> output width, e.g. {"q": 2048, "k": 512, ...}
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = torch.device("cpu")
    # kinds stored side by side in one [slots, sum(dims)] buffer per layer (the projections that run
    # as one GEMM, e.g. ("q", "k", "v")): written and gathered as one; a kind in no group stands alone
    groups: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if self.num_layers < 1 or not self.dims or any(d < 1 for d in self.dims.values()):
            raise ConfigError(f"activation pool layout needs num_layers >= 1 and positive dims, "
                              f"got num_layers={self.num_layers} dims={self.dims}")
        object.__setattr__(self, "dims", dict(self.dims))
        object.__setattr__(self, "device", torch.device(self.device))
        grouped = [kind for group in self.groups for kind in group]
        if len(set(grouped)) != len(grouped) or not set(grouped) <= set(self.dims):
            raise ConfigError(f"activation pool groups {self.groups} must name each kind of {list(self.dims)} "
                              "at most once")
        alone = tuple((kind,) for kind in self.dims if kind not in grouped)
        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups if g) + alone)

    @classmethod
    def for_model(cls, hf_config, dtype: torch.dtype, device: torch.device) -> "PoolLayout":
        """Every projection of every layer of the model, grouped as serving computes them (GROUPS)."""
        return cls(hf_config.num_hidden_layers, projection_dims(hf_config), dtype, device, GROUPS)

    def width(self, kinds: tuple[str, ...]) -> int:
        return sum(self.dims[kind] for kind in kinds)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_layer_row(self) -> int:
        """Bytes of one token's outputs, all kinds, one layer."""
        return sum(self.dims.values()) * self.element_size

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_layer_row


class DeviceBuffers:
    """The device tier's tensors of a layout, `num_rows` rows each: per group one
    [layers, num_rows, width] tensor (a step slices each group's rows once), every kind a column slice."""

    def __init__(self, layout: PoolLayout, num_rows: int):
        stacked = {group: torch.empty(layout.num_layers, num_rows, layout.width(group),
                                      dtype=layout.dtype, device=layout.device) for group in layout.groups}
        columns = {(kind,): part for group, rows in stacked.items()     # (kind,) -> [layers, rows, dim]
                   for kind, part in zip(group, rows.split([layout.dims[k] for k in group], dim=2))}
        layers = range(layout.num_layers)
        self.per_group = {(layer, group): rows[layer] for group, rows in stacked.items() for layer in layers}
        self.per_kind = {(layer, kind): part[layer] for (kind,), part in columns.items() for layer in layers}
        # kinds -> the rows projections `kinds` write in place: a group's tensor, or one kind's columns
        self.direct = {**columns, **stacked}


@dataclass
class ActivationRecord:
    key: Hashable
    num_tokens: int                          # rows reserved: rows [0, num_tokens)
    blocks: list[int] = field(default_factory=list)
    captured: int = 0                        # rows written, contiguous from position 0
    versions: list[int] = field(default_factory=list)   # adapter version per captured row
    tier: str = "device"
    pinned: bool = False
    last_used: float = 0.0
    cpu_rows: dict[tuple[int, str], torch.Tensor] | None = None   # (layer, kind) -> [captured, dim]
    capture_stopped: bool = False            # an extend failed: later rows are never reserved
    offset: int = 0                          # sequence position of row 0 (earlier rows came from a prefix cache)


def fetch_beats_recompute(num_rows: int, bytes_per_row: int, h2d_bytes_per_s: float,
                          flops_per_s: float, flops_per_row: float) -> bool:
    """True when copying the rows in lands no later than recomputing them."""
    if min(h2d_bytes_per_s, flops_per_s) <= 0 or min(num_rows, bytes_per_row, flops_per_row) < 0:
        raise InvalidRequestError("hedging needs positive rates and non-negative sizes")
    return num_rows * bytes_per_row / h2d_bytes_per_s <= num_rows * flops_per_row / flops_per_s


def num_slots_for(layout: PoolLayout, budget_bytes: int, block_size: int) -> int:
    """Usable rows: the budget's rows less one scratch row, rounded down to whole blocks."""
    rows = budget_bytes // layout.bytes_per_token
    num_slots = max(rows - 1, 0) // block_size * block_size
    if num_slots < block_size:
        need = (block_size + 1) * layout.bytes_per_token
        raise ConfigError(
            f"activation pool budget of {budget_bytes} bytes holds {rows} token rows of "
            f"{layout.bytes_per_token} bytes ({layout.num_layers} layers); one block of "
            f"{block_size} rows plus the scratch row needs {need} bytes: raise the activation "
            f"pool budget to at least {need} bytes (or lower block_size)")
    return num_slots


def resolve_positions(record: ActivationRecord, positions: slice | None) -> tuple[int, int]:
    if positions is None:
        return 0, record.captured
    if not isinstance(positions, slice) or positions.step not in (None, 1):
        raise InvalidRequestError(f"positions must be a contiguous slice, got {positions!r}")
    start = 0 if positions.start is None else positions.start
    stop = record.captured if positions.stop is None else positions.stop
    if start < 0 or stop < start:
        raise InvalidRequestError(f"bad positions {positions!r} (negative or reversed)")
    if stop > record.captured:
        raise ActivationMissingError(f"rows [{record.captured}, {stop}) of {record.key!r} "
                                     f"were not captured")
    return start, stop
