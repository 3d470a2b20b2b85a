"""Fused LoRA add for serving: one shrink and one expand launch per projection group.

A group (q|k|v or gate|up packed by engine/packing.py, or one projection) serves its adapter from one
A [R, in] (the projections' A stacked) and one B [out, R], block-diagonal over the projections. What
serving computed so far (`lora_reference`, = engine.packing.lora_added) is two GEMMs,
y + alpha * (x @ A^T) @ B^T, the second also multiplying B's zero blocks and writing a new output.
The Triton path (engine/kernels/lora_triton.py) shrinks in one launch and expands in another, in
place into y (or into `out`), each output column reading only its own projection's rank columns.

`lora_shrink` / `lora_expand` / `lora_add` pick Triton on CUDA for bf16/fp16 tensors (and anywhere
under TRITON_INTERPRET=1, for CPU tests); elsewhere, or without Triton, the torch reference runs:
the same signatures, exactly today's result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import ConfigError

try:
    from engine.kernels import lora_triton
except ImportError:                      # no Triton (CPU wheels): the reference runs
    lora_triton = None

TRITON_DTYPES = (torch.bfloat16, torch.float16)
# read once, as Triton reads it when it decorates the kernels (a check per call costs prefill host time)
INTERPRET = lora_triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LoRASlices:
    """Where each projection of a group sits: output columns [out_start, out_end) add
    s[:, rank_start:rank_start + rank] @ B[those columns, the same rank columns]^T."""
    table: torch.Tensor               # [S, 4] int32 (factors' device): out_start, out_end, rank_start, rank
    count: int                        # S
    max_rank: int
    out_features: int                 # sum of the projections' outputs
    rank: int                         # R: sum of their ranks


def make_slices(out_sizes: list[int], ranks: list[int], device: torch.device | str) -> LoRASlices:
    """The slice table of projections with outputs `out_sizes` and ranks `ranks`, in group order."""
    if len(out_sizes) != len(ranks) or not out_sizes or min(out_sizes + ranks) < 1:
        raise ConfigError(f"LoRA slices: outputs {out_sizes} and ranks {ranks} must be positive and "
                          "one per projection")
    rows, out_start, rank_start = [], 0, 0
    for out, rank in zip(out_sizes, ranks):
        rows.append([out_start, out_start + out, rank_start, rank])
        out_start, rank_start = out_start + out, rank_start + rank
    table = torch.tensor(rows, dtype=torch.int32, device=device)         # table: [S, 4]
    return LoRASlices(table, len(rows), max(ranks), out_start, rank_start)


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like x (else the torch reference)."""
    if lora_triton is None:
        return False
    return INTERPRET or (x.is_cuda and x.dtype in TRITON_DTYPES)


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """s [T, R] = x [T, in] @ a [R, in]^T in x's dtype: today's first GEMM."""
    return F.linear(x, a)


def lora_expand_reference(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, alpha: float,
                          slices: LoRASlices | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, out] + alpha * s [T, R] @ b [out, R]^T over the whole B (its zero blocks too): today's
    second GEMM; into `out` when given (it may be y). s may be [splits, T, R] fp32 partials."""
    if s.dim() == 3:
        s = s.sum(0).to(b.dtype)                                          # s: [T, R]
    if out is None:
        return torch.addmm(y, s, b.t(), alpha=alpha)
    return torch.addmm(y, s, b.t(), alpha=alpha, out=out)


def lora_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                   slices: LoRASlices | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, out] + alpha * (x [T, in] @ a^T) @ b^T: exactly engine.packing.lora_added."""
    return lora_expand_reference(y, lora_shrink_reference(x, a), b, alpha, slices, out)


def _dense(*tensors: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 for t in tensors)


def lora_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """s = x [T, in] @ a [R, in]^T: [T, R] (reference) or [splits, T, R] (Triton; fp32 partials when
    splits > 1). Either form is what `lora_expand` takes."""
    if not uses_triton(x) or not _dense(x, a):
        return lora_shrink_reference(x, a)
    return lora_triton.shrink(x, a)


def lora_expand(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, alpha: float, slices: LoRASlices,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, out] + alpha * s @ B^T, reading only B's diagonal blocks (Triton); into `out` when given
    (y itself: in place), else a new tensor."""
    if not uses_triton(y) or not _dense(y, s, b) or (out is not None and not _dense(out)):
        return lora_expand_reference(y, s, b, alpha, slices, out)
    if out is None:
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)        # out: [T, out_features]
    return lora_triton.expand(y, s, b, alpha, slices.table, slices.count, slices.max_rank, out)


def lora_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
             slices: LoRASlices, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, out] + alpha * (x [T, in] @ a [R, in]^T) @ b [out, R]^T: two launches on the Triton path."""
    if not uses_triton(x):
        return lora_reference(y, x, a, b, alpha, slices, out)
    return lora_expand(y, lora_shrink(x, a), b, alpha, slices, out)
