"""The training layers as CUDA graphs: per token bucket, each decoder layer's forward and backward are
captured once at start-up (torch.cuda.make_graphed_callables) and replayed by every step whose batch
fills that bucket, so a step costs the host two graph launches per layer instead of hundreds of op calls.

What a graph replays is fixed at capture: the bucket's token count T, the layer's weights and LoRA
masters (the same tensors every step: the optimizer updates them in place), the positions and the
attention segment bounds (static device buffers this module fills before the first layer of a step).
The bounds are padded to a fixed length with zero-length segments (cu_seqlens repeating T), and the
varlen attention kernel is told the longest segment is T (an upper bound: more blocks, each exiting
early). Records then differ from step to step only in data, never in shape.

A step replays graphs only when its batch is exactly a bucket (trainer/buckets.py pads it), has at most
`max_segments` segments, and injects no pool rows (which rows are injected differs per step: those
steps run eager, counted in `fallbacks`). The graphs' activations for backward stay allocated between
steps: `memory_bytes` reports them per bucket. They are captured on a stream of their own
(`own_capture_stream`), so their GEMMs do not share a cuBLAS workspace with the engine's decode graphs.

Host syncs left in a graphed step, and why: none inside it (the step's ints reach the device in one
pinned copy, the bounds in another); at its end, reading the loss and the gradient
norm (whether to apply the step: trainer/online.py `_optimize`); beside serving, the trainer thread's
gate waits for each layer's work before the next (trainer/background.py: at most one layer queued
beside a serving step), and `_finish` waits before pool rows are released.

Gradients: the graphed backward returns the masters' gradients in static buffers, and autograd stores
them as the masters' .grad without a copy. That is right as long as each step starts from
`zero_grad(set_to_none=True)` and reads the grads before the next replay (OnlineTrainer._optimize does).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

from common.errors import ConfigError
from engine.context import to_device
from trainer.attention import varlen_function
from trainer.compiled_layer import LayerContext, layer_calls, layer_projections


class LayerFunction:
    """One layer as a function of tensors only: (x [T, h], positions [T], cu [S + 1] int32, *factors)
    -> [T, h], where factors are the layer's LoRA masters (A, B per adapted projection, in call order).
    `longest`: the bound passed to varlen attention (the bucket's T); `cu_list`: on the CPU (per-record
    attention) the step's segment bounds, set before each call."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, adapters: dict, longest: int):
        self.layer, self.rotary, self.longest = layer, rotary, longest
        projections = layer_projections(layer)
        self.calls = layer_calls(layer, projections)
        self.slots = [(kinds, [adapters.get(projections[k]) for k in kinds]) for kinds in self.calls]
        self.factors = [t for _, found in self.slots for ad in found if ad is not None for t in ad[:2]]
        self.cu_list: list[int] = []

    def __call__(self, x, positions, cu, *factors):
        lora, it = {}, iter(factors)
        for kinds, found in self.slots:
            lora[kinds] = [None if ad is None else (next(it), next(it), ad[2]) for ad in found]
        call = varlen_function() if x.is_cuda else None
        ctx = LayerContext(lora, None, None, None, self.cu_list, cu if call is not None else None,
                           self.longest, call)
        return self.layer(x, positions, self.rotary, ctx)


@contextmanager
def own_capture_stream(stream):
    """Captures in this block run on `stream` instead of torch's one default capture stream. cuBLAS
    workspaces are kept per (handle, stream) and a captured GEMM bakes its workspace's address into the
    graph, so graphs captured on the same stream share one workspace: the trainer's graphs replaying
    beside the engine's decode graphs (both captured on the default stream by the same thread) would
    race on it (pytorch/pytorch#193402 describes the sharing)."""
    graph = torch.cuda.graphs.graph
    saved = graph.default_capture_stream
    graph.default_capture_stream = stream
    try:
        yield
    finally:
        graph.default_capture_stream = saved


