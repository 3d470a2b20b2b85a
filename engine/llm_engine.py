"""The synchronous engine: add requests, step, read deltas. `step()` is schedule → run → process."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


from engine.block_manager import BlockManager
from engine.capture import CaptureManager
from engine.config import EngineConfig
from common.errors import ConfigError, InvalidRequestError
from engine.model_runner import ModelRunner
from engine.packing import refresh_folded_lora, set_lora_kernel
from engine.output_processor import SeqDelta, SequenceTextState
from engine.overlap import OverlappedStepper
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.serving_adapter import AdapterOffer, ServingAdapter
from engine.setup import EngineParts, build_engine_parts, num_kv_blocks
from engine.training_port import TrainingPort
from engine.step_signal import StepSignal


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_kv_blocks: int
    block_size: int


class LLMEngine:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None, activation_pool=None):
        """`activation_pool` (store.activation_pool.ActivationPool, built by the composition root with
        engine.setup.build_activation_pool): where capture records rows; None records nothing."""
        self.config = config
        parts = parts or build_engine_parts(config)
        self.hf_config, self.tokenizer = parts.hf_config, parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.device = parts.device
        num_blocks = num_kv_blocks(config, parts.hf_config, parts.device, parts.dtype)  # after the pool's memory
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.scheduler = Scheduler(sched_cfg, self.block_manager, parts.eos_token_ids)
        if activation_pool is not None and config.capture == "none":
            raise ConfigError("capture=none with an activation pool: build none (build_activation_pool)")
        self.activation_pool = activation_pool
        self.capture = None                   # the step's begin/end of recording rows into the pool
        if self.activation_pool is not None:
            self.capture = CaptureManager(self.activation_pool, config.capture == "prefill+decode",
                                          config.capture_fraction, config.capture_stream == "side")
        self.adapter = ServingAdapter()       # the live adapter's version; trainers offer new ones
        self.step_signal = StepSignal()       # prompt tokens of the step in flight, for a trainer thread
        self.runner = ModelRunner(
            parts.model, parts.hf_config, num_blocks, config.block_size, parts.device, parts.dtype,
            use_cuda_graphs=parts.device.type == "cuda" and not config.enforce_eager,
            cuda_graph_max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs),
            max_blocks_per_seq=-(-self.max_model_len // config.block_size),
            decode_capture_pool=self.activation_pool if self.capture and self.capture.captures_decode else None)
        set_lora_kernel(parts.model, config.lora_kernel)   # adapters applied later take it too
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._text_states: dict[int, SequenceTextState] = {}
        self.request_seqs: dict[str, list[Sequence]] = {}
        # overlapped scheduling: the step in flight and how steps overlap (None: synchronous steps)
        self.overlap = OverlappedStepper(self) if config.overlap_scheduling else None

    # -- the live adapter ------------------------------------------------------
    @property
    def adapter_version(self) -> int:
        """The adapter version new tokens are computed with (the one owner of that fact)."""
        return self.adapter.version

    def offer_adapter(self, offer: AdapterOffer) -> None:
        """Any thread: serve `offer` from the next step boundary on (a newer offer replaces it)."""
        self.adapter.offer(offer)

    def apply_adapter_offer(self) -> int | None:
        """At a step boundary (engine thread): make the newest offer live; its version, or None."""
        offer = self.adapter.take_offer()
        if offer is None:
            return None
        with self.runner.stream_context():       # ordered with the serving kernels
            self.adapter.apply(offer)
            refresh_folded_lora(self.runner.model)       # lora_kernel=folded: A's copy in the base weight
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.adapter_went_live(offer.version)
        return offer.version

    def training_port(self) -> TrainingPort:
        """What a trainer may use of this engine (the trainer gets this, never the engine)."""
        runner = self.runner
        return TrainingPort(model=runner.model, hf_config=self.hf_config, tokenizer=self.tokenizer,
                            device=self.device, max_model_len=self.max_model_len,
                            activation_pool=self.activation_pool,
                            serving_stream=runner.stream, step_signal=self.step_signal,
                            graph_capture_lock=runner.graph_capture_lock,
                            invalidate_graphs=runner.invalidate_graphs, has_unfinished=self.has_unfinished,
                            offer=self.offer_adapter, live_version=lambda: self.adapter_version)

    # -- requests --------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request that can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="messages")
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                f"including the answer", param="messages", code="context_length_exceeded")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        bm = self.block_manager
        if bm.blocks_needed(self.max_model_len) > bm.num_blocks:
            total = min(self.max_model_len, n + (params.max_tokens or self.max_model_len))
            if bm.blocks_needed(total) > bm.num_blocks:
                raise InvalidRequestError(
                    f"this request needs {total} tokens of KV cache; the cache holds "
                    f"{bm.num_blocks * bm.block_size}", param="max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    first_choice: tuple[str, int] | None = None) -> list[Sequence]:
        """`first_choice`: (response id, choice index) of the request's first choice where the API answer
        is not this request alone (a /v1/completions call with several prompts); choice i is keyed
        (response id, index + i) for its activation record and its feedback."""
        self.validate_request(prompt_token_ids, params)
        if request_id in self.request_seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seed = base_seed if i == 0 else hash((base_seed, i)) & 0xFFFFFFFF
            key = None if first_choice is None else (first_choice[0], first_choice[1] + i)
            seq = Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, params, seed,
                           self.adapter_version, prefix_parent=seqs[0] if seqs else None, record_key=key)
            self.scheduler.add(seq)
            self._text_states[seq.seq_id] = SequenceTextState(seq, self.tokenizer)
            seqs.append(seq)
        self.request_seqs[request_id] = seqs
        return seqs

    def abort_request(self, request_id: str) -> list[Sequence]:
        aborted = self.scheduler.abort(request_id)
        for seq in aborted:
            seq.drop_unresolved()                 # overlapped scheduling: its token in flight is dropped
            self._text_states.pop(seq.seq_id, None)
            if self.capture is not None:
                self.capture.release(seq)
        self.request_seqs.pop(request_id, None)
        return aborted

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or (self.overlap is not None and self.overlap.inflight is not None)

    # -- stepping --------------------------------------------------------------
    def step(self) -> list[SeqDelta]:
        self.apply_adapter_offer()
        with self.runner.stream_context():        # pool evictions, forward and sampling on the serving stream
            if self.overlap is not None:
                return self.overlap.step()
            batch = self.scheduler.schedule()
            if batch.is_empty:
                return []
            self.step_signal.begin(sum(n for n in batch.num_new_tokens if n > 1),
                                   sum(1 for n in batch.num_new_tokens if n == 1))
            try:
                capture = self.capture.begin(batch) if self.capture is not None else None
                results = self.runner.execute(batch, capture)  # after the step's host sync: its kernels ran
            finally:
                self.step_signal.end()
            self.scheduler.postprocess(batch, results)
            if self.capture is not None:
                self.capture.end(self.adapter_version)
        return self._process_outputs(batch.seqs, results)

    def _process_outputs(self, seqs: list[Sequence], results) -> list[SeqDelta]:
        deltas = []
        for seq, result in zip(seqs, results):
            if result is None:
                continue
            state = self._text_states[seq.seq_id]
            new_ids = seq.output_token_ids[state.num_tokens_seen:]
            text, stop = state.advance(seq.is_finished)
            if stop is not None and not seq.is_finished:
                seq.stop_reason = stop
                self.scheduler.finish(seq, "stop")
            new_logprobs = seq.top_logprobs[-len(new_ids):] if seq.params.logprobs is not None else []
            deltas.append(SeqDelta(seq.request_id, seq.index, new_ids, text, new_logprobs,
                                   seq.finish_reason, seq.stop_reason, seq))
            if seq.is_finished:
                self._finish_bookkeeping(seq)
        return deltas

    def _finish_bookkeeping(self, seq: Sequence) -> None:
        self._text_states.pop(seq.seq_id, None)
        if self.capture is not None:
            self.capture.finish(seq)
        seqs = self.request_seqs.get(seq.request_id, [])
        if all(s.is_finished for s in seqs):
            self.request_seqs.pop(seq.request_id, None)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[Sequence]]:
        """Offline: run every prompt to completion; returns the sequences of each prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.add_request(f"offline-{next(self._seq_ids)}", p, sp)
                    for p, sp in zip(prompts, params_list)]
        while self.has_unfinished():
            self.step()
        return requests

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage(),
                           self.scheduler.num_preemptions, bm.prefix_queries, bm.prefix_hits,
                           bm.num_blocks, bm.block_size)
