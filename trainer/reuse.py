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

from engine.context import ForwardContext, base_module
from engine.packing import project as project_bases


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


def better_response_record(tokenizer, text: str, prompt_ids: list[int]) -> TrainRecord | None:
    """A user-written better answer to `prompt_ids`: an SFT target (+ EOS), trained by recompute (never
    served, so nothing was captured: key None)."""
    if tokenizer is None:
        return None
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    ids = ids + ([eos] if isinstance(eos, int) else [])
    return TrainRecord(None, prompt_ids, ids, [0.0] * len(ids), 1.0)


class InjectedLinear(torch.autograd.Function):
    """y = W·x + b, with the rows `stored_idx` taken from `stored` instead of multiplied."""

    @staticmethod
    def forward(ctx, x, weight, bias, stored, stored_idx, fresh_idx):
        # x: [T, in], stored: [S, out] -> y: [T, out]
        if not fresh_idx.numel():                  # every row stored, in batch order: stored is y
            ctx.save_for_backward(weight)
            return stored.to(x.dtype)
        y = x.new_empty(x.shape[0], weight.shape[0])
        y.index_copy_(0, stored_idx, stored.to(y.dtype))
        y.index_copy_(0, fresh_idx, F.linear(x.index_select(0, fresh_idx), weight, bias))
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y @ weight, None, None, None, None, None          # dX: [T, in]; the base is frozen


@dataclass
class Injection:
    stored_idx: torch.Tensor                      # [S] batch rows taken from the pool
    fresh_idx: torch.Tensor                       # [F] batch rows multiplied
    rows: Callable[[int, str], torch.Tensor]      # (layer, kind) -> stored rows [S, dim]


class TrainingContext(ForwardContext):
    def __init__(self, cu_seqlens: list[int], adapters: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, float]],
                 injection: Injection | None = None, checkpoint_layers: bool = False,
                 between_layers: Callable[[], None] | None = None):
        self.cu_seqlens = cu_seqlens
        self.adapters = adapters
        self.injection = injection
        self.checkpoint_layers = checkpoint_layers
        self.between_layers = between_layers      # called before each layer's forward and backward

    def project(self, layer, kinds, modules, x):
        bases = tuple(base_module(m) for m in modules)
        if self.injection is None or not self.injection.stored_idx.numel():
            outs = project_bases(x, bases)
        else:
            outs = self._injected(layer, kinds, bases, x)
        return tuple(self._add_lora(m, x, out) for m, out in zip(modules, outs))

    def _injected(self, layer, kinds, bases, x):
        inj = self.injection
        stored = [inj.rows(layer, kind) for kind in kinds]
        packed = getattr(bases[0], "packed", None)
        if packed is not None and len(bases) > 1:
            y = InjectedLinear.apply(x, packed[0], packed[1], torch.cat(stored, dim=-1), inj.stored_idx, inj.fresh_idx)
            return y.split([b.out_features for b in bases], dim=-1)
        return tuple(InjectedLinear.apply(x, b.weight, b.bias, s, inj.stored_idx, inj.fresh_idx)
                     for b, s in zip(bases, stored))

    def _add_lora(self, module, x, out):
        adapter = self.adapters.get(module)
        if adapter is None:
            return out
        a, b, scaling = adapter                                   # fp32 masters, used in x's dtype
        xa = F.linear(x, a.to(x.dtype))                           # [T, r]
        return torch.addmm(out, xa, b.to(x.dtype).t(), alpha=scaling)   # out + scaling * xa @ B^T, one GEMM

    def attention(self, layer, q, k, v, scale):
        # q: [T, n_heads, d], k/v: [T, n_kv, d]. On CUDA, SDPA's flash kernel needs 4-d [1, heads, n, d]
        # inputs and equal head counts; anything else falls back to the math kernel, which keeps
        # [n_heads, n, n] probabilities for backward (quadratic memory and time). On the CPU, 3-d
        # inputs keep the math kernel: the reference (the CPU flash kernel's blocked softmax rounds
        # differently, which moved reuse-vs-recompute losses of SmolLM2 from equal to 2 ulps apart).
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)   # [T, n_heads, d]
        def heads_first(t, start, end):                                       # [(1,) n_heads, n, d]
            t = t[start:end].transpose(0, 1)
            return t.unsqueeze(0) if t.is_cuda else t
        out = []
        for start, end in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):   # causal within each record
            o = F.scaled_dot_product_attention(heads_first(q, start, end), heads_first(k, start, end),
                                               heads_first(v, start, end), is_causal=True, scale=scale)
            out.append(o.reshape(o.shape[-3:]).transpose(0, 1))               # [n, n_heads, d]
        return torch.cat(out)                                                  # [T, n_heads, d]

    def call_layer(self, layer, *args):
        if self.between_layers is not None:
            self.between_layers()
        if self.checkpoint_layers:
            out = checkpoint(layer, *args, use_reentrant=False)
        else:
            out = layer(*args)
        if self.between_layers is not None and out.requires_grad:   # runs before this layer's backward
            out.register_hook(self._before_backward)
        return out

    def _before_backward(self, grad: torch.Tensor) -> None:
        self.between_layers()
