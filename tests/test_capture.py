"""Capture's one begin/end pair per engine step (engine/capture.py), on the CPU: `begin` reserves a
step's recorded rows and returns the step's CaptureMetadata, `end` marks them captured; and the one
paging formula both the KV cache and the pool use (common/paging.py)."""
import torch

from common.paging import paged_slots
from engine.capture import CaptureManager
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from tests.pool_helpers import BS, make_pool


def prompt(seq_id: int, length: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(3, 3 + length)), SamplingParams(max_tokens=4), 0)


def test_paged_slots_is_the_page_formula():
    blocks = [5, 2, 7]
    assert paged_slots(blocks, 0, 12, 4) == [b * 4 + r for b in blocks for r in range(4)]
    assert paged_slots(blocks, 3, 6, 4) == [23, 8, 9] and paged_slots(blocks, 4, 4, 4) == []


def test_a_lone_prompt_step_is_one_run_of_slots_written_in_place():
    pool = make_pool(num_blocks=4)
    capture = CaptureManager(pool, captures_decode=False)
    seq = prompt(0, 6)
    meta = capture.begin(ScheduledBatch([seq], [6]))
    assert meta.pool is pool and meta.first_slot == 0 and meta.slot_mapping is None
    assert torch.equal(meta.slots(6, torch.device("cpu")), torch.arange(6))
    assert pool.get(seq.record_key).captured == 0          # reserved, not yet written
    capture.end(adapter_version=3)
    record = pool.get(seq.record_key)
    assert record.captured == 6 and record.versions == [3] * 6
    assert capture.steps == {"one_run": 1, "scattered": 0}


def test_a_mixed_step_gets_a_slot_mapping_with_scratch_rows():
    pool = make_pool(num_blocks=4)
    capture = CaptureManager(pool, captures_decode=False)
    a, b = prompt(0, 5), prompt(1, 3)
    b.params.capture = False                                # opted out: its rows go to scratch
    meta = capture.begin(ScheduledBatch([a, b], [5, 3]))
    slots = pool.slot_mapping(a.record_key, 0, 5) + [pool.scratch_slot] * 3
    assert meta.first_slot is None and meta.slot_mapping.tolist() == slots
    capture.end(adapter_version=1)
    assert pool.get(a.record_key).captured == 5 and pool.get(b.record_key) is None
    assert capture.steps == {"one_run": 0, "scattered": 1}


def test_a_step_recording_nothing_has_no_capture_metadata():
    pool = make_pool(num_blocks=4)
    capture = CaptureManager(pool, captures_decode=False)
    seq = prompt(0, 2 * BS)
    capture.begin(ScheduledBatch([seq], [2 * BS]))
    capture.end(0)
    seq.num_computed_tokens = 2 * BS                        # decoding: prefill-only capture records nothing
    assert capture.begin(ScheduledBatch([seq], [1])) is None
    capture.end(1)
    assert pool.get(seq.record_key).versions == [0] * 2 * BS
