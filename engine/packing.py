"""Projections that share an input (q|k|v, gate|up) run as one GEMM on CUDA.

`pack_linears` moves the weights of several plain `nn.Linear` modules into one buffer and re-points
each module's weight at its slice, so memory is unchanged, parameter names stay HF's, and loading or
copying into any one projection writes the packed buffer. A module replaced by a wrapper (an adapter)
falls back to separate projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pack_linears(linears: list[nn.Linear]) -> None:
    weight = torch.cat([lin.weight.data for lin in linears])                 # [sum(out), in]
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.data for lin in linears])
    offset = 0
    for lin in linears:
        n = lin.out_features
        lin.weight.data = weight[offset:offset + n]
        if bias is not None:
            lin.bias.data = bias[offset:offset + n]
        offset += n
    linears[0].packed = (weight, bias)


def packed_weights(linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [sum(out), in], bias) of projections packed together and unwrapped; None otherwise."""
    packed = getattr(linears[0], "packed", None)
    if packed is None or len(linears) < 2 or not all(type(lin) is nn.Linear for lin in linears):
        return None
    return packed


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b -> [T, out_features]; written into `out` (e.g. activation-pool rows) when given."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def pack_model(model: nn.Module) -> None:
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        pack_linears([mlp.gate_proj, mlp.up_proj])
