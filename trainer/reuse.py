"""Training forward/backward through the serving model code, reusing captured activations (DESIGN §2).

The training forward runs the same `LlamaForCausalLM` with a `TrainingContext`: rows whose base
projection outputs are in the activation pool are injected (no matmul in the forward), the other
rows are multiplied; every cheap op and attention is recomputed over all rows; backward runs over all
rows into fp32 LoRA masters. `InjectedLinear`'s backward is the plain linear's (dX = dY·W; the base
is frozen), so when the stored rows equal what the base would compute, reuse and recompute compute
the same function and the same gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.context import ForwardContext, base_module, to_device
from common.errors import ConfigError
from engine.packing import packed_weights
from engine.rows import copy_rows_
from trainer.attention import KINDS as ATTENTION_KINDS, causal_attention


@dataclass
class TrainRecord:
    """One served choice: prompt + response tokens and the serving-time logprob of each response token."""
    key: Hashable
    prompt_ids: list[int]
    response_ids: list[int]
    serving_logprobs: list[float] = field(default_factory=list)
    weight: float = 1.0

    @property
    def input_ids(self) -> list[int]:          # the last response token is never an input
        return self.prompt_ids + self.response_ids[:-1]

    @property
    def num_inputs(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids) - 1


def better_response_ids(tokenizer, text: str) -> list[int]:
    """The tokens a user-written better answer trains on: its text's tokens + EOS."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return ids + ([eos] if isinstance(eos, int) else [])


def better_response_record(tokenizer, text: str, prompt_ids: list[int]) -> TrainRecord | None:
    """A user-written better answer to `prompt_ids`: an SFT target (+ EOS), trained by recompute (never
    served, so nothing was captured: key None)."""
    if tokenizer is None:
        return None
    ids = better_response_ids(tokenizer, text)
    return TrainRecord(None, prompt_ids, ids, [0.0] * len(ids), 1.0)


