"""Paged attention over the KV cache: its batch metadata, the KV write, and the attention itself. The
reference path (any device) is plain torch; CUDA uses the Triton kernel of engine/kernels."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.rows import copy_rows_

try:                                  # Triton ships with CUDA builds of torch only
    from engine.kernels.paged_attention import paged_attention_triton
except ImportError:
    paged_attention_triton = None


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


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, n_kv, d] into caches [num_blocks, block_size, n_kv, d] at `slot_mapping` [T]."""
    n_kv, d = k.shape[1], k.shape[2]
    copy_rows_(k_cache.view(-1, n_kv, d), slot_mapping, k)
    copy_rows_(v_cache.view(-1, n_kv, d), slot_mapping, v)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per sequence: gather every context, padded, and run one batched SDPA.
    q: [B, n_heads, d] -> [B, n_heads, d]."""
    lens = meta.seq_lens_host
    n_blocks = -(-max(lens) // k_cache.shape[1])
    n_kv, d = k_cache.shape[2], k_cache.shape[3]
    tables = meta.block_tables[:, :n_blocks].long()                               # [B, nb]
    k = k_cache[tables].reshape(len(lens), -1, n_kv, d).transpose(1, 2)           # k: [B, n_kv, L, d]
    v = v_cache[tables].reshape(len(lens), -1, n_kv, d).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < meta.seq_lens.to(q.device)[:, None]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)              # o: [B, n_heads, 1, d]
    return o[:, :, 0, :]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, n_heads, d], caches [num_blocks, block_size, n_kv, d] -> [T, n_heads, d]; causal within
    each sequence's context."""
    if meta.is_decode and len(meta.seq_lens_host) > 1:
        return decode_attention_reference(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    n_kv, d = k_cache.shape[2], k_cache.shape[3]
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    for i, ctx_len in enumerate(lens):
        q_start, q_end = qsl[i], qsl[i + 1]
        n_q = q_end - q_start
        n_blocks = -(-ctx_len // k_cache.shape[1])
        blocks = meta.block_tables[i, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, n_kv, d)[:ctx_len]            # k: [L, n_kv, d]
        v = v_cache[blocks].reshape(-1, n_kv, d)[:ctx_len]
        q_pos = torch.arange(ctx_len - n_q, ctx_len, device=q.device)
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]   # [n_q, L]
        o = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True)               # o: [n_heads, n_q, d]
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)
