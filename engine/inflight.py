"""A step launched on the device whose sampled tokens are not yet read on the host (overlapped scheduling).

`ModelRunner.launch` returns one: its sampled ids stay on the device, where the next step's decode
rows take their input token from (`fill_unresolved_inputs`, as vLLM v1's async scheduling does), and
their host copy, started without waiting, is read once by `ModelRunner.wait`: the step's one host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.context import to_device
from engine.scheduler import ScheduledBatch
from engine.sequence import PLACEHOLDER


@dataclass
class InFlightStep:
    batch: ScheduledBatch
    samples: list[bool]                  # per seq of the batch: its last row was sampled (at launch)
    ids: torch.Tensor | None = None      # [S] int64 on the device: sampled ids (None: nothing sampled)
    rows: dict[int, int] = field(default_factory=dict)   # seq_id -> row of `ids`
    host: torch.Tensor | None = None     # [R, S] float64, packed ids | logprobs | top ids | top logprobs
    top_k: int | None = None             # top-logprob columns in `host` (None: none requested)
    event: torch.cuda.Event | None = None   # recorded after the step's last kernel (CUDA)
    graphs: object = None                # the decode graphs it may replay: kept alive until it is read
    # set by the engine (engine/overlap.py)
    capture: object = None               # the step's CaptureMetadata, or None
    token_pos: list[int | None] = field(default_factory=list)   # per seq: index of its PLACEHOLDER
    preemptions: list[int] = field(default_factory=list)        # per seq: num_preemptions at launch


def to_host_async(packed: torch.Tensor | None, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
    """Start copying `packed` to the host without waiting; on CUDA an event marks the step's end (also
    when nothing was sampled: capture's rows are written once it is reached)."""
    if device.type != "cuda":
        return packed, None
    host = None
    if packed is not None:
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def fill_unresolved_inputs(input_ids: torch.Tensor, batch: ScheduledBatch, prev: InFlightStep | None) -> None:
    """input_ids [T]: rows whose token is still a PLACEHOLDER (sampled by `prev`, the step in flight)
    take it from prev.ids on the device; no host sync. Only a sequence's newest token can be one."""
    dst: list[int] = []
    src: list[int] = []
    offset = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        offset += n
        if seq.token_ids[seq.num_computed_tokens + n - 1] == PLACEHOLDER:
            dst.append(offset - 1)
            src.append(prev.rows[seq.seq_id])
    if dst:
        dev = input_ids.device
        picked = prev.ids.index_select(0, to_device(src, torch.int64, dev))            # [D]
        input_ids.index_copy_(0, to_device(dst, torch.int64, dev), picked)
