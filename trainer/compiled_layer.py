"""The training layer under torch.compile: each decoder layer's forward, and through AOTAutograd its
backward, as one compiled graph, so the cheap ops, LoRA adds, casts and copies around the GEMMs fuse
and the host launches far fewer kernels (what that buys over compiling only the cheap ops one by one,
in DESIGN §2's prototype and here: BENCHMARKS.md "Training on one H200").

It is the same model code that serves. One graph serves every layer because nothing inside it is
looked up by layer index or by module: `LayerContext` carries this layer's LoRA factors (per
projection call, in the model's call order) and its injected pool rows, both taken outside the graph,
and the batch's attention bounds as a tensor and an int. A model layer's projections are found by
their HF names (`q_proj` ... `down_proj`). Two graphs in practice: the first layer (its input needs no
grad) and the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from engine.context import base_module
from engine.layers import compile_fused
from engine.packing import lora_added, packed_weights
from store.pool_layout import GROUPS, KINDS
from trainer.attention import per_record, varlen_applies, varlen_function
from trainer.reuse import InjectedLinear, ProjectingContext, lora_factors

# the kinds of each projection call a layer makes: the groups sharing an input, then the single ones
PROJECTION_CALLS = GROUPS + tuple((kind,) for kind in KINDS if not any(kind in group for group in GROUPS))


@dataclass
class LayerContext(ProjectingContext):
    """What one layer's compiled forward needs, all of it tensors or constants shared by every layer,
    keyed by the kinds each projection call asks for (a group when it is packed, else one kind)."""
    lora: dict[tuple[str, ...], list]        # kinds -> per projection (A, B, scaling) or None
    rows: dict[tuple[str, ...], torch.Tensor] | None   # kinds -> injected rows [S, sum(dims)]
    stored_idx: torch.Tensor | None          # [S] batch rows taken from `rows`
    fresh_idx: torch.Tensor | None           # [F] batch rows multiplied
    cu_seqlens: list[int]                    # per-record attention (CPU)
    cu_device: torch.Tensor | None           # [B + 1] int32, with `longest`: varlen attention
    longest: int
    varlen_call: object                      # trainer.attention.varlen_function(), or None

    def _base(self, layer, kinds, weight, bias, x):
        stored = self.rows[kinds] if self.rows is not None else None                # [S, out]
        if stored is None:
            return F.linear(x, weight, bias)                                       # [T, out]
        return InjectedLinear.apply(x, weight, bias, stored, self.stored_idx, self.fresh_idx, False)

    def _add_lora(self, kinds, modules, x, y):
        factors = lora_factors(self.lora[kinds], [base_module(m).out_features for m in modules], x.dtype)
        if factors is None:
            return y
        a_all, b_all, alpha = factors
        return lora_added(y, x, a_all, b_all, alpha)

    def attention(self, layer, q, k, v, scale):
        if self.varlen_call is not None:
            return self.varlen_call(q, k, v, self.cu_device, self.longest, scale)
        return per_record(q, k, v, self.cu_seqlens, scale)


def layer_projections(layer: nn.Module) -> dict[str, nn.Module]:
    """A decoder layer's projection modules by kind (`q` ... `down`), found by their HF names."""
    return {name.rsplit(".", 1)[-1][:-len("_proj")]: module
            for name, module in layer.named_modules() if name.endswith("_proj")}


def layer_calls(layer: nn.Module, projections: dict[str, nn.Module]) -> list[tuple[str, ...]]:
    """The kinds of each projection call the layer makes, as ProjectingContext.project asks (a packed
    group, or one kind)."""
    return [kinds for group in PROJECTION_CALLS
            for kinds in ([group] if packed_weights(tuple(base_module(projections[k]) for k in group))
                          else [(kind,) for kind in group])]


def _run(layer: nn.Module, x, positions, rotary, ctx: LayerContext) -> torch.Tensor:
    return layer(x, positions, rotary, ctx)


class CompiledLayers:
    """One per trainer (the compiled graphs are kept across steps). `backend`: torch.compile's."""

    def __init__(self, backend: str = "inductor"):
        self.run = compile_fused(_run, backend=backend)

    def layer_function(self, ctx, layer: nn.Module):
        """(x, positions, rotary) -> the layer's output through the compiled graph, for `ctx` (a
        trainer.reuse.TrainingContext). Pool rows are gathered when it runs, so a checkpointed layer
        gathers them again in backward instead of keeping them."""
        projections = layer_projections(layer)
        calls = layer_calls(layer, projections)
        lora = {kinds: [ctx.adapters.get(projections[kind]) for kind in kinds] for kinds in calls}
        index = next(m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx"))

        def forward(x, positions, rotary):
            inj = ctx.injection
            injected = inj is not None and inj.stored_idx.numel() > 0
            rows = {kinds: inj.rows(index, kinds) for kinds in calls} if injected else None
            use_varlen = ctx.attention_kind == "varlen" or (ctx.attention_kind == "auto" and varlen_applies(x))
            layer_ctx = LayerContext(lora, rows, inj.stored_idx if injected else None,
                                     inj.fresh_idx if injected else None, ctx.cu_seqlens,
                                     ctx.cu_device(x.device) if use_varlen else None,
                                     ctx.longest, varlen_function() if use_varlen else None)
            return self.run(layer, x, positions, rotary, layer_ctx)
        return forward


def compiled_layers(config, device: torch.device) -> CompiledLayers | None:
    """The trainer's CompiledLayers for a trainer.config.TrainerConfig (None: eager layers). CUDA only:
    there the batch's attention bounds are a tensor (one varlen call), while the CPU's per-record
    attention loops over the records in Python, which would compile graphs per batch size."""
    if not config.compile_layers:
        return None
    if device.type != "cuda":
        raise ConfigError("training.compile_layers needs a CUDA device (on the CPU every batch size would "
                          "compile its own graphs): set it to false")
    return CompiledLayers(config.compile_backend)
