"""Explicit per-step metadata passed down the model (never global state)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] int64: KV cache slot of each new token
    query_start_loc: torch.Tensor     # [B+1] int32: cu_seqlens of the new tokens
    seq_lens: torch.Tensor            # [B] int32: context length of each sequence after this step
    block_tables: torch.Tensor        # [B, max_blocks] int32 (padded with 0)
    max_query_len: int
    max_seq_len: int
    is_decode: bool                   # every sequence computes exactly one token
    # host copies, used by the reference (CPU) attention path only
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v [num_blocks, block_size, n_kv, d]
    block_size: int
