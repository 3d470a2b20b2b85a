"""CUDA graphs for decode steps: one graph per padded batch size, replayed with static buffers.

Padded rows write their KV to the runner's scratch slot and attend to one token of block 0, so
they never touch a live sequence's cache. Logits of padded rows are dropped.
"""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.context import CaptureMetadata, ServingContext


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, capture_pool=None):
        """`capture_pool`: the activation pool every graph writes decode rows to (capture
        prefill+decode), through a static slot buffer filled from each step's CaptureMetadata; None:
        steps with rows to record run eagerly."""
        self.runner = runner
        self.batch_sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.batch_sizes[-1]
        dev = runner.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), runner.scratch_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.capture_pool = capture_pool
        if self.capture_pool is not None:
            self.capture_slots = torch.full((n,), self.capture_pool.scratch_slot, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self._capture_all()

    def _context(self, b: int) -> ServingContext:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            max_query_len=1, max_seq_len=self.runner.max_blocks_per_seq * self.runner.block_size,
            is_decode=True)
        capture = None
        if self.capture_pool is not None:
            capture = CaptureMetadata(self.capture_pool, self.capture_slots[:b])
        return ServingContext(attn=meta, kv_caches=self.runner.kv_caches, block_size=self.runner.block_size,
                              capture=capture)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model = self.runner.model
        for b in reversed(self.batch_sizes):
            ctx = self._context(b)
            for _ in range(2):   # warm-up (Triton compile, cuBLAS handles) outside the graph
                model.compute_logits(model(self.input_ids[:b], self.positions[:b], ctx))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = model.compute_logits(model(self.input_ids[:b], self.positions[:b], ctx))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def can_run(self, ctx: ServingContext) -> bool:
        meta = ctx.attn
        if ctx.capture is not None and self.capture_pool is None:
            return False                  # a recorded row the graphs would not write: run eagerly
        return meta.is_decode and len(meta.seq_lens_host) <= self.max_batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ServingContext) -> torch.Tensor:
        b = input_ids.shape[0]
        padded = next(s for s in self.batch_sizes if s >= b)
        meta = ctx.attn
        width = meta.block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.slot_mapping[b:padded].fill_(self.runner.scratch_slot)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.seq_lens[b:padded].fill_(1)
        self.block_tables[:b, :width].copy_(meta.block_tables)
        if self.capture_pool is not None:
            if ctx.capture is not None:
                self.capture_slots[:b].copy_(ctx.capture.slots(b, self.capture_slots.device))
            else:
                self.capture_slots[:b].fill_(self.capture_pool.scratch_slot)
            self.capture_slots[b:padded].fill_(self.capture_pool.scratch_slot)
        graph, logits = self.graphs[padded]
        graph.replay()
        return logits[:b]
