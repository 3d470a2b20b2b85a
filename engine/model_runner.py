"""The only device code of the engine: KV cache, batch metadata, forward, sampling, CUDA graphs."""
from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

from common.model_shape import head_dim
from common.paging import paged_slots
from engine.attention import AttentionMetadata
from engine.context import CaptureMetadata, ServingContext, to_device
from engine.cuda_graph import DecodeGraphs
from engine.inflight import InFlightStep, fill_unresolved_inputs, to_host_async
from engine.sampler import SamplingMetadata, sample
from engine.scheduler import SampleResult, ScheduledBatch
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, hf_config, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, use_cuda_graphs: bool, cuda_graph_max_batch: int, max_blocks_per_seq: int,
                 decode_capture_pool=None):
        self.model = model
        # the activation pool decode graphs write (capture prefill+decode), None when decode rows are not
        # recorded: the graphs are captured once, so they hold the pool's buffers from the start
        self.decode_capture_pool = decode_capture_pool
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.vocab_size = hf_config.vocab_size
        self.max_blocks_per_seq = max_blocks_per_seq
        n_kv = hf_config.num_key_value_heads
        # one extra block at the end: a scratch target for padded rows of CUDA-graph batches
        shape = (num_blocks + 1, block_size, n_kv, head_dim(hf_config))
        self.scratch_slot = num_blocks * block_size
        self.kv_caches = [(torch.zeros(shape, device=device, dtype=dtype),
                           torch.zeros(shape, device=device, dtype=dtype))
                          for _ in range(hf_config.num_hidden_layers)]
        self.use_cuda_graphs = use_cuda_graphs
        self.cuda_graph_max_batch = cuda_graph_max_batch
        self.graphs: DecodeGraphs | None = None   # captured at the first decode step (after adapters are applied)
        # serving runs on a stream of the highest priority: a trainer on a low-priority stream of the same
        # GPU takes only the SMs serving leaves free (the block scheduler prefers high-priority work)
        self.stream = torch.cuda.Stream(device, priority=-100) if device.type == "cuda" else None
        # held while decode graphs are captured; a trainer thread holds it for each step, so no other
        # thread's CUDA calls invalidate a capture
        self.graph_capture_lock = threading.Lock()
        self.num_host_syncs = 0                   # overlapped steps read (ModelRunner.wait), for tests
        if self.stream is not None:
            torch.cuda.synchronize(device)        # weights and caches made on the default stream are ready

    def stream_context(self):
        """Run device work of the engine (thread) on the serving stream: `with runner.stream_context():`."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def invalidate_graphs(self) -> None:
        """Drop captured decode graphs (after modules were replaced); they are captured again on use."""
        self.graphs = None

    @staticmethod
    def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * hf_config.num_key_value_heads * head_dim(hf_config) * hf_config.num_hidden_layers
        return per_token * block_size * torch.tensor([], dtype=dtype).element_size()

    # -- inputs ----------------------------------------------------------------
    def _to_device(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def prepare(self, batch: ScheduledBatch, capture: CaptureMetadata | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, ServingContext, list[int]]:
        """Host lists -> device tensors of the batch; `capture`: its rows to record (from the engine's
        `CaptureManager.begin`), or None."""
        bs = self.block_size
        input_ids, positions, slots, qsl, lens, logits_idx = [], [], [], [0], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(paged_slots(seq.block_table, start, start + n, bs))
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
            if batch.samples(i):
                logits_idx.append(qsl[-1] - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            query_start_loc=self._to_device(qsl, torch.int32),
            seq_lens=self._to_device(lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            max_query_len=max(batch.num_new_tokens), max_seq_len=max(lens),
            is_decode=all(n == 1 for n in batch.num_new_tokens),
            query_start_loc_host=qsl, seq_lens_host=lens)
        ctx = ServingContext(attn=meta, kv_caches=self.kv_caches, block_size=bs, capture=capture)
        return (self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64),
                ctx, logits_idx)

    def sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        ps = [s.params for s in seqs]
        vocab = self.vocab_size
        meta = SamplingMetadata(
            temperature=self._to_device([p.temperature for p in ps], torch.float32),
            top_p=self._to_device([p.top_p for p in ps], torch.float32),
            top_k=self._to_device([min(p.top_k or vocab, vocab) for p in ps], torch.int64),
            min_p=self._to_device([p.min_p for p in ps], torch.float32),
            seeds=self._to_device([s.seed & 0xFFFFFFFF for s in seqs], torch.int64),
            steps=self._to_device([s.num_output_tokens for s in seqs], torch.int64),
            all_greedy=all(p.greedy for p in ps),
            use_top_k=any(0 < p.top_k < vocab for p in ps),
            use_top_p=any(p.top_p < 1.0 for p in ps),
            use_min_p=any(p.min_p > 0.0 for p in ps),
            num_top_logprobs=max((p.logprobs or 0) for p in ps))
        if any(p.needs_penalties for p in ps):
            self._add_penalties(meta, seqs)
        return meta

    def _add_penalties(self, meta: SamplingMetadata, seqs: list[Sequence]) -> None:
        ps = [s.params for s in seqs]
        vocab = self.vocab_size
        meta.presence_penalty = self._to_device([p.presence_penalty for p in ps], torch.float32)
        meta.frequency_penalty = self._to_device([p.frequency_penalty for p in ps], torch.float32)
        meta.repetition_penalty = self._to_device([p.repetition_penalty for p in ps], torch.float32)
        counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32)
        seen = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool)
        for i, s in enumerate(seqs):
            out = torch.tensor(s.output_token_ids, dtype=torch.int64)
            counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, torch.tensor(s.token_ids, dtype=torch.int64)] = True
        meta.output_counts = counts[:, :vocab].to(self.device)
        meta.seen_mask = seen[:, :vocab].to(self.device)

    # -- run -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, capture: CaptureMetadata | None = None
                ) -> list[SampleResult | None]:
        """One step's forward and sampling; `capture`: the rows it records (CaptureManager.begin)."""
        input_ids, positions, ctx, logits_idx = self.prepare(batch, capture)
        sampling_seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        logits = self._forward(input_ids, positions, ctx, logits_idx)
        if not sampling_seqs:
            return [None] * len(batch.seqs)
        ids, logprobs, top = sample(logits, self.sampling_metadata(sampling_seqs))
        host = self._pack(ids, logprobs, top).cpu().tolist()       # the step's one sync
        samples = [batch.samples(i) for i in range(len(batch.seqs))]
        return self._unpack(batch.seqs, samples, host, None if top is None else top.indices.shape[1])

    def _forward(self, input_ids, positions, ctx: ServingContext, logits_idx: list[int]) -> torch.Tensor:
        """input_ids, positions: [T] -> logits [S, V] of the sampled rows (a decode graph where one fits)."""
        if self.use_cuda_graphs and ctx.attn.is_decode and self.graphs is None:
            with self.graph_capture_lock:
                self.graphs = DecodeGraphs(self, self.cuda_graph_max_batch, self.decode_capture_pool)
        if self.graphs is not None and self.graphs.can_run(ctx):
            return self.graphs.run(input_ids, positions, ctx)
        hidden = self.model(input_ids, positions, ctx)                       # [T, h]
        if ctx.capture is not None:
            ctx.capture.join()
        idx = self._to_device(logits_idx, torch.int64)     # pinned, no host sync before the LM head
        return self.model.compute_logits(hidden.index_select(0, idx))      # [S, V]

    @staticmethod
    def _pack(ids, logprobs, top) -> torch.Tensor:
        """ids, logprobs [S] (+ top ids / logprobs [S, k]) -> one [2 (+ 2k), S] float64 tensor to read."""
        packed = [ids.double(), logprobs.double()]
        if top is not None:
            packed += [top.indices.double().T, top.values.double().T]
        return torch.cat([p.reshape(-1, ids.shape[0]) for p in packed])

    @staticmethod
    def _unpack(seqs: list[Sequence], samples: list[bool], host: list[list[float]], kmax: int | None
                ) -> list[SampleResult | None]:
        results: list[SampleResult | None] = []
        j = 0
        for seq, sampled in zip(seqs, samples):
            if not sampled:
                results.append(None)
                continue
            top_list = None
            if kmax is not None and seq.params.logprobs:
                k = seq.params.logprobs
                top_list = [(int(host[2 + r][j]), host[2 + kmax + r][j]) for r in range(k)]
            results.append(SampleResult(int(host[0][j]), host[1][j], top_list))
            j += 1
        return results

    # -- overlapped scheduling (engine/overlap.py) -----------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, capture: CaptureMetadata | None, prev: InFlightStep | None
               ) -> InFlightStep:
        """Queue the forward and sampling of `batch` and the copy of its samples to the host; no host
        sync. Decode rows whose input is `prev`'s sample (not yet read) take it on the device."""
        input_ids, positions, ctx, logits_idx = self.prepare(batch, capture)           # [T], [T]
        if prev is not None and prev.ids is not None:
            fill_unresolved_inputs(input_ids, batch, prev)
        step = InFlightStep(batch, [batch.samples(i) for i in range(len(batch.seqs))])
        logits = self._forward(input_ids, positions, ctx, logits_idx)                  # [S, V]
        step.graphs = self.graphs
        packed = None
        seqs = [s for s, sampled in zip(batch.seqs, step.samples) if sampled]
        if seqs:
            step.ids, logprobs, top = sample(logits, self.sampling_metadata(seqs))     # [S], [S]
            step.rows = {s.seq_id: j for j, s in enumerate(seqs)}
            step.top_k = None if top is None else top.indices.shape[1]
            packed = self._pack(step.ids, logprobs, top)                             # [R, S]
        step.host, step.event = to_host_async(packed, self.device)
        return step

    def wait(self, step: InFlightStep) -> list[SampleResult | None]:
        """The step's one host sync: its samples, read; its kernels have all run."""
        if step.event is not None:
            step.event.synchronize()
        self.num_host_syncs += 1
        if step.host is None:
            return [None] * len(step.batch.seqs)
        return self._unpack(step.batch.seqs, step.samples, step.host.tolist(), step.top_k)
