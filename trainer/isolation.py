"""Fault isolation for training steps (issue 15): one rating the trainer cannot train must not stop
learning for everyone.

A step trains the ratings it took as one optimizer step. If that raises, the step is bisected: each
half is trained as a step of its own (so the good ratings of a failing step still train, and a step
that failed for its size, e.g. device OOM, is retried smaller), recursively, down to single ratings. A
single rating whose step still raises goes to the trainer's `isolate` (OnlineTrainer._isolate), which
decides whether the rating is at fault (quarantined) or the trainer is (training pauses):
QUARANTINE_REASONS says why a rating was quarantined."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.errors import InvalidRequestError
from store.feedback_records import CompletionRecord, Feedback
from trainer.admission import check_trainable
from trainer.reuse import TrainRecord, better_response_record

log = logging.getLogger("alchemist.trainer")
TOO_LONG, OOM, NON_FINITE, ERROR = "too_long", "oom", "non_finite", "error"
# too_long: over the context or step budget (a rating stored before /feedback checked it);
# oom: a step of this rating alone ran out of device memory; non_finite: its step alone gave a
# non-finite loss or gradient; error: any other exception in its step
QUARANTINE_REASONS = (TOO_LONG, OOM, NON_FINITE, ERROR)


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm was not finite: nothing was applied (bisected like a failure)."""


class TrainingHalted(RuntimeError):
    """Failures not attributable to a rating: training pauses until an admin resumes it."""


@dataclass
class RatingWork:
    """One rating's share of a step."""
    feedback: Feedback
    record: TrainRecord                     # the served choice (its pool rows pinned while the step reads them)
    trainable: list[TrainRecord] = field(default_factory=list)   # what the objective learns from it
    problem: tuple[str, str] | None = None  # (reason, error): no step can train it; quarantined untried
    served_version: int = 0                 # the adapter version that served the choice (its first token)

    @property
    def tokens(self) -> int:
        return sum(len(r.prompt_ids) + len(r.response_ids) for r in self.trainable)


def rating_work(feedback: Feedback, completion: CompletionRecord, tokenizer, max_positions: int,
                counts: Callable[[TrainRecord], bool]) -> RatingWork:
    """A rating as the step trains it: the served choice if the objective learns from it (`counts`) and a
    user-written better answer, if any; `problem` (reason, error) instead where no step could train it."""
    record = TrainRecord((feedback.response_id, feedback.choice_index), completion.prompt_token_ids,
                         completion.response_token_ids, completion.logprobs, feedback.reward())
    work = RatingWork(feedback, record, served_version=completion.adapter_version or 0)
    try:
        better = (better_response_record(tokenizer, feedback.better_response, record.prompt_ids)
                  if feedback.better_response else None)
        check_trainable(len(record.prompt_ids), len(record.response_ids),
                        None if better is None else len(better.response_ids), max_positions, None)
    except InvalidRequestError as err:          # stored before POST /feedback checked it
        work.problem = (TOO_LONG, err.message)
        return work
    except (TypeError, ValueError) as err:       # text the tokenizer refuses
        work.problem = (ERROR, describe(err))
        return work
    served = [record] if record.response_ids and counts(record) else []
    work.trainable = served + ([better] if better is not None else [])
    return work


def failure_reason(err: BaseException) -> str:
    if isinstance(err, NonFiniteStep):
        return NON_FINITE
    return OOM if isinstance(err, torch.OutOfMemoryError) else ERROR


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Quarantine:
    """The trainer's side of the quarantine: puts a rating in it (durable on return: the store's row),
    counts them by reason, and halts training after `max_in_a_row` ratings quarantined for failing with
    no step succeeding in between (training.max_consecutive_quarantines; None: never)."""

    def __init__(self, store, max_in_a_row: int | None):
        self.store, self.max_in_a_row = store, max_in_a_row
        self.counts: Counter = Counter()       # ratings quarantined since start, by reason
        self.in_a_row = 0                      # ratings quarantined for failing since a step succeeded

    def put(self, feedback: Feedback, reason: str, error: str) -> None:
        if self.store.quarantine(feedback.seq, reason, error):    # False: replaced since read, pending again
            self.counts[reason] += 1
            log.warning("trainer: rating %s (%s choice %d) quarantined (%s): %s", feedback.feedback_id,
                        feedback.response_id, feedback.choice_index, reason, error)

    def failed(self, feedback: Feedback, err: Exception) -> None:
        """`feedback`'s step failed alone with `err` and the trainer itself works: quarantine it."""
        self.put(feedback, failure_reason(err), describe(err))
        self.in_a_row += 1
        if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row:
            raise TrainingHalted(
                f"{self.in_a_row} ratings quarantined in a row with no training step succeeding "
                f"(training.max_consecutive_quarantines), the last for {describe(err)}: more likely a fault "
                "of the trainer than of the ratings. GET /v1/training/quarantine lists them; "
                "POST /v1/training/resume, then retry them")

    def reset(self) -> None:
        """A step succeeded, or an admin resumed training: count again from 0."""
        self.in_a_row = 0


def train_bisecting(works: list[RatingWork], optimize: Callable[[list[TrainRecord]], None],
                    trained: Callable[[list[RatingWork]], None],
                    isolate: Callable[[RatingWork, Exception], None]) -> None:
    """Train `works` with `optimize` (one optimizer step; `trained(works)` after it returned); if it raises,
    each half on its own, down to `isolate(work, error)` of a lone rating whose step raised. An exception
    from `isolate` (TrainingHalted) ends the bisection: the works not reached are neither."""
    if not works:
        return
    failure = _attempt(optimize, [r for w in works for r in w.trainable], len(works))
    if failure is None:
        trained(works)
    elif len(works) == 1:
        isolate(works[0], failure)
    else:
        half = len(works) // 2
        train_bisecting(works[:half], optimize, trained, isolate)
        train_bisecting(works[half:], optimize, trained, isolate)


def _attempt(optimize, records: list[TrainRecord], ratings: int) -> Exception | None:
    """The exception `optimize(records)` raised, without its traceback (whose frames hold the failed
    step's tensors: they must be freed before a smaller step is tried), or None."""
    try:
        optimize(records)
    except Exception as err:
        log.warning("a training step of %d rating(s) failed", ratings, exc_info=True)
        return err.with_traceback(None)
    return None


def watermark(taken: list[RatingWork], done: list[RatingWork], read_seq: int) -> int:
    """The trainer's read watermark after a step of `taken` (in seq order): past every rating up to the
    first one not `done` (trained or quarantined); a step halted midway leaves the rest to be read again."""
    finished = {id(w) for w in done}
    for work in taken:
        if id(work) not in finished:
            break
        read_seq = max(read_seq, work.feedback.seq)
    return read_seq
