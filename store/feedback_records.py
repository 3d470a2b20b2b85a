"""What the feedback log stores, as Python values: served completions, feedback on them, the blob
encoding of token ids and logprobs, and validation of what a client sends."""
from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass

from common.errors import InvalidRequestError

MAX_TEXT_BYTES = 16 * 1024


@dataclass(frozen=True)
class CompletionRecord:
    response_id: str
    choice_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]
    adapter_version: int
    api_key_id: str | None
    created: float
    finish_reason: str | None = None
    model: str | None = None
    # (first response token index, adapter version) for each version that produced part of the response,
    # in order; None -> the whole response came from `adapter_version`
    adapter_versions: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        spans = self.adapter_versions or ((0, self.adapter_version),)
        object.__setattr__(self, "adapter_versions", tuple((int(t), int(v)) for t, v in spans))

    def versions_per_token(self) -> list[int]:
        """The adapter version that produced each response token."""
        spans = list(self.adapter_versions) + [(len(self.response_token_ids), -1)]
        return [v for (start, v), (end, _) in zip(spans, spans[1:]) for _ in range(max(0, end - start))]


@dataclass(frozen=True)
class Feedback:
    feedback_id: str
    seq: int
    response_id: str
    choice_index: int
    rating: int | None
    stars: int | None
    comment: str | None
    better_response: str | None
    api_key_id: str | None
    created: float
    updated: float
    status: str                              # store.feedback_schema.FEEDBACK_STATUSES
    reward_value: float | None = None        # a grader's reward in [-1, 1] (the third form of score)
    quarantine_reason: str | None = None     # why the trainer could not train it (status 'quarantined')
    quarantine_error: str | None = None
    quarantined_at: float | None = None

    def reward(self) -> float:
        """A given reward as is; thumbs map to their rating; stars >= 4 -> +1, <= 2 -> -1, 3 -> 0."""
        if self.reward_value is not None:
            return float(self.reward_value)
        if self.rating is not None:
            return float(self.rating)
        stars = self.stars or 3
        return 1.0 if stars >= 4 else (-1.0 if stars <= 2 else 0.0)

    def to_public_dict(self) -> dict:
        return {"feedback_id": self.feedback_id, "id": self.response_id,
                "choice_index": self.choice_index, "rating": self.rating, "stars": self.stars,
                "reward": self.reward_value, "comment": self.comment,
                "better_response": self.better_response, "status": self.status, "created": self.created}

    def to_quarantine_dict(self) -> dict:
        """What the admin API shows of a quarantined rating."""
        return {"object": "quarantined_feedback", "feedback_id": self.feedback_id, "id": self.response_id,
                "choice_index": self.choice_index, "status": self.status, "reason": self.quarantine_reason,
                "error": self.quarantine_error, "quarantined_at": self.quarantined_at, "created": self.created}


def pack(values: list, typecode: str) -> bytes:
    """Little-endian array blob ('i' int32 token ids, 'd' float64 logprobs, 'q' int64 version spans)."""
    try:
        arr = array(typecode, values)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"cannot store values as array({typecode!r}): {exc}") from exc
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def _unpack(blob: bytes, typecode: str) -> list:
    arr = array(typecode)
    arr.frombytes(blob)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tolist()


def row_to_completion(row: tuple) -> CompletionRecord:
    return CompletionRecord(
        response_id=row[0], choice_index=row[1], prompt_token_ids=_unpack(row[2], "i"),
        response_token_ids=_unpack(row[3], "i"), logprobs=_unpack(row[4], "d"),
        adapter_version=row[5], api_key_id=row[6], created=row[7],
        finish_reason=row[8], model=row[9],
        adapter_versions=None if row[10] is None else tuple(zip(*[iter(_unpack(row[10], "q"))] * 2)))


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_score(rating: object, stars: object, reward: object = None) -> None:
    if sum(score is not None for score in (rating, stars, reward)) != 1:
        raise InvalidRequestError("Provide exactly one of 'rating' (-1 or 1), 'stars' (1..5) or "
                                  "'reward' (a number from -1 to 1).", param="rating")
    if rating is not None and (not is_int(rating) or rating not in (-1, 1)):
        raise InvalidRequestError("'rating' must be the integer -1 or 1.", param="rating")
    if stars is not None and (not is_int(stars) or not 1 <= stars <= 5):
        raise InvalidRequestError("'stars' must be an integer from 1 to 5.", param="stars")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not math.isfinite(reward) or not -1.0 <= reward <= 1.0):
        raise InvalidRequestError("'reward' must be a finite number from -1 to 1.", param="reward")


def validate_text(value: object, param: str) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{param}' must be a string.", param=param)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise InvalidRequestError(f"'{param}' is longer than {MAX_TEXT_BYTES} bytes.", param=param)
