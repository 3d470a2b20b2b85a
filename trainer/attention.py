"""Causal attention over a training batch of packed records (each record attends only within itself).

Two implementations of one function:
- `per_record`: SDPA once per record. On CUDA, SDPA's flash kernel needs 4-d [1, heads, n, d] inputs
  and equal head counts (anything else falls back to the math kernel, which keeps [heads, n, n]
  probabilities for backward: quadratic memory). On the CPU, 3-d inputs keep the math kernel: the
  reference (the CPU flash kernel's blocked softmax rounds differently, which moved reuse-vs-recompute
  losses of SmolLM2 from equal to 2 ulps apart).
- `varlen`: one flash-attention call per layer over the whole batch (torch.nn.attention.varlen, with
  cu_seqlens), CUDA and 16-bit only. Two signatures of it exist: causal by `window_size`, with
  `enable_gqa` and `scale` (torch 2.13: GQA without repeating k/v), and an earlier one causal by
  `is_causal` (k/v heads repeated for GQA; without a `scale` argument only the default 1/sqrt(d)).
  Fewer calls matter more than flops here: each per-record cuDNN call costs host time forward and
  backward (per call: BENCHMARKS.md "Training on one H200", where the step goes), and the trainer's
  host time is what slows a co-located engine thread.
`causal_attention(..., kind="auto")` takes varlen where this torch offers it and the inputs qualify,
else per record.
"""
from __future__ import annotations

import inspect
import logging
import math
import threading
from functools import lru_cache

import torch
import torch.nn.functional as F

KINDS = ("auto", "varlen", "per_record")
log = logging.getLogger("alchemist.trainer")
_varlen_failed = threading.Event()    # set once if this process's varlen call failed: "auto" stops trying


@lru_cache(maxsize=1)
def varlen_function():
    """(q, k, v, cu, longest, scale) -> causal attention [T, n_heads, d] over torch's varlen_attn,
    whichever of its signatures this torch has; None without one."""
    try:
        from torch.nn.attention import varlen as module
    except ImportError:
        return None
    params = set(inspect.signature(module.varlen_attn).parameters)
    if "window_size" in params:                                  # torch >= 2.11: (-1, 0) is causal
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:                                  # the first signature
        causal = {"is_causal": True}
    else:
        return None
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def call(q, k, v, cu, longest, scale):
        extra = dict(causal)
        if takes_scale:
            extra["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
            raise NotImplementedError(f"this torch's varlen_attn has no scale argument; scale {scale} is not 1/sqrt(d)")
        if k.shape[1] != q.shape[1]:
            if takes_gqa:
                extra["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, v, q.shape[1])
        return module.varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return call


def varlen_applies(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_function() is not None
            and not _varlen_failed.is_set())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float,
                     kind: str = "auto", cu_device: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, n_heads, d], k/v: [T, n_kv, d], records at [cu_seqlens[i], cu_seqlens[i+1]) -> [T, n_heads, d].
    `cu_device`: cu_seqlens as an int32 tensor on q's device (varlen; made here if not given)."""
    if kind == "varlen":
        return varlen(q, k, v, cu_seqlens, scale, cu_device)
    if kind == "auto" and varlen_applies(q):
        try:
            return varlen(q, k, v, cu_seqlens, scale, cu_device)
        except (RuntimeError, NotImplementedError, TypeError) as err:   # e.g. no kernel for this GPU
            disable_varlen(err)
    return per_record(q, k, v, cu_seqlens, scale)


def disable_varlen(err: Exception) -> bool:
    """'auto' uses SDPA per record from now on; False if varlen was not in use anyway."""
    if varlen_function() is None or _varlen_failed.is_set():
        return False
    log.warning("varlen attention failed (%s); training uses SDPA per record from now on", err)
    _varlen_failed.set()
    return True


def varlen(q, k, v, cu_seqlens: list[int], scale: float, cu_device: torch.Tensor | None = None) -> torch.Tensor:
    fn = varlen_function()
    if fn is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen.varlen_attn")
    cu = cu_device if cu_device is not None else torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    longest = max(end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    return fn(q, k, v, cu, longest, scale)


def repeat_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, n_kv, d] -> [T, num_heads, d]: query head h reads kv head h // (num_heads / n_kv)."""
    groups = num_heads // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def per_record(q, k, v, cu_seqlens: list[int], scale: float) -> torch.Tensor:
    k, v = repeat_kv(k, v, q.shape[1])                                    # [T, n_heads, d]

    def heads_first(t):                                                   # [(1,) n_heads, n, d]
        t = t.transpose(0, 1)
        return t.unsqueeze(0) if t.is_cuda else t
    # split, not slicing: a slice's backward writes a zero [T, ...] gradient per record and sums them
    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    out = []
    for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):   # causal per record
        o = F.scaled_dot_product_attention(heads_first(qi), heads_first(ki), heads_first(vi),
                                           is_causal=True, scale=scale)
        out.append(o.reshape(o.shape[-3:]).transpose(0, 1))               # [n, n_heads, d]
    return torch.cat(out)                                                  # [T, n_heads, d]
