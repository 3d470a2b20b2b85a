"""Explicit per-forward context passed down the model (never global state).

The model calls three things on it: `project` (the linear projections, where serving captures
activations and training injects them), `attention`, and `call_layer`. Serving and training provide
their own implementations; the model code is the same for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention, store_kv
from engine.packing import LoRAGroup, add_lora, linear_into, lora_added, lora_group, packed_lora, packed_weights
from engine.rows import copy_rows_


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`; on CUDA through pinned memory, non-blocking (no host sync:
    the copy is ordered on the current stream)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def base_module(module: nn.Module) -> nn.Module:
    """The frozen base projection of a (possibly adapter-wrapped) projection module."""
    if type(module) is nn.Linear:       # the hot path: getattr's miss on a module raises and catches
        return module
    return getattr(module, "base", module)


class ForwardContext:
    """Interface the model calls; see ServingContext and trainer.reuse.TrainingContext."""

    def project(self, layer: int, kinds: tuple[str, ...], modules: tuple[nn.Module, ...],
                x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> torch.Tensor:
        raise NotImplementedError

    def call_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        return layer(*args)


@dataclass
class CaptureMetadata:
    """Rows of this forward to record into the activation pool ([T] slots; scratch = not recorded);
    made by `CaptureManager.begin`, read by the forward's projections and the decode graphs."""
    pool: object                      # store.activation_pool.ActivationPool
    slot_mapping: torch.Tensor | None  # [T] int64; None when first_slot is set (made on demand)
    side_stream: torch.cuda.Stream | None = None   # copy there, overlapping the next GEMMs; join() after
    first_slot: int | None = None     # every row goes to slots first_slot + [0, T): projections write there
    # kinds -> this forward's rows of every layer (made at the first call for those kinds), or None
    run_rows: dict[tuple[str, ...], tuple[torch.Tensor, ...] | None] = field(default_factory=dict)

    def destination(self, layer: int, kinds: tuple[str, ...], x: torch.Tensor) -> torch.Tensor | None:
        """The pool rows [T, sum(dims)] that the projections `kinds` of x [T, in] write directly (no
        copy) when every row of this forward is recorded in one run of slots; None otherwise. One
        slice per kinds and forward, not per layer: a prefill's host time is the TTFT (host-bound)."""
        if self.first_slot is None:
            return None
        if kinds not in self.run_rows:
            buffer = self.pool.direct_buffers.get(kinds)                # [layers, slots + 1, sum(dims)]
            usable = buffer is not None and buffer.dtype == x.dtype
            self.run_rows[kinds] = buffer[:, self.first_slot:self.first_slot + x.shape[0]].unbind(0) \
                if usable else None
        rows = self.run_rows[kinds]
        return None if rows is None else rows[layer]

    def slots(self, count: int, device: torch.device) -> torch.Tensor:
        """The [T] slot mapping of this forward's T = `count` rows; made once, on demand, when the rows
        are one run of slots (`first_slot`)."""
        if self.slot_mapping is None:
            self.slot_mapping = torch.arange(self.first_slot, self.first_slot + count, device=device)
        return self.slot_mapping

    def write(self, layer: int, kinds: tuple[str, ...], packed: torch.Tensor | None,
              outs: tuple[torch.Tensor, ...]) -> None:
        """Base outputs [T, dim] -> pool rows: one copy when they came from one GEMM into one pool group."""
        group = self.pool.group_buffer(layer, kinds) if packed is not None else None
        copies = [(group, packed)] if group is not None else \
            [(self.pool.buffer(layer, kind), out) for kind, out in zip(kinds, outs)]
        slot_mapping = self.slots(outs[0].shape[0], outs[0].device)
        if self.side_stream is None:
            for dst, src in copies:
                copy_rows_(dst, slot_mapping, src)
            return
        self.side_stream.wait_stream(torch.cuda.current_stream())     # the outputs are computed
        with torch.cuda.stream(self.side_stream):
            for dst, src in copies:
                copy_rows_(dst, slot_mapping, src)
        for _, src in copies:                   # the allocator may not reuse them before the copy ran
            src.record_stream(self.side_stream)

    def join(self) -> None:
        """After the forward: the serving stream waits for the side-stream copies (so the step's sync
        covers them, and anything that reads the pool after it sees the rows). `slot_mapping` outlives
        this wait, so it needs no record_stream."""
        if self.side_stream is not None:
            torch.cuda.current_stream().wait_stream(self.side_stream)


@dataclass
class ServingContext(ForwardContext):
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v [num_blocks, block_size, n_kv, d]
    block_size: int
    capture: CaptureMetadata | None = None

    def project(self, layer, kinds, modules, x):
        group = lora_group(modules) if type(modules[0]) is not nn.Linear else None
        if group is not None:                         # lora_kernel triton / folded
            return self._project_fused(layer, kinds, group, x)
        bases = tuple(base_module(m) for m in modules)
        sizes = [b.out_features for b in bases]
        capture = self.capture
        dest = capture.destination(layer, kinds, x) if capture is not None else None   # [T, sum(sizes)]
        weights = packed_weights(bases)
        packed = None if weights is None else linear_into(x, weights[0], weights[1], dest)   # one GEMM
        if packed is not None:
            outs = packed.split(sizes, dim=-1)
        else:
            parts = [None] * len(bases) if dest is None else (dest,) if len(bases) == 1 else dest.split(sizes, dim=-1)
            outs = tuple(linear_into(x, b.weight, b.bias, part) for b, part in zip(bases, parts))
        if capture is not None and dest is None:
            capture.write(layer, kinds, packed, outs)
        lora = packed_lora(modules) if packed is not None else None
        if lora is not None:                          # the group's adapters: two GEMMs, out of place
            a_all, b_all, scaling = lora
            return lora_added(packed, x, a_all, b_all, scaling).split(sizes, dim=-1)
        return tuple(add_lora(m, x, out) for m, out in zip(modules, outs))

    def _project_fused(self, layer: int, kinds: tuple[str, ...], group: LoRAGroup,
                       x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One base GEMM for the group (folded: [y | s] with s = x @ A^T), the capture of y's base rows,
        then the fused expand: in place into y unless y's rows are still read (pool rows, side-stream
        copies), then into a new tensor."""
        sizes = [m.base.out_features for m in group.modules]
        capture = self.capture
        dest = capture.destination(layer, kinds, x) if capture is not None else None   # [T, out]
        s = None
        if group.folded is not None and dest is None:
            full = F.linear(x, *group.folded)                            # full: [T, out + R]
            y, s = full[:, :group.slices.out_features], full[:, group.slices.out_features:]   # s: [T, R]
        else:
            y = linear_into(x, *group.base(), dest)                      # y: [T, out]
        if capture is not None and dest is None:
            capture.write(layer, kinds, y if len(sizes) > 1 else None, y.split(sizes, dim=-1))
        in_place = dest is None and (capture is None or capture.side_stream is None)
        y = group.add(y, x, s, y if in_place else None)
        return y.split(sizes, dim=-1) if len(sizes) > 1 else (y,)

    def attention(self, layer, q, k, v, scale):
        k_cache, v_cache = self.kv_caches[layer]
        store_kv(k, v, k_cache, v_cache, self.attn.slot_mapping)
        return paged_attention(q, k_cache, v_cache, self.attn, scale)
