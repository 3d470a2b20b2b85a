"""Per-sequence text: incremental detokenization and stop strings (matched across token boundaries,
never returned unless asked, held back while a match could still be forming). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence, TokenLogprob


@dataclass
class SeqDelta:
    """What one step added to one sequence (one choice) of a request."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    seq: Sequence | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class IncrementalDetokenizer:
    """Decodes output tokens a few at a time; waits while the text ends in an incomplete character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, output_ids: list[int]) -> str:
        prefix_text = self._decode(output_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(output_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self, output_ids: list[int]) -> str:
        """Whatever is left once the sequence ended (an incomplete character is emitted as is)."""
        prefix_text = self._decode(output_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(output_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(output_ids)
        return new_text[len(prefix_text):]


class SequenceTextState:
    """Output text of one sequence with stop-string handling; `advance` returns the text to emit."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer) if seq.params.detokenize and tokenizer is not None else None
        self.stops = seq.params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.num_tokens_seen = 0

    def advance(self, sequence_finished: bool, num_output_tokens: int | None = None) -> tuple[str, str | None]:
        """Consume new tokens (the first `num_output_tokens` outputs: those on the host; default all);
        returns (text to emit, matched stop string or None)."""
        out_ids = self.seq.output_token_ids
        if num_output_tokens is not None:
            out_ids = out_ids[:num_output_tokens]
        self.num_tokens_seen = len(out_ids)
        if self.detok is None:
            return "", None
        before = len(self.text)
        self.text += self.detok.step(out_ids)
        if sequence_finished:
            self.text += self.detok.flush(out_ids)
        matched = self._find_stop(before)
        done = sequence_finished or matched is not None
        end = len(self.text) if done else max(self.emitted, len(self.text) - self.hold)
        emit = self.text[self.emitted:end]
        self.emitted = end
        return emit, matched

    def _find_stop(self, before: int) -> str | None:
        if not self.stops:
            return None
        start = max(0, before - self.hold)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            pos = self.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return None
        pos, stop = best
        cut = pos + len(stop) if self.seq.params.include_stop_str_in_output else pos
        self.text = self.text[:cut]
        return stop