class GraphedLayers:
    """One per trainer: the captured graphs of every bucket, kept across steps. `capture=False` (the CPU,
    tests) runs the same static-shape functions eagerly: the bookkeeping without the graphs."""

    def __init__(self, model: nn.Module, adapters: dict, buckets: list[int], max_segments: int,
                 capture: bool = True):
        if not buckets:
            raise ConfigError("training.cuda_graphs needs token buckets: set training.token_buckets")
        self.buckets, self.max_segments = list(buckets), max_segments
        self.layers = list(model.model.layers)
        self.device = next(model.parameters()).device
        self.capture = capture
        self.functions = {t: [LayerFunction(layer, model.model.rotary_emb, adapters, t) for layer in self.layers]
                          for t in self.buckets}
        self.positions = {t: torch.zeros(t, dtype=torch.long, device=self.device) for t in self.buckets}
        self.cu = {t: torch.full((max_segments + 1,), t, dtype=torch.int32, device=self.device) for t in self.buckets}
        self.graphs: dict[int, list] = {}
        self.capture_stream = torch.cuda.Stream(self.device) if capture else None
        self.memory_bytes: dict[int, int] = {}
        self.captures = 0                  # graph sets captured (one per bucket, at start-up only)
        self.replays = 0                   # steps that replayed graphs
        self.fallbacks = Counter()         # steps that ran eager, by reason
        self._bound = None                 # (ctx, positions) whose buffers are filled

    def capture_all(self, hidden_size: int, dtype: torch.dtype) -> None:
        """Capture every bucket's graphs (start-up, before serving). Without `capture`, the functions
        themselves stand in for the graphs."""
        for t in self.buckets:
            if not self.capture:
                self.graphs[t] = self.functions[t]
                continue
            before = torch.cuda.memory_allocated(self.device)
            with own_capture_stream(self.capture_stream):
                self.graphs[t] = list(torch.cuda.make_graphed_callables(
                    tuple(self.functions[t]), self._sample_args(t, hidden_size, dtype), num_warmup_iters=2))
            torch.cuda.synchronize(self.device)
            self.memory_bytes[t] = torch.cuda.memory_allocated(self.device) - before
            self.captures += 1

    def _sample_args(self, t: int, hidden_size: int, dtype: torch.dtype) -> tuple:
        self.cu[t].fill_(t)
        self.cu[t][0] = 0
        args = []
        for i, fn in enumerate(self.functions[t]):
            x = torch.randn(t, hidden_size, device=self.device, dtype=dtype) * 0.02   # [T, h]
            x.requires_grad_(i > 0)            # the first layer's input (the embeddings) needs no grad
            # the masters' aliases (same memory, other leaves): the captured autograd graph keeps its leaves'
            # gradient accumulators alive, with the stream of their creation; the masters' own are made by
            # each step on the trainer's stream
            aliases = [f.detach().requires_grad_(True) for f in fn.factors]
            args.append((x, self.positions[t], self.cu[t], *aliases))
        return tuple(args)

    def why_not(self, ctx, x: torch.Tensor) -> str | None:
        """Why this step cannot replay graphs (None: it can)."""
        if x.shape[0] not in self.graphs:
            return "not_a_bucket"
        if len(ctx.cu_seqlens) - 1 > self.max_segments:
            return "too_many_records"
        inj = ctx.injection
        if inj is not None and (inj.select is not None or inj.stored_idx.numel() > 0):
            return "injected_rows"
        if ctx.checkpoint_layers:
            return "checkpoint_layers"
        return None

    def layer_function(self, ctx, layer: nn.Module):
        """(x, positions, rotary) -> the layer's output, through the bucket's graph where the step allows
        (trainer.reuse.TrainingContext.call_layer calls it), else eager."""
        index = self.layers.index(layer)

        def forward(x, positions, rotary):
            reason = self.why_not(ctx, x)
            if reason is not None:
                if index == 0:
                    self.fallbacks[reason] += 1
                return layer(x, positions, rotary, ctx)
            t = x.shape[0]
            if index == 0 or self._bound is None or self._bound[0] is not ctx:
                self._bind(ctx, t, positions)
            fn = self.functions[t][index]
            return self.graphs[t][index](x, self.positions[t], self.cu[t], *fn.factors)
        return forward

    def _bind(self, ctx, t: int, positions: torch.Tensor) -> None:
        """Fill the bucket's static positions and segment bounds for this step (no host sync)."""
        bounds = list(ctx.cu_seqlens) + [t] * (self.max_segments + 1 - len(ctx.cu_seqlens))
        self.cu[t].copy_(to_device(bounds, torch.int32, self.device))       # [S + 1]
        self.positions[t].copy_(positions)
        for fn in self.functions[t]:
            fn.cu_list = list(ctx.cu_seqlens)
        self.replays += 1
        self._bound = (ctx, positions)

    def status(self) -> dict:
        return {"buckets": self.buckets, "captured": self.captures, "replayed_steps": self.replays,
                "eager_steps": dict(self.fallbacks), "memory_bytes": dict(self.memory_bytes)}


def check_graphs(config, device: torch.device) -> None:
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError("training.cuda_graphs needs a CUDA device: set it to false")


def graphed_layers(config, model: nn.Module, adapters: dict, device: torch.device) -> GraphedLayers | None:
    """The trainer's GraphedLayers for a trainer.config.TrainerConfig (None: no graphs), not yet captured."""
    if not config.cuda_graphs:
        return None
    check_graphs(config, device)
    return GraphedLayers(model, adapters, config.step_buckets(), config.max_records_per_step + 1)
