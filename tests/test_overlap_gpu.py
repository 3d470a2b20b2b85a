"""GPU checks of overlapped scheduling (run through the device machine): with CUDA graphs, the serving
stream and pinned, non-blocking copies, an engine with `overlap_scheduling` gives the synchronous
engine's tokens (greedy and seeded), across arrivals, chunked prefill, ends found a step late, an
abort, preemption and capture=prefill; and a decode step reads the device once."""
from __future__ import annotations

import warnings

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.test_overlap_scheduling import build, drive, mixed_arrivals, prompt, same_but_float32_logprobs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import make_tiny_model
    path = tmp_path_factory.mktemp("llama-tied-gqa4-bias")
    make_tiny_model("llama-tied-gqa4-bias", path, seed=5)
    return path


def cuda(path, overlap: bool, **overrides):
    values = dict(device="cuda", dtype="float32", cuda_graph_max_batch=16)
    values.update(overrides)
    return build(path, overlap, **values)


@pytest.mark.parametrize("overrides", [
    dict(max_num_batched_tokens=16),
    dict(num_kv_blocks=12, capture="prefill"),
    dict(enforce_eager=True, enable_prefix_caching=False),
])
def test_cuda_outputs_match_synchronous(tiny, overrides):
    arrivals = mixed_arrivals()
    arrivals[8] = [("late", prompt(99, 7), SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[7, 9]))]
    off = drive(cuda(tiny, False, **overrides), arrivals, abort=("a", 5))
    on_engine = cuda(tiny, True, **overrides)
    on = drive(on_engine, arrivals, abort=("a", 5))
    assert same_but_float32_logprobs(off, on)
    assert on_engine.runner.num_host_syncs > 0
    if not overrides.get("enforce_eager"):
        assert on_engine.runner.graphs is not None


def test_cuda_decode_step_reads_once(tiny):
    engine = cuda(tiny, True)
    for i in range(4):
        engine.add_request(f"r{i}", prompt(i, 5 + i), SamplingParams(temperature=0.0, max_tokens=40))
    for _ in range(4):
        engine.step()                           # prompts, graph capture
    torch.cuda.synchronize()
    syncs = engine.runner.num_host_syncs
    torch.cuda.set_sync_debug_mode("warn")      # warns at each synchronizing CUDA call
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(10):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.runner.num_host_syncs - syncs == 10
    assert len(caught) <= 10, [str(w.message)[:200] for w in caught[:5]]
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
