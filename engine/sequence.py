"""A sequence: one choice of one request, its tokens, its KV blocks and its progress."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

from engine.sampling_params import SamplingParams

# a sampled token still on the device (overlapped scheduling): its step ran, its id is read next step
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), best first


class Sequence:
    """Token ids are prompt + output. `num_computed_tokens` counts tokens whose KV is in the cache."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, adapter_version: int = 0,
                 prefix_parent: "Sequence | None" = None, record_key: tuple[str, int] | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index                      # choice index within the request (n > 1)
        # (response id, choice index) of the API's answer: keys its activation record and its feedback
        self.record_key = record_key if record_key is not None else (request_id, index)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed                        # resolved per-sequence sampling seed
        self.adapter_version = adapter_version  # the version its prompt's KV (and prefix-cache key) is computed with
        # (first output token index, adapter version) each time a version went live for this sequence
        self.adapter_versions: list[tuple[int, int]] = [(0, adapter_version)]
        self.prefix_parent = prefix_parent      # sibling whose prefill this one waits for (shared blocks)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        # overlapped scheduling: num_computed_tokens before the first step whose full blocks are not yet
        # in the prefix cache (their tokens were not all on the host); None = all committed
        self.uncommitted_from: int | None = None
        self.num_cached_tokens = 0              # prompt tokens found in the prefix cache at admission
        self.logprobs: list[float] = []         # serving-time logprob of each output token
        self.top_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None

    # -- sizes ---------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_committed_tokens(self) -> int:
        """Computed tokens whose full blocks are registered in the prefix cache."""
        return self.num_computed_tokens if self.uncommitted_from is None else self.uncommitted_from

    @property
    def has_unresolved(self) -> bool:
        """Whether the newest token is a PLACEHOLDER (sampled by the step in flight, not yet read)."""
        return self.token_ids[-1] == PLACEHOLDER

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_tokens(self, block_index: int, block_size: int) -> list[int]:
        return self.token_ids[block_index * block_size:(block_index + 1) * block_size]

    def adapter_went_live(self, version: int) -> None:
        """A new adapter version serves this sequence from its next computed token on. Before its first
        computed token the whole sequence is the new version's (its prompt KV too)."""
        if self.num_computed_tokens == 0:
            self.adapter_version = version
            self.adapter_versions = [(0, version)]
        elif self.adapter_versions[-1][1] != version:
            start = self.num_output_tokens
            if self.adapter_versions[-1][0] == start:       # no token produced with the previous one
                self.adapter_versions[-1] = (start, version)
            else:
                self.adapter_versions.append((start, version))

    def append_token(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if self.params.logprobs is not None:
            self.top_logprobs.append(TokenLogprob(token_id, logprob, top or []))

    def resolve_token(self, pos: int, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        """The PLACEHOLDER at `pos` is `token_id` (overlapped scheduling; tokens resolve in order)."""
        self.token_ids[pos] = token_id
        self.logprobs.append(logprob)
        if self.params.logprobs is not None:
            self.top_logprobs.append(TokenLogprob(token_id, logprob, top or []))

    def drop_unresolved(self) -> None:
        """Forget a token sampled after the sequence ended (finished one step late, or aborted), and a
        version that went live for tokens after its last."""
        if self.token_ids[-1] != PLACEHOLDER:
            return
        while self.token_ids[-1] == PLACEHOLDER:
            self.token_ids.pop()
        self.trim_adapter_versions(self.num_output_tokens + 1)

    def trim_adapter_versions(self, end: int) -> None:
        """Drop the versions that went live from output token `end` on (overlapped scheduling: the
        sequence had ended a step before anyone knew)."""
        while len(self.adapter_versions) > 1 and self.adapter_versions[-1][0] >= end:
            self.adapter_versions.pop()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.name})")
