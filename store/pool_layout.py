"""The activation pool's shapes and records: which projections it stores and how they are grouped,
what one captured token costs, one record's bookkeeping, and the small pure helpers the pool uses
(budget -> slots, position ranges)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from common.errors import ConfigError, InvalidRequestError
from common.model_shape import head_dim

TIERS = ("device", "retained", "cpu", "dropped")   # best first; "retained": the device's retention region
KINDS = ("q", "k", "v", "o", "gate", "up", "down")      # the base projections of a decoder layer
GROUPS = (("q", "k", "v"), ("gate", "up"))   # one GEMM each on CUDA (engine/packing.py): one pool buffer each


def projection_dims(hf_config) -> dict[str, int]:
    """kind -> output width of that projection in a model of `hf_config` (a Llama-family config)."""
    heads, kv, d = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    return {"q": heads * d, "k": kv * d, "v": kv * d, "o": h, "gate": i, "up": i, "down": h}


def projection_input_dims(dims: dict[str, int]) -> dict[str, int]:
    """kind -> input width of that projection, from the output widths of a Llama-family layer: q, k, v,
    gate and up read the hidden state (o's output), o reads the heads (q's output), down reads the MLP
    (gate's output). A kind whose input is not in `dims` counts as width 1."""
    hidden, heads, mlp = dims.get("o", 1), dims.get("q", 1), dims.get("gate", dims.get("up", 1))
    return {kind: {"o": heads, "down": mlp}.get(kind, hidden) for kind in dims}


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
    # kind -> input width: a stored row saves input-width FLOPs per byte (DESIGN §3); default from `dims`
    input_dims: dict[str, int] | None = None

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
        inputs = dict(self.input_dims or projection_input_dims(self.dims))
        if set(inputs) != set(self.dims) or any(d < 1 for d in inputs.values()):
            raise ConfigError(f"activation pool input_dims {inputs} must give each kind of {list(self.dims)} "
                              "a positive width")
        object.__setattr__(self, "input_dims", inputs)

    @classmethod
    def for_model(cls, hf_config, dtype: torch.dtype, device: torch.device) -> "PoolLayout":
        """Every projection of every layer of the model, grouped as serving computes them (GROUPS)."""
        dims = projection_dims(hf_config)
        return cls(hf_config.num_hidden_layers, dims, dtype, device, GROUPS, projection_input_dims(dims))

    @property
    def demotion_groups(self) -> tuple[tuple[str, ...], ...]:
        """Groups of kinds in the order they leave a tier under pressure: lowest FLOPs saved per byte
        (input width) first, `down` last; a group goes whole (its GEMM is injected or multiplied as
        one); among equals the group of more bytes first. 8B Llama: gate|up, q|k|v, o, down."""
        value = lambda group: min(self.input_dims[kind] for kind in group)
        rank = {group: i for i, group in enumerate(self.groups)}
        return tuple(sorted(self.groups, key=lambda g: (value(g), -self.width(g), rank[g])))

    @property
    def demotion_order(self) -> tuple[str, ...]:
        """Every kind in demotion order (`demotion_groups` flattened)."""
        return tuple(kind for group in self.demotion_groups for kind in group)

    def kind_bytes(self, kind: str, num_rows: int) -> int:
        """Bytes of `num_rows` token rows of one kind over every layer."""
        return num_rows * self.num_layers * self.dims[kind] * self.element_size

    def width(self, kinds: tuple[str, ...]) -> int:
        return sum(self.dims[kind] for kind in kinds)

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

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

    def __init__(self, layout: PoolLayout, num_rows: int, extra_rows: dict[tuple[str, ...], int] | None = None):
        """`extra_rows`: group -> rows after the `num_rows` (store/pool_retention.py)."""
        extra = extra_rows or {}
        stacked = {group: torch.empty(layout.num_layers, num_rows + extra.get(group, 0), layout.width(group),
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
    tier: str = "device"                     # the best tier of any kind (TIERS order); device: holds blocks
    pinned: bool = False
    last_used: float = 0.0
    cpu_rows: dict[tuple[int, str], torch.Tensor] | None = None   # (layer, kind) -> [captured, dim]
    capture_stopped: bool = False            # an extend failed: later rows are never reserved
    offset: int = 0                          # sequence position of row 0 (earlier rows came from a prefix cache)
    created: float = 0.0                     # time.monotonic() of the reservation (the feedback window)
    retained_blocks: list[int] = field(default_factory=list)   # blocks of the device's retention region
    kind_tiers: dict[str, str] = field(default_factory=dict)   # kind -> tier; absent: the record's tier
    finished: bool = False                   # its sequence ended: the engine asks nothing more of it

    def tier_of(self, kind: str) -> str:
        """Where this record's rows of `kind` are: device, cpu or dropped."""
        return self.kind_tiers.get(kind, self.tier)

    def kinds_on(self, tier: str, kinds) -> tuple[str, ...]:
        return tuple(kind for kind in kinds if self.tier_of(kind) == tier)


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
