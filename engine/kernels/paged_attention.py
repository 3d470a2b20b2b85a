"""Triton paged attention for CUDA: one kernel for prefill chunks, mixed batches and decode.

A program handles (sequence b, KV head h, tile of BLOCK_Q query tokens). The rows of its Q tile are
BLOCK_Q tokens x the G query heads that share KV head h (GQA), so a decode step still fills an MMA
tile. Keys stream through in BLOCK_N chunks gathered from the block table; online softmax in fp32.
Loop bounds come from device tensors only, so the kernel is CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    Q, K, V, O, BLOCK_TABLES, QUERY_START, SEQ_LENS, qk_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, PAGE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(SEQ_LENS + b)
    first_pos = ctx_len - q_len                                   # position of the first new token
    M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, M)
    qi = tile * BLOCK_Q + r // G_PAD                              # query token within the sequence
    g = r % G_PAD                                                 # query head within the group
    row_ok = (qi < q_len) & (g < G)
    d = tl.arange(0, D)
    q = tl.load(Q + (q_start + qi)[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)                  # q: [M, D]
    q_pos = first_pos + qi
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    hi = first_pos + tl.minimum((tile + 1) * BLOCK_Q, q_len)      # keys [0, hi) can be seen by this tile
    for start in range(0, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(BLOCK_TABLES + b * stride_bt + n // PAGE, mask=n_ok, other=0)
        slot = page.to(tl.int64) * PAGE + n % PAGE
        kv_off = slot[:, None] * stride_ks + h * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)      # k: [N, D]
        s = tl.dot(q, tl.trans(k)) * qk_scale_log2                  # s: [M, N] (log2 units)
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + (q_start + qi)[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta, scale: float) -> torch.Tensor:
    """q: [T, n_heads, d]; caches [num_blocks, page, n_kv, d] -> o: [T, n_heads, d]. `meta`: an
    engine.attention.AttentionMetadata (its device tensors and max_query_len / is_decode)."""
    _, n_heads, head_dim = q.shape
    page, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    g_pad = triton.next_power_of_2(group)
    block_q = max(1, (16 if meta.is_decode else 64) // g_pad)
    o = torch.empty_like(q)
    batch = meta.seq_lens.shape[0]
    grid = (batch, n_kv, triton.cdiv(meta.max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, o, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0),
        G=group, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=64, D=head_dim, PAGE=page,
        num_warps=4, num_stages=2)
    return o
