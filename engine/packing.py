"""Projections that share an input (q|k|v, gate|up) run as one GEMM on CUDA.

`pack_linears` moves the weights of several plain `nn.Linear` modules into one buffer and re-points
each module's weight at its slice, so memory is unchanged, parameter names stay HF's, and loading or
copying into any one projection writes the packed buffer. Adapter wrappers (trainer.lora.LoRALinear:
`base`, `lora_A` [r, in], `lora_B` [out, r], `scaling`) keep their base packed; `pack_lora` does the
same for their LoRA factors (one A, one block-diagonal B per group), so a group's adapters cost two
GEMMs in serving instead of two per projection.

How serving adds a group's adapter is the engine's `lora_kernel` (`set_lora_kernel`): "torch" (the
two GEMMs), "triton" (engine/kernels/lora.py: one shrink, one in-place expand reading only B's
diagonal blocks) or "folded" (A's rows appended to the base weight buffer, so the base GEMM also
yields x @ A^T; then the expand). Every adapter-wrapped projection then has a `LoRAGroup`, on the
first module of its group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from engine.config import LORA_KERNELS
from engine.kernels.lora import LoRASlices, lora_add, lora_expand, make_slices


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
    """`pack_lora` over every projection group of a Llama-family model; how many groups it packed.
    Then every adapter gets its serving `LoRAGroup` with the model's `lora_kernel` (set_lora_kernel)."""
    if getattr(getattr(model, "model", None), "layers", None) is None:
        return 0
    packed = sum(pack_lora(group) for group in projection_groups(model))
    set_lora_kernel(model, model.__dict__.get("lora_kernel", "torch"))
    return packed


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
    group = lora_group((module,))
    if group is not None:                           # lora_kernel triton / folded: the fused kernels
        return group.add(base_out, x)
    return lora_added(base_out, x, a, module.lora_B, module.scaling)


def lora_added(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """y [T, out] + alpha * (x [T, in] @ A^T) @ B^T, A [r, in], B [out, r]: two GEMMs, out of place."""
    return torch.addmm(y, F.linear(x, a), b.t(), alpha=alpha)


@dataclass(eq=False)
class LoRAGroup:
    """How serving adds the adapter of one projection group (q|k|v, gate|up: packed) or of one
    projection, under lora_kernel triton or folded; kept on the group's first module as `lora_group`."""
    modules: tuple[nn.Module, ...]
    a: torch.Tensor                   # [R, in]: the projections' A stacked (their lora_A are views of it)
    b: torch.Tensor                   # [out, R]: block-diagonal over the projections
    scaling: float
    slices: LoRASlices
    folded: tuple[torch.Tensor, torch.Tensor | None] | None = None   # [out + R, in] base rows then A's; bias

    def base(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in], bias) of the group's base projection(s), as one GEMM's operands."""
        if len(self.modules) == 1:
            return self.modules[0].base.weight, self.modules[0].base.bias
        return packed_weights(tuple(m.base for m in self.modules))

    def add(self, y: torch.Tensor, x: torch.Tensor, s: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """y [T, out] + the adapter's delta of x [T, in] (s [T, R] = x @ A^T when the folded GEMM made
        it), into `out` (y itself: in place) or a new tensor."""
        if s is None:
            return lora_add(y, x, self.a, self.b, self.scaling, self.slices, out)
        return lora_expand(y, s, self.b, self.scaling, self.slices, out)


def lora_group(modules: tuple[nn.Module, ...]) -> LoRAGroup | None:
    """The LoRAGroup of exactly these projections (lora_kernel triton / folded); None otherwise."""
    group = modules[0].__dict__.get("lora_group")
    if group is None or len(group.modules) != len(modules):
        return None
    return group


def set_lora_kernel(model: nn.Module, kernel: str) -> int:
    """How serving adds LoRA on `model` (EngineConfig.lora_kernel): kept on the model for adapters
    applied later (pack_model_lora), and given to those applied already; how many groups it made.
    "folded" re-allocates each group's base weights (+ A's rows): do it before CUDA graphs are captured."""
    if kernel not in LORA_KERNELS:
        raise ConfigError(f"lora_kernel={kernel!r}: use one of {LORA_KERNELS}")
    model.__dict__["lora_kernel"] = kernel
    adapters = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base")]
    for m in adapters:
        m.__dict__.pop("lora_group", None)
    groups = [] if kernel == "torch" else _lora_groups(model, adapters)
    with torch.no_grad():
        for group in groups:
            if kernel == "folded":
                _fold(group)
            group.modules[0].__dict__["lora_group"] = group
    model.__dict__["lora_groups"] = groups
    return len(groups)


def _lora_groups(model: nn.Module, adapters: list[nn.Module]) -> list[LoRAGroup]:
    """A group per packed projection group (pack_lora), one per other adapter-wrapped projection."""
    found, covered = [], set()
    has_layers = getattr(getattr(model, "model", None), "layers", None) is not None
    for modules in projection_groups(model) if has_layers else []:
        packed = packed_lora(tuple(modules))
        if packed is not None:
            found.append((tuple(modules), packed[0], packed[1]))
            covered.update(id(m) for m in modules)
    found += [((m,), m.lora_A, m.lora_B) for m in adapters if id(m) not in covered]
    return [LoRAGroup(modules, a, b, modules[0].scaling,
                      make_slices([m.lora_B.shape[0] for m in modules], [m.lora_A.shape[0] for m in modules],
                                  a.device))
            for modules, a, b in found]


def _fold(group: LoRAGroup) -> None:
    """One buffer [out + R, in]: the base weight rows, then A's (a copy: offers write A's own buffer,
    `refresh_folded_lora` copies it here); the bases (and the packed view) re-pointed at their rows."""
    weight, bias = group.base()
    if weight.dtype != group.a.dtype:
        raise ConfigError(f"lora_kernel=folded needs the LoRA factors in the base dtype ({weight.dtype}, "
                          f"not {group.a.dtype}): use lora_kernel=triton")
    full = torch.cat([weight.data, group.a.data])                             # [out + R, in]
    full_bias = None if bias is None else torch.cat([bias.data, bias.new_zeros(group.slices.rank)])
    row = 0
    for m in group.modules:
        n = m.base.out_features
        m.base.weight.data = full[row:row + n]
        if full_bias is not None:
            m.base.bias.data = full_bias[row:row + n]
        row += n
    if len(group.modules) > 1:
        group.modules[0].base.packed = (full[:row], None if full_bias is None else full_bias[:row])
    group.folded = (full, full_bias)


@torch.no_grad()
def refresh_folded_lora(model: nn.Module) -> None:
    """After an adapter version went live (its A written into the adapters' buffers): copy A into the
    folded weight rows, one launch for the model, ordered on the current stream. No-op unless folded."""
    groups = [g for g in model.__dict__.get("lora_groups", ()) if g.folded is not None]
    if groups:
        torch._foreach_copy_([g.folded[0][g.slices.out_features:] for g in groups], [g.a.data for g in groups])
