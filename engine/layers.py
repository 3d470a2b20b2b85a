"""The cheap ops of a Llama layer (RMSNorm, residual add + norm, RoPE, SiLU·mul) as pure functions.

On CUDA each is compiled by torch.compile into one fused kernel (a decode step would otherwise spend
more time launching ~30 tiny kernels per layer than reading weights); on CPU the plain torch code runs,
which is the reference the equivalence tests check. `ALCHEMIST_FUSE=0` turns fusion off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

FUSE = os.environ.get("ALCHEMIST_FUSE", "1") != "0"
FUSED_RECOMPILE_LIMIT = 64      # compiled variants allowed per fused op (dynamo's default is 8)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
          sin_cache: torch.Tensor):
    """q: [T, n_heads, d], k: [T, n_kv, d]; caches [P, d] fp32, cast to q's dtype as HF does."""
    cos = cos_cache[positions].to(q.dtype)[:, None, :]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _allow_calls_while_another_thread_compiles() -> None:
    """Compiling (AOTAutograd's make_fx) raises a process-wide "FX tracing" flag for its duration;
    by default dynamo then raises in every compiled function called meanwhile, from any thread. With
    the trainer thread compiling its backward graphs while the engine thread serves (or the reverse),
    that is a crash. Off: a call made during another thread's compile runs the same function eagerly."""
    torch._dynamo.config.error_on_nested_fx_trace = False


def _allow_every_variant() -> None:
    """A fused op is compiled once per kind of call — grad mode, inference-mode tensors, views of a
    bigger buffer, one row or more, dtype — and serving plus training together come close to dynamo's
    default limit of 8 (the H200 trainer-thread test passed it once serving handed RoPE views of the
    activation pool); with fullgraph=True the next kind raises inside the step that meets it (a 500 for
    its requests). The kinds are few and fixed: allow them all."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FUSED_RECOMPILE_LIMIT)


def _no_gemm_padding() -> None:
    """Inductor's pad_mm pass decides whether to pad a GEMM by its row count and guards on that range
    (the H200 saw `13 <= x.size()[0] <= 255`): a compiled training layer warmed up on a short batch
    then recompiled, for minutes at 8B, at the first long one. Off, one graph serves every length. Set
    in the config (read when compiling), not as torch.compile options: with those, serving prefills on
    the H200 were slower (the TTFT with and without them: BENCHMARKS.md "Capture overhead on one H200",
    `64e3f8f`)."""
    import torch._inductor.config as inductor_config
    inductor_config.shape_padding = False


def compile_fused(fn, backend: str = "inductor"):
    _allow_calls_while_another_thread_compiles()
    _allow_every_variant()
    _no_gemm_padding()
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


def _fusable(fn):
    compiled = None

    def run(*args):
        nonlocal compiled
        if not (FUSE and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args)        # CPU, fusion off, or traced into a bigger compiled graph that fuses it
        if compiled is None:
            compiled = compile_fused(fn)
        return compiled(*args)

    run.__name__ = fn.__name__.lstrip("_")
    run.reference = fn
    return run


rms_norm = _fusable(_rms_norm)
add_rms_norm = _fusable(_add_rms_norm)
rope = _fusable(_rope)
silu_mul = _fusable(_silu_mul)
