"""Projections that share an input (q|k|v, gate|up) run as one GEMM on CUDA.

`pack_linears` moves the weights of several plain `nn.Linear` modules into one buffer and re-points
each module's weight at its slice, so memory is unchanged, parameter names stay HF's, and loading or
copying into any one projection writes the packed buffer. Adapter wrappers (trainer.lora.LoRALinear:
`base`, `lora_A` [r, in], `lora_B` [out, r], `scaling`) keep their base packed; `pack_lora` does the
same for their LoRA factors (one A, one block-diagonal B per group), so a group's adapters cost two
GEMMs in serving instead of two per projection.
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
    packed = linears[0].__dict__.get("packed")      # not getattr: a miss on a module raises inside
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


def projection_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The projections of each layer that share an input: [q, k, v] and [gate, up] (Llama family)."""
    return [group for layer in model.model.layers
            for group in ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                          [layer.mlp.gate_proj, layer.mlp.up_proj])]


def pack_model(model: nn.Module) -> None:
    """Pack each group's base weights (through adapter wrappers, whose `base` is the nn.Linear)."""
    for group in projection_groups(model):
        pack_linears([getattr(m, "base", m) for m in group])


def pack_lora(modules: list[nn.Module]) -> bool:
    """One A [sum(r), in] and one block-diagonal B [sum(out), sum(r)] (zeros off the diagonal blocks)
    for adapters on projections whose bases are packed; each module's lora_A / lora_B is re-pointed at
    its block, so publishing a version (a copy into them) writes the packed factors. False (nothing
    changed) unless every module has an adapter, with one scaling, over packed bases."""
    if not all(hasattr(m, "lora_A") for m in modules) or len({m.scaling for m in modules}) != 1 \
            or packed_weights(tuple(m.base for m in modules)) is None:
        return False
    a_all = torch.cat([m.lora_A.data for m in modules])                     # [R, in]
    b_all = a_all.new_zeros(sum(m.lora_B.shape[0] for m in modules), a_all.shape[0])   # [out, R]
    row = col = 0
    for m in modules:
        out, rank = m.lora_B.shape
        b_all[row:row + out, col:col + rank] = m.lora_B.data
        m.lora_A.data, m.lora_B.data = a_all[col:col + rank], b_all[row:row + out, col:col + rank]
        row, col = row + out, col + rank
    modules[0].packed_lora = (a_all, b_all, len(modules))
    return True


def pack_model_lora(model: nn.Module) -> int:
    """`pack_lora` over every projection group of a Llama-family model; how many groups it packed."""
    if getattr(getattr(model, "model", None), "layers", None) is None:
        return 0
    return sum(pack_lora(group) for group in projection_groups(model))


def packed_lora(modules: tuple[nn.Module, ...]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A [R, in], B [out, R], scaling) of a group packed by `pack_lora`; None otherwise."""
    packed = modules[0].__dict__.get("packed_lora")
    if packed is None or packed[2] != len(modules):
        return None
    return packed[0], packed[1], modules[0].scaling


def add_lora(module: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """base_out [T, out] + the module's LoRA delta of x [T, in] (a new tensor: base_out may be pool rows)."""
    if type(module) is nn.Linear:                   # no adapter (checked first: the hot path)
        return base_out
    a = getattr(module, "lora_A", None)
    if a is None:
        return base_out
    return lora_added(base_out, x, a, module.lora_B, module.scaling)


def lora_added(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """y [T, out] + alpha * (x [T, in] @ A^T) @ B^T, A [r, in], B [out, r]: two GEMMs, out of place."""
    return torch.addmm(y, F.linear(x, a), b.t(), alpha=alpha)
