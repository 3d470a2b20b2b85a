"""Triton kernels of the fused LoRA add (engine/kernels/lora.py holds the interface and the reference).

shrink: s = x @ A^T for one group's stacked A [R, in], fp32 accumulation. Few rows (decode) read the
whole A for little work, so `in` is split over programs: each writes its fp32 partial sum into
s [splits, T, R] (no atomics, no zero fill); with one split s holds x's dtype.

expand: out = y + alpha * s @ B^T with B [out, R] block-diagonal over the group's slices: a program
owns a [BLOCK_M, BLOCK_N] tile of output columns and, for each slice its columns belong to, reads only
that slice's rank columns of s and B (the slice table [S, 4] int32: out_start, out_end, rank_start,
rank), so B's zero blocks are never read. s's partials are summed and rounded to the factors' dtype
first (what two GEMMs compute). `out` may be `y` (in place).

Grids and loop bounds come from shapes only; the slice table is a device tensor made once: no host
sync, CUDA-graph safe. Under TRITON_INTERPRET=1 (CPU tests) the dots take fp32 operands (UPCAST): the
interpreter's bf16 dot is wrong, and bf16 products are exact in fp32, so only the summation order of
the GPU's fp32 accumulation differs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["T", "k_per_split"])          # one compile for every T (prefill chunks)
def _shrink_kernel(X, A, S, T, K, R, k_per_split, stride_xt, stride_ar, stride_ss, stride_st,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    m_ok = m < T
    r_ok = r < R
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)                 # acc: [BM, BR]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        x = tl.load(X + m[:, None] * stride_xt + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)        # x: [BM, BK]
        a = tl.load(A + r[:, None] * stride_ar + k[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)        # a: [BR, BK]
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, tl.trans(a))
    tl.store(S + split * stride_ss + m[:, None] * stride_st + r[None, :],
             acc.to(S.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["T", "splits"])
def _expand_kernel(Y, S, B, O, TABLE, T, N, splits, alpha,
                   stride_yt, stride_ss, stride_st, stride_bn, stride_ot,
                   NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, SPLIT_BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    m_ok = m < T
    n_ok = n < N
    tile = m_ok[:, None] & n_ok[None, :]
    y = tl.load(Y + m[:, None] * stride_yt + n[None, :], mask=tile, other=0.0)   # y: [BM, BN], early
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)                 # acc: [BM, BN]
    for i in tl.static_range(NUM_SLICES):
        out_start = tl.load(TABLE + 4 * i)
        out_end = tl.load(TABLE + 4 * i + 1)
        rank_start = tl.load(TABLE + 4 * i + 2)
        rank = tl.load(TABLE + 4 * i + 3)
        cols = rank_start + r
        tile_n = pid_n * BLOCK_N + r * 0                                 # [BR]: the tile's first column
        hit = (tile_n < out_end) & (tile_n + BLOCK_N > out_start)          # the slice meets the tile
        r_ok = (r < rank) & hit                                           # else no reads for it
        s = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)               # s: [BM, BR]
        for p0 in range(0, splits, SPLIT_BLOCK):                          # SPLIT_BLOCK partials a load
            p = p0 + tl.arange(0, SPLIT_BLOCK)
            offsets = p[:, None, None] * stride_ss + m[None, :, None] * stride_st + cols[None, None, :]
            part = tl.load(S + offsets,
                           mask=(p < splits)[:, None, None] & m_ok[None, :, None] & r_ok[None, None, :],
                           other=0.0)                                     # part: [SB, BM, BR]
            s += tl.sum(part.to(tl.float32), axis=0)
        in_slice = n_ok & (n >= out_start) & (n < out_end)
        b = tl.load(B + n[None, :] * stride_bn + cols[:, None],
                    mask=r_ok[:, None] & in_slice[None, :], other=0.0)    # b: [BR, BN] = B_i^T tile
        s = s.to(B.dtype.element_ty)                                    # rounded as s is in two GEMMs
        if UPCAST:
            s, b = s.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(s, b)
    out = y.to(tl.float32) + alpha * acc
    tl.store(O + m[:, None] * stride_ot + n[None, :], out.to(O.dtype.element_ty), mask=tile)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132                                                        # the interpreter: an H200's
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(t: int, k: int, block_m: int, block_k: int, sms: int) -> tuple[int, int]:
    """(splits, `in` per split) of the shrink: enough programs to fill the SMs, at least 512 of `in`
    each; few for many rows (T > 16), as each expand program sums its rows' partials again."""
    m_tiles = triton.cdiv(t, block_m)
    splits = max(1, min(triton.cdiv(k, 512), sms // m_tiles, 32 if t <= 16 else 4))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ a [R, in]^T -> s [splits, T, R] (fp32 partials when splits > 1, else x's dtype)."""
    t, k = x.shape
    r = a.shape[0]
    block_m = 16 if t <= 16 else 64
    block_k = 128 if t <= 16 else 64
    m_tiles = triton.cdiv(t, block_m)
    splits, k_per_split = num_splits(t, k, block_m, block_k, _multiprocessors(x.device))
    dtype = torch.float32 if splits > 1 else x.dtype
    s = torch.empty(splits, t, r, dtype=dtype, device=x.device)           # s: [splits, T, R]
    _shrink_kernel[(m_tiles, splits)](
        x, a, s, t, k, r, k_per_split, x.stride(0), a.stride(0), s.stride(0), s.stride(1),
        BLOCK_M=block_m, BLOCK_R=_block_r(r), BLOCK_K=block_k, UPCAST=UPCAST, num_warps=4)
    return s


def expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, alpha: float, table: torch.Tensor,
           num_slices: int, max_rank: int, out: torch.Tensor) -> torch.Tensor:
    """out [T, N] = y [T, N] + alpha * sum_p(s[p]) @ B^T over the slices in `table`; out may be y."""
    if s.dim() == 2:
        s = s.unsqueeze(0)                                                # s: [1, T, R]
    t, n = y.shape
    block_m = 16 if t <= 16 else 64
    block_n = 64 if t <= 16 else 128
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    split_block = max(2, min(triton.next_power_of_2(s.shape[0]), 32 if block_m == 16 else 8))
    _expand_kernel[grid](
        y, s, b, out, table, t, n, s.shape[0], float(alpha),
        y.stride(0), s.stride(0), s.stride(1), b.stride(0), out.stride(0),
        NUM_SLICES=num_slices, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(max_rank),
        SPLIT_BLOCK=split_block, UPCAST=UPCAST, num_warps=4)
    return out
