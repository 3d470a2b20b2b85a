"""Token-count buckets for the training step: a batch of T tokens runs as one of a few fixed sizes, so a
step's tensors have one of a few shapes (what CUDA graphs and compiled graphs replay without recapture).

The padding is one extra sequence after the batch's records: its own attention segment (no record
attends to it), no logit row, no loss term. So padded rows contribute exactly nothing to the loss and
nothing to any gradient: their upstream gradient is zero everywhere."""
from __future__ import annotations

from common.errors import ConfigError


def check_buckets(buckets: list[int] | None, step_tokens: int) -> None:
    """Reject buckets that could not hold a step (ConfigError says what to change)."""
    if buckets is None:
        return
    if not buckets or any(b < 16 for b in buckets) or sorted(set(buckets)) != list(buckets):
        raise ConfigError(f"training.token_buckets={buckets}: use ascending distinct sizes >= 16 (or null: no padding)")
    if buckets[-1] < step_tokens:
        raise ConfigError(f"training.token_buckets' largest ({buckets[-1]}) must be >= training.step_tokens "
                          f"({step_tokens}): add a bucket of {step_tokens}")


def padding_for(tokens: int, buckets: list[int] | None) -> int:
    """Rows to append so that `tokens` fills the smallest bucket that holds it; 0 without buckets or when
    no bucket holds it (a single record longer than every bucket runs unpadded)."""
    if not buckets:
        return 0
    for size in buckets:
        if size >= tokens:
            return size - tokens
    return 0