class InjectedLinear(torch.autograd.Function):
    """y = W·x + b, with the rows `stored_idx` taken from `stored` instead of multiplied. `stored` must
    be the caller's own copy (a pool gather): when every row is stored it becomes y — marked dirty, so
    the caller may add to y in place, or (`in_place` False: the compiled layer, whose tracer does not
    take `mark_dirty`) returned as an alias that the caller only reads. `in_place` False also builds
    a mixed y out of place: under torch 2.11's dynamo, the in-place row writes gave a wrong dX
    (BENCHMARKS.md, session 7)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stored, stored_idx, fresh_idx, in_place=True):
        # x: [T, in], stored: [S, out] -> y: [T, out]
        ctx.save_for_backward(weight)
        if not fresh_idx.numel():                  # every row stored, in batch order: stored is y
            if stored.dtype != x.dtype:
                return stored.to(x.dtype)
            if in_place:
                ctx.mark_dirty(stored)             # y *is* the gathered copy: not a view
            return stored
        fresh = F.linear(x.index_select(0, fresh_idx), weight, bias)                 # [F, out]
        if not in_place:        # traced (see above): out of place
            y = x.new_zeros(x.shape[0], weight.shape[0])
            return y.index_copy(0, stored_idx, stored.to(y.dtype)).index_copy(0, fresh_idx, fresh)
        y = x.new_empty(x.shape[0], weight.shape[0])
        copy_rows_(y, stored_idx, stored.to(y.dtype))
        return copy_rows_(y, fresh_idx, fresh)

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y @ weight, None, None, None, None, None, None    # dX: [T, in]; the base is frozen


def lora_factors(adapters: list, out_features: list[int], dtype: torch.dtype):
    """The LoRA deltas of projections sharing one input as two GEMMs, (x @ A^T) @ B^T * alpha:
    (A stacked [sum(r), in], B block-diagonal [sum(out), sum(r)], alpha) in `dtype`; a projection
    without an adapter (None) gets a zero block. None when no projection has one."""
    present = [ad for ad in adapters if ad is not None]
    if not present:
        return None
    scalings = {scaling for _, _, scaling in present}
    alpha = scalings.pop() if len(scalings) == 1 else 1.0          # one LoRAConfig: one scaling

    def block(out, adapter):                                        # [out_i, r_i]
        if adapter is None:
            return present[0][1].new_zeros(out, 0, dtype=dtype)
        _, b, scaling = adapter
        return b.to(dtype) if scaling == alpha else b.to(dtype) * (scaling / alpha)

    a_parts = [a.to(dtype) for a, _, _ in present]
    a_all = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)                      # [R, in]
    blocks = [block(out, ad) for out, ad in zip(out_features, adapters)]
    b_all = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)                # [out, R]
    return a_all, b_all, alpha


@dataclass
class Injection:
    stored_idx: torch.Tensor                      # [S] batch rows taken from the pool
    fresh_idx: torch.Tensor                       # [F] batch rows multiplied
    rows: Callable[[int, tuple[str, ...]], torch.Tensor]   # (layer, kinds) -> stored rows [S, sum(dims)]
    # rows that differ by layer and kinds (a record's kinds on different tiers, store/pool_reader.py):
    # (layer, kinds) -> (stored_idx, fresh_idx, stored rows) or None (every row multiplied); unset:
    # every call injects `stored_idx`
    select: Callable[[int, tuple[str, ...]], tuple | None] | None = None

    def pick(self, layer: int, kinds: tuple[str, ...]):
        """(stored_idx [S], fresh_idx [F], stored [S, sum(dims)]) of one projection call, or None."""
        if self.select is not None:
            return self.select(layer, kinds)
        if not self.stored_idx.numel():
            return None
        return self.stored_idx, self.fresh_idx, self.rows(layer, kinds)


class ProjectingContext(ForwardContext):
    """The training forward's projections: q|k|v or gate|up packed as one base GEMM (or injection) with
    one LoRA pair, else one per projection. Subclasses say where the base rows come from (`_base`) and
    how the LoRA delta is added (`_add_lora`)."""

    def project(self, layer, kinds, modules, x):
        bases = tuple(base_module(m) for m in modules)
        packed = packed_weights(bases)
        if packed is not None:
            y = self._add_lora(kinds, modules, x, self._base(layer, kinds, packed[0], packed[1], x))
            return y.split([b.out_features for b in bases], dim=-1)
        return tuple(self._add_lora((kind,), (m,), x, self._base(layer, (kind,), b.weight, b.bias, x))
                     for m, kind, b in zip(modules, kinds, bases))

    def _base(self, layer, kinds, weight, bias, x):
        raise NotImplementedError

    def _add_lora(self, kinds, modules, x, y):
        raise NotImplementedError


class TrainingContext(ProjectingContext):
    def __init__(self, cu_seqlens: list[int], adapters: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, float]],
                 injection: Injection | None = None, checkpoint_layers: bool = False,
                 between_layers: Callable[[], None] | None = None, attention: str = "auto",
                 compiled=None):
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"training attention={attention!r}: use one of {ATTENTION_KINDS}")
        self.cu_seqlens = cu_seqlens
        self.longest = max((end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])), default=0)
        self.attention_kind = attention           # trainer.attention: auto | varlen | per_record
        self._cu_device: torch.Tensor | None = None
        self.adapters = adapters
        self.injection = injection
        self.checkpoint_layers = checkpoint_layers
        self.between_layers = between_layers      # called before each layer's forward and backward
        self.compiled = compiled                  # trainer.compiled_layer.CompiledLayers, or None: eager

    def _base(self, layer, kinds, weight, bias, x):
        """x @ W^T + b for the projections `kinds` (their weights concatenated), injected rows taken
        from the pool. Always a new tensor (the LoRA delta is added to it in place)."""
        picked = self.injection.pick(layer, kinds) if self.injection is not None else None
        if picked is None:
            return F.linear(x, weight, bias)                                    # [T, out]
        stored_idx, fresh_idx, stored = picked           # stored: [S, out] gathered (a copy)
        return InjectedLinear.apply(x, weight, bias, stored, stored_idx, fresh_idx)

    def _add_lora(self, kinds, modules, x, y):
        """y += the LoRA deltas of the group (lora_factors), in place: y is ours."""
        factors = lora_factors([self.adapters.get(m) for m in modules],
                               [base_module(m).out_features for m in modules], x.dtype)
        if factors is None:
            return y
        a_all, b_all, alpha = factors
        return y.addmm_(F.linear(x, a_all), b_all.t(), alpha=alpha)

    def cu_device(self, device: torch.device) -> torch.Tensor:
        """cu_seqlens as int32 on `device` [B + 1]: made once per step, used by every layer."""
        if self._cu_device is None:
            self._cu_device = to_device(self.cu_seqlens, torch.int32, device)     # no wait for the device
        return self._cu_device

    def attention(self, layer, q, k, v, scale):
        cu = self.cu_device(q.device) if q.is_cuda else None
        return causal_attention(q, k, v, self.cu_seqlens, scale, self.attention_kind, cu)

    def call_layer(self, layer, *args):
        if self.between_layers is not None:
            self.between_layers()
        if self.compiled is not None:           # args: x, positions, rotary, self
            layer, args = self.compiled.layer_function(self, layer), args[:-1]
        if self.checkpoint_layers:
            out = checkpoint(layer, *args, use_reentrant=False)
        else:
            out = layer(*args)
        if self.between_layers is not None and out.requires_grad:   # runs before this layer's backward
            out.register_hook(self._before_backward)
        return out

    def _before_backward(self, grad: torch.Tensor) -> None:
        self.between_layers()
